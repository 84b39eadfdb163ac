"""Where raytag's run outputs live: a local folder or an S3-compatible bucket.

Keys are '/'-separated paths relative to the storage root (the folder, or the prefix of
``s3://bucket/prefix``). A *prefix* in ``list``/``list_sizes``/``delete_prefix`` names a
folder: ``list("checkpoints/step-1")`` never returns keys of ``checkpoints/step-10``.

Conditional writes (``get_versioned``, ``put_if_absent``, ``replace_if``) let exactly one of
several writers create or replace a small object: the run lease (``runlock.py``) is built on
them. A folder does them with a hard link (create) and a file lock around compare-and-rename
(replace); a bucket with S3's ``If-None-Match: *`` and ``If-Match: <etag>`` on PutObject, once a
probe has shown that the server honours them. Where it does not, they raise
``ConditionalWriteUnsupported`` and the caller decides what to do without them.

Secrets (the AWS secret key and session token) never appear in a message, log line, ``str``
or ``repr`` made here; ``redact`` removes them from any other text.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import urlparse

TMP_MARK = ".raytag-tmp-"
PREFLIGHT_MARK = ".raytag-preflight-"
LOCK_MARK = f"{TMP_MARK}flock-"  # a folder's sidecar lock file for replace_if (never listed)
DEFAULT_MULTIPART_THRESHOLD = 64 * 1024 * 1024
DEFAULT_MULTIPART_CHUNKSIZE = 16 * 1024 * 1024
PREFLIGHT_READ_TIMEOUT = 10.0
PREFLIGHT_MAX_ATTEMPTS = 1  # botocore's retries.max_attempts counts retries: 1 means two tries

T = TypeVar("T")
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_known_secrets: set[str] = set()
_secrets_lock = threading.Lock()


class StorageError(Exception):
    """A storage operation failed; the message is one sentence naming endpoint and bucket (or folder).

    ``transient`` is True for failures worth retrying (connection refused or reset, timeouts,
    5xx answers, throttling); False for ones a retry will not fix (bad credentials, missing
    bucket, permission denied, a full disk).
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(redact(message))
        self.transient = transient


class ConditionalWriteUnsupported(StorageError):
    """The storage cannot make a write conditional (the server ignores or refuses the headers,
    or the file system has no hard links or file locks); the message says which and why."""


@dataclass(frozen=True)
class Versioned:
    """An object's content and the version token that ``replace_if`` compares: the S3 ETag,
    or the sha256 of a file's content."""

    data: bytes
    version: str


@runtime_checkable
class Storage(Protocol):
    """What raytag needs from a place that holds run outputs."""

    uri: str

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def put_file(self, key: str, path: Path) -> None: ...

    def get_bytes(self, key: str) -> bytes | None: ...

    def get_file(self, key: str, path: Path) -> bool: ...

    def list_sizes(self, prefix: str) -> dict[str, int]: ...

    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> None: ...

    def exists(self, key: str) -> bool: ...

    def local_path(self, key: str) -> Path | None: ...

    def display(self, key: str) -> str: ...

    def preflight(self, create_bucket: bool = False) -> None: ...

    def list(self, prefix: str) -> list[str]: ...

    def get_versioned(self, key: str) -> Versioned | None:
        """The content of ``key`` with its version token, or None when it does not exist."""
        ...

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        """Create ``key`` only if it does not exist: its new version token, or None when it existed.

        Atomic: of several writers racing for an absent key exactly one gets a version. Raises
        ConditionalWriteUnsupported where the storage cannot do this, StorageError on failure.
        """
        ...

    def replace_if(self, key: str, data: bytes, version: str) -> str | None:
        """Overwrite ``key`` only if its version is still ``version``: the new version token, or
        None when it changed or is gone (compare-and-swap). Raises as ``put_if_absent``."""
        ...


# --------------------------------------------------------------------------- helpers


def register_secret(value: str | None) -> None:
    """Remember a secret value so that ``redact`` removes it from text from now on."""
    if value:
        with _secrets_lock:
            _known_secrets.add(value)


