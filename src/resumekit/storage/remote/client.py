"""Requests to one bucket: the s3fs session shared per configuration, its event loop, and the retry loop every
request goes through.

s3fs provides the session, the credentials chain and the event loop; the requests themselves are made on its
aiobotocore client directly, because the commit protocol needs exact control over which request is retried, how
multipart parts overlap, and how errors are classified (s3fs's own wrappers retry some permanent errors and turn
others into generic ``OSError`` s).

Every request is bounded, whatever the HTTP stack does: the client library retries nothing (``total_max_attempts``
1: each of our attempts is exactly one request, so the attempt count in a message is the number of requests sent),
no ``Expect: 100-continue`` header is sent (aiohttp waits for the ``100 Continue`` with no timeout: a store that
accepts the connection and never answers hung a PUT forever), and each attempt is cut after
:meth:`RemoteOptions.attempt_limit` seconds and at the preemption deadline (:mod:`resumekit.storage.deadline`).
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any

from ...errors import RemoteTransferError, StorageError
from ...units import one_line
from .. import deadline
from .options import RemoteOptions
from .retry import MISSING, OTHER, PERMANENT, classify, permanent_error, transfer_backoff

_INSTALL_HINT = "pip install 'resumekit[s3]'"

_FS_CACHE: dict[tuple[Any, ...], Any] = {}
_FS_LOCK = threading.Lock()
#: the environment a client is built from: a change makes a new client
_AWS_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "RESUMEKIT_S3_ADDRESSING_STYLE",
    "OBS_ACCESS_KEY_ID",
    "OBS_SECRET_ACCESS_KEY",
    "OBS_SECURITY_TOKEN",
    "OBS_REGION",
)
#: Where Huawei's tools look for the OBS endpoint when AWS_ENDPOINT_URL is not set: the OBS SDK's samples and
#: obsutil (``OBS_ENDPOINT``), ModelArts training containers and MoXing (``S3_ENDPOINT`` + ``S3_USE_HTTPS``).
OBS_ENDPOINT_VARS = ("OBS_ENDPOINT", "S3_ENDPOINT")
#: How long after a transfer failure best-effort cleanup (aborting an upload, removing a half-written step) is
#: skipped: against a dead endpoint it would only add one more timeout per object before the error is reported.
_CLEANUP_QUIET_S = 60.0
#: How often a request in flight looks at the preemption deadline.
_DEADLINE_POLL_S = 0.25
#: (endpoint, bucket) -> time.monotonic() of the last request that used up its retries
_LAST_FAILURE: dict[tuple[str | None, str], float] = {}


def endpoint_from_env(scheme: str = "s3", environ: dict[str, str] | None = None) -> str | None:
    """The endpoint URL for ``scheme`` (``s3`` or ``obs``) from the environment, or None for AWS's default.

    ``AWS_ENDPOINT_URL_S3`` and ``AWS_ENDPOINT_URL`` come first for both schemes; ``obs://`` roots then fall back
    to the OBS variables (:data:`OBS_ENDPOINT_VARS`); a bare host gets ``https://`` (``http://`` when
    ``S3_USE_HTTPS`` is 0/false, as MoXing reads it).
    """
    env = os.environ if environ is None else environ
    url = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if url:
        return url
    if scheme != "obs":
        return None
    for var in OBS_ENDPOINT_VARS:
        host = (env.get(var) or "").strip()
        if host:
            if "://" in host:
                return host
            plain = env.get("S3_USE_HTTPS", "1").strip().lower() in ("0", "false", "no")
            return f"{'http' if plain else 'https'}://{host}"
    return None


def obs_region(endpoint: str | None) -> str | None:
    """The region in an OBS endpoint (``https://obs.cn-north-4.myhuaweicloud.com`` -> ``cn-north-4``), else None.

    OBS checks the region of a V4 signature; users of ``obs://`` rarely set ``AWS_DEFAULT_REGION``.
    """
    if not endpoint:
        return None
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
    parts = host.split(".")
    if len(parts) >= 4 and parts[0] == "obs" and "myhuaweicloud" in parts[2:]:
        return parts[1]
    return None


def _make_fs(endpoint: str | None, options: RemoteOptions, scheme: str = "s3") -> Any:
    """One s3fs client per configuration and process: building one loads botocore's service model (~0.5 s), which
    would otherwise be paid by every storage object the CLI, the manager and the supervisor open."""
    key = (
        os.getpid(),
        scheme,
        endpoint,
        options.connect_timeout,
        options.read_timeout,
        options.concurrency,
        tuple(os.environ.get(k) for k in _AWS_ENV),
    )
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
        if fs is None:
            fs = _FS_CACHE[key] = _new_fs(endpoint, options, scheme)
        return fs


def _credentials(scheme: str) -> dict[str, Any]:
    """Explicit credentials for s3fs: only for ``obs://`` with the OBS variables and no AWS ones (the AWS chain,
    profiles included, stays in charge otherwise)."""
    env = os.environ
    if scheme != "obs" or env.get("AWS_ACCESS_KEY_ID") or not env.get("OBS_ACCESS_KEY_ID"):
        return {}
    return {
        "key": env.get("OBS_ACCESS_KEY_ID"),
        "secret": env.get("OBS_SECRET_ACCESS_KEY"),
        "token": env.get("OBS_SECURITY_TOKEN") or None,
    }


def _new_fs(endpoint: str | None, options: RemoteOptions, scheme: str = "s3") -> Any:
    """A new s3fs filesystem with resumekit's client settings (timeouts, no retries of its own, pool size)."""
    try:
        import s3fs
    except ImportError as e:
        raise ImportError(f"{scheme}:// checkpoint roots need s3fs ({e}); install it with {_INSTALL_HINT}") from None
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if not region and scheme == "obs":
        region = os.environ.get("OBS_REGION") or obs_region(endpoint)
    client_kwargs: dict[str, Any] = {}
    if region:
        client_kwargs["region_name"] = region
    if endpoint:
        # Passed explicitly: not every botocore release reads AWS_ENDPOINT_URL by itself.
        client_kwargs["endpoint_url"] = endpoint
    config: dict[str, Any] = {
        "connect_timeout": options.connect_timeout,
        "read_timeout": options.read_timeout,
        # Our retry loop is the only one. botocore's "max_attempts" counts retries *after* the first request
        # (max_attempts 1 sent two requests per attempt of ours); "total_max_attempts" counts requests.
        "retries": {"total_max_attempts": 1, "mode": "standard"},
        "max_pool_connections": max(10, 2 * options.concurrency),
    }
    style = os.environ.get("RESUMEKIT_S3_ADDRESSING_STYLE")
    if style:
        config["s3"] = {"addressing_style": style}
    try:
        import botocore.config

        probe = botocore.config.Config(request_checksum_calculation="when_required")
        del probe
        # The end-to-end xxh3 in the manifest already guards the data; the newer default CRC headers are rejected
        # by some S3-compatible stores (older MinIO, some OBS endpoints).
        config["request_checksum_calculation"] = "when_required"
        config["response_checksum_validation"] = "when_required"
    except (ImportError, TypeError):  # pragma: no cover - botocore < 1.36 has neither option
        pass
    return s3fs.S3FileSystem(
        skip_instance_cache=True,
        use_listings_cache=False,
        client_kwargs=client_kwargs,
        config_kwargs=config,
        **_credentials(scheme),
    )


