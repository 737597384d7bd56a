"""Requests to one bucket: the s3fs session shared per configuration, its event loop, and the retry loop every
request goes through.

s3fs provides the session, the credentials chain and the event loop; the requests themselves are made on its
aiobotocore client directly, because the commit protocol needs exact control over which request is retried, how
multipart parts overlap, and how errors are classified (s3fs's own wrappers retry some permanent errors and turn
others into generic ``OSError`` s).
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from concurrent.futures import Future
from typing import Any, Awaitable, Callable, Dict, Optional, Tuple

from ...errors import RemoteTransferError, StorageError
from ...units import one_line
from .options import RemoteOptions
from .retry import MISSING, OTHER, PERMANENT, classify, permanent_error, transfer_backoff

_INSTALL_HINT = "pip install 'resumekit[s3]'"

_FS_CACHE: Dict[Tuple[Any, ...], Any] = {}
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
)


def _make_fs(endpoint: Optional[str], options: RemoteOptions) -> Any:
    """One s3fs client per configuration and process: building one loads botocore's service model (~0.5 s), which
    would otherwise be paid by every storage object the CLI, the manager and the supervisor open."""
    key = (
        os.getpid(),
        endpoint,
        options.connect_timeout,
        options.read_timeout,
        options.concurrency,
        tuple(os.environ.get(k) for k in _AWS_ENV),
    )
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
        if fs is None:
            fs = _FS_CACHE[key] = _new_fs(endpoint, options)
        return fs


def _new_fs(endpoint: Optional[str], options: RemoteOptions) -> Any:
    """A new s3fs filesystem with resumekit's client settings (timeouts, no retries of its own, pool size)."""
    try:
        import s3fs
    except ImportError as e:
        raise ImportError(f"s3:// checkpoint roots need s3fs ({e}); install it with {_INSTALL_HINT}") from None
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    client_kwargs: Dict[str, Any] = {}
    if region:
        client_kwargs["region_name"] = region
    if endpoint:
        # Passed explicitly: not every botocore release reads AWS_ENDPOINT_URL by itself.
        client_kwargs["endpoint_url"] = endpoint
    config: Dict[str, Any] = {
        "connect_timeout": options.connect_timeout,
        "read_timeout": options.read_timeout,
        # Our retry loop is the only one: stacked retries would multiply the budget and hide what happened.
        "retries": {"max_attempts": 1, "mode": "standard"},
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
        skip_instance_cache=True, use_listings_cache=False, client_kwargs=client_kwargs, config_kwargs=config
    )


class BucketClient:
    """Request plumbing for one bucket, the base of :class:`~resumekit.storage.remote.RemoteStorage`.

    Coroutines run on s3fs's event-loop thread (:meth:`_sync` waits, :meth:`_submit` does not); every request goes
    through :meth:`_call`, hence through :meth:`_retry`, which retries transient failures and turns the others into
    one-line errors. Readers and writers send their requests through the storage object, so a test can watch or
    replace :meth:`_call` on one instance.

    Args:
        bucket: the bucket every request addresses.
        options: tuning (retries, backoff, timeouts, concurrency).
    """

    def __init__(self, bucket: str, options: RemoteOptions):
        self.bucket = bucket
        self.options = options
        self.endpoint: Optional[str] = (
            os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        )
        self._fs = _make_fs(self.endpoint, self.options)
        self._loop = self._fs.loop
        self._rand = random.Random()

    @property
    def endpoint_name(self) -> str:
        return self.endpoint or "the default AWS endpoint"

    def _sync(self, coro: Awaitable[Any]) -> Any:
        """Run a coroutine on s3fs's event-loop thread and wait for it (callable from any other thread)."""
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        return fut.result()

    def _submit(self, coro: Awaitable[Any]) -> "Future[Any]":
        """Start a coroutine on s3fs's event-loop thread; the caller waits on the future when it needs the result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]

    async def _client(self) -> Any:
        return await self._fs.set_session()

    async def _retry(self, what: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        """Run ``fn`` until it succeeds, retrying transient failures with backoff; map the rest to clear errors."""
        opts = self.options
        t0 = time.monotonic()
        for attempt in range(1, opts.retries + 1):
            try:
                return await fn()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - classified below; nothing is swallowed
                kind = classify(e)
                if kind == MISSING:
                    raise FileNotFoundError(f"{what}: no such object ({one_line(e)})") from None
                if kind == PERMANENT:
                    raise permanent_error(what, e, self.bucket, self.endpoint_name) from None
                if kind == OTHER:
                    raise StorageError(
                        f"{what} at {self.endpoint_name} failed: {type(e).__name__}: {one_line(e)}"
                    ) from e
                if attempt == opts.retries:
                    raise RemoteTransferError(
                        f"{what} failed after {attempt} attempts in {time.monotonic() - t0:.1f} s: "
                        f"{type(e).__name__}: {one_line(e)}; check the network and AWS_ENDPOINT_URL "
                        f"({self.endpoint_name}); RESUMEKIT_S3_RETRIES sets the retry budget"
                    ) from e
                await asyncio.sleep(transfer_backoff(attempt, opts.backoff, opts.backoff_max, self._rand.random()))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _call(self, what: str, method: str, **kw: Any) -> Any:
        """One S3 API request (``method`` of the aiobotocore client), retried; ``what`` names it in errors."""

        async def once() -> Any:
            s3 = await self._client()
            return await getattr(s3, method)(**kw)

        return await self._retry(f"{what} {self._describe(kw)}", once)

    def _describe(self, kw: Dict[str, Any]) -> str:
        key = kw.get("Key") or kw.get("Prefix")
        return f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"

    async def _abort_upload(self, key: str, upload_id: str) -> None:
        """Abort a multipart upload, once and quietly (a failure leaves it to ``abort_stale_uploads``)."""
        try:
            s3 = await self._client()
            await s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception:  # noqa: BLE001 - best effort: gc (abort_stale_uploads) removes what is left
            pass


__all__ = ["BucketClient"]
