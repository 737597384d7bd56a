"""Gather and apply the training state: stateful objects, plain values and every RNG.

``state`` is a mapping of names to objects with ``state_dict``/``load_state_dict`` (model, optimizer, LR scheduler,
GradScaler, sampler, torchdata StatefulDataLoader, ...) or plain values (epoch, counters). Plain values are written
back into the mapping on restore, since an int cannot be updated in place.
"""

from __future__ import annotations

import random
from typing import Any, Dict, Iterable, List, Mapping, MutableMapping, Optional

import numpy as np
import torch

from .codec import materialize
from .errors import StateMismatchError

RNG_KEY = "rng"
STATE_KEY = "state"


def is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def capture_state(state: Mapping[str, Any]) -> Dict[str, Any]:
    """``state_dict()`` of every stateful entry and the plain values as they are (references, not copies)."""
    out: Dict[str, Any] = {}
    for key, obj in state.items():
        if not isinstance(key, str):
            raise TypeError(f"state keys must be strings, got {key!r}")
        out[key] = obj.state_dict() if is_stateful(obj) else obj
    return out


def capture_rng() -> Dict[str, Any]:
    """python ``random``, numpy's global generator, torch CPU and every visible CUDA device."""
    rng: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: Mapping[str, Any]) -> None:
    rng = materialize(rng)
    if "python" in rng:
        random.setstate(_as_python_state(rng["python"]))
    if "numpy" in rng:
        np.random.set_state(tuple(rng["numpy"]))
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        states = list(rng["cuda"])
        n = torch.cuda.device_count()
        # A job restarted on fewer devices restores those it has; more devices keep their fresh seeds.
        for i, s in enumerate(states[:n]):
            torch.cuda.set_rng_state(s, i)


def _as_python_state(s: Any) -> Any:
    version, internal, gauss = s
    return (version, tuple(internal), gauss)


def apply_state(
    state: MutableMapping[str, Any],
    saved: Mapping[str, Any],
    *,
    only: Optional[Iterable[str]] = None,
    strict: bool = True,
    where: str = "checkpoint",
) -> List[str]:
    """Load ``saved`` into the objects of ``state``; returns the keys loaded.

    Raises:
        StateMismatchError: a requested key is missing from the checkpoint, or an object refuses its state
            (keys or shapes differ); the message names the key and the checkpoint.
    """
    keys = list(only) if only is not None else list(state.keys())
    missing = [k for k in keys if k not in saved]
    if only is not None:
        unknown = [k for k in keys if k not in state]
        if unknown:
            raise StateMismatchError(
                f"cannot load {unknown} from {where}: no such entries in the state passed "
                f"to restore() (it has {sorted(state)})"
            )
    if missing and (strict or only is not None):
        raise StateMismatchError(
            f"{where} has no entry for {missing} (it has {sorted(saved)}); pass only=[...] to load a subset or "
            "strict=False to start those entries fresh"
        )
    loaded = []
    for key in keys:
        if key not in saved:
            continue
        obj, value = state[key], saved[key]
        if not isinstance(obj, torch.nn.Module):
            # A module copies into its own parameters; anything else may keep the tensors it is given, so it
            # gets its own copies rather than views of the checkpoint file's memory map.
            value = materialize(value)
        if is_stateful(obj):
            _load_one(key, obj, value, where)
        else:
            state[key] = value
        loaded.append(key)
    return loaded


def _load_one(key: str, obj: Any, value: Any, where: str) -> None:
    if isinstance(obj, torch.nn.Module):
        mismatch = _module_mismatch(obj, value)
        if mismatch:
            raise StateMismatchError(f"state[{key!r}] does not match {where}: {mismatch}")
    try:
        obj.load_state_dict(value)
    except StateMismatchError:
        raise
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise StateMismatchError(f"state[{key!r}] ({type(obj).__name__}) refused the state in {where}: {e}") from e


def _module_mismatch(module: torch.nn.Module, sd: Any) -> str:
    if not isinstance(sd, Mapping):
        return f"expected a state_dict mapping, found {type(sd).__name__}"
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and isinstance(sd[k], torch.Tensor) and sd[k].shape != own[k].shape
    ]
    parts = []
    if missing:
        parts.append(f"missing keys {missing}")
    if unexpected:
        parts.append(f"unexpected keys {unexpected}")
    if shapes:
        parts.append("shape mismatch " + "; ".join(shapes))
    return ", ".join(parts)
