"""Direct I/O on the persist path (storage/direct.py, the staging image of snapshot.py, native's write side).

The fallback test uses a real file system that refuses O_DIRECT: ramfs (EINVAL at open). Note that tmpfs accepts
O_DIRECT on Linux >= 6.6, so /dev/shm is not such a file system here. Where mounting is not permitted the refusal is
injected at ``os.open`` instead (the test says which in its skip/parametrisation).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
import torch

from resumekit import CheckpointManager
from resumekit.checkpointers.native import read_checkpoint, write_checkpoint
from resumekit.codec import TreeEncoder
from resumekit.errors import CheckpointWriteError
from resumekit.events import read_events
from resumekit.format import TENSORS_FILE, new_hasher, step_dirname
from resumekit.snapshot import StagedTensors, StagingBuffers
from resumekit.storage import LocalStorage, direct
from resumekit.verify import check_checkpoint


@pytest.fixture(autouse=True)
def _fresh_probe():
    direct.forget()
    yield
    direct.forget()


@pytest.fixture
def direct_ok(tmp_path):
    """Skip where the test directory's file system refuses O_DIRECT (the fallback tests cover that case)."""
    if not direct.supported(str(tmp_path)):
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    direct.forget()


def _mount(tmp_path, fstype: str, opts: str | None = None):
    mnt = tmp_path / fstype
    mnt.mkdir()
    cmd = ["mount", "-t", fstype] + (["-o", opts] if opts else []) + [fstype, str(mnt)]
    if subprocess.run(cmd, capture_output=True).returncode != 0:
        return None
    return str(mnt)


@pytest.fixture
def ramfs(tmp_path):
    """A real file system without O_DIRECT (ramfs), or None where we may not mount."""
    mnt = _mount(tmp_path, "ramfs")
    yield mnt
    if mnt:
        subprocess.run(["umount", "-l", mnt])


def staged(state: dict) -> tuple[object, StagedTensors]:
    enc = TreeEncoder()
    tree = enc.encode(state)
    return tree, StagingBuffers().snapshot(enc.tensors)


def odd_state(n_floats: int) -> dict:
    g = torch.Generator().manual_seed(n_floats)
    return {
        "w": torch.randn(n_floats, generator=g),
        "i16": torch.arange(7, dtype=torch.int16),
        "flag": torch.tensor(True),
        "empty": torch.empty(0, 3),
        "c": torch.randn(3, 5, dtype=torch.complex64, generator=g),
        "d": torch.randn(9, dtype=torch.float64, generator=g),
        "bf": torch.randn(5, generator=g).to(torch.bfloat16),
    }


def test_the_staging_image_is_the_file_the_streaming_writer_writes(direct_ok, tmp_path):
    state = odd_state(1000)
    tree, st = staged(state)
    assert direct.address(st.image) % direct.ALIGN == 0
    a = write_checkpoint(LocalStorage(str(tmp_path / "a")), 1, tree, st)
    enc = TreeEncoder()
    tree2 = enc.encode(state)
    b = write_checkpoint(LocalStorage(str(tmp_path / "b")), 1, tree2, dict(enc.tensors))
    assert (a.io, b.io) == ("direct", "buffered")
    assert a.manifest.files == b.manifest.files  # same bytes, same checksum
    fa = (tmp_path / "a" / step_dirname(1) / TENSORS_FILE).read_bytes()
    assert fa == (tmp_path / "b" / step_dirname(1) / TENSORS_FILE).read_bytes()


@pytest.mark.parametrize("extra", [0, 1, 4095, 4096, 4097, 3 * 4096 - 5])
def test_unaligned_sizes_round_trip_bitwise(direct_ok, tmp_path, monkeypatch, extra):
    # Small chunks: several chunks over both writer threads, then a tail below one block written buffered.
    monkeypatch.setattr(direct, "CHUNK", 8192)
    image = direct.aligned_buffer(5 * 8192 + extra + 1)
    payload = os.urandom(5 * 8192 + extra)
    image[: len(payload)] = payload
    path = str(tmp_path / "f.bin")
    h = new_hasher()
    mode = direct.write_image(path, memoryview(image), len(payload), h.update)
    assert mode == "direct"
    with open(path, "rb") as f:
        assert f.read() == payload
    ref = new_hasher()
    ref.update(payload)
    assert h.hexdigest() == ref.hexdigest()


def test_a_file_smaller_than_one_block_is_written_buffered(tmp_path):
    image = direct.aligned_buffer(100)
    image[:100] = b"x" * 100
    assert direct.write_image(str(tmp_path / "s"), memoryview(image), 100) == "buffered"
    assert (tmp_path / "s").read_bytes() == b"x" * 100


def test_direct_checkpoint_verifies_and_restores_bitwise(direct_ok, tmp_path):
    d = str(tmp_path / "run")
    state = {"model": torch.nn.Linear(300, 301), "extra": odd_state(12345)}
    mgr = CheckpointManager(d, async_save=True, handle_sigterm=False)
    mgr.save(3, state)
    mgr.close()
    (ev,) = [e for e in read_events(os.path.join(d, "events.jsonl")) if e["event"] == "save"]
    assert ev["io"] == "direct"
    check_checkpoint(LocalStorage(d), step_dirname(3), full=True)
    verify = [sys.executable, "-m", "resumekit", "verify", os.path.join(d, step_dirname(3))]
    assert subprocess.run(verify, capture_output=True).returncode == 0
    fresh = {"model": torch.nn.Linear(300, 301), "extra": {}}
    assert CheckpointManager(d, handle_sigterm=False).restore(fresh) == 3
    for k, v in state["model"].state_dict().items():
        assert torch.equal(fresh["model"].state_dict()[k], v)
    for k, v in state["extra"].items():
        assert fresh["extra"][k].dtype == v.dtype and torch.equal(fresh["extra"][k], v)


