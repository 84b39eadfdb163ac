"""Conditional writes of the storage layer (the run lease's ground) on a local folder and on a
real S3 server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from raytag.cluster.storage import (
    ConditionalWriteUnsupported,
    LocalStorage,
    S3Storage,
    Storage,
    Versioned,
)
from tests.s3_server import S3TestServer


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
    assert deaf.list("") == []  # the probe object is gone
