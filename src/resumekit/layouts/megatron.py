"""Megatron-LM and MindSpeed-LLM: ``--save`` dir with ``latest_checkpointed_iteration.txt`` and ``iter_%07d/``.

What megatron/training/checkpointing.py writes::

    save/
        latest_checkpointed_iteration.txt   "1200" or "release"; rank 0, after the barrier (or in the async finalize)
        iter_0001200/                        'iter_{:07d}', so iteration 10**7 is iter_10000000 (parsed as an int)
            torch_dist format (default):  __R_I.distcp from every rank, .metadata (torch DCP coordinator),
                                          common.pt (older versions), metadata.json LAST (rank 0, after a barrier),
                                          integrity.json (sha256 of every file, with --save-integrity)
            torch_dcp / fsdp_dtensor:     .metadata + *.distcp (``.metadata`` is the commit mark)
            torch (legacy):               mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt (+ distrib_optim.pt) for every
                                          tensor/pipeline/expert-parallel rank
        release/                             same content, for converted weights; the tracker then says "release"

Valid means: torch_dist has a parseable ``metadata.json``, a ``.metadata`` and data files (integrity.json, when
present, lists no missing file, and its sha256s match with ``full``); a ``.metadata`` without ``metadata.json`` is
accepted as torch_dcp only when no other iteration in the root is torch_dist (otherwise it is a torch_dist save cut
short, which Megatron would misread as torch_dcp); legacy has the complete rank grid, inferred from the
``mp_rank_*`` names present, with the same files in each and every ``.pt`` a complete torch zip. With ``full`` the
parallel sizes recorded in the first rank's ``args`` (read from pickle opcodes, never unpickled) must match the grid.
"""

from __future__ import annotations

import builtins
import hashlib
import re
from dataclasses import replace

from ..storage import Entry, Storage
from ..verify import hash_file
from ._tracked import TrackedLayout
from .base import CheckpointInfo, match_step, run_check, step_entries
from .checks import (
    check_dcp_dir,
    check_torch_zip,
    fail,
    files_of,
    grid_count_missing,
    grid_missing,
    grid_size,
    join,
    newest_mtime,
    read_json,
    scan_pickle_scalars,
    sum_sizes,
)
from .registry import register

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
DIST_CONFIG = "metadata.json"
INTEGRITY = "integrity.json"
_ITER_RE = re.compile(r"^iter_(\d+)$")
_MP_RE = re.compile(r"^mp_rank_(\d+)(?:_(\d+))?(?:_(\d+))?$")
_MODEL_FILE = "model_optim_rng.pt"
_DIST_OPTIM = "distrib_optim.pt"


def iter_dirname(iteration: int) -> str:
    """Megatron's directory name for an iteration: ``iter_0001200`` (7 digits, more when needed)."""
    return f"iter_{iteration:07d}"


