"""``resumekit.storage.memtier``: telling a tmpfs local tier from a disk one, and the space rule for a tier."""

from __future__ import annotations

import os

import pytest

from resumekit.storage.memtier import filesystem_type, in_memory, mount_of, parse_mounts, tier_space_verdict

MOUNTS = """\
/dev/sda1 / ext4 rw,relatime 0 0
tmpfs /dev/shm tmpfs rw,nosuid,nodev,size=25165824k 0 0
/dev/sdb1 /data xfs rw 0 0
tmpfs /data/fast\\040tier tmpfs rw 0 0
"""


def test_parse_mounts_and_the_longest_mount_point_wins():
    mounts = parse_mounts(MOUNTS)
    assert ("/data/fast tier", "tmpfs") in mounts
    assert mount_of("/dev/shm/run", mounts) == ("/dev/shm", "tmpfs")
    assert mount_of("/data/fast tier/ckpt", mounts) == ("/data/fast tier", "tmpfs")
    assert mount_of("/data/fast", mounts) == ("/data", "xfs")
    assert mount_of("/data2/x", mounts) == ("/", "ext4")  # a prefix of the name is not a mount point
    assert mount_of("/home/me", parse_mounts("")) is None


def test_real_file_systems(tmp_path):
    if os.path.isdir("/dev/shm") and filesystem_type("/dev/shm") == "tmpfs":
        assert in_memory("/dev/shm/not-made-yet/deeper")  # a tier not made yet: its parent's file system
    if filesystem_type(str(tmp_path)) not in (None, "tmpfs", "ramfs"):
        assert not in_memory(str(tmp_path))


GiB = 1 << 30


def test_space_rule_keep_plus_one_and_messages():
    assert tier_space_verdict("/t", free=None, checkpoint_bytes=GiB, keep=1, memory=True, available=None) is None
    assert tier_space_verdict("/t", free=10, checkpoint_bytes=0, keep=1, memory=True, available=None) is None
    ok = tier_space_verdict("/t", free=3 * GiB, checkpoint_bytes=GiB, keep=2, memory=False, available=None)
    assert ok is None
    level, msg = tier_space_verdict("/dev/shm/t", free=GiB, checkpoint_bytes=GiB, keep=2, memory=True, available=None)
    assert level == "error"
    assert msg == (
        "local tier /dev/shm/t (tmpfs, in RAM) has 1.0 GiB free, needs 3.0 GiB (3 x the 1.0 GiB checkpoint: 2 kept "
        "+ 1 being written); enlarge it (mount -o remount,size=... or a bigger --shm-size for containers), keep "
        "fewer steps there (keep_last), or put the local tier on a disk"
    )
    level, msg = tier_space_verdict("/fast", free=GiB, checkpoint_bytes=GiB, keep=None, memory=False, available=None)
    assert level == "error" and "needs 2.0 GiB (2 x the 1.0 GiB checkpoint: 1 kept + 1 being written)" in msg
    assert "resumekit gc" in msg
    # What the tier holds already counts as used: only the rest must be free.
    assert (
        tier_space_verdict(
            "/t", free=GiB, checkpoint_bytes=GiB, keep=1, memory=False, available=None, present_bytes=GiB
        )
        is None
    )


@pytest.mark.parametrize("available,warn", [(GiB, True), (64 * GiB, False), (None, False)])
def test_tmpfs_counts_against_ram(available, warn):
    v = tier_space_verdict(
        "/dev/shm/t", free=20 * GiB, checkpoint_bytes=2 * GiB, keep=1, memory=True, available=available
    )
    if not warn:
        assert v is None
        return
    assert v == (
        "warning",
        "local tier /dev/shm/t is tmpfs: its files count against RAM, and 4.0 GiB more there would leave the job "
        "0 B of the 1.0 GiB available; keep fewer steps there (keep_last) or put the local tier on a disk",
    )


def test_a_tmpfs_tier_without_keep_last_is_named():
    level, msg = tier_space_verdict(
        "/dev/shm/t", free=20 * GiB, checkpoint_bytes=GiB, keep=None, memory=True, available=None, unbounded=True
    )
    assert level == "warning" and msg == (
        "local tier /dev/shm/t is tmpfs and keeps every checkpoint: each save adds 1.0 GiB of RAM until it is full; "
        "set keep_last (and no keep_every) for it"
    )
    # On a disk, an unbounded tier is the user's choice (gc and the backlog bound deal with it).
    assert (
        tier_space_verdict(
            "/t", free=20 * GiB, checkpoint_bytes=GiB, keep=None, memory=False, available=None, unbounded=True
        )
        is None
    )


def test_tiered_storage_reads_its_retention(tmp_path):
    from resumekit.policy import RetentionPolicy
    from resumekit.storage.tiered import TieredStorage

    t = TieredStorage(str(tmp_path / "remote"), str(tmp_path / "fast"), retention=RetentionPolicy(keep_last=2))
    t.local.free_bytes = lambda: 2 * GiB  # type: ignore[method-assign]
    assert t.space_verdict(GiB) is None  # 2 kept + 1 written, one of them there already: 2 GiB free is enough
    level, msg = t.space_verdict(2 * GiB)
    assert (
        level == "error"
        and "needs 4.0 GiB (3 x the 2.0 GiB checkpoint: 2 kept + 1 being written, 2.0 GiB of it there already)" in msg
    )
    t.close()
