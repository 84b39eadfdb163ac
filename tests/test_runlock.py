"""The run lease (`cluster/runlock.py`) on a local folder and on a real S3 server: takeover of a
dead or expired owner, refusal of a live one, and races that only one job may win."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from raytag.cluster.local_storage import LocalStorage
from raytag.cluster.runlock import LOCK, RunLock, RunLockedError, _machine, _proc_stat, process_gone
from raytag.cluster.s3_storage import S3Storage
from raytag.cluster.storage import ConditionalWriteUnsupported, Storage, StorageError, Versioned
from tests.s3_server import S3TestServer

RUN = "runs/r1"
KEY = f"{RUN}/{LOCK}"

# A job that takes the lease, says so, and then waits to be killed.
HOLDER = """
import sys, time
from raytag.cluster.runlock import RunLock
from raytag.cluster.storage import open_storage
lock = RunLock(open_storage(sys.argv[1]), sys.argv[2], sys.argv[3])
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, str]]:
    """A storage URI (a folder, or a fresh bucket on the test server) and the environment that reaches it."""
    if request.param == "local":
        return str(tmp_path / "store"), {}
    server: S3TestServer = request.getfixturevalue("s3_server")
    return f"s3://{server.make_bucket('lease')}/team", server.aws_env()


def open_where(where: tuple[str, dict[str, str]]) -> Storage:
    uri, env = where
    if not env:
        return LocalStorage(uri)
    bucket, prefix = uri[len("s3://") :].split("/", 1)
    return S3Storage(
        bucket,
        prefix,
        endpoint_url=env["AWS_ENDPOINT_URL_S3"],
        region=env["AWS_REGION"],
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
    )


@pytest.fixture
def storage(where: tuple[str, dict[str, str]]) -> Storage:
    return open_where(where)


def lease(storage: Storage) -> dict[str, Any]:
    raw = storage.get_bytes(KEY)
    assert raw is not None
    return json.loads(raw)


def write_lease(storage: Storage, owner: str, pid: int, age_s: float = 0.0, **fields: Any) -> None:
    """A lease as another job on this machine wrote it (``fields`` override the machine's)."""
    stat = _proc_stat(pid)
    body = {"owner": owner, "heartbeat": time.time() - age_s, **_machine(), "pid": pid}
    body["pid_start"] = stat[1] if stat else None
    body.update(fields)
    storage.put_bytes(KEY, json.dumps(body).encode())


