"""The native steps of one tier, and the pure decisions of the tiered storage about them: which queued steps to
upload or skip, which local steps to upload again after a crash. Shared by :mod:`resumekit.storage.tiered` and its
uploader (:mod:`resumekit.storage.uploader`); imports no torch and nothing above storage."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from ..errors import CorruptCheckpointError
from ..format import Manifest, parse_step_dirname
from ..verify import check_checkpoint
from .base import Storage


class Retention(Protocol):
    """What the uploader needs of a retention policy (:class:`resumekit.policy.RetentionPolicy` is one).

    Declared here so that storage imports nothing above it; the manager hands its policy in.
    """

    @property
    def active(self) -> bool:
        """False when no rule is set: every step is kept and nothing is planned."""

    def to_delete(
        self,
        valid_steps: Sequence[int],
        metrics: Mapping[int, Mapping[str, Any]] | None = None,
        protected: Iterable[int] = (),
    ) -> list[int]:
        """The valid steps to delete, oldest first; never the newest nor a ``protected`` one."""


# ------------------------------------------------------------------------------------------------------------------
# Pure decisions
# ------------------------------------------------------------------------------------------------------------------


def plan_uploads(
    pending: Sequence[int],
    remote_valid: Iterable[int],
    policy: Retention | None,
    metrics: Mapping[int, Mapping[str, Any]] | None = None,
) -> tuple[list[int], list[int]]:
    """Split the queued steps into (to upload, to skip), both oldest first.

    A queued step that the remote's retention would delete as soon as the newer queued steps land is skipped:
    uploading it would only delay the newer ones. The newest queued step is always uploaded, and without an
    active retention policy every queued step is.
    """
    pending = sorted(set(pending))
    if not pending or policy is None or not getattr(policy, "active", False):
        return pending, []
    doomed = set(policy.to_delete(sorted(set(remote_valid) | set(pending)), dict(metrics or {})))
    doomed.discard(pending[-1])
    return [s for s in pending if s not in doomed], [s for s in pending if s in doomed]


def steps_to_resync(local_valid: Iterable[int], remote_newest: int | None) -> list[int]:
    """Local steps the remote is missing after a crash: every valid local step newer than the remote newest."""
    floor = -1 if remote_newest is None else remote_newest
    return sorted(s for s in set(local_valid) if s > floor)


# ------------------------------------------------------------------------------------------------------------------
# The native steps of one tier
# ------------------------------------------------------------------------------------------------------------------


def step_dirs(storage: Storage) -> list[tuple[int, str]]:
    """(step, name) of every ``step_N`` directory at the root of ``storage``, in listing order."""
    return [(s, e.name) for e in storage.listdir("") if e.is_dir and (s := parse_step_dirname(e.name)) is not None]


def valid_manifest(storage: Storage, name: str, full: bool = False) -> Manifest | None:
    """The manifest of checkpoint ``name`` when it verifies (sizes only unless ``full``), else None.

    An unreadable checkpoint counts as invalid, as in discovery: the tiers only need to know which steps count.
    """
    try:
        return check_checkpoint(storage, name, full=full)
    except (CorruptCheckpointError, OSError):
        return None


def newest_valid(storage: Storage, full: bool = False) -> tuple[int, str] | None:
    """(step, name) of the newest valid native checkpoint (sizes only unless ``full``), or None."""
    # Newest first, stopping at the first valid one: older steps are never read.
    for step, name in sorted(step_dirs(storage), reverse=True):
        if valid_manifest(storage, name, full=full) is not None:
            return step, name
    return None


__all__ = ["Retention", "plan_uploads", "steps_to_resync", "step_dirs", "valid_manifest", "newest_valid"]