def parse_iter_dirname(name: str) -> int | None:
    """``iter_0001200`` -> 1200, ``iter_10000000`` -> 10000000; None for anything else."""
    return match_step(_ITER_RE, name)


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint directory of the ``--save`` root: ``iter_N`` -> N, and ``release`` -> 0, since
    Megatron reads a "release" tracker as iteration 0 (converted weights, older than any iteration)."""
    return 0 if name == RELEASE else parse_iter_dirname(name)


class MegatronLayout(TrackedLayout):
    """``iter_*`` / ``release`` directories under Megatron-LM's (or MindSpeed-LLM's) ``--save``."""

    name = "megatron"
    tracker_name = TRACKER

    def detect(self, storage: Storage) -> bool:
        for e in storage.listdir(""):
            if e.is_dir and (
                _ITER_RE.match(e.name)
                or (
                    e.name == RELEASE
                    and any(_MP_RE.match(c.name) or c.name == DIST_CONFIG for c in storage.listdir(RELEASE))
                )
            ):
                return True
        return False

    def target_of(self, content: str) -> str | None:
        text = content.strip()
        if text == RELEASE:
            return RELEASE
        try:
            n = int(text)
        except ValueError:
            return None
        return iter_dirname(n) if n >= 0 else None

    def tracker_value(self, info: CheckpointInfo | None) -> str | None:
        if info is None:
            return None
        return RELEASE if info.name == RELEASE else str(info.step)

    def list(self, storage: Storage) -> builtins.list[CheckpointInfo]:
        out = [
            replace(i, metadata={"release": True}) if i.name == RELEASE else i
            for i in self.list_matching(storage, checkpoint_step)
        ]
        return self.mark_tracked(storage, out)

    def validate(self, storage: Storage, info: CheckpointInfo, full: bool = True) -> CheckpointInfo:
        def check():
            files, fmt = check_iteration(storage, info.name, info.path, full, self._siblings_are_torch_dist)
            return {
                "size": sum_sizes(files),
                "time": newest_mtime(files, *files),
                "metadata": {**info.metadata, "format": fmt},
            }

        return run_check(info, check)

    def _siblings_are_torch_dist(self, storage: Storage, name: str) -> bool:
        return any(
            e.name != name and storage.exists(join(e.name, DIST_CONFIG))
            for _, e in step_entries(storage, checkpoint_step)
        )


def check_iteration(
    storage: Storage, name: str, where: str, full: bool, siblings_torch_dist=lambda storage, name: False
) -> tuple[dict[str, Entry], str]:
    """Validate one ``iter_*``/``release`` directory; raises CorruptCheckpointError. Returns (files, format)."""
    files = files_of(storage, name)
    if not files:
        raise fail(where, "the checkpoint directory is missing or empty")
    mp_dirs = {n: e for n, e in files.items() if e.is_dir and _MP_RE.match(n)}
    if DIST_CONFIG in files:
        cfg = read_json(storage, join(name, DIST_CONFIG), where, shown=DIST_CONFIG)
        if not isinstance(cfg, dict) or "sharded_backend" not in cfg:
            raise fail(where, f"{DIST_CONFIG} has no 'sharded_backend' (not a Megatron dist-checkpoint config)")
        check_dcp_dir(storage, name, where, shown="")
        _check_integrity(storage, name, where, files, full)
        for n in sorted(files):
            if n.endswith(".pt") and not files[n].is_dir:
                check_torch_zip(storage, join(name, n), where, full, shown=n)
        return files, "torch_dist"
    if mp_dirs:
        return _check_legacy(storage, name, where, files, mp_dirs, full), "torch"
    if ".metadata" in files:
        if siblings_torch_dist(storage, name):
            raise fail(
                where,
                f"{DIST_CONFIG} is missing (Megatron's rank 0 writes it last, after every rank's "
                "data: the save never finished)",
            )
        check_dcp_dir(storage, name, where, shown="")
        return files, "torch_dcp"
    if any(n.endswith(".distcp") for n in files):
        raise fail(
            where,
            f"{DIST_CONFIG} is missing (Megatron's rank 0 writes it last, after every rank's data: the "
            "save never finished)",
        )
    raise fail(where, f"no checkpoint files (neither {DIST_CONFIG} + *.distcp nor mp_rank_*/{_MODEL_FILE})")


def _check_integrity(storage: Storage, name: str, where: str, files: dict[str, Entry], full: bool) -> None:
    if INTEGRITY not in files:
        return
    doc = read_json(storage, join(name, INTEGRITY), where, shown=INTEGRITY)
    listed = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(listed, dict):
        raise fail(where, f"{INTEGRITY} has no 'files' table")
    algorithm = doc.get("algorithm", "sha256")
    for fname, digest in sorted(listed.items()):
        if "/" in fname or fname in ("", ".", ".."):
            raise fail(where, f"{INTEGRITY} lists an unsafe name {fname!r}")
        if fname not in files:
            raise fail(where, f"{fname} is missing (listed in {INTEGRITY})")
        if full and algorithm == "sha256" and hash_file(storage, join(name, fname), hashlib.sha256)[1] != digest:
            raise fail(where, f"{fname} sha256 does not match {INTEGRITY}: the file was altered or damaged")


def _check_legacy(
    storage: Storage, name: str, where: str, files: dict[str, Entry], mp_dirs: dict[str, Entry], full: bool
) -> dict[str, Entry]:
    coords: dict[tuple[int, ...], str] = {}
    for n in mp_dirs:
        m = _MP_RE.match(n)
        assert m is not None
        coords[tuple(int(g) for g in m.groups() if g is not None)] = n
    widths = {len(c) for c in coords}
    if len(widths) > 1:
        raise fail(
            where,
            "mp_rank_* directories mix naming schemes ("
            + ", ".join(sorted(mp_dirs)[:4])
            + "): leftovers of a run with another parallel layout?",
        )
    gone = grid_missing(set(coords))
    if gone:
        width = [len(p) for p in next(iter(mp_dirs))[len("mp_rank_") :].split("_")]
        missing = "mp_rank_" + "_".join(f"{v:0{w}d}" for v, w in zip(gone[0], width, strict=False))
        dims = grid_size(coords)
        absent = grid_count_missing(set(coords))
        raise fail(
            where,
            f"{missing}/ is missing (the rank grid {' x '.join(map(str, dims))} is incomplete: "
            f"{absent} of {len(coords) + absent} model-parallel ranks absent)",
        )
    all_files: dict[str, Entry] = dict(files)
    contents: dict[str, set[str]] = {}
    for n in sorted(mp_dirs):
        sub = files_of(storage, join(name, n))
        contents[n] = {f for f, e in sub.items() if not e.is_dir}
        for f, e in sub.items():
            all_files[f"{n}/{f}"] = e
    union = set().union(*contents.values())
    for n in sorted(mp_dirs):
        if _MODEL_FILE not in contents[n]:
            raise fail(where, f"{n}/{_MODEL_FILE} is missing")
        lacking = sorted(union - contents[n])
        if lacking:
            raise fail(where, f"{n}/{lacking[0]} is missing (other ranks have it)")
    for n in sorted(mp_dirs):
        for f in sorted(contents[n]):
            if f.endswith(".pt"):
                check_torch_zip(storage, join(name, n, f), where, full, shown=f"{n}/{f}")
    if full:
        _cross_check_args(storage, name, where, sorted(mp_dirs)[0], len(mp_dirs))
    return all_files


def _cross_check_args(storage: Storage, name: str, where: str, first: str, count: int) -> None:
    keys = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size")
    found = scan_pickle_scalars(storage, join(name, first, _MODEL_FILE), keys)
    tp, pp = found.get("tensor_model_parallel_size"), found.get("pipeline_model_parallel_size")
    ep = found.get("expert_model_parallel_size", 1)
    # spelled out, not all(...): the type checker narrows each name only this way
    if not (isinstance(tp, int) and isinstance(pp, int) and isinstance(ep, int) and min(tp, pp, ep) > 0):
        return  # args not recorded (or not as plain ints): the name grid is all there is to go on
    if tp * pp * ep != count:
        raise fail(
            where,
            f"{first}/{_MODEL_FILE} records TP={tp} x PP={pp} x EP={ep} = {tp * pp * ep} model-parallel "
            f"ranks but there are {count} mp_rank_* directories",
        )


register(MegatronLayout(), "mindspeed")
