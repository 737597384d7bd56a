"""What every checkpoint layout answers, and the pure rules for picking the latest valid checkpoint.

A layout adapter knows one framework's directory conventions. It lists checkpoints with their integer steps,
validates one (saying why it is invalid), and, where the framework keeps a pointer file ("tracker"), reads and
repairs it. Adapters do I/O only through :class:`~resumekit.storage.Storage`, and import no torch, so the supervisor
and the CLI can use them on any machine.
"""

from __future__ import annotations

import abc
import builtins
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from re import Pattern
from typing import Any

from ..errors import CorruptCheckpointError
from ..format import QUARANTINE_PREFIX
from ..storage import Entry, Storage

#: a layout's name -> step parser (``checkpoint-1200`` -> 1200); None for names that are not checkpoints
StepParser = Callable[[str], int | None]
#: the folder, next to the checkpoints, that invalid ones are moved into (no framework looks inside it)
QUARANTINE_DIR = "quarantine"


@dataclass
class CheckpointInfo:
    """One checkpoint as found on storage.

    Attributes:
        step: the training step, always an integer.
        name: the checkpoint's name relative to the storage root (a directory, or a file for file layouts).
        path: full path or URI, for messages and for handing to the framework.
        layout: the layout adapter's name.
        valid: whether validation passed (None: not validated yet).
        reason: why it is invalid ("" when valid).
        size: total bytes when known.
        time: commit time (epoch seconds) when known.
        metadata: layout specific extras (metrics, tracker state, ...).
    """

    step: int
    name: str
    path: str
    layout: str
    valid: bool | None = None
    reason: str = ""
    size: int = 0
    time: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "name": self.name,
            "path": self.path,
            "layout": self.layout,
            "valid": self.valid,
            "reason": self.reason,
            "size": self.size,
            "time": self.time,
            "metadata": self.metadata,
        }


@dataclass
class RepairResult:
    """What :meth:`Layout.repair` did (or would do, with ``dry_run``)."""

    tracker: str
    old: str | None
    new: str | None
    changed: bool
    backup: str | None = None
    message: str = ""


@dataclass
class HiddenCheckpoint:
    """An invalid checkpoint (or a tracker that can only point at invalid ones) moved out of the framework's sight
    by :meth:`Layout.hide_invalid`.

    Attributes:
        step: its step (-1 for a tracker file).
        name: its name relative to the storage root, before the move.
        path: its full path or URI, before the move.
        to: where it went (full path or URI); None with ``dry_run``.
        reason: why it is invalid.
        replaced_by: for a file the framework finds by name (Lightning's ``last.ckpt``): the valid checkpoint now
            in its place (a link), so the framework's own choice still lands on it; None otherwise.
        to_name: where it went, relative to the storage root; None with ``dry_run``.
    """

    step: int
    name: str
    path: str
    to: str | None
    reason: str
    replaced_by: str | None = None
    to_name: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "name": self.name,
            "path": self.path,
            "to": self.to,
            "reason": self.reason,
            "replaced_by": self.replaced_by,
        }


def move_aside(storage: Storage, name: str, now: float | None = None, *, folder: bool = True) -> str:
    """Move a checkpoint (directory or file) where no framework's discovery finds it again; never deletes.

    With ``folder`` (the default) ``out/checkpoint-6`` goes to ``out/quarantine/checkpoint-6-20250101T120000``: a
    visible folder next to it, which no framework lists (they scan one directory level: the HF Trainer's
    ``checkpoint-N``, Lightning's ``last*.ckpt``, trackers). Without it the entry is renamed in place to
    ``quarantined-<name>-<time>`` (the prefix defeats ``^name``-anchored patterns, the time suffix ``*.ckpt``-style
    ones).

    Args:
        storage: the storage the checkpoint lives in.
        name: the checkpoint's name relative to the storage root (may contain ``/``).
        now: the time stamped into the new name (default: now).
        folder: into the ``quarantine/`` folder (True) or renamed in place (False).

    Returns:
        The new name relative to the storage root.
    """
    stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(now if now is not None else time.time()))
    head, _, base = name.rstrip("/").rpartition("/")
    if folder:
        head = f"{head}/{QUARANTINE_DIR}" if head else QUARANTINE_DIR
        new_base = f"{base}-{stamp}"
        local = storage.local_path(head)
        if local:
            os.makedirs(local, exist_ok=True)  # object stores need no folder before a rename
    else:
        new_base = f"{QUARANTINE_PREFIX}{base}-{stamp}"
    new = f"{head}/{new_base}" if head else new_base
    n = 1
    while storage.exists(new):  # a second move of the same name within one second
        n += 1
        new = f"{head}/{new_base}-{n}" if head else f"{new_base}-{n}"
    storage.rename(name.rstrip("/"), new)
    return new


