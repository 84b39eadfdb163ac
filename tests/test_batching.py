"""train.batch_tokens = auto: small corpora get enough optimizer steps, large ones keep big batches."""

from __future__ import annotations

import numpy as np
import pytest

from raytag.trainer.batching import (
    AUTO_MAX_TOKENS,
    AUTO_MIN_SENTENCES,
    AUTO_MIN_STEPS,
    POOL_BATCHES,
    SMALL_DATA_POOL_BATCHES,
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


def run_steps(
    lengths: list[int], budget, world: int = 1, accum: int = 1, seed: int = 42, scale: float = 1.0
) -> int:
    """Optimizer steps of one real epoch plan (as the loop builds it) at an auto budget's choice."""
    tokens = int(budget.batch_tokens * scale)
    batches = plan_batches(lengths, tokens, 256, seed=seed, epoch=0, pool_batches=budget.pool_batches)
    return len(shard_steps(batches, [1] * len(lengths), world, 0, accum).steps)


@pytest.mark.parametrize("n", [1000, 3000, 12000])
def test_small_corpus_gets_enough_steps(n):
    lengths = conll_like(n)
    choice = auto_batch_tokens(lengths, 1, 1, 256)
    assert choice.batch_tokens < AUTO_MAX_TOKENS
    steps = run_steps(lengths, choice)
    # At least the minimum number of steps, unless that would mean fewer than
    # AUTO_MIN_SENTENCES sentences per step: then about that many sentences per step.
    want = min(AUTO_MIN_STEPS, n // AUTO_MIN_SENTENCES)
    assert steps >= 0.98 * want, (choice, steps)
    assert n / steps >= 0.95 * AUTO_MIN_SENTENCES, (choice, steps)
    # ... and no more steps than that asks for: the largest budget that gives them.
    assert run_steps(lengths, choice, scale=1.2) < want


def test_large_corpus_keeps_the_large_budget():
    choice = auto_batch_tokens(conll_like(50000), 1, 1, 256)
    assert choice.batch_tokens == AUTO_MAX_TOKENS
    assert choice.steps_per_epoch >= AUTO_MIN_STEPS
    # CoNLL-2003's 14,041 sentences over the standard 3 epochs: about the large budget.
    assert auto_batch_tokens(conll_like(14041), 1, 3, 256).batch_tokens >= 0.9 * AUTO_MAX_TOKENS


def test_more_epochs_allow_larger_batches():
    lengths = conll_like(3000)
    one, three = (auto_batch_tokens(lengths, 1, e, 256) for e in (1, 3))
    assert three.sentences_per_step > one.sentences_per_step  # (tokens differ in kind: random vs grouped)
    assert three.total_steps >= 0.95 * AUTO_MIN_STEPS
    assert three.total_steps == 3 * three.steps_per_epoch


def test_budget_grows_with_the_data():
    choices = [
        auto_batch_tokens(conll_like(n), 1, 1, 256) for n in (500, 1000, 2000, 4000, 8000, 16000, 50000)
    ]
    # Sentences per step non-decreasing, up to the noise of where length pools fall (the smallest
    # sizes all sit at about AUTO_MIN_SENTENCES). Tokens are not comparable across the switch from
    # random (small data) to length-grouped batches, which pad less.
    per_step = [c.sentences_per_step for c in choices]
    assert all(b >= 0.9 * a for a, b in zip(per_step, per_step[1:], strict=False)), per_step
    assert choices[-1].batch_tokens == AUTO_MAX_TOKENS


def test_workers_share_the_global_batch():
    # 4 workers x 2 accumulation: each micro-batch is smaller, the global step about the same size
    # (12,000 sentences: about 12 per step, so each of the 8 micro-batches can hold its share).
    lengths = conll_like(12000)
    single = auto_batch_tokens(lengths, 1, 1, 256)
    many = auto_batch_tokens(lengths, 8, 1, 256)
    assert many.batch_tokens < single.batch_tokens
    steps = run_steps(lengths, many, world=4, accum=2)
    assert abs(steps - run_steps(lengths, single)) <= 0.1 * steps


def test_deterministic_and_close_to_every_seeds_plan():
    lengths = conll_like(2000)
    a = auto_batch_tokens(lengths, 2, 1, 256)
    assert auto_batch_tokens(list(lengths), 2, 1, 256) == a
    for seed in (0, 1, 42, 1234):  # the loop plans with train.seed; the choice used seed 0
        assert abs(run_steps(lengths, a, world=2, seed=seed) - a.steps_per_epoch) <= 0.02 * a.steps_per_epoch


def test_tiny_and_empty_corpora():
    choice = auto_batch_tokens(conll_like(20), 1, 1, 256)
    assert choice.steps_per_epoch >= 4  # 20 sentences: about AUTO_MIN_SENTENCES per step
    assert auto_batch_tokens([], 1, 1, 256).batch_tokens == AUTO_MAX_TOKENS
    # More micro-batches per step than sentences: one sentence per micro-batch at the least.
    assert auto_batch_tokens(conll_like(50), 64, 1, 256).batch_tokens >= 16


def test_resolve_respects_integers_and_logs_auto_once():
    lengths = conll_like(1000)
    lines: list[str] = []
    assert resolve_batch_tokens(512, lengths, 1, 1, 256, lines.append) == (512, POOL_BATCHES)
    assert lines == []
    got, pool = resolve_batch_tokens("auto", lengths, 1, 1, 256, lines.append)
    choice = auto_batch_tokens(lengths, 1, 1, 256)
    assert (got, pool) == (choice.batch_tokens, choice.pool_batches)
    assert len(lines) == 1
    assert f"train.batch_tokens=auto: {got} padded tokens" in lines[0]
    assert "sentences per optimizer step" in lines[0] and "steps per epoch" in lines[0]
    assert resolve_batch_tokens("auto", lengths, 1, 1, 256) == (got, pool)  # other ranks: no log, same
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


def test_small_data_gets_batches_of_random_sentences():
    # Below RANDOM_BATCHES_BELOW (8) sentences per step (fewer than 8 x 1000 windows for one epoch) a
    # batch is a random draw of sentences, not one length's worth: length-sorted pools cost small
    # runs 0.03-0.13 dev F1. That holds above the 4-sentence floor too (5000 windows: 5 per step).
    small, middle, large = (
        auto_batch_tokens(conll_like(3000), 1, 1, 256),
        auto_batch_tokens(conll_like(5000), 1, 1, 256),
        auto_batch_tokens(conll_like(14041), 1, 1, 256),
    )
    assert small.pool_batches == SMALL_DATA_POOL_BATCHES and "batches of random sentences" in small.describe()
    assert "down to 4 sentences per step" in small.describe()
    assert middle.pool_batches == SMALL_DATA_POOL_BATCHES and middle.steps_per_epoch >= 0.98 * AUTO_MIN_STEPS
    assert large.pool_batches == POOL_BATCHES and "length-grouped batches" in large.describe()
    assert (
        auto_batch_tokens(conll_like(3000), 1, 3, 256).pool_batches == POOL_BATCHES
    )  # 3 epochs: enough steps
    lengths = np.asarray(conll_like(3000))

    def spread(pool: int) -> float:  # mean (longest - shortest) within a batch
        batches = plan_batches(lengths, small.batch_tokens, 256, seed=1, epoch=0, pool_batches=pool)
        return float(np.mean([lengths[b].max() - lengths[b].min() for b in batches]))

    assert spread(SMALL_DATA_POOL_BATCHES) > 3 * spread(POOL_BATCHES)
