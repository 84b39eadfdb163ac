"""Logging for every raytag process (the command line, Ray Train workers, sweep trials): one line
format on stderr, the libraries' chatter down to warnings, and known secret values (the AWS secret
key, session token, MLflow's password and token, a URL's password: `raytag.cluster.secrets`)
stripped from every line."""

from __future__ import annotations

import logging
import os
import sys

from raytag.cluster.secrets import redact


class RedactSecrets(logging.Filter):
    """Strip known secret values (`raytag.cluster.secrets.redact`) from every log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        clean = redact(text)
        if clean != text:
            record.msg, record.args = clean, ()
        return True


def setup_logging() -> None:
    """INFO lines `time raytag LEVEL message` on stderr, secrets redacted (idempotent)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s raytag %(levelname)s %(message)s", stream=sys.stderr
    )
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())
    for noisy in (
        "DeepSpeed",
        "deepspeed",
        "torch.distributed",
        "transformers",
        "datasets",
        "filelock",
        "mlflow",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
