"""Every RNG's state as tensors and plain numbers, for checkpoints written by other frameworks.

:func:`resumekit.state.capture_rng` keeps numpy's state as numpy's own tuple, which our codec stores but
``torch.load(weights_only=True)`` (Lightning's loader) and the layouts' allow-list refuse. Here every state is a
tensor, an int, a float, None or a list of those, so the checkpoints that carry it stay loadable without running
code: python ``random``, numpy's global generator, torch CPU and every CUDA device.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def capture_rng_plain() -> dict[str, Any]:
    """The state of python ``random``, numpy's global generator, torch CPU and each initialised CUDA device."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    rng: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),  # uint32 words, widened losslessly
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = list(torch.cuda.get_rng_state_all())
    return rng


def restore_rng_plain(rng: Mapping[str, Any]) -> None:
    """Set every RNG from :func:`capture_rng_plain`'s output; a job on fewer CUDA devices restores those it has."""
    py = rng.get("python")
    if py is not None:
        random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss"]))
    npy = rng.get("numpy")
    if npy is not None:
        keys = np.asarray(torch.as_tensor(npy["keys"]).numpy(), dtype=np.uint32)
        np.random.set_state((npy["kind"], keys, int(npy["pos"]), int(npy["has_gauss"]), float(npy["cached_gaussian"])))
    if rng.get("torch") is not None:
        torch.set_rng_state(torch.as_tensor(rng["torch"], dtype=torch.uint8).cpu())
    cuda = rng.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        for i, s in enumerate(list(cuda)[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.as_tensor(s, dtype=torch.uint8).cpu(), i)
