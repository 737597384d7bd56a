"""Gather and apply the training state: stateful objects, plain values and every RNG.

``state`` is a mapping of names to objects with ``state_dict``/``load_state_dict`` (model, optimizer, LR scheduler,
GradScaler, sampler, torchdata StatefulDataLoader, ...) or plain values (epoch, counters). Plain values are written
back into the mapping on restore, since an int cannot be updated in place.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

import numpy as np
import torch

from .codec import materialize
from .errors import CorruptCheckpointError, StateMismatchError

RNG_KEY = "rng"
STATE_KEY = "state"


def is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def capture_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict()`` of every stateful entry and the plain values as they are (references, not copies)."""
    out: dict[str, Any] = {}
    for key, obj in state.items():
        if not isinstance(key, str):
            raise TypeError(f"state keys must be strings, got {key!r}")
        out[key] = obj.state_dict() if is_stateful(obj) else obj
    return out


def capture_rng() -> dict[str, Any]:
    """python ``random``, numpy's global generator, torch CPU and every visible CUDA device."""
    rng: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def check_rng(rng: Any, where: str) -> None:
    """Refuse a saved RNG state its generator would refuse, before anything is restored.

    Each state is loaded into a scratch generator (``random.Random()``, ``numpy.random.RandomState()``,
    ``torch.Generator()``), so nothing global changes; a malformed state is a corrupt checkpoint, found while the
    live objects are still untouched.

    Raises:
        CorruptCheckpointError: naming the generator.
    """
    if not isinstance(rng, Mapping):
        raise CorruptCheckpointError(where, "the saved RNG state is not a mapping")
    for name in ("python", "numpy", "torch", "cuda"):
        if name not in rng:
            continue
        value = rng[name]
        try:
            if name == "python":
                random.Random().setstate(_as_python_state(value))
            elif name == "numpy":
                np.random.RandomState().set_state(tuple(value))
            elif name == "torch":
                torch.Generator().set_state(_byte_state(value))
            else:
                for s in list(value):
                    _byte_state(s)
        except CorruptCheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - each generator raises its own types for a malformed state
            raise CorruptCheckpointError(where, f"the saved {name} RNG state is malformed ({_one_line(e)})") from None


