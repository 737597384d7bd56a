"""Every wait on an object store is bounded (issue 16): a store that accepts connections, reads the requests and
never answers makes a sync save, an async save's ``wait()``, a tiered upload and ``close()`` fail within
``read timeout x retries + backoff + 5 s``, with exactly as many requests at the server as the message counts; a
SIGTERM during such a save ends the job within ``resumekit run --grace``; a stall is ridden out by a retry.

Small timeouts throughout (1 s read timeout, 3 attempts): the behaviour is the same, the waiting is not.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from conftest import PYTHON, REPO, make_training
from resumekit import CheckpointManager
from resumekit.errors import CheckpointWriteError
from resumekit.events import read_events
from resumekit.format import MANIFEST, step_dirname
from resumekit.layouts.native import NativeLayout
from resumekit.storage import deadline
from resumekit.storage.remote import RemoteOptions, RemoteStorage

JOB = os.path.join(REPO, "tests", "jobs", "remote_stuck_job.py")
READ_TIMEOUT, RETRIES = 1.0, 3


def bound() -> float:
    """The acceptance bound: read timeout x attempts + the backoff between them + 5 s."""
    o = RemoteOptions.from_env()
    backoff = sum(min(o.backoff_max, o.backoff * 2 ** (a - 1)) for a in range(1, o.retries))
    return o.read_timeout * o.retries + backoff + 5.0


def attempts_in(msg: str) -> int:
    m = re.search(r"failed after (\d+) attempts", msg)
    assert m, msg
    return int(m.group(1))


@pytest.fixture
def proxy(s3_bucket, fault_proxy, monkeypatch):
    """A proxy in front of the store that the test turns into a blackhole; small timeouts."""
    p = fault_proxy()
    monkeypatch.setenv("AWS_ENDPOINT_URL", p.endpoint)
    monkeypatch.setenv("RESUMEKIT_S3_READ_TIMEOUT", str(READ_TIMEOUT))
    monkeypatch.setenv("RESUMEKIT_S3_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("RESUMEKIT_S3_RETRIES", str(RETRIES))
    return p


def remote_newest(s3_bucket, monkeypatch) -> int:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.server.endpoint)
    best, _ = NativeLayout().latest(RemoteStorage(s3_bucket.uri("run")), full=True)
    return best.step


# -- pure ------------------------------------------------------------------------------------------------------


def test_the_grace_period_keeps_a_margin_to_exit():
    assert deadline.transfer_budget(30) == 25 and deadline.transfer_budget(6) == 3
    assert deadline.grace_seconds({"RESUMEKIT_GRACE": "12"}) == 12
    assert deadline.grace_seconds({}) == deadline.grace_seconds({"RESUMEKIT_GRACE": "x"}) == 30


def test_an_attempt_is_bounded_even_while_bytes_trickle():
    o = RemoteOptions(connect_timeout=10, read_timeout=60, min_throughput=1 << 20)
    assert o.attempt_limit(0) == 70 and o.attempt_limit(16 << 20) == 86
    # 6 attempts and the backoff between them (0.2, 0.4, 0.8, 1.6, 3.2)
    assert RemoteOptions().budget(0) == pytest.approx(6 * 70 + 6.2)


def test_the_client_library_sends_one_request_per_attempt(s3_bucket):
    st = RemoteStorage(s3_bucket.uri("run"))
    s3 = st._sync(st._client())
    assert s3.meta.config.retries["total_max_attempts"] == 1


# -- a store that accepts, reads and never answers -------------------------------------------------------------


def test_sync_save_to_a_blackhole_fails_in_time_and_counts_its_requests(proxy, s3_bucket, monkeypatch):
    st = make_training()
    mgr = CheckpointManager(s3_bucket.uri("run"))
    mgr.save(1, st)
    assert not proxy.saw_expect_continue, "a PUT asked for 100-continue: its wait has no timeout"
    proxy.blackhole()
    n0, t0 = proxy.requests, time.monotonic()
    with pytest.raises(CheckpointWriteError) as ei:
        mgr.save(2, st)
    took, msg = time.monotonic() - t0, str(ei.value)
    print(f"sync save: failed after {took:.1f} s (bound {bound():.1f} s), {proxy.requests - n0} requests")
    assert took <= bound(), f"{took:.1f} s > {bound():.1f} s"
    assert attempts_in(msg) == RETRIES == proxy.requests - n0
    assert proxy.endpoint in msg and "\n" not in msg and "The previous checkpoint is untouched." in msg
    mgr.close()
    proxy.heal()
    assert remote_newest(s3_bucket, monkeypatch) == 1


def test_async_wait_and_close_on_a_blackhole_fail_in_time(proxy, s3_bucket, monkeypatch):
    st = make_training()
    mgr = CheckpointManager(s3_bucket.uri("run"), async_save=True)
    mgr.save(1, st)
    mgr.wait()
    proxy.blackhole()
    n0 = proxy.requests
    mgr.save(2, st)  # training goes on: the persist runs in the background
    t0 = time.monotonic()
    with pytest.raises(CheckpointWriteError) as ei:
        mgr.wait()
    took = time.monotonic() - t0
    print(f"async wait(): failed after {took:.1f} s (bound {bound():.1f} s), {proxy.requests - n0} requests")
    assert took <= bound(), f"wait(): {took:.1f} s > {bound():.1f} s"
    assert attempts_in(str(ei.value)) == proxy.requests - n0 == RETRIES
    n0 = proxy.requests
    mgr.save(3, st)
    t0 = time.monotonic()
    with pytest.raises(CheckpointWriteError) as ei:
        mgr.close()
    took = time.monotonic() - t0
    print(f"async close(): failed after {took:.1f} s (bound {bound():.1f} s), {proxy.requests - n0} requests")
    assert took <= bound(), f"close(): {took:.1f} s > {bound():.1f} s"
    assert attempts_in(str(ei.value)) == proxy.requests - n0 == RETRIES
    proxy.heal()
    assert remote_newest(s3_bucket, monkeypatch) == 1


def test_tiered_upload_and_close_on_a_blackhole_fail_in_time(proxy, s3_bucket, monkeypatch, tmp_path):
    monkeypatch.setenv("RESUMEKIT_UPLOAD_RETRY", "60")  # no background retry during the test: rounds are counted
    fast = str(tmp_path / "fast")
    st = make_training()
    mgr = CheckpointManager(s3_bucket.uri("run"), local_tier=fast)
    assert mgr.restore(st) == 0
    proxy.blackhole()
    n0, t0 = proxy.requests, time.monotonic()
    mgr.save(1, st)
    assert time.monotonic() - t0 < 2.0, "a tiered save waited for the store"
    failed = []
    while not failed and time.monotonic() - t0 < bound() + 5:
        time.sleep(0.05)
        failed = [e for e in read_events(os.path.join(fast, "events.jsonl")) if e["event"] == "upload_failed"]
    took = time.monotonic() - t0
    print(f"tiered upload: failure reported after {took:.1f} s (bound {bound():.1f} s), {proxy.requests - n0} requests")
    assert failed and took <= bound(), f"upload failure reported after {took:.1f} s > {bound():.1f} s"
    assert attempts_in(failed[0]["error"]) == proxy.requests - n0 == RETRIES
    assert failed[0]["lag_steps"] == 1 and failed[0]["backlog"] == 1 and failed[0]["retry_in_s"] == 60
    mgr.save(2, st)  # an upload failure never stops training
    n0, t0 = proxy.requests, time.monotonic()
    with pytest.raises(CheckpointWriteError, match=r"uploading .*step_000000001 .*failed after 3 attempts"):
        mgr.close()
    took = time.monotonic() - t0
    print(f"tiered close(): failed after {took:.1f} s (bound {bound():.1f} s), {proxy.requests - n0} requests")
    assert took <= bound(), f"close(): {took:.1f} s > {bound():.1f} s"
    assert proxy.requests - n0 == RETRIES  # close() made one round: one request's retries
    assert sorted(os.listdir(fast)) == ["events.jsonl", step_dirname(1), step_dirname(2)]


def test_a_stall_is_ridden_out_by_a_retry(proxy, s3_bucket):
    st = RemoteStorage(s3_bucket.uri("run"))
    st.write_bytes_atomic("a", b"1")
    proxy.stall(1.5)  # longer than the read timeout: the first try times out, the next one gets through
    t0 = time.monotonic()
    st.write_bytes_atomic("b", b"2")
    assert time.monotonic() - t0 < bound()
    assert 2 <= proxy.requests - 1 <= RETRIES
    assert s3_bucket.get("run/b") == b"2"


# -- preemption during a stuck save ----------------------------------------------------------------------------


def test_sigterm_during_a_stuck_save_ends_the_job_within_the_grace_period(s3_bucket, fault_proxy, tmp_path):
    proxy = fault_proxy()
    grace = 10.0  # the library stops the transfer after 5 s; exiting a process with torch loaded takes ~2 s here
    env = dict(os.environ)
    # Without the grace deadline this save would retry for 6 x 60 s.
    env.update(
        AWS_ENDPOINT_URL=proxy.endpoint,
        RESUMEKIT_S3_READ_TIMEOUT="60",
        RESUMEKIT_S3_RETRIES="6",
        PYTHONUNBUFFERED="1",
    )
    uri, go = s3_bucket.uri("run"), str(tmp_path / "go")
    cmd = [PYTHON, "-m", "resumekit", "run", "--dir", uri, "--grace", str(grace), "--max-restarts", "0"]
    cmd += ["--events", str(tmp_path / "events.jsonl"), "--", PYTHON, JOB, uri, go]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out = []
    try:
        for want in ("saved 1", "saving 2"):
            while True:
                line = proc.stdout.readline()
                assert line, "".join(out)
                out.append(line)
                if line.startswith(want):
                    break
            if want == "saved 1":
                proxy.blackhole()
                open(go, "w").close()
        time.sleep(1.0)  # inside save(2) now, waiting for an answer that never comes
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(out) + rest
    print(f"SIGTERM during a stuck save: exited after {took:.1f} s (--grace {grace:g} s)")
    assert took < grace, f"exited {took:.1f} s after SIGTERM, --grace is {grace} s:\n{text}"
    assert "did not exit within --grace" not in text, text
    assert "stopped after" in text and "the preemption grace period (RESUMEKIT_GRACE=10 s) ends" in text, text
    assert "The previous checkpoint is untouched." in text and "saved 2" not in text
    proxy.heal()
    remote = RemoteStorage(uri)
    assert NativeLayout().latest(remote, full=True)[0].step == 1
    assert not remote.exists(f"{step_dirname(2)}/{MANIFEST}")
