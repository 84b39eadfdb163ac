"""Storage and checkpoints on a local folder: fast unit tests, no server."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from raytag.cluster import local_storage as local_storage_mod
from raytag.cluster.checkpoints import (
    MANIFEST,
    CheckpointInfo,
    CheckpointStore,
    CheckpointUploadError,
    CheckpointVerifyError,
    checkpoint_name,
    select_keep,
)
from raytag.cluster.keys import is_remote
from raytag.cluster.local_storage import LocalStorage
from raytag.cluster.retry import RetryPolicy, with_retries
from raytag.cluster.run_files import RunFiles
from raytag.cluster.s3_storage import S3Storage
from raytag.cluster.secrets import redact
from raytag.cluster.storage import StorageError, open_storage

RUN = "runs/demo"


class Wrapped:
    """A LocalStorage seen through hooks: fail or block chosen keys, record calls, hide local paths."""

    def __init__(self, inner: LocalStorage, *, hide_local: bool = False) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.hide_local = hide_local
        self.calls: list[tuple[str, str]] = []
        self.fail: dict[str, list[Exception]] = {}  # key suffix -> errors to raise, one per call
        self.block: dict[str, threading.Event] = {}  # key suffix -> event to wait for

    def _hook(self, op: str, key: str) -> None:
        self.calls.append((op, key))
        for suffix, event in self.block.items():
            if key.endswith(suffix):
                assert event.wait(10)
        for suffix, errors in self.fail.items():
            if key.endswith(suffix) and errors:
                raise errors.pop(0)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._hook("put_bytes", key)
        self.inner.put_bytes(key, data)

    def put_file(self, key: str, path: Path) -> None:
        self._hook("put_file", key)
        self.inner.put_file(key, path)

    def get_file(self, key: str, path: Path) -> bool:
        self._hook("get_file", key)
        return self.inner.get_file(key, path)

    def local_path(self, key: str) -> Path | None:
        return None if self.hide_local else self.inner.local_path(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def make_checkpoint(folder: Path, step: int, size: int = 1000) -> Path:
    """A fake DeepSpeed-like checkpoint folder with a few files."""
    (folder / "global_step").mkdir(parents=True, exist_ok=True)
    (folder / "global_step" / "mp_rank_00_model_states.pt").write_bytes(os.urandom(size))
    (folder / "global_step" / "zero_pp_rank_0_optim_states.pt").write_bytes(os.urandom(size // 2))
    (folder / "progress.json").write_text(json.dumps({"step": step}))
    return folder


def fast_store(storage: Any, **kwargs: Any) -> tuple[CheckpointStore, list[str]]:
    logs: list[str] = []
    kwargs.setdefault("backoff_s", 0.01)
    store = CheckpointStore(storage, RUN, log=logs.append, **kwargs)
    return store, logs


# --------------------------------------------------------------------------- LocalStorage


def test_local_put_get_list_delete(tmp_path: Path) -> None:
    st = LocalStorage(tmp_path / "root")
    st.put_bytes("a/b.txt", b"one")
    st.put_bytes("a/c/d.txt", b"two")
    st.put_bytes("a10/x", b"three")
    src = tmp_path / "src.bin"
    src.write_bytes(b"file")
    st.put_file("f/src.bin", src)
    assert st.get_bytes("a/b.txt") == b"one"
    assert st.get_bytes("missing") is None
    assert st.exists("a/c/d.txt") and not st.exists("a") and not st.exists("nope")
    assert st.list("a") == ["a/b.txt", "a/c/d.txt"]  # a folder: a10/ is not below a/
    assert st.list("") == ["a/b.txt", "a/c/d.txt", "a10/x", "f/src.bin"]
    assert st.list_sizes("a/c") == {"a/c/d.txt": 3}
    assert st.get_file("f/src.bin", tmp_path / "out" / "copy.bin") is True
    assert (tmp_path / "out" / "copy.bin").read_bytes() == b"file"
    assert st.get_file("f/none", tmp_path / "none") is False
    st.delete_prefix("a")
    assert st.list("") == ["a10/x", "f/src.bin"]
    st.delete("a10/x")
    st.delete("a10/x")  # missing is fine
    st.delete_prefix("never/was")
    assert st.list("") == ["f/src.bin"]
    assert st.local_path("f/src.bin") == (tmp_path / "root" / "f" / "src.bin").resolve()
    for bad in ["", "/abs", "a/../b", "a//b"]:
        with pytest.raises(ValueError):
            st.put_bytes(bad, b"x")


def test_local_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = LocalStorage(tmp_path)
    st.put_bytes("k/v.json", b"old")

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(local_storage_mod.os, "replace", broken_replace)
    with pytest.raises(StorageError, match=str(tmp_path)) as info:
        st.put_bytes("k/v.json", b"new content")
    assert "No space left" in str(info.value)
    src = tmp_path / "big.bin"
    src.write_bytes(b"x" * 10)
    with pytest.raises(StorageError):
        st.put_file("k/big.bin", src)
    monkeypatch.undo()
    assert st.get_bytes("k/v.json") == b"old"  # the old content survived
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["v.json"]  # no temp files left


def test_put_file_onto_itself_is_a_noop(tmp_path: Path) -> None:
    st = LocalStorage(tmp_path)
    st.put_bytes("m/metrics.jsonl", b"{}\n")
    path = st.local_path("m/metrics.jsonl")
    assert path is not None
    before = path.stat().st_mtime_ns, path.stat().st_ino
    time.sleep(0.01)
    st.put_file("m/metrics.jsonl", path)
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == before
    assert st.get_file("m/metrics.jsonl", path) is True


def test_local_preflight(tmp_path: Path) -> None:
    LocalStorage(tmp_path / "new" / "folder").preflight()
    assert (tmp_path / "new" / "folder").is_dir()
    assert list((tmp_path / "new" / "folder").iterdir()) == []
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StorageError, match="cannot write to folder"):
        LocalStorage(tmp_path / "file" / "sub").preflight()


def test_open_storage_and_is_remote(tmp_path: Path) -> None:
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    assert open_storage(f"file://{tmp_path}").uri == str(tmp_path.resolve())
    s3 = open_storage("s3://bucket/some/prefix", endpoint_url="http://127.0.0.1:9", region="us-east-1")
    assert isinstance(s3, S3Storage)
    assert s3.uri == "s3://bucket/some/prefix (endpoint http://127.0.0.1:9)"
    assert s3.local_path("x") is None
    assert is_remote("s3://b/p") and is_remote("S3://b") and not is_remote("/tmp/x") and not is_remote("runs")
    with pytest.raises(StorageError, match="unsupported storage URI"):
        open_storage("gs://bucket/x")
    with pytest.raises(StorageError):
        open_storage("s3:///nobucket")


def test_redact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-123")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token-456")
    assert redact("a env-secret-123 b token-456 c passed-789", "passed-789") == "a *** b *** c ***"
    S3Storage("bkt", endpoint_url="http://127.0.0.1:9", access_key="AK", secret_key="ctor-secret-42")
    assert redact("x ctor-secret-42 y") == "x *** y"
    assert "env-secret-123" not in str(StorageError("oops env-secret-123"))


def test_s3_preflight_fails_fast_without_a_server() -> None:
    secret = "unit-secret-value-0123456789"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free: nothing listens after the with-block
    st = S3Storage("bkt", "p", endpoint_url=f"http://127.0.0.1:{port}", access_key="ak", secret_key=secret)
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        st.preflight()
    assert time.monotonic() - start < 30
    assert (
        str(info.value)
        == f"cannot reach S3 endpoint http://127.0.0.1:{port} for bucket 'bkt': connection refused"
    )
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        st = S3Storage(
            "bkt", "p", endpoint_url=endpoint, secret_key=secret, access_key="ak", read_timeout=0.3
        )
        with pytest.raises(StorageError, match="no answer before the read timeout") as info2:
            st.preflight()
    for text in (str(info.value), repr(info.value), str(info2.value), repr(st), st.uri):
        assert secret not in text


def test_with_retries_retries_only_transient() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise StorageError("endpoint down", transient=True)
        return "ok"

    logs: list[str] = []
    assert with_retries(flaky, what="x", policy=RetryPolicy(5, 0.001, 0.01), log=logs.append) == "ok"
    assert len(calls) == 3 and len(logs) == 2 and "retrying x" in logs[0]
    calls.clear()
    with pytest.raises(StorageError):
        with_retries(lambda: (_ for _ in ()).throw(StorageError("bad key")), what="y", log=logs.append)
    with pytest.raises(StorageError):
        with_retries(flaky, what="z", policy=RetryPolicy(1, 0.001, 0.01), log=logs.append)
    assert len(calls) == 2


# --------------------------------------------------------------------------- checkpoints


def test_save_writes_manifest_last_and_latest_finds_it(tmp_path: Path) -> None:
    wrapped = Wrapped(LocalStorage(tmp_path / "store"))
    store, logs = fast_store(wrapped)
    src = make_checkpoint(tmp_path / "local" / "a", 10)
    store.save(src, checkpoint_name(10), 10, {"f1": 0.5, "epoch": 1.0})
    store.wait()
    puts = [key for op, key in wrapped.calls if op.startswith("put")]
    assert puts[-1].endswith(f"step-00000010/{MANIFEST}") and len(puts) == 4
    info = store.latest()
    assert info is not None and info.name == "step-00000010" and info.step == 10
    assert info.metrics["f1"] == 0.5 and info.epoch == 1.0 and len(info.files) == 3
    manifest = json.loads(wrapped.get_bytes(f"{RUN}/checkpoints/step-00000010/{MANIFEST}"))
    assert {"name", "step", "epoch", "metrics", "created", "raytag_version", "files"} <= set(manifest)
    assert all(set(f) == {"path", "size", "sha256"} for f in manifest["files"])
    assert any("saved checkpoint step-00000010" in line for line in logs)
    store.close()


def test_failed_upload_writes_no_manifest_and_raises_from_wait(tmp_path: Path) -> None:
    wrapped = Wrapped(LocalStorage(tmp_path / "store"))
    wrapped.fail["progress.json"] = [StorageError("disk on fire")]
    store, _logs = fast_store(wrapped)
    store.save(make_checkpoint(tmp_path / "local" / "a", 5), "step-00000005", 5, {"f1": 0.1})
    with pytest.raises(
        CheckpointUploadError, match=r"checkpoint step-00000005 was not saved to .*disk on fire"
    ):
        store.wait()
    assert not wrapped.exists(f"{RUN}/checkpoints/step-00000005/{MANIFEST}")
    assert store.latest() is None and store.list_complete() == []
    store.wait()  # the error is reported once
    store.save(make_checkpoint(tmp_path / "local" / "b", 6), "step-00000006", 6, {"f1": 0.2}, block=True)
    assert [i.name for i in store.list_complete()] == ["step-00000006"]
    store.close()


def test_background_error_raised_from_next_save_and_block_raises_directly(tmp_path: Path) -> None:
    wrapped = Wrapped(LocalStorage(tmp_path / "store"))
    wrapped.fail["progress.json"] = [StorageError("nope"), StorageError("nope again")]
    store, _ = fast_store(wrapped)
    store.save(make_checkpoint(tmp_path / "a", 1), "step-00000001", 1, {})
    deadline = time.monotonic() + 10
    while not all(f.done() for f in store._futures) and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(CheckpointUploadError, match="step-00000001"):
        store.save(make_checkpoint(tmp_path / "b", 2), "step-00000002", 2, {})
    with pytest.raises(CheckpointUploadError, match="step-00000003"):
        store.save(make_checkpoint(tmp_path / "c", 3), "step-00000003", 3, {}, block=True)
    store.close()


def test_transient_errors_are_retried(tmp_path: Path) -> None:
    wrapped = Wrapped(LocalStorage(tmp_path / "store"))
    wrapped.fail["progress.json"] = [
        StorageError("down", transient=True),
        StorageError("down", transient=True),
    ]
    wrapped.fail[MANIFEST] = [StorageError("down", transient=True)]
    store, logs = fast_store(wrapped, retries=3)
    store.save(make_checkpoint(tmp_path / "a", 7), "step-00000007", 7, {}, block=True)
    assert store.latest() is not None
    assert sum("retrying" in line for line in logs) == 3
    store.close()


def test_save_in_place_writes_only_the_manifest(tmp_path: Path) -> None:
    wrapped = Wrapped(LocalStorage(tmp_path / "store"))
    store, _ = fast_store(wrapped)
    target = wrapped.local_path(f"{RUN}/checkpoints/step-00000020")
    assert target is not None
    make_checkpoint(target, 20)
    store.save(target, "step-00000020", 20, {"f1": 0.3}, block=True)
    assert [op for op, _ in wrapped.calls] == ["put_bytes"]
    info = store.latest()
    assert info is not None and info.step == 20
    assert store.download(info, tmp_path / "unused") == target.resolve()
    assert not (tmp_path / "unused").exists()
    store.close()


def test_latest_skips_broken_checkpoints(tmp_path: Path) -> None:
    st = LocalStorage(tmp_path / "store")
    store, logs = fast_store(st, keep_best=10)
    for step in (1, 2, 3, 4):
        store.save(
            make_checkpoint(tmp_path / f"l{step}", step),
            checkpoint_name(step),
            step,
            {"f1": step / 10},
            block=True,
        )
    base = tmp_path / "store" / RUN / "checkpoints"
    (base / "step-00000004" / MANIFEST).write_text("{not json")
    (base / "step-00000003" / "progress.json").write_text("shorter")
    (base / "step-00000002" / MANIFEST).unlink()
    logs.clear()
    info = store.latest()
    assert info is not None and info.name == "step-00000001"
    text = "\n".join(logs)
    assert "skipping checkpoint step-00000004: corrupt manifest" in text
    assert "skipping checkpoint step-00000003: file progress.json has 7 bytes" in text
    assert "skipping checkpoint step-00000002: no MANIFEST.json" in text
    (base / "step-00000001" / "global_step" / "mp_rank_00_model_states.pt").unlink()
    assert store.latest() is None
    assert "skipping checkpoint step-00000001: file global_step/mp_rank_00_model_states.pt" in "\n".join(logs)
    store.close()


def test_download_verifies_sha256(tmp_path: Path) -> None:
    wrapped = Wrapped(LocalStorage(tmp_path / "store"), hide_local=True)  # forces a real download
    store, _ = fast_store(wrapped)
    store.save(make_checkpoint(tmp_path / "l", 9), "step-00000009", 9, {}, block=True)
    info = store.latest()
    assert info is not None
    out = store.download(info, tmp_path / "dl")
    assert (out / "progress.json").read_text() == json.dumps({"step": 9})
    assert (out / "global_step" / "mp_rank_00_model_states.pt").stat().st_size == 1000
    stored = (
        tmp_path
        / "store"
        / RUN
        / "checkpoints"
        / "step-00000009"
        / "global_step"
        / "mp_rank_00_model_states.pt"
    )
    data = bytearray(stored.read_bytes())
    data[100] ^= 0xFF  # same size, different content
    stored.write_bytes(bytes(data))
    with pytest.raises(CheckpointVerifyError, match="mp_rank_00_model_states.pt is corrupt"):
        store.download(info, tmp_path / "dl2")
    in_place, _ = fast_store(LocalStorage(tmp_path / "store"))
    with pytest.raises(CheckpointVerifyError, match="mp_rank_00_model_states.pt is corrupt"):
        in_place.download(info, tmp_path / "dl3")
    store.close()
    in_place.close()


def test_retention_keeps_latest_and_best_k(tmp_path: Path) -> None:
    st = LocalStorage(tmp_path / "store")
    store, logs = fast_store(st, keep_best=2, metric="f1")
    scores = {1: 0.50, 2: 0.90, 3: 0.70, 4: 0.80, 5: 0.60}
    for step, f1 in scores.items():
        store.save(make_checkpoint(tmp_path / f"l{step}", step, 100), checkpoint_name(step), step, {"f1": f1})
    store.save(make_checkpoint(tmp_path / "l6", 6, 100), checkpoint_name(6), 6, {"loss": 1.0})  # no metric
    store.wait()
    assert [i.step for i in store.list_complete()] == [2, 4, 6]  # best two + latest
    assert any("deleted checkpoint step-00000005" in line for line in logs)
    store.close()


def test_retention_handles_incomplete_and_in_flight(tmp_path: Path) -> None:
    wrapped = Wrapped(LocalStorage(tmp_path / "store"))
    base = tmp_path / "store" / RUN / "checkpoints"
    make_checkpoint(base / "step-00000001", 1)  # crashed leftover, older than the latest: deleted
    make_checkpoint(base / "step-00000099", 99)  # incomplete but newer: kept (someone may be writing)
    store, _ = fast_store(wrapped, keep_best=0)
    store.save(make_checkpoint(tmp_path / "l5", 5), "step-00000005", 5, {"f1": 0.4}, block=True)
    assert not (base / "step-00000001").exists() and (base / "step-00000099").exists()

    release = threading.Event()
    wrapped.block["step-00000002/progress.json"] = release
    store.save(make_checkpoint(tmp_path / "l2", 2), "step-00000002", 2, {"f1": 0.9})
    deadline = time.monotonic() + 5
    while not (base / "step-00000002" / "global_step").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    store.retention()  # step 2 is older than step 5 and incomplete, but this store is uploading it
    assert (base / "step-00000002").exists()
    release.set()
    store.wait()
    assert [i.step for i in store.list_complete()] == [5]  # keep_best=0: only the latest survives
    store.close()


def test_select_keep() -> None:
    def info(step: int, **metrics: Any) -> CheckpointInfo:
        return CheckpointInfo(name=checkpoint_name(step), step=step, metrics=metrics, files=[])

    infos = [info(1, f1=0.9), info(2, f1=0.9), info(3), info(4, f1=float("nan")), info(5, f1=0.1)]
    assert select_keep(infos, 1, "f1") == {"step-00000005", "step-00000002"}
    assert select_keep(infos, 0, "f1") == {"step-00000005"}
    assert select_keep(infos, 3, "f1") == {"step-00000005", "step-00000002", "step-00000001"}
    assert select_keep([], 2, "f1") == set()


# --------------------------------------------------------------------------- RunFiles


def test_run_files_coalesce_and_copy(tmp_path: Path) -> None:
    wrapped = Wrapped(LocalStorage(tmp_path / "store"))
    files = RunFiles(wrapped, RUN, backoff_s=0.01)
    metrics = tmp_path / "out" / "metrics.jsonl"
    metrics.parent.mkdir()
    release = threading.Event()
    wrapped.block["results.json"] = release
    results = tmp_path / "out" / "results.json"
    results.write_text("{}")
    files.sync("results.json", results)  # holds the worker until released
    for i in range(5):
        metrics.write_text("".join(f'{{"step": {j}}}\n' for j in range(i + 1)))
        files.sync("metrics.jsonl", metrics)
    release.set()
    model = tmp_path / "out" / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "w.bin").write_bytes(b"w" * 10)
    files.sync_dir("model", model)
    files.wait()
    puts = [key for op, key in wrapped.calls if key.endswith("metrics.jsonl")]
    assert len(puts) == 1  # five syncs queued behind a busy worker: one upload
    assert wrapped.get_bytes(f"{RUN}/metrics.jsonl") == metrics.read_bytes()
    assert wrapped.list(f"{RUN}/model") == [f"{RUN}/model/config.json", f"{RUN}/model/sub/w.bin"]
    files.close()


def test_run_files_in_place_noop_and_errors(tmp_path: Path) -> None:
    wrapped = Wrapped(LocalStorage(tmp_path / "store"))
    files = RunFiles(wrapped, RUN, retries=1, backoff_s=0.01)
    target = wrapped.local_path(f"{RUN}/metrics.jsonl")
    assert target is not None
    target.parent.mkdir(parents=True)
    target.write_text("{}\n")
    files.sync("metrics.jsonl", target)
    files.sync_dir("", target.parent)
    files.wait()
    assert wrapped.calls == []
    other = tmp_path / "results.json"
    other.write_text("{}")
    wrapped.fail["results.json"] = [
        StorageError("down", transient=True),
        StorageError("down", transient=True),
    ]
    files.sync("results.json", other)
    with pytest.raises(StorageError, match="run file runs/demo/results.json was not saved"):
        files.wait()
    with pytest.raises(FileNotFoundError):
        files.sync("x.json", tmp_path / "missing.json")
    files.close()
