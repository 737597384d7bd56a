"""The checkpoint root of the multi-node demo as its kill loop and its final comparison see it: a shared directory,
or an object store (``s3://``, ``obs://``) with a local tier on every node.

What the kill loop may trust is only what it can observe:

* **committed steps**: a ``step_N`` directory in a shared directory (the commit is its rename), or a ``step_N/``
  prefix with its ``manifest.json`` in the bucket (the commit is that PUT), listed through the library's storage
  layer at most every :attr:`RootWatch.min_interval` seconds (a listing costs requests; the loop polls every few
  milliseconds);
* **a save in progress**: the step's tmp directory in the shared directory, or (object store) the step's staging
  directory in a node's tier (``.tmp-step_N-<id>``: every rank of the node writes its files there, then uploads
  them). A staging directory whose save was killed stays until that tier's next save removes it, so the ones seen
  around a kill are remembered as dead (:meth:`RootWatch.forget_staging`);
* **an upload in progress** (object store): objects under ``step_N/`` in the bucket and no manifest yet.

Imports no torch: the kill loop stays light.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from ..format import MANIFEST, TMP_PREFIX, parse_step_dirname, step_dirname
from ..storage import is_remote, open_storage
from ..storage.base import Storage


def newest_step(directory: str) -> int:
    """The highest step committed in ``directory`` (a ``step_N`` directory; -1 when none): what the kill loop
    waits on, never what a restore trusts.

    Args:
        directory: the run directory.

    Returns:
        N of the newest ``step_N``.
    """
    steps = [parse_step_dirname(n) for n in os.listdir(directory)] if os.path.isdir(directory) else []
    return max((s for s in steps if s is not None), default=-1)


def staging_steps(directory: str) -> dict[str, int]:
    """The tmp (staging) directories of saves in ``directory``: name -> step (none when it does not exist).

    Args:
        directory: a checkpoint directory or a node tier.

    Returns:
        ``{".tmp-step_000000012-ab12...": 12, ...}``.
    """
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return {}
    out = {}
    for n in names:
        if n.startswith(TMP_PREFIX):
            step = parse_step_dirname(n[len(TMP_PREFIX) :].split("-", 1)[0])
            if step is not None:
                out[n] = step
    return out


class RootWatch:
    """What the kill loop observes of one run's checkpoints.

    Args:
        root: the run's checkpoint root: a directory, or an object-store URI (then ``tiers`` are where the saves
            stage).
        tiers: the nodes' local tier directories (only read for an object-store root: with a shared directory a
            tier gets a copy of a step after its commit, never a save in progress).
        min_interval: seconds between two listings of an object-store root.
    """

    def __init__(self, root: str, tiers: Sequence[str] = (), *, min_interval: float = 0.2):
        self.root = root
        self.remote = is_remote(root)
        self.tiers = list(tiers) if self.remote else [root]
        self.min_interval = min_interval
        self._storage: Storage | None = open_storage(root) if self.remote else None
        self._listed_at = -float("inf")
        self._newest = -1
        self._dead: set[str] = set()

    # ------------------------------------------------------------------------------------------ committed
    def committed(self, fresh: bool = False) -> int:
        """The newest committed step (-1 when none, or when the listing failed and none was seen before).

        Args:
            fresh: list an object store now, whatever the time since the last listing.
        """
        if self._storage is None:
            return newest_step(self.root)
        now = time.monotonic()
        if not fresh and now - self._listed_at < self.min_interval:
            return self._newest
        self._listed_at = now
        try:
            self._newest = max(self._newest, self._newest_remote(self._storage))
        except OSError:
            pass  # unknown this time: the loop waits on, every wait of the loop is bounded by its deadline
        return self._newest

    @staticmethod
    def _newest_remote(st: Storage) -> int:
        steps = sorted((s for e in st.listdir("") if (s := parse_step_dirname(e.name)) is not None), reverse=True)
        for step in steps:
            if st.exists(f"{step_dirname(step)}/{MANIFEST}"):
                return step
        return -1

    def is_committed(self, step: int) -> bool | None:
        """Whether ``step`` is committed: its ``step_N`` directory, or its manifest in the bucket (None: the
        listing failed)."""
        if self._storage is None:
            return os.path.isdir(os.path.join(self.root, step_dirname(step)))
        try:
            return self._storage.exists(f"{step_dirname(step)}/{MANIFEST}")
        except OSError:
            return None

    # ---------------------------------------------------------------------------------------------- saves
    def staging(self) -> int | None:
        """The step a live save is writing (its tmp or staging directory exists), None when no save is."""
        live = [s for t in self.tiers for n, s in staging_steps(t).items() if n not in self._dead]
        return max(live, default=None)

    def saving(self) -> bool:
        """Whether a save is in progress (see :meth:`staging`)."""
        return self.staging() is not None

    def staging_names(self) -> set[str]:
        """The staging directories present now, live or dead."""
        return {n for t in self.tiers for n in staging_steps(t)}

    def forget_staging(self, only: set[str] | None = None) -> None:
        """Take the staging directories present now (or those of ``only`` still present) for dead ones: called
        once the job that wrote them is gone (a killed save's stays in its tier until that tier's next save
        removes it)."""
        present = self.staging_names()
        self._dead |= present if only is None else present & only

    def uploading(self, step: int) -> bool:
        """Whether ``step``'s upload is under way: objects under ``step_N/`` in the bucket, no manifest yet (always
        False for a shared directory, where a save is not an upload)."""
        if self._storage is None:
            return False
        try:
            names = {e.name for e in self._storage.listdir(step_dirname(step))}
        except OSError:
            return False
        return bool(names) and MANIFEST not in names


def local_copy(root: str, step: int, into: str) -> str:
    """A local directory holding ``root``'s committed ``step``: ``root`` itself for a directory; for an object store
    the step downloaded into ``into`` through the library's verified copy (every file checked against the manifest).

    Args:
        root: the run's checkpoint root.
        step: the step to read.
        into: where an object store's step is downloaded (emptied first).

    Returns:
        The directory that holds ``step_N``.

    Raises:
        CorruptCheckpointError: the step is incomplete or damaged in the bucket.
        OSError: the download failed.
    """
    if not is_remote(root):
        return root
    import shutil

    from ..storage.transfer import copy_step

    shutil.rmtree(into, ignore_errors=True)
    os.makedirs(into)
    copy_step(open_storage(root), open_storage(into), step_dirname(step), desc=f"fetch {step_dirname(step)}")
    return into


def clear_root(root: str, *names: str) -> None:
    """Remove ``names`` (run prefixes or directories) under ``root``, so an earlier demo's steps are not resumed.

    Args:
        root: a directory or an object-store URI.
        names: the runs under it.
    """
    if not is_remote(root):
        import shutil

        for n in names:
            shutil.rmtree(os.path.join(root, n), ignore_errors=True)
        return
    st = open_storage(root)
    for n in names:
        st.remove_tree(n)


def join_root(root: str, name: str) -> str:
    """``root/name`` for a directory or an object-store URI."""
    return f"{root.rstrip('/')}/{name}" if is_remote(root) else os.path.join(root, name)


__all__ = ["RootWatch", "clear_root", "join_root", "local_copy", "newest_step", "staging_steps"]
