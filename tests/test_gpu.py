"""CUDA checks (marker `gpu`) and the CPU twin of the collective checks.

On a GPU: `resolve_precision("auto", True)` gives bf16 on a GPU with native bf16, the DeepSpeed
config it leads to enables bf16, a tiny XLM-R built through `build_engine` lands on the GPU and
trains in bf16, and the helpers of trainer/dist.py return the right values under a real NCCL
process group. Without CUDA, tests/conftest.py skips the `gpu` tests and says why. They run on
a lent GPU machine through `bench/gpu.sh`.

Anywhere: the same helper checks under gloo with two processes (marker `distributed`), and
the choice between bf16 and fp16 with the GPU query faked.
"""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest
import torch

from raytag.trainer import dist
from raytag.trainer.engine import EngineSpec, build_engine, deepspeed_config, resolve_precision

gpu = pytest.mark.gpu

VOCAB, LABELS, SEQ, BATCH = 100, 5, 16, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(precision: str, learning_rate: float = 1e-2, total_steps: int = 20) -> EngineSpec:
    return EngineSpec(
        learning_rate=learning_rate,
        weight_decay=0.0,
        betas=(0.9, 0.999),
        eps=1e-8,
        total_steps=total_steps,
        warmup_steps=0,
        zero_stage=0,  # what the loop runs with one worker
        precision=precision,
        accumulation=1,
        max_grad_norm=1.0,
        world_size=1,
        extra={},
        on_gpu=torch.cuda.is_available(),
    )


# ---------------------------------------------------------------------------------------------
# Precision


def test_auto_precision_asks_for_native_bf16(monkeypatch):
    # CPU-side: the GPU query is faked. A V100 or T4 "supports" bf16 only by emulation
    # (torch's default answer is True there): auto must pick fp16 on it, bf16 on Ampere and later.
    def v100(including_emulation: bool = True) -> bool:
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", v100)
    assert resolve_precision("auto", True) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_precision("auto", True) == "bf16"


@gpu
def test_auto_precision_is_bf16_on_a_bf16_gpu():
    major, _ = torch.cuda.get_device_capability(0)
    name = torch.cuda.get_device_name(0)
    if major < 8:
        assert resolve_precision("auto", True) == "fp16", name
        pytest.skip(f"{name} (compute capability {major}.x) has no native bf16: auto gave fp16")
    assert resolve_precision("auto", True) == "bf16", name
    assert resolve_precision("fp16", True) == "fp16"  # an explicit choice stands


@gpu
def test_bf16_deepspeed_config():
    precision = resolve_precision("auto", True)
    if precision != "bf16":
        pytest.skip(f"{torch.cuda.get_device_name(0)} has no native bf16")
    cfg = deepspeed_config(_spec(precision))
    assert cfg["bf16"] == {"enabled": True}
    assert cfg["fp16"]["enabled"] is False
    assert cfg["zero_optimization"]["stage"] == 0
    # A user's train.deepspeed merges over it without losing the precision.
    extra = {"bf16": {"immediate_grad_update": True}}
    merged = deepspeed_config(dataclasses.replace(_spec(precision), extra=extra))
    assert merged["bf16"] == {"enabled": True, "immediate_grad_update": True}


# ---------------------------------------------------------------------------------------------
# A tiny XLM-R through build_engine, on the GPU, in bf16


@pytest.fixture
def one_process_group(monkeypatch):
    """The variables DeepSpeed needs for one process (restored after), and its process group destroyed."""
    port = str(_free_port())
    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
    }.items():
        monkeypatch.setenv(key, value)
    # build_engine chooses the accelerator (cuda when torch sees a GPU) unless this is set;
    # the Makefile sets it to cpu for the CPU machines.
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    torch.cuda.set_device(0)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _tiny_batch(device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (BATCH, SEQ), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2  # <s> ... </s>
    labels = torch.randint(0, LABELS, (BATCH, SEQ), generator=g)
    labels[:, 0] = labels[:, -1] = -100  # specials carry no label, as in raytag's features
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
    }


