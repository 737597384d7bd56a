"""Loading a sharded checkpoint into live objects on every rank, all ranks agreeing at each phase.

No collective may be skipped on an error, so each phase (read and check, DCP's collective load, apply) ends with an
agreement: every rank learns whether any rank failed, the failing rank raises its own error and the others an error
of the same kind naming it, so no rank goes on alone into the next collective.
"""

from __future__ import annotations

import json
import logging
from collections.abc import MutableMapping, Sequence
from typing import Any

import torch

from ..errors import CorruptCheckpointError, StateMismatchError
from ..format import DIST_FILE
from ..state import RNG_KEY, STATE_KEY, apply_state, check_rng, check_state, restore_rng, select_keys
from ..storage import Storage
from ..storage.verified import Vouch
from ..verify import read_manifest, read_verified
from .context import DistContext
from .dcp_io import describe_failure, load_dcp_metadata, quiet_single_process, verified_reader_cls
from .sharded import read_rank_tree
from .statedict import (
    DCP_KEY,
    DCP_METADATA,
    PLAIN_OPTIM,
    check_shapes,
    dcp_entries,
    entry_state_dict,
    init_template,
    join_tensors,
    optimizer_owner,
    ref_keys,
    split_tensors,
)

log = logging.getLogger("resumekit")


def load_sharded(
    ctx: DistContext,
    st: Storage,
    name: str,
    state: MutableMapping[str, Any],
    *,
    only: Sequence[str] | None,
    strict: bool,
    rng: bool,
    vouch: Vouch | None = None,
) -> list[str]:
    """Load checkpoint ``name`` of ``st`` into ``state`` on every rank (collective); returns the keys loaded.

    Raises:
        StateMismatchError: the checkpoint does not fit the objects (names the key and the rank).
        CorruptCheckpointError: a file does not match the manifest.
    """
    import torch.distributed.checkpoint as dcp

    where = st.join(name)
    # Phase A (local): read and check everything; no collective may be skipped on an error, so errors are
    # collected and shared before DCP's collective load.
    err: BaseException | None = None
    load_flat: dict[str, Any] = {}
    pending: list[tuple[str, Any, Any]] = []
    tree: dict[str, Any] = {}
    keys: list[str] = []
    md: Any = None
    saved_world = 1
    try:
        man = read_manifest(st, name)
        doc = json.loads(read_verified(st, name, DIST_FILE, man))
        saved_world = int(doc["world_size"])
        src = ctx.rank if ctx.rank < saved_world else 0
        tree = read_rank_tree(st, name, src, man, vouch)
        if man.files.get(DCP_METADATA) is not None:
            md = load_dcp_metadata(read_verified(st, name, DCP_METADATA, man), where, man.files)
        skeleton = tree.get(DCP_KEY, {})
        rest = tree.get(STATE_KEY, {})
        saved_keys = set(skeleton) | set(rest)
        keys = select_keys(state, saved_keys, only=only, strict=strict, where=where)
        entries = dcp_entries(state)
        modules = {k: v for k, v in entries.items() if isinstance(v, torch.nn.Module)}
        for key in keys:
            if key not in skeleton:
                continue
            obj = state[key]
            if key not in entries:
                raise StateMismatchError(
                    f"state[{key!r}] is a {type(obj).__name__}, but {where} saved it as a module/optimizer through DCP"
                )
            saved = skeleton[key]
            if isinstance(saved, dict) and PLAIN_OPTIM in saved:
                pending.append((key, obj, saved))
                continue
            if isinstance(obj, torch.optim.Optimizer) and not obj.state:
                current = init_template(key, obj, modules)
            else:
                current = entry_state_dict(key, obj, modules)
            template_flat: dict[str, Any] = {}
            split_tensors(current, key, template_flat)
            need = ref_keys(saved)
            absent = sorted(set(need) - set(template_flat))
            extra = sorted(set(template_flat) - set(need)) if isinstance(obj, torch.nn.Module) else []
            if absent or extra:
                parts = ([f"missing keys {[k[len(key) + 1 :] for k in extra]}"] if extra else []) + (
                    [f"unexpected keys {[k[len(key) + 1 :] for k in absent]}"] if absent else []
                )
                raise StateMismatchError(f"state[{key!r}] does not match {where}: {', '.join(parts)}")
            if md is not None:
                check_shapes(key, need, template_flat, md, where)
            for k in need:
                load_flat[k] = template_flat[k]
            pending.append((key, obj, saved))
        # All or nothing: the other entries and the RNG states are validated here too, before DCP's load and the
        # apply phase change any live object (a CorruptCheckpointError lets every rank fall back together).
        rest_keys = [k for k in keys if k not in skeleton and k in rest]
        check_state(state, rest, only=rest_keys, strict=False, where=where)
        if rng and RNG_KEY in tree and ctx.rank < saved_world:
            check_rng(tree[RNG_KEY], where)
    except Exception as e:  # noqa: BLE001
        err = e
    agree_or_raise(ctx, err, where, "reading")
    if load_flat:
        try:
            with quiet_single_process():
                dcp.load(
                    load_flat,
                    storage_reader=verified_reader_cls()(st.join(name), md, where),
                    process_group=ctx.dcp_group,
                    no_dist=not ctx.use_dist,
                )
        except BaseException as e:
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise CorruptCheckpointError(where, f"loading the DCP shards failed: {describe_failure(e)}") from None
    # Phase C (local): hand the loaded state to the objects; again agreed before returning.
    err = None
    loaded: list[str] = []
    try:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        for key, obj, saved in pending:
            if isinstance(saved, dict) and PLAIN_OPTIM in saved:
                obj.load_state_dict(saved[PLAIN_OPTIM])
            else:
                sd = join_tensors(saved, load_flat)
                try:
                    if isinstance(obj, torch.nn.Module):
                        set_model_state_dict(obj, sd)
                    else:
                        set_optimizer_state_dict(optimizer_owner(key, obj, modules), obj, sd)
                except (RuntimeError, ValueError, KeyError, TypeError) as e:
                    raise StateMismatchError(
                        f"state[{key!r}] ({type(obj).__name__}) refused the state in {where}: {e}"
                    ) from e
            loaded.append(key)
        saved_rest = tree.get(STATE_KEY, {})
        # Missing entries were judged above (strict / only); here only what the checkpoint has is applied.
        rest_keys = [k for k in keys if k not in tree.get(DCP_KEY, {}) and k in saved_rest]
        loaded += apply_state(state, saved_rest, only=rest_keys, strict=False, where=where)
        if rng and RNG_KEY in tree:
            if ctx.rank < saved_world:
                restore_rng(tree[RNG_KEY])
            else:
                log.warning(
                    "rank %d: %s was saved by %d ranks and has no RNG state for this rank; it keeps "
                    "the RNG state it was seeded with",
                    ctx.rank,
                    where,
                    saved_world,
                )
    except Exception as e:  # noqa: BLE001
        err = e
    agree_or_raise(ctx, err, where, "applying")
    return loaded


