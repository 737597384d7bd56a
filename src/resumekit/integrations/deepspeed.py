"""DeepSpeed integration: resume from the supervisor's path, every RNG in the checkpoint, a save on SIGTERM.

``DeepSpeedEngine.save_checkpoint(save_dir, tag, client_state)`` writes ``save_dir/TAG/`` and ``save_dir/latest``
and restores model, optimizer (ZeRO partitions included) and LR scheduler; it saves no RNG and no data position,
so a resumed run is not the run it should have been. Three calls fix that::

    from resumekit.integrations import deepspeed as rk

    client = rk.load(engine)                     # RESUMEKIT_RESUME_FROM, or None: from scratch
    if client:
        loader.load_state_dict(client["data"])   # resumekit.ResumableDataLoader: the exact data position
    stop = rk.StopFlag()                         # SIGTERM -> save at the next step, then exit 0
    for batch in loader:
        loss = engine(batch); engine.backward(loss); engine.step()
        rk.step(engine, loss)                    # heartbeat + metrics event for `resumekit run`
        if engine.global_steps % 50 == 0 or stop.requested():
            rk.save(engine, save_dir, client_state={"data": loader.state_dict()})
            if stop.requested(): raise SystemExit(0)

``resumekit run`` exports ``RESUMEKIT_RESUME_FROM`` as the tag directory it verified (``save_dir/global_step1200``:
every rank's file present and complete, see :mod:`resumekit.layouts.deepspeed`), while ``load_checkpoint`` wants
``(save_dir, tag)``; :func:`split_resume_path` turns one into the other, so the job loads exactly that tag, not
whatever ``latest`` says. RNG states of every rank (python, numpy, torch CPU, each CUDA device) go into
``client_state`` and come back in :func:`load`: call it last before the loop. With those and
:class:`resumekit.ResumableDataLoader` a resumed run is bitwise equal to a straight one on the same world size.

DeepSpeed itself loads its files with ``torch.load(weights_only=False)``: only load checkpoints you wrote. It is
imported by the engine you pass, never here, so this module's path logic works without it.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import weakref
from collections.abc import Iterable
from typing import Any

from ..errors import CheckpointNotFoundError
from ..events import ENV_RESUME_FROM
from ._report import JobReporter
from ._rng import capture_rng_plain, restore_rng_plain

log = logging.getLogger("resumekit")

__all__ = ["CLIENT_KEY", "StopFlag", "load", "save", "split_resume_path", "step"]

#: the key of resumekit's entry (RNG states) in DeepSpeed's ``client_state``
CLIENT_KEY = "resumekit"
_LATEST = "latest"
_RANK_FILE_RE = re.compile(r"^(?:.*_)?mp_rank_\d+_model_states\.pt$")


def split_resume_path(path: str) -> tuple[str, str | None]:
    """``(load_dir, tag)`` for ``engine.load_checkpoint`` from a path naming a tag directory or a save directory.

    ``save_dir/global_step1200`` (what ``resumekit run`` exports) -> ``("save_dir", "global_step1200")``; a save
    directory (holding ``latest`` and no model states of its own, e.g. the Lightning DeepSpeed strategy's
    ``epoch=0-step=30.ckpt/``) -> ``(path, None)``: DeepSpeed then reads the tag from ``latest``.
    """
    p = os.path.normpath(path)
    try:
        names = os.listdir(p)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: no such checkpoint directory") from None
    except NotADirectoryError:
        raise CheckpointNotFoundError(f"{path}: a DeepSpeed checkpoint is a directory (save_dir/TAG)") from None
    is_tag = any(_RANK_FILE_RE.match(n) for n in names)
    if not is_tag and _LATEST in names:
        return p, None
    return os.path.dirname(p), os.path.basename(p)


# --------------------------------------------------------------------------------------------------- evidence
# One reporter per engine (its heartbeat throttle lives there), dropped with the engine.
_reporters: weakref.WeakKeyDictionary[Any, JobReporter] = weakref.WeakKeyDictionary()


def _reporter(engine: Any) -> JobReporter:
    rep = _reporters.get(engine)
    if rep is None:
        rep = JobReporter(
            "deepspeed",
            leads_job=getattr(engine, "global_rank", 0) == 0,
            leads_node=getattr(engine, "local_rank", 0) in (0, -1),
        )
        _reporters[engine] = rep
    return rep


def step(engine: Any, loss: Any = None, **metrics: Any) -> None:
    """Call after ``engine.step()``: beats the heartbeat and logs a ``metrics`` event (``resumekit run`` uses both).

    Args:
        engine: the DeepSpeed engine (its ``global_steps`` is the step).
        loss: this step's loss (a tensor or a number).
        **metrics: more numbers to log.
    """
    if loss is not None:
        metrics["loss"] = loss
    _reporter(engine).step(int(engine.global_steps), metrics)


# ------------------------------------------------------------------------------------------------ RNG, ranks
def _world(engine: Any) -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return 1, int(getattr(engine, "global_rank", 0) or 0)


def rng_states(engine: Any) -> list[dict[str, Any]]:
    """Every rank's RNG states, gathered to every rank (collective when distributed): DeepSpeed writes
    ``client_state`` from data-parallel rank 0 only."""
    mine = capture_rng_plain()
    world, _ = _world(engine)
    if world == 1:
        return [mine]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, mine)
    return out


# ----------------------------------------------------------------------------------------------- save, load
def save(
    engine: Any,
    save_dir: str,
    *,
    tag: str | None = None,
    client_state: dict[str, Any] | None = None,
    rng: bool = True,
    **kwargs: Any,
) -> str:
    """``engine.save_checkpoint`` with every rank's RNG states added to ``client_state``; collective.

    Args:
        engine: the DeepSpeed engine.
        save_dir: the checkpoint root (``resumekit run --dir``).
        tag: the tag directory (default: DeepSpeed's ``global_step{N}``, which resumekit's layout lists).
        client_state: your own state (the data loader's ``state_dict()``, counters), returned by :func:`load`.
        rng: save RNG states.
        **kwargs: passed to ``save_checkpoint`` (``save_latest``, ``exclude_frozen_parameters``).

    Returns:
        The tag directory written.
    """
    state = dict(client_state or {})
    if rng:
        state[CLIENT_KEY] = {"version": 1, "rng": rng_states(engine)}
    tag = tag or f"global_step{engine.global_steps}"
    engine.save_checkpoint(save_dir, tag=tag, client_state=state, **kwargs)
    path = os.path.join(save_dir, tag)
    _reporter(engine).saved(int(engine.global_steps), path)
    return path


def load(
    engine: Any,
    path: str | None = None,
    *,
    rng: bool = True,
    **kwargs: Any,
) -> dict[str, Any] | None:
    """Load the checkpoint ``resumekit run`` chose (or ``path``) into ``engine``; restore every RNG last.

    Args:
        engine: the DeepSpeed engine, fully built (``deepspeed.initialize`` done).
        path: a tag directory or save directory; default ``RESUMEKIT_RESUME_FROM`` (unset: nothing to load).
        rng: restore the RNG states saved by :func:`save` (this rank's).
        **kwargs: passed to ``engine.load_checkpoint`` (``load_optimizer_states``, ``load_module_strict``, ...).

    Returns:
        The ``client_state`` saved with the checkpoint (resumekit's own entry removed), or None when there was
        nothing to load (start from scratch).

    Raises:
        CheckpointNotFoundError: ``path`` is not there, or DeepSpeed found nothing to load in it.
    """
    path = path or os.environ.get(ENV_RESUME_FROM) or None
    rep = _reporter(engine)
    if not path:
        rep.restored(0, None)
        return None
    load_dir, tag = split_resume_path(path)
    loaded, client = engine.load_checkpoint(load_dir, tag=tag, **kwargs)
    if loaded is None:
        raise CheckpointNotFoundError(
            f"DeepSpeed loaded nothing from {path} (load_dir={load_dir}, tag={tag}): see its log above"
        )
    client = dict(client or {})
    ours = client.pop(CLIENT_KEY, None)
    if rng and ours:
        ranks = ours.get("rng") or []
        world, rank = _world(engine)
        if ranks:
            if len(ranks) != world:
                log.warning(
                    "resumekit: %s holds RNG states of %d ranks, this run has %d: not bitwise with a straight run",
                    path,
                    len(ranks),
                    world,
                )
            restore_rng_plain(ranks[rank % len(ranks)])
    elif rng:
        log.warning("resumekit: %s holds no RNG states (saved without resumekit.integrations.deepspeed.save)", path)
    # DeepSpeed returns the path of the model-states file it read; the checkpoint is its tag directory.
    rep.restored(int(engine.global_steps), os.path.join(load_dir, tag) if tag else os.path.dirname(str(loaded)))
    return client


# ---------------------------------------------------------------------------------------------- preemption
class StopFlag:
    """Records SIGTERM (and any other ``signals``) so the loop can save at the next step and exit 0.

    :meth:`requested` agrees across ranks (one tiny all-reduce when distributed), so every rank saves at the same
    step. A second signal terminates at once.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM,)):
        self.flag = False
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        if self.flag:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.flag = True
        log.warning("resumekit: signal %d: saving at the end of this step, then stopping", signum)

    def requested(self) -> bool:
        """Whether any rank received a stop signal (collective when distributed: call it on every rank)."""
        try:
            import torch
            import torch.distributed as dist
        except ImportError:  # pragma: no cover
            return self.flag
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.flag
        t = torch.tensor([1 if self.flag else 0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def restore(self) -> None:
        """Put the previous signal handlers back."""
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()
