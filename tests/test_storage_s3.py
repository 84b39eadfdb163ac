"""Storage and checkpoints against a real S3-compatible server (SeaweedFS, MinIO or external)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from raytag.cluster.checkpoints import MANIFEST, CheckpointStore, CheckpointUploadError, checkpoint_name
from raytag.cluster.s3_storage import S3Storage
from raytag.cluster.storage import StorageError, open_storage
from tests.s3_server import S3TestServer, free_ports

pytestmark = pytest.mark.integration

RUN = "runs/demo"
PREFLIGHT_LIMIT_S = 30.0


@pytest.fixture
def bucket(s3_server: S3TestServer) -> str:
    return s3_server.make_bucket()


def s3(server: S3TestServer, bucket: str, prefix: str = "pre/fix", **kwargs: Any) -> S3Storage:
    """An S3Storage on the test server with explicit credentials."""
    return S3Storage(
        bucket,
        prefix,
        endpoint_url=server.endpoint_url,
        region=server.region,
        access_key=server.access_key,
        secret_key=server.secret_key,
        **kwargs,
    )


def make_checkpoint(folder: Path, step: int, size: int = 2000) -> Path:
    (folder / "global_step").mkdir(parents=True, exist_ok=True)
    (folder / "global_step" / "mp_rank_00_model_states.pt").write_bytes(os.urandom(size))
    (folder / "progress.json").write_text(json.dumps({"step": step}))
    return folder


def assert_clean(secret: str, *things: Any) -> None:
    """No message, str or repr of ``things`` (and exceptions' causes) contains ``secret``."""
    texts = []
    for thing in things:
        while thing is not None:
            texts += [str(thing), repr(thing)]
            thing = thing.__cause__ if isinstance(thing, BaseException) else None
    for text in texts:
        assert secret not in text, text


def preflight_error(storage: S3Storage, **kwargs: Any) -> tuple[StorageError, float]:
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.preflight(**kwargs)
    return info.value, time.monotonic() - start


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.count(". ") == 0


# --------------------------------------------------------------------------- basic operations


def test_put_get_list_delete(aws_env: S3TestServer, bucket: str, tmp_path: Path) -> None:
    st = open_storage(f"s3://{bucket}/pre/fix")  # endpoint and credentials from AWS_* variables
    assert isinstance(st, S3Storage)
    assert st.uri == f"s3://{bucket}/pre/fix (endpoint {aws_env.endpoint_url})"
    assert st._client.meta.config.s3["addressing_style"] == "path"
    st.preflight()
    st.put_bytes("a/b.txt", b"one")
    st.put_bytes("a/c/d.txt", b"two")
    st.put_bytes("a10/x", b"three")
    src = tmp_path / "src.bin"
    src.write_bytes(b"file-data")
    st.put_file("f/src.bin", src)
    assert st.get_bytes("a/b.txt") == b"one"
    assert st.get_bytes("missing/key") is None
    assert st.exists("a/c/d.txt") and not st.exists("a") and not st.exists("nope")
    assert st.list("a") == ["a/b.txt", "a/c/d.txt"]
    assert st.list("") == ["a/b.txt", "a/c/d.txt", "a10/x", "f/src.bin"]  # no preflight probe left
    assert st.list_sizes("f") == {"f/src.bin": 9}
    assert st.get_file("f/src.bin", tmp_path / "out" / "copy.bin") is True
    assert (tmp_path / "out" / "copy.bin").read_bytes() == b"file-data"
    assert st.get_file("f/none", tmp_path / "none") is False and not (tmp_path / "none").exists()
    st.delete_prefix("a")
    st.delete("a10/x")
    st.delete("a10/x")
    assert st.list("") == ["f/src.bin"]
    keys = [o["Key"] for o in aws_env.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys == ["pre/fix/f/src.bin"]  # keys live below the URI's prefix


def test_multipart_upload(s3_server: S3TestServer, bucket: str, tmp_path: Path) -> None:
    mib = 1024 * 1024
    st = s3(s3_server, bucket, multipart_threshold=5 * mib, multipart_chunksize=5 * mib)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * mib))
    st.put_file("big/big.bin", big)
    head = s3_server.client().head_object(Bucket=bucket, Key="pre/fix/big/big.bin")
    assert head["ContentLength"] == 11 * mib
    assert head["ETag"].strip('"').endswith("-3")  # three parts: 5 + 5 + 1 MiB
    assert st.get_file("big/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()


# --------------------------------------------------------------------------- checkpoints


def test_checkpoints_save_latest_download_retention(
    s3_server: S3TestServer, bucket: str, tmp_path: Path
) -> None:
    logs: list[str] = []
    store = CheckpointStore(s3(s3_server, bucket), RUN, keep_best=1, metric="f1", log=logs.append)
    for step, f1 in [(10, 0.5), (20, 0.9), (30, 0.7)]:
        store.save(make_checkpoint(tmp_path / f"l{step}", step), checkpoint_name(step), step, {"f1": f1})
    store.wait()
    assert [i.step for i in store.list_complete()] == [20, 30]  # best by f1 + latest
    latest = store.latest()
    assert latest is not None and latest.name == "step-00000030" and latest.metrics == {"f1": 0.7}
    out = store.download(latest, tmp_path / "dl")
    assert (out / "progress.json").read_text() == json.dumps({"step": 30})
    local = tmp_path / "l30" / "global_step" / "mp_rank_00_model_states.pt"
    assert (out / "global_step" / "mp_rank_00_model_states.pt").read_bytes() == local.read_bytes()
    keys = s3(s3_server, bucket).list(f"{RUN}/checkpoints")
    assert f"{RUN}/checkpoints/step-00000030/{MANIFEST}" in keys
    assert not any("step-00000010" in k for k in keys)
    store.close()


def test_latest_skips_deleted_or_corrupt_manifest(
    s3_server: S3TestServer, bucket: str, tmp_path: Path
) -> None:
    logs: list[str] = []
    st = s3(s3_server, bucket)
    store = CheckpointStore(st, RUN, keep_best=5, log=logs.append)
    for step in (1, 2):
        store.save(make_checkpoint(tmp_path / f"l{step}", step), checkpoint_name(step), step, {"f1": step})
    store.wait()
    st.delete(f"{RUN}/checkpoints/step-00000002/{MANIFEST}")
    info = store.latest()
    assert info is not None and info.name == "step-00000001"
    assert any(line.startswith("skipping checkpoint step-00000002: no MANIFEST.json") for line in logs)
    st.put_bytes(f"{RUN}/checkpoints/step-00000001/{MANIFEST}", b'{"name": "step-00000001", "files": [')
    assert store.latest() is None
    assert any(line.startswith("skipping checkpoint step-00000001: corrupt manifest") for line in logs)
    store.close()


# --------------------------------------------------------------------------- preflight


def test_preflight_ok_and_create_bucket(s3_server: S3TestServer, bucket: str) -> None:
    s3(s3_server, bucket).preflight()
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0  # probe removed
    new = f"{bucket}-new"
    missing = s3(s3_server, new)
    error, _ = preflight_error(missing)
    assert str(error) == (
        f"bucket '{new}' does not exist at endpoint {s3_server.endpoint_url} "
        "(set run.create_bucket: true to create it)"
    )
    missing.preflight(create_bucket=True)
    s3_server.client().head_bucket(Bucket=new)
    s3(s3_server, new).preflight()


def test_preflight_create_bucket_via_open_storage(aws_env: S3TestServer, bucket: str) -> None:
    st = open_storage(f"s3://{bucket}-made/p", create_bucket=True)
    st.preflight()
    aws_env.client().head_bucket(Bucket=f"{bucket}-made")


def test_preflight_wrong_secret(s3_server: S3TestServer, bucket: str) -> None:
    if s3_server.kind == "external" and not s3_server.secret_key:
        pytest.skip("the external server accepts any key")
    wrong = "wrong-secret-" + "x" * 20
    st = s3(s3_server, bucket)
    bad = S3Storage(
        bucket,
        "p",
        endpoint_url=s3_server.endpoint_url,
        access_key=s3_server.access_key,
        secret_key=wrong,
        region=s3_server.region,
    )
    error, seconds = preflight_error(bad)
    message = str(error)
    assert seconds < PREFLIGHT_LIMIT_S
    assert message.startswith(
        f"S3 endpoint {s3_server.endpoint_url} rejected the credentials for bucket '{bucket}'"
    )
    assert "AWS_SECRET_ACCESS_KEY" in message and one_sentence(message)
    assert_clean(wrong, error, bad, bad.uri)
    assert_clean(s3_server.secret_key, error, bad, st, st.uri)


def test_preflight_unknown_bucket(s3_server: S3TestServer) -> None:
    st = s3(s3_server, "raytag-no-such-bucket")
    error, seconds = preflight_error(st)
    message = str(error)
    assert seconds < PREFLIGHT_LIMIT_S and one_sentence(message)
    assert "'raytag-no-such-bucket' does not exist" in message and s3_server.endpoint_url in message
    assert_clean(s3_server.secret_key, error, st)


def test_preflight_nothing_listens(s3_server: S3TestServer) -> None:
    (port,) = free_ports(1)
    endpoint = f"http://127.0.0.1:{port}"
    st = S3Storage(
        "some-bucket", "p", endpoint_url=endpoint, access_key="ak", secret_key=s3_server.secret_key
    )  # default timeouts and retries
    error, seconds = preflight_error(st)
    assert str(error) == f"cannot reach S3 endpoint {endpoint} for bucket 'some-bucket': connection refused"
    assert seconds < PREFLIGHT_LIMIT_S
    assert error.transient
    assert_clean(s3_server.secret_key, error, st)


# --------------------------------------------------------------------------- outages


def test_checkpoint_save_across_server_outage(s3_server: S3TestServer, bucket: str, tmp_path: Path) -> None:
    if not s3_server.can_restart:
        pytest.skip("the external S3 server cannot be stopped by the tests")
    logs: list[str] = []
    quick = s3(s3_server, bucket, max_attempts=1)
    short = CheckpointStore(quick, RUN, retries=2, backoff_s=0.1, log=logs.append)
    patient_storage = s3(s3_server, bucket, max_attempts=1)
    patient = CheckpointStore(patient_storage, RUN, retries=8, backoff_s=0.25, log=logs.append)
    s3_server.stop(kill=True)  # like a crash
    try:
        # Down past the retries: the save fails, naming the checkpoint.
        short.save(make_checkpoint(tmp_path / "l2", 2), "step-00000002", 2, {"f1": 0.2})
        with pytest.raises(CheckpointUploadError) as info:
            short.wait()
        assert str(info.value).startswith("checkpoint step-00000002 was not saved to s3://")
        assert "connection refused" in str(info.value)
        assert_clean(s3_server.secret_key, info.value, *logs)
        # Down for a moment: the save waits it out.
        patient.save(make_checkpoint(tmp_path / "l3", 3), "step-00000003", 3, {"f1": 0.3})
        time.sleep(1.0)
    finally:
        s3_server.start()
    patient.wait()
    assert any(line.startswith("retrying ") for line in logs)
    assert [i.name for i in patient.list_complete()] == ["step-00000003"]
    assert not quick.exists(f"{RUN}/checkpoints/step-00000002/{MANIFEST}")
    short.close()
    patient.close()
