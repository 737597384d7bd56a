"""What every checkpoint layout answers, and the pure rules for picking the latest valid checkpoint.

A layout adapter knows one framework's directory conventions. It lists checkpoints with their integer steps,
validates one (saying why it is invalid), and, where the framework keeps a pointer file ("tracker"), reads and
repairs it. Adapters do I/O only through :class:`~resumekit.storage.Storage`, and import no torch, so the supervisor
and the CLI can use them on any machine.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterable, List, Optional, Pattern, Tuple

from ..errors import CorruptCheckpointError
from ..storage import Entry, Storage

#: a layout's name -> step parser (``checkpoint-1200`` -> 1200); None for names that are not checkpoints
StepParser = Callable[[str], Optional[int]]


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
    valid: Optional[bool] = None
    reason: str = ""
    size: int = 0
    time: Optional[float] = None
    metadata: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
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
    old: Optional[str]
    new: Optional[str]
    changed: bool
    backup: Optional[str] = None
    message: str = ""


def order_by_step(infos: Iterable[CheckpointInfo]) -> List[CheckpointInfo]:
    """Sort by integer step (never as text: ``ckpt_9`` < ``ckpt_10``), ties broken by name."""
    return sorted(infos, key=lambda i: (i.step, i.name))


def choose_latest(
    candidates: Iterable[CheckpointInfo],
    validate: Callable[[CheckpointInfo], CheckpointInfo],
) -> Tuple[Optional[CheckpointInfo], List[CheckpointInfo]]:
    """Walk candidates newest first, validating each, and stop at the first valid one.

    Returns the chosen checkpoint (or None) and the newer ones that were skipped, each carrying its reason.
    Validation is the expensive part, so older checkpoints are never looked at once a valid one is found.
    """
    skipped: List[CheckpointInfo] = []
    for info in reversed(order_by_step(candidates)):
        checked = validate(info)
        if checked.valid:
            return checked, skipped
        skipped.append(checked)
    return None, skipped


def newest(infos: Iterable[CheckpointInfo]) -> Optional[CheckpointInfo]:
    """The highest-step checkpoint already known to be valid."""
    valid = [i for i in infos if i.valid]
    return order_by_step(valid)[-1] if valid else None


def invalid(info: CheckpointInfo, reason: str) -> CheckpointInfo:
    """A copy of ``info`` marked invalid for ``reason``."""
    return replace(info, valid=False, reason=reason)


def run_check(info: CheckpointInfo, check: Callable[[], Optional[Dict[str, Any]]]) -> CheckpointInfo:
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


def match_step(pattern: Pattern[str], name: str) -> Optional[int]:
    """The integer step in a checkpoint name: ``pattern``'s ``step`` group (else its first group) when ``pattern``
    matches ``name``, None when it does not. Always an integer, never text (``ckpt_9`` < ``ckpt_10``)."""
    m = pattern.match(name)
    if m is None:
        return None
    return int(m.group("step") if "step" in pattern.groupindex else m.group(1))


def step_entries(storage: Storage, parse: StepParser, dirs: bool = True) -> List[Tuple[int, Entry]]:
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
    tracker_name: Optional[str] = None

    @abc.abstractmethod
    def detect(self, storage: Storage) -> bool:
        """Whether the root looks like this layout (cheap: a listing, maybe one small file)."""

    @abc.abstractmethod
    def list(self, storage: Storage) -> List[CheckpointInfo]:
        """Every checkpoint candidate under the root, ``valid`` left None (cheap)."""

    def candidate(self, storage: Storage, name: str, step: int, **fields: Any) -> CheckpointInfo:
        """A not-yet-validated :class:`CheckpointInfo` of this layout for the root entry ``name``."""
        return CheckpointInfo(step=step, name=name, path=storage.join(name), layout=self.name, **fields)

    def list_matching(self, storage: Storage, parse: StepParser, dirs: bool = True) -> List[CheckpointInfo]:
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

    def latest(self, storage: Storage, full: bool = True) -> Tuple[Optional[CheckpointInfo], List[CheckpointInfo]]:
        """The newest valid checkpoint and the newer invalid ones skipped on the way."""
        return choose_latest(self.list(storage), lambda i: self.validate(storage, i, full=full))

    def read_tracker(self, storage: Storage) -> Optional[str]:
        """The tracker's raw content (stripped), or None when there is no tracker."""
        if not self.tracker_name or not storage.exists(self.tracker_name):
            return None
        return storage.read_bytes(self.tracker_name).decode("utf-8", "replace").strip()

    def tracker_value(self, info: Optional[CheckpointInfo]) -> Optional[str]:
        """What the tracker should contain to point at ``info``."""
        return None

    def repair(self, storage: Storage, full: bool = True, dry_run: bool = False) -> Optional[RepairResult]:
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
