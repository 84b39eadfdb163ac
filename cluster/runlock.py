"""One writer per run prefix: a lease object `<run>/LOCK.json` with a heartbeat.

S3 has no locks, so this is a lease. The owner rewrites the object every `heartbeat_s`. Another
job that finds the lease refuses to start, naming the owner, unless the owner is provably gone:

- its heartbeat is older than `ttl_s` (its writer stopped: the resume-after-preemption case), or
- it ran on this machine, in this process namespace, and its process is dead (`os.kill(pid, 0)`
  finds no such process, or a zombie, or a new process that reused the pid): a hard-killed local
  run's rerun does not wait for the expiry.
- or the launcher says so (`gone`): on Ray, a lease written by a worker of a Ray job that this
  cluster lists as ended (its driver was killed, the job resubmitted) is taken over at once,
  wherever that worker ran.

Either way the new job takes the lease over at once and logs one line naming the old owner. A
lease whose owner id is this job's own is always ours: a Ray worker group that Ray restarts keeps
the run's owner id (the launcher sets `run.owner` once), while its rank 0, the process writing
the lease, has a new pid, maybe on another node.

"Same machine" means the same host name, kernel boot (`/proc/sys/kernel/random/boot_id`) and pid
namespace (`/proc/self/ns/pid`) where the system has them: containers with host networking share
the host name but not the pids, so a pid is only looked up where it means the same process. A
lease from a restarted container (a new pid namespace) therefore waits for its expiry.

Taking the lease is atomic where the storage can write conditionally: create with "if absent"
(`put_if_absent`), replace a dead owner's lease with "if unchanged" (`replace_if` on the version
that was read), and the heartbeat replaces only its own version. Of several jobs started
together exactly one wins; the others re-read, find a live lease and are refused. Where the
storage cannot (an S3 server that ignores or refuses `If-None-Match`/`If-Match`, a file system
without hard links or file locks), the lease falls back to check-then-write and logs once that
two jobs started within the same second could both pass: both read "no live lease", both write,
the later write stays, and both train until the loser's next heartbeat (at most `heartbeat_s`)
finds the lease taken and logs that it lost it.

Fencing: a holder that cannot renew (cut off from storage) stops itself one heartbeat before its
lease could expire: at `ttl_s - heartbeat_s` after its last renewal it sets `lost` and calls
`on_lost`, so the run stops (and writes no further checkpoint) before another job may take the
lease over, rather than learning of a takeover at its next successful heartbeat.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .keys import join_key
from .storage import ConditionalWriteUnsupported, Storage, StorageError, Versioned

LOCK = "LOCK.json"
ACQUIRE_ATTEMPTS = 8  # each lost race re-reads the lease; more losses than this mean a storm of writers

_log = logging.getLogger("raytag")
_warned: set[str] = set()  # storages already told that they fall back to check-then-write
_warned_lock = threading.Lock()


class RunLockedError(StorageError):
    """Another live job writes this run."""


def new_owner() -> str:
    """An owner id for one job (host, pid and a random part, readable in the error message)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _machine() -> dict[str, str | None]:
    """What makes a pid meaningful: host name, kernel boot and pid namespace (None where unknown)."""
    try:
        pid_ns: str | None = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = None
    return {
        "host": socket.gethostname(),
        "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
        "pid_ns": pid_ns,
    }


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of ``pid`` from /proc, or None."""
    text = _read_text(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def process_gone(pid: int, started: int | None = None) -> bool:
    """True when no live process ``pid`` of this namespace is the one that started at ``started``.

    Gone: ``os.kill(pid, 0)`` raises ProcessLookupError, the process is a zombie, or (when
    ``started``, the /proc start time, is given) a different process now has the pid.
    PermissionError means it exists under another user: alive. Never true for pid <= 0.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return False
    state, start = stat
    return state in ("Z", "X") or (started is not None and start != started)


