"""Input files named by a data path: a file, a folder, a glob or objects in a bucket.

``list_inputs`` expands a data path into the files it names, each with size and a content
tag (sha256 of a local file, the ETag of an object) that fingerprints depend on;
``read_input`` reads one of them. Buckets use the endpoint and credential rules of
``open_storage``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .digest import sha256_file
from .keys import is_remote, split_s3_uri
from .s3_storage import S3Storage
from .storage import StorageError


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
    return [InputFile(str(f), f.stat().st_size, sha256_file(f)) for f in files]


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