def redact(text: str, *secrets: str | None) -> str:
    """Return ``text`` with every known secret value replaced by ``***``.

    Known secrets: the current ``AWS_SECRET_ACCESS_KEY`` and ``AWS_SESSION_TOKEN`` values,
    secrets handed to an ``S3Storage``, and ``secrets`` passed here. Longest first, so a
    secret containing another is removed whole. Raises nothing.
    """
    with _secrets_lock:
        values = set(_known_secrets)
    values.update(os.environ.get(name, "") for name in _SECRET_ENV)
    values.update(s for s in secrets if s)
    for value in sorted((v for v in values if v), key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def is_transient(exc: BaseException) -> bool:
    """True when a retry may cure ``exc``: a StorageError marked transient, or a connection/timeout error."""
    return bool(getattr(exc, "transient", False)) or isinstance(exc, (ConnectionError, TimeoutError))


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a transient storage failure."""

    retries: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    budget_s: float | None = None
    """Also stop retrying once the next wait would end more than this many seconds after the first try."""

    @classmethod
    def for_seconds(cls, budget_s: float, backoff_s: float = 0.5, max_backoff_s: float = 8.0) -> RetryPolicy:
        """Retry a transient failure for up to `budget_s` seconds, however many tries that takes."""
        return cls(retries=1 << 30, backoff_s=backoff_s, max_backoff_s=max_backoff_s, budget_s=budget_s)


def with_retries(
    fn: Callable[[], T],
    *,
    what: str,
    policy: RetryPolicy | None = None,
    log: Callable[[str], Any] = print,
) -> T:
    """Call ``fn``; on a transient failure wait (``backoff_s``, doubling, capped) and call again.

    At most ``policy.retries`` retries after the first try, and none that would start after
    ``policy.budget_s`` seconds (when set). Re-raises the last error, or at
    once a failure that is not transient (see ``is_transient``). ``what`` names the action in logs.
    """
    policy = policy or RetryPolicy()
    delay = policy.backoff_s
    start = time.monotonic()
    for attempt in range(policy.retries + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt >= policy.retries or not is_transient(exc):
                raise
            spent = time.monotonic() - start
            if policy.budget_s is not None:
                if spent + delay > policy.budget_s:
                    raise
                left = f"{policy.budget_s - spent:.0f} s of {policy.budget_s:.0f} s left"
            else:
                left = f"retry {attempt + 1} of {policy.retries}"
            log(redact(f"retrying {what} in {delay:.1f} s ({left}): {exc}"))
            time.sleep(delay)
            delay = min(delay * 2, policy.max_backoff_s)
    raise AssertionError("unreachable")


def is_remote(uri: str) -> bool:
    """True when ``uri`` names an S3 location (``s3://...``), False for a local folder."""
    return uri.strip().lower().startswith("s3://")


def join_key(*parts: str) -> str:
    """Join key parts with '/', dropping empty parts and stray slashes."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def check_key(key: str) -> str:
    """Return ``key`` normalised; raise ValueError for an empty, absolute or '..'-escaping key."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid storage key {key!r}: use a relative '/'-separated path")
    return key


def _check_prefix(prefix: str) -> str:
    """Return ``prefix`` without slashes at its ends; '' means the whole root."""
    prefix = prefix.strip("/")
    if prefix:
        check_key(prefix)
    return prefix


def split_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/prefix`` into (bucket, prefix); raise StorageError if no bucket."""
    parsed = urlparse(uri.strip())
    if parsed.scheme.lower() != "s3" or not parsed.netloc:
        raise StorageError(f"storage URI {uri!r} is not of the form s3://bucket/prefix")
    return parsed.netloc, parsed.path.strip("/")


# --------------------------------------------------------------------------- local


class LocalStorage:
    """A folder on a local (or shared network) file system.

    Writes are atomic: data goes to a temporary file in the target folder, then
    ``os.replace``. Failures raise StorageError naming the folder.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def __repr__(self) -> str:
        return f"LocalStorage({self.uri!r})"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _fail(self, what: str, key: str, exc: OSError) -> StorageError:
        reason = exc.strerror or str(exc)
        return StorageError(f"cannot {what} {self.display(key)} in folder {self.uri}: {reason}")

    def display(self, key: str) -> str:
        """The absolute path of ``key`` as text."""
        return str(self.root / key) if key else self.uri

    def local_path(self, key: str) -> Path | None:
        """The real path of ``key`` (whether or not it exists)."""
        return self._path(key)

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` to ``key`` atomically (fsynced: manifests rely on it); raise StorageError."""
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{TMP_MARK}{uuid.uuid4().hex}-{target.name}")
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise self._fail("write", key, exc) from exc

    def put_file(self, key: str, path: Path) -> None:
        """Copy ``path`` to ``key`` atomically; a no-op when ``path`` already is that file."""
        target = self._path(key)
        if _same_file(Path(path), target):
            return
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            _atomic_copy(Path(path), target)
        except OSError as exc:
            raise self._fail("write", key, exc) from exc

    def get_bytes(self, key: str) -> bytes | None:
        """The content of ``key``, or None when it does not exist."""
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except OSError as exc:
            raise self._fail("read", key, exc) from exc

    def get_file(self, key: str, path: Path) -> bool:
        """Copy ``key`` to ``path`` atomically; False when ``key`` does not exist."""
        source = self._path(key)
        if not source.is_file():
            return False
        if _same_file(source, Path(path)):
            return True
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            _atomic_copy(source, Path(path))
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self._fail("read", key, exc) from exc
        return True

    def list_sizes(self, prefix: str) -> dict[str, int]:
        """Every file below folder ``prefix`` (recursive) as {key: size}; temporary files left out."""
        prefix = _check_prefix(prefix)
        base = self.root / prefix if prefix else self.root
        found: dict[str, int] = {}
        if not base.is_dir():
            return found
        try:
            for dirpath, _dirs, files in os.walk(base):
                for name in files:
                    if name.startswith(TMP_MARK):
                        continue
                    full = Path(dirpath) / name
                    try:
                        found[full.relative_to(self.root).as_posix()] = full.stat().st_size
                    except FileNotFoundError:
                        continue
        except OSError as exc:
            raise self._fail("list", prefix, exc) from exc
        return dict(sorted(found.items()))

    def delete(self, key: str) -> None:
        """Delete one key; missing keys are fine."""
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise self._fail("delete", key, exc) from exc

    def delete_prefix(self, prefix: str) -> None:
        """Delete folder ``prefix`` and everything below it; a missing folder is fine."""
        prefix = _check_prefix(prefix)
        base = self.root / prefix if prefix else self.root
        try:
            if prefix:
                shutil.rmtree(base, ignore_errors=False)
            else:
                for child in base.iterdir():
                    if child.is_dir():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._fail("delete", prefix, exc) from exc

    def exists(self, key: str) -> bool:
        """True when ``key`` is an existing file."""
        return self._path(key).is_file()

    def preflight(self, create_bucket: bool = False) -> None:
        """Create the folder if needed and check it is writable; raise StorageError if not.

        ``create_bucket`` is accepted for symmetry with S3Storage and ignored.
        """
        probe = f"{PREFLIGHT_MARK}{uuid.uuid4().hex}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / probe).write_bytes(b"ok")
            (self.root / probe).unlink()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise StorageError(f"cannot write to folder {self.uri}: {reason}") from exc

    def list(self, prefix: str) -> list[str]:
        """Every key below folder ``prefix`` (recursive), sorted."""
        return sorted(self.list_sizes(prefix))

    # -- conditional writes

    def get_versioned(self, key: str) -> Versioned | None:
        """The content of ``key`` and its sha256 (the version ``replace_if`` compares), or None."""
        data = self.get_bytes(key)
        return None if data is None else Versioned(data, _sha256(data))

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        """Create ``key`` with ``data`` unless it exists: its version, or None when it existed.

        The data is written (and fsynced) to a temporary file first, then hard-linked to the
        key: ``link`` fails when the name exists, so exactly one of racing writers wins, on a
        local disk and on NFS alike, and a reader never sees a partial file. Raises
        ConditionalWriteUnsupported on a file system without hard links, StorageError otherwise.
        """
        target = self._path(key)
        for attempt in range(3):
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = self._write_tmp(target, data)
                try:
                    os.link(tmp, target)
                except FileExistsError:
                    return None
                except OSError as exc:
                    if exc.errno in _NO_LINKS:
                        raise ConditionalWriteUnsupported(
                            f"folder {self.uri} cannot create {self.display(key)} atomically: "
                            f"the file system has no hard links ({exc.strerror})"
                        ) from exc
                    raise
                finally:
                    tmp.unlink(missing_ok=True)
                return _sha256(data)
            except StorageError:
                raise
            except FileNotFoundError as exc:
                if attempt == 2:  # the folder vanished under us (another job deleting the run): again
                    raise self._fail("create", key, exc) from exc
            except OSError as exc:
                raise self._fail("create", key, exc) from exc
        raise AssertionError("unreachable")

    def replace_if(self, key: str, data: bytes, version: str) -> str | None:
        """Overwrite ``key`` with ``data`` if its content's sha256 still is ``version``; else None.

        Compare-and-rename under an exclusive lock on a sidecar file of the folder
        (``.raytag-tmp-flock-<name>``, never listed): every ``replace_if`` of the key takes it,
        reads and compares the current file, then ``os.replace``s a fully written temporary
        file over it. The key never disappears in between, so ``put_if_absent`` (which needs
        no lock) cannot slip in. An in-process lock serialises this process's threads first:
        on NFS Linux emulates ``flock`` with byte-range locks, which do not exclude threads of
        one process. Raises ConditionalWriteUnsupported where the file system has no locks,
        StorageError otherwise.
        """
        target = self._path(key)
        sidecar = target.with_name(f"{LOCK_MARK}{target.name}")
        try:
            with _file_lock(sidecar, self.uri):
                try:
                    current = target.read_bytes()
                except FileNotFoundError:
                    return None
                if _sha256(current) != version:
                    return None
                tmp = self._write_tmp(target, data)
                try:
                    os.replace(tmp, target)
                finally:
                    tmp.unlink(missing_ok=True)
        except StorageError:
            raise
        except OSError as exc:
            raise self._fail("replace", key, exc) from exc
        return _sha256(data)

    @staticmethod
    def _write_tmp(target: Path, data: bytes) -> Path:
        """``data`` in a new fsynced temporary file beside ``target`` (the caller removes it)."""
        tmp = target.with_name(f"{TMP_MARK}{uuid.uuid4().hex}-{target.name}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp


_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}
_NO_LOCKS = {errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF}
_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextmanager
def _file_lock(path: Path, where: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) against other processes and threads.

    Raises ConditionalWriteUnsupported when the file system refuses file locks.
    """
    import fcntl

    with _thread_locks_guard:
        in_process = _thread_locks.setdefault(str(path), threading.Lock())
    with in_process:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                if exc.errno in _NO_LOCKS:
                    raise ConditionalWriteUnsupported(
                        f"folder {where} cannot lock {path.name} for a conditional write: "
                        f"the file system has no file locks ({exc.strerror})"
                    ) from exc
                raise
            yield  # closing the descriptor releases the lock
        finally:
            os.close(fd)


def _same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` are the same existing file."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _atomic_copy(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` through a temporary file in target's folder."""
    tmp = target.with_name(f"{TMP_MARK}{uuid.uuid4().hex}-{target.name}")
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- S3

_RETRYABLE_CODES = {
    "RequestTimeout",
    "RequestTimeoutException",
    "SlowDown",
    "InternalError",
    "ServiceUnavailable",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
}
_CREDENTIAL_CODES = {
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "AuthorizationHeaderMalformed",
    "InvalidSecurity",
    "403",
}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


def _client_error_code(exc: BaseException) -> tuple[str, int]:
    """(error code, HTTP status) of a botocore ClientError; ('', 0) for other exceptions."""
    response: dict[str, Any] = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _root_cause(exc: BaseException) -> BaseException:
    """The botocore error behind boto3's S3UploadFailedError (which only sets __context__)."""
    from boto3.exceptions import S3UploadFailedError

    if isinstance(exc, S3UploadFailedError) and exc.__context__ is not None:
        return exc.__context__
    return exc


def _is_transient(exc: BaseException) -> bool:
    """True for failures that a later retry may not hit: network trouble, 5xx, throttling."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    exc = _root_cause(exc)
    if isinstance(exc, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError)):
        return True
    code, status = _client_error_code(exc)
    return status >= 500 or code in _RETRYABLE_CODES


def _connection_reason(exc: BaseException) -> str:
    """A few words saying why a connection failed ('connection refused', 'timed out', ...)."""
    from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError, SSLError

    if isinstance(exc, ConnectTimeoutError):
        return "connection timed out"
    if isinstance(exc, ReadTimeoutError):
        return "no answer before the read timeout"
    if isinstance(exc, SSLError):
        return "TLS handshake failed"
    text = str(getattr(exc, "kwargs", {}).get("error", "") or exc).lower()
    if "refused" in text:
        return "connection refused"
    if "name or service not known" in text or "name resolution" in text or "nodename" in text:
        return "host name not found"
    if "reset" in text or "closed" in text or "aborted" in text:
        return "connection closed by the server"
    return "connection failed"


class S3Storage:
    """A prefix in an S3 bucket (AWS S3, MinIO, SeaweedFS, any S3-compatible server).

    Endpoint, region and credentials come from the arguments or boto3's standard places
    (``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, ``AWS_REGION``/``AWS_DEFAULT_REGION``,
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
    instance roles). Path-style addressing is used with a non-AWS endpoint unless
    ``path_style`` says otherwise. Timeouts and retries are bounded so a wrong endpoint fails
    in seconds: ``max_attempts`` is botocore's ``retries.max_attempts`` (standard mode), which
    counts retries after the first try. Every failure raises StorageError (``transient`` set
    for network trouble). ``create_bucket`` lets ``preflight`` create a missing bucket even
    when not asked to.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        path_style: bool | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        profile: str | None = None,
        connect_timeout: float = 3.0,
        read_timeout: float = 30.0,
        max_attempts: int = 3,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        multipart_chunksize: int = DEFAULT_MULTIPART_CHUNKSIZE,
        max_concurrency: int = 4,
        create_bucket: bool = False,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig

        register_secret(secret_key)
        register_secret(session_token)
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.create_bucket = create_bucket
        session = boto3.session.Session(
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            aws_session_token=session_token,
            region_name=region,
            profile_name=profile,
        )
        self._client, style = _new_client(
            session, endpoint_url, path_style, connect_timeout, read_timeout, max_attempts
        )
        # preflight's own client: shorter read timeout and fewer tries, so a silent endpoint fails fast
        self._probe_args = (
            session,
            endpoint_url,
            style == "path",
            connect_timeout,
            min(read_timeout, PREFLIGHT_READ_TIMEOUT),
            min(max_attempts, PREFLIGHT_MAX_ATTEMPTS),
        )
        self._probe: Any = None
        self._conditional: str | None = None  # after the probe: "" = honoured, else why not
        self._conditional_lock = threading.Lock()
        self.endpoint_url: str = self._client.meta.endpoint_url
        self.region: str | None = self._client.meta.region_name
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
        )
        location = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.uri = redact(f"{location} (endpoint {self.endpoint_url})")

    def __repr__(self) -> str:
        return f"S3Storage({self.uri!r})"

    # -- naming

    def _key(self, key: str) -> str:
        return join_key(self.prefix, check_key(key))

    def _folder(self, prefix: str) -> str:
        """The full S3 prefix (ending in '/', or '' for the bucket root) of folder ``prefix``."""
        full = join_key(self.prefix, _check_prefix(prefix))
        return f"{full}/" if full else ""

    def display(self, key: str) -> str:
        """``s3://bucket/prefix/key (endpoint URL)``."""
        full = join_key(self.prefix, key)
        return redact(f"s3://{self.bucket}/{full} (endpoint {self.endpoint_url})")

    def local_path(self, key: str) -> Path | None:
        """Always None: S3 objects have no local path."""
        return None

    def _fail(self, what: str, key: str, exc: BaseException) -> StorageError:
        """One-sentence StorageError for a failed operation on ``key``."""
        exc = _root_cause(exc)
        where = f"s3://{self.bucket}/{join_key(self.prefix, key)}"
        ep = self.endpoint_url
        code, _status = _client_error_code(exc)
        transient = _is_transient(exc)
        if code:
            message = getattr(exc, "response", {}).get("Error", {}).get("Message", "")
            reason = f"{code}" + (f": {message}" if message and message != code else "")
        elif _is_connection_error(exc):
            reason = f"cannot reach the endpoint ({_connection_reason(exc)})"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        return StorageError(f"cannot {what} {where} at S3 endpoint {ep}: {reason}", transient=transient)

    # -- operations

    def put_bytes(self, key: str, data: bytes) -> None:
        """Upload ``data`` as ``key``; raise StorageError."""
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except Exception as exc:
            raise self._fail("write", key, exc) from exc

    def put_file(self, key: str, path: Path) -> None:
        """Upload file ``path`` as ``key`` (managed transfer: multipart above the threshold)."""
        if not Path(path).is_file():
            raise StorageError(f"cannot upload {path} to {self.display(key)}: no such local file")
        try:
            self._client.upload_file(str(path), self.bucket, self._key(key), Config=self._transfer)
        except Exception as exc:
            raise self._fail("write", key, exc) from exc

    def get_bytes(self, key: str) -> bytes | None:
        """The content of ``key``, or None when it does not exist; raise StorageError."""
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            return response["Body"].read()
        except Exception as exc:
            if _client_error_code(exc)[0] in _MISSING_CODES:
                return None
            raise self._fail("read", key, exc) from exc

    def get_file(self, key: str, path: Path) -> bool:
        """Download ``key`` to ``path`` (atomically); False when ``key`` does not exist."""
        path = Path(path)
        tmp = path.with_name(f"{TMP_MARK}{uuid.uuid4().hex}-{path.name}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._client.download_file(self.bucket, self._key(key), str(tmp), Config=self._transfer)
            os.replace(tmp, path)
            return True
        except Exception as exc:
            if _client_error_code(exc)[0] in _MISSING_CODES:
                return False
            raise self._fail("read", key, exc) from exc
        finally:
            tmp.unlink(missing_ok=True)

    def list_sizes(self, prefix: str) -> dict[str, int]:
        """Every key below folder ``prefix`` (recursive) as {key relative to the root: size}."""
        full = self._folder(prefix)
        root = f"{self.prefix}/" if self.prefix else ""
        found: dict[str, int] = {}
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            for page in pages:
                for item in page.get("Contents", []):
                    key = item["Key"]
                    if key.startswith(root) and not key.endswith("/"):
                        found[key[len(root) :]] = int(item.get("Size", 0))
        except Exception as exc:
            raise self._fail("list", prefix, exc) from exc
        return dict(sorted(found.items()))

    def delete(self, key: str) -> None:
        """Delete one key; missing keys are fine."""
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            if _client_error_code(exc)[0] in _MISSING_CODES:
                return
            raise self._fail("delete", key, exc) from exc

    def delete_prefix(self, prefix: str) -> None:
        """Delete every key below folder ``prefix``; raise StorageError if any is left."""
        keys = [self._key(k) for k in self.list(prefix)]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            try:
                answer = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            except Exception as exc:
                raise self._fail("delete", prefix, exc) from exc
            errors = answer.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"cannot delete {len(errors)} objects below s3://{self.bucket}/{self._folder(prefix)} "
                    f"at S3 endpoint {self.endpoint_url}: {first.get('Code')} on {first.get('Key')}"
                )

    def exists(self, key: str) -> bool:
        """True when object ``key`` exists; raise StorageError on other failures."""
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception as exc:
            if _client_error_code(exc)[0] in _MISSING_CODES:
                return False
            raise self._fail("check", key, exc) from exc

    def preflight(self, create_bucket: bool = False) -> None:
        """Check endpoint, credentials, bucket and that the prefix is writable, before training.

        Lists one key, creates the bucket if missing and ``create_bucket`` (the argument or
        the constructor's), then writes and deletes a probe object
        ``<prefix>/.raytag-preflight-<uuid>``. Raises StorageError with a one-sentence reason
        (unreachable endpoint, rejected credentials, missing bucket, denied access) that never
        contains a secret. Uses a read timeout of at most 10 s and at most two tries per
        request, so an endpoint that accepts connections but never answers fails in under 30 s.
        """
        if self._probe is None:
            self._probe = _new_client(*self._probe_args)[0]
        client = self._probe
        try:
            client.list_objects_v2(Bucket=self.bucket, Prefix=self._folder(""), MaxKeys=1)
        except Exception as exc:
            if _client_error_code(exc)[0] != "NoSuchBucket":
                raise self._preflight_error(exc) from exc
            if not (create_bucket or self.create_bucket):
                raise StorageError(
                    f"bucket '{self.bucket}' does not exist at endpoint {self.endpoint_url} "
                    "(set run.create_bucket: true to create it)"
                ) from exc
            self._create_bucket(client)
        probe = f"{PREFLIGHT_MARK}{uuid.uuid4().hex}"
        try:
            client.put_object(Bucket=self.bucket, Key=self._key(probe), Body=b"raytag preflight")
            client.delete_object(Bucket=self.bucket, Key=self._key(probe))
        except Exception as exc:
            raise self._preflight_error(exc, writing=True) from exc

    def _create_bucket(self, client: Any) -> None:
        """Create the bucket (in self.region when that is not us-east-1); raise StorageError."""
        args: dict[str, Any] = {"Bucket": self.bucket}
        if self.region and self.region != "us-east-1":
            args["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            client.create_bucket(**args)
        except Exception as exc:
            if _client_error_code(exc)[0] == "BucketAlreadyOwnedByYou":
                return
            raise self._preflight_error(exc, creating=True) from exc

    def _preflight_error(
        self, exc: BaseException, *, writing: bool = False, creating: bool = False
    ) -> StorageError:
        """Turn a botocore failure during preflight into one clear sentence."""
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError

        ep, bucket = self.endpoint_url, self.bucket
        code, status = _client_error_code(exc)
        where = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        if _is_connection_error(exc):
            reason = _connection_reason(exc)
            return StorageError(
                f"cannot reach S3 endpoint {ep} for bucket '{bucket}': {reason}", transient=True
            )
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StorageError(
                f"no S3 credentials found for bucket '{bucket}' at endpoint {ep}: set AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            )
        if code in _CREDENTIAL_CODES:
            return StorageError(
                f"S3 endpoint {ep} rejected the credentials for bucket '{bucket}' ({code}): "
                "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        if code == "AccessDenied" or status == 403:
            action = "create bucket" if creating else "write to" if writing else "list"
            target = f"'{bucket}'" if creating else where
            return StorageError(
                f"S3 endpoint {ep} denied the credentials permission to {action} {target} (AccessDenied)"
            )
        if code == "NoSuchBucket":
            return StorageError(f"bucket '{bucket}' does not exist at endpoint {ep}")
        if code.isdigit():  # an HTTP error without an S3 error document
            return StorageError(
                f"endpoint {ep} answered HTTP {code} for bucket '{bucket}' without an S3 error "
                "(is it an S3 endpoint?)",
                transient=_is_transient(exc),
            )
        if code:
            message = getattr(exc, "response", {}).get("Error", {}).get("Message", "")
            detail = f"{code}: {message}" if message and message != code else code
            return StorageError(
                f"S3 endpoint {ep} refused access to {where} ({detail})", transient=_is_transient(exc)
            )
        return StorageError(f"S3 check of {where} at endpoint {ep} failed: {type(exc).__name__}: {exc}")

    def list(self, prefix: str) -> list[str]:
        """Every key below folder ``prefix`` (recursive), relative to the root, sorted."""
        return sorted(self.list_sizes(prefix))

    def list_objects(self, raw_prefix: str) -> builtins.list[tuple[str, int, str]]:
        """(bucket key, size, ETag) of every object whose key starts with ``raw_prefix`` (a plain
        string prefix of the bucket's keys, not a folder of this storage's root), sorted by key."""
        found: builtins.list[tuple[str, int, str]] = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=raw_prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    found.append(
                        (item["Key"], int(item.get("Size", 0)), str(item.get("ETag", "")).strip('"'))
                    )
        except Exception as exc:
            raise self._fail("list", raw_prefix, exc) from exc
        return sorted(found)

    # -- conditional writes

    def get_versioned(self, key: str) -> Versioned | None:
        """The content of ``key`` and its ETag (what ``replace_if`` compares), or None when missing."""
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            return Versioned(response["Body"].read(), str(response["ETag"]))
        except Exception as exc:
            if _client_error_code(exc)[0] in _MISSING_CODES:
                return None
            raise self._fail("read", key, exc) from exc

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        """Create ``key`` unless it exists (PutObject with ``If-None-Match: *``): its ETag, or None.

        The server decides atomically; None also for 409 ConditionalRequestConflict (AWS: a
        concurrent write won). Before the first conditional write this storage probes whether
        the server honours the headers (see ``conditional_writes``); raises
        ConditionalWriteUnsupported where it does not, StorageError on other failures.
        """
        self._require_conditional()
        return self._conditional_put(key, data, IfNoneMatch="*")

    def replace_if(self, key: str, data: bytes, version: str) -> str | None:
        """Overwrite ``key`` if its ETag still is ``version`` (PutObject with ``If-Match``): the new
        ETag, or None when it changed or is gone. Probes and raises as ``put_if_absent``."""
        self._require_conditional()
        return self._conditional_put(key, data, IfMatch=version)

    def conditional_writes(self) -> tuple[bool, str]:
        """(True, "") when the server honours conditional PutObject, else (False, why not).

        Probed once per storage object with a throwaway key ``<prefix>/.raytag-preflight-cas-<uuid>``
        (four small requests, then deleted): create with ``If-None-Match: *`` must succeed and
        repeating it must fail with 412; ``If-Match`` with a wrong ETag must fail with 412 and
        with the right one succeed. A server that refuses the headers (501 NotImplemented, 400)
        or silently writes anyway does not honour them. Raises StorageError when the probe
        cannot run (unreachable endpoint, access denied): nothing is cached then.
        """
        with self._conditional_lock:
            if self._conditional is None:
                self._conditional = self._probe_conditional()
            return not self._conditional, self._conditional

    def _require_conditional(self) -> None:
        honoured, why = self.conditional_writes()
        if not honoured:
            raise ConditionalWriteUnsupported(
                f"S3 endpoint {self.endpoint_url} (bucket '{self.bucket}') does not honour conditional writes: {why}"
            )

    def _conditional_put(self, key: str, data: bytes, **condition: str) -> str | None:
        try:
            response = self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
            return str(response["ETag"])
        except Exception as exc:
            code, status = _client_error_code(exc)
            if status in (412, 409) or code in _PRECONDITION_CODES or code in _MISSING_CODES:
                return None  # If-Match on a missing key: 404 on AWS, 412 on SeaweedFS
            if _unsupported_answer(code, status):
                with self._conditional_lock:
                    self._conditional = f"PutObject with {', '.join(condition)} answered {code or status}"
                raise ConditionalWriteUnsupported(
                    f"S3 endpoint {self.endpoint_url} (bucket '{self.bucket}') does not honour "
                    f"conditional writes: {self._conditional}"
                ) from exc
            raise self._fail("write", key, exc) from exc

    def _probe_conditional(self) -> str:
        """Why the server does not honour conditional PutObject ('' when it does); see conditional_writes."""
        probe = f"{PREFLIGHT_MARK}cas-{uuid.uuid4().hex}"
        key = self._key(probe)
        client = self._client

        def put(body: bytes, **condition: str) -> tuple[str | None, str]:
            """(ETag, '') on success; (None, code) when the condition failed or was refused."""
            try:
                return str(client.put_object(Bucket=self.bucket, Key=key, Body=body, **condition)["ETag"]), ""
            except Exception as exc:
                code, status = _client_error_code(exc)
                if (
                    status in (400, 409, 412)
                    or code in _PRECONDITION_CODES
                    or _unsupported_answer(code, status)
                ):
                    return None, code or str(status)
                raise self._fail("write a conditional-write probe as", probe, exc) from exc

        try:
            first, refused = put(b"1", IfNoneMatch="*")
            if first is None:
                return f"PutObject with If-None-Match: * on a new key answered {refused}"
            again, refused = put(b"2", IfNoneMatch="*")
            if again is not None:
                return "PutObject with If-None-Match: * overwrote an existing object"
            if refused not in _PRECONDITION_CODES and refused != "412":
                return f"PutObject with If-None-Match: * on an existing object answered {refused}, not 412"
            stale, refused = put(b"3", IfMatch='"00000000000000000000000000000000"')
            if stale is not None:
                return "PutObject with If-Match and a wrong ETag overwrote the object"
            if refused not in _PRECONDITION_CODES and refused != "412":
                return f"PutObject with If-Match and a wrong ETag answered {refused}, not 412"
            fresh, refused = put(b"4", IfMatch=first)
            if fresh is None:
                return f"PutObject with If-Match and the object's own ETag answered {refused}"
            return ""
        finally:
            try:
                client.delete_object(Bucket=self.bucket, Key=key)
            except Exception:
                pass  # a leftover probe object is harmless; the probe's answer stands


_PRECONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}


def _unsupported_answer(code: str, status: int) -> bool:
    """True when a conditional PutObject was refused because the server does not do conditions."""
    return status == 501 or code in ("NotImplemented", "InvalidArgument", "InvalidRequest")


def _new_client(
    session: Any,
    endpoint_url: str | None,
    path_style: bool | None,
    connect_timeout: float,
    read_timeout: float,
    max_attempts: int,
) -> tuple[Any, str]:
    """(S3 client, addressing style); with ``path_style`` None, path style for a non-AWS endpoint."""
    from botocore.config import Config

    def build(style: str) -> Any:
        config = Config(
            s3={"addressing_style": style},
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        return session.client("s3", endpoint_url=endpoint_url, config=config)

    if path_style is not None:
        style = "path" if path_style else "auto"
        return build(style), style
    client = build("auto")
    if _is_custom_endpoint(client.meta.endpoint_url):
        return build("path"), "path"
    return client, "auto"


def _is_connection_error(exc: BaseException) -> bool:
    """True when ``exc`` says the endpoint could not be reached or stopped answering."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    return isinstance(exc, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError))


def _is_custom_endpoint(endpoint_url: str | None) -> bool:
    """True for an endpoint that is not AWS S3 (MinIO, SeaweedFS, ...): it gets path-style URLs."""
    host = (urlparse(endpoint_url or "").hostname or "").lower()
    return bool(host) and not host.endswith((".amazonaws.com", ".amazonaws.com.cn"))


# --------------------------------------------------------------------------- entry point


def open_storage(
    uri: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    path_style: bool | None = None,
    create_bucket: bool = False,
) -> Storage:
    """Open ``uri`` (a folder, ``file://`` URL or ``s3://bucket/prefix``) as a Storage.

    Opening does not touch the network; call ``preflight()`` before training. With
    ``create_bucket`` that preflight creates a missing bucket (ignored for folders). Raises
    StorageError for an unsupported URI scheme or an s3:// URI without a bucket.
    """
    text = uri.strip()
    if is_remote(text):
        bucket, prefix = split_s3_uri(text)
        return S3Storage(
            bucket,
            prefix,
            endpoint_url=endpoint_url,
            region=region,
            path_style=path_style,
            create_bucket=create_bucket,
        )
    parsed = urlparse(text)
    if parsed.scheme.lower() == "file":
        return LocalStorage(parsed.path)
    if len(parsed.scheme) > 1:  # one letter: a Windows drive
        raise StorageError(f"unsupported storage URI {uri!r}: use a local folder or s3://bucket/prefix")
    return LocalStorage(text)


# --------------------------------------------------------------------------- input files


@dataclass(frozen=True)
class InputFile:
    """One input file (a local file or an S3 object) matched by a data path."""

    uri: str  # absolute path, or s3://bucket/key
    size: int
    tag: str  # content identity: sha256 of a local file, the ETag of an object


_GLOB_CHARS = "*?["


def list_inputs(
    pattern: str, *, endpoint_url: str | None = None, region: str | None = None
) -> list[InputFile]:
    """The files a data path names, sorted by name: a file, a folder (its files, not hidden ones),
    a glob (``**`` for any depth), an ``s3://bucket/prefix/`` (every object below it) or an
    ``s3://bucket/prefix/*.txt`` glob. Buckets use the endpoint and credential rules of
    ``open_storage``. Raises StorageError naming the pattern when nothing matches.
    """
    import fnmatch
    import glob as globlib

    text = pattern.strip()
    if is_remote(text):
        bucket, key = split_s3_uri(text)
        store = S3Storage(bucket, "", endpoint_url=endpoint_url, region=region)
        cut = min((key.find(c) for c in _GLOB_CHARS if c in key), default=-1)
        if cut >= 0:
            listed = store.list_objects(key[:cut])
            found = [o for o in listed if fnmatch.fnmatchcase(o[0], key)]
        else:
            listed = store.list_objects(key)
            exact = [o for o in listed if o[0] == key]
            folder = f"{key}/" if key else ""
            found = exact or [o for o in listed if o[0].startswith(folder)]
        found = [o for o in found if not o[0].endswith("/") and not o[0].rsplit("/", 1)[-1].startswith(".")]
        if not found:
            raise StorageError(f"no input object matches {text} (endpoint {store.endpoint_url})")
        return [InputFile(f"s3://{bucket}/{k}", size, etag) for k, size, etag in found]
    path = Path(text).expanduser()
    if any(c in text for c in _GLOB_CHARS):
        files = [Path(f) for f in globlib.glob(str(path), recursive=True)]
    elif path.is_dir():
        files = [f for f in path.iterdir()]
    else:
        files = [path] if path.exists() else []
    files = sorted(f.resolve() for f in files if f.is_file() and not f.name.startswith("."))
    if not files:
        raise StorageError(f"{text}: file not found (no input file matches)")
    return [InputFile(str(f), f.stat().st_size, file_sha256(f)) for f in files]


def read_input(uri: str, *, endpoint_url: str | None = None, region: str | None = None) -> bytes:
    """The bytes of one input file (a local path or ``s3://bucket/key``); raise StorageError."""
    if is_remote(uri):
        bucket, key = split_s3_uri(uri)
        data = S3Storage(bucket, "", endpoint_url=endpoint_url, region=region).get_bytes(key)
        if data is None:
            raise StorageError(f"{uri}: no such object")
        return data
    try:
        return Path(uri).read_bytes()
    except FileNotFoundError:
        raise StorageError(f"{uri}: file not found") from None
    except OSError as exc:
        raise StorageError(f"{uri}: cannot read file ({exc.strerror or exc})") from exc


def file_sha256(path: Path | str) -> str:
    """sha256 of a file's bytes, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