class RunLock:
    """The lease of one run (see the module docstring). ``log`` receives the one-line notices:
    takeovers, the check-then-write fallback, a lost lease (default: the "raytag" logger)."""

    def __init__(
        self,
        storage: Storage,
        run_prefix: str,
        owner: str,
        ttl_s: float = 300,
        heartbeat_s: float = 60,
        log: Callable[[str], Any] | None = None,
        info: dict[str, Any] | None = None,
        gone: Callable[[dict[str, Any]], str | None] | None = None,
        on_lost: Callable[[str], Any] | None = None,
    ):
        self.storage, self.key, self.owner = storage, join_key(run_prefix, LOCK), owner
        self.info = dict(info or {})  # extra fields written into the lease (the Ray job id)
        self.gone = gone  # a judge of a lease's owner beyond this machine: why it is gone, or None
        self.run_prefix = run_prefix
        self.ttl_s, self.heartbeat_s = ttl_s, heartbeat_s
        self._log = log or _log.warning
        self._version: str | None = None  # our lease's version; None: not held, or no conditional writes
        self._atomic = True
        self.lost: str | None = None  # set by the heartbeat when another job took the lease, or on fencing
        self.on_lost = on_lost  # called once with `lost` (the run stops itself)
        # Renewals that fail for this long fence the holder: one heartbeat before the lease may expire.
        self.fence_s = max(ttl_s - heartbeat_s, heartbeat_s)
        self._renewed_at = time.monotonic()  # when the last written heartbeat was stamped
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ reading and judging

    def _body(self) -> bytes:
        pid = os.getpid()
        stat = _proc_stat(pid)
        body = {**self.info, "owner": self.owner, "heartbeat": time.time(), **_machine(), "pid": pid}
        body["pid_start"] = stat[1] if stat else None
        return json.dumps(body).encode()

    def _read(self) -> tuple[Versioned | None, dict[str, Any] | None]:
        """The stored lease and its parsed content (None for a torn or foreign object)."""
        current = self.storage.get_versioned(self.key)
        if current is None:
            return None, None
        try:
            lease = json.loads(current.data)
        except ValueError:
            return current, None
        return current, lease if isinstance(lease, dict) else None

    def _verdict(self, lease: dict[str, Any] | None) -> str | None:
        """Why ``lease`` may be taken over (one line for the log); '' when it is ours; raise
        RunLockedError when another live job holds it; None when there is no lease."""
        if lease is None:
            return "an unreadable lease object: replacing it"
        owner = lease.get("owner")
        if owner == self.owner:
            return ""
        try:
            age = time.time() - float(lease.get("heartbeat", 0))
        except (TypeError, ValueError):
            age = float("inf")
        if age >= self.ttl_s:
            return f"taking over the lease of {owner}: its last heartbeat is {age:.0f} s old (expiry {self.ttl_s:.0f} s)"
        pid = lease.get("pid")
        here = _machine()
        same_machine = all(lease.get(k) == v for k, v in here.items())
        started = lease.get("pid_start")
        if (
            same_machine
            and isinstance(pid, int)
            and process_gone(pid, started if isinstance(started, int) else None)
        ):
            return (
                f"taking over the lease of {owner}: its process {pid} on this host ({here['host']}) is gone "
                f"(last heartbeat {age:.0f} s ago)"
            )
        why = self.gone(lease) if self.gone is not None else None
        if why:
            return f"taking over the lease of {owner}: {why} (last heartbeat {age:.0f} s ago)"
        raise RunLockedError(
            f"run {self.storage.display(self.run_prefix)} is being written by another job "
            f"({owner}, last heartbeat {age:.0f} s ago); wait for it to finish, use "
            f"another run.name, or delete {LOCK} if that job is gone"
        )

    def check(self) -> None:
        """Raise RunLockedError when another job's lease is alive (takes nothing, logs nothing)."""
        _current, lease = self._read()
        if lease is not None:
            self._verdict(lease)

    # ------------------------------------------------------------------ taking, keeping, releasing

    def acquire(self) -> None:
        """Take the lease and keep it alive (heartbeat thread).

        Raises RunLockedError when another job's lease is alive, or when the lease changed
        under us ``ACQUIRE_ATTEMPTS`` times in a row; StorageError when the storage fails.
        """
        try:
            self._acquire_atomic()
        except ConditionalWriteUnsupported as exc:
            self._atomic = False
            self._warn_fallback(exc)
            self._acquire_check_then_write()
        self._thread = threading.Thread(target=self._beat, name="raytag-runlock", daemon=True)
        self._thread.start()

    def _acquire_atomic(self) -> None:
        self._renewed_at = time.monotonic()
        for _ in range(ACQUIRE_ATTEMPTS):
            current, lease = self._read()
            if current is None:
                self._version = self.storage.put_if_absent(self.key, self._body())
                if self._version is not None:
                    return
                continue  # another job created it first: judge its lease
            why = self._verdict(lease)
            self._version = self.storage.replace_if(self.key, self._body(), current.version)
            if self._version is not None:
                if why:
                    self._log(f"run {self.storage.display(self.run_prefix)}: {why}")
                return
            # it changed between our read and our write: another job was faster; judge again
        raise RunLockedError(
            f"run {self.storage.display(self.run_prefix)}: its {LOCK} changed {ACQUIRE_ATTEMPTS} times while "
            "this job tried to take it; several jobs are starting on this run at once"
        )

    def _acquire_check_then_write(self) -> None:
        self._renewed_at = time.monotonic()
        current, lease = self._read()
        why = self._verdict(lease) if current is not None else ""
        self.storage.put_bytes(self.key, self._body())
        if why:
            self._log(f"run {self.storage.display(self.run_prefix)}: {why}")

    def _warn_fallback(self, exc: ConditionalWriteUnsupported) -> None:
        with _warned_lock:
            if self.storage.uri in _warned:
                return
            _warned.add(self.storage.uri)
        self._log(
            f"{exc}; the run lease falls back to check-then-write: two jobs started on the same run "
            "within the same second could both pass (the later write keeps the lease, the other job "
            "logs that it lost it at its next heartbeat)"
        )

    def _beat(self) -> None:
        while True:
            fence_in = self._renewed_at + self.fence_s - time.monotonic()
            if self._stop.wait(max(0.0, min(self.heartbeat_s, fence_in))):
                return
            stamped = time.monotonic()
            try:
                if not self._renew():
                    return
                self._renewed_at = stamped
            except StorageError as exc:  # a missed heartbeat shortens the lease: fence before it can expire
                silent = time.monotonic() - self._renewed_at
                if silent >= self.fence_s:
                    self._fence(silent, exc)
                    return

    def _renew(self) -> bool:
        """Rewrite our lease; False (after logging it) when another job holds it now."""
        if not self._atomic:
            current, lease = self._read()
            if current is not None and (lease or {}).get("owner") != self.owner:
                return self._lose(lease)
            self.storage.put_bytes(self.key, self._body())
            return True
        if self._version is not None:
            version = self.storage.replace_if(self.key, self._body(), self._version)
            if version is not None:
                self._version = version
                return True
        current, lease = self._read()
        if current is None:  # deleted (by hand, or a release racing a takeover): nobody holds it
            self._version = self.storage.put_if_absent(self.key, self._body())
            return True  # if another job created it first, the next beat finds out whose it is
        if lease is not None and lease.get("owner") == self.owner:
            self._version = current.version  # rewritten under our owner id (a restarted worker group)
            return True
        return self._lose(lease)

    def _lose(self, lease: dict[str, Any] | None) -> bool:
        who = (lease or {}).get("owner", "an unreadable lease")
        self.lost = f"run {self.storage.display(self.run_prefix)}: lost the lease to {who}"
        self._log(f"{self.lost}; this job stops renewing it (two jobs may now write the run)")
        if self.on_lost is not None:
            self.on_lost(self.lost)
        return False

    def _fence(self, silent: float, exc: BaseException) -> None:
        self.lost = (
            f"run {self.storage.display(self.run_prefix)}: the lease could not be renewed for {silent:.0f} s "
            f"(expiry {self.ttl_s:.0f} s; last error: {exc}); this job stops before another may take it over"
        )
        self._log(self.lost)
        if self.on_lost is not None:
            self.on_lost(self.lost)

    def stop_heartbeat(self) -> None:
        """Stop renewing without giving the lease up (the Ray driver hands it to its workers, which
        hold it under the same owner id)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours; storage errors are ignored."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            _current, lease = self._read()
            if lease is not None and lease.get("owner") == self.owner:
                self.storage.delete(self.key)
        except StorageError:
            pass
