"""One run's storage as the training loop sees it: a handful of operations every rank calls at the same points.

    run = RunStore.open(storage, name, group=..., node=..., owner=...)  # node check, lease
    info = run.resume_point()        # rank 0 decides (after completing checkpoints left on disk); all receive it
    folder = run.fetch(info)         # this rank's files of that checkpoint (its own shards + the shared files)
    folder = run.checkpoint_folder(step)   # a clean local folder the loop and DeepSpeed write into
    run.commit(step, folder, metrics, best=...)  # each rank uploads its part; rank 0 writes the manifest last
    run.publish("metrics.jsonl")     # rank 0: mirror a file (or folder) of the working folder
    run.close()                      # finish uploads, release the lease

Where the bytes go. A local-folder run is written in place (one node: `open` refuses a local
folder when the ranks sit on several nodes). A bucket run works in a staging folder on each
node, keyed by the full run location (storage URI and run name), shared by the node's ranks:

- A checkpoint is committed in parts. Each rank uploads the files it wrote (DeepSpeed's shards
  carry the rank in their name; rank 0 owns the unranked files), then a part marker
  `checkpoints/<name>/.parts/rank-NNNNN.json` listing them. Rank 0 writes `MANIFEST.json` once
  every rank's marker is in. All of it runs beside training.
- Markers belong to one attempt (a worker group's life: `RunStore.open` draws its id). A group that
  died before its manifest leaves markers behind; a later group that reaches the same step counts
  only its own, so a manifest never lists a dead attempt's files (with their old sha256s) while
  the new rank still rewrites them. The manifest names its attempt (`meta.attempt`).
- Local markers record what a rank has written (`.raytag-written-rankN`) and uploaded
  (`.raytag-uploaded-rankN`). A worker group that Ray restarts on the same node finishes the
  uploads of a checkpoint whose files are all on disk, and rank 0 writes its manifest, before the
  resume point is chosen: a worker lost during an upload costs no checkpoint.
- Staging is bounded: once a checkpoint's local parts are uploaded, older checkpoint folders are
  deleted; the node keeps the newest uploaded checkpoint (a restart on it resumes without
  downloading) and whatever is still uploading.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .checkpoints import (
    CHECKPOINTS,
    MANIFEST,
    CheckpointInfo,
    CheckpointStore,
    CheckpointUploadError,
    checkpoint_name,
    file_entries,
    local_files,
)
from .digest import sha256_bytes, sha256_file
from .keys import join_key
from .parts import PARTS, UPLOADED, WRITTEN, Part, needed_by, owned_by
from .run_files import RunFiles
from .runlock import LOCK, RunLock, RunLockedError
from .secrets import redact
from .storage import Storage, StorageError

_STEP_DIR = re.compile(r"^step-(\d+)$")

Log = Callable[[str], Any]


class Group(Protocol):
    """What the run needs from the process group (trainer/dist.py provides it)."""

    rank: int
    world: int
    local_rank: int

    def barrier(self) -> None: ...

    def broadcast(self, obj: Any) -> Any: ...  # rank 0's obj on every rank

    def gather(self, obj: Any) -> list[Any]: ...  # every rank's obj on every rank

    def agree(self, error: BaseException | None) -> None: ...  # raise on all ranks if any rank failed


@dataclass(frozen=True)
class SoloGroup:
    """A world of one (local in-process runs without a process group)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    def barrier(self) -> None:
        return None

    def broadcast(self, obj: Any) -> Any:
        return obj

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def agree(self, error: BaseException | None) -> None:
        if error is not None:
            raise error


def wipe_run(storage: Storage, name: str) -> None:
    """Delete everything of run `name` but its lease (`run.new_run`, carried out by the lease holder)."""
    lock_key = join_key(name, LOCK)
    for key in storage.list(f"{name}/"):
        if key != lock_key:
            storage.delete(key)


