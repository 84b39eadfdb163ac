"""sha256 digests as lowercase hex: of bytes in memory, and of a file read in 1 MiB pieces.

The one place raytag hashes content: checkpoint manifests, shard and input fingerprints and a
folder's conditional-write versions all compare these hex strings, so every caller must get
the same text for the same bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    """sha256 of ``data`` as lowercase hex."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path | str) -> str:
    """sha256 of a file's bytes as lowercase hex, read in 1 MiB pieces; raises OSError."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