def agree_or_raise(ctx: DistContext, err: BaseException | None, where: str, phase: str) -> None:
    """Every rank learns whether any rank failed; the failing rank raises its own error, the others an
    error of the same kind naming it (so no rank goes on alone into the next collective)."""
    corrupt = isinstance(err, CorruptCheckpointError)
    msgs = ctx.ctl.all_gather(None if err is None else (corrupt, f"{type(err).__name__}: {err}"))
    if err is not None:
        if ctx.world_size > 1:
            add_rank(err, ctx.rank)
        raise err
    bad = [(r, s) for r, s in enumerate(msgs) if s]
    if bad:
        r, (was_corrupt, text) = bad[0]
        msg = f"failed while {phase} on rank {r} of {ctx.world_size}: {text}"
        if was_corrupt:
            raise CorruptCheckpointError(where, msg)
        raise StateMismatchError(f"restoring {where} {msg}")


def add_rank(err: BaseException, rank: int) -> None:
    """Prefix an error raised on one rank with that rank (its message and, for a corrupt checkpoint, its reason)."""
    if isinstance(err, CorruptCheckpointError):
        err.reason = f"(rank {rank}) {err.reason}"
    err.args = (f"rank {rank}: {err.args[0]}",) + tuple(err.args[1:]) if err.args else (f"rank {rank}",)
