"""The :class:`Storage` of an ``s3://bucket/prefix`` root and its :class:`RemoteTransaction`: listing, reading,
the manifest-last commit, deleting a step manifest first, quarantine by copy, and cleanup of abandoned multipart
uploads."""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any, Dict, List, Optional, Tuple

from ...errors import StorageError
from ...format import MANIFEST
from ..base import Entry, Storage, Transaction
from .client import BucketClient
from .options import DELETE_BATCH, MAX_SINGLE, MiB, RemoteOptions, parse_uri
from .reader import RangeReader
from .retry import _ShortRead
from .writer import ObjectWriter


def _ts(value: Any) -> Optional[float]:
    """Seconds since the epoch from what the S3 API returns for a time (a datetime, or a number), else None."""
    if value is None:
        return None
    if hasattr(value, "timestamp"):
        return float(value.timestamp())
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class RemoteTransaction(Transaction):
    """A step being written under ``prefix/step_N/``: data objects first, ``manifest.json`` last in one PUT.

    Until the manifest lands the step is not a checkpoint (discovery reports it as an unfinished save and
    ``resumekit gc`` removes it once stale); there is nothing to rename.

    Args:
        storage: the remote root.
        name: the step directory, e.g. ``step_000000100``.
    """

    def __init__(self, storage: "RemoteStorage", name: str):
        self.storage = storage
        self.name = name.strip("/")
        self._writers: List[Tuple[str, ObjectWriter]] = []
        # Only an invalid step of the same number is ever replaced (the manager keeps valid ones): remove it,
        # manifest first, so objects being overwritten never sit under a manifest that vouches for old ones.
        storage.remove_tree(self.name)

    def open_write(self, rel: str) -> ObjectWriter:  # type: ignore[override]
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
                raise StorageError(
                    f"{st.join(self.name)}/{rel} has {have} bytes after upload, {w.size} were written; not committing"
                )
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


class RemoteStorage(BucketClient, Storage):
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
        bucket, self.prefix = parse_uri(uri)
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        super().__init__(bucket, options or RemoteOptions.from_env())
        if create:
            # A one-key listing rather than HeadBucket: HEAD answers carry no error code, so a missing bucket and
            # a wrong key would both read "404"/"403" instead of naming the problem.
            self._sync(
                self._call("list", "list_objects_v2", Bucket=self.bucket, Prefix=self._dir_prefix(""), MaxKeys=1)
            )

    # -- names ----------------------------------------------------------------------------------------------------

    def key(self, rel: str) -> str:
        """The object key of ``rel`` (the prefix joined in front)."""
        rel = rel.strip("/")
        if not self.prefix:
            return rel
        return f"{self.prefix}/{rel}" if rel else self.prefix

    def join(self, rel: str) -> str:
        rel = rel.strip("/")
        return f"{self.uri}/{rel}" if rel else self.uri

    def _dir_prefix(self, rel: str) -> str:
        k = self.key(rel)
        return f"{k}/" if k else ""

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

    def listdir(self, rel: str = "") -> List[Entry]:
        base = self._dir_prefix(rel)
        dirs, objs = self._sync(self._list(base, "/"))
        out = [Entry(d[len(base) :].rstrip("/"), True) for d in dirs if d[len(base) :].strip("/")]
        for o in objs:
            name = o["Key"][len(base) :]
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
        page = self._sync(
            self._call("list", "list_objects_v2", Bucket=self.bucket, Prefix=self._dir_prefix(rel), MaxKeys=1)
        )
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

    def open_read(self, rel: str) -> io.BufferedReader:
        try:
            head = self._head(rel)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.join(rel)} does not exist") from None
        raw = RangeReader(self, self.key(rel), int(head["ContentLength"]), head.get("ETag"))
        return io.BufferedReader(raw, buffer_size=256 * 1024)  # type: ignore[return-value]

    # -- writing ----------------------------------------------------------------------------------------------------

    def begin(self, name: str) -> RemoteTransaction:
        return RemoteTransaction(self, name)

    def open_object_writer(self, rel: str) -> ObjectWriter:
        """A streaming writer of one object (multipart when large); the object exists once it is closed."""
        return ObjectWriter(self, self.key(rel))

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        # A single PUT replaces an object atomically: readers see the old or the new bytes, never a mix.
        self._sync(self._call("write", "put_object", Bucket=self.bucket, Key=self.key(rel), Body=bytes(data)))

    # -- deleting and moving ----------------------------------------------------------------------------------------

    async def _delete_keys(self, keys: List[str]) -> None:
        for i in range(0, len(keys), DELETE_BATCH):
            batch = keys[i : i + DELETE_BATCH]
            resp = await self._call(
                "delete",
                "delete_objects",
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
            )
            errors = [e for e in resp.get("Errors") or [] if e.get("Code") != "NoSuchKey"]
            if errors:
                e = errors[0]
                raise StorageError(
                    f"cannot delete s3://{self.bucket}/{e.get('Key')}: {e.get('Code')} {e.get('Message', '')}".rstrip()
                    + f" ({len(errors)} object(s) not deleted)"
                )

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
        if size <= MAX_SINGLE:
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
                    r = await self._call(
                        "copy",
                        "upload_part_copy",
                        Bucket=self.bucket,
                        Key=dst_key,
                        UploadId=uid,
                        PartNumber=n,
                        CopySource=src,
                        CopySourceRange=f"bytes={start}-{min(size, start + step) - 1}",
                    )
                    return {"PartNumber": n, "ETag": r["CopyPartResult"]["ETag"]}

            parts = await asyncio.gather(*[part(i + 1, s) for i, s in enumerate(range(0, size, step))])
            await self._call(
                "copy",
                "complete_multipart_upload",
                Bucket=self.bucket,
                Key=dst_key,
                UploadId=uid,
                MultipartUpload={"Parts": list(parts)},
            )
        except BaseException:
            await self._abort_upload(dst_key, uid)
            raise

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
                    await self._copy(o["Key"], dbase + o["Key"][len(base) :], int(o.get("Size") or 0))

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


__all__ = ["RemoteStorage", "RemoteTransaction"]
