"""Maintenance of an object-store root: the incomplete multipart uploads killed saves leave behind (invisible to
listings, but their parts take space and are billed until aborted), listed with their age and aborted when stale.
A base of :class:`~resumekit.storage.remote.RemoteStorage`."""

from __future__ import annotations

import time
from typing import Any

from .client import BucketClient


def _ts(value: Any) -> float | None:
    """Seconds since the epoch from what the S3 API returns for a time (a datetime, or a number), else None."""
    if value is None:
        return None
    if hasattr(value, "timestamp"):
        return float(value.timestamp())
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class UploadMaintenance(BucketClient):
    """``resumekit gc``'s view of the multipart uploads under a root (used through ``RemoteStorage``)."""

    def _dir_prefix(self, rel: str) -> str:  # pragma: no cover - RemoteStorage's own is used
        raise NotImplementedError

    def list_uploads(self, now: float | None = None) -> list[dict[str, Any]]:
        """Incomplete multipart uploads under the prefix (a killed save leaves them behind: invisible to listings,
        but their parts take space and are billed until aborted).

        Returns:
            One dict per upload, oldest first: ``uri``, ``key``, ``upload_id``, ``initiated`` (epoch seconds or
            None) and ``age_s`` (None when the store gives no time).
        """
        now = time.time() if now is None else now

        async def run() -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = []
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._dir_prefix("")}
            while True:
                page = await self._call("list uploads", "list_multipart_uploads", **kw)
                for u in page.get("Uploads") or []:
                    t = _ts(u.get("Initiated"))
                    found.append(
                        {
                            "uri": f"{self.scheme}://{self.bucket}/{u['Key']}",
                            "key": u["Key"],
                            "upload_id": u["UploadId"],
                            "initiated": t,
                            "age_s": None if t is None else max(0.0, now - t),
                        }
                    )
                if not page.get("IsTruncated"):
                    break
                kw["KeyMarker"] = page.get("NextKeyMarker")
                kw["UploadIdMarker"] = page.get("NextUploadIdMarker")
            return sorted(found, key=lambda u: -(u["age_s"] or 0.0))

        return self._sync(run())

    def abort_stale_uploads(self, older_than: float, dry_run: bool = False, now: float | None = None) -> list[str]:
        """Abort multipart uploads under the prefix started more than ``older_than`` seconds ago. Returns them as
        ``"URI (upload ID..., age N s)"``."""
        stale = [u for u in self.list_uploads(now) if u["age_s"] is not None and u["age_s"] >= older_than]

        async def run() -> None:
            for u in stale:
                try:
                    await self._call(
                        "abort upload",
                        "abort_multipart_upload",
                        Bucket=self.bucket,
                        Key=u["key"],
                        UploadId=u["upload_id"],
                    )
                except FileNotFoundError:
                    pass  # completed or aborted since it was listed

        if stale and not dry_run:
            self._sync(run())
        return [f"{u['uri']} (upload {u['upload_id'][:12]}, age {u['age_s']:.0f} s)" for u in stale]


__all__ = ["UploadMaintenance"]
