"""The Checkpointer contract: how one checkpoint is captured, made durable, found again and loaded.

Three layers, each owning one thing (the split orbax uses): the *format* code writes and reads the files of one
checkpoint (:mod:`resumekit.checkpointers.native`, DCP's writer); a *checkpointer* owns atomicity, staging and,
for sharded state, the agreement between ranks; the :class:`~resumekit.manager.CheckpointManager` owns steps,
policy, retention, events, cost, signals and lifecycle and talks to a checkpointer only through this protocol.

The order of calls for a save (the manager drives it; ``persist`` may run on a background thread)::

    snap = cp.snapshot(step, state, metadata=..., stage=async, rng=..., skip_if_committed=...)  # training thread
    if snap is not None:
        committed = cp.persist(snap, background=async)                                         # durable + commit

and for a restore (every rank makes the same calls in the same order: an implementation may use collectives)::

    for cand in cp.candidates(root_or_path):        # newest first
        opened = cp.open(cand)                      # verify; CorruptCheckpointError/OSError: skip it
        loaded = cp.load(opened, state, ...)        # all-or-nothing into the live objects; a
                                                    # CorruptCheckpointError here changed nothing: skip it too

Only the root's writer (the holder of its lease, see :mod:`resumekit.storage.lease`) calls ``clean_stale_tmp``;
readers never remove anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from ..format import MANIFEST, TMP_PREFIX, parse_step_dirname
from ..layouts.base import CheckpointInfo, order_by_step
from ..layouts.native import NativeLayout
from ..storage import Storage, open_parent, open_storage
from ..storage.resave import recover_resaves
from ..storage.steps import valid_manifest

log = logging.getLogger("resumekit")


@dataclass
class Snapshot:
    """What the training thread captured for one save; opaque to the manager apart from these fields.

    Attributes:
        step: the step being saved.
        name: the checkpoint's directory name (``step_N``).
        metadata: JSON metrics stored in the manifest.
        entries: the state's entry names, in order.
        payload: the implementation's captured data (encoded tree, host tensors, open transaction, ...).
    """

    step: int
    name: str
    metadata: dict[str, Any]
    entries: list[str]
    payload: Any = None


@dataclass
class Committed:
    """A checkpoint that :meth:`Checkpointer.persist` made durable and committed.

    Attributes:
        step / path: what was committed and where.
        nbytes: total bytes of its files.
        seconds: how long the persist took (writing, fsyncs, commit).
        io: how the data went to disk (``"direct"``, ``"buffered"``, ``"stream"``), when the implementation says.
    """

    step: int
    path: str
    nbytes: int
    seconds: float
    io: str | None = None


@dataclass
class Candidate:
    """A checkpoint that may be restored, before verification.

    Attributes:
        root: the storage root (path or URI) holding it; a plain string so it can travel between ranks.
        name: its directory name under ``root``.
        step: its step.
        path: its full path or URI (for messages and events).
        explicit: named by the user (a ``step_N`` path): invalid is an error, not a reason to skip it.
        remote: it lives in the remote tier of a tiered storage and must be downloaded before reading.
    """

    root: str
    name: str
    step: int
    path: str
    explicit: bool = False
    remote: bool = False

    def storage(self) -> Storage:
        return open_storage(self.root, create=False)

    def info(self) -> CheckpointInfo:
        return CheckpointInfo(step=self.step, name=self.name, path=self.path, layout="native")


@dataclass
class Opened:
    """A verified candidate, ready for :meth:`Checkpointer.load`.

    Attributes:
        info: the checkpoint, ``valid`` set (size, time and metadata when the implementation read them).
        payload: what the implementation read while verifying (the decoded tree, the parsed DCP plan, ...).
    """

    info: CheckpointInfo
    payload: Any = field(default=None, repr=False)


class Checkpointer(Protocol):
    """Captures, persists, finds and loads checkpoints under one root. See the module docstring for the order of
    calls. Implementations: :class:`~resumekit.checkpointers.local.LocalCheckpointer` (one process, the native
    format) and :class:`~resumekit.checkpointers.dcp.DcpCheckpointer` (sharded, every rank its own files)."""

    #: the root every save goes to
    storage: Storage
    #: True when calls are collective (every rank must make them at the same step); background errors then
    #: surface only at the next save/wait/close, which every rank reaches together
    collective: bool
    #: this process writes the event log and applies retention (rank 0)
    leads_job: bool
    #: this process beats the node's heartbeat (local rank 0)
    leads_node: bool

    def event_fields(self) -> dict[str, Any]:
        """Extra fields for the ``save``/``restore`` events (e.g. the world size)."""

    def needs_agreement(self, handle_sigterm: bool, clock_based: bool) -> bool:
        """Whether a save decision can differ between processes and must be agreed at every step."""

    def agree(self, preempt: bool, due: bool) -> tuple[bool, bool]:
        """(any process preempted, any process due)."""

    def honours_resume_env(self) -> bool:
        """Whether ``RESUMEKIT_RESUME_FROM`` (the supervisor's hand-off) still describes the newest checkpoint."""

    def snapshot(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        metadata: dict[str, Any],
        stage: bool,
        rng: bool,
        skip_if_committed: bool,
    ) -> Snapshot | None:
        """Capture ``state`` (host copies when ``stage``, for a background persist); None when
        ``skip_if_committed`` and the step is already committed under the root."""

    def persist(self, snap: Snapshot, *, background: bool) -> Committed:
        """Write, make durable and commit a snapshot (on the background thread when ``background``)."""

    def candidates(self, path: str | None = None) -> list[Candidate]:
        """Restore candidates, newest first: the root's (``path`` None) or those at a user-named path."""

    def open(self, cand: Candidate) -> Opened:
        """Verify a candidate. Raises CorruptCheckpointError (or OSError) when it must not be loaded."""

    def load(
        self, opened: Opened, state: MutableMapping[str, Any], *, only: Sequence[str] | None, strict: bool, rng: bool
    ) -> list[str]:
        """Apply a verified checkpoint to ``state``; returns the entries loaded.

        All or nothing: everything is decoded and validated first (entries, shapes, dtypes, RNG states, devices,
        plain values). A :class:`CorruptCheckpointError` is raised only before the first live object changes, so
        the caller may try an older checkpoint; a :class:`StateMismatchError` says the checkpoint does not fit.
        """

    def clean_stale_tmp(self) -> None:
        """Finish interrupted re-saves and remove in-progress directories left by killed saves (the caller holds
        the root's writer lease: it is the only writer)."""

    def release(self) -> None:
        """Free staging buffers."""


# ------------------------------------------------------------------------------------ shared by implementations
def is_committed(storage: Storage, name: str) -> bool:
    """``name`` holds a committed checkpoint whose files pass the quick check (manifest, sizes)."""
    # exists() first: a store that fails must raise, not read as "not committed" (valid_manifest counts every
    # OSError as invalid).
    return storage.exists(f"{name}/{MANIFEST}") and valid_manifest(storage, name) is not None


def remove_stale_tmp(storage: Storage) -> None:
    """Finish interrupted re-saves (:func:`~resumekit.storage.resave.recover_resaves`), then remove every
    in-progress (``.tmp-``) directory under the root: only its one writer (the lease holder) may call this."""
    recover_resaves(storage)
    for e in storage.listdir(""):
        if e.name.startswith(TMP_PREFIX):
            try:
                storage.remove_tree(e.name)
            except OSError as err:
                log.warning("could not remove stale %s: %s", storage.join(e.name), err)


def root_candidates(storage: Storage) -> list[Candidate]:
    """Every ``step_N`` directory under ``storage``, newest first (unverified)."""
    return [
        Candidate(storage.uri, i.name, i.step, i.path) for i in reversed(order_by_step(NativeLayout().list(storage)))
    ]


def candidates_at(path: str) -> list[Candidate]:
    """What a user-named path offers: a ``step_N`` directory with a manifest is one explicit candidate (an invalid
    one is an error); anything else is taken as a run directory whose checkpoints are tried newest first."""
    parent, name = open_parent(path)
    step = parse_step_dirname(name)
    if step is not None and parent.exists(f"{name}/{MANIFEST}"):
        return [Candidate(parent.uri, name, step, parent.join(name), explicit=True)]
    return root_candidates(open_storage(str(path).rstrip("/"), create=False))


def first_valid(
    cp: Checkpointer,
    candidates: Sequence[Candidate],
    on_skip: Callable[[CheckpointInfo, str], None],
    accept: Callable[[Opened], Any] | None = None,
) -> Opened | None:
    """Open candidates newest first and return the first valid one. An invalid one is passed to ``on_skip`` with
    its reason, except one the user named (a step directory), whose error is raised. With a collective
    checkpointer every rank walks the same list and gets the same verdicts.

    Args:
        accept: called with each opened candidate (e.g. loading it); a CorruptCheckpointError it raises (before
            changing anything) skips the candidate like a failed verification.
    """
    for cand in candidates:
        try:
            opened = cp.open(cand)
            if accept is not None:
                accept(opened)
            return opened
        except CorruptCheckpointError as e:
            if cand.explicit:
                raise
            on_skip(cand.info(), e.reason)
        except OSError as e:
            if cand.explicit:
                raise
            on_skip(cand.info(), f"unreadable: {e}")
    return None


def first_valid_at(
    cp: Checkpointer,
    path: str,
    on_skip: Callable[[CheckpointInfo, str], None],
    accept: Callable[[Opened], Any] | None = None,
) -> Opened:
    """A user-named checkpoint directory, or the newest valid checkpoint of a run directory.

    Raises:
        CorruptCheckpointError: the named step directory is invalid.
        CheckpointNotFoundError: nothing valid there.
    """
    got = first_valid(cp, cp.candidates(path), on_skip, accept)
    if got is None:
        raise CheckpointNotFoundError(f"no valid resumekit checkpoint at {path.rstrip('/')}: {not_found_reason(path)}")
    return got


def not_found_reason(path: str) -> str:
    """Why nothing at a user-named path could be restored, with what to pass instead."""
    name = str(path).rstrip("/").rpartition("/")[2]
    if parse_step_dirname(name) is not None:
        return "its manifest.json is missing: that save never finished"
    return "pass a step_N directory or a run directory that holds one"


__all__ = [
    "Checkpointer",
    "Snapshot",
    "Committed",
    "Candidate",
    "Opened",
    "is_committed",
    "remove_stale_tmp",
    "root_candidates",
    "candidates_at",
    "first_valid",
    "first_valid_at",
    "not_found_reason",
]