def start_holder(where: tuple[str, dict[str, str]], owner: str) -> subprocess.Popen:
    """A separate process that holds the run's lease (as ``owner``) until it is killed."""
    uri, env = where
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, uri, RUN, owner],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "held":
        proc.kill()
        raise AssertionError(f"the lease holder did not start: {line}{proc.communicate()[1]}")
    return proc


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process of this machine that has exited and been reaped."""
    proc = subprocess.Popen(["sleep", "0"])
    proc.wait()
    return proc.pid


@pytest.fixture
def live_pid():
    proc = subprocess.Popen(["sleep", "30"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- owners alive and gone


def test_process_gone(dead_pid: int, live_pid: int) -> None:
    assert process_gone(dead_pid)
    assert not process_gone(live_pid)
    assert not process_gone(os.getpid())
    assert not process_gone(0) and not process_gone(-1)  # never "gone": kill(0) means the process group
    stat = _proc_stat(live_pid)
    if stat is not None:  # Linux: a pid now used by a process other than the recorded one
        assert not process_gone(live_pid, stat[1])
        assert process_gone(live_pid, stat[1] + 1)


def test_a_killed_jobs_lease_is_taken_over_at_once(where, storage, caplog) -> None:
    holder = start_holder(where, "killed-job")
    pid = holder.pid
    try:
        assert lease(storage)["owner"] == "killed-job" and lease(storage)["pid"] == pid
        with pytest.raises(
            RunLockedError, match=r"being written by another job \(killed-job, last heartbeat"
        ):
            RunLock(storage, RUN, "new-job").acquire()  # alive: refused
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate()
    assert lease(storage)["owner"] == "killed-job"  # SIGKILL: nothing released it

    caplog.set_level("INFO", logger="raytag")
    lock = RunLock(storage, RUN, "new-job")  # as RunStore.open makes it: no log argument
    start = time.monotonic()
    lock.check()
    lock.acquire()
    try:
        assert time.monotonic() - start < 5  # not the 300 s expiry
        assert lease(storage)["owner"] == "new-job" and lease(storage)["pid"] == os.getpid()
        lines = [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()]
        assert len(lines) == 1, lines
        assert f"taking over the lease of killed-job: its process {pid} on this host" in lines[0]
    finally:
        lock.release()
    assert storage.get_bytes(KEY) is None


def test_a_live_process_lease_is_refused(storage, live_pid) -> None:
    write_lease(storage, "other-job", live_pid)
    before = storage.get_bytes(KEY)
    logs: list[str] = []
    with pytest.raises(RunLockedError, match=r"by another job \(other-job, last heartbeat 0 s ago\)"):
        RunLock(storage, RUN, "new-job", log=logs.append).acquire()
    with pytest.raises(RunLockedError):
        RunLock(storage, RUN, "new-job").check()
    assert storage.get_bytes(KEY) == before and logs == []


def test_a_dead_pid_counts_only_on_the_same_machine(storage, dead_pid) -> None:
    """Another host, kernel boot or pid namespace (a container with host networking): the pid
    says nothing here, so only the expiry frees the lease."""
    for other in ({"host": "elsewhere"}, {"boot_id": "another-boot"}, {"pid_ns": "pid:[1]"}):
        write_lease(storage, "other-job", dead_pid, **other)
        with pytest.raises(RunLockedError, match=r"other-job"):
            RunLock(storage, RUN, "new-job").acquire()
    write_lease(storage, "other-job", dead_pid)
    lock = RunLock(storage, RUN, "new-job", log=(logs := []).append)
    lock.acquire()
    lock.release()
    assert len(logs) == 1 and f"its process {dead_pid} on this host" in logs[0]


def test_an_expired_heartbeat_is_taken_over(storage) -> None:
    write_lease(storage, "far-job", 42, age_s=299, host="far-host")
    with pytest.raises(RunLockedError, match="far-job"):
        RunLock(storage, RUN, "new-job", ttl_s=300).acquire()
    write_lease(storage, "far-job", 42, age_s=301, host="far-host")
    logs: list[str] = []
    lock = RunLock(storage, RUN, "new-job", ttl_s=300, log=logs.append)
    lock.check()
    lock.acquire()
    lock.release()
    assert len(logs) == 1
    assert "taking over the lease of far-job: its last heartbeat is 301 s old (expiry 300 s)" in logs[0]


def test_the_same_owner_is_never_a_stranger(storage, live_pid) -> None:
    """A worker group that Ray restarted: rank 0 has a new pid (maybe on another node), the owner is the run's."""
    for pid, host in ((live_pid, None), (4242, "another-node")):
        write_lease(storage, "ray-run-owner", pid, **({"host": host} if host else {}))
        logs: list[str] = []
        lock = RunLock(storage, RUN, "ray-run-owner", log=logs.append)
        lock.check()
        lock.acquire()
        assert lease(storage)["pid"] == os.getpid() and logs == []
        lock.release()
        assert storage.get_bytes(KEY) is None


def test_an_unreadable_lease_is_replaced(storage) -> None:
    storage.put_bytes(KEY, b"{torn")
    logs: list[str] = []
    lock = RunLock(storage, RUN, "new-job", log=logs.append)
    lock.check()
    lock.acquire()
    lock.release()
    assert len(logs) == 1 and "unreadable lease" in logs[0]


# --------------------------------------------------------------------------- heartbeat and release


