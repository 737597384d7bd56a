"""Reading one object as a file: ranged GETs prefetched ahead of the reader, each retried on its own."""

from __future__ import annotations

import io
from concurrent.futures import Future
from typing import Any

from .client import BucketClient
from .retry import _ShortRead


class RangeReader(io.RawIOBase):
    """Sequential reads of one object as ranged GETs, ``concurrency`` ranges prefetched ahead of the reader.

    Each range is retried on its own, so a dropped connection costs one range, not the whole file. The object's
    ETag pins every range to the same version of the object.

    Args:
        client: the bucket's request plumbing (the storage object).
        key: the object's full key.
        size: the object's size (from its HEAD).
        etag: the object's ETag (from the same HEAD), or None to read whatever version each range finds.
    """

    def __init__(self, client: BucketClient, key: str, size: int, etag: str | None):
        super().__init__()
        self._st = client
        self._key = key
        self._size = size
        self._etag = etag
        self._chunk = client.options.read_chunk
        self._window = client.options.concurrency
        self._pos = 0
        self._futs: dict[int, Future[bytes]] = {}
        self._cur: tuple[int, bytes] | None = None

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

    async def _get_range(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the object, retried as a unit (a body cut mid-transfer is fetched again)."""
        st, key, etag = self._st, self._key, self._etag

        async def once() -> bytes:
            s3 = await st._client()
            kw: dict[str, Any] = {"Bucket": st.bucket, "Key": key, "Range": f"bytes={start}-{end - 1}"}
            if etag:
                kw["IfMatch"] = etag  # the object must not change between two ranges of one read
            resp = await s3.get_object(**kw)
            async with resp["Body"] as body:
                data = await body.read()
            if len(data) != end - start:
                raise _ShortRead(f"range {start}-{end - 1}: got {len(data)} of {end - start} bytes")
            return data

        return await st._retry(f"read {st.scheme}://{st.bucket}/{key} [{start}:{end}]", once, nbytes=end - start)

    def _fetch(self, idx: int) -> Future[bytes]:
        fut = self._futs.get(idx)
        if fut is None:
            start = idx * self._chunk
            end = min(self._size, start + self._chunk)
            fut = self._st._submit(self._get_range(start, end))
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
        mv[:m] = data[off : off + m]
        self._pos += m
        return m

    def close(self) -> None:
        for f in self._futs.values():
            f.cancel()
        self._futs.clear()
        self._cur = None
        super().close()


__all__ = ["RangeReader"]
