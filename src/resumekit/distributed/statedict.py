"""State dicts through DCP: tensors go to DCP (sharded, reshardable), the skeleton to our JSON codec.

DCP would otherwise store the non-tensor leaves (learning rates, betas, param-group lists) as pickled "bytes"
items; here every tensor leaf is replaced by a reference ``{_REF: key}`` and the skeleton is encoded as JSON.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import CorruptCheckpointError, StateMismatchError

DCP_METADATA = ".metadata"
DCP_KEY = "dcp"  # the key of the DCP skeleton in a rank's JSON tree
_REF = "__rk_dcp__"  # marks where a DCP-saved tensor sits in a state dict's JSON skeleton
PLAIN_OPTIM = "__rk_plain_optimizer__"  # an optimizer saved before its first step (no state to shard)


def split_tensors(tree: Any, prefix: str, out: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor leaf of ``tree`` by a reference ``{_REF: key}`` and put the tensor in ``out[key]``.

    The tensors go through DCP (sharded, reshardable), the skeleton through our JSON codec: DCP would otherwise
    store the non-tensor leaves (learning rates, betas, param-group lists) as pickled "bytes" items.
    """
    if isinstance(tree, torch.Tensor):
        if prefix in out:
            raise StateMismatchError(f"two tensors of the state map to the DCP key {prefix!r}; rename one")
        out[prefix] = tree
        return {_REF: prefix}
    if isinstance(tree, dict):
        if _REF in tree:
            raise StateMismatchError(f"state{prefix!r} holds the reserved key {_REF!r}")
        return {k: split_tensors(v, f"{prefix}/{k}", out) for k, v in tree.items()}
    if isinstance(tree, list):
        return [split_tensors(v, f"{prefix}/{i}", out) for i, v in enumerate(tree)]
    if isinstance(tree, tuple):
        return tuple(split_tensors(v, f"{prefix}/{i}", out) for i, v in enumerate(tree))
    return tree


def join_tensors(tree: Any, tensors: Mapping[str, Any]) -> Any:
    """Inverse of :func:`split_tensors`."""
    if isinstance(tree, dict):
        if set(tree) == {_REF}:
            return tensors[tree[_REF]]
        return {k: join_tensors(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [join_tensors(v, tensors) for v in tree]
    if isinstance(tree, tuple):
        return tuple(join_tensors(v, tensors) for v in tree)
    return tree


def ref_keys(tree: Any) -> list[str]:
    """The DCP keys a skeleton references."""
    out: list[str] = []

    def walk(t: Any) -> None:
        if isinstance(t, dict):
            if set(t) == {_REF}:
                out.append(t[_REF])
                return
            for v in t.values():
                walk(v)
        elif isinstance(t, (list, tuple)):
            for v in t:
                walk(v)

    walk(tree)
    return out


def dcp_entries(state: Mapping[str, Any]) -> dict[str, Any]:
    """The entries saved through DCP: modules (plain, DDP, FSDP2) and optimizers."""
    return {k: v for k, v in state.items() if isinstance(v, (torch.nn.Module, torch.optim.Optimizer))}


def optimizer_owner(key: str, optim: torch.optim.Optimizer, modules: Mapping[str, torch.nn.Module]) -> torch.nn.Module:
    """The module whose parameters ``optim`` updates (DCP's optimizer state dicts are keyed by its FQNs)."""
    ids = {id(p) for g in optim.param_groups for p in g["params"]}
    for m in modules.values():
        if any(id(p) in ids for p in m.parameters()):
            return m
    raise StateMismatchError(
        f"state[{key!r}] is an optimizer whose parameters belong to none of the modules in the state "
        f"({sorted(modules)}); put the model it trains in the state passed to save/restore"
    )


def entry_state_dict(key: str, obj: Any, modules: Mapping[str, torch.nn.Module]) -> Any:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    if isinstance(obj, torch.nn.Module):
        return get_model_state_dict(obj)
    if not obj.state:
        # get_optimizer_state_dict would initialise the state with a zero-gradient step (step=1, zero moments),
        # changing the run; an optimizer that has not stepped yet has nothing to shard anyway.
        return {PLAIN_OPTIM: obj.state_dict()}
    return get_optimizer_state_dict(optimizer_owner(key, obj, modules), obj)


def init_template(key: str, optim: torch.optim.Optimizer, modules: Mapping[str, torch.nn.Module]) -> Any:
    """A state dict shaped like the saved one for an optimizer that has not stepped in this process yet.

    ``get_optimizer_state_dict`` initialises the moments with a zero-gradient, zero-lr step; the values it creates
    are all overwritten by the load.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(optimizer_owner(key, optim, modules), optim)


def check_shapes(key: str, need: Sequence[str], template: Mapping[str, Any], md: Any, where: str) -> None:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    bad = []
    for k in need:
        smd = md.state_dict_metadata.get(k)
        if smd is None:
            raise CorruptCheckpointError(where, f"{DCP_METADATA} has no entry for {k!r}")
        if not isinstance(smd, TensorStorageMetadata):
            raise CorruptCheckpointError(where, f"{DCP_METADATA} stores {k!r} as pickled bytes, not a tensor")
        shape = tuple(template[k].shape)
        if tuple(smd.size) != shape:
            bad.append(f"{k[len(key) + 1 :]}: checkpoint {tuple(smd.size)} vs model {shape}")
    if bad:
        raise StateMismatchError(f"state[{key!r}] does not match {where}: shape mismatch " + "; ".join(bad))
