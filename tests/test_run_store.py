"""The run's storage boundary (cluster/run.py) with two ranks simulated in one process.

A bucket is stood in for by a local folder whose `local_path` is hidden (so the run works
through staging and uploads, as with S3); the real S3 server runs it in test_s3_run.py and the
Ray tests. Ranks are played one after the other with groups whose collectives are no-ops.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from raytag.cluster.local_storage import LocalStorage
from raytag.cluster.parts import file_rank, needed_by, owned_by
from raytag.cluster.run import RunStore, staging_folder
from raytag.cluster.storage import StorageError
from tests.test_storage import Wrapped

RUN = "demo"


@dataclass
class Rank:
    """One rank of a world whose collectives are no-ops (the test plays the ranks in turn)."""

    rank: int
    world: int = 2
    local_rank: int = 0
    shared: Any = None

    def barrier(self) -> None:
        return None

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's obj: rank 1, played next, takes what rank 0 left on the group's board (`shared`)."""
        if not isinstance(self.shared, dict):
            return obj
        if self.rank == 0:
            self.shared["broadcast"] = obj
            return obj
        return self.shared.pop("broadcast", obj)

    def gather(self, obj: Any) -> list[Any]:
        return [obj] * self.world

    def agree(self, error: BaseException | None) -> None:
        if error is not None:
            raise error


def bucket(tmp_path: Path) -> Wrapped:
    return Wrapped(LocalStorage(tmp_path / "bucket"), hide_local=True)


def open_rank(storage: Any, rank: int, stage: Path, world: int = 2, board: dict | None = None) -> RunStore:
    """Rank `rank` of a group; the ranks opened with one `board` are one group (rank 0 first)."""
    return RunStore.open(
        storage,
        RUN,
        group=Rank(rank, world, local_rank=rank, shared=board),
        node="n1",
        owner=f"test-{rank}",
        staging_root=str(stage),
        log=lambda m: None,
    )


def write_part(folder: Path, rank: int, step: int) -> None:
    """What a rank writes for a checkpoint: its DeepSpeed shard and RNG state (rank 0: the shared files)."""
    (folder / "ds").mkdir(parents=True, exist_ok=True)
    (folder / "ds" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"o" * (100 + rank))
    (folder / f"rng-rank{rank}.pt").write_bytes(b"r" * (10 + rank))
    if rank == 0:
        (folder / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"m" * 300)
        (folder / "progress.json").write_text(json.dumps({"global_step": step}))


def test_file_ownership() -> None:
    assert file_rank("ds/zero_pp_rank_3_mp_rank_00_optim_states.pt") == 3
    assert file_rank("ds/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt") == 1
    assert file_rank("rng-rank2.pt") == 2
    assert file_rank("ds/mp_rank_00_model_states.pt") is None
    assert owned_by("progress.json", 0) and not owned_by("progress.json", 1)
    assert needed_by("progress.json", 1) and needed_by("rng-rank1.pt", 1) and not needed_by("rng-rank0.pt", 1)


def test_staging_is_keyed_by_the_run_location(tmp_path: Path) -> None:
    a = staging_folder(str(tmp_path), "s3://one/runs", "x")
    b = staging_folder(str(tmp_path), "s3://two/runs", "x")
    assert a != b and a.parent == b.parent == tmp_path and a.name.startswith("x-")


def test_parts_from_two_ranks_make_one_manifest_and_each_rank_fetches_only_its_files(tmp_path: Path) -> None:
    storage = bucket(tmp_path)
    board: dict = {}
    r0 = open_rank(storage, 0, tmp_path / "node0", board=board)
    r1 = open_rank(storage, 1, tmp_path / "node1", board=board)  # another node: its own staging folder
    assert r0.workdir != r1.workdir
    for run, rank in ((r1, 1), (r0, 0)):
        folder = run.checkpoint_folder(4)
        write_part(folder, rank, 4)
        run.commit(4, folder, {"f1": 0.5}, {"best": "step-00000004", "world": 2})
    r1.close(success=False)
    r0.close(success=False)

    reader = RunStore.open(storage, RUN, group=Rank(0, 2), node="n1", owner="t", log=print)
    info = reader.store.latest()
    reader.close(success=False)  # its lease and heartbeat thread
    assert info is not None and info.name == "step-00000004"
    assert info.meta == {"best": "step-00000004", "world": 2, "attempt": r0.attempt}
    paths = {e["path"] for e in info.files}
    assert {"rng-rank0.pt", "rng-rank1.pt", "ds/mp_rank_00_model_states.pt", "progress.json"} <= paths
    assert "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt" in paths

    fresh = open_rank(storage, 1, tmp_path / "node2")  # a fresh node: rank 1 downloads its part only
    got = fresh.fetch(info)
    files = {p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file()}
    assert files == {
        "rng-rank1.pt",
        "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "ds/mp_rank_00_model_states.pt",
        "progress.json",
    }
    downloads = [k for op, k in storage.calls if op == "get_file"]
    assert not any("rank0" in k or "rank_0_" in k for k in downloads)
    fresh.close(success=False)


