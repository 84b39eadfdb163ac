"""train.batch_tokens = auto: small corpora get enough optimizer steps, large ones keep big batches."""

from __future__ import annotations

import numpy as np
import pytest

from raytag.trainer.batching import (
    AUTO_MAX_TOKENS,
    AUTO_MIN_SENTENCES,
    AUTO_MIN_STEPS,
    auto_batch_tokens,
    plan_batches,
    resolve_batch_tokens,
    shard_steps,
)
from raytag.trainer.config import ConfigError, load_config


def conll_like(n: int, seed: int = 0) -> list[int]:
    """Token counts shaped like CoNLL-2003 under XLM-R's tokenizer: mean ~22, median ~17, long tail."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=2.9, sigma=0.6, size=n).astype(int) + 3, 4, 180).tolist()


def run_steps(lengths: list[int], batch_tokens: int, world: int = 1, accum: int = 1, seed: int = 42) -> int:
    """Optimizer steps of one real epoch plan (as the loop builds it)."""
    batches = plan_batches(lengths, batch_tokens, 256, seed=seed, epoch=0)
    return len(shard_steps(batches, [1] * len(lengths), world, 0, accum).steps)


@pytest.mark.parametrize("n", [1000, 3000, 12000])
def test_small_corpus_gets_enough_steps(n):
    lengths = conll_like(n)
    choice = auto_batch_tokens(lengths, 1, 1, 256)
    assert choice.batch_tokens < AUTO_MAX_TOKENS
    steps = run_steps(lengths, choice.batch_tokens)
    # At least the minimum number of steps, unless that would mean fewer than
    # AUTO_MIN_SENTENCES sentences per step: then about that many sentences per step.
    want = min(AUTO_MIN_STEPS, n // AUTO_MIN_SENTENCES)
    assert steps >= 0.98 * want, (choice, steps)
    assert n / steps >= 0.95 * AUTO_MIN_SENTENCES, (choice, steps)
    # ... and no more steps than that asks for: the largest budget that gives them.
    assert run_steps(lengths, int(choice.batch_tokens * 1.2)) < want


def test_large_corpus_keeps_the_large_budget():
    choice = auto_batch_tokens(conll_like(50000), 1, 1, 256)
    assert choice.batch_tokens == AUTO_MAX_TOKENS
    assert choice.steps_per_epoch >= AUTO_MIN_STEPS
    # CoNLL-2003's 14,041 sentences over the standard 3 epochs: about the large budget.
    assert auto_batch_tokens(conll_like(14041), 1, 3, 256).batch_tokens >= 0.9 * AUTO_MAX_TOKENS


def test_more_epochs_allow_larger_batches():
    lengths = conll_like(3000)
    one, three = (auto_batch_tokens(lengths, 1, e, 256) for e in (1, 3))
    assert three.batch_tokens > one.batch_tokens
    assert three.total_steps >= 0.95 * AUTO_MIN_STEPS
    assert three.total_steps == 3 * three.steps_per_epoch


def test_budget_grows_with_the_data():
    budgets = [
        auto_batch_tokens(conll_like(n), 1, 1, 256).batch_tokens
        for n in (500, 1000, 2000, 4000, 8000, 16000, 50000)
    ]
    # Non-decreasing, up to the noise of where length pools fall (the smallest sizes all sit at
    # about AUTO_MIN_SENTENCES sentences per step).
    assert all(b >= 0.9 * a for a, b in zip(budgets, budgets[1:], strict=False)), budgets
    assert budgets[-1] == AUTO_MAX_TOKENS


def test_workers_share_the_global_batch():
    # 4 workers x 2 accumulation: each micro-batch is smaller, the global step about the same size.
    lengths = conll_like(3000)
    single = auto_batch_tokens(lengths, 1, 1, 256)
    many = auto_batch_tokens(lengths, 8, 1, 256)
    assert many.batch_tokens < single.batch_tokens
    steps = run_steps(lengths, many.batch_tokens, world=4, accum=2)
    assert abs(steps - run_steps(lengths, single.batch_tokens)) <= 0.1 * steps


def test_deterministic_and_close_to_every_seeds_plan():
    lengths = conll_like(2000)
    a = auto_batch_tokens(lengths, 2, 1, 256)
    assert auto_batch_tokens(list(lengths), 2, 1, 256) == a
    for seed in (0, 1, 42, 1234):  # the loop plans with train.seed; the choice used seed 0
        assert (
            abs(run_steps(lengths, a.batch_tokens, world=2, seed=seed) - a.steps_per_epoch)
            <= 0.02 * a.steps_per_epoch
        )


def test_tiny_and_empty_corpora():
    choice = auto_batch_tokens(conll_like(20), 1, 1, 256)
    assert choice.steps_per_epoch >= 2  # 20 sentences: about AUTO_MIN_SENTENCES per step
    assert auto_batch_tokens([], 1, 1, 256).batch_tokens == AUTO_MAX_TOKENS
    # More micro-batches per step than sentences: one sentence per micro-batch at the least.
    assert auto_batch_tokens(conll_like(50), 64, 1, 256).batch_tokens >= 16


def test_resolve_respects_integers_and_logs_auto_once():
    lengths = conll_like(1000)
    lines: list[str] = []
    assert resolve_batch_tokens(512, lengths, 1, 1, 256, lines.append) == 512
    assert lines == []
    got = resolve_batch_tokens("auto", lengths, 1, 1, 256, lines.append)
    assert got == auto_batch_tokens(lengths, 1, 1, 256).batch_tokens
    assert len(lines) == 1
    assert f"train.batch_tokens=auto: {got} padded tokens" in lines[0]
    assert "sentences per optimizer step" in lines[0] and "steps per epoch" in lines[0]
    assert resolve_batch_tokens("auto", lengths, 1, 1, 256) == got  # other ranks: no log, same value
    with pytest.raises(ValueError, match="integer or 'auto'"):
        resolve_batch_tokens("big", lengths, 1, 1, 256)


def test_config_accepts_auto_and_integers():
    assert load_config(None).train.batch_tokens == "auto"
    assert load_config(None, ["train.batch_tokens=512"]).train.batch_tokens == 512
    assert load_config(None, ["train.batch_tokens=auto"]).train.batch_tokens == "auto"
    with pytest.raises(ConfigError, match=r"train.batch_tokens: expected an integer or 'auto', got 'big'"):
        load_config(None, ["train.batch_tokens=big"])
    with pytest.raises(ConfigError, match="train.batch_tokens: must be at least 16"):
        load_config(None, ["train.batch_tokens=8"])