def order_by_step(infos: Iterable[CheckpointInfo]) -> list[CheckpointInfo]:
    """Sort by integer step (never as text: ``ckpt_9`` < ``ckpt_10``), ties broken by name."""
    return sorted(infos, key=lambda i: (i.step, i.name))


def choose_latest(
    candidates: Iterable[CheckpointInfo],
    validate: Callable[[CheckpointInfo], CheckpointInfo],
) -> tuple[CheckpointInfo | None, list[CheckpointInfo]]:
    """Walk candidates newest first, validating each, and stop at the first valid one.

    Returns the chosen checkpoint (or None) and the newer ones that were skipped, each carrying its reason.
    Validation is the expensive part, so older checkpoints are never looked at once a valid one is found.
    """
    skipped: list[CheckpointInfo] = []
    for info in reversed(order_by_step(candidates)):
        checked = validate(info)
        if checked.valid:
            return checked, skipped
        skipped.append(checked)
    return None, skipped


def newest(infos: Iterable[CheckpointInfo]) -> CheckpointInfo | None:
    """The highest-step checkpoint already known to be valid."""
    valid = [i for i in infos if i.valid]
    return order_by_step(valid)[-1] if valid else None


def invalid(info: CheckpointInfo, reason: str) -> CheckpointInfo:
    """A copy of ``info`` marked invalid for ``reason``."""
    return replace(info, valid=False, reason=reason)


def run_check(info: CheckpointInfo, check: Callable[[], dict[str, Any] | None]) -> CheckpointInfo:
    """Run ``check() -> dict of CheckpointInfo fields`` and turn its outcome into a validated copy of ``info``.

    The one shape of every ``validate``: a CorruptCheckpointError becomes the invalid reason, an OSError
    "unreadable: ...", and success a valid copy carrying the fields the check returned (size, time, ...).
    """
    try:
        fields = check() or {}
    except CorruptCheckpointError as e:
        return invalid(info, e.reason)
    except OSError as e:
        return invalid(info, f"unreadable: {e}")
    return replace(info, valid=True, reason="", **fields)


def match_step(pattern: Pattern[str], name: str) -> int | None:
    """The integer step in a checkpoint name: ``pattern``'s ``step`` group (else its first group) when ``pattern``
    matches ``name``, None when it does not. Always an integer, never text (``ckpt_9`` < ``ckpt_10``)."""
    m = pattern.match(name)
    if m is None:
        return None
    return int(m.group("step") if "step" in pattern.groupindex else m.group(1))


def step_entries(storage: Storage, parse: StepParser, dirs: bool = True) -> list[tuple[int, Entry]]:
    """The root's entries whose names ``parse`` gives a step, with that integer step, in listing order.

    Args:
        storage: the root to list.
        parse: the layout's name -> step parser.
        dirs: directories only (True) or plain files only (False).
    """
    out = []
    for e in storage.listdir(""):
        # Hidden names are other tools' partial writes (rsync's ``.name.XXXX``, editors), never checkpoints.
        if e.is_dir != dirs or e.name.startswith("."):
            continue
        step = parse(e.name)
        if step is not None:
            out.append((step, e))
    return out


