"""Checkpoints and other run outputs in a run's storage.

A checkpoint is a folder ``<run>/checkpoints/<name>`` (name ``step-00000123``) of files
(DeepSpeed's per-rank files, progress.json, labels.json, ...). It is *complete* once its
``MANIFEST.json`` exists: that file is written last and lists every file with size and
sha256, so a reader never mistakes a half-uploaded checkpoint for a resume point.

``CheckpointStore`` uploads checkpoints beside training (a background thread pool),
retries transient failures, keeps the latest + the best ``keep_best`` checkpoints, and
picks the newest verified checkpoint to resume from. ``RunFiles`` (``run_files.py``)
uploads the other outputs (metrics.jsonl, results.json, model/) in the background.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import Counter
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .digest import sha256_file
from .keys import TMP_MARK, check_key, join_key
from .retry import RetryPolicy, with_retries
from .secrets import redact
from .storage import Storage

CHECKPOINTS = "checkpoints"
MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = 1
_STEP_NAME = re.compile(r"^step-(\d+)$")

Log = Callable[[str], Any]


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint at ``step``: ``step-00000123``."""
    return f"step-{step:08d}"


def _raytag_version() -> str:
    """The installed raytag version, or 'unknown'."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("raytag")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint as its manifest describes it."""

    name: str
    step: int
    metrics: dict
    files: list[dict]
    epoch: float | None = None
    created: str = ""
    meta: dict = field(default_factory=dict)  # e.g. {"best": "step-...", "world": 2}: written by the trainer


class CheckpointUploadError(Exception):
    """A checkpoint was not saved: "checkpoint step-00000123 was not saved to <where>: <reason>"."""


class CheckpointVerifyError(Exception):
    """A checkpoint's files do not match its manifest (missing file, wrong size or sha256)."""


# --------------------------------------------------------------------------- manifests


def local_files(folder: Path) -> list[str]:
    """Relative '/'-paths of every file below ``folder``, sorted; the manifest and temp files left out."""
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.name.startswith(TMP_MARK):
            rel = path.relative_to(folder).as_posix()
            if rel != MANIFEST:
                found.append(rel)
    return sorted(found)


