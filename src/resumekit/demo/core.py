"""What the single-process, torchrun and multi-node demonstrations share: the comparison of two runs' final states,
the crash statistics, the report (one JSON line or the table), and the pieces of the kill loop (following the jobs'
progress files, telling whether a checkpoint is being written, counting events, stopping a process tree).

Imports no torch at module level: the worker modules import this too, and the kill loop must stay light.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..events import EVENTS_FILE, EventTail, read_events
from ..supervisor.proctree import kill_tree

# A checkpoint directory being written (``.tmp-step_000000120-<id>``); its presence is what "mid-save" means.
SAVING_PREFIX = ".tmp-step_"


# ----------------------------------------------------------------------------------------- comparison
def tree_diff(x: Any, y: Any, path: str = "") -> list[str]:
    """Paths where two decoded state trees differ.

    Tensors compare by their bytes (so ``-0.0`` differs from ``0.0`` and a NaN equals the same NaN), together with
    dtype and shape; dicts by their keys and then value by value; lists and tuples by length and then item by
    item; numpy arrays with ``array_equal``; anything else with ``!=``, a NaN equalling a NaN.

    Args:
        x: one tree.
        y: the other.
        path: the prefix of every reported path (e.g. ``"shards"``).

    Returns:
        The differing paths (``"/model/0.weight"``, ``"/l (length)"``, ``" (keys)"``); empty when identical.
    """
    import numpy as np
    import torch

    diffs: list[str] = []

    def walk(x: Any, y: Any, path: str) -> None:
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (
                isinstance(x, torch.Tensor)
                and isinstance(y, torch.Tensor)
                and x.dtype == y.dtype
                and x.shape == y.shape
                and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
            ):
                diffs.append(path)
        elif isinstance(x, dict) and isinstance(y, dict):
            if set(x) != set(y):
                diffs.append(f"{path} (keys)")
            for k in set(x) & set(y):
                walk(x[k], y[k], f"{path}/{k}")
        elif isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            if len(x) != len(y):
                diffs.append(f"{path} (length)")
            for i, (u, v) in enumerate(zip(x, y, strict=False)):  # a length difference is reported above
                walk(u, v, f"{path}/{i}")
        elif isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if not np.array_equal(x, y):
                diffs.append(path)
        elif x != y and not (x != x and y != y):  # NaN == NaN for this purpose
            diffs.append(path)

    walk(x, y, path)
    return diffs


# ------------------------------------------------------------------------------------------ statistics
@dataclass
class CrashStats:
    """What a run under random SIGKILLs went through; filled by the kill loops and shown by :func:`print_table`."""

    kills: int = 0
    """SIGKILLs delivered (a target that finished on its own first is not counted)."""
    kills_mid_save: int = 0
    """Of those, the ones that landed while a checkpoint was being written."""
    restarts: int = 0
    """Restarts of the job (the supervisor's count, or torchrun's group restarts)."""
    skipped_invalid: int = 0
    """``skip_invalid`` events: checkpoints a restore passed over as incomplete or corrupt."""
    steps_redone: int = 0
    """Steps trained again after a kill, because they came after the checkpoint resumed from."""
    exit_code: int | None = None
    """The exit status of the supervised command."""
    attempts: list[dict[str, Any]] = field(default_factory=list)
    """One record per attempt (single process) or per kill (torchrun)."""
    summary: dict[str, Any] = field(default_factory=dict)
    """The supervisor's ``--json`` summary, when it printed one."""


def count_events(directory: str, kind: str) -> int:
    """How many events of ``kind`` (e.g. ``"skip_invalid"``) the run directory's event log holds.

    Args:
        directory: the run (checkpoint) directory.
        kind: the ``event`` field to count.

    Returns:
        The count; 0 when there is no log.
    """
    return sum(1 for e in read_events(os.path.join(directory, EVENTS_FILE)) if e.get("event") == kind)


def print_table(title: str, rows: list[tuple], diffs: list[str], batches: tuple, ok: bool) -> None:
    """Print the demo's human summary: counters, then the two verdicts, then PASS or FAIL.

    Args:
        title: what was run, after ``resumekit demo: ``.
        rows: ``(label, value)`` counters, in order.
        diffs: the differing state paths (empty: bitwise identical); the first five are shown.
        batches: ``(label, equal)`` for the batch-sequence verdict.
        ok: the overall verdict.
    """
    print(f"\nresumekit demo: {title}")
    for k, v in rows:
        print(f"  {k:<32} {v}")
    print(f"  {'final state bitwise identical':<32} {'yes' if not diffs else 'NO: ' + ', '.join(diffs[:5])}")
    print(f"  {batches[0]:<32} {'yes' if batches[1] else 'NO'}")
    print("PASS" if ok else "FAIL")


