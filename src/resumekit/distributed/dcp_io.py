"""DCP's file writer and reader as resumekit uses them: verified metadata, no pickled items, quiet in one process.

Loading safety: DCP's ``FileSystemReader.read_metadata`` in torch 2.x calls plain ``pickle.load`` on ``.metadata``,
and its default load planner reads non-tensor ("bytes") items with ``torch.load(weights_only=False)``. We never let
DCP unpickle anything freely: :func:`load_dcp_metadata` parses ``.metadata`` bytes that were first checked against
our JSON manifest, with :class:`MetadataUnpickler`, an allow-list that accepts only DCP's metadata classes, torch
dtypes/Size/layout and pathlib paths, and checks that every shard it references is a listed, safe relative path.
DCP then gets a reader (``VerifiedReader``) that hands it this parsed plan and refuses any bytes item.
"""

from __future__ import annotations

import contextlib
import copy
import io
import pickle
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ..errors import CorruptCheckpointError
from ..format import FileEntry, validate_relpath
from .statedict import DCP_METADATA


def recording_writer_cls() -> type:
    from torch.distributed.checkpoint import FileSystemWriter

    class RecordingWriter(FileSystemWriter):
        """DCP's file writer that remembers which files this rank wrote (for the manifest)."""

        written: list[str]

        def write_data(self, plan: Any, planner: Any) -> Any:
            self.written = []
            fut = super().write_data(plan, planner)
            # FileSystemWriter completes synchronously; the future already holds the results.
            self.written = sorted({wr.storage_data.relative_path for wr in fut.wait()})
            return fut

    return RecordingWriter


def make_writer(path: str) -> Any:
    """A DCP writer into ``path``: one file per rank, fsynced, single-threaded (saves run beside training)."""
    writer = recording_writer_cls()(path, single_file_per_rank=True, sync_files=True, thread_count=1)
    writer.written = []
    return writer


_SAFE_TORCH_CLASSES = (
    {
        ("torch.distributed.checkpoint.metadata", n)
        for n in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "ChunkStorageMetadata",
            "BytesStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    }
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
    }
    | {("pathlib", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")}
)


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` allowing only the classes DCP puts there; anything else is refused, so a
    forged file cannot name a callable (``os.system``, ``builtins.eval``, ...)."""

    def __init__(self, data: bytes, where: str):
        super().__init__(io.BytesIO(data))
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_TORCH_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.memory_format, torch.layout)
        ):
            return getattr(torch, name)
        raise CorruptCheckpointError(
            self.where,
            f"{DCP_METADATA} refers to {module}.{name}, which a DCP metadata "
            "file never contains; refusing to load it (forged or foreign file)",
        )


def load_dcp_metadata(data: bytes, where: str, files: Mapping[str, FileEntry]) -> Any:
    """Parse verified ``.metadata`` bytes and check that every shard it points to is a listed, safe path."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        md = MetadataUnpickler(data, where).load()
    except CorruptCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CorruptCheckpointError(where, f"{DCP_METADATA} does not parse: {e}") from None
    if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict):
        raise CorruptCheckpointError(where, f"{DCP_METADATA} is not a DCP Metadata object")
    for info in md.storage_data.values():
        rel = getattr(info, "relative_path", None)
        validate_relpath(rel, where)
        if rel not in files:
            raise CorruptCheckpointError(where, f"{DCP_METADATA} points to {rel!r}, which the manifest does not list")
    return md


def verified_reader_cls() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.distributed.checkpoint.planner import LoadItemType

    class VerifiedReader(FileSystemReader):
        """DCP's file reader with our metadata check instead of ``pickle.load`` and no bytes items."""

        def __init__(self, path: str, metadata: Any, where: str):
            super().__init__(path)
            self._md = metadata
            self._where = where

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("rank") is not None:
                raise CorruptCheckpointError(self._where, "rank-local DCP metadata is not used by resumekit")
            md = copy.copy(self._md)
            md.storage_meta = copy.copy(md.storage_meta) if md.storage_meta is not None else StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

        def read_data(self, plan: Any, planner: Any) -> Any:
            for item in plan.items:
                if item.type == LoadItemType.BYTE_IO:
                    # DCP's planner would torch.load(weights_only=False) it; resumekit never writes bytes items.
                    raise CorruptCheckpointError(
                        self._where,
                        f"{DCP_METADATA} declares {item.storage_index.fqn!r} as a pickled object; "
                        "resumekit checkpoints store only tensors through DCP",
                    )
            return super().read_data(plan, planner)

    return VerifiedReader


def describe_failure(e: BaseException) -> str:
    if type(e).__name__ == "CheckpointException" and hasattr(e, "failures"):
        parts = []
        failures = sorted(e.failures.items())  # the hasattr() above tells the type checker it exists
        for r, pair in failures:
            exc = pair[0] if isinstance(pair, tuple) else pair
            text = f"{type(exc).__name__}: {exc}"
            parts.append(text if len(failures) == 1 else f"rank {r}: {text}")
        return "; ".join(parts)
    return f"{type(e).__name__}: {e}"


def failed_ranks(e: BaseException, default: int) -> list[int]:
    if type(e).__name__ == "CheckpointException" and hasattr(e, "failures"):
        return sorted(e.failures)
    return [default]


def first_errno(e: BaseException) -> int | None:
    if type(e).__name__ == "CheckpointException" and hasattr(e, "failures"):
        for pair in e.failures.values():
            exc = pair[0] if isinstance(pair, tuple) else pair
            if getattr(exc, "errno", None):
                return exc.errno
        return None
    return getattr(e, "errno", None)


@contextlib.contextmanager
def quiet_single_process() -> Iterator[None]:
    """DCP warns on every call that it "assumes the intent is to load in a single process" without a process
    group; in a world of one that is exactly the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to", category=UserWarning)
        yield
