"""Token-budget batches of similar length, planned globally so every worker runs the same steps.

Windows are shuffled, then sorted by length inside large pools, and cut into batches whose
padded size (sentences x longest) stays within the token budget; the batch order is shuffled
again. Padding waste stays small while every epoch still sees a fresh order. Small data under
`batch_tokens: auto` gets pools of one batch instead: batches of random sentences (see below).

The plan is made once for all workers from (seed, epoch) alone, so every rank computes the
same plan without talking to the others: optimizer step `s` is made of micro-batches
`s * world * accum + a * world + rank`. Ranks that run out get empty micro-batches, so all
ranks run the same number of steps and the same collectives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

POOL_BATCHES = 64  # sort-by-length pools of about this many batches
# Small steps (train.batch_tokens=auto below RANDOM_BATCHES_BELOW sentences per step): pools of
# about one batch, so a batch is a random draw of sentences, as in the HF recipe. Length-sorted
# pools make every small batch a set of sentences of one length, on CoNLL one kind of text (score
# tables, headlines, bylines). bench/quality.py --defaults, one epoch, 8 sentences per step, dev F1
# sorted -> random (HF recipe):
#   3000 sentences, seeds 1, 2: 0.752 -> 0.779, 0.635 -> 0.768   (0.787, 0.708)
#   1000 sentences, seed 1:     0.523 -> 0.548, train 32 s -> 39 s   (0.489, 60 s)
# Random batches pad more (the budget doubles for the same steps), which large data cannot afford:
# all 14,041 sentences with random batches: 0.910 in 413 s, length-grouped 0.913 in 306 s.
SMALL_DATA_POOL_BATCHES = 1
RANDOM_BATCHES_BELOW = 8  # sentences per optimizer step (all workers) under which batches are random


def plan_batches(
    lengths: Sequence[int] | np.ndarray,
    batch_tokens: int,
    max_sentences: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    stream: int | None = None,
    pool_batches: int = POOL_BATCHES,
) -> list[list[int]]:
    """Group item indices into batches with sentences x longest <= batch_tokens.

    Items are sorted by length within random pools of about `pool_batches` batches.

    An item longer than the budget gets a batch of its own. Deterministic in (seed, epoch) and
    `stream` (one random stream per shard of an epoch). Every index appears in exactly one batch.
    """
    lens = np.asarray(lengths, dtype=np.int64)
    n = len(lens)
    if n == 0:
        return []
    rng = np.random.default_rng([seed, epoch] if stream is None else [seed, epoch, stream])
    order = rng.permutation(n) if shuffle else np.arange(n)
    mean_len = max(1.0, float(lens.mean()))
    pool = max(1, int(pool_batches * batch_tokens / mean_len))
    batches: list[list[int]] = []
    for p0 in range(0, n, pool):
        idx = order[p0 : p0 + pool]
        idx = idx[np.argsort(lens[idx], kind="stable")]
        cur: list[int] = []
        longest = 0
        for i in idx.tolist():
            li = int(lens[i])
            new_longest = max(longest, li)
            if cur and (new_longest * (len(cur) + 1) > batch_tokens or len(cur) >= max_sentences):
                batches.append(cur)
                cur, new_longest = [], li
            cur.append(i)
            longest = new_longest
        if cur:
            batches.append(cur)
    if shuffle:
        perm = rng.permutation(len(batches))
        batches = [batches[i] for i in perm]
    return batches


@dataclass(frozen=True)
class StepPlan:
    """One epoch's optimizer steps for one rank: micro-batches per step (possibly empty)."""

    steps: list[list[list[int]]]  # steps[s][a] = item indices of micro-batch a of step s
    labelled: list[int]  # global labelled-token count of each step (all ranks, all micro-batches)


