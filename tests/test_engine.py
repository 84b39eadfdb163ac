"""DeepSpeed engine set-up: the identity all-reduce skipped, bf16 on CPU, sparse word-embedding updates."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from raytag.trainer.engine import EngineSpec, build_engine, end_local_process_group
from raytag.trainer.model import load_model, load_tokenizer
from raytag.trainer.sparse_adam import catch_up_rows

pytestmark = pytest.mark.slow  # builds DeepSpeed engines (and the process group) in this process

LABELS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


@pytest.fixture(autouse=True)
def _end_the_process_group():
    """Each test's engines start a group in this process: end it, as a run does."""
    yield
    end_local_process_group()


def _train_step(engine, x: torch.Tensor, y: torch.Tensor):
    """One forward, backward and optimizer step of `engine` on (x, y); returns the model's output."""
    out = engine(input_ids=x, labels=y)
    engine.backward(out.loss, scale_wrt_gas=False)
    engine.step()
    return out


def test_one_worker_skips_the_identity_allreduce_and_trains_identically():
    tok = load_tokenizer("builtin:tiny-xlmr")
    model = load_model("builtin:tiny-xlmr", LABELS, tok, seed=0, dropout=0.0)  # same steps on both
    twin, initial = copy.deepcopy(model), copy.deepcopy(model)
    spec = EngineSpec(1e-2, 0.01, (0.9, 0.999), 1e-8, 10, 1, 0, "fp32", 1, 1.0, 1, {})
    fast, reference = build_engine(model, spec), build_engine(twin, spec)
    assert fast.enable_backward_allreduce is False
    reference.enable_backward_allreduce = True  # DeepSpeed's own path: flatten, all-reduce, copy back
    calls = {"fast": 0, "reference": 0}
    for key, engine in (("fast", fast), ("reference", reference)):
        inner = engine.allreduce_gradients

        def counted(*args, _key=key, _inner=inner, **kwargs):
            calls[_key] += 1
            return _inner(*args, **kwargs)

        engine.allreduce_gradients = counted
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randint(5, len(tok), (4, 12), generator=gen)
        y = torch.randint(0, len(LABELS), (4, 12), generator=gen)
        for engine in (fast, reference):
            _train_step(engine, x, y)
    assert calls == {"fast": 0, "reference": 3}
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert not all(torch.equal(a, c) for a, c in zip(model.parameters(), initial.parameters(), strict=True))


# ---------------------------------------------------------------------------------------------
# bf16 on CPU: DeepSpeed's torch_autocast, fp32 weights


def test_auto_precision_on_cpu_follows_the_cpus_bf16_support(monkeypatch):
    import raytag.trainer.engine as eng

    monkeypatch.setattr(eng, "cpu_has_bf16", lambda: True)
    assert eng.resolve_precision("auto", False) == "bf16"
    monkeypatch.setattr(eng, "cpu_has_bf16", lambda: False)
    assert eng.resolve_precision("auto", False) == "fp32"
    assert eng.resolve_precision("bf16", False) == "bf16"  # an explicit choice stands
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        eng.resolve_precision("fp16", False)


