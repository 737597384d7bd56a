"""Host copies of the DCP tensors for asynchronous saves (DTensor shards keep their sharding spec)."""

from __future__ import annotations

from typing import Any

import torch


class ShardStaging:
    """Host copies of the DCP tensors for asynchronous saves, allocated once and reused while shapes hold.

    A DTensor is staged as a DTensor with the same sharding spec whose local shard is a host buffer, so DCP
    plans the write exactly as for the live tensor.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, Any] = {}

    @staticmethod
    def _local(t: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        return t.to_local() if isinstance(t, DTensor) else t

    def _alloc(self, t: torch.Tensor) -> Any:
        from torch.distributed.tensor import DTensor

        local = self._local(t).detach()
        buf = torch.empty(local.shape, dtype=local.dtype, pin_memory=local.is_cuda)
        if isinstance(t, DTensor):
            if t.device.type == "cpu":
                return DTensor.from_local(
                    buf, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
                )
            # from_local would move the buffer to the mesh's device; DCP's own async staging keeps the spec of a
            # device DTensor with a host local shard this way.
            staged = t.detach().to("cpu")
            staged._local_tensor = buf  # type: ignore[attr-defined]  # DTensor has no public "replace the local shard"
            return staged
        return buf

    def snapshot(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        any_cuda = False
        for k, t in tensors.items():
            src = self._local(t).detach()
            buf = self._bufs.get(k)
            if buf is None or self._local(buf).shape != src.shape or self._local(buf).dtype != src.dtype:
                buf = self._alloc(t)
                self._bufs[k] = buf
            self._local(buf).copy_(src, non_blocking=src.is_cuda)
            any_cuda |= src.is_cuda
            out[k] = buf
        if any_cuda:
            torch.cuda.synchronize()
        for stale in set(self._bufs) - set(tensors):
            del self._bufs[stale]
        return out

    def release(self) -> None:
        self._bufs.clear()