def shard_steps(
    batches: list[list[int]], labelled_per_item: Sequence[int], world: int, rank: int, accum: int
) -> StepPlan:
    """This rank's share of a global batch plan, with each step's global labelled-token count.

    The global count lets every rank normalise its loss so that N workers compute exactly the
    gradient one worker would compute over the same global batch, with no extra collective.
    """
    per_step = world * accum
    num_steps = -(-len(batches) // per_step)  # ceil
    steps: list[list[list[int]]] = []
    labelled: list[int] = []
    for s in range(num_steps):
        group = batches[s * per_step : (s + 1) * per_step]
        labelled.append(int(sum(labelled_per_item[i] for b in group for i in b)))
        mine = []
        for a in range(accum):
            k = a * world + rank
            mine.append(group[k] if k < len(group) else [])
        steps.append(mine)
    return StepPlan(steps=steps, labelled=labelled)


# ---------------------------------------------------------------------------------------------
# train.batch_tokens = auto: a token budget that suits the amount of data
#
# One epoch of a small corpus at a large budget is a handful of optimizer steps, too few for
# fine-tuning to leave the all-`O` solution. Measured with bench/quality.py (offline encoder,
# CoNLL-2003, one epoch, lr 2e-4, seed 1), dev F1 by optimizer steps:
#   1000 sentences:  24 steps 0.00 | 112 steps 0.50 | 180 steps 0.57   (HF batch 8: 125 steps 0.49)
#   3000 sentences:  71 steps 0.23 | 202 steps 0.54 | 291 steps 0.74 | 395 steps 0.76   (HF: 375, 0.79)
#   14,041:         943 steps 0.913   (HF batch 16: 878 steps 0.909)
# The auto budget keeps the large, fast budget while the run still gets AUTO_MIN_STEPS optimizer
# steps, and otherwise shrinks it until it does, down to AUTO_MIN_SENTENCES sentences per step.
# 4 rather than 8 (random batches, sparse embedding updates; seeds 1, 2, 3): 3000 sentences
# 0.779 0.768 0.766 (387 steps, 107 s) -> 0.819 0.802 0.809 (751-760 steps, 72-75 s); 1000
# sentences 0.548 (seed 1, 39 s) -> 0.638 0.542 0.597 (250 steps, 21-23 s). With sparse embedding
# updates a step's time follows the batch (the optimizer's pass over the whole table is gone); with
# dense ones a 4-sentence step costs nearly as much as an 8-sentence one (3000 sentences, dense:
# 0.796 and 0.807 for seeds 1 and 3 in 173-178 s).

AUTO_MAX_TOKENS = 1024  # per micro-batch per worker on large data: ~43 CoNLL-2003 sentences
AUTO_MIN_STEPS = 1000  # optimizer steps the whole run should get at least
AUTO_MIN_SENTENCES = 4  # sentences (windows) per optimizer step, all workers together, at least
AUTO_MIN_TOKENS = 16  # the smallest budget the config accepts


@dataclass(frozen=True)
class BatchBudget:
    """The token budget `auto` chose, with what it gives on the data it was chosen for."""

    batch_tokens: int
    steps_per_epoch: int
    sentences_per_step: float
    total_steps: int
    reason: str
    pool_batches: int = POOL_BATCHES  # length-sorted pools of about this many batches

    def describe(self) -> str:
        batches = (
            "batches of random sentences" if self.pool_batches < POOL_BATCHES else "length-grouped batches"
        )
        return (
            f"train.batch_tokens=auto: {self.batch_tokens} padded tokens per micro-batch per worker, "
            f"{self.sentences_per_step:.1f} sentences per optimizer step, {self.steps_per_epoch} steps "
            f"per epoch, {self.total_steps} in all, {batches} ({self.reason})"
        )


def count_steps(
    lengths: Sequence[int] | np.ndarray,
    batch_tokens: int,
    max_sentences: int,
    micro_batches_per_step: int,
    pool_batches: int = POOL_BATCHES,
) -> int:
    """Optimizer steps one epoch takes at this budget (the plan of seed 0, epoch 0)."""
    batches = plan_batches(lengths, batch_tokens, max_sentences, seed=0, epoch=0, pool_batches=pool_batches)
    return -(-len(batches) // max(1, micro_batches_per_step))


def auto_batch_tokens(
    lengths: Sequence[int] | np.ndarray,
    micro_batches_per_step: int,
    epochs: float,
    max_sentences: int,
    *,
    min_steps: int = AUTO_MIN_STEPS,
    min_sentences: int = AUTO_MIN_SENTENCES,
    max_tokens: int = AUTO_MAX_TOKENS,
    steps_at: Callable[[int, int], int] | None = None,
) -> BatchBudget:
    """The largest token budget <= max_tokens that gives the run at least `min_steps` optimizer steps.

    Where that means fewer than RANDOM_BATCHES_BELOW windows per step, batches are drawn at random
    (pools of SMALL_DATA_POOL_BATCHES) instead of from length-sorted pools. `steps_at(tokens,
    pool_batches)`, when given, counts the steps of an epoch's plan.

    `lengths` are the training windows' token counts, `micro_batches_per_step` is workers x
    gradient accumulation. The step target is lowered where it would leave fewer than
    `min_sentences` windows per optimizer step. A function of its arguments alone, so every rank
    computes the same budget without talking to the others.
    """
    n = len(lengths)
    m = max(1, micro_batches_per_step)
    steps_wanted = math.ceil(min_steps / epochs) if n else 0  # per epoch
    # steps of fewer than RANDOM_BATCHES_BELOW sentences: random batches (see SMALL_DATA_POOL_BATCHES)
    small = n < RANDOM_BATCHES_BELOW * steps_wanted
    pool = SMALL_DATA_POOL_BATCHES if small else POOL_BATCHES

    def count(tokens: int) -> int:
        if steps_at is not None:
            return steps_at(tokens, pool)
        return count_steps(lengths, tokens, max_sentences, m, pool)

    def budget(tokens: int, reason: str) -> BatchBudget:
        per_epoch = count(tokens) if n else 0
        return BatchBudget(
            batch_tokens=tokens,
            steps_per_epoch=per_epoch,
            sentences_per_step=n / max(1, per_epoch),
            total_steps=max(1, math.ceil(epochs * per_epoch)),
            reason=reason,
            pool_batches=pool,
        )

    if n == 0:
        return budget(max_tokens, "no training data")
    want = min(steps_wanted, max(1, n // min_sentences))
    if count(max_tokens) >= want:
        return budget(max_tokens, f"the largest budget: at least {min_steps} steps in all")
    lo, hi = AUTO_MIN_TOKENS, max_tokens  # invariant: steps(lo) >= want > steps(hi)
    if count(lo) < want:
        return budget(lo, f"{n} windows, {m} micro-batches per step: the smallest budget")
    while hi - lo > 1:  # steps fall as the budget grows: the largest budget that still gives `want`
        mid = (lo + hi) // 2
        if count(mid) >= want:
            lo = mid
        else:
            hi = mid
    if want < steps_wanted:
        return budget(lo, f"small data: more steps, down to {min_sentences} sentences per step")
    return budget(lo, f"a smaller budget for at least {min_steps} steps over {epochs:g} epoch(s)")


def resolve_batch_tokens(
    setting: int | str,
    lengths: Sequence[int] | np.ndarray,
    micro_batches_per_step: int,
    epochs: float,
    max_sentences: int,
    log: Callable[[str], object] | None = None,
    steps_at: Callable[[int, int], int] | None = None,
) -> tuple[int, int]:
    """`train.batch_tokens` as (a number, the length-sorted pool size in batches): an explicit
    integer as given (length-grouped), `auto` chosen from the data.

    `log` (rank 0's logger) receives one line with the choice.
    """
    if not isinstance(setting, str):
        return int(setting), POOL_BATCHES
    if setting != "auto":
        raise ValueError(f"train.batch_tokens: expected an integer or 'auto', got {setting!r}")
    choice = auto_batch_tokens(lengths, micro_batches_per_step, epochs, max_sentences, steps_at=steps_at)
    if log is not None:
        log(choice.describe())
    return choice.batch_tokens, choice.pool_batches
