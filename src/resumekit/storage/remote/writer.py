"""Writing one object as a stream: a single PUT when it is small, else a multipart upload whose parts overlap with
the caller's writes."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

from ...errors import StorageError
from ...events import note_progress
from .client import BucketClient
from .options import MAX_PARTS


def part_size_for(part_number: int, base: int) -> int:
    """Part size doubles every 1000 parts, so a stream of unknown length always fits in 10,000 parts."""
    return base << ((part_number - 1) // 1000)


class ObjectWriter:
    """Writes one object: a single PUT when it fits one part, else a multipart upload whose parts are sent while
    the caller keeps writing, at most ``concurrency`` in flight (the caller blocks when the window is full).

    Args:
        client: the bucket's request plumbing (the storage object).
        key: the object's full key.
    """

    def __init__(self, client: BucketClient, key: str):
        self._st = client
        self._key = key
        self._buf = bytearray()
        self._part_no = 0
        self._upload_id: str | None = None
        self._futs: list[Future[dict[str, Any]]] = []
        self._sem = threading.BoundedSemaphore(client.options.concurrency)
        self.size = 0
        self.closed = False
        self.aborted = False

    @property
    def name(self) -> str:
        return f"{self._st.scheme}://{self._st.bucket}/{self._key}"

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
        note_progress(n)  # the caller blocks here when the upload window is full: progress follows the uploads
        limit = part_size_for(self._part_no + 1, self._st.options.part_size)
        while len(self._buf) >= limit:
            part = bytes(self._buf[:limit])
            del self._buf[:limit]
            self._send_part(part)
            limit = part_size_for(self._part_no + 1, self._st.options.part_size)
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
        if self._part_no > MAX_PARTS:
            raise StorageError(f"{self.name}: more than {MAX_PARTS} parts; raise RESUMEKIT_S3_PART_SIZE")
        self._raise_failed()
        self._sem.acquire()  # back-pressure: bounds memory to `concurrency` parts in flight
        self._raise_failed()
        fut = st._submit(
            st._call(
                "upload",
                "upload_part",
                Bucket=st.bucket,
                Key=self._key,
                UploadId=self._upload_id,
                PartNumber=self._part_no,
                Body=part,
            )
        )
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

    async def _complete(self, parts: list[dict[str, Any]]) -> None:
        st = self._st
        try:
            # Assembling the parts can take the server a while for a large object: sized like the transfer.
            await st._call(
                "upload",
                "complete_multipart_upload",
                nbytes=self.size,
                Bucket=st.bucket,
                Key=self._key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": parts},
            )
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

    def __enter__(self) -> ObjectWriter:
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


__all__ = ["ObjectWriter", "part_size_for"]
