"""Which object-store failures are retried, how long to wait between tries, and what to tell the user about the
ones no retry can fix. Pure functions over exception objects: unit-tested without a server."""

from __future__ import annotations

import asyncio

from ...errors import StorageError

PERMANENT, MISSING, TRANSIENT, OTHER = "permanent", "missing", "transient", "other"

#: Codes no retry can fix: a missing bucket and every flavour of wrong or missing credentials.
_PERMANENT_CODES = {
    "NoSuchBucket",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "InvalidBucketName",
    "AccountProblem",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidSecurity",
    "NotSignedUp",
    "AuthorizationHeaderMalformed",
    "PermanentRedirect",
    "InvalidRequest",
    "Forbidden",
    "403",
}
_MISSING_CODES = {"NoSuchKey", "NotFound", "404", "NoSuchUpload"}
_TRANSIENT_CODES = {
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "BadDigest",
    "IncompleteBody",
    "XAmzContentSHA256Mismatch",
    "OperationAborted",
    "500",
    "502",
    "503",
    "504",
}
#: botocore's exceptions for missing credentials or configuration: raised before any request is sent.
_CONFIG_ERRORS = ("NoCredentialsError", "PartialCredentialsError", "NoRegionError", "ProfileNotFound")
#: EPIPE, ECONNRESET, ECONNABORTED, ETIMEDOUT, ECONNREFUSED, EHOSTUNREACH
_TRANSIENT_ERRNOS = (32, 54, 103, 104, 110, 111, 113)


# The class name shows in messages ("... failed after 6 attempts: _ShortRead: ..."), so it keeps its name.
class _ShortRead(ConnectionError):
    """The server sent fewer bytes than the range asked for (a dropped connection that looked like an EOF)."""


def client_error_info(exc: BaseException) -> tuple[str, int] | None:
    """``(error code, HTTP status)`` of a botocore ``ClientError`` (anything with its ``response``), else None."""
    resp = getattr(exc, "response", None)
    if not isinstance(resp, dict):
        return None
    err = resp.get("Error") or {}
    meta = resp.get("ResponseMetadata") or {}
    return str(err.get("Code", "")), int(meta.get("HTTPStatusCode") or 0)


def classify(exc: BaseException) -> str:
    """``permanent`` (never retried), ``missing`` (no such key), ``transient`` (retried) or ``other``."""
    info = client_error_info(exc)
    if info is not None:
        code, status = info
        if code == "NoSuchBucket":
            return PERMANENT
        if code in _MISSING_CODES or (status == 404 and code not in _PERMANENT_CODES):
            return MISSING
        if code in _PERMANENT_CODES or status in (401, 403):
            return PERMANENT
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return TRANSIENT
        return OTHER
    if type(exc).__name__ in _CONFIG_ERRORS:
        return PERMANENT
    try:
        import botocore.exceptions as bex
        from botocore.parsers import ResponseParserError

        if isinstance(
            exc,
            (
                bex.ConnectionError,
                bex.HTTPClientError,
                bex.IncompleteReadError,
                bex.ResponseStreamingError,
                ResponseParserError,
            ),
        ):
            return TRANSIENT
    except ImportError:  # pragma: no cover - botocore comes with s3fs
        pass
    try:
        import aiohttp

        if isinstance(exc, aiohttp.ClientError):
            return TRANSIENT
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, ConnectionError, _ShortRead, EOFError)):
        return TRANSIENT
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno in _TRANSIENT_ERRNOS:
        return TRANSIENT
    return OTHER


def transfer_backoff(attempt: int, base: float, cap: float, rand: float) -> float:
    """Delay in seconds before retry number ``attempt`` (1-based) of one request: exponential, capped, half of it
    jittered.

    Not the supervisor's ``restart_backoff`` (delays between restarts of a whole job, a different formula).

    Args:
        attempt: the retry about to be made, from 1.
        base: the first delay before jitter (:attr:`RemoteOptions.backoff`).
        cap: the largest delay (:attr:`RemoteOptions.backoff_max`).
        rand: a uniform random number in [0, 1): 0 waits half the delay, 1 all of it.
    """
    d = min(cap, base * (2 ** (attempt - 1)))
    return d / 2 + rand * d / 2


def permanent_error(what: str, exc: BaseException, bucket: str, endpoint: str) -> StorageError:
    """The one-line error for a failure no retry can fix, naming the bucket, the endpoint and the fix.

    Args:
        what: the request, e.g. ``"list s3://bucket/prefix/"``; the message starts with it.
        exc: the failure (:func:`classify` said ``permanent``).
        bucket: the bucket name.
        endpoint: the endpoint as the user should read it (e.g. ``"the default AWS endpoint"``).
    """
    info = client_error_info(exc)
    code = info[0] if info else type(exc).__name__
    b, ep = bucket, endpoint
    if code == "NoSuchBucket":
        fix = (
            f"bucket '{b}' does not exist at {ep}; create it (e.g. aws s3 mb s3://{b}) or fix the bucket "
            "name / AWS_ENDPOINT_URL"
        )
    elif code == "InvalidAccessKeyId":
        fix = (
            f"the access key is not known to {ep} (InvalidAccessKeyId); set AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY to credentials for bucket '{b}' at that endpoint"
        )
    elif code == "SignatureDoesNotMatch":
        fix = (
            f"{ep} rejected the request signature (SignatureDoesNotMatch): the secret key is wrong; check "
            "AWS_SECRET_ACCESS_KEY (and AWS_DEFAULT_REGION)"
        )
    elif code in ("NoCredentialsError", "PartialCredentialsError", "ProfileNotFound"):
        fix = (
            f"no usable AWS credentials ({code}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
            f"AWS_PROFILE) for bucket '{b}'"
        )
    elif code in ("ExpiredToken", "InvalidToken", "TokenRefreshRequired"):
        fix = f"the session token is invalid or expired ({code}); refresh AWS_SESSION_TOKEN"
    elif code == "NoRegionError":
        fix = "no region configured; set AWS_DEFAULT_REGION"
    else:
        fix = (
            f"access to bucket '{b}' at {ep} was refused ({code}); grant this identity s3:ListBucket, "
            "s3:GetObject, s3:PutObject and s3:DeleteObject on it, or use other credentials"
        )
    return StorageError(f"{what}: {fix}")


__all__ = [
    "PERMANENT",
    "MISSING",
    "TRANSIENT",
    "OTHER",
    "classify",
    "client_error_info",
    "transfer_backoff",
    "permanent_error",
]
