"""One writer per run prefix: a lease object `<run>/LOCK.json` with a heartbeat.

S3 has no locks, so this is a lease: the owner rewrites the object every `heartbeat_s`;
another job that finds a lease younger than `ttl_s` with a different owner refuses to start
(naming the owner), and one that finds an older lease takes over (its writer is gone: that is
the resume-after-preemption case). A restarted Ray worker group keeps the same owner id, so
Ray's own retries are never refused. The check-then-write is not atomic; two jobs started
within the same second can both pass, which the lease narrows but cannot rule out on S3.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from .storage import Storage, StorageError, join_key

LOCK = "LOCK.json"


class RunLockedError(StorageError):
    """Another live job writes this run."""


def new_owner() -> str:
    """An owner id for one job (host, pid and a random part, readable in the error message)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class RunLock:
    def __init__(
        self, storage: Storage, run_prefix: str, owner: str, ttl_s: float = 300, heartbeat_s: float = 60
    ):
        self.storage, self.key, self.owner = storage, join_key(run_prefix, LOCK), owner
        self.ttl_s, self.heartbeat_s = ttl_s, heartbeat_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        raw = self.storage.get_bytes(self.key)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return None  # a torn or foreign object: treat as no lease

    def _write(self) -> None:
        body = {
            "owner": self.owner,
            "heartbeat": time.time(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        self.storage.put_bytes(self.key, json.dumps(body).encode())

    def check(self) -> None:
        """Raise RunLockedError when another job's lease is alive (takes nothing)."""
        current = self._read()
        if current and current.get("owner") != self.owner:
            age = time.time() - float(current.get("heartbeat", 0))
            if age < self.ttl_s:
                raise RunLockedError(
                    f"run {self.storage.display(self.key.rsplit('/', 1)[0])} is being written by another job "
                    f"({current.get('owner')}, last heartbeat {age:.0f} s ago); wait for it to finish, use "
                    f"another run.name, or delete {LOCK} if that job is gone"
                )

    def acquire(self) -> None:
        """Take the lease and keep it alive; raises RunLockedError when another job's lease is alive."""
        self.check()
        self._write()
        self._thread = threading.Thread(target=self._beat, name="raytag-runlock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._write()
            except StorageError:
                pass  # a missed heartbeat only shortens the lease; uploads report real outages

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            current = self._read()
            if current and current.get("owner") == self.owner:
                self.storage.delete(self.key)
        except StorageError:
            pass
