"""File-level checks shared by the foreign layouts, one module per file kind.

Frameworks rarely write a commit record, so "complete" has to be read off the files themselves:

* :mod:`.torchzip`: a ``torch.save`` file is a zip archive whose central directory is written last;
* :mod:`.safetensors`: a header whose tensor offsets end exactly at the end of the file (the one parser in
  :mod:`resumekit.verify` does the reading);
* :mod:`.jsonfile`: JSON files written last (``trainer_state.json``, ``metadata.json``) must parse;
* :mod:`.dcp`: torch.distributed.checkpoint directories (``.metadata`` written last);
* :mod:`.ranks`: which of the ranks a parallel save should have written are absent;
* :mod:`.pickle_scan`: scalars, globals and top-level keys read from pickle opcodes, never unpickled;
* :mod:`.manifest`: a resumekit manifest inside a foreign checkpoint, or beside a single-file one;
* :mod:`.torchload`: ``torch.load(weights_only=True)``, the only place torch is imported, inside the function.

Every failed check raises :class:`~resumekit.errors.CorruptCheckpointError` naming the file and what is wrong, so
a layout's ``validate`` turns it into the reason shown to the user.
"""

from __future__ import annotations

from .common import fail, files_of, join, newest_mtime, sum_sizes
from .dcp import check_dcp_dir
from .jsonfile import check_file_nonempty, read_json, read_small
from .manifest import FOREIGN_MANIFEST, SIDECAR_SUFFIX, check_foreign_manifest, check_sidecar_manifest, sidecar_name
from .pickle_scan import (
    NOT_SCALAR,
    TORCH_SAFE_GLOBALS,
    PickleSummary,
    read_torch_pickle,
    scan_pickle_scalars,
    summarize_pickle,
)
from .ranks import count_missing, describe_ranks, grid_count_missing, grid_missing, grid_size, missing_ranks
from .safetensors import check_safetensors
from .torchload import load_weights_only
from .torchzip import check_torch_zip

__all__ = [
    "fail",
    "files_of",
    "join",
    "newest_mtime",
    "sum_sizes",
    "check_dcp_dir",
    "check_file_nonempty",
    "read_json",
    "read_small",
    "FOREIGN_MANIFEST",
    "check_foreign_manifest",
    "SIDECAR_SUFFIX",
    "check_sidecar_manifest",
    "sidecar_name",
    "NOT_SCALAR",
    "scan_pickle_scalars",
    "TORCH_SAFE_GLOBALS",
    "PickleSummary",
    "read_torch_pickle",
    "summarize_pickle",
    "count_missing",
    "describe_ranks",
    "grid_count_missing",
    "grid_size",
    "grid_missing",
    "missing_ranks",
    "check_safetensors",
    "load_weights_only",
    "check_torch_zip",
]
