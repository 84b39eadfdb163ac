"""Keeping secrets out of text: the AWS secret key and session token, and any secret handed over.

Every message, log line, ``str`` or ``repr`` that the storage code makes goes through
``redact``, which replaces each known secret value with ``***``: the current
``AWS_SECRET_ACCESS_KEY`` and ``AWS_SESSION_TOKEN`` and every value given to
``register_secret`` (an ``S3Storage`` registers the keys it was handed).
"""

from __future__ import annotations

import os
import threading

_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_known_secrets: set[str] = set()
_secrets_lock = threading.Lock()


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
