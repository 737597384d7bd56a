"""Server-side copies within a bucket (quarantine moves a step by copying it): one request up to 5 GiB, a
multipart copy in 1 GiB ranges above. A base of :class:`~resumekit.storage.remote.RemoteStorage`."""

from __future__ import annotations

import asyncio
from typing import Any

from .client import BucketClient
from .options import MAX_SINGLE, MiB


class ServerCopy(BucketClient):
    """Copies objects without moving their bytes through this machine (used through ``RemoteStorage``)."""

    async def _copy(self, src_key: str, dst_key: str, size: int) -> None:
        src = {"Bucket": self.bucket, "Key": src_key}
        if size <= MAX_SINGLE:
            # A server-side copy answers when done: its time limit grows with the size like a transfer's.
            await self._call("copy", "copy_object", nbytes=size, Bucket=self.bucket, Key=dst_key, CopySource=src)
            return
        # Objects above 5 GiB cannot be copied in one request: multipart copy in 1 GiB ranges.
        mpu = await self._call("copy", "create_multipart_upload", Bucket=self.bucket, Key=dst_key)
        uid = mpu["UploadId"]
        try:
            step = 1024 * MiB
            sem = asyncio.Semaphore(self.options.concurrency)

            async def part(n: int, start: int) -> dict[str, Any]:
                async with sem:
                    r = await self._call(
                        "copy",
                        "upload_part_copy",
                        nbytes=min(size, start + step) - start,
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
                nbytes=size,
                Bucket=self.bucket,
                Key=dst_key,
                UploadId=uid,
                MultipartUpload={"Parts": list(parts)},
            )
        except BaseException:
            await self._abort_upload(dst_key, uid)
            raise


__all__ = ["ServerCopy"]