def _byte_state(value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise ValueError("not a 1-D byte tensor")
    return value.clone()


def _one_line(e: BaseException, limit: int = 160) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def select_keys(
    state: Mapping[str, Any], saved: Iterable[str], *, only: Iterable[str] | None, strict: bool, where: str
) -> list[str]:
    """The entries a restore loads: ``only`` (each must be in ``state``) or every entry of ``state``.

    Raises:
        StateMismatchError: ``only`` names an entry the state lacks, or an entry to load is not among ``saved``
            while ``strict`` (or ``only``) asks for all of them.
    """
    keys = list(only) if only is not None else list(state.keys())
    if only is not None:
        unknown = [k for k in keys if k not in state]
        if unknown:
            raise StateMismatchError(
                f"cannot load {unknown} from {where}: no such entries in the state passed "
                f"to restore() (it has {sorted(state)})"
            )
    saved_keys = set(saved)
    missing = [k for k in keys if k not in saved_keys]
    if missing and (strict or only is not None):
        raise StateMismatchError(
            f"{where} has no entry for {missing} (it has {sorted(saved_keys)}); pass only=[...] to load a subset or "
            "strict=False to start those entries fresh"
        )
    return keys


def check_state(
    state: Mapping[str, Any],
    saved: Any,
    *,
    only: Iterable[str] | None = None,
    strict: bool = True,
    where: str = "checkpoint",
) -> list[str]:
    """Everything :func:`apply_state` checks, and more, without touching a live object; returns the keys to load.

    Modules: the keys, the shapes and that each saved dtype casts to the live one. Optimizers: what
    ``load_state_dict`` itself requires (as many parameter groups, each as many parameters; state for known
    parameters only). Other stateful objects: a mapping where they hand out a mapping. Plain values: the same
    kind of value as the live one (number, string, bool) when the live one is a scalar.

    Raises:
        StateMismatchError: the checkpoint does not fit the objects (keys, shapes, groups).
        CorruptCheckpointError: a saved value is malformed (a plain value of the wrong kind, a state that is not a
            mapping): the checkpoint, not the code, is at fault, so an older checkpoint may be tried.
    """
    if not isinstance(saved, Mapping):
        raise CorruptCheckpointError(where, "the saved state is not a mapping")
    keys = select_keys(state, saved, only=only, strict=strict, where=where)
    for key in keys:
        if key not in saved:
            continue
        obj, value = state[key], saved[key]
        if isinstance(obj, torch.nn.Module):
            mismatch = _module_mismatch(obj, value)
            if mismatch:
                raise StateMismatchError(f"state[{key!r}] does not match {where}: {mismatch}")
        elif isinstance(obj, torch.optim.Optimizer):
            mismatch = _optimizer_mismatch(obj, value)
            if mismatch:
                raise StateMismatchError(f"state[{key!r}] ({type(obj).__name__}) does not match {where}: {mismatch}")
        elif is_stateful(obj):
            if not isinstance(value, Mapping) and isinstance(_safe_state_dict(obj), Mapping):
                raise CorruptCheckpointError(
                    where, f"state[{key!r}] ({type(obj).__name__}) was saved as a {type(value).__name__}, not a mapping"
                )
        else:
            kind, live_kind = _kind(value), _kind(obj)
            if live_kind is not None and kind != live_kind:
                raise CorruptCheckpointError(
                    where, f"state[{key!r}] holds {_describe(value)} where the live value is {_describe(obj)}"
                )
    return keys


def _kind(v: Any) -> str | None:
    """The kind of a scalar plain value (None for anything else: containers and None accept any saved value)."""
    if isinstance(v, (bool, np.bool_)):
        return "bool"
    if isinstance(v, (int, float, np.integer, np.floating)):
        return "number"
    if isinstance(v, str):
        return "string"
    return None


def _describe(v: Any) -> str:
    return f"a {type(v).__name__}" if _kind(v) is None else f"a {_kind(v)} ({type(v).__name__})"


def _safe_state_dict(obj: Any) -> Any:
    try:
        return obj.state_dict()
    except Exception:  # noqa: BLE001 - only asked for its shape; load_state_dict will say what is wrong
        return None


def _optimizer_mismatch(opt: torch.optim.Optimizer, sd: Any) -> str:
    """What ``Optimizer.load_state_dict`` would refuse, found before it changes anything."""
    if not isinstance(sd, Mapping) or not isinstance(sd.get("param_groups"), list):
        return f"expected an optimizer state_dict with param_groups, found {type(sd).__name__}"
    groups, live = sd["param_groups"], opt.param_groups
    if len(groups) != len(live):
        return f"{len(groups)} parameter groups in the checkpoint, {len(live)} in the optimizer"
    ids: set[int | str] = set()
    for i, (g, lg) in enumerate(zip(groups, live, strict=True)):
        params = g.get("params") if isinstance(g, Mapping) else None
        if not isinstance(params, list):
            return f"parameter group {i} has no parameter list"
        if len(params) != len(lg["params"]):
            return f"parameter group {i} has {len(params)} parameters in the checkpoint, {len(lg['params'])} here"
        ids.update(p for p in params if isinstance(p, (int, str)))
    st = sd.get("state", {})
    if not isinstance(st, Mapping):
        return "its state is not a mapping"
    stray = [k for k in st if k not in ids]
    if stray:
        return f"state for parameters {stray[:4]} that no parameter group lists"
    bad = [k for k, v in st.items() if not isinstance(v, Mapping)]
    if bad:
        return f"the state of parameter {bad[0]} is not a mapping"
    return ""


def apply_state(
    state: MutableMapping[str, Any],
    saved: Mapping[str, Any],
    *,
    only: Iterable[str] | None = None,
    strict: bool = True,
    where: str = "checkpoint",
) -> list[str]:
    """Load ``saved`` into the objects of ``state``; returns the keys loaded.

    Raises:
        StateMismatchError: a requested key is missing from the checkpoint, or an object refuses its state
            (keys or shapes differ); the message names the key and the checkpoint.
    """
    # Every entry is checked before the first one is applied: a restore is all or nothing.
    keys = check_state(state, saved, only=only, strict=strict, where=where)
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
    dtypes = [
        f"{k}: checkpoint {sd[k].dtype} cannot be cast to the model's {own[k].dtype}"
        for k in own
        if k in sd
        and isinstance(sd[k], torch.Tensor)
        and isinstance(own[k], torch.Tensor)
        and not torch.can_cast(sd[k].dtype, own[k].dtype)
    ]
    untensors = [k for k in own if k in sd and isinstance(own[k], torch.Tensor) and not isinstance(sd[k], torch.Tensor)]
    parts = []
    if dtypes:
        parts.append("dtype mismatch " + "; ".join(dtypes))
    if untensors:
        parts.append(f"not tensors in the checkpoint: {untensors}")
    if missing:
        parts.append(f"missing keys {missing}")
    if unexpected:
        parts.append(f"unexpected keys {unexpected}")
    if shapes:
        parts.append("shape mismatch " + "; ".join(shapes))
    return ", ".join(parts)
