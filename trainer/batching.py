"""Token-budget batches of similar length, planned globally so every worker runs the same steps.

Windows are shuffled, then sorted by length inside large pools, and cut into batches whose
padded size (sentences x longest) stays within the token budget; the batch order is shuffled
again. Padding waste stays small while every epoch still sees a fresh order.

The plan is made once for all workers from (seed, epoch) alone, so every rank computes the
same plan without talking to the others: optimizer step `s` is made of micro-batches
`s * world * accum + a * world + rank`. Ranks that run out get empty micro-batches, so all
ranks run the same number of steps and the same collectives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

POOL_BATCHES = 64  # sort-by-length pools of about this many batches


def plan_batches(
    lengths: Sequence[int],
    batch_tokens: int,
    max_sentences: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
) -> list[list[int]]:
    """Group item indices into batches with sentences x longest <= batch_tokens.

    An item longer than the budget gets a batch of its own. Deterministic in (seed, epoch).
    Every index appears in exactly one batch.
    """
    lens = np.asarray(lengths, dtype=np.int64)
    n = len(lens)
    if n == 0:
        return []
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n) if shuffle else np.arange(n)
    mean_len = max(1.0, float(lens.mean()))
    pool = max(1, int(POOL_BATCHES * batch_tokens / mean_len))
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