def staging_folder(root: str | Path | None, storage_uri: str, name: str) -> Path:
    """The node-local working folder of a bucket run: keyed by the full run location, not the name alone."""
    base = Path(root) if root else Path(tempfile.gettempdir()) / "raytag-staging"
    key = sha256_bytes(f"{storage_uri.rstrip('/')}/{name}".encode())[:16]
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64]
    return base / f"{safe}-{key}"


class RunStore:
    """The storage boundary of one run (see the module docstring). Every public method is called by
    every rank at the same point unless it says "rank 0"."""

    def __init__(
        self,
        storage: Storage,
        name: str,
        *,
        group: Group,
        workdir: Path,
        keep_best: int,
        lock: RunLock | None,
        log: Log,
        part_timeout_s: float = 900.0,
        retry_budget_s: float | None = None,
        attempt: str = "",
    ) -> None:
        self.storage, self.name, self.group = storage, name, group
        self.attempt = attempt  # this worker group's id: its part markers and manifests carry it
        self.workdir = workdir
        self.remote = storage.local_path(name) is None
        self._log = log
        self._lock = lock
        self.part_timeout_s = part_timeout_s
        self.store = CheckpointStore(
            storage, name, keep_best=keep_best, metric="f1", log=log, retry_budget_s=retry_budget_s
        )
        self.files = RunFiles(storage, name, log=log, retry_budget_s=retry_budget_s)
        # Rank k's part uploads run in order on one thread.
        self._parts = ThreadPoolExecutor(1, thread_name_prefix="raytag-part")
        # Rank 0 writes manifests on a thread of their own: it may wait there for other ranks' parts.
        self._manifests = ThreadPoolExecutor(1, thread_name_prefix="raytag-manifest")
        self._pending: list[Future] = []  # this rank's part uploads, then (rank 0) manifest writes
        self._pending_lock = threading.Lock()
        self._broken: str | None = None  # a part upload failed: later parts are not attempted
        self._abandon = threading.Event()  # a rank failed: stop waiting for parts that never come
        self.finished = storage.exists(join_key(name, "results.json"))

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        storage: Storage,
        name: str,
        *,
        group: Group,
        node: str,
        owner: str,
        keep_best: int = 1,
        new_run: bool = False,
        staging_root: str | None = None,
        log: Log = print,
        lease_info: dict[str, Any] | None = None,
        retry_budget_s: float | None = None,
        on_lost: Callable[[str], Any] | None = None,
    ) -> RunStore:
        """Open run `name` in `storage` on every rank.

        Refuses (StorageError on every rank) a local folder when the ranks run on more than one
        node, and a run whose lease another live job holds. Rank 0 takes the lease and, with
        `new_run`, removes the run's old outputs first. `on_lost(why)` is called (rank 0) when the
        lease is lost to another job or fenced (see runlock.py): the run should stop.
        """
        nodes = group.gather(node)
        local = storage.local_path(name)
        if local is not None and len(set(nodes)) > 1:
            raise StorageError(
                f"run.storage: the local folder {storage.uri!r} cannot hold a run whose {group.world} workers "
                f"sit on {len(set(nodes))} nodes (each node would see its own folder); use s3://bucket/prefix"
            )
        workdir = local if local is not None else staging_folder(staging_root, storage.uri, name)
        lock = (
            RunLock(storage, name, owner, log=log, info=lease_info, on_lost=on_lost)
            if group.rank == 0
            else None
        )
        error: BaseException | None = None
        if lock is not None:
            try:
                lock.acquire()  # first: a second live job is refused before anything is deleted
                if new_run:
                    wipe_run(storage, name)
            except BaseException as exc:
                error = exc
        group.agree(error)
        if new_run and local is None and group.local_rank == 0 and workdir.exists():
            shutil.rmtree(workdir, ignore_errors=True)  # a fresh run: nothing on the node is its state
        group.barrier()
        workdir.mkdir(parents=True, exist_ok=True)
        attempt = group.broadcast(uuid.uuid4().hex[:16] if group.rank == 0 else None)
        run = cls(
            storage,
            name,
            group=group,
            workdir=workdir,
            keep_best=keep_best,
            lock=lock,
            log=log,
            retry_budget_s=retry_budget_s,
            attempt=attempt,
        )
        group.barrier()  # every rank has read `finished` before anyone writes
        return run

    def log(self, message: str) -> None:
        self._log(redact(message))

    @property
    def uri(self) -> str:
        return self.storage.display(self.name)

    # ------------------------------------------------------------------ resume

    def resume_point(self, skip: Collection[str] = ()) -> CheckpointInfo | None:
        """The newest complete checkpoint (not named in `skip`), decided by rank 0 and received by
        every rank.

        First, checkpoints whose files a crashed attempt left on this node's disk are uploaded
        and completed (manifest written) when every rank's part is then in the bucket.
        """
        error: BaseException | None = None
        if self.remote and self.group.local_rank == 0:
            try:
                self._upload_leftover_parts()
            except BaseException as exc:
                error = exc
        self.group.agree(error)
        info: CheckpointInfo | None = None
        if self.group.rank == 0:
            try:
                if self.remote:
                    self._complete_from_parts()
                info = self.store.latest(skip)
            except BaseException as exc:
                error = exc
        self.group.agree(error)
        return self.group.broadcast(info)

    def stored_file(self, info: CheckpointInfo, rel: str) -> bytes | None:
        """One small file of checkpoint `info` (config.yaml, labels.json, ...), read from storage."""
        return self.storage.get_bytes(join_key(self.name, CHECKPOINTS, info.name, rel))

    def fetch(self, info: CheckpointInfo, into: str = CHECKPOINTS, everything: bool = False) -> Path:
        """This rank's files of checkpoint `info` (its own shards and the shared files; `everything`:
        every rank's, to re-partition them for a group of another size), verified.

        Files already on this node with the manifest's size and sha256 are not downloaded again.
        Raises CheckpointVerifyError naming a missing or corrupt file.
        """
        if not self.remote:
            return self.store.download(info, self.workdir / CHECKPOINTS / info.name)
        dest = self.workdir / into / info.name
        rank = self.group.rank
        wanted = [e for e in info.files if everything or needed_by(e["path"], rank)]
        missing = [e for e in wanted if not _matches(dest / e["path"], e)]
        if missing:
            subset = CheckpointInfo(info.name, info.step, info.metrics, missing, info.epoch, info.created)
            self.store.download(subset, dest)
        subset = CheckpointInfo(info.name, info.step, info.metrics, wanted, info.epoch, info.created)
        self.store._verify_local(subset, dest)
        return dest

    def drop_fetched(self, into: str) -> None:
        """Remove a folder `fetch(..., into=...)` filled (this node's ranks share it)."""
        self.group.barrier()
        if self.remote and self.group.local_rank == 0:
            shutil.rmtree(self.workdir / into, ignore_errors=True)

    # ------------------------------------------------------------------ saving

    def checkpoint_folder(self, step: int) -> Path:
        """A clean local folder for the checkpoint at `step` (a leftover of a dead attempt is removed)."""
        folder = self.workdir / CHECKPOINTS / checkpoint_name(step)
        if self.group.local_rank == 0 and folder.exists():
            shutil.rmtree(folder)
        self.group.barrier()
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def commit(self, step: int, folder: Path, metrics: dict[str, Any], meta: dict[str, Any]) -> None:
        """Commit the checkpoint every rank has written into `folder`; returns at once.

        Every rank first learns whether any rank's earlier upload failed (then all raise it), so a
        failure on one rank never leaves the others waiting in a collective. `meta` goes into the
        manifest (e.g. the best checkpoint so far, the worker count).
        """
        failed = self._failed()
        if failed is None and self._lock is not None and self._lock.lost:
            failed = RunLockedError(
                f"{self._lock.lost}: stopping before writing checkpoint {checkpoint_name(step)}"
            )
        self.group.agree(failed)
        name = checkpoint_name(step)
        rank, world = self.group.rank, self.group.world
        meta = {**meta, "attempt": self.attempt}
        if not self.remote:
            self.group.barrier()  # one node: every rank's files are in the run folder now
            if rank == 0:
                self.store.save(folder, name, step, metrics, meta=meta)
            return
        own = [p for p in local_files(folder) if owned_by(p, rank) and not p.startswith(".raytag-")]
        part = Part(rank, world, step, own, metrics, meta, self.attempt)
        (folder / f"{WRITTEN}{rank}").write_text(part.marker())
        future = self._parts.submit(self._commit_part, folder, part)
        with self._pending_lock:
            self._pending.append(future)

    def _commit_part(self, folder: Path, part: Part) -> None:
        name = folder.name
        if self._broken is not None:  # the run ends at its next check; the parts stay on the node's disk
            raise CheckpointUploadError(f"checkpoint {name} was not uploaded: {self._broken}")
        try:
            self._upload_part(folder, part)
        except Exception as exc:
            self._broken = f"the upload of checkpoint {name} failed before it"
            raise CheckpointUploadError(
                redact(f"checkpoint {name} was not saved to {self.store.where(name)}: {exc}")
            ) from exc
        if part.rank == 0:
            future = self._manifests.submit(self._commit_manifest, name, part.world, part.attempt)
            with self._pending_lock:
                self._pending.append(future)
        self._prune_staging()

    def _commit_manifest(self, name: str, world: int, attempt: str) -> None:
        try:
            self._write_manifest_when_complete(name, world, attempt)
        except Exception as exc:
            raise CheckpointUploadError(
                redact(f"checkpoint {name} was not saved to {self.store.where(name)}: {exc}")
            ) from exc

    def _upload_part(self, folder: Path, part: Part) -> None:
        """Upload a rank's files of the checkpoint in `folder`, then its part marker; mark it uploaded locally."""
        name = folder.name
        entries = file_entries(folder, part.files)
        target = join_key(self.name, CHECKPOINTS, name)
        self.store._upload_files(folder, target, part.files)
        marker: dict[str, Any] = {
            "rank": part.rank,
            "world": part.world,
            "attempt": part.attempt,
            "files": entries,
        }
        if part.rank == 0:  # rank 0's marker carries what the manifest needs besides the files
            marker.update({"step": part.step, "metrics": part.metrics, "meta": part.meta})
        self.store._call(
            lambda: self.storage.put_bytes(
                join_key(target, PARTS, f"rank-{part.rank:05d}.json"), json.dumps(marker).encode()
            ),
            f"writing part {part.rank} of {name}",
        )
        (folder / f"{UPLOADED}{part.rank}").write_text("")

    def _parts_of(self, name: str, attempt: str | None = None) -> dict[int, dict[str, Any]]:
        """The part markers of checkpoint `name` in storage, by rank; with `attempt`, that attempt's only
        (another attempt's marker is a dead worker group's: its files may since have been rewritten)."""
        prefix = join_key(self.name, CHECKPOINTS, name, PARTS)
        parts: dict[int, dict[str, Any]] = {}
        for key in self.store._call(lambda: list(self.storage.list(prefix)), f"listing the parts of {name}"):
            raw = self.store._call(functools.partial(self.storage.get_bytes, key), f"reading {key}")
            try:
                doc = json.loads(raw or b"")
                if attempt is None or doc.get("attempt", "") == attempt:
                    parts[int(doc["rank"])] = doc
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # a torn marker: that part is simply not in
        return parts

    def _write_manifest_when_complete(self, name: str, world: int, attempt: str) -> None:
        """Rank 0: wait for every rank's part marker of `attempt`, then write the manifest (and run retention)."""
        deadline = time.monotonic() + self.part_timeout_s
        delay = 0.2
        while True:
            parts = self._parts_of(name, attempt)
            if all(r in parts for r in range(world)):
                break
            if self._abandon.is_set():
                raise StorageError("another rank's part failed; its manifest is not written")
            if time.monotonic() > deadline:
                absent = [r for r in range(world) if r not in parts]
                raise StorageError(
                    f"the parts of ranks {absent} never arrived in {self.part_timeout_s:.0f} s"
                )
            self._abandon.wait(delay)
            delay = min(2.0, delay * 1.5)
        self._manifest_from_parts(name, parts)

    def _manifest_from_parts(self, name: str, parts: dict[int, dict[str, Any]]) -> None:
        head = parts[0]
        files = [e for r in sorted(parts) for e in parts[r]["files"]]
        self.store.write_manifest(
            name, int(head["step"]), head.get("metrics") or {}, files, meta=head.get("meta") or {}
        )

    # ------------------------------------------------------------------ completing a dead attempt's work

    def _staged(self) -> list[tuple[int, Path]]:
        root = self.workdir / CHECKPOINTS
        found = []
        if root.is_dir():
            for child in root.iterdir():
                m = _STEP_DIR.match(child.name)
                if m and child.is_dir():
                    found.append((int(m.group(1)), child))
        return sorted(found)

    def _upload_leftover_parts(self) -> None:
        """Node leader: upload every part that a dead attempt wrote on this node but never finished uploading."""
        complete = {i.name for i in self.store.list_complete()}
        for _step, folder in self._staged():
            if folder.name in complete:
                continue
            for marker in sorted(folder.glob(f"{WRITTEN}*")):
                try:
                    part = Part.from_marker(marker.read_text())
                except (OSError, ValueError, KeyError, TypeError):
                    continue  # a marker cut off mid-write: that part is not on this disk
                if (folder / f"{UPLOADED}{part.rank}").exists():
                    continue
                if not all((folder / p).is_file() for p in part.files):
                    continue
                self.log(f"checkpoint {folder.name}: uploading rank {part.rank}'s part left on this node")
                self._upload_part(folder, part)

    def _complete_from_parts(self) -> None:
        """Rank 0: write the manifest of every checkpoint whose parts are all in the bucket but that has none."""
        sizes = self.storage.list_sizes(join_key(self.name, CHECKPOINTS))
        prefix = join_key(self.name, CHECKPOINTS) + "/"
        names: dict[str, set[str]] = {}
        for key in sizes:
            folder, _, rest = key[len(prefix) :].partition("/")
            names.setdefault(folder, set()).add(rest)
        for name, rels in sorted(names.items()):
            if MANIFEST in rels or not any(r.startswith(PARTS + "/") for r in rels):
                continue
            head = self._parts_of(name).get(0)  # the attempt whose rank 0 got furthest decides
            parts = self._parts_of(name, head.get("attempt", "")) if head else {}
            world = parts.get(0, {}).get("world")
            if world and all(r in parts for r in range(int(world))):
                self.log(f"checkpoint {name}: every rank's part is in; writing its manifest")
                self._manifest_from_parts(name, parts)

    # ------------------------------------------------------------------ staging bound

    def _prune_staging(self) -> None:
        """Delete staged checkpoints older than the newest one whose local parts are all uploaded."""
        settled = []
        for step, folder in self._staged():
            written = {m.name[len(WRITTEN) :] for m in folder.glob(f"{WRITTEN}*")}
            uploaded = {m.name[len(UPLOADED) :] for m in folder.glob(f"{UPLOADED}*")}
            if written and written <= uploaded:
                settled.append((step, folder))
        if not settled:
            return
        newest = settled[-1][0]
        for step, folder in self._staged():
            if step < newest:
                written = {m.name[len(WRITTEN) :] for m in folder.glob(f"{WRITTEN}*")}
                uploaded = {m.name[len(UPLOADED) :] for m in folder.glob(f"{UPLOADED}*")}
                if written <= uploaded:  # nothing of it still uploading (or a fetched copy)
                    shutil.rmtree(folder, ignore_errors=True)

    # ------------------------------------------------------------------ other run files

    def publish(self, rel: str) -> None:
        """Rank 0: mirror `workdir/rel` (a file or a folder) to the run's storage, in the background."""
        path = self.workdir / rel
        if path.is_dir():
            self.files.sync_dir(rel, path)
        else:
            self.files.sync(rel, path)

    def read_json(self, rel: str) -> Any:
        raw = self.storage.get_bytes(join_key(self.name, rel))
        return json.loads(raw) if raw else None

    def get_file(self, rel: str) -> bool:
        """Download `<run>/rel` into the working folder (a bucket run continuing on a fresh node)."""
        if not self.remote:
            return (self.workdir / rel).exists()
        return self.storage.get_file(join_key(self.name, rel), self.workdir / rel)

    def get_dir(self, rel: str) -> None:
        if self.remote:
            for key in self.storage.list(join_key(self.name, rel)):
                self.storage.get_file(key, self.workdir / key[len(self.name) + 1 :])

    # ------------------------------------------------------------------ waiting and closing

    def _failed(self) -> BaseException | None:
        """The first failure among finished part uploads and manifest writes (removed from the list), else None."""
        with self._pending_lock:
            done = [f for f in self._pending if f.done()]
            self._pending = [f for f in self._pending if not f.done()]
        errors = [e for f in done if (e := f.exception()) is not None]
        for extra in errors[1:]:
            self.log(f"also failed: {extra}")
        return errors[0] if errors else None

    def wait(self) -> None:
        """Every rank: wait for this rank's uploads; all ranks raise if any rank's upload failed.

        Two rounds: first every rank's own parts (then all agree), then rank 0's manifests, which
        wait for the other ranks' parts: a rank whose part failed never leaves rank 0 waiting."""
        self._agree(self._settle(self._parts))
        error = self._settle(self._manifests)
        if error is None:
            try:
                self.store.wait()
                if self.group.rank == 0:
                    self.files.wait()
            except BaseException as exc:
                error = exc
        self._agree(error)

    def _settle(self, executor: ThreadPoolExecutor) -> BaseException | None:
        """Wait until `executor` (parts, or manifests: one thread each, in order) has run everything
        queued so far; the first failure among finished uploads."""
        executor.submit(lambda: None).result()
        return self._failed()

    def _agree(self, error: BaseException | None) -> None:
        try:
            self.group.agree(error)
        except BaseException:
            self._abandon.set()  # rank 0 stops waiting for parts that will not come
            raise

    def close(self, success: bool) -> None:
        """This rank only: finish uploads already under way (nothing lost), release the lease.

        After a successful run the node's staging folder is removed: the bucket holds everything.
        """
        errors: list[BaseException] = []
        self._parts.shutdown(wait=True)  # this rank's parts: uploaded, or failed within the retry budget
        if not success:
            self._abandon.set()  # no manifest waits for a rank that is gone or failed
        self._manifests.shutdown(wait=True)
        for future in list(self._pending):
            try:
                future.result()
            except BaseException as exc:
                errors.append(exc)
        for closer in (self.store.close, self.files.close):
            try:
                closer()
            except BaseException as exc:
                errors.append(exc)
        if self._lock is not None:
            self._lock.release()
        if success and self.remote and self.group.local_rank == 0 and not errors:
            shutil.rmtree(self.workdir, ignore_errors=True)
        for problem in errors:
            self.log(f"{problem}")


def _matches(path: Path, entry: dict[str, Any]) -> bool:
    try:
        if path.stat().st_size != entry["size"]:
            return False
        return sha256_file(path) == entry["sha256"]
    except OSError:
        return False
