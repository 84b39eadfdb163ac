"""Retrying transient storage failures: which failures a later try may not hit, and the retry loop.

``is_transient`` is the one test of "worth retrying" (a StorageError says so itself; a raw
botocore failure is read through ``s3_errors``); ``with_retries`` calls a storage action
again after a growing wait while it fails that way, within a ``RetryPolicy``'s count and
time budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .s3_errors import RETRYABLE_CODES, client_error_code, is_connection_error, root_cause
from .secrets import redact
from .storage import StorageError

T = TypeVar("T")


def is_transient(exc: BaseException) -> bool:
    """True when a retry may cure ``exc``: a StorageError marked transient, a connection or
    timeout error, or a botocore failure for network trouble, a 5xx answer or throttling.

    Two kinds of caller share this test, each reaching its own branch. ``with_retries`` sees
    what a storage action raised: a StorageError, whose ``transient`` was decided when it was
    made (so a StorageError not marked transient is not), or a plain ConnectionError or
    TimeoutError. S3Storage sees a raw botocore/boto3 failure when it makes that StorageError
    (botocore's errors carry no ``transient``; the error codes decide). S3Storage never hands
    a StorageError here, and storage actions never let a raw botocore failure out, so each
    caller gets the answer it got from its own test before the two were merged.
    """
    if getattr(exc, "transient", False) or isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, StorageError):
        return False
    exc = root_cause(exc)
    if is_connection_error(exc):
        return True
    code, status = client_error_code(exc)
    return status >= 500 or code in RETRYABLE_CODES


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

    @classmethod
    def of(
        cls, budget_s: float | None, retries: int, backoff_s: float = 0.5, max_backoff_s: float = 8.0
    ) -> RetryPolicy:
        """A budget in seconds when one is given (run.storage_retry_seconds), else `retries` tries."""
        if budget_s is not None:
            return cls.for_seconds(budget_s, backoff_s, max_backoff_s)
        return cls(retries, backoff_s, max_backoff_s)


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
