"""A checkpoint's per-rank parts on a bucket run: which rank wrote which file (DeepSpeed's shards and
the RNG states carry the rank in their names; rank 0 owns the shared files), and a part's record
(`Part`), kept on the node that wrote it (`.raytag-written-rankN`, then `.raytag-uploaded-rankN`)
and uploaded as its marker `.parts/rank-NNNNN.json` once its files are in (cluster/run.py)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

PARTS = ".parts"  # a checkpoint's part markers, one per rank, in storage
WRITTEN = ".raytag-written-rank"  # + rank: on the node, what the rank wrote (its Part)
UPLOADED = ".raytag-uploaded-rank"  # + rank: on the node, its part is in storage
_RANKED = re.compile(r"(?:zero_pp_rank_|rng-rank)(\d+)")


@dataclass(frozen=True)
class Part:
    """One rank's part of a checkpoint: what it wrote, as recorded on its node (`.raytag-written-rankN`)."""

    rank: int
    world: int
    step: int
    files: list[str]  # relative paths of the rank's own files in the checkpoint folder
    metrics: dict[str, Any]
    meta: dict[str, Any]
    attempt: str  # the worker group that wrote it (RunStore.attempt)

    def marker(self) -> str:
        return json.dumps(
            {k: getattr(self, k) for k in ("rank", "world", "step", "files", "metrics", "meta", "attempt")}
        )

    @classmethod
    def from_marker(cls, text: str) -> Part:
        doc = json.loads(text)
        return cls(
            int(doc["rank"]),
            int(doc["world"]),
            int(doc["step"]),
            list(doc["files"]),
            doc["metrics"],
            doc["meta"],
            str(doc.get("attempt", "")),
        )


def file_rank(rel: str) -> int | None:
    """The rank a checkpoint file belongs to (from its name), or None for a shared file (rank 0's)."""
    m = _RANKED.search(rel.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def owned_by(rel: str, rank: int) -> bool:
    """True when rank `rank` wrote `rel` (rank 0 writes the shared files)."""
    owner = file_rank(rel)
    return (owner if owner is not None else 0) == rank


def needed_by(rel: str, rank: int) -> bool:
    """True when rank `rank` reads `rel` to resume: its own files and the shared ones."""
    owner = file_rank(rel)
    return owner is None or owner == rank
