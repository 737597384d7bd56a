"""The :class:`Storage` of an ``s3://bucket/prefix`` (or ``obs://bucket/prefix``) root and its
:class:`RemoteTransaction`: listing, reading, the manifest-last commit, deleting a step manifest first, quarantine
by copy, and the report and cleanup of abandoned multipart uploads."""

from __future__ import annotations

import asyncio
import io
from typing import Any

from ...errors import RemoteTransferError, StorageError
from ...format import MANIFEST, keep_dirname
from ..base import Entry, Storage, Transaction
from ..resave import promote
from ..steps import valid_manifest
from .copy import ServerCopy
from .maintenance import UploadMaintenance, _ts
from .options import DELETE_BATCH, RemoteOptions, parse_uri, uri_scheme
from .reader import RangeReader
from .retry import _ShortRead, client_error_info
from .writer import ObjectWriter


class RemoteTransaction(Transaction):
    """A step being written under ``prefix/step_N/``: data objects first, ``manifest.json`` last in one PUT.

    Until the manifest lands the step is not a checkpoint (discovery reports it as an unfinished save and
    ``resumekit gc`` removes it once stale); there is nothing to rename.

    Args:
        storage: the remote root.
        name: the step directory, e.g. ``step_000000100``.
    """

    def __init__(self, storage: RemoteStorage, name: str):
        self.storage = storage
        self.name = self.final = name.strip("/")
        self._writers: list[tuple[str, ObjectWriter]] = []
        # A committed step a re-save must not lose. exists() first: a failing store must raise here, not read as
        # "no valid step" (valid_manifest counts every OSError as invalid).
        if storage.exists(f"{self.final}/{MANIFEST}") and valid_manifest(storage, self.final) is not None:
            # A valid step is replaced without a moment of having none: the new copy is written and committed
            # under a keep name, and takes the step's place only then (resumekit.storage.resave).
            self.name = keep_dirname(self.final)
        else:
            # An invalid step of the same number: remove it, manifest first, so objects being overwritten never
            # sit under a manifest that vouches for old ones.
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
        if self.name != self.final:
            promote(st, self.name, self.final)
        return st.join(self.final)

    def abort(self) -> None:
        for _, w in self._writers:
            if not w.closed:
                w.abort()
        if not self.storage.cleanup_allowed():
            # The store just failed (or the grace period is over): cleaning up would cost another timeout per
            # request before the caller can report. A step without its manifest never counts; gc removes it.
            return
        try:
            self.storage.remove_tree(self.name)
        except BaseException:  # noqa: BLE001 - abort never raises; gc removes what is left
            pass


