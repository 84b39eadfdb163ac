"""A prefix in an S3-compatible bucket as storage (AWS S3, MinIO, SeaweedFS, ...), through boto3.

Building the client (path-style addressing for a non-AWS endpoint, bounded timeouts and
retries so a wrong endpoint fails in seconds), ``preflight``'s one-sentence diagnosis of
what is wrong with endpoint, credentials or bucket, and conditional writes with
``If-None-Match: *`` and ``If-Match: <etag>`` once a probe has shown that the server honours
them. Every failure becomes a StorageError (see ``s3_errors`` for how a botocore failure is
read); no message holds a secret.
"""

from __future__ import annotations

import builtins
import os
import threading
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .keys import PREFLIGHT_MARK, TMP_MARK, check_key, check_prefix, join_key
from .retry import is_transient
from .s3_errors import (
    CREDENTIAL_CODES,
    MISSING_CODES,
    PRECONDITION_CODES,
    client_error_code,
    connection_reason,
    is_connection_error,
    root_cause,
    unsupported_answer,
)
from .secrets import redact, register_secret
from .storage import ConditionalWriteUnsupported, StorageError, Versioned

DEFAULT_MULTIPART_THRESHOLD = 64 * 1024 * 1024
DEFAULT_MULTIPART_CHUNKSIZE = 16 * 1024 * 1024
PREFLIGHT_READ_TIMEOUT = 10.0
PREFLIGHT_MAX_ATTEMPTS = 1  # botocore's retries.max_attempts counts retries: 1 means two tries


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
        full = join_key(self.prefix, check_prefix(prefix))
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
        exc = root_cause(exc)
        where = f"s3://{self.bucket}/{join_key(self.prefix, key)}"
        ep = self.endpoint_url
        code, _status = client_error_code(exc)
        transient = is_transient(exc)
        if code:
            message = getattr(exc, "response", {}).get("Error", {}).get("Message", "")
            reason = f"{code}" + (f": {message}" if message and message != code else "")
        elif is_connection_error(exc):
            reason = f"cannot reach the endpoint ({connection_reason(exc)})"
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
            if client_error_code(exc)[0] in MISSING_CODES:
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
            if client_error_code(exc)[0] in MISSING_CODES:
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
            if client_error_code(exc)[0] in MISSING_CODES:
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
            if client_error_code(exc)[0] in MISSING_CODES:
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
            if client_error_code(exc)[0] != "NoSuchBucket":
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
            if client_error_code(exc)[0] == "BucketAlreadyOwnedByYou":
                return
            raise self._preflight_error(exc, creating=True) from exc

    def _preflight_error(
        self, exc: BaseException, *, writing: bool = False, creating: bool = False
    ) -> StorageError:
        """Turn a botocore failure during preflight into one clear sentence."""
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError

        ep, bucket = self.endpoint_url, self.bucket
        code, status = client_error_code(exc)
        where = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        if is_connection_error(exc):
            reason = connection_reason(exc)
            return StorageError(
                f"cannot reach S3 endpoint {ep} for bucket '{bucket}': {reason}", transient=True
            )
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StorageError(
                f"no S3 credentials found for bucket '{bucket}' at endpoint {ep}: set AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            )
        if code in CREDENTIAL_CODES:
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
                transient=is_transient(exc),
            )
        if code:
            message = getattr(exc, "response", {}).get("Error", {}).get("Message", "")
            detail = f"{code}: {message}" if message and message != code else code
            return StorageError(
                f"S3 endpoint {ep} refused access to {where} ({detail})", transient=is_transient(exc)
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
            if client_error_code(exc)[0] in MISSING_CODES:
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
            code, status = client_error_code(exc)
            if status in (412, 409) or code in PRECONDITION_CODES or code in MISSING_CODES:
                return None  # If-Match on a missing key: 404 on AWS, 412 on SeaweedFS
            if unsupported_answer(code, status):
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
                code, status = client_error_code(exc)
                if (
                    status in (400, 409, 412)
                    or code in PRECONDITION_CODES
                    or unsupported_answer(code, status)
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
            if refused not in PRECONDITION_CODES and refused != "412":
                return f"PutObject with If-None-Match: * on an existing object answered {refused}, not 412"
            stale, refused = put(b"3", IfMatch='"00000000000000000000000000000000"')
            if stale is not None:
                return "PutObject with If-Match and a wrong ETag overwrote the object"
            if refused not in PRECONDITION_CODES and refused != "412":
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


def _is_custom_endpoint(endpoint_url: str | None) -> bool:
    """True for an endpoint that is not AWS S3 (MinIO, SeaweedFS, ...): it gets path-style URLs."""
    host = (urlparse(endpoint_url or "").hostname or "").lower()
    return bool(host) and not host.endswith((".amazonaws.com", ".amazonaws.com.cn"))
