"""Model FLOPs of training (checked against a count by hand), the peak MFU is measured against, and the
engine settings that go with speed (sparse embedding updates need ZeRO-0)."""

from __future__ import annotations

from pathlib import Path

import pytest

from raytag.trainer.flops import ModelFlops, Peak, gpu_peak, measured_cpu_peak, mfu, model_flops
from raytag.trainer.model import load_model, load_tokenizer

LABELS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


def test_flops_of_the_tiny_model_match_a_count_by_hand():
    tok = load_tokenizer("builtin:tiny-xlmr")
    fl = model_flops(load_model("builtin:tiny-xlmr", LABELS, tok, seed=0))
    d, ff, layers = 128, 256, 2  # the tiny model: 2 layers, 128 wide, feed-forward 256
    per_layer = (
        4 * (d * d + d)  # query, key, value, attention output: weight and bias
        + 2 * d  # attention output LayerNorm
        + (d * ff + ff)  # feed-forward in
        + (ff * d + d)  # feed-forward out
        + 2 * d  # output LayerNorm
    )
    non_embedding = layers * per_layer + 2 * d + (d * len(LABELS) + len(LABELS))  # embedding LayerNorm, head
    assert fl == ModelFlops(params=non_embedding, layers=layers, width=d)
    assert non_embedding == 265_861
    # Two windows of 10 and 20 real tokens: 6 N T for the matmuls, 12 L d T^2 for attention.
    lengths = [10, 20]
    by_hand = sum(6 * non_embedding * t + 12 * layers * d * t * t for t in lengths)
    assert fl.train_flops(sum(lengths), sum(t * t for t in lengths)) == pytest.approx(by_hand, rel=1e-12)


def test_gpu_peaks_come_from_the_table_by_name_and_precision():
    assert gpu_peak("NVIDIA H200", "bf16").flops == 989e12
    assert gpu_peak("NVIDIA GH200 480GB", "bf16").flops == 989e12
    assert gpu_peak("NVIDIA H100 PCIe", "bf16").flops == 756e12
    assert gpu_peak("NVIDIA L40", "bf16").flops == 181e12  # not the L4's rate
    assert gpu_peak("NVIDIA A100-SXM4-80GB", "fp32").flops == 19.5e12
    unknown = gpu_peak("Some Future GPU", "bf16")
    assert unknown.flops is None and "not in raytag's table" in unknown.source
    assert gpu_peak("Tesla V100-SXM2-16GB", "bf16").flops is None  # no bf16 on a V100


def test_mfu_is_achieved_over_the_peak_of_all_devices():
    assert mfu(50e12, Peak(100e12, "x"), 1) == pytest.approx(0.5)
    assert mfu(50e12, Peak(100e12, "x"), 2) == pytest.approx(0.25)
    assert mfu(50e12, Peak(None, "unknown"), 1) is None


def test_the_cpu_peak_is_measured_in_the_runs_precision():
    fp32 = measured_cpu_peak("fp32", size=256, seconds=0.05)
    assert fp32.flops and fp32.flops > 1e8 and "fp32 matmul measured" in fp32.source
    assert "bf16" in measured_cpu_peak("bf16", size=256, seconds=0.05).source


def test_sparse_embedding_updates_need_zero_0():
    from raytag.trainer.config import ConfigError, load_config
    from raytag.trainer.engine import engine_spec

    demo = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    cfg = load_config(demo, ["train.embedding_updates=sparse"])
    assert engine_spec(cfg, world=1, total_steps=10, on_gpu=False).sparse_embeddings  # one worker: ZeRO-0
    dense = load_config(demo, ["train.embedding_updates=dense"])
    assert not engine_spec(dense, 1, 10, False).sparse_embeddings
    with pytest.raises(ConfigError, match="embedding_updates=sparse needs ZeRO-0, but this run is at ZeRO-2"):
        engine_spec(cfg, world=2, total_steps=10, on_gpu=False)


def test_auto_embedding_updates_are_sparse_for_one_cpu_worker_only(caplog):
    import logging

    import torch

    from raytag.trainer.config import load_config
    from raytag.trainer.engine import engine_spec, fit_embedding_updates

    demo = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    cfg = load_config(demo, [])
    assert cfg.train.embedding_updates == "auto"
    with caplog.at_level(logging.INFO, logger="raytag"):
        one = engine_spec(cfg, world=1, total_steps=10, on_gpu=False)
    assert one.sparse_embeddings and one.zero_stage == 0
    assert "train.embedding_updates=auto: sparse (one CPU worker at ZeRO-0" in caplog.text
    assert not engine_spec(cfg, world=2, total_steps=10, on_gpu=False).sparse_embeddings  # ZeRO-2
    zero0 = load_config(demo, ["train.zero_stage=0"])
    assert not engine_spec(zero0, world=2, total_steps=10, on_gpu=False).sparse_embeddings  # 2 workers
    own = load_config(demo, ['train.deepspeed={"optimizer": {"type": "AdamW", "params": {"lr": 0.001}}}'])
    assert not engine_spec(own, world=1, total_steps=10, on_gpu=False).sparse_embeddings
    with caplog.at_level(logging.INFO, logger="raytag"):
        gpu = engine_spec(cfg, world=1, total_steps=10, on_gpu=True)
    assert not gpu.sparse_embeddings and "auto: dense (on a GPU" in caplog.text

    # A model without an nn.Embedding word table: auto falls back to dense; an explicit sparse stays
    # sparse (build_engine then refuses the model).
    class NoTable(torch.nn.Module):
        def get_input_embeddings(self):
            return torch.nn.EmbeddingBag(10, 4)

    assert not fit_embedding_updates(one, "auto", NoTable()).sparse_embeddings
    assert fit_embedding_updates(one, "sparse", NoTable()).sparse_embeddings
    tok = load_tokenizer("builtin:tiny-xlmr")
    assert fit_embedding_updates(
        one, "auto", load_model("builtin:tiny-xlmr", LABELS, tok, seed=0)
    ).sparse_embeddings
