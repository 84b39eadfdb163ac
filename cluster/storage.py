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
or ``repr`` made here; ``secrets.redact`` removes them from any other text.

This module is the public face: ``open_storage``, the ``Storage`` protocol and its errors.
The back ends live in ``local_storage.py`` and ``s3_storage.py``, key rules in ``keys.py``,
retries in ``retry.py``, input files in ``inputs.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import urlparse

from .secrets import redact


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
    # The back ends import this module's protocol and errors, so they are imported here, not at the top.
    from .keys import is_remote, split_s3_uri
    from .local_storage import LocalStorage
    from .s3_storage import S3Storage

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
