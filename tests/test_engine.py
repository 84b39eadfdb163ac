"""DeepSpeed engine set-up: one worker skips the gradient all-reduce, with bit-identical results."""

from __future__ import annotations

import copy

import pytest
import torch

from raytag.trainer.engine import EngineSpec, build_engine
from raytag.trainer.model import load_model, load_tokenizer

pytestmark = pytest.mark.slow  # builds DeepSpeed engines (and the process group) in this process

LABELS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


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
            out = engine(input_ids=x, labels=y)
            engine.backward(out.loss, scale_wrt_gas=False)
            engine.step()
    assert calls == {"fast": 0, "reference": 3}
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert not all(torch.equal(a, c) for a, c in zip(model.parameters(), initial.parameters(), strict=True))
