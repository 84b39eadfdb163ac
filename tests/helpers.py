"""Small helpers shared by the tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

# What every finished run leaves under <storage>/<run.name>/ (the layout in README.md).
RUN_OUTPUTS = [
    "metrics.jsonl",
    "results.json",
    "config.yaml",
    "labels.json",
    "predictions/validation.txt",
    "predictions/test.txt",
    "model/config.json",
    "model/model.safetensors",
    "model/README.md",
    "model/tokenizer.json",
    "model/raytag.json",
]


def kill_training_at_micro_batch(monkeypatch: pytest.MonkeyPatch, n: int) -> Callable[[], None]:
    """Make the training loop die (KeyboardInterrupt, like a lost process) at its n-th micro-batch.

    Returns a function that restores the loop, for a second attempt in the same test.
    """
    import raytag.trainer.loop as loop

    real, calls = loop.collate, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt(f"killed at micro-batch {n}")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "collate", dying)
    return lambda: monkeypatch.setattr(loop, "collate", real)