@gpu
def test_tiny_xlmr_trains_on_the_gpu_in_bf16(one_process_group):
    from transformers import XLMRobertaConfig, XLMRobertaForTokenClassification

    config = XLMRobertaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=SEQ + 2,
        type_vocab_size=1,
        num_labels=LABELS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = XLMRobertaForTokenClassification(config)  # built on the CPU: build_engine must move it
    precision = resolve_precision("auto", True)
    assert precision == "bf16", torch.cuda.get_device_name(0)
    torch.cuda.reset_peak_memory_stats()
    engine = build_engine(model, _spec(precision))

    from deepspeed.accelerator import get_accelerator

    assert get_accelerator().device_name() == "cuda", "DeepSpeed chose another accelerator"
    assert torch.distributed.get_backend() == "nccl"
    assert engine.bfloat16_enabled() and not engine.fp16_enabled()
    params = list(engine.module.parameters())
    assert {p.device for p in params} == {torch.device("cuda", 0)}
    assert {p.dtype for p in params} == {torch.bfloat16}
    # The optimizer steps fp32 master copies of the bf16 weights, on the GPU as well.
    masters = [p for group in engine.optimizer.param_groups for p in group["params"]]
    assert len(masters) == len(params)
    assert {(p.device, p.dtype) for p in masters} == {(torch.device("cuda", 0), torch.float32)}

    batch = _tiny_batch(torch.device("cuda", 0))
    labels = batch.pop("labels")
    before = engine.module.classifier.weight.detach().clone()
    losses = []
    for _ in range(20):
        logits = engine(**batch).logits
        assert logits.device == torch.device("cuda", 0) and logits.dtype == torch.bfloat16
        loss = torch.nn.functional.cross_entropy(
            logits.float().view(-1, LABELS), labels.view(-1), ignore_index=-100
        )
        engine.backward(loss, scale_wrt_gas=False)  # as the loop calls it
        engine.step()
        losses.append(loss.item())
    after = engine.module.classifier.weight.detach()
    assert after.dtype == torch.bfloat16 and not torch.equal(before, after), "step() changed nothing"
    assert all(torch.isfinite(torch.tensor(losses))), losses
    # One fixed batch, lr 1e-2: the tiny model must fit it.
    assert losses[-1] < 0.5 * losses[0], losses
    assert torch.cuda.max_memory_allocated() > 0


# ---------------------------------------------------------------------------------------------
# trainer/dist.py: one set of checks, run by every rank, under NCCL (GPU) and gloo (CPU twin)


def _check_helpers(rank: int, world: int) -> None:
    """Every rank calls this with the same sequence of collectives; assertions name what broke."""
    assert (dist.rank(), dist.world(), dist.is_rank_zero()) == (rank, world, rank == 0)
    assert dist.all_sum([float(rank + 1), 0.5]) == [world * (world + 1) / 2, 0.5 * world]
    assert dist.all_max([float(rank), -float(rank)]) == [float(world - 1), 0.0]
    gathered = dist.gather_objects({"rank": rank, "tags": ["B-PER"] * rank})
    assert gathered == [{"rank": r, "tags": ["B-PER"] * r} for r in range(world)]
    src = world - 1  # the last rank, so that with two ranks a non-zero source is covered
    assert dist.broadcast_object({"from": src} if rank == src else None, src=src) == {"from": src}
    dist.barrier()
    # A failure on the last rank reaches every rank at the check point.
    error = ValueError("train.txt:7: bad tag") if rank == world - 1 else None
    with pytest.raises((ValueError, dist.PeerError)) as caught:
        dist.agree_on_error(error)
    if error is not None:
        assert caught.value is error
    else:
        assert isinstance(caught.value, dist.PeerError)
        assert str(caught.value) == f"rank {world - 1} failed: train.txt:7: bad tag"
        assert caught.value.kind == "ValueError"
    dist.agree_on_error(None)  # nobody failed: returns on every rank


@pytest.fixture
def nccl_world():
    """A real NCCL process group of one rank on GPU 0, destroyed afterwards."""
    torch.cuda.set_device(0)
    if torch.distributed.is_initialized():
        # A group left by an earlier test in this process: the helpers must see only this one.
        torch.distributed.destroy_process_group()
    torch.distributed.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    yield
    torch.distributed.destroy_process_group()


@gpu
def test_dist_helpers_under_nccl(nccl_world, monkeypatch):
    assert torch.distributed.get_backend() == "nccl"
    assert dist.backend_device() == torch.device("cuda", 0)
    _check_helpers(rank=0, world=1)

    # With one rank the helpers return before any collective. To run their collective branch
    # on this one GPU (NCCL refuses two ranks on one device), report a larger world to the
    # shortcut: all_reduce and broadcast over the real one-rank group are identities, so the
    # results must equal the inputs, and they only come back if the tensors sit on the GPU.
    monkeypatch.setattr(dist, "world", lambda: 2)
    assert dist.all_sum([1.5, -2.0, 3.0]) == [1.5, -2.0, 3.0]
    assert dist.all_max([4.0, -1.0]) == [4.0, -1.0]
    assert dist.broadcast_object({"labels": ["O", "B-LOC"]}) == {"labels": ["O", "B-LOC"]}
    # ... which is what backend_device() is for: NCCL refuses a CPU tensor.
    with pytest.raises(RuntimeError):
        torch.distributed.all_reduce(torch.ones(2, dtype=torch.float64))


def _gloo_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        assert torch.distributed.get_backend() == "gloo"
        assert dist.backend_device() == torch.device("cpu")
        _check_helpers(rank, world)
        (Path(out_dir) / f"rank{rank}.ok").write_text("ok\n")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_dist_helpers_under_gloo_with_two_processes(tmp_path, monkeypatch):
    # The CPU twin of the NCCL test: two real ranks, so every collective really runs. A failed
    # assertion in a rank ends the spawn with that rank's traceback.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.multiprocessing.spawn(_gloo_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.ok", "rank1.ok"]
