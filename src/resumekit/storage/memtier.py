"""A local tier in memory: telling a tmpfs (``/dev/shm``) directory from a disk one, and the space it needs.

A local tier on tmpfs makes saves and restores run at memory speed, with the durable copy on disk or an object
store behind it (:class:`resumekit.storage.tiered.TieredStorage`). Its pages are RAM (or swap): they count
against the machine's memory beside the job itself, and they are gone after a reboot, which is why the remote
tier stays the durable one.

The space rule (:func:`tier_space_verdict`, pure): the tier must hold ``keep + 1`` checkpoints, the ``keep`` it
retains plus the one being written (or downloaded) beside them; ``keep`` is the retention's ``keep_last`` when
known, else 1 (the newest and the next). Less free space than that is an error naming the fix; on a memory file
system, too little available memory for what the tier will add is a warning (the tier would push the job into
swap or the OOM killer).

Imports no torch and nothing above the ground layer: the supervisor and the library both use it.
"""

from __future__ import annotations

import os

from ..units import format_bytes

#: file system types whose files live in memory
MEMORY_FS_TYPES = frozenset({"tmpfs", "ramfs", "shm"})


def _unescape(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as octal (\040 ...)
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mounts(text: str) -> list[tuple[str, str]]:
    """(mount point, file system type) of every line of a ``/proc/mounts`` text, in order."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            out.append((_unescape(parts[1]), parts[2]))
    return out


def mount_of(path: str, mounts: list[tuple[str, str]]) -> tuple[str, str] | None:
    """The (mount point, type) ``path`` (resolved) lies on: the longest matching mount point, the last one
    mounted when several share it (it hides the others)."""
    best: tuple[str, str] | None = None
    for point, fstype in mounts:
        inside = path == point or path.startswith(point.rstrip("/") + "/") or point == "/"
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fstype)
    return best


def filesystem_type(path: str) -> str | None:
    """The type of the file system ``path`` is on (``"tmpfs"``, ``"ext4"``, ...); None when unknown (no
    ``/proc/mounts``, e.g. macOS)."""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            mounts = parse_mounts(f.read(1 << 22))
    except OSError:
        return None
    real = os.path.realpath(path)
    while not os.path.exists(real) and os.path.dirname(real) != real:
        real = os.path.dirname(real)  # a tier not made yet lives on its parent's file system
    found = mount_of(real, mounts)
    return found[1] if found else None


def in_memory(path: str) -> bool:
    """Whether ``path`` is on a memory file system (tmpfs, ramfs)."""
    return filesystem_type(path) in MEMORY_FS_TYPES


def mem_available() -> int | None:
    """The kernel's estimate of memory available to new work (``MemAvailable``), in bytes; None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def tier_space_verdict(
    where: str,
    *,
    free: int | None,
    checkpoint_bytes: int,
    keep: int | None,
    memory: bool,
    available: int | None,
    present_bytes: int = 0,
    unbounded: bool = False,
) -> tuple[str, str] | None:
    """Whether a local tier has room, as ``("error" | "warning", one line naming the fix)`` or None when fine.

    Args:
        where: the tier directory, as shown.
        free: its free bytes (None: unknown, nothing checked).
        checkpoint_bytes: the size of one checkpoint (the newest one; 0: unknown, nothing checked).
        keep: how many checkpoints the tier's retention keeps (None: unknown, taken as 1).
        memory: the tier is on tmpfs/ramfs.
        available: ``MemAvailable`` in bytes (None: unknown).
        present_bytes: what the tier holds already of those ``keep`` (it is counted in ``free`` already).
        unbounded: the tier's retention keeps checkpoints without a bound (none set, or ``keep_every``).
    """
    if not checkpoint_bytes or free is None:
        return None
    k = max(1, keep or 1)
    need = (k + 1) * checkpoint_bytes - present_bytes
    kind = "tmpfs, in RAM" if memory else "disk"
    if free < need:
        fix = (
            "enlarge it (mount -o remount,size=... or a bigger --shm-size for containers), keep fewer steps "
            "there (keep_last), or put the local tier on a disk"
            if memory
            else "free space there (resumekit gc), keep fewer steps (keep_last), or choose a larger local tier"
        )
        return (
            "error",
            f"local tier {where} ({kind}) has {format_bytes(free)} free, needs {format_bytes(need)} "
            f"({k + 1} x the {format_bytes(checkpoint_bytes)} checkpoint: {k} kept + 1 being written"
            + (f", {format_bytes(present_bytes)} of it there already" if present_bytes else "")
            + f"); {fix}",
        )
    if memory and unbounded:
        return (
            "warning",
            f"local tier {where} is tmpfs and keeps every checkpoint: each save adds "
            f"{format_bytes(checkpoint_bytes)} of RAM until it is full; set keep_last (and no keep_every) for it",
        )
    if memory and available is not None and available < need:
        return (
            "warning",
            f"local tier {where} is tmpfs: its files count against RAM, and {format_bytes(need)} more there "
            f"would leave the job {format_bytes(max(0, available - need))} of the {format_bytes(available)} "
            "available; keep fewer steps there (keep_last) or put the local tier on a disk",
        )
    return None


__all__ = [
    "MEMORY_FS_TYPES",
    "filesystem_type",
    "in_memory",
    "mem_available",
    "mount_of",
    "parse_mounts",
    "tier_space_verdict",
]
