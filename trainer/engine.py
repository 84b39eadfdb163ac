"""DeepSpeed set-up: the config dict from a few typed fields, the process group, the engine.

raytag builds the optimizer (torch AdamW, no decay on biases and LayerNorm) and the schedule
(linear warm-up then linear decay, as Hugging Face's recipes) itself and hands both to
DeepSpeed, which owns ZeRO partitioning, precision, accumulation and clipping. That keeps
DeepSpeed's C++ `fused_adam` out of the picture on CPU; a user's extra DeepSpeed JSON can
still replace any key, including `optimizer` and `scheduler`.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

log = logging.getLogger("raytag")


@dataclass(frozen=True)
class EngineSpec:
    learning_rate: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    total_steps: int
    warmup_steps: int
    zero_stage: int
    precision: str  # resolved: fp32, bf16 or fp16
    accumulation: int
    max_grad_norm: float
    world_size: int
    extra: dict[str, Any]


def resolve_precision(requested: str, use_gpu: bool) -> str:
    """auto -> bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if requested != "auto":
        if requested == "fp16" and not use_gpu:
            raise ValueError(
                "train.precision: fp16 needs a GPU (DeepSpeed refuses it on CPU); use bf16 or fp32"
            )
        return requested
    if use_gpu:
        # Native bf16 only (compute capability 8.0+): torch's default also counts GPUs that merely
        # emulate it (a V100 or T4 can hold bf16 tensors), where bf16 is slower than fp16.
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "fp32"


def deepspeed_config(spec: EngineSpec) -> dict[str, Any]:
    """The DeepSpeed JSON, with the user's `train.deepspeed` merged over it (deeply)."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,  # nominal: raytag feeds token-budget batches itself
        "gradient_accumulation_steps": spec.accumulation,
        "train_batch_size": spec.accumulation * spec.world_size,
        "gradient_clipping": spec.max_grad_norm,
        "zero_optimization": {"stage": spec.zero_stage},
        "bf16": {"enabled": spec.precision == "bf16"},
        "fp16": {"enabled": spec.precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(cfg, spec.extra)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def ensure_process_group_env() -> None:
    """One process without a launcher: DeepSpeed needs the torch.distributed env variables."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if "LOCAL_RANK" not in os.environ and torch.distributed.get_world_size() == 1:
            os.environ["LOCAL_RANK"] = (
                "0"  # an earlier run in this process started the group; DeepSpeed reads it
            )
        return
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"})
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def _skip_cpu_shm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce op on CPU.

    On the first process-group start DeepSpeed builds `deepspeed_shm_comm` with g++ (1-2 min on
    a new machine, every new machine). Marking the op incompatible makes DeepSpeed use plain
    gloo collectives, which it falls back to by design on platforms without the op.
    """
    import deepspeed.ops

    if not torch.cuda.is_available() and os.environ.get("RAYTAG_DS_SHM_COMM") != "1":
        # `__compatible_ops__` is computed lazily on first access by compiling a probe for every
        # op (seconds, and linker noise such as "cannot find -laio"); its only reader is the
        # shm-op check, so when it has not been computed yet we set it ourselves.
        ops = vars(deepspeed.ops)
        if "__compatible_ops__" in ops:
            ops["__compatible_ops__"]["deepspeed_shm_comm"] = False
        else:
            ops["__compatible_ops__"] = {"deepspeed_shm_comm": False}


def build_engine(model: torch.nn.Module, spec: EngineSpec, device_rank: int | None = None):
    """Wrap `model` in a DeepSpeed engine with raytag's optimizer and schedule (unless overridden).

    `device_rank`: the CUDA device index this rank trains on. DeepSpeed otherwise takes
    cuda:LOCAL_RANK, which is not the worker's GPU when Ray assigns devices differently.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    ensure_process_group_env()
    import deepspeed
    from transformers import get_linear_schedule_with_warmup

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    _skip_cpu_shm_build()
    ds_config = deepspeed_config(spec)
    optimizer = scheduler = None
    if "optimizer" not in ds_config:
        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": spec.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        # fused: one kernel over all parameters (CPU and CUDA), the fastest torch AdamW.
        optimizer = torch.optim.AdamW(
            groups, lr=spec.learning_rate, betas=spec.betas, eps=spec.eps, fused=spec.precision != "fp16"
        )
        if "scheduler" not in ds_config:
            scheduler = get_linear_schedule_with_warmup(optimizer, spec.warmup_steps, spec.total_steps)
    args = SimpleNamespace(device_rank=device_rank) if device_rank is not None else None
    engine, _, _, _ = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    if spec.world_size == 1 and engine.zero_optimization_stage() == 0:
        # One rank: DeepSpeed's gradient all-reduce is an identity (a sum over one rank, divided
        # by one) that still flattens every gradient into a buffer and copies it back, twice the
        # model's size in memory traffic per optimizer step: with the 118M-parameter offline
        # encoder on CPU, 40% of a small step's time (bench/engine_step.py --allreduce).
        engine.enable_backward_allreduce = False
    return engine


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The full-precision weights on CPU, for export (every rank must call it under ZeRO-3)."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)
        out[name] = (full if full is not None else p.detach()).float().cpu().clone()
    for name, b in module.named_buffers():
        if name in module.state_dict():
            out[name] = b.detach().cpu().clone()
    return out
