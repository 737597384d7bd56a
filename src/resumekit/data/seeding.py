"""Seeds: per-sample seeding of the global RNGs (what the loader does around ``__getitem__``) and
:func:`seed_everything` (what a training script does once, first).

Why per sample: a dataset that augments with ``random``, ``numpy.random`` or ``torch.rand`` draws from global RNGs
whose state depends on everything drawn before in the same process. With worker processes that is "whatever this
worker happened to fetch earlier in the epoch", which changes when a run resumes mid-epoch (batches reach different
workers) or runs with another ``num_workers``. Seeding the three global RNGs from ``(seed, epoch, sample index)``
just before each ``__getitem__`` makes a sample's bytes a function of the sample alone.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError

_M64 = (1 << 64) - 1
_M32 = (1 << 32) - 1
#: salts that keep the per-sample, per-batch and collate seeds of one (seed, epoch) apart
_SALT_SAMPLE = 0x5A3D
_SALT_BATCH = 0xB47C
_SALT_COLLATE = 0xC011

#: the seed of the sample or batch being produced right now in this process (see :func:`current_sample_seed`)
_current: int | None = None


def _mix64(z: int) -> int:
    """splitmix64's finaliser: a bijection on 64-bit integers whose outputs look independent for nearby inputs."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The 64-bit seed of sample ``index`` in ``epoch`` of a loader seeded with ``seed``.

    Args:
        seed: the loader's base seed.
        epoch: the epoch.
        index: the dataset index of the sample.

    Returns:
        A seed in ``[0, 2**64)``; different inputs give unrelated seeds.
    """
    return _mix64(_mix64(_mix64((seed ^ _SALT_SAMPLE) & _M64) ^ (epoch & _M64)) ^ (index & _M64))


def batch_seed(seed: int, epoch: int, indices: Iterable[int], *, collate: bool = False) -> int:
    """The 64-bit seed of a batch: a function of its sample indices (in order), not of where it falls in the epoch.

    Args:
        seed: the loader's base seed.
        epoch: the epoch.
        indices: the batch's dataset indices.
        collate: the seed for ``collate_fn`` rather than for a batched ``__getitems__``.

    Returns:
        A seed in ``[0, 2**64)``.
    """
    # hash() of a tuple of ints is not randomised by PYTHONHASHSEED (ints hash to themselves), so every process,
    # worker or restart computes the same value.
    h = hash(tuple(int(i) for i in indices)) & _M64
    salt = _SALT_COLLATE if collate else _SALT_BATCH
    return _mix64(_mix64(_mix64((seed ^ salt) & _M64) ^ (epoch & _M64)) ^ h)


def seed_global_rngs(s: int) -> None:
    """Seed python ``random``, numpy's global (legacy ``RandomState``) generator and torch's CPU generator from ``s``.

    CUDA generators are left alone: a dataset draws on the CPU (CUDA cannot be used in forked workers), and
    re-seeding a device generator in the main process would disturb the training's own stream.

    Args:
        s: a 64-bit seed.
    """
    global _current
    _current = s
    random.seed(s)
    # numpy's legacy seeding takes 32 bits; an int seeds 5x faster than a two-word array.
    np.random.seed((s ^ (s >> 32)) & _M32)
    torch.default_generator.manual_seed(s)


RngState = tuple[Any, Any, torch.Tensor, int | None]


def save_global_rngs() -> RngState:
    """The state :func:`seed_global_rngs` changes, for :func:`restore_global_rngs`."""
    return random.getstate(), np.random.get_state(), torch.default_generator.get_state(), _current


def restore_global_rngs(saved: RngState) -> None:
    """Put back what :func:`save_global_rngs` returned."""
    global _current
    py, npy, th, _current = saved
    random.setstate(py)
    np.random.set_state(npy)
    torch.default_generator.set_state(th)


def in_worker() -> bool:
    """Whether this process is a DataLoader worker (its global RNGs belong to the loader alone)."""
    return torch.utils.data.get_worker_info() is not None


def call_seeded(s: int, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with the global RNGs seeded from ``s``.

    In a worker process the RNGs are simply seeded. In the main process (``num_workers=0``) their states are saved
    first and put back afterwards, so the training's own random stream (dropout, initialisation) is the same
    whether or not the loader draws.

    Args:
        s: the seed.
        fn: what to call.
        *args: its arguments.

    Returns:
        What ``fn`` returned.
    """
    if in_worker():
        seed_global_rngs(s)
        return fn(*args)
    saved = save_global_rngs()
    try:
        seed_global_rngs(s)
        return fn(*args)
    finally:
        restore_global_rngs(saved)


def current_sample_seed() -> int | None:
    """The seed of the sample (or batch) the loader is producing right now, for code that keeps its own generator.

    Inside ``__getitem__`` under a :class:`~resumekit.ResumableDataLoader` with ``seed_per_sample=True`` this is
    the value the global RNGs were seeded with; build ``np.random.default_rng(current_sample_seed())`` or a
    ``torch.Generator`` from it. None outside such a call.

    Returns:
        A 64-bit seed, or None.
    """
    return _current


def seed_everything(seed: int, *, deterministic: bool = False, warn_only: bool = False) -> int:
    """Seed python ``random``, numpy's global generator, torch on the CPU and every CUDA device; optionally switch
    torch to deterministic algorithms. Call it first, before building the model.

    Bitwise reproducibility (and so an exact resume) also needs what no seed gives:

    * the same thread count on the CPU (``torch.set_num_threads``), hardware, torch/CUDA/cuDNN versions and world
      size: floating-point reductions split differently give different bits;
    * on a GPU, deterministic kernels: ``deterministic=True`` calls ``torch.use_deterministic_algorithms(True)``,
      sets ``torch.backends.cudnn.deterministic = True`` and ``torch.backends.cudnn.benchmark = False``, and sets
      ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` when it is unset (cuBLAS reads it when its first handle is created, so
      call this before any CUDA work). Caveats: some operations have no deterministic CUDA implementation and then
      raise ``RuntimeError`` (``warn_only=True`` turns that into a warning, and gives up bitwise results for them),
      and deterministic kernels can be slower;
    * ``PYTHONHASHSEED``: the hash of ``str``/``bytes`` is randomised per process unless the variable is set
      *before* Python starts (setting it here would be too late), so code whose result depends on the iteration
      order of a ``set`` of strings differs from run to run. Start the job as
      ``PYTHONHASHSEED=0 resumekit run ... -- python train.py`` if yours does.

    The data order and the randomness inside ``__getitem__`` do not depend on this: a
    :class:`~resumekit.ResumableDataLoader` draws them from its own ``seed``.

    Args:
        seed: in ``[0, 2**32)`` (numpy's limit).
        deterministic: switch torch to deterministic algorithms (see above).
        warn_only: with ``deterministic``, warn instead of raising on an operation without a deterministic
            implementation.

    Returns:
        ``seed``.

    Raises:
        ConfigError: ``seed`` is not an integer in ``[0, 2**32)``.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= _M32:
        raise ConfigError(f"seed_everything: seed must be an integer in [0, 2**32), got {seed!r}")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also every CUDA device (lazily, when CUDA is not initialised yet)
    if deterministic:
        if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
            if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
                warnings.warn(
                    "seed_everything(deterministic=True) after CUDA was initialised: CUBLAS_WORKSPACE_CONFIG may be "
                    "set too late for cuBLAS to be deterministic; call it first or export CUBLAS_WORKSPACE_CONFIG="
                    ":4096:8 before starting the job",
                    stacklevel=2,
                )
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        torch.use_deterministic_algorithms(True, warn_only=warn_only)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return seed