def test_cpu_bf16_is_torch_autocast_and_gpu_bf16_is_deepspeeds_mode():
    from raytag.trainer.engine import deepspeed_config

    cpu = deepspeed_config(EngineSpec(1e-2, 0.0, (0.9, 0.999), 1e-8, 10, 1, 0, "bf16", 1, 1.0, 1, {}))
    assert cpu["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert cpu["bf16"]["enabled"] is False and cpu["fp16"]["enabled"] is False
    gpu = deepspeed_config(
        EngineSpec(1e-2, 0.0, (0.9, 0.999), 1e-8, 10, 1, 0, "bf16", 1, 1.0, 1, {}, on_gpu=True)
    )
    assert gpu["bf16"]["enabled"] is True and "torch_autocast" not in gpu
    fp32 = deepspeed_config(EngineSpec(1e-2, 0.0, (0.9, 0.999), 1e-8, 10, 1, 0, "fp32", 1, 1.0, 1, {}))
    assert "torch_autocast" not in fp32 and fp32["bf16"]["enabled"] is False


def test_cpu_bf16_trains_with_fp32_weights_and_bf16_matmuls():
    tok = load_tokenizer("builtin:tiny-xlmr")
    model = load_model("builtin:tiny-xlmr", LABELS, tok, seed=0, dropout=0.0)
    spec = EngineSpec(1e-2, 0.0, (0.9, 0.999), 1e-8, 20, 0, 0, "bf16", 1, 1.0, 1, {})
    engine = build_engine(model, spec)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(5, len(tok), (4, 12), generator=gen)
    y = torch.randint(0, len(LABELS), (4, 12), generator=gen)
    losses = []
    for _ in range(15):
        out = _train_step(engine, x, y)
        assert out.logits.dtype == torch.bfloat16  # the classifier's matmul ran in bf16
        losses.append(float(out.loss.detach()))
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------------------------------------
# Sparse word-embedding updates: lazy AdamW rows


def _twin_tables(rows: int = 12, width: int = 6):
    torch.manual_seed(0)
    dense = torch.nn.Embedding(rows, width)
    sparse = torch.nn.Embedding(rows, width, sparse=True)
    sparse.weight.data.copy_(dense.weight.data)
    return dense, sparse


def _train_twins(dense, sparse, id_lists, lr=0.05, weight_decay=0.1):
    from raytag.trainer.sparse_adam import RowSparseAdamW, settle_before_lookup

    kw = {"lr": lr, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": weight_decay}
    opt_dense = torch.optim.AdamW(dense.parameters(), fused=True, **kw)
    opt_sparse = RowSparseAdamW(sparse.parameters(), fused=True, **kw)
    settle_before_lookup(sparse, opt_sparse)  # as build_engine does for one worker
    gen = torch.Generator().manual_seed(1)
    for ids in id_lists:
        x = torch.tensor([ids])
        target = torch.randn(1, len(ids), dense.embedding_dim, generator=gen)
        for emb, opt in ((dense, opt_dense), (sparse, opt_sparse)):
            opt.zero_grad()
            ((emb(x) - target) ** 2).sum().backward()
            opt.step()
    return opt_sparse


def test_row_sparse_adamw_equals_dense_adamw_where_every_row_has_a_gradient_every_step():
    dense, sparse = _twin_tables()
    # Rows 0, 3, 5, 7 every step (two of them twice in the batch); the others never.
    opt = _train_twins(dense, sparse, [[0, 3, 5, 3, 7, 0]] * 5)
    touched = [0, 3, 5, 7]
    torch.testing.assert_close(sparse.weight[touched], dense.weight[touched], rtol=1e-5, atol=1e-6)
    state = opt.state[sparse.weight]
    assert float(state["step"]) == 5 and set(state) == {
        "step",
        "exp_avg",
        "exp_avg_sq",
        "row_step",
        "step_coef",
        "log_keep",
    }
    assert state["row_step"].tolist() == [5, 0, 0, 5, 0, 5, 0, 5, 0, 0, 0, 0]


def test_rows_without_a_gradient_owe_dense_adamws_steps_and_pay_them_on_their_next_update_or_catch_up():
    dense, sparse = _twin_tables()
    before = sparse.weight.detach().clone()
    # Rows come and go: each row's gradient-free stretches are what dense AdamW keeps moving through.
    steps = [[0, 1, 2], [0, 3], [4, 5, 0], [1, 6], [0, 2, 7], [8], [0, 9], [3, 1], [10, 0], [11, 2]] * 3
    opt = _train_twins(dense, sparse, steps)
    assert torch.equal(sparse.weight[11], dense.weight[11]) is False  # row 11 still owes its last steps
    opt.catch_up()
    assert opt.state[sparse.weight]["row_step"].tolist() == [30] * 12
    moved = (dense.weight.detach() - before).abs()
    error = (sparse.weight - dense.weight).detach().abs()
    assert float(error.max()) < 0.002 * float(moved.max()), (error.max(), moved.max())
    # The moments are exact (no approximation in their decay).
    torch.testing.assert_close(
        opt.state[sparse.weight]["exp_avg"], _dense_moments(steps)[0], rtol=1e-4, atol=1e-7
    )


def _dense_moments(steps):
    dense, _ = _twin_tables()
    opt = torch.optim.AdamW(
        dense.parameters(), lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, fused=True
    )
    gen = torch.Generator().manual_seed(1)
    for ids in steps:
        x = torch.tensor([ids])
        target = torch.randn(1, len(ids), dense.embedding_dim, generator=gen)
        opt.zero_grad()
        ((dense(x) - target) ** 2).sum().backward()
        opt.step()
    st = opt.state[dense.weight]
    return st["exp_avg"], st["exp_avg_sq"]


def test_sparse_embeddings_through_the_engine_clip_as_dense_and_keep_the_other_weights_identical():
    tok = load_tokenizer("builtin:tiny-xlmr")
    model = load_model("builtin:tiny-xlmr", LABELS, tok, seed=0, dropout=0.0)
    twin = copy.deepcopy(model)
    base = EngineSpec(1e-3, 0.01, (0.9, 0.999), 1e-8, 10, 0, 0, "fp32", 1, 0.05, 1, {})  # clipping bites
    import dataclasses

    sparse = build_engine(model, dataclasses.replace(base, sparse_embeddings=True))
    dense = build_engine(twin, base)
    assert model.get_input_embeddings().sparse and not twin.get_input_embeddings().sparse
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(5, len(tok), (4, 12), generator=gen)
    y = torch.randint(0, len(LABELS), (4, 12), generator=gen)
    for engine in (sparse, dense):
        _train_step(engine, x, y)
    # One step from the same state: the clipped norm and every non-embedding weight are the same.
    assert sparse.get_global_grad_norm() == pytest.approx(dense.get_global_grad_norm(), rel=1e-5)
    assert sparse.get_global_grad_norm() > 0.05
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        if "word_embeddings" not in name:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    rows = torch.unique(x)
    emb_a, emb_b = model.get_input_embeddings().weight, twin.get_input_embeddings().weight
    torch.testing.assert_close(emb_a[rows], emb_b[rows], rtol=1e-5, atol=1e-7)


def _sparse_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    import os

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import dataclasses

        tok = load_tokenizer("builtin:tiny-xlmr")
        spec = EngineSpec(1e-2, 0.01, (0.9, 0.999), 1e-8, 10, 0, 0, "fp32", 1, 1.0, world, {})
        engines = {}
        for sparse in (True, False):
            model = load_model("builtin:tiny-xlmr", LABELS, tok, seed=0, dropout=0.0)
            engines[sparse] = build_engine(model, dataclasses.replace(spec, sparse_embeddings=sparse))
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
        for _ in range(4):
            x = torch.randint(5, len(tok), (3, 10), generator=gen)
            y = torch.randint(0, len(LABELS), (3, 10), generator=gen)
            for engine in engines.values():
                _train_step(engine, x, y)
        catch_up_rows(engines[True])
        for sparse, engine in engines.items():
            torch.save(
                {n: p.detach().clone() for n, p in engine.module.named_parameters()},
                Path(out_dir) / f"{'sparse' if sparse else 'dense'}-rank{rank}.pt",
            )
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_sparse_embeddings_with_two_zero0_workers_keep_the_replicas_identical(tmp_path, monkeypatch):
    # ZeRO-0 all-reduces the sparse gradient by gathering every rank's rows; each rank then applies
    # the same update, so both replicas stay bit-identical, and close to dense AdamW's.
    import socket

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_sparse_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    sparse = [torch.load(tmp_path / f"sparse-rank{r}.pt") for r in (0, 1)]
    dense = torch.load(tmp_path / "dense-rank0.pt")
    for name, value in sparse[0].items():
        assert torch.equal(value, sparse[1][name]), name
        torch.testing.assert_close(value, dense[name], rtol=0, atol=2e-3, msg=name)


def test_row_sparse_state_survives_a_checkpoint_with_its_dtypes():
    dense, sparse = _twin_tables()
    opt = _train_twins(dense, sparse, [[0, 1], [2], [0, 3]])
    from raytag.trainer.sparse_adam import RowSparseAdamW

    again = RowSparseAdamW(
        sparse.parameters(), lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, fused=True
    )
    again.load_state_dict(copy.deepcopy(opt.state_dict()))
    mine, theirs = opt.state[sparse.weight], again.state[sparse.weight]
    assert theirs["row_step"].dtype == torch.int64 and theirs["step_coef"].dtype == torch.float64
    for key, value in mine.items():
        assert torch.equal(value, theirs[key]), key


def test_row_sparse_records_grow_by_doubling_and_trimmed_records_resume_the_same():
    # The per-step records (index t is step t) grow by doubling, not by one copy per step; a state
    # whose records end at the current step (checkpoints written before that) trains on identically.
    from raytag.trainer.sparse_adam import RowSparseAdamW, settle_before_lookup

    dense, sparse = _twin_tables()
    opt = _train_twins(dense, sparse, [[i % 12, (5 * i) % 12] for i in range(20)])
    state = opt.state[sparse.weight]
    assert 21 < state["step_coef"].numel() <= 64 and state["log_keep"].numel() == state["step_coef"].numel()
    trimmed = copy.deepcopy(opt.state_dict())
    for st in trimmed["state"].values():
        if "step_coef" in st:
            st["step_coef"], st["log_keep"] = st["step_coef"][:21].clone(), st["log_keep"][:21].clone()
    twin = torch.nn.Embedding(12, 6, sparse=True)
    twin.weight.data.copy_(sparse.weight.data)
    kw = {"lr": 0.05, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
    other = RowSparseAdamW(twin.parameters(), fused=True, **kw)
    other.load_state_dict(trimmed)
    settle_before_lookup(twin, other)
    gen = torch.Generator().manual_seed(2)
    for i in range(25):
        x = torch.tensor([[(7 * i) % 12, 3]])
        target = torch.randn(1, 2, 6, generator=gen)
        for emb, o in ((sparse, opt), (twin, other)):
            o.zero_grad()
            ((emb(x) - target) ** 2).sum().backward()
            o.step()
    for o in (opt, other):
        o.catch_up()
    assert torch.equal(sparse.weight, twin.weight)
    assert other.state[twin.weight]["step_coef"].numel() >= 46


def test_train_step_names_its_phases_for_the_profiler():
    """bench/profile_step.py reads a step's phases from these record_function ranges."""
    import numpy as np

    from raytag.trainer.features import IGNORE, Window
    from raytag.trainer.step import PHASES, train_step

    tok = load_tokenizer("builtin:tiny-xlmr")
    model = load_model("builtin:tiny-xlmr", LABELS, tok, seed=0)
    engine = build_engine(model, EngineSpec(1e-3, 0.01, (0.9, 0.999), 1e-8, 10, 0, 0, "fp32", 1, 1.0, 1, {}))
    ids = np.asarray([0, 100, 101, 2], np.int32)
    labels = np.asarray([IGNORE, 1, 0, IGNORE], np.int32)
    windows = [Window(0, ids, labels, np.arange(2, dtype=np.int32), np.asarray([1, 2], np.int32))]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = train_step(engine, lambda ids: [windows[i] for i in ids], [[0]], 2, 1, 1, torch.device("cpu"))
    assert out[1:] == (4, 1, 16)
    names = {e.key for e in prof.key_averages()}
    for phase in ("data", "forward", "backward", "optimizer"):
        assert PHASES[phase] in names, phase


# ---------------------------------------------------------------------------------------------
# the rates of the head and of each layer (train.head_lr_scale, train.layer_lr_decay)


@pytest.mark.parametrize("sparse", [False, True])
def test_head_and_layer_rates_reach_each_parameters_first_adam_step(sparse):
    import dataclasses
    import re

    tok = load_tokenizer("builtin:tiny-xlmr")
    model = load_model("builtin:tiny-xlmr", LABELS, tok, seed=0, dropout=0.0)
    layers = model.config.num_hidden_layers
    assert layers >= 2
    lr, head, decay = 1e-3, 10.0, 0.5
    spec = EngineSpec(lr, 0.0, (0.9, 0.999), 1e-8, 10, 0, 0, "fp32", 1, 1e9, 1, {})  # no warm-up, no clipping
    spec = dataclasses.replace(spec, head_lr_scale=head, layer_lr_decay=decay, sparse_embeddings=sparse)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = build_engine(model, spec)
    assert engine.get_lr()[0] == pytest.approx(lr)  # the first group: the peak rate the log shows
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(5, len(tok), (4, 12), generator=gen)
    _train_step(engine, x, torch.randint(0, len(LABELS), (4, 12), generator=gen))

    def expected(name: str) -> float:
        if name.startswith("classifier."):
            return lr * head
        found = re.search(r"\.layer\.(\d+)\.", name)
        if found:
            return lr * decay ** (layers - 1 - int(found.group(1)))
        return lr * decay**layers if ".embeddings." in name else lr

    seen = set()
    for name, p in model.named_parameters():
        if name.endswith("key.bias"):  # softmax ignores it: no gradient, no step
            continue
        # Adam's first step moves each weight with a gradient by the rate, m / sqrt(v) = +-1 (eps aside)
        moved = (p.detach() - before[name]).abs()
        if "word_embeddings" in name:
            moved = moved[torch.unique(x)]
        top = float(moved.max())
        assert top == pytest.approx(expected(name), rel=1e-3), name
        seen.add(round(expected(name) / lr, 6))
    assert {head, 1.0, decay ** (layers - 1), decay**layers} <= seen


def test_head_and_layer_rates_on_a_model_without_a_base_or_layers_fall_back_to_one_rate_and_say_so(caplog):
    from raytag.trainer.engine import parameter_groups

    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    spec = EngineSpec(
        1e-3, 0.0, (0.9, 0.999), 1e-8, 10, 0, 0, "fp32", 1, 1.0, 1, {}, head_lr_scale=10, layer_lr_decay=0.9
    )
    with caplog.at_level("WARNING", logger="raytag"):
        groups = parameter_groups(model, spec)
    assert len(groups) == 2 and all(g["lr"] == 1e-3 for g in groups)  # weights (decayed) and biases
    said = [r.getMessage() for r in caplog.records]
    assert any("train.layer_lr_decay=0.9: Sequential has no config.num_hidden_layers" in m for m in said), (
        said
    )
    assert any("train.head_lr_scale=10: Sequential has no pretrained base_model" in m for m in said), said
