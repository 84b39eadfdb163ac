"""Storage keys and locations: how keys are joined and checked, and how an ``s3://`` URI splits.

Keys are '/'-separated paths relative to the storage root; a key never starts with '/' and
never holds an empty, '.' or '..' part, so it cannot escape the root of a folder. A *prefix*
names a folder of keys. The marks name raytag's own temporary, lock and probe files
(listings leave the temporary and lock files out).
"""

from __future__ import annotations

from urllib.parse import urlparse

from .storage import StorageError

TMP_MARK = ".raytag-tmp-"
PREFLIGHT_MARK = ".raytag-preflight-"
LOCK_MARK = f"{TMP_MARK}flock-"  # a folder's sidecar lock file for replace_if (never listed)


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


def check_prefix(prefix: str) -> str:
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
