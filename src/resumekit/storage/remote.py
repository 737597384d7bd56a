"""Object stores (AWS S3, Huawei OBS, MinIO, anything S3-compatible) through s3fs: manifest-last commit.

Object stores have no rename, so the commit strategy differs from the local one:

* A :class:`RemoteTransaction` writes the data objects straight under ``prefix/step_N/`` (one PUT for small files;
  a multipart upload with several parts in flight for large ones) and :meth:`RemoteTransaction.commit` PUTs
  ``manifest.json`` last, in a single request, after checking that every data object is there with its size.
  A step counts only when its manifest exists and every object it lists exists with the listed size (the native
  layout's quick validation); checksums are verified while downloading.
* :meth:`RemoteStorage.remove_tree` deletes the manifest *first*, so a half-deleted step never looks valid;
  :meth:`RemoteStorage.rename` (quarantine) copies the data, then the manifest, then removes the source.
* Every request is retried with exponential backoff and jitter on transient errors (timeouts, 5xx, throttling,
  dropped or reset connections) and never on errors retries cannot fix (missing bucket, wrong credentials, access
  denied): those become one-line :class:`~resumekit.errors.StorageError` s naming the bucket, the endpoint and the
  fix. A request that fails past its retry budget raises :class:`~resumekit.errors.RemoteTransferError`.

Configuration is the standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``/``AWS_REGION``, ``AWS_PROFILE``) plus the
``RESUMEKIT_S3_*`` tuning variables of :class:`RemoteOptions`.

s3fs provides the session, the credentials chain and the event loop; the requests themselves are made on its
aiobotocore client directly, because the commit protocol needs exact control over which request is retried, how
multipart parts overlap, and how errors are classified (s3fs's own wrappers retry some permanent errors and turn
others into generic ``OSError`` s).
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, fields
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple

from ..errors import ConfigError, RemoteTransferError, StorageError
from ..format import MANIFEST
from .base import Entry, Storage, Transaction

MiB = 1 << 20
#: S3's smallest allowed part (all but the last) and largest single PUT / copy.
_MIN_PART = 5 * MiB
_MAX_SINGLE = 5 * 1024 * MiB
_MAX_PARTS = 10_000
_DELETE_BATCH = 1000

_INSTALL_HINT = "pip install 'resumekit[s3]'"


def _env_number(name: str, default: Any, kind: type) -> Any:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return kind(float(raw)) if kind is int else kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None


@dataclass(kw_only=True)
class RemoteOptions:
    """Tuning of the object-store backend. Each field can be set by the environment variable named below.

    Attributes:
        part_size: bytes per multipart part (``RESUMEKIT_S3_PART_SIZE``); files up to this size go in one PUT. It
            doubles every 1000 parts so a file of any size fits S3's 10,000-part limit.
        concurrency: requests in flight per file: parts of one upload, ranges of one download
            (``RESUMEKIT_S3_CONCURRENCY``). Memory per open file is about ``part_size * (concurrency + 1)``.
        read_chunk: bytes per ranged GET when reading (``RESUMEKIT_S3_READ_CHUNK``); up to ``concurrency`` of
            them are in flight ahead of the reader. Fewer, larger ranges measured faster than 8 MiB ones (see
            benchmarks/bench_remote.py); every range is retried on its own.
        retries: attempts per request before giving up on transient errors (``RESUMEKIT_S3_RETRIES``).
        backoff: first retry delay in seconds; doubles per attempt, with jitter (``RESUMEKIT_S3_BACKOFF``).
        backoff_max: largest retry delay in seconds (``RESUMEKIT_S3_BACKOFF_MAX``).
        connect_timeout: seconds to open a connection (``RESUMEKIT_S3_CONNECT_TIMEOUT``).
        read_timeout: seconds without a byte from the server before a request counts as failed
            (``RESUMEKIT_S3_READ_TIMEOUT``).
    """

    # Defaults from benchmarks/bench_remote.py --sweep: 8-16 MiB parts with 4-16 in flight were equally fast,
    # 32+ MiB parts slower (fewer parts to overlap); 16 MiB x 8 bounds an upload's buffers to ~144 MiB.
    part_size: int = 16 * MiB
    concurrency: int = 8
    read_chunk: int = 32 * MiB
    retries: int = 6
    backoff: float = 0.2
    backoff_max: float = 8.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    _ENV = {"part_size": "RESUMEKIT_S3_PART_SIZE", "concurrency": "RESUMEKIT_S3_CONCURRENCY",
            "read_chunk": "RESUMEKIT_S3_READ_CHUNK", "retries": "RESUMEKIT_S3_RETRIES",
            "backoff": "RESUMEKIT_S3_BACKOFF", "backoff_max": "RESUMEKIT_S3_BACKOFF_MAX",
            "connect_timeout": "RESUMEKIT_S3_CONNECT_TIMEOUT", "read_timeout": "RESUMEKIT_S3_READ_TIMEOUT"}

    def __post_init__(self) -> None:
        if not isinstance(self.part_size, int) or self.part_size < _MIN_PART:
            raise ConfigError(f"RemoteOptions.part_size must be >= {_MIN_PART} bytes (S3's minimum part), "
                              f"got {self.part_size!r}")
        for name in ("concurrency", "read_chunk", "retries"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"RemoteOptions.{name} must be a positive integer, got {v!r}")
        for name in ("backoff", "backoff_max", "connect_timeout", "read_timeout"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"RemoteOptions.{name} must be a number of seconds >= 0, got {v!r}")

    @classmethod
    def from_env(cls, **overrides: Any) -> "RemoteOptions":
        """Defaults, then the ``RESUMEKIT_S3_*`` environment, then ``overrides``."""
        kw: Dict[str, Any] = {}
        types = {f.name: type(f.default) for f in fields(cls)}
        for name, var in cls._ENV.items():
            kw[name] = _env_number(var, getattr(cls, name), types[name])
        kw.update(overrides)
        return cls(**kw)


# ------------------------------------------------------------------------------------------------------------------
# Error classification: pure functions over exception objects (unit-tested without a server)
# ------------------------------------------------------------------------------------------------------------------

PERMANENT, MISSING, TRANSIENT, OTHER = "permanent", "missing", "transient", "other"

#: Codes no retry can fix: a missing bucket and every flavour of wrong or missing credentials.
_PERMANENT_CODES = {
    "NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
    "InvalidBucketName", "AccountProblem", "InvalidToken", "ExpiredToken", "TokenRefreshRequired",
    "InvalidSecurity", "NotSignedUp", "AuthorizationHeaderMalformed", "PermanentRedirect", "InvalidRequest",
    "Forbidden", "403",
}
_MISSING_CODES = {"NoSuchKey", "NotFound", "404", "NoSuchUpload"}
_TRANSIENT_CODES = {
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable", "SlowDown", "Throttling",
    "ThrottlingException", "RequestLimitExceeded", "BadDigest", "IncompleteBody", "XAmzContentSHA256Mismatch",
    "OperationAborted", "500", "502", "503", "504",
}


class _ShortRead(ConnectionError):
    """The server sent fewer bytes than the range asked for (a dropped connection that looked like an EOF)."""


def _client_error_info(exc: BaseException) -> Optional[Tuple[str, int]]:
    resp = getattr(exc, "response", None)
    if not isinstance(resp, dict):
        return None
    err = resp.get("Error") or {}
    meta = resp.get("ResponseMetadata") or {}
    return str(err.get("Code", "")), int(meta.get("HTTPStatusCode") or 0)


def classify(exc: BaseException) -> str:
    """``permanent`` (never retried), ``missing`` (no such key), ``transient`` (retried) or ``other``."""
    info = _client_error_info(exc)
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
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError", "NoRegionError", "ProfileNotFound"):
        return PERMANENT
    try:
        import botocore.exceptions as bex
        from botocore.parsers import ResponseParserError

        if isinstance(exc, (bex.ConnectionError, bex.HTTPClientError, bex.IncompleteReadError,
                            bex.ResponseStreamingError, ResponseParserError)):
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
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno in (32, 54, 103, 104, 110, 111, 113):
        return TRANSIENT  # EPIPE, ECONNRESET, ECONNABORTED, ETIMEDOUT, ECONNREFUSED, EHOSTUNREACH
    return OTHER


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def backoff_delay(attempt: int, base: float, cap: float, rand: float) -> float:
    """Delay before retry number ``attempt`` (1-based): exponential, capped, half of it jittered."""
    d = min(cap, base * (2 ** (attempt - 1)))
    return d / 2 + rand * d / 2


def _part_size_for(part_number: int, base: int) -> int:
    """Part size doubles every 1000 parts, so a stream of unknown length always fits in 10,000 parts."""
    return base << ((part_number - 1) // 1000)


# ------------------------------------------------------------------------------------------------------------------
# The backend
# ------------------------------------------------------------------------------------------------------------------


def _parse_uri(uri: str) -> Tuple[str, str]:
    scheme, _, rest = uri.partition("://")
    if scheme.lower() not in ("s3", "s3a"):
        raise ConfigError(f"unsupported storage URI {uri!r}: only s3://bucket/prefix is supported (Huawei OBS and "
                          "MinIO through their S3-compatible endpoint: set AWS_ENDPOINT_URL)")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ConfigError(f"storage URI {uri!r} names no bucket; use s3://bucket/prefix")
    return bucket, prefix.strip("/")


class RemoteStorage(Storage):
    """A checkpoint root under ``s3://bucket/prefix`` on any S3-compatible object store.

    Args:
        uri: ``s3://bucket/prefix``.
        create: check now that the bucket exists and the credentials work (a missing prefix is fine: object
            stores create it with the first object). With ``create=False`` nothing is sent until first use.
        options: tuning; default :meth:`RemoteOptions.from_env`.

    Raises:
        ImportError: s3fs is not installed (the message names ``pip install 'resumekit[s3]'``).
        StorageError: (with ``create``) the bucket is missing or the credentials are wrong.
    """

    is_local = False

    def __init__(self, uri: str, create: bool = True, options: Optional[RemoteOptions] = None):
        self.bucket, self.prefix = _parse_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.options = options or RemoteOptions.from_env()
        self.endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        self._fs = _make_fs(self.endpoint, self.options)
        self._loop = self._fs.loop
        self._rand = random.Random()
        if create:
            # A one-key listing rather than HeadBucket: HEAD answers carry no error code, so a missing bucket and
            # a wrong key would both read "404"/"403" instead of naming the problem.
            self._sync(self._call("list", "list_objects_v2", Bucket=self.bucket, Prefix=self._dir_prefix(""),
                                  MaxKeys=1))

    # -- plumbing -----------------------------------------------------------------------------------------------

    @property
    def endpoint_name(self) -> str:
        return self.endpoint or "the default AWS endpoint"

    def key(self, rel: str) -> str:
        rel = rel.strip("/")
        if not self.prefix:
            return rel
        return f"{self.prefix}/{rel}" if rel else self.prefix

    def join(self, rel: str) -> str:
        rel = rel.strip("/")
        return f"{self.uri}/{rel}" if rel else self.uri

    def _sync(self, coro: Awaitable[Any]) -> Any:
        """Run a coroutine on s3fs's event-loop thread and wait for it (callable from any other thread)."""
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        return fut.result()

    def _submit(self, coro: Awaitable[Any]) -> "Future[Any]":
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
                    raise FileNotFoundError(f"{what}: no such object ({_one_line(e)})") from None
                if kind == PERMANENT:
                    raise self._permanent_error(what, e) from None
                if kind == OTHER:
                    raise StorageError(f"{what} at {self.endpoint_name} failed: {type(e).__name__}: "
                                       f"{_one_line(e)}") from e
                if attempt == opts.retries:
                    raise RemoteTransferError(
                        f"{what} failed after {attempt} attempts in {time.monotonic() - t0:.1f} s: "
                        f"{type(e).__name__}: {_one_line(e)}; check the network and AWS_ENDPOINT_URL "
                        f"({self.endpoint_name}); RESUMEKIT_S3_RETRIES sets the retry budget") from e
                await asyncio.sleep(backoff_delay(attempt, opts.backoff, opts.backoff_max, self._rand.random()))
        raise AssertionError("unreachable")  # pragma: no cover

    def _permanent_error(self, what: str, e: BaseException) -> StorageError:
        info = _client_error_info(e)
        code = info[0] if info else type(e).__name__
        b, ep = self.bucket, self.endpoint_name
        if code == "NoSuchBucket":
            fix = (f"bucket '{b}' does not exist at {ep}; create it (e.g. aws s3 mb s3://{b}) or fix the bucket "
                   "name / AWS_ENDPOINT_URL")
        elif code == "InvalidAccessKeyId":
            fix = (f"the access key is not known to {ep} (InvalidAccessKeyId); set AWS_ACCESS_KEY_ID and "
                   f"AWS_SECRET_ACCESS_KEY to credentials for bucket '{b}' at that endpoint")
        elif code == "SignatureDoesNotMatch":
            fix = (f"{ep} rejected the request signature (SignatureDoesNotMatch): the secret key is wrong; check "
                   "AWS_SECRET_ACCESS_KEY (and AWS_DEFAULT_REGION)")
        elif code in ("NoCredentialsError", "PartialCredentialsError", "ProfileNotFound"):
            fix = (f"no usable AWS credentials ({code}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                   "AWS_PROFILE) for bucket '{b}'").replace("{b}", b)
        elif code in ("ExpiredToken", "InvalidToken", "TokenRefreshRequired"):
            fix = f"the session token is invalid or expired ({code}); refresh AWS_SESSION_TOKEN"
        elif code == "NoRegionError":
            fix = "no region configured; set AWS_DEFAULT_REGION"
        else:
            fix = (f"access to bucket '{b}' at {ep} was refused ({code}); grant this identity s3:ListBucket, "
                   "s3:GetObject, s3:PutObject and s3:DeleteObject on it, or use other credentials")
        return StorageError(f"{what}: {fix}")

    async def _call(self, what: str, method: str, **kw: Any) -> Any:
        async def once() -> Any:
            s3 = await self._client()
            return await getattr(s3, method)(**kw)

        return await self._retry(f"{what} {self._describe(kw)}", once)

    def _describe(self, kw: Dict[str, Any]) -> str:
        key = kw.get("Key") or kw.get("Prefix")
        return f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"

    # -- listing and metadata ---------------------------------------------------------------------------------------

    async def _list(self, prefix: str, delimiter: Optional[str]) -> Tuple[List[str], List[Dict[str, Any]]]:
        """(common prefixes, objects) under ``prefix``, every page."""
        dirs: List[str] = []
        objs: List[Dict[str, Any]] = []
        token: Optional[str] = None
        while True:
            kw: Dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if delimiter:
                kw["Delimiter"] = delimiter
            if token:
                kw["ContinuationToken"] = token
            page = await self._call("list", "list_objects_v2", **kw)
            dirs.extend(p["Prefix"] for p in page.get("CommonPrefixes") or [])
            objs.extend(page.get("Contents") or [])
            if not page.get("IsTruncated"):
                return dirs, objs
            token = page.get("NextContinuationToken")

    def _dir_prefix(self, rel: str) -> str:
        k = self.key(rel)
        return f"{k}/" if k else ""

    def listdir(self, rel: str = "") -> List[Entry]:
        base = self._dir_prefix(rel)
        dirs, objs = self._sync(self._list(base, "/"))
        out = [Entry(d[len(base):].rstrip("/"), True) for d in dirs if d[len(base):].strip("/")]
        for o in objs:
            name = o["Key"][len(base):]
            if not name or "/" in name:
                continue  # the "directory marker" some tools create for the prefix itself
            out.append(Entry(name, False, int(o.get("Size") or 0), _ts(o.get("LastModified"))))
        return out

    def _walk(self, rel: str) -> List[Dict[str, Any]]:
        """Every object under directory ``rel`` (recursive)."""
        return self._sync(self._list(self._dir_prefix(rel), None))[1]

    def _head(self, rel: str) -> Dict[str, Any]:
        return self._sync(self._call("stat", "head_object", Bucket=self.bucket, Key=self.key(rel)))

    def exists(self, rel: str) -> bool:
        try:
            self._head(rel)
            return True
        except FileNotFoundError:
            pass
        page = self._sync(self._call("list", "list_objects_v2", Bucket=self.bucket, Prefix=self._dir_prefix(rel),
                                     MaxKeys=1))
        return bool(page.get("Contents"))

    def size(self, rel: str) -> int:
        try:
            return int(self._head(rel)["ContentLength"])
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.join(rel)} does not exist") from None

    def mtime(self, rel: str) -> Optional[float]:
        """Modification time of an object, or of a "directory": the newest object under it (None when empty)."""
        try:
            return _ts(self._head(rel).get("LastModified"))
        except FileNotFoundError:
            pass
        times = [_ts(o.get("LastModified")) for o in self._walk(rel)]
        times = [t for t in times if t is not None]
        return max(times) if times else None

    # -- reading ----------------------------------------------------------------------------------------------------

    def read_bytes(self, rel: str) -> bytes:
        key = self.key(rel)

        async def once() -> bytes:
            s3 = await self._client()
            resp = await s3.get_object(Bucket=self.bucket, Key=key)
            async with resp["Body"] as body:
                data = await body.read()
            want = resp.get("ContentLength")
            if want is not None and len(data) != int(want):
                raise _ShortRead(f"got {len(data)} of {want} bytes")
            return data

        try:
            return self._sync(self._retry(f"read s3://{self.bucket}/{key}", once))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.join(rel)} does not exist") from None

    async def _get_range(self, key: str, start: int, end: int, etag: Optional[str]) -> bytes:
        """Bytes [start, end) of an object, retried as a unit (a body cut mid-transfer is fetched again)."""
        async def once() -> bytes:
            s3 = await self._client()
            kw: Dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Range": f"bytes={start}-{end - 1}"}
            if etag:
                kw["IfMatch"] = etag  # the object must not change between two ranges of one read
            resp = await s3.get_object(**kw)
            async with resp["Body"] as body:
                data = await body.read()
            if len(data) != end - start:
                raise _ShortRead(f"range {start}-{end - 1}: got {len(data)} of {end - start} bytes")
            return data

        return await self._retry(f"read s3://{self.bucket}/{key} [{start}:{end}]", once)

    def open_read(self, rel: str) -> io.BufferedReader:
        try:
            head = self._head(rel)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.join(rel)} does not exist") from None
        raw = _RangeReader(self, self.key(rel), int(head["ContentLength"]), head.get("ETag"))
        return io.BufferedReader(raw, buffer_size=256 * 1024)  # type: ignore[return-value]

    # -- writing ----------------------------------------------------------------------------------------------------

    def begin(self, name: str) -> "RemoteTransaction":
        return RemoteTransaction(self, name)

    def open_object_writer(self, rel: str) -> "_ObjectWriter":
        """A streaming writer of one object (multipart when large); the object exists once it is closed."""
        return _ObjectWriter(self, self.key(rel))

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        # A single PUT replaces an object atomically: readers see the old or the new bytes, never a mix.
        self._sync(self._call("write", "put_object", Bucket=self.bucket, Key=self.key(rel), Body=bytes(data)))

    # -- deleting and moving ----------------------------------------------------------------------------------------

    async def _delete_keys(self, keys: List[str]) -> None:
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = keys[i:i + _DELETE_BATCH]
            resp = await self._call("delete", "delete_objects", Bucket=self.bucket,
                                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            errors = [e for e in resp.get("Errors") or [] if e.get("Code") != "NoSuchKey"]
            if errors:
                e = errors[0]
                raise StorageError(f"cannot delete s3://{self.bucket}/{e.get('Key')}: {e.get('Code')} "
                                   f"{e.get('Message', '')}".rstrip() + f" ({len(errors)} object(s) not deleted)")

    def remove_tree(self, rel: str) -> None:
        """Delete a step: its manifest first (from then on it is not a checkpoint), then everything else."""
        rel = rel.strip("/")
        man = f"{rel}/{MANIFEST}"
        try:
            self._head(man)
            self._sync(self._call("delete", "delete_object", Bucket=self.bucket, Key=self.key(man)))
        except FileNotFoundError:
            pass
        keys = [o["Key"] for o in self._walk(rel)]
        if not keys:
            try:  # a single object rather than a "directory"
                self._head(rel)
                keys = [self.key(rel)]
            except FileNotFoundError:
                return
        self._sync(self._delete_keys(keys))

    async def _copy(self, src_key: str, dst_key: str, size: int) -> None:
        src = {"Bucket": self.bucket, "Key": src_key}
        if size <= _MAX_SINGLE:
            await self._call("copy", "copy_object", Bucket=self.bucket, Key=dst_key, CopySource=src)
            return
        # Objects above 5 GiB cannot be copied in one request: multipart copy in 1 GiB ranges.
        mpu = await self._call("copy", "create_multipart_upload", Bucket=self.bucket, Key=dst_key)
        uid = mpu["UploadId"]
        try:
            step = 1024 * MiB
            sem = asyncio.Semaphore(self.options.concurrency)

            async def part(n: int, start: int) -> Dict[str, Any]:
                async with sem:
                    r = await self._call("copy", "upload_part_copy", Bucket=self.bucket, Key=dst_key,
                                         UploadId=uid, PartNumber=n, CopySource=src,
                                         CopySourceRange=f"bytes={start}-{min(size, start + step) - 1}")
                    return {"PartNumber": n, "ETag": r["CopyPartResult"]["ETag"]}

            parts = await asyncio.gather(*[part(i + 1, s) for i, s in enumerate(range(0, size, step))])
            await self._call("copy", "complete_multipart_upload", Bucket=self.bucket, Key=dst_key, UploadId=uid,
                             MultipartUpload={"Parts": list(parts)})
        except BaseException:
            await self._abort_upload(dst_key, uid)
            raise

    async def _abort_upload(self, key: str, upload_id: str) -> None:
        try:
            s3 = await self._client()
            await s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception:  # noqa: BLE001 - best effort: gc (abort_stale_uploads) removes what is left
            pass

    def rename(self, src: str, dst: str) -> None:
        """Copy then delete (object stores cannot rename): data objects, then the manifest, then the source
        (its manifest first). At every instant at most one of the two names is a valid checkpoint... or both
        are, with identical content; never a partial one."""
        src, dst = src.strip("/"), dst.strip("/")
        objs = self._walk(src)
        if not objs:
            head = self._head(src)  # FileNotFoundError when there is nothing at all
            self._sync(self._copy(self.key(src), self.key(dst), int(head["ContentLength"])))
            self._sync(self._call("delete", "delete_object", Bucket=self.bucket, Key=self.key(src)))
            return
        base, dbase = self._dir_prefix(src), self._dir_prefix(dst)
        man_key = base + MANIFEST
        data = [o for o in objs if o["Key"] != man_key]

        async def copy_all() -> None:
            sem = asyncio.Semaphore(self.options.concurrency)

            async def one(o: Dict[str, Any]) -> None:
                async with sem:
                    await self._copy(o["Key"], dbase + o["Key"][len(base):], int(o.get("Size") or 0))

            await asyncio.gather(*[one(o) for o in data])
            for o in objs:
                if o["Key"] == man_key:
                    await self._copy(man_key, dbase + MANIFEST, int(o.get("Size") or 0))

        self._sync(copy_all())
        self.remove_tree(src)

    # -- maintenance ------------------------------------------------------------------------------------------------

    def abort_stale_uploads(self, older_than: float, dry_run: bool = False, now: Optional[float] = None) -> List[str]:
        """Abort multipart uploads under the prefix started more than ``older_than`` seconds ago (a killed save
        leaves them behind: invisible to listings, but billed). Returns the keys."""
        now = time.time() if now is None else now

        async def run() -> List[str]:
            found: List[Tuple[str, str]] = []
            kw: Dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._dir_prefix("")}
            while True:
                page = await self._call("list uploads", "list_multipart_uploads", **kw)
                for u in page.get("Uploads") or []:
                    t = _ts(u.get("Initiated"))
                    if t is not None and now - t >= older_than:
                        found.append((u["Key"], u["UploadId"]))
                if not page.get("IsTruncated"):
                    break
                kw["KeyMarker"] = page.get("NextKeyMarker")
                kw["UploadIdMarker"] = page.get("NextUploadIdMarker")
            if not dry_run:
                for key, uid in found:
                    await self._abort_upload(key, uid)
            return [f"s3://{self.bucket}/{k} (upload {u[:12]})" for k, u in found]

        return self._sync(run())