def file_entries(folder: Path, paths: list[str] | None = None) -> list[dict[str, Any]]:
    """Manifest entries ({path, size, sha256}) for ``paths`` of ``folder`` (default: every file)."""
    entries = []
    for rel in local_files(folder) if paths is None else sorted(paths):
        path = folder / rel
        entries.append({"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)})
    return entries


def build_manifest(
    folder: Path,
    name: str,
    step: int,
    metrics: dict,
    epoch: float | None = None,
    meta: dict | None = None,
) -> dict[str, Any]:
    """The manifest of checkpoint folder ``folder``: every file with size and sha256, plus metadata.

    Raises OSError if a file cannot be read, ValueError if the checkpoint holds no files.
    """
    return manifest_doc(name, step, metrics, file_entries(folder), epoch, meta)


def manifest_doc(
    name: str,
    step: int,
    metrics: dict,
    files: list[dict[str, Any]],
    epoch: float | None = None,
    meta: dict | None = None,
) -> dict[str, Any]:
    """A manifest from its parts (file entries sorted by path); raises ValueError when it lists no files."""
    files = sorted(files, key=lambda e: e["path"])
    if not files:
        raise ValueError(f"checkpoint {name} holds no files")
    return {
        "format": MANIFEST_FORMAT,
        "name": name,
        "step": int(step),
        "epoch": epoch,
        "metrics": _jsonable(metrics),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "raytag_version": _raytag_version(),
        "meta": _jsonable(meta or {}),
        "files": files,
    }


def _jsonable(metrics: dict) -> dict:
    """``metrics`` with values JSON can hold (numbers as float/int, others as str)."""
    return json.loads(json.dumps(metrics, default=lambda v: float(v) if _is_number(v) else str(v)))


def _is_number(value: Any) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def parse_manifest(data: bytes, name: str) -> CheckpointInfo:
    """A CheckpointInfo from manifest bytes; raises ValueError saying what is wrong."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"MANIFEST.json is not valid JSON ({exc.__class__.__name__})") from exc
    if not isinstance(doc, dict):
        raise ValueError("MANIFEST.json is not a JSON object")
    if doc.get("name") != name:
        raise ValueError(f"MANIFEST.json names checkpoint {doc.get('name')!r}")
    files = doc.get("files")
    if not isinstance(files, list) or not files:
        raise ValueError("MANIFEST.json lists no files")
    for entry in files:
        _check_entry(entry)
    step, metrics = doc.get("step"), doc.get("metrics") or {}
    if not isinstance(step, int) or isinstance(step, bool) or not isinstance(metrics, dict):
        raise ValueError("MANIFEST.json has no integer step or a metrics value that is not an object")
    epoch = doc.get("epoch")
    return CheckpointInfo(
        name=name,
        step=step,
        metrics=metrics,
        files=files,
        epoch=epoch if isinstance(epoch, (int, float)) else None,
        created=str(doc.get("created", "")),
        meta=doc["meta"] if isinstance(doc.get("meta"), dict) else {},
    )


def _check_entry(entry: Any) -> None:
    """Raise ValueError unless ``entry`` is {path: safe relative key, size: int >= 0, sha256: hex}."""
    if not isinstance(entry, dict):
        raise ValueError("MANIFEST.json has a file entry that is not an object")
    path, size, sha = entry.get("path"), entry.get("size"), entry.get("sha256")
    if not isinstance(path, str) or not isinstance(size, int) or not isinstance(sha, str) or size < 0:
        raise ValueError(f"MANIFEST.json has a malformed file entry {entry!r}")
    try:
        check_key(path)
    except ValueError as exc:
        raise ValueError(f"MANIFEST.json lists an unsafe path {path!r}") from exc


def metric_value(info: CheckpointInfo, metric: str) -> float | None:
    """``info.metrics[metric]`` as a finite float, or None when absent or not a number."""
    value = info.metrics.get(metric)
    if value is None or isinstance(value, bool) or not _is_number(value):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def select_keep(complete: list[CheckpointInfo], keep_best: int, metric: str) -> set[str]:
    """Names to keep: the latest by step plus the ``keep_best`` best by ``metric`` (higher is better).

    Checkpoints without the metric only count as 'latest'; ties prefer the later step. The
    checkpoint the latest manifest names as best (``meta.best``: the trainer's choice, which
    test scores and ``model/`` come from) is always kept.
    """
    if not complete:
        return set()
    latest = max(complete, key=lambda i: i.step)
    keep = {latest.name}
    if isinstance(latest.meta.get("best"), str):
        keep.add(latest.meta["best"])
    scored = [(v, i.step, i.name) for i in complete if (v := metric_value(i, metric)) is not None]
    scored.sort(reverse=True)
    keep.update(name for _v, _s, name in scored[: max(keep_best, 0)])
    return keep


@dataclass
class _Scan:
    """What is under ``checkpoints/``: complete ones, and broken ones with their step and why."""

    complete: list[CheckpointInfo] = field(default_factory=list)
    broken: dict[str, tuple[int | None, str]] = field(default_factory=dict)


# --------------------------------------------------------------------------- the store


class CheckpointStore:
    """Save, list, choose and prune the checkpoints of one run in a Storage.

    ``save`` returns at once; files upload in a thread pool while training continues, the
    manifest goes last, then ``retention`` runs. Transient storage failures are retried with
    exponential backoff (``backoff_s`` doubling up to ``max_backoff_s``, ``retries`` times, or
    for up to ``retry_budget_s`` seconds when that is given).
    A failed save raises CheckpointUploadError from the next ``save``/``wait``/``close``;
    its manifest is never written.
    """

    def __init__(
        self,
        storage: Storage,
        run_prefix: str,
        *,
        keep_best: int = 1,
        metric: str = "f1",
        max_workers: int = 4,
        retries: int = 5,
        log: Log = print,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        retry_budget_s: float | None = None,
    ) -> None:
        self.storage = storage
        self.prefix = join_key(run_prefix, CHECKPOINTS)
        self.keep_best = keep_best
        self.metric = metric
        self._retry = RetryPolicy.of(retry_budget_s, retries, backoff_s, max_backoff_s)
        self._log = log
        self._saver = ThreadPoolExecutor(1, thread_name_prefix="raytag-ckpt")
        self._uploads = ThreadPoolExecutor(max(1, max_workers), thread_name_prefix="raytag-ckpt-file")
        self._lock = threading.Lock()
        self._retention_lock = threading.Lock()
        self._futures: list[Future] = []
        self._in_flight: Counter[str] = Counter()  # names being saved (a name may be queued twice)
        self._closed = False

    def __repr__(self) -> str:
        return f"CheckpointStore({self.storage.display(self.prefix)!r})"

    def log(self, message: str) -> None:
        """Log ``message`` with secrets removed."""
        self._log(redact(message))

    def where(self, name: str) -> str:
        """Display form of checkpoint ``name``'s folder."""
        return self.storage.display(join_key(self.prefix, name))

    def _call(self, fn: Callable[[], Any], what: str) -> Any:
        return with_retries(fn, what=what, policy=self._retry, log=self.log)

    # -- saving

    def save(
        self,
        local_dir: Path,
        name: str,
        step: int,
        metrics: dict,
        *,
        block: bool = False,
        epoch: float | None = None,
        meta: dict | None = None,
    ) -> None:
        """Save folder ``local_dir`` as checkpoint ``name`` in the background (``block``: wait for it).

        ``meta`` goes into the manifest as it is (the trainer's notes: best checkpoint, workers).
        ``local_dir`` must not change until the save is done. ``epoch`` defaults to
        ``metrics['epoch']``. Raises CheckpointUploadError for this save when ``block``, or for
        an earlier background save that failed; ValueError for a bad name; RuntimeError once closed.
        """
        check_key(name)
        if "/" in name:
            raise ValueError(f"checkpoint name {name!r} must be a single folder name")
        self._raise_failed()
        if epoch is None and _is_number(metrics.get("epoch")):
            epoch = float(metrics["epoch"])
        with self._lock:
            if self._closed:
                raise RuntimeError("CheckpointStore is closed")
            self._in_flight[name] += 1
            future = self._saver.submit(
                self._save_now,
                Path(local_dir),
                name,
                step,
                dict(metrics),
                epoch,
                dict(meta or {}),
            )
            self._futures.append(future)
        if block:
            with self._lock:
                self._futures.remove(future)
            future.result()

    def _save_now(
        self,
        local_dir: Path,
        name: str,
        step: int,
        metrics: dict,
        epoch: float | None,
        meta: dict | None = None,
    ) -> None:
        """Upload one checkpoint, manifest last, then run retention; raises CheckpointUploadError."""
        try:
            self._upload(local_dir, name, step, metrics, epoch, meta)
        except Exception as exc:
            raise CheckpointUploadError(
                redact(f"checkpoint {name} was not saved to {self.where(name)}: {exc}")
            ) from exc
        finally:
            with self._lock:
                self._in_flight[name] -= 1
                if self._in_flight[name] <= 0:
                    del self._in_flight[name]
        self.log(f"saved checkpoint {name} to {self.where(name)}")
        try:
            self.retention()
        except Exception as exc:  # the checkpoint is saved; a failed clean-up must not hide that
            self.log(f"checkpoint retention after {name} failed: {exc}")

    def _upload(
        self,
        local_dir: Path,
        name: str,
        step: int,
        metrics: dict,
        epoch: float | None,
        meta: dict | None = None,
    ) -> None:
        """Hash, upload the files in parallel, then write the manifest; raises on the first failure."""
        target = join_key(self.prefix, name)
        manifest_key = join_key(target, MANIFEST)
        manifest = build_manifest(local_dir, name, step, metrics, epoch, meta)
        self._call(lambda: self.storage.delete(manifest_key), f"removing the old manifest of {name}")
        if not is_target(self.storage, target, local_dir):
            self._call(lambda: self.storage.delete_prefix(target), f"clearing {name}")
            self._upload_files(local_dir, target, [f["path"] for f in manifest["files"]])
        data = json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8")
        self._call(lambda: self.storage.put_bytes(manifest_key, data), f"writing the manifest of {name}")

    def write_manifest(
        self, name: str, step: int, metrics: dict, files: list[dict[str, Any]], meta: dict | None = None
    ) -> None:
        """Write the manifest of checkpoint ``name`` whose ``files`` are already in storage (blocking),
        then run retention. Raises StorageError when the write fails after retries."""
        epoch = float(metrics["epoch"]) if _is_number(metrics.get("epoch")) else None
        doc = manifest_doc(name, step, metrics, files, epoch, meta)
        key = join_key(self.prefix, name, MANIFEST)
        data = json.dumps(doc, indent=1, sort_keys=True).encode("utf-8")
        self._call(lambda: self.storage.put_bytes(key, data), f"writing the manifest of {name}")
        self.log(f"saved checkpoint {name} to {self.where(name)}")
        try:
            self.retention()
        except Exception as exc:  # the checkpoint is saved; a failed clean-up must not hide that
            self.log(f"checkpoint retention after {name} failed: {exc}")

    def _upload_files(self, local_dir: Path, target: str, paths: list[str]) -> None:
        """Upload ``paths`` of ``local_dir`` below ``target`` in the pool; raise the first failure."""

        def one(rel: str) -> None:
            key = join_key(target, rel)
            self._call(lambda: self.storage.put_file(key, local_dir / rel), f"uploading {key}")

        futures = [self._uploads.submit(one, rel) for rel in paths]
        wait_futures(futures)
        for future in futures:
            error = future.exception()
            if error is not None:
                raise error

    def _raise_failed(self) -> None:
        """Forget finished saves; raise the first failure among them (log any others)."""
        with self._lock:
            done = [f for f in self._futures if f.done()]
            self._futures = [f for f in self._futures if not f.done()]
        errors = [e for f in done if (e := f.exception()) is not None]
        for extra in errors[1:]:
            self.log(f"also failed: {extra}")
        if errors:
            raise errors[0]

    def wait(self) -> None:
        """Block until pending saves finish; raise CheckpointUploadError if one failed."""
        with self._lock:
            pending = list(self._futures)
        wait_futures(pending)
        self._raise_failed()

    def close(self) -> None:
        """Wait for pending saves, stop the threads; raise CheckpointUploadError if a save failed."""
        with self._lock:
            self._closed = True
        try:
            self.wait()
        finally:
            self._saver.shutdown(wait=True)
            self._uploads.shutdown(wait=True)

    # -- reading

    def _scan(self) -> _Scan:
        """Group the keys under ``checkpoints/`` by folder and verify each against its manifest."""
        sizes = self.storage.list_sizes(self.prefix)
        groups: dict[str, dict[str, int]] = {}
        for key, size in sizes.items():
            rel = key[len(self.prefix) + 1 :] if self.prefix else key
            if "/" in rel:
                folder, path = rel.split("/", 1)
                groups.setdefault(folder, {})[path] = size
        scan = _Scan()
        for name, files in sorted(groups.items()):
            info, reason = self._verify(name, files)
            if info is not None:
                scan.complete.append(info)
            else:
                match = _STEP_NAME.match(name)
                scan.broken[name] = (int(match.group(1)) if match else None, reason)
        scan.complete.sort(key=lambda i: i.step)
        return scan

    def _verify(self, name: str, files: dict[str, int]) -> tuple[CheckpointInfo | None, str]:
        """(info, '') for a complete checkpoint, else (None, why it is not)."""
        if MANIFEST not in files:
            return None, "no MANIFEST.json (incomplete, or still uploading)"
        data = self.storage.get_bytes(join_key(self.prefix, name, MANIFEST))
        if data is None:
            return None, "MANIFEST.json disappeared while listing"
        try:
            info = parse_manifest(data, name)
        except ValueError as exc:
            return None, f"corrupt manifest: {exc}"
        for entry in info.files:
            size = files.get(entry["path"])
            if size is None:
                return None, f"file {entry['path']} listed in MANIFEST.json is missing"
            if size != entry["size"]:
                return None, f"file {entry['path']} has {size} bytes, MANIFEST.json says {entry['size']}"
        return info, ""

    def list_complete(self) -> list[CheckpointInfo]:
        """Every complete, verified checkpoint (manifest parses, files exist with their sizes), by step."""
        return self._scan().complete

    def latest(self, skip: Collection[str] = ()) -> CheckpointInfo | None:
        """The newest complete checkpoint by step, or None; logs why each broken one is skipped.
        `skip`: names not to pick (checkpoints that failed their check on fetch)."""
        scan = self._scan()
        for name, (_step, reason) in scan.broken.items():
            self.log(f"skipping checkpoint {name}: {reason}")
        complete = [i for i in scan.complete if i.name not in skip]
        return complete[-1] if complete else None

    def download(self, info: CheckpointInfo, dest: Path) -> Path:
        """Fetch checkpoint ``info`` into folder ``dest`` and verify every sha256; return the folder.

        For a LocalStorage the checkpoint's own folder is verified and returned (no copy).
        Raises CheckpointVerifyError naming the file that is missing or does not match.
        """
        target = join_key(self.prefix, info.name)
        in_place = self.storage.local_path(target)
        if in_place is not None and in_place.is_dir():
            self._verify_local(info, in_place)
            return in_place
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)

        def one(entry: dict) -> None:
            key = join_key(target, entry["path"])
            found = self._call(lambda: self.storage.get_file(key, dest / entry["path"]), f"downloading {key}")
            if not found:
                raise CheckpointVerifyError(
                    f"checkpoint {info.name} file {entry['path']} is missing from {self.where(info.name)}"
                )

        futures = [self._uploads.submit(one, entry) for entry in info.files]
        wait_futures(futures)
        for future in futures:
            if (error := future.exception()) is not None:
                raise error
        self._verify_local(info, dest)
        return dest

    def _verify_local(self, info: CheckpointInfo, folder: Path) -> None:
        """Raise CheckpointVerifyError unless every manifest file in ``folder`` has its size and sha256."""
        for entry in info.files:
            path = folder / entry["path"]
            try:
                size, sha = path.stat().st_size, sha256_file(path)
            except OSError as exc:
                raise CheckpointVerifyError(
                    f"checkpoint {info.name} file {entry['path']} cannot be read from {folder}: {exc}"
                ) from exc
            if size != entry["size"] or sha != entry["sha256"]:
                raise CheckpointVerifyError(
                    f"checkpoint {info.name} file {entry['path']} is corrupt: sha256 {sha[:12]}... "
                    f"({size} bytes) does not match the manifest's {entry['sha256'][:12]}... "
                    f"({entry['size']} bytes)"
                )

    # -- pruning

    def retention(self) -> None:
        """Keep the latest complete checkpoint and the best ``keep_best``; delete the others.

        Incomplete or broken checkpoints older than the latest complete one are deleted too,
        except those this store is still uploading. Deletion removes the manifest first, so a
        half-deleted checkpoint never looks complete. Raises StorageError on failure.
        """
        with self._retention_lock:
            scan = self._scan()
            keep = select_keep(scan.complete, self.keep_best, self.metric)
            with self._lock:
                busy = set(self._in_flight)
            for info in scan.complete:
                if info.name not in keep and info.name not in busy:
                    self._delete(info.name, "not the latest nor among the best")
            if not scan.complete:
                return
            newest = scan.complete[-1].step
            for name, (step, _reason) in scan.broken.items():
                if step is not None and step < newest and name not in busy:
                    self._delete(name, "incomplete leftover older than the latest complete checkpoint")

    def _delete(self, name: str, why: str) -> None:
        """Delete checkpoint ``name``: manifest first, then its folder."""
        target = join_key(self.prefix, name)
        self._call(
            lambda: self.storage.delete(join_key(target, MANIFEST)), f"deleting the manifest of {name}"
        )
        self._call(lambda: self.storage.delete_prefix(target), f"deleting {name}")
        self.log(f"deleted checkpoint {name} ({why})")


def is_target(storage: Storage, key: str, local: Path) -> bool:
    """True when ``local`` already is the storage's own path for ``key`` (a LocalStorage)."""
    target = storage.local_path(key)
    if target is None:
        return False
    try:
        return target.resolve() == Path(local).resolve()
    except OSError:
        return False