class RemoteStorage(ServerCopy, UploadMaintenance, Storage):
    """A checkpoint root under ``s3://bucket/prefix`` on any S3-compatible object store.

    Args:
        uri: ``s3://bucket/prefix`` or ``obs://bucket/prefix`` (the same S3 protocol; for ``obs://`` the endpoint
            may also come from ``OBS_ENDPOINT``/``S3_ENDPOINT``, see :func:`~.client.endpoint_from_env`).
        create: check now that the bucket exists and the credentials work (a missing prefix is fine: object
            stores create it with the first object). With ``create=False`` nothing is sent until first use.
        options: tuning; default :meth:`RemoteOptions.from_env`.

    Raises:
        ImportError: s3fs is not installed (the message names ``pip install 'resumekit[s3]'``).
        StorageError: (with ``create``) the bucket is missing or the credentials are wrong.
    """

    is_local = False

    def __init__(self, uri: str, create: bool = True, options: RemoteOptions | None = None):
        bucket, self.prefix = parse_uri(uri)
        scheme = uri_scheme(uri)
        self.uri = f"{scheme}://{bucket}/{self.prefix}" if self.prefix else f"{scheme}://{bucket}"
        super().__init__(bucket, options or RemoteOptions.from_env(), scheme)
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

    async def _list(self, prefix: str, delimiter: str | None) -> tuple[list[str], list[dict[str, Any]]]:
        """(common prefixes, objects) under ``prefix``, every page."""
        dirs: list[str] = []
        objs: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
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

    def listdir(self, rel: str = "") -> list[Entry]:
        base = self._dir_prefix(rel)
        dirs, objs = self._sync(self._list(base, "/"))
        out = [Entry(d[len(base) :].rstrip("/"), True) for d in dirs if d[len(base) :].strip("/")]
        for o in objs:
            name = o["Key"][len(base) :]
            if not name or "/" in name:
                continue  # the "directory marker" some tools create for the prefix itself
            out.append(Entry(name, False, int(o.get("Size") or 0), _ts(o.get("LastModified"))))
        return out

    def _walk(self, rel: str) -> list[dict[str, Any]]:
        """Every object under directory ``rel`` (recursive)."""
        return self._sync(self._list(self._dir_prefix(rel), None))[1]

    def list_sizes(self, rel: str) -> dict[str, int]:
        """Every object under directory ``rel``, recursively, as its path relative to ``rel`` -> size in bytes.

        One listing (paged, each page a bounded and retried request): what a commit checks before its manifest
        vouches for the objects (:func:`resumekit.distributed.remote_commit.check_uploaded`). A "directory marker"
        object for ``rel`` itself is left out.
        """
        base = self._dir_prefix(rel)
        out: dict[str, int] = {}
        for o in self._walk(rel):
            name = o["Key"][len(base) :]
            if name:
                out[name] = int(o.get("Size") or 0)
        return out

    def _head(self, rel: str) -> dict[str, Any]:
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

    def mtime(self, rel: str) -> float | None:
        """Modification time of an object, or of a "directory": the newest object under it (None when empty)."""
        try:
            return _ts(self._head(rel).get("LastModified"))
        except FileNotFoundError:
            pass
        times = [t for o in self._walk(rel) if (t := _ts(o.get("LastModified"))) is not None]
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
            # Sized as one read chunk: read_bytes is for manifests and trackers; data files go through open_read.
            what = f"read {self.scheme}://{self.bucket}/{key}"
            return self._sync(self._retry(what, once, nbytes=self.options.read_chunk))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.join(rel)} does not exist") from None

    def open_read(self, rel: str) -> io.BufferedReader:
        try:
            head = self._head(rel)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.join(rel)} does not exist") from None
        raw = RangeReader(self, self.key(rel), int(head["ContentLength"]), head.get("ETag"))
        return io.BufferedReader(raw, buffer_size=256 * 1024)

    # -- writing ----------------------------------------------------------------------------------------------------

    def begin(self, name: str) -> RemoteTransaction:
        return RemoteTransaction(self, name)

    def open_object_writer(self, rel: str) -> ObjectWriter:
        """A streaming writer of one object (multipart when large); the object exists once it is closed."""
        return ObjectWriter(self, self.key(rel))

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        # A single PUT replaces an object atomically: readers see the old or the new bytes, never a mix.
        self._sync(self._call("write", "put_object", Bucket=self.bucket, Key=self.key(rel), Body=bytes(data)))

    # -- the writer lease (see resumekit.storage.lease) -------------------------------------------------------------

    def put_lease(self, rel: str, data: bytes, if_match: str | None = None) -> str | None:
        """A conditional PUT: create (``If-None-Match: *``) or, with ``if_match``, replace that version only.

        Returns:
            The new ETag, or None when the condition failed (someone else's lease is there, or it changed).
        """
        cond: dict[str, Any] = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"}
        try:
            resp = self._sync(
                self._call("write lease", "put_object", Bucket=self.bucket, Key=self.key(rel), Body=bytes(data), **cond)
            )
        except FileNotFoundError:
            return None  # If-Match on an object that is gone
        except StorageError as e:
            info = client_error_info(e.__cause__) if e.__cause__ is not None else None
            if info is not None and info[0] in ("PreconditionFailed", "ConditionalRequestConflict"):
                return None
            raise
        return resp.get("ETag")

    def read_lease(self, rel: str) -> tuple[bytes, str] | None:
        """The lease object's bytes (at most 4 KiB) and ETag, or None when there is none."""
        key = self.key(rel)

        async def once() -> tuple[bytes, str]:
            s3 = await self._client()
            resp = await s3.get_object(Bucket=self.bucket, Key=key)
            async with resp["Body"] as body:
                data = await body.read(4096)
            return data, str(resp.get("ETag") or "")

        try:
            return self._sync(self._retry(f"read lease {self.scheme}://{self.bucket}/{key}", once))
        except FileNotFoundError:
            return None

    def delete_lease(self, rel: str, etag: str | None) -> None:
        """Remove the lease object if it is still the version ``etag`` (a taken-over lease is not ours to delete)."""
        if not self.cleanup_allowed():
            # Right after a request used up its retries (or past the preemption deadline), a release would only
            # add another retry budget before close() can report; the lease expires by itself.
            raise RemoteTransferError(
                f"not sent: {self.endpoint_name} failed moments ago or the preemption grace period is over"
            )
        got = self.read_lease(rel)
        if got is not None and (etag is None or got[1] == etag):
            self._sync(self._call("delete lease", "delete_object", Bucket=self.bucket, Key=self.key(rel)))

    # -- deleting and moving ----------------------------------------------------------------------------------------

    async def _delete_keys(self, keys: list[str]) -> None:
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
                    f"cannot delete {self.scheme}://{self.bucket}/{e.get('Key')}: {e.get('Code')} "
                    f"{e.get('Message', '')}".rstrip()
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

            async def one(o: dict[str, Any]) -> None:
                async with sem:
                    await self._copy(o["Key"], dbase + o["Key"][len(base) :], int(o.get("Size") or 0))

            await asyncio.gather(*[one(o) for o in data])
            for o in objs:
                if o["Key"] == man_key:
                    await self._copy(man_key, dbase + MANIFEST, int(o.get("Size") or 0))

        self._sync(copy_all())
        self.remove_tree(src)


__all__ = ["RemoteStorage", "RemoteTransaction"]
