"""Rank arithmetic on file names: which of the ranks a parallel save should have written are absent."""

from __future__ import annotations

from typing import List, Optional, Sequence, Set, Tuple


def missing_ranks(present: Set[int], expected: Optional[int] = None) -> List[int]:
    """Ranks absent from ``present``, which must be exactly ``0..expected-1`` (``0..max`` when not given)."""
    n = expected if expected is not None else (max(present) + 1 if present else 0)
    return [r for r in range(n) if r not in present]


def describe_ranks(ranks: Sequence[int], limit: int = 8) -> str:
    """``[1, 2, 3]`` -> ``"1, 2, 3"``; beyond ``limit`` ranks the rest is counted (``"... and 4 more"``)."""
    shown = ", ".join(str(r) for r in ranks[:limit])
    return shown + (f" and {len(ranks) - limit} more" if len(ranks) > limit else "")


def grid_missing(coords: Set[Tuple[int, ...]]) -> List[Tuple[int, ...]]:
    """Points missing from the full grid ``range(max_0+1) x range(max_1+1) x ...`` spanned by ``coords``.

    Returns:
        The absent points in row-major order (empty for an empty ``coords``).
    """
    if not coords:
        return []
    dims = len(next(iter(coords)))
    sizes = [max(c[i] for c in coords) + 1 for i in range(dims)]
    out: List[Tuple[int, ...]] = []

    def walk(prefix: Tuple[int, ...]) -> None:
        if len(prefix) == dims:
            if prefix not in coords:
                out.append(prefix)
            return
        for i in range(sizes[len(prefix)]):
            walk(prefix + (i,))

    walk(())
    return out
