"""What a botocore or boto3 failure means: its S3 error code and HTTP status, and its kind.

S3Storage turns every failure into one StorageError sentence; these functions read the raw
exception for it (missing key, refused credentials, a refused condition, a connection that
could not be made and why), and ``retry.is_transient`` uses them to tell network trouble,
5xx answers and throttling from failures a retry will not fix. botocore is imported only
when an exception is looked at.
"""

from __future__ import annotations

from typing import Any

RETRYABLE_CODES = {
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
CREDENTIAL_CODES = {
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "AuthorizationHeaderMalformed",
    "InvalidSecurity",
    "403",
}
MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
PRECONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}


def client_error_code(exc: BaseException) -> tuple[str, int]:
    """(error code, HTTP status) of a botocore ClientError; ('', 0) for other exceptions."""
    response: dict[str, Any] = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def root_cause(exc: BaseException) -> BaseException:
    """The botocore error behind boto3's S3UploadFailedError (which only sets __context__)."""
    from boto3.exceptions import S3UploadFailedError

    if isinstance(exc, S3UploadFailedError) and exc.__context__ is not None:
        return exc.__context__
    return exc


def is_connection_error(exc: BaseException) -> bool:
    """True when ``exc`` says the endpoint could not be reached or stopped answering."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    return isinstance(exc, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError))


def connection_reason(exc: BaseException) -> str:
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


def unsupported_answer(code: str, status: int) -> bool:
    """True when a conditional PutObject was refused because the server does not do conditions."""
    return status == 501 or code in ("NotImplemented", "InvalidArgument", "InvalidRequest")
