"""A run's other outputs in its storage: metrics.jsonl, results.json, model/, uploaded beside training.

Checkpoints have their own store (``checkpoints.py``); ``RunFiles`` sends everything else a
run writes, from one background thread, newest content first and with retries.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Any

from .checkpoints import is_target, local_files
from .keys import check_key, join_key
from .retry import RetryPolicy, with_retries
from .secrets import redact
from .storage import Storage, StorageError

_SNAPSHOT_LIMIT = 16 * 1024 * 1024

Log = Callable[[str], Any]


class RunFiles:
    """Background upload of a run's other outputs (metrics.jsonl, results.json, model/).

    One worker thread works through a queue keyed by destination: syncing a file again
    before its upload started replaces the queued job, so only the newest content is sent.
    Files up to 16 MiB are read when their upload starts (a snapshot); larger ones are
    streamed. Paths that already are the storage's own files (LocalStorage) are not copied.
    Failures (after retries) raise StorageError from ``wait``/``close``.
    """

    def __init__(
        self,
        storage: Storage,
        run_prefix: str,
        *,
        retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        log: Log = print,
        retry_budget_s: float | None = None,
    ) -> None:
        self.storage = storage
        self.prefix = run_prefix.strip("/")
        self._retry = RetryPolicy.of(retry_budget_s, retries, backoff_s, max_backoff_s)
        self._log = log
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="raytag-runfiles")
        self._lock = threading.Lock()
        self._queue: dict[str, tuple[str, Path]] = {}
        self._futures: list[Future] = []
        self._draining = False
        self._errors: list[StorageError] = []

    def sync(self, rel_key: str, local_path: Path) -> None:
        """Upload ``local_path`` as ``<run>/<rel_key>`` in the background; raises FileNotFoundError."""
        key = join_key(self.prefix, check_key(rel_key))
        if not Path(local_path).is_file():
            raise FileNotFoundError(f"cannot sync {local_path}: no such file")
        if is_target(self.storage, key, Path(local_path)):
            return
        self._enqueue(f"file:{key}", key, Path(local_path))

    def sync_dir(self, rel_prefix: str, local_dir: Path) -> None:
        """Upload every file of ``local_dir`` below ``<run>/<rel_prefix>/`` ('' = the run) in the background.

        Files already there but absent locally are left alone. Raises NotADirectoryError.
        """
        rel_prefix = rel_prefix.strip("/")
        key = join_key(self.prefix, check_key(rel_prefix) if rel_prefix else "")
        if not Path(local_dir).is_dir():
            raise NotADirectoryError(f"cannot sync {local_dir}: no such folder")
        if is_target(self.storage, key, Path(local_dir)):
            return
        self._enqueue(f"dir:{key}", key, Path(local_dir))

    def _enqueue(self, job: str, key: str, path: Path) -> None:
        with self._lock:
            self._queue.pop(job, None)
            self._queue[job] = (key, path)
            if not self._draining:
                self._draining = True
                self._futures.append(self._worker.submit(self._drain))

    def _drain(self) -> None:
        """Run queued jobs until the queue is empty; record failures."""
        while True:
            with self._lock:
                if not self._queue:
                    self._draining = False
                    return
                job = next(iter(self._queue))
                key, path = self._queue.pop(job)
            try:
                if job.startswith("dir:"):
                    for rel in local_files(path):
                        self._send(join_key(key, rel), path / rel)
                else:
                    self._send(key, path)
            except Exception as exc:
                error = StorageError(f"run file {key} was not saved to {self.storage.display(key)}: {exc}")
                with self._lock:
                    self._errors.append(error)

    def _send(self, key: str, path: Path) -> None:
        """Upload one file with retries (a snapshot of its bytes when small)."""
        if path.stat().st_size <= _SNAPSHOT_LIMIT:
            data = path.read_bytes()
            action: Callable[[], Any] = lambda: self.storage.put_bytes(key, data)  # noqa: E731
        else:
            action = lambda: self.storage.put_file(key, path)  # noqa: E731
        with_retries(action, what=f"uploading {key}", policy=self._retry, log=lambda m: self._log(redact(m)))

    def wait(self) -> None:
        """Block until every queued upload is done; raise StorageError for the first that failed."""
        while True:
            with self._lock:
                pending = [f for f in self._futures if not f.done()]
                self._futures = pending
                if not pending and not self._draining:
                    errors, self._errors = self._errors, []
                    break
            wait_futures(pending)
        for extra in errors[1:]:
            self._log(redact(f"also failed: {extra}"))
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Wait for the uploads and stop the worker thread; raises like ``wait``."""
        try:
            self.wait()
        finally:
            self._worker.shutdown(wait=True)