def _drop_expect_header(params: dict[str, Any], **_: Any) -> None:
    """botocore asks for ``Expect: 100-continue`` on every PUT with a body; aiohttp then waits for the server's
    ``100 Continue`` with no timeout at all (its read timeout is paused while the body is unsent). Without the
    header the body goes out at once and the read timeout covers the wait for the answer. The header is not
    signed, so dropping it after botocore added it is safe."""
    headers = params.get("headers")
    if headers is not None:
        headers.pop("Expect", None)


class _NoAnswer(TimeoutError):
    """A request got no complete answer within its limit (:meth:`RemoteOptions.attempt_limit`)."""


def _timed_out(exc: BaseException) -> bool:
    """Whether a failure was a wait for an answer that did not come (ours, aiohttp's or botocore's timeouts)."""
    return isinstance(exc, (TimeoutError, asyncio.TimeoutError)) or "Timeout" in type(exc).__name__


class BucketClient:
    """Request plumbing for one bucket, the base of :class:`~resumekit.storage.remote.RemoteStorage`.

    Coroutines run on s3fs's event-loop thread (:meth:`_sync` waits, :meth:`_submit` does not); every request goes
    through :meth:`_call` or :meth:`_retry`, which bound each attempt, retry transient failures and turn the others
    into one-line errors. Readers and writers send their requests through the storage object, so a test can watch
    or replace :meth:`_call` on one instance.

    Args:
        bucket: the bucket every request addresses.
        options: tuning (retries, backoff, timeouts, concurrency).
        scheme: ``s3`` or ``obs``: how URIs are written back, and where the endpoint is looked up.
    """

    def __init__(self, bucket: str, options: RemoteOptions, scheme: str = "s3"):
        self.bucket = bucket
        self.options = options
        self.scheme = scheme
        self.endpoint: str | None = endpoint_from_env(scheme)
        self._fs = _make_fs(self.endpoint, self.options, scheme)
        self._loop = self._fs.loop
        self._rand = random.Random()

    @property
    def endpoint_name(self) -> str:
        return self.endpoint or "the default AWS endpoint"

    @property
    def last_transfer_failure(self) -> float | None:
        """``time.monotonic()`` when a request to this bucket and endpoint last used up its retries waiting for
        answers that never came (timeouts; a refused or cut connection fails fast, so cleanup after it costs
        little), else None.

        Shared by every storage object of the process on the same bucket (the manager, its lease and the tiered
        uploader each open their own): an unreachable store is a property of the endpoint.
        """
        return _LAST_FAILURE.get((self.endpoint, self.bucket))

    def _note_failure(self) -> None:
        _LAST_FAILURE[(self.endpoint, self.bucket)] = time.monotonic()

    def _sync(self, coro: Awaitable[Any]) -> Any:
        """Run a coroutine on s3fs's event-loop thread and wait for it (callable from any other thread).

        The wait needs no timeout of its own: every request inside is bounded by :meth:`_attempt`.
        """
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        return fut.result()

    def _submit(self, coro: Awaitable[Any]) -> Future[Any]:
        """Start a coroutine on s3fs's event-loop thread; the caller waits on the future when it needs the result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]

    async def _client(self) -> Any:
        s3 = await self._fs.set_session()
        if not getattr(s3, "_resumekit_ready", False):
            # Registered last so it runs after botocore's own handler has added the header.
            s3.meta.events.register_last("before-call.s3", _drop_expect_header)
            s3._resumekit_ready = True
        return s3

    def cleanup_allowed(self) -> bool:
        """Whether best-effort cleanup requests are worth sending now: not past the preemption deadline and not
        right after a request timed out through all its retries (each cleanup request would cost one more timeout
        before the caller can report; gc collects what is left)."""
        left = deadline.remaining()
        if left is not None and left <= 0:
            return False
        last = self.last_transfer_failure
        return last is None or time.monotonic() - last > _CLEANUP_QUIET_S

    async def _attempt(self, fn: Callable[[], Awaitable[Any]], limit: float) -> Any:
        """One request, cut after ``limit`` seconds or at the preemption deadline, whichever comes first.

        Raises:
            _NoAnswer: the limit passed (a transient failure: retried).
            asyncio.TimeoutError: never; aiohttp's own timeouts surface as botocore errors.
        """
        task = asyncio.ensure_future(fn())
        end = time.monotonic() + limit
        try:
            while True:
                now = time.monotonic()
                left = deadline.remaining(now)
                stop = end if left is None else min(end, now + left)
                if stop <= now:
                    raise _NoAnswer(f"no answer within {limit:.1f} s" if stop == end else deadline.reason())
                # Short slices: a preemption deadline may be set while this request waits.
                done, _ = await asyncio.wait({task}, timeout=min(stop - now, _DEADLINE_POLL_S))
                if done:
                    return task.result()
        finally:
            if not task.done():
                task.cancel()  # closes the connection: a late answer cannot be mistaken for the next one
                await asyncio.wait({task}, timeout=1.0)

    async def _retry(
        self, what: str, fn: Callable[[], Awaitable[Any]], nbytes: int = 0, attempts: int | None = None
    ) -> Any:
        """Run ``fn`` until it succeeds, retrying transient failures with backoff; map the rest to clear errors.

        Args:
            what: the request in messages, e.g. ``"write s3://bucket/key"``.
            fn: sends the request once.
            nbytes: bytes the request moves (sizes its time limit).
            attempts: at most this many requests (default :attr:`RemoteOptions.retries`).
        """
        opts = self.options
        budget = opts.retries if attempts is None else attempts
        limit = opts.attempt_limit(nbytes)
        t0 = time.monotonic()
        sent = 0
        last: BaseException | None = None
        while True:
            left = deadline.remaining()
            if left is not None and left <= 0:
                raise self._stopped(what, sent, t0, last)
            sent += 1
            try:
                result = await self._attempt(fn, limit)
                _LAST_FAILURE.pop((self.endpoint, self.bucket), None)  # the store answers again
                return result
            except asyncio.CancelledError:
                raise
            except Exception as e:
                last = e
                kind = classify(e)
                if kind in (MISSING, PERMANENT, OTHER):
                    _LAST_FAILURE.pop((self.endpoint, self.bucket), None)  # an answer: the store is reachable
                if kind == MISSING:
                    raise FileNotFoundError(f"{what}: no such object ({one_line(e)})") from None
                if kind == PERMANENT:
                    raise permanent_error(what, e, self.bucket, self.endpoint_name) from None
                if kind == OTHER:
                    raise StorageError(
                        f"{what} at {self.endpoint_name} failed: {type(e).__name__}: {one_line(e)}"
                    ) from e
                left = deadline.remaining()
                if left is not None and left <= 0:
                    raise self._stopped(what, sent, t0, e) from e
                if sent >= budget:
                    if _timed_out(e):
                        self._note_failure()
                    raise RemoteTransferError(
                        f"{what} failed after {sent} attempts in {time.monotonic() - t0:.1f} s: "
                        f"{type(e).__name__}: {one_line(e)}; check the network and AWS_ENDPOINT_URL "
                        f"({self.endpoint_name}); RESUMEKIT_S3_RETRIES sets the retry budget"
                    ) from e
                delay = transfer_backoff(sent, opts.backoff, opts.backoff_max, self._rand.random())
                if left is not None and left <= delay:
                    raise self._stopped(what, sent, t0, e) from e
                await asyncio.sleep(delay)

    def _stopped(self, what: str, sent: int, t0: float, last: BaseException | None) -> RemoteTransferError:
        """The error of a request stopped by the preemption deadline (``sent`` requests went out)."""
        self._note_failure()
        why = f"; last error: {type(last).__name__}: {one_line(last)}" if last is not None else ""
        return RemoteTransferError(
            f"{what} at {self.endpoint_name} stopped after {sent} attempts in {time.monotonic() - t0:.1f} s: "
            f"{deadline.reason()}{why}"
        )

    async def _call(self, what: str, method: str, *, nbytes: int | None = None, **kw: Any) -> Any:
        """One S3 API request (``method`` of the aiobotocore client), retried; ``what`` names it in errors.

        Args:
            nbytes: bytes the request moves, for its time limit (default: the size of ``Body``).
        """

        async def once() -> Any:
            s3 = await self._client()
            return await getattr(s3, method)(**kw)

        if nbytes is None:
            body = kw.get("Body")
            nbytes = len(body) if isinstance(body, (bytes, bytearray, memoryview)) else 0
        return await self._retry(f"{what} {self._describe(kw)}", once, nbytes=nbytes)

    def _describe(self, kw: dict[str, Any]) -> str:
        key = kw.get("Key") or kw.get("Prefix")
        return f"{self.scheme}://{self.bucket}/{key}" if key else f"{self.scheme}://{self.bucket}"

    async def _abort_upload(self, key: str, upload_id: str) -> None:
        """Abort a multipart upload, once, bounded and quietly (a failure leaves it to ``abort_stale_uploads``).

        Skipped right after a transfer failure or past the preemption deadline: the store is likely unreachable,
        and one more timeout would only delay the error the caller is about to report.
        """
        if not self.cleanup_allowed():
            return
        try:

            async def once() -> Any:
                s3 = await self._client()
                return await s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)

            await self._attempt(once, self.options.attempt_limit(0))
        except Exception:  # noqa: BLE001 - best effort: gc (abort_stale_uploads) removes what is left
            pass


__all__ = ["BucketClient", "endpoint_from_env", "obs_region", "OBS_ENDPOINT_VARS"]