def test_heartbeat_renews_and_notices_a_lost_lease(storage) -> None:
    logs: list[str] = []
    lock = RunLock(storage, RUN, "job-a", heartbeat_s=0.05, log=logs.append)
    lock.acquire()
    try:
        first = lease(storage)["heartbeat"]
        deadline = time.monotonic() + 10
        while lease(storage)["heartbeat"] == first and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lease(storage)["heartbeat"] > first  # renewed
        write_lease(storage, "job-b", 4242, host="elsewhere")  # taken over behind job-a's back
        while lock.lost is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lock.lost is not None and "lost the lease to job-b" in lock.lost
        time.sleep(0.2)
        assert (
            lease(storage)["owner"] == "job-b"
        )  # job-a stopped renewing: it never writes job-b's lease back
        assert sum("lost the lease" in line for line in logs) == 1
    finally:
        lock.release()
    assert lease(storage)["owner"] == "job-b"  # release deletes only its own lease


class CutOff:
    """A LocalStorage whose every read and write fails (a transient StorageError) once `cut` is set."""

    IO = {
        "get_bytes",
        "put_bytes",
        "get_versioned",
        "put_if_absent",
        "replace_if",
        "delete",
        "exists",
        "list",
    }

    def __init__(self, inner: LocalStorage) -> None:
        self.inner, self.cut = inner, False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in self.IO:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.cut:
                raise StorageError("cannot reach the endpoint (connection refused)", transient=True)
            return attr(*args, **kwargs)

        return call


def test_a_holder_cut_off_from_storage_fences_itself_before_its_lease_can_expire(tmp_path: Path) -> None:
    """No renewal reaches storage: one heartbeat before the TTL runs out the holder marks the lease
    lost and tells the run (on_lost), while nobody else could yet take it over."""
    storage = CutOff(LocalStorage(tmp_path / "store"))
    told: list[str] = []
    lock = RunLock(
        storage, RUN, "job-a", ttl_s=1.2, heartbeat_s=0.2, log=(logs := []).append, on_lost=told.append
    )
    lock.acquire()
    try:
        time.sleep(0.5)  # a few renewals go through
        storage.cut = True
        deadline = time.monotonic() + 10
        while lock.lost is None and time.monotonic() < deadline:
            time.sleep(0.01)
        fenced_at = time.time()
        stored = json.loads(storage.inner.get_bytes(KEY))
        assert (
            lock.lost is not None
            and "could not be renewed" in lock.lost
            and "connection refused" in lock.lost
        )
        assert told == [lock.lost] and logs == [lock.lost]
        age = fenced_at - stored["heartbeat"]
        assert 1.2 - 0.2 - 0.15 <= age < 1.2  # at the fence (TTL - one heartbeat), before the expiry
    finally:
        storage.cut = False
        lock.release()


def test_heartbeat_recreates_a_deleted_lease(storage) -> None:
    lock = RunLock(storage, RUN, "job-a", heartbeat_s=0.05, log=(logs := []).append)
    lock.acquire()
    try:
        storage.delete(KEY)
        deadline = time.monotonic() + 10
        while storage.get_bytes(KEY) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lease(storage)["owner"] == "job-a" and lock.lost is None and logs == []
    finally:
        lock.release()


# --------------------------------------------------------------------------- races


def race(storages: list[Storage], run: str, **kwargs: Any) -> tuple[list[RunLock], list[str]]:
    """Each storage's RunLock (owner ``job-i``) acquires at once; the winners and every log line."""
    barrier = threading.Barrier(len(storages))
    winners: list[RunLock] = []
    logs: list[str] = []
    errors: list[BaseException] = []

    def go(i: int) -> None:
        lock = RunLock(storages[i], run, f"job-{i}", log=logs.append, **kwargs)
        barrier.wait()
        try:
            lock.acquire()
            winners.append(lock)
        except RunLockedError:
            pass
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(storages))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    for lock in winners:
        lock.release()
    return winners, logs


def rounds_for(storage: Storage) -> tuple[int, int]:
    """(jobs, rounds): SeaweedFS serialises a contended conditional write with a ~1 s lock wait."""
    return (3, 4) if isinstance(storage, S3Storage) else (6, 25)


