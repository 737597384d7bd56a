"""Attack: two writers on one run directory (issue 12, point 1).

A resubmitted job while the old one still runs used to remove the other's in-progress saves and replace its
steps, failing with ``[Errno 2]``/``[Errno 39]`` that named nothing. Now one writer holds the root's lease: the
second fails at construction with one line naming the holder; readers need no lease and never delete; a lease
whose holder was SIGKILLed on this host is taken over without ``--force``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from attack_helpers import REPO
from click.testing import CliRunner

from conftest import make_training, train_steps
from resumekit import CheckpointManager
from resumekit.cli import main
from resumekit.errors import LeaseHeldError
from resumekit.format import LEASE_FILE, step_dirname
from resumekit.storage import LocalStorage

ENV = dict(os.environ, PYTHONPATH=os.path.join(REPO, "src") + os.pathsep + os.path.join(REPO, "tests"))


def _spawn(code: str) -> subprocess.Popen:
    """Start ``code`` and wait for its ``ready`` line (kept as ``p.ready``)."""
    p = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    line = p.stdout.readline()
    assert line.startswith("ready"), line
    p.ready = line.split()  # type: ignore[attr-defined]
    return p


def _lease_holder(d: str, *, fork_child: bool = False, host: str = "") -> subprocess.Popen:
    """A torch-free process holding the lease of ``d`` until its stdin closes (optionally with a forked child that
    inherits the lock, as a dataloader worker does, or pretending to run on another host)."""
    return _spawn(
        f"""
        import os, socket, sys, time
        if {host!r}:
            socket.gethostname = lambda: {host!r}
        from resumekit.storage import LocalStorage
        from resumekit.storage.lease import acquire_lease
        lease = acquire_lease(LocalStorage({d!r}))
        child = 0
        if {fork_child!r}:
            child = os.fork()
            if child == 0:
                time.sleep(60)
                os._exit(0)
        print("ready", child, flush=True)
        sys.stdin.read()
        lease.release()
        """
    )


@pytest.mark.timeout(90)
def test_a_second_manager_fails_at_construction_with_one_line_naming_the_holder(tmp_path):
    d = str(tmp_path)
    # The holder takes exactly the lease a CheckpointManager takes (without importing torch, to start fast).
    holder = _lease_holder(d)
    try:
        with pytest.raises(LeaseHeldError) as ei:
            CheckpointManager(d)
        msg = str(ei.value)
        assert "\n" not in msg
        assert msg.startswith(f"{d} is in use by another writer: pid {holder.pid} on {socket.gethostname()} since ")
        assert "(CheckpointManager)" in msg and "takeover=True" in msg
        r = CliRunner().invoke(main, ["gc", d])
        assert r.exit_code == 3 and f"pid {holder.pid}" in r.stderr
        # Readers need no lease.
        assert CliRunner().invoke(main, ["ls", d]).exit_code == 1  # nothing saved yet: not an error of the lease
        assert CheckpointManager(d, read_only=True).restore(make_training()) == 0
    finally:
        holder.communicate("", timeout=30)
    assert holder.returncode == 0
    assert not os.path.exists(os.path.join(d, LEASE_FILE))  # released on close
    CheckpointManager(d).close()  # free again


@pytest.mark.timeout(90)
def test_an_evaluator_beside_a_live_async_run_never_errs_and_never_removes(tmp_path, monkeypatch):
    d = str(tmp_path)
    writer = _spawn(
        f"""
        import sys, time
        from conftest import make_training, train_steps
        from resumekit import CheckpointManager
        st = make_training()
        mgr = CheckpointManager({d!r}, every_steps=1, keep_last=2, async_save=True)
        mgr.restore(st)
        print("ready", flush=True)
        for step in range(1, 21):
            train_steps(st, step, None, start=step - 1)
            mgr.maybe_save(step, st)
            time.sleep(0.02)
        mgr.close()
        print("done", flush=True)
        """
    )

    def forbidden(*a, **k):
        raise AssertionError("a reader removed something")

    monkeypatch.setattr(LocalStorage, "remove_tree", forbidden)
    monkeypatch.setattr(LocalStorage, "rename", forbidden)
    seen = []
    try:
        while writer.poll() is None:
            mgr = CheckpointManager(d, read_only=True)
            seen.append(mgr.restore(make_training()))
            mgr.close()
            r = CliRunner().invoke(main, ["latest", d, "--quick"])
            assert (r.exit_code in (0, 1) and r.exception is None) or isinstance(r.exception, SystemExit), r.output
    finally:
        out, _ = writer.communicate(timeout=60)
    assert writer.returncode == 0 and "done" in out
    assert seen and max(seen) > 0
    assert sorted(p for p in os.listdir(d) if p.startswith("step_")) == [step_dirname(19), step_dirname(20)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("orphan", [False, True], ids=["plain", "lock-kept-by-an-orphaned-child"])
def test_a_lease_left_by_a_sigkilled_holder_is_taken_over_without_force(tmp_path, orphan):
    d = str(tmp_path)
    holder = _lease_holder(d, fork_child=orphan)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    try:
        mgr = CheckpointManager(d)  # no takeover=: the holder is gone from this host
        st = make_training()
        train_steps(st, 2, None)
        mgr.save(2, st)
        mgr.close()
    finally:
        if orphan:
            os.kill(int(holder.ready[1]), signal.SIGKILL)  # the child we forked, by its pid
    assert os.path.isdir(os.path.join(d, step_dirname(2)))


@pytest.mark.timeout(60)
def test_takeover_of_a_dead_holder_on_another_host(tmp_path):
    d = str(tmp_path)
    holder = _lease_holder(d, host="node-17")
    try:
        with pytest.raises(LeaseHeldError, match=r"pid \d+ on node-17 since .*--force"):
            CheckpointManager(d)
        mgr = CheckpointManager(d, takeover=True)  # the user knows node-17 is gone
        with open(os.path.join(d, LEASE_FILE)) as f:
            assert json.load(f)["pid"] == os.getpid()
        mgr.close()
    finally:
        holder.communicate("", timeout=30)


def test_a_newer_manager_in_the_same_process_takes_over_and_fences_the_older_one(tmp_path):
    st = make_training()
    old = CheckpointManager(str(tmp_path))
    new = CheckpointManager(str(tmp_path))  # a notebook cell run twice
    with pytest.raises(LeaseHeldError, match="lost its lease: a newer writer in this process took"):
        old.save(1, st)
    new.save(1, st)
    old.close()  # giving up a lease it no longer holds changes nothing
    assert os.path.exists(os.path.join(tmp_path, LEASE_FILE))
    new.close()
    assert not os.path.exists(os.path.join(tmp_path, LEASE_FILE))


@pytest.mark.timeout(120)
def test_object_store_lease_is_conditional_and_expires(s3_bucket):
    from resumekit.storage.lease import ObjectLease
    from resumekit.storage.remote import RemoteStorage

    st = RemoteStorage(s3_bucket.uri("run"))
    first = ObjectLease(st, ttl=30)
    with pytest.raises(LeaseHeldError, match=rf"s3://.*/run is in use by another writer: pid {os.getpid()}"):
        ObjectLease(st, ttl=30)
    first.release()
    assert s3_bucket.keys() == []
    # A holder on another host that stopped renewing: its lease expired and is taken without --force.
    stale = {"pid": 1, "host": "node-3", "since": time.time() - 600, "expires": time.time() - 1, "token": "x"}
    s3_bucket.put(f"run/{LEASE_FILE}", json.dumps(stale).encode())
    lease = ObjectLease(st, ttl=30)
    rec = json.loads(s3_bucket.client.get_object(Bucket=s3_bucket.name, Key=f"run/{LEASE_FILE}")["Body"].read())
    assert rec["pid"] == os.getpid() and rec["expires"] > time.time()
    lease.release()


def test_a_zombie_holder_is_gone(tmp_path):
    """A holder killed but not yet reaped answers kill(pid, 0); it will never write again, so it counts as gone (a
    multi-node restart crash-looped on such a zombie's object-store lease)."""
    from resumekit.storage.lease import _proc_start, holder_gone

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        rec = {"pid": child.pid, "host": socket.gethostname(), "proc_start": _proc_start(child.pid)}
        deadline = time.monotonic() + 20
        while not holder_gone(rec) and time.monotonic() < deadline:
            time.sleep(0.02)  # the child exits by itself; nobody reaps it until child.wait() below
        assert holder_gone(rec)
        assert os.waitpid(child.pid, os.WNOHANG)[0] == child.pid, "it was a zombie, not reaped yet"
    finally:
        child.returncode = 0


@pytest.mark.timeout(120)
def test_a_restart_of_the_same_job_on_another_host_takes_the_lease_once_the_holder_misses_a_renewal(
    s3_bucket, monkeypatch
):
    """A multi-node job's restarted rank 0 may run on another host than the holder's, which only that host could
    tell dead. The same job id (torchrun --rdzv-id or RESUMEKIT_JOB_ID) makes the new start watch the lease for one
    of the holder's renewal periods: no renewal, it takes over (instead of failing until the lease expires); a
    renewal, it is refused. Another job, no job id (torchrun's default ``none``), a holder on this host that is
    alive, or a holder that is not a training job's manager: refused at once."""
    import threading

    from resumekit.storage.lease import ObjectLease, _proc_start
    from resumekit.storage.remote import RemoteStorage

    st = RemoteStorage(s3_bucket.uri("job"))
    key = f"job/{LEASE_FILE}"
    now = time.time()
    holder = {"pid": 1, "host": "node-3", "since": now - 60, "expires": now + 600, "ttl": 3.0, "token": "x"}
    holder |= {"purpose": "CheckpointManager", "job": "train-7"}

    def lease_record():
        return json.loads(s3_bucket.client.get_object(Bucket=s3_bucket.name, Key=key)["Body"].read())

    monkeypatch.delenv("RESUMEKIT_JOB_ID", raising=False)
    refused = {
        "none": holder,
        "train-8": holder,
        "train-7": {**holder, "purpose": "resumekit gc"},
    }
    for job, rec in refused.items():
        s3_bucket.put(key, json.dumps(rec).encode())
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", job)
        t0 = time.monotonic()
        with pytest.raises(LeaseHeldError, match="in use by another writer: pid 1 on node-3"):
            ObjectLease(st, ttl=30)
        assert time.monotonic() - t0 < 1.0, "refused at once, without watching"
    # Alive on this host (the test's parent process), same job: the pid says alive, so no watching either.
    here = {**holder, "pid": os.getppid(), "host": socket.gethostname(), "proc_start": _proc_start(os.getppid())}
    s3_bucket.put(key, json.dumps(here).encode())
    with pytest.raises(LeaseHeldError, match=f"pid {os.getppid()} on {socket.gethostname()}"):
        ObjectLease(st, ttl=30)

    # Same job on another host, still renewing (a live old rank 0): refused after it renewed.
    s3_bucket.put(key, json.dumps(holder).encode())
    stop = threading.Event()

    def renew():
        while not stop.wait(0.5):
            s3_bucket.put(key, json.dumps({**holder, "expires": time.time() + 3}).encode())

    renewer = threading.Thread(target=renew, daemon=True)
    renewer.start()
    try:
        with pytest.raises(LeaseHeldError, match="pid 1 on node-3"):
            ObjectLease(st, ttl=30)
    finally:
        stop.set()
        renewer.join(5)

    # Same job on another host, silent for one renewal period (3 s / 3 + 1 s slack): taken over.
    s3_bucket.put(key, json.dumps(holder).encode())
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("RESUMEKIT_JOB_ID", "train-7")
    t0 = time.monotonic()
    lease = ObjectLease(st, ttl=30)
    took = time.monotonic() - t0
    rec = lease_record()
    assert rec["pid"] == os.getpid() and rec["job"] == "train-7" and rec["ttl"] == 30
    assert 1.9 <= took < 10, took
    lease.release()
