"""Keeping secrets out of text: the AWS secret key and session token, MLflow's password and token,
the password of a URL, and any secret handed over.

Every message, log line, ``str`` or ``repr`` that the storage code makes goes through
``redact``, which replaces each known secret value with ``***``: the current
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``MLFLOW_TRACKING_PASSWORD`` and
``MLFLOW_TRACKING_TOKEN``, every value given to ``register_secret`` (an ``S3Storage`` registers
the keys it was handed), and the password of any ``scheme://user:password@host`` URL.
"""

from __future__ import annotations

import os
import re
import threading

_SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
# scheme://user:PASSWORD@host: the user and the host stay readable
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^/\s@]+@")
_known_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Remember a secret value so that ``redact`` removes it from text from now on."""
    if value:
        with _secrets_lock:
            _known_secrets.add(value)


def redact(text: str, *secrets: str | None) -> str:
    """Return ``text`` with every known secret value replaced by ``***``.

    Known secrets: the current values of ``_SECRET_ENV``, secrets handed to an ``S3Storage``,
    ``secrets`` passed here (longest first, so a secret containing another is removed whole), and
    the password of any URL (``redact_urls``). Raises nothing.
    """
    with _secrets_lock:
        values = set(_known_secrets)
    values.update(os.environ.get(name, "") for name in _SECRET_ENV)
    values.update(s for s in secrets if s)
    for value in sorted((v for v in values if v), key=len, reverse=True):
        text = text.replace(value, "***")
    return redact_urls(text)


def redact_urls(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` URL replaced by ``***``."""
    return _URL_PASSWORD.sub(r"\1***@", text)
