"""Model FLOPs of training and the device's peak: the two halves of model FLOP utilisation (MFU).

Training FLOPs of one window of T real tokens, as in the PaLM paper's appendix B (the usual
MFU convention): 6 x N x T for the matmuls of N non-embedding parameters (forward 2, backward
4 per parameter and token) plus 12 x L x d x T^2 for attention's score and value products
(L layers, width d). Embedding lookups do no matmul, and padding is not useful work, so
neither counts: MFU measures what the run achieved against what the hardware could.

The peak is per device: a table of dense tensor-core rates for common GPUs (NVIDIA data
sheets), and on a CPU a matmul measured at start-up in the run's precision on its threads.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("raytag")

# Names of the embedding tables in Hugging Face encoders (XLM-R, BERT, RoBERTa, DeBERTa, ...).
EMBEDDING_TABLES = ("word_embeddings", "position_embeddings", "token_type_embeddings")


@dataclass(frozen=True)
class ModelFlops:
    """What the training FLOPs of a window depend on."""

    params: int  # non-embedding parameters
    layers: int
    width: int

    def train_flops(self, tokens: float, tokens_squared: float) -> float:
        """FLOPs of training on windows with `tokens` real tokens in all and sum of squared lengths."""
        return 6.0 * self.params * tokens + 12.0 * self.layers * self.width * tokens_squared


def model_flops(model: torch.nn.Module) -> ModelFlops:
    """Count the non-embedding parameters of `model` (their full size, also under ZeRO-3)."""
    params = 0
    for name, p in model.named_parameters():
        if any(part in EMBEDDING_TABLES for part in name.split(".")):
            continue
        params += int(getattr(p, "ds_numel", 0) or p.numel())  # ZeRO-3 leaves an empty local tensor
    cfg: Any = model.config
    return ModelFlops(params=params, layers=int(cfg.num_hidden_layers), width=int(cfg.hidden_size))


# Dense (not sparsity-doubled) peak FLOP/s per GPU by precision, from NVIDIA's data sheets. fp32 is
# the CUDA-core rate: torch runs fp32 matmuls without TF32 unless a user allows it. Matched by
# substring of torch.cuda.get_device_name(), the first match wins (longer names first).
GPU_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("GB200", {"bf16": 2.5e15, "fp16": 2.5e15, "fp32": 80e12}),
    ("B200", {"bf16": 2.25e15, "fp16": 2.25e15, "fp32": 80e12}),
    ("GH200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
    ("L40", {"bf16": 181e12, "fp16": 181e12, "fp32": 90.5e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}),
    ("A10G", {"bf16": 70e12, "fp16": 70e12, "fp32": 31.2e12}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),
    ("T4", {"fp16": 65e12, "fp32": 8.1e12}),
]


@dataclass(frozen=True)
class Peak:
    flops: float | None  # per device, None when unknown
    source: str


def gpu_peak(name: str, precision: str) -> Peak:
    for key, peaks in GPU_PEAKS:
        if key in name:
            value = peaks.get(precision)
            if value is None:
                return Peak(None, f"{name}: no {precision} rate in raytag's table")
            return Peak(value, f"{name} {precision} dense peak (data sheet)")
    return Peak(None, f"{name}: not in raytag's table of GPU peaks")


def measured_cpu_peak(precision: str, size: int = 1024, seconds: float = 0.3) -> Peak:
    """The best rate of a size x size matmul in the run's dtype on this process's threads."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)  # its own: the run's random stream stays untouched (exact resume)
    a = torch.randn(size, size, generator=gen).to(dtype)
    b = torch.randn(size, size, generator=gen).to(dtype)
    a @ b  # warm-up: kernel selection, allocator
    best = float("inf")
    deadline = time.perf_counter() + seconds
    reps = 0
    while reps < 3 or (time.perf_counter() < deadline and reps < 50):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
        reps += 1
    rate = 2.0 * size**3 / best
    return Peak(
        rate, f"CPU {precision} matmul measured at start ({size}x{size}, {torch.get_num_threads()} threads)"
    )


def device_peak(device: torch.device, precision: str) -> Peak:
    if device.type == "cuda":
        return gpu_peak(torch.cuda.get_device_name(device), precision)
    return measured_cpu_peak(precision)


def mfu(flops_per_second: float, peak: Peak, devices: int) -> float | None:
    """Model FLOP utilisation: achieved model FLOP/s over the peak of all `devices` together."""
    if not peak.flops or devices < 1:
        return None
    return flops_per_second / (peak.flops * devices)


def rounded(x: float | None, digits: int = 4) -> float | None:
    """`x` to `digits` places, None as None: an MFU as the training log and results.json record it."""
    return None if x is None else round(x, digits)