def test_a_restarted_group_completes_a_checkpoint_left_on_the_nodes_disk(tmp_path: Path) -> None:
    """Both ranks wrote step 6 on one node; rank 1's upload failed (its process was lost), so rank 0
    never wrote the manifest. The restarted ranks on that node upload rank 1's part from disk and
    rank 0 writes the manifest: the checkpoint is the resume point, not lost."""
    storage = bucket(tmp_path)
    stage = tmp_path / "node"
    board: dict = {}
    r0, r1 = open_rank(storage, 0, stage, board=board), open_rank(storage, 1, stage, board=board)
    r0.part_timeout_s = 1.0  # rank 0 waits for a part that will not come, then gives up
    folder = r0.checkpoint_folder(6)
    write_part(folder, 0, 6)
    write_part(folder, 1, 6)
    storage.fail["rng-rank1.pt"] = [StorageError("connection lost")]
    for run in (r1, r0):
        run.commit(6, folder, {"f1": 0.7}, {"best": "step-00000006", "world": 2})
    for run in (r1, r0):
        with pytest.raises(Exception, match="connection lost|never arrived"):
            run.wait()
        run.close(success=False)
    assert r0.store.list_complete() == []

    board = {}
    again0, again1 = open_rank(storage, 0, stage, board=board), open_rank(storage, 1, stage, board=board)
    assert again1.resume_point() is None  # not the node leader, not rank 0: it only receives the answer
    info = again0.resume_point()
    assert info is not None and info.name == "step-00000006"
    assert {"rng-rank1.pt", "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= {e["path"] for e in info.files}
    again0.close(success=False)
    again1.close(success=False)


def test_a_local_folder_on_two_nodes_is_refused(tmp_path: Path) -> None:
    @dataclass
    class TwoNodes(Rank):
        def gather(self, obj: Any) -> list[Any]:
            return ["node-a", "node-b"]

    with pytest.raises(StorageError, match="run.storage: the local folder .* sit on 2 nodes"):
        RunStore.open(LocalStorage(tmp_path), RUN, group=TwoNodes(0), node="node-a", owner="t", log=print)


class ThreadRank(Rank):
    """A rank played by a thread: `agree` is a real agreement between the threads."""

    def agree(self, error: BaseException | None) -> None:
        board, gate = self.shared
        board[self.rank] = error
        gate.wait()
        failed = [e for e in board.values() if e is not None]
        gate.wait()  # everyone has read the board before the next round writes it
        if failed:
            raise failed[0]


def test_a_failed_part_on_one_rank_never_leaves_rank_0_waiting_for_it(tmp_path: Path) -> None:
    """Rank 1's upload fails for good; rank 0's manifest writer waits for rank 1's part marker.
    `wait()` agrees on the parts first, so both ranks raise at once (not after the part timeout),
    and rank 0's close does not wait for the part that never comes."""
    import threading
    import time

    storage = bucket(tmp_path)
    storage.fail["zero_pp_rank_1_mp_rank_00_optim_states.pt"] = [StorageError("disk full", transient=False)]
    shared = ({}, threading.Barrier(2))
    outcome: dict[int, BaseException | None] = {}

    def play(rank: int) -> None:
        run = RunStore.open(
            storage,
            RUN,
            group=ThreadRank(rank, 2, local_rank=0 if rank == 0 else 1, shared=shared),
            node="n1",
            owner="test",
            staging_root=str(tmp_path / f"node{rank}"),
            log=lambda m: None,
        )
        folder = run.checkpoint_folder(2)
        write_part(folder, rank, 2)
        run.commit(2, folder, {}, {"world": 2})
        try:
            run.wait()
            outcome[rank] = None
        except BaseException as exc:
            outcome[rank] = exc
        finally:
            run.close(success=False)

    t0 = time.monotonic()
    threads = [threading.Thread(target=play, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a rank is still waiting"
    assert time.monotonic() - t0 < 30
    assert all("checkpoint step-00000002 was not saved" in str(outcome[r]) for r in (0, 1)), outcome
    assert not storage.exists(f"{RUN}/checkpoints/step-00000002/MANIFEST.json")


def test_a_dead_attempts_part_marker_is_not_taken_for_a_later_attempts_part(tmp_path: Path) -> None:
    """Attempt A's rank 1 uploaded its part of step 4, then the group died before rank 0's part.
    Attempt B reaches step 4 again: its rank 0's manifest must wait for B's rank 1, not list A's
    rank-1 files (their old sha256s) while B's rank 1 still rewrites them."""
    import time

    storage = bucket(tmp_path)
    a1 = open_rank(storage, 1, tmp_path / "a-node1")
    folder = a1.checkpoint_folder(4)
    write_part(folder, 1, 4)
    a1.commit(4, folder, {"f1": 0.5}, {"world": 2})
    a1.wait()
    a1.close(success=False)

    board: dict = {}
    b0 = open_rank(storage, 0, tmp_path / "b-node0", board=board)
    b1 = open_rank(storage, 1, tmp_path / "b-node1", board=board)
    assert b0.attempt == b1.attempt and b0.attempt != a1.attempt
    folder0 = b0.checkpoint_folder(4)
    write_part(folder0, 0, 4)
    b0.commit(4, folder0, {"f1": 0.6}, {"world": 2})
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not b0.store.list_complete():
        time.sleep(0.1)  # a manifest from the stale marker would appear here
    assert b0.store.list_complete() == []
    folder1 = b1.checkpoint_folder(4)
    write_part(folder1, 1, 4)
    (folder1 / "rng-rank1.pt").write_bytes(b"R" * 11)  # the same size as attempt A's, other bytes
    b1.commit(4, folder1, {"f1": 0.6}, {"world": 2})
    b1.wait()
    b0.wait()
    info = b0.store.latest()
    assert info is not None and info.meta["attempt"] == b0.attempt
    b1.close(success=False)
    b0.close(success=False)

    fresh = open_rank(storage, 1, tmp_path / "c-node1")  # a fresh node: downloads and verifies rank 1's files
    got = fresh.fetch(info)
    assert (got / "rng-rank1.pt").read_bytes() == b"R" * 11
    fresh.close(success=False)