def _ts(value: Any) -> Optional[float]:
    if value is None:
        return None
    if hasattr(value, "timestamp"):
        return float(value.timestamp())
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


_FS_CACHE: Dict[Tuple[Any, ...], Any] = {}
_FS_LOCK = threading.Lock()
_AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION",
            "AWS_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "RESUMEKIT_S3_ADDRESSING_STYLE")


def _make_fs(endpoint: Optional[str], options: RemoteOptions) -> Any:
    """One s3fs client per configuration and process: building one loads botocore's service model (~0.5 s), which
    would otherwise be paid by every storage object the CLI, the manager and the supervisor open."""
    key = (os.getpid(), endpoint, options.connect_timeout, options.read_timeout, options.concurrency,
           tuple(os.environ.get(k) for k in _AWS_ENV))
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
        if fs is None:
            fs = _FS_CACHE[key] = _new_fs(endpoint, options)
        return fs


def _new_fs(endpoint: Optional[str], options: RemoteOptions) -> Any:
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
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, client_kwargs=client_kwargs,
                             config_kwargs=config)


# ------------------------------------------------------------------------------------------------------------------
# Streaming reader and writer
# ------------------------------------------------------------------------------------------------------------------


class _RangeReader(io.RawIOBase):
    """Sequential reads of one object as ranged GETs, ``concurrency`` ranges prefetched ahead of the reader.

    Each range is retried on its own, so a dropped connection costs one range, not the whole file. The object's
    ETag pins every range to the same version of the object.
    """

    def __init__(self, storage: RemoteStorage, key: str, size: int, etag: Optional[str]):
        super().__init__()
        self._st = storage
        self._key = key
        self._size = size
        self._etag = etag
        self._chunk = storage.options.read_chunk
        self._window = storage.options.concurrency
        self._pos = 0
        self._futs: Dict[int, "Future[bytes]"] = {}
        self._cur: Optional[Tuple[int, bytes]] = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def _fetch(self, idx: int) -> "Future[bytes]":
        fut = self._futs.get(idx)
        if fut is None:
            start = idx * self._chunk
            end = min(self._size, start + self._chunk)
            fut = self._st._submit(self._st._get_range(self._key, start, end, self._etag))
            self._futs[idx] = fut
        return fut

    def _block(self, idx: int) -> bytes:
        if self._cur is not None and self._cur[0] == idx:
            return self._cur[1]
        last = (self._size - 1) // self._chunk
        for j in range(idx, min(last, idx + self._window - 1) + 1):
            self._fetch(j)
        for j in [j for j in self._futs if j < idx]:  # seeked past: nobody will read them
            self._futs.pop(j).cancel()
        data = self._futs.pop(idx).result()
        self._cur = (idx, data)
        return data

    def readinto(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        n = min(len(mv), self._size - self._pos)
        if n <= 0:
            return 0
        idx = self._pos // self._chunk
        data = self._block(idx)
        off = self._pos - idx * self._chunk
        m = min(n, len(data) - off)
        mv[:m] = data[off:off + m]
        self._pos += m
        return m

    def close(self) -> None:
        for f in self._futs.values():
            f.cancel()
        self._futs.clear()
        self._cur = None
        super().close()


class _ObjectWriter:
    """Writes one object: a single PUT when it fits one part, else a multipart upload whose parts are sent while
    the caller keeps writing, at most ``concurrency`` in flight (the caller blocks when the window is full)."""

    def __init__(self, storage: RemoteStorage, key: str):
        self._st = storage
        self._key = key
        self._buf = bytearray()
        self._part_no = 0
        self._upload_id: Optional[str] = None
        self._futs: List["Future[Dict[str, Any]]"] = []
        self._sem = threading.BoundedSemaphore(storage.options.concurrency)
        self.size = 0
        self.closed = False
        self.aborted = False

    @property
    def name(self) -> str:
        return f"s3://{self._st.bucket}/{self._key}"

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, data: Any) -> int:
        if self.closed:
            raise ValueError(f"write to closed object writer {self.name}")
        mv = memoryview(data).cast("B")
        n = len(mv)
        self._buf += mv
        self.size += n
        limit = _part_size_for(self._part_no + 1, self._st.options.part_size)
        while len(self._buf) >= limit:
            part = bytes(self._buf[:limit])
            del self._buf[:limit]
            self._send_part(part)
            limit = _part_size_for(self._part_no + 1, self._st.options.part_size)
        return n

    def flush(self) -> None:
        pass

    def _raise_failed(self) -> None:
        for f in self._futs:
            if f.done() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]

    def _send_part(self, part: bytes) -> None:
        st = self._st
        if self._upload_id is None:
            mpu = st._sync(st._call("upload", "create_multipart_upload", Bucket=st.bucket, Key=self._key))
            self._upload_id = mpu["UploadId"]
        self._part_no += 1
        if self._part_no > _MAX_PARTS:
            raise StorageError(f"{self.name}: more than {_MAX_PARTS} parts; raise RESUMEKIT_S3_PART_SIZE")
        self._raise_failed()
        self._sem.acquire()  # back-pressure: bounds memory to `concurrency` parts in flight
        self._raise_failed()
        fut = st._submit(st._call("upload", "upload_part", Bucket=st.bucket, Key=self._key,
                                  UploadId=self._upload_id, PartNumber=self._part_no, Body=part))
        fut.add_done_callback(lambda _f: self._sem.release())
        self._futs.append(fut)

    def close(self) -> None:
        if self.closed:
            return
        st = self._st
        try:
            if self._upload_id is None:
                st._sync(st._call("upload", "put_object", Bucket=st.bucket, Key=self._key, Body=bytes(self._buf)))
            else:
                if self._buf or self._part_no == 0:
                    self._send_part(bytes(self._buf))
                parts = [{"PartNumber": i + 1, "ETag": f.result()["ETag"]} for i, f in enumerate(self._futs)]
                st._sync(self._complete(parts))
            self._buf = bytearray()
            self.closed = True
        except BaseException:
            self.abort()
            raise

    async def _complete(self, parts: List[Dict[str, Any]]) -> None:
        st = self._st
        try:
            await st._call("upload", "complete_multipart_upload", Bucket=st.bucket, Key=self._key,
                           UploadId=self._upload_id, MultipartUpload={"Parts": parts})
        except FileNotFoundError:
            # NoSuchUpload on a retry: the first attempt completed but its answer was lost. The object is there
            # with the right size, or the upload really failed.
            head = await st._call("stat", "head_object", Bucket=st.bucket, Key=self._key)
            if int(head["ContentLength"]) != self.size:
                raise
        self._upload_id = None

    def abort(self) -> None:
        """Stop the upload and discard its parts; never raises."""
        self.aborted = True
        self.closed = True
        for f in self._futs:
            f.cancel()
        for f in self._futs:
            try:
                f.result(timeout=60)
            except BaseException:  # noqa: BLE001 - only waiting for in-flight parts to settle
                pass
        if self._upload_id is not None:
            try:
                self._st._sync(self._st._abort_upload(self._key, self._upload_id))
            except BaseException:  # noqa: BLE001
                pass
            self._upload_id = None
        self._buf = bytearray()

    def __enter__(self) -> "_ObjectWriter":
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class RemoteTransaction(Transaction):
    """A step being written under ``prefix/step_N/``: data objects first, ``manifest.json`` last in one PUT.

    Until the manifest lands the step is not a checkpoint (discovery reports it as an unfinished save and
    ``resumekit gc`` removes it once stale); there is nothing to rename.
    """

    def __init__(self, storage: RemoteStorage, name: str):
        self.storage = storage
        self.name = name.strip("/")
        self._writers: List[Tuple[str, _ObjectWriter]] = []
        # Only an invalid step of the same number is ever replaced (the manager keeps valid ones): remove it,
        # manifest first, so objects being overwritten never sit under a manifest that vouches for old ones.
        storage.remove_tree(self.name)

    def open_write(self, rel: str) -> _ObjectWriter:  # type: ignore[override]
        if rel == MANIFEST:
            raise ValueError("the manifest is written by commit(), last")
        w = self.storage.open_object_writer(f"{self.name}/{rel}")
        self._writers.append((rel, w))
        return w

    def commit(self, manifest: bytes) -> str:
        st = self.storage
        for rel, w in self._writers:
            if not w.closed or w.aborted:
                raise StorageError(f"{st.join(self.name)}/{rel} was not completely written; not committing")
        # Every data object must be there with its size before the manifest vouches for it.
        for rel, w in self._writers:
            have = st.size(f"{self.name}/{rel}")
            if have != w.size:
                raise StorageError(f"{st.join(self.name)}/{rel} has {have} bytes after upload, {w.size} were "
                                   "written; not committing")
        st.write_bytes_atomic(f"{self.name}/{MANIFEST}", manifest)
        return st.join(self.name)

    def abort(self) -> None:
        for _, w in self._writers:
            if not w.closed:
                w.abort()
        try:
            self.storage.remove_tree(self.name)
        except BaseException:  # noqa: BLE001 - abort never raises; gc removes what is left
            pass


__all__ = ["RemoteStorage", "RemoteTransaction", "RemoteOptions", "classify", "backoff_delay"]