def test_a_file_system_without_o_direct_falls_back_to_buffered(tmp_path, ramfs, monkeypatch):
    if ramfs is None:
        # No mount permission: refuse O_DIRECT at open, as ramfs (and some FUSE / network file systems) do.
        real_open = os.open

        def refusing_open(path, flags, *a, **kw):
            if flags & direct._O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_open(path, flags, *a, **kw)

        monkeypatch.setattr(direct.os, "open", refusing_open)
        root = str(tmp_path / "run")
    else:
        root = os.path.join(ramfs, "run")
    os.makedirs(root)
    assert direct.supported(root) is False  # probed, refused, cached
    state = {"model": torch.nn.Linear(64, 64)}
    mgr = CheckpointManager(root, async_save=True, handle_sigterm=False)
    mgr.save(1, state)
    mgr.close()
    (ev,) = [e for e in read_events(os.path.join(root, "events.jsonl")) if e["event"] == "save"]
    assert ev["io"] == "buffered"
    check_checkpoint(LocalStorage(root), step_dirname(1), full=True)
    assert not [n for n in os.listdir(root) if n.startswith(".direct-probe")]  # the probe cleans up


def test_a_refusal_after_the_probe_rewrites_the_file_buffered(direct_ok, tmp_path, monkeypatch):
    real = os.pwrite

    def refusing_pwrite(fd, data, offset):
        if direct._fcntl_getfl(fd) & direct._O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(direct.os, "pwrite", refusing_pwrite)
    tree, st = staged(odd_state(5000))
    res = write_checkpoint(LocalStorage(str(tmp_path)), 1, tree, st)
    assert res.io == "buffered"
    assert direct.supported(str(tmp_path)) is False  # remembered for the rest of the run
    read_checkpoint(LocalStorage(str(tmp_path)), step_dirname(1))


def test_disk_full_during_a_direct_write_aborts_cleanly(tmp_path):
    mnt = _mount(tmp_path, "tmpfs", "size=3m")
    if mnt is None:
        pytest.skip("cannot mount a small tmpfs here (the buffered ENOSPC path is tested in test_manager)")
    try:
        if not direct.supported(mnt):
            pytest.skip("this kernel's tmpfs refuses O_DIRECT")
        mgr = CheckpointManager(mnt, async_save=True, handle_sigterm=False)
        mgr.save(1, {"w": torch.ones(1000)})
        mgr.wait()
        with pytest.raises(CheckpointWriteError, match=r"the disk is full.*previous checkpoint is untouched"):
            mgr.save(2, {"w": torch.ones(1 << 20)})  # 4 MiB > 3 MiB
            mgr.wait()
        assert not [p for p in os.listdir(mnt) if p.startswith(".tmp-")]
        mgr.close()
        assert [c.step for c in CheckpointManager(mnt, read_only=True).checkpoints(full=True) if c.valid] == [1]
    finally:
        subprocess.run(["umount", "-l", mnt])


def test_staging_buffers_are_reused_while_the_layout_holds():
    sb = StagingBuffers()
    a = sb.snapshot({"x": torch.ones(10), "y": torch.zeros(3, dtype=torch.int64)})
    b = sb.snapshot({"x": torch.full((10,), 2.0), "y": torch.ones(3, dtype=torch.int64)})
    assert a["x"].data_ptr() == b["x"].data_ptr() and torch.equal(b["x"], torch.full((10,), 2.0))
    c = sb.snapshot({"x": torch.ones(11)})  # a new layout: a new image
    assert c.size < a.size and sb.nbytes % direct.ALIGN == 0


def test_a_tiered_async_save_writes_its_local_tier_directly_and_uploads_it(direct_ok, tmp_path):
    remote, fast = str(tmp_path / "remote"), str(tmp_path / "fast")
    state = {"model": torch.nn.Linear(128, 128)}
    mgr = CheckpointManager(remote, local_tier=fast, async_save=True, handle_sigterm=False)
    mgr.save(1, state)
    mgr.close()  # the upload finishes
    (ev,) = [e for e in read_events(os.path.join(fast, "events.jsonl")) if e["event"] == "save"]
    assert ev["io"] == "direct"
    for root in (fast, remote):
        check_checkpoint(LocalStorage(root), step_dirname(1), full=True)


def _mapped(addr: int) -> bool:
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return True
    return False


@pytest.mark.skipif(not hasattr(os, "fork") or not os.path.exists("/proc/self/maps"), reason="Linux /proc needed")
def test_the_staging_image_is_resident_at_once_and_not_inherited_by_forked_children():
    """Pre-faulted: the first snapshot's copy takes no page faults; MADV_DONTFORK: a DataLoader worker forked later
    does not share the image, so the next snapshot does not copy-on-write 1 GiB behind a live worker."""
    import resource

    sb = StagingBuffers()
    n = 8 << 20
    src = torch.ones(n // 4)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    sb._allocate([("w", torch.empty(n // 4))], ("sig",), False)
    view = sb._views["w"]
    faults_alloc = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    view.copy_(src)
    faults_copy = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults_copy < faults_alloc / 4 + 16, (faults_alloc, faults_copy)
    addr = view.data_ptr()
    assert _mapped(addr)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child only reports
        os._exit(0 if not _mapped(addr) else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "a forked child inherited the staging image"
    sb.release()