class Layout(abc.ABC):
    """A framework's checkpoint layout. Subclasses are registered in :mod:`resumekit.layouts`."""

    #: registry name, e.g. ``"native"``, ``"hf"``, ``"megatron"``
    name: str = ""
    #: the tracker/pointer file relative to the root, when the layout has one
    tracker_name: str | None = None

    @abc.abstractmethod
    def detect(self, storage: Storage) -> bool:
        """Whether the root looks like this layout (cheap: a listing, maybe one small file)."""

    @abc.abstractmethod
    def list(self, storage: Storage) -> builtins.list[CheckpointInfo]:
        """Every checkpoint candidate under the root, ``valid`` left None (cheap)."""

    def candidate(self, storage: Storage, name: str, step: int, **fields: Any) -> CheckpointInfo:
        """A not-yet-validated :class:`CheckpointInfo` of this layout for the root entry ``name``."""
        return CheckpointInfo(step=step, name=name, path=storage.join(name), layout=self.name, **fields)

    def list_matching(self, storage: Storage, parse: StepParser, dirs: bool = True) -> builtins.list[CheckpointInfo]:
        """Candidates for the root entries whose names ``parse`` gives a step (see :func:`step_entries`).

        A file candidate carries the file's size and mtime from the listing; a directory's total is known only
        once it is validated.
        """
        return [
            self.candidate(storage, e.name, step)
            if dirs
            else self.candidate(storage, e.name, step, size=e.size, time=e.mtime)
            for step, e in step_entries(storage, parse, dirs)
        ]

    @abc.abstractmethod
    def validate(self, storage: Storage, info: CheckpointInfo, full: bool = True) -> CheckpointInfo:
        """A copy of ``info`` with ``valid``/``reason`` set. ``full`` reads contents (checksums, headers);
        otherwise only presence and sizes are checked."""

    def latest(
        self, storage: Storage, full: bool = True
    ) -> tuple[CheckpointInfo | None, builtins.list[CheckpointInfo]]:
        """The newest valid checkpoint and the newer invalid ones skipped on the way."""
        return choose_latest(self.list(storage), lambda i: self.validate(storage, i, full=full))

    def invalid_in_sight(
        self, storage: Storage, best: CheckpointInfo | None, skipped: builtins.list[CheckpointInfo]
    ) -> builtins.list[tuple[CheckpointInfo, str]]:
        """What the framework would find by itself although it is invalid: ``(entry, reason)`` pairs.

        By default the invalid checkpoints newer than the newest valid one (``skipped`` of :meth:`latest`), which a
        framework that takes the highest step (the HF Trainer's ``get_last_checkpoint``, a plain loop's sorted
        listing) would load; moving them aside also keeps a later save of the same step from writing into a
        directory that still holds files of the broken one. Layouts override it to add what their framework finds
        by name (Lightning's ``last.ckpt``) or through a tracker.

        Args:
            storage: the root.
            best: the newest valid checkpoint (None: none).
            skipped: the newer invalid ones, with their reasons.

        Returns:
            The entries to move aside, each with the reason shown to the user.
        """
        return [(s, s.reason) for s in skipped]

    def hide_invalid(
        self,
        storage: Storage,
        full: bool = True,
        dry_run: bool = False,
        found: tuple[CheckpointInfo | None, builtins.list[CheckpointInfo]] | None = None,
        now: float | None = None,
    ) -> builtins.list[HiddenCheckpoint]:
        """Move the invalid checkpoints the framework would pick by itself into ``quarantine/`` (never deleted),
        so that its own choice (the highest step, ``last``, its tracker) lands on a valid checkpoint or on none.

        Args:
            storage: the root.
            full: verify checksums while looking for the newest valid checkpoint.
            dry_run: say what would move, move nothing.
            found: ``(best, skipped)`` from a :meth:`latest` call just made, to avoid verifying twice.
            now: the time stamped into the new names (default: now).

        Returns:
            What was (or would be) moved, in the order of the moves.

        Raises:
            OSError: a move failed (the entries moved before it stay moved).
        """
        best, skipped = found if found is not None else self.latest(storage, full=full)
        out: list[HiddenCheckpoint] = []
        for info, reason in self.invalid_in_sight(storage, best, skipped):
            new = None if dry_run else move_aside(storage, info.name, now)
            to = storage.join(new) if new is not None else None
            out.append(HiddenCheckpoint(info.step, info.name, info.path, to, reason, to_name=new))
        return out

    def read_tracker(self, storage: Storage) -> str | None:
        """The tracker's raw content (stripped), or None when there is no tracker."""
        if not self.tracker_name or not storage.exists(self.tracker_name):
            return None
        from .checks.jsonfile import read_small

        try:
            return read_small(storage, self.tracker_name, storage.join(self.tracker_name))
        except (CorruptCheckpointError, OSError):
            # A tracker that is huge, a FIFO or unreadable names nothing; `repair` replaces it.
            return ""

    def tracker_value(self, info: CheckpointInfo | None) -> str | None:
        """What the tracker should contain to point at ``info``."""
        return None

    def repair(self, storage: Storage, full: bool = True, dry_run: bool = False) -> RepairResult | None:
        """Point the tracker at the newest valid checkpoint, keeping a backup of the old content.

        Returns None for layouts without a tracker.
        """
        if not self.tracker_name:
            return None
        best, _ = self.latest(storage, full=full)
        old = self.read_tracker(storage)
        new = self.tracker_value(best)
        if new is None:
            return RepairResult(
                self.tracker_name, old, None, False, message="no valid checkpoint: tracker left as it is"
            )
        if old == new:
            return RepairResult(self.tracker_name, old, new, False, message="tracker already correct")
        backup = None
        if not dry_run:
            if old is not None:
                backup = f"{self.tracker_name}.bak"
                storage.write_bytes_atomic(backup, (old + "\n").encode())
            storage.write_bytes_atomic(self.tracker_name, (new + "\n").encode())
        return RepairResult(
            self.tracker_name, old, new, True, backup, message=f"tracker {self.tracker_name}: {old!r} -> {new!r}"
        )