def final_diffs(compare: Callable[[str, str, int], list[str]], straight: str, crashy: str, step: int) -> list[str]:
    """What differs between the two runs' final checkpoints, an unreadable one counting as a difference.

    Args:
        compare: the demo's ``compare_final``.
        straight: the straight run's directory.
        crashy: the killed run's directory.
        step: the step of the final checkpoint.

    Returns:
        ``compare``'s differing paths, or one ``"final checkpoint unreadable: ..."`` entry.
    """
    try:
        return compare(straight, crashy, step)
    except Exception as e:  # noqa: BLE001 - a missing or invalid final checkpoint is the demo failing
        return [f"final checkpoint unreadable: {e}"]


def closing_fields(
    *,
    steps: int,
    seed: int,
    t_straight: float,
    t_crashy: float,
    directory: str,
    kills_detail: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The fields every demo's JSON result ends with, in this order.

    Args:
        steps: the job's length.
        seed: the kill seed.
        t_straight: seconds the straight run took.
        t_crashy: seconds the killed run took.
        directory: the demo's directory.
        kills_detail: one record per kill, when the demo reports them.

    Returns:
        ``steps``, ``kill_seed``, [``kills_detail``], ``seconds_straight``, ``seconds_with_kills``, ``directory``.
    """
    out: dict[str, Any] = {"steps": steps, "kill_seed": seed}
    if kills_detail is not None:
        out["kills_detail"] = kills_detail
    out["seconds_straight"] = round(t_straight, 2)
    out["seconds_with_kills"] = round(t_crashy, 2)
    out["directory"] = os.path.abspath(directory)
    return out


def report(
    result: dict[str, Any],
    *,
    as_json: bool,
    title: str,
    rows: list[tuple],
    batches_label: str,
    t_straight: float,
    t_crashy: float,
) -> int:
    """Print a demo's outcome, one JSON line or the table, and give its exit status.

    Args:
        result: the demo's JSON result (``identical``, ``differing_keys`` and ``batch_sequence_equal`` are read).
        as_json: print ``result`` as one JSON line instead of the table.
        title: the table's title.
        rows: the table's counters; the times of both runs are added as the last row.
        batches_label: the label of the batch-sequence verdict.
        t_straight: seconds the straight run took.
        t_crashy: seconds the killed run took.

    Returns:
        0 when ``result["identical"]``, else 1.
    """
    ok = bool(result["identical"])
    if as_json:
        print(json.dumps(result))
    else:
        times = ("time straight / with kills", f"{t_straight:.1f}s / {t_crashy:.1f}s")
        print_table(
            title, [*rows, times], result["differing_keys"], (batches_label, result["batch_sequence_equal"]), ok
        )
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------ kill loop
def fresh_run_dirs(directory: str) -> tuple[str, str]:
    """Empty ``straight/`` and ``crashy/`` under ``directory`` (an earlier demo's files are removed).

    Args:
        directory: the demo's directory.

    Returns:
        The paths of the straight run's and the killed run's directories.
    """
    straight, crashy = os.path.join(directory, "straight"), os.path.join(directory, "crashy")
    for d in (straight, crashy):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    return straight, crashy


def saving(directory: str) -> bool:
    """Whether a checkpoint is being written in ``directory`` right now (its tmp directory exists).

    Args:
        directory: the run directory.

    Returns:
        True while a ``.tmp-step_*`` directory is present.
    """
    return any(n.startswith(SAVING_PREFIX) for n in os.listdir(directory))


class ProgressTail:
    """Follows the jobs' progress files incrementally: the kill loop polls every few milliseconds, so each poll
    reads only what was appended since the last (one :class:`resumekit.events.EventTail` per file).

    A progress record is a JSON object with at least ``pid`` and ``step`` (and ``rank`` under torchrun); a line
    torn by a kill, or still being written, is never taken for a record.

    Args:
        directory: where the progress files are; it may not exist yet.
        pattern: which files to follow, as a glob on the name (``progress.jsonl``, ``progress_rank*.jsonl``).
    """

    def __init__(self, directory: str, pattern: str):
        self.directory = directory
        self.pattern = pattern
        self._tails: dict[str, EventTail] = {}
        self.latest: dict[int, tuple[int, int]] = {}
        """pid -> (rank, last step reported), in the order the pids first reported (rank 0 without a rank)."""

    def poll(self) -> None:
        """Read what every progress file gained since the last poll (new files are picked up as they appear)."""
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return
        for name in names:
            if not fnmatch.fnmatchcase(name, self.pattern):
                continue
            tail = self._tails.get(name)
            if tail is None:
                tail = self._tails[name] = EventTail(os.path.join(self.directory, name))
            for rec in tail.read():
                self.latest[int(rec["pid"])] = (int(rec.get("rank", 0)), int(rec["step"]))


def stop_tree(proc: subprocess.Popen, wait: float = 10.0) -> None:
    """SIGKILL ``proc`` and every process under it if it still runs, then collect its exit status.

    torchrun starts its workers in sessions of their own, so killing the process group alone would leave them.

    Args:
        proc: a process this program started.
        wait: seconds to wait at most for its exit status.
    """
    if proc.poll() is None:  # once reaped its pid may belong to someone else: never signal it then
        kill_tree(proc.pid)
    try:
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        pass


def supervisor_cmd(
    directory: str, *, max_restarts: int, backoff: float = 0.05, backoff_max: float = 0.2, extra: Sequence[str] = ()
) -> list[str]:
    """``resumekit run`` as the demos start it, up to (not including) the ``--`` before the job.

    Args:
        directory: ``--dir``, the checkpoint directory.
        max_restarts: ``--max-restarts``.
        backoff: ``--backoff``, the first restart delay (kept short: the demos restart often).
        backoff_max: ``--backoff-max``.
        extra: more ``resumekit run`` options.

    Returns:
        The command line.
    """
    return [
        sys.executable,
        "-m",
        "resumekit",
        "run",
        "--dir",
        directory,
        "--max-restarts",
        str(max_restarts),
        "--backoff",
        f"{backoff:g}",
        "--backoff-max",
        f"{backoff_max:g}",
        *extra,
    ]


# ------------------------------------------------------------------------------------------- workers
def worker_args(
    module: str,
    directory: str,
    steps: int,
    save_every: int,
    seed: int,
    async_save: bool,
    progress: str | None = None,
) -> list[str]:
    """The arguments that start a demo job as a module; :func:`parse_worker_args` reads them back.

    Args:
        module: the job's module (``resumekit.demo.single``, ``resumekit.demo.distributed``).
        directory: the checkpoint directory (or object-store URI).
        steps: train until this step.
        save_every: checkpoint every this many steps.
        seed: the job's seed.
        async_save: write checkpoints in the background.
        progress: a local directory for the job's progress logs (None: ``directory``; required when ``directory``
            is an object store, which the kill loop cannot tail).

    Returns:
        ``["-m", module, "--worker", "--dir", directory, ...]``, for ``python`` or ``torchrun``.
    """
    args = [
        "-m",
        module,
        "--worker",
        "--dir",
        directory,
        "--steps",
        str(steps),
        "--save-every",
        str(save_every),
        "--seed",
        str(seed),
    ]
    if progress is not None:
        args += ["--progress", progress]
    return args + (["--async"] if async_save else [])


def parse_worker_args(prog: str, argv: Sequence[str] | None, *, steps: int, save_every: int) -> argparse.Namespace:
    """The command line both demo jobs take: ``--worker --dir D [--steps N] [--save-every K] [--seed S]
    [--progress P] [--async]``.

    Args:
        prog: how the job is started, for the usage line.
        argv: the arguments (None: ``sys.argv[1:]``).
        steps: the default of ``--steps``.
        save_every: the default of ``--save-every``.

    Returns:
        ``dir``, ``steps``, ``save_every``, ``seed``, ``progress`` (None when not given) and ``async_save``.
    """
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--dir", required=True)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--save-every", type=int, default=save_every)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", default=None)
    p.add_argument("--async", dest="async_save", action="store_true")
    return p.parse_args(argv)


__all__ = [
    "SAVING_PREFIX",
    "CrashStats",
    "ProgressTail",
    "closing_fields",
    "count_events",
    "final_diffs",
    "fresh_run_dirs",
    "parse_worker_args",
    "print_table",
    "report",
    "saving",
    "stop_tree",
    "supervisor_cmd",
    "tree_diff",
    "worker_args",
]
