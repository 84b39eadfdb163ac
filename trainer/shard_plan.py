"""The plan over prepared shards, and a rank's reads of them (the shards: trainer/shards.py).

plan      (seed, epoch) -> whole shards drawn per corpus by weight -> shuffled -> dealt to the
          workers x accumulation "lanes" by load -> each lane's shards, in consecutive groups of up
          to MIX_WINDOWS windows, cut into token-budget batches across the group's shards (a shard is
          a contiguous slice of its corpus: batched alone, one document's sentences would fill several
          steps in a row). Every rank computes the same plan from the index alone (lengths, not windows).
read      a rank loads only the shards of its own lanes, a group at a time per lane, sha256 checked
          before a byte is parsed: memory follows MIX_WINDOWS, not the corpus size.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from .batching import POOL_BATCHES, StepPlan, plan_batches
from .features import IGNORE, Window
from .shards import Prepared, read_parquet, verified

log = logging.getLogger("raytag")

# Windows of a lane batched together (its shards' sentences mixed): a corpus up to this size is
# shuffled as a whole every epoch, as the Hugging Face Trainer's sampler does. Measured with
# bench/quality.py --defaults --only raytag (offline encoder, 1 epoch, bf16, seeds 1 and 2): with
# each shard (47 sentences there) batched alone, the first 3000 CoNLL-2003 sentences gave dev F1
# 0.63 and 0.55; with the lane's shards batched together, 0.75 and 0.63 (1000 sentences: 0.52, 0.47).
MIX_WINDOWS = 16384


# ---------------------------------------------------------------------------------------------
# the plan


def plan_epoch(
    prepared: Prepared,
    weights: dict[str, float],
    batch_tokens: int,
    max_sentences: int,
    seed: int,
    epoch: int,
    world: int,
    rank: int,
    lanes: int,
    pool_batches: int = POOL_BATCHES,
) -> tuple[StepPlan, list[int]]:
    """This rank's steps of epoch `epoch` (micro-batches of global window ids) and the shards it reads.

    Whole shards are drawn per corpus by weight (weight 2: every shard twice; 0.5: half of them,
    a fresh draw each epoch), shuffled, and dealt to `lanes` lanes (the run's global batch: its
    micro-batches per optimizer step, fixed when the run starts), each to the lane with the fewest
    windows so far; lane `a * world + r` is micro-batch `a` of rank `r`, so each rank runs
    ceil(lanes / world) micro-batches a step. A lane's shards go in consecutive groups of up to
    MIX_WINDOWS windows, each group cut into token-budget batches across its shards (mixing their
    sentences), group after group. Ranks whose lanes run out (or that have one lane fewer) get
    empty micro-batches, so every rank runs the same number of steps (`pool_batches`: the batches'
    length-sorted pools, see batching.py). A pure function of its arguments: every rank computes
    the same plan, and the global batches depend on `lanes` alone, not on `world`: a group of any
    size (an elastic run after a resize) trains on the same steps, each window once an epoch.
    """
    per_rank = -(-lanes // world)  # micro-batches a step on every rank
    rng = np.random.default_rng([seed, epoch, 1])
    drawn: list[int] = []
    for name, meta in sorted(prepared.manifest["corpora"].items()):
        ids = np.asarray(meta["shards"], dtype=np.int64)
        w = float(weights.get(name, 1.0))
        whole, frac = int(w), w - int(w)
        drawn += ids.tolist() * whole
        k = min(len(ids), int(frac * len(ids) + rng.random()))  # rounded at random: right on average
        if k:
            drawn += sorted(rng.choice(ids, size=k, replace=False).tolist())
    order = [drawn[i] for i in rng.permutation(len(drawn))]
    load = np.zeros(lanes, dtype=np.int64)
    lane_units: list[list[tuple[int, int]]] = [[] for _ in range(lanes)]
    for pos, shard in enumerate(order):
        lane = int(np.argmin(load))
        lane_units[lane].append((pos, shard))
        load[lane] += prepared.shard_windows(shard)
    lane_batches: list[list[list[int]]] = []
    for units in lane_units:
        batches: list[list[int]] = []
        for group in _mix_groups(prepared, units):
            ids = np.concatenate(
                [np.arange(prepared.starts[shard], prepared.starts[shard + 1]) for _, shard in group]
            )
            for batch in plan_batches(
                prepared.lengths[ids],
                batch_tokens,
                max_sentences,
                seed,
                epoch,
                stream=group[0][0],
                pool_batches=pool_batches,
            ):
                batches.append([int(ids[i]) for i in batch])
        lane_batches.append(batches)
    num_steps = max((len(b) for b in lane_batches), default=0)
    steps, labelled = [], []
    lab = prepared.labelled
    for s in range(num_steps):
        labelled.append(int(sum(int(lab[b[s]].sum()) for b in lane_batches if s < len(b))))
        steps.append(
            [
                lane_batches[lane][s] if lane < lanes and s < len(lane_batches[lane]) else []
                for lane in (a * world + rank for a in range(per_rank))
            ]
        )
    mine = [shard for lane in range(rank, lanes, world) for _, shard in lane_units[lane]]
    return StepPlan(steps=steps, labelled=labelled), mine


# ---------------------------------------------------------------------------------------------
# reading a rank's shards


def _mix_groups(prepared: Prepared, units: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """A lane's (position, shard) units in consecutive groups of at most MIX_WINDOWS windows (at least
    one shard each): the shards whose sentences are batched together."""
    groups: list[list[tuple[int, int]]] = []
    size = 0
    for unit in units:
        n = prepared.shard_windows(unit[1])
        if not groups or size + n > MIX_WINDOWS:
            groups.append([])
            size = 0
        groups[-1].append(unit)
        size += n
    return groups


class ShardReader:
    """Windows by global id, loading a shard when first asked for and keeping the most recently used
    shards, up to twice the windows of `lanes` mixing groups (room for each lane's current group
    and the one before it, so a shard is read once per epoch)."""

    def __init__(
        self, prepared: Prepared, store: Any, rank: int, lanes: int = 1, retry_budget_s: float | None = None
    ) -> None:
        self.prepared, self.store, self.rank = prepared, store, rank
        self.keep_windows = 2 * max(1, lanes) * MIX_WINDOWS
        self.retry_budget_s = (
            retry_budget_s  # how long a read rides out a storage outage (run.storage_retry_seconds)
        )
        self.label2id = {lab: i for i, lab in enumerate(prepared.labels)}
        self.loaded: OrderedDict[int, list[Window]] = OrderedDict()
        self.epoch = 0  # set by the loop: recorded with each read
        self.opened: list[tuple[int, int]] = []  # (epoch, shard) of every shard this rank loaded: a read log

    def start_epoch(self, epoch: int) -> None:
        """A new epoch: its plan deals the shards anew, so nothing loaded is kept."""
        self.epoch = epoch
        self.loaded.clear()

    def windows(self, ids: Sequence[int]) -> list[Window]:
        shard_ids = np.searchsorted(self.prepared.starts, np.asarray(ids), side="right") - 1
        out = []
        for i, k in zip(ids, shard_ids.tolist(), strict=True):
            out.append(self._shard(k)[i - int(self.prepared.starts[k])])
        return out

    def _shard(self, k: int) -> list[Window]:
        if k in self.loaded:
            self.loaded.move_to_end(k)
            return self.loaded[k]
        need = self.prepared.shard_windows(k)
        while self.loaded and sum(len(w) for w in self.loaded.values()) + need > self.keep_windows:
            self.loaded.popitem(last=False)
        meta = self.prepared.manifest["shards"][k]
        log.debug("rank %d reads shard %d (%s, %d windows)", self.rank, k, meta["corpus"], meta["windows"])
        self.opened.append((self.epoch, k))
        windows: list[Window] = []
        fp = self.prepared.fingerprint
        for piece in meta["pieces"]:
            table = read_parquet(
                verified(self.store, f"{fp}/{piece['key']}", piece["sha256"], self.retry_budget_s)
            )
            windows += _windows(table, self.label2id)
        self.loaded[k] = windows
        return windows


def _windows(table: Any, label2id: dict[str, int]) -> list[Window]:
    def lists(name: str) -> list[np.ndarray]:
        col = table.column(name).combine_chunks()
        offs = col.offsets.to_numpy()
        vals = col.values.to_numpy(zero_copy_only=False)
        return [vals[offs[i] : offs[i + 1]] for i in range(len(col))]

    ids, pos, words = lists("input_ids"), lists("positions"), lists("words")
    tags = table.column("tags").to_pylist()
    sent = table.column("sentence").to_numpy()
    out = []
    for r in range(table.num_rows):
        labels = np.full(len(ids[r]), IGNORE, dtype=np.int32)
        labels[pos[r]] = [label2id[t] for t in tags[r]]
        out.append(
            Window(
                sentence=int(sent[r]),
                input_ids=ids[r].astype(np.int32),
                labels=labels,
                words=words[r].astype(np.int32),
                positions=pos[r].astype(np.int32),
            )
        )
    return out