def test_jobs_starting_together_never_both_win(where, storage) -> None:
    jobs, rounds = rounds_for(storage)
    storages = [open_where(where) for _ in range(jobs)]
    for n in range(rounds):
        winners, logs = race(storages, f"runs/race-{n}")
        assert len(winners) == 1, f"round {n}: {len(winners)} winners"
        assert logs == []


def test_jobs_taking_over_a_dead_lease_together_never_both_win(where, storage, dead_pid) -> None:
    jobs, rounds = rounds_for(storage)
    storages = [open_where(where) for _ in range(jobs)]
    for n in range(rounds):
        run = f"runs/takeover-{n}"
        body = {"owner": "dead-job", "heartbeat": time.time(), **_machine(), "pid": dead_pid}
        storage.put_bytes(f"{run}/{LOCK}", json.dumps(body).encode())
        winners, logs = race(storages, run)
        assert len(winners) == 1, f"round {n}: {len(winners)} winners"
        assert len(logs) == 1 and "taking over the lease of dead-job" in logs[0], logs


# --------------------------------------------------------------------------- conditional writes


def test_conditional_writes(storage) -> None:
    assert storage.get_versioned("a/x") is None
    v1 = storage.put_if_absent("a/x", b"one")
    assert v1 and storage.put_if_absent("a/x", b"two") is None
    assert storage.get_versioned("a/x") == Versioned(b"one", v1)
    assert storage.replace_if("a/x", b"three", "not-the-version") is None
    v3 = storage.replace_if("a/x", b"three", v1)
    assert v3 and v3 != v1 and storage.get_bytes("a/x") == b"three"
    assert storage.replace_if("a/x", b"four", v1) is None  # stale version
    assert storage.get_versioned("a/x") == Versioned(b"three", v3)
    storage.delete("a/x")
    assert storage.replace_if("a/x", b"five", v3) is None  # gone
    assert storage.get_bytes("a/x") is None
    assert storage.list("") == []  # no probe objects, temporary files or lock files left in listings


def test_local_folder_without_hard_links_falls_back_and_says_so(tmp_path, monkeypatch) -> None:
    storage = LocalStorage(tmp_path)

    def no_link(src: Any, dst: Any) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    with pytest.raises(ConditionalWriteUnsupported, match="no hard links"):
        storage.put_if_absent("x", b"1")
    logs: list[str] = []
    for owner in ("job-a", "job-a"):  # the second lock on the same storage: no second notice
        lock = RunLock(storage, RUN, owner, log=logs.append)
        lock.acquire()
        lock.release()
    assert len(logs) == 1
    assert (
        "falls back to check-then-write: two jobs started on the same run within the same second" in logs[0]
    )


@pytest.mark.integration
def test_s3_probe_spots_a_server_that_ignores_conditions(s3_server: S3TestServer) -> None:
    """Conditions dropped on the way (as a server that ignores them would): the probe says so."""
    where = (f"s3://{s3_server.make_bucket('lease')}/team", s3_server.aws_env())
    honest = open_where(where)
    assert isinstance(honest, S3Storage) and honest.conditional_writes() == (True, "")
    deaf = open_where(where)
    assert isinstance(deaf, S3Storage)

    def drop_conditions(request: Any, **_: Any) -> None:
        for header in ("If-None-Match", "If-Match"):
            if header in request.headers:
                del request.headers[header]

    deaf._client.meta.events.register("before-sign.s3.PutObject", drop_conditions)
    honoured, why = deaf.conditional_writes()
    assert not honoured and why == "PutObject with If-None-Match: * overwrote an existing object"
    with pytest.raises(ConditionalWriteUnsupported, match="does not honour conditional writes"):
        deaf.put_if_absent("x", b"1")
    logs: list[str] = []
    lock = RunLock(deaf, RUN, "job-a", log=logs.append)
    lock.acquire()
    assert lease(deaf)["owner"] == "job-a"
    lock.release()
    assert len(logs) == 1 and "falls back to check-then-write" in logs[0]
    assert deaf.list("") == []  # the probe object is gone
