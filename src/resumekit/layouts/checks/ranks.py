"""Rank arithmetic on file names: which of the ranks a parallel save should have written are absent.

Rank numbers come from file names and pickles, which a stray or forged file controls (``rng_state_99999999999.pth``,
``mp_rank_9999_9999_9999``), so every function here costs in proportion to the ranks *present* plus a small
``limit``, never to the largest rank number seen: the absent ranks are listed up to ``limit`` and counted.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

#: how many absent ranks are listed (the rest are only counted)
LIMIT = 64


def missing_ranks(present: set[int], expected: int | None = None, limit: int = LIMIT) -> list[int]:
    """Ranks absent from ``present``, which must be exactly ``0..expected-1`` (``0..max`` when not given): the
    first ``limit`` of them, in order (:func:`count_missing` counts them all)."""
    n = expected if expected is not None else (max(present) + 1 if present else 0)
    out: list[int] = []
    r = 0
    # Walks at most len(present) present ranks and `limit` absent ones.
    while r < n and len(out) < limit:
        if r not in present:
            out.append(r)
        r += 1
    return out


def count_missing(present: set[int], expected: int | None = None) -> int:
    """How many of ``0..expected-1`` (``0..max``) are absent from ``present`` (arithmetic, no list)."""
    n = expected if expected is not None else (max(present) + 1 if present else 0)
    return max(0, n - sum(1 for r in present if 0 <= r < n))


def describe_ranks(ranks: Sequence[int], limit: int = 8, total: int | None = None) -> str:
    """``[1, 2, 3]`` -> ``"1, 2, 3"``; beyond ``limit`` ranks the rest is counted (``"... and 4 more"``).

    Args:
        total: how many there are in all, when ``ranks`` lists only the first of them.
    """
    shown = ", ".join(str(r) for r in ranks[:limit])
    rest = (len(ranks) if total is None else total) - min(len(ranks), limit)
    return shown + (f" and {rest} more" if rest > 0 else "")


def grid_size(coords: Iterable[tuple[int, ...]]) -> list[int]:
    """The extent of the grid ``range(max_0+1) x range(max_1+1) x ...`` that ``coords`` spans."""
    coords = list(coords)
    if not coords:
        return []
    return [max(c[i] for c in coords) + 1 for i in range(len(coords[0]))]


def grid_missing(coords: set[tuple[int, ...]], limit: int = LIMIT) -> list[tuple[int, ...]]:
    """Points missing from the full grid spanned by ``coords`` (see :func:`grid_size`): the first ``limit`` in
    row-major order (empty for an empty ``coords``). The grid is walked lazily and the walk stops at ``limit``
    absent points, so it costs at most ``len(coords) + limit`` steps however large the grid is."""
    if not coords:
        return []
    out: list[tuple[int, ...]] = []
    for point in itertools.product(*(range(n) for n in grid_size(coords))):
        if point not in coords:
            out.append(point)
            if len(out) >= limit:
                break
    return out


def grid_count_missing(coords: set[tuple[int, ...]]) -> int:
    """How many points of the spanned grid are absent (arithmetic, no walk)."""
    total = 1
    for n in grid_size(coords):
        total *= n
    return total - len(coords) if coords else 0
