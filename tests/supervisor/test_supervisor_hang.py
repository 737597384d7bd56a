"""Hang detection for every job (issue 11): the heartbeat where the job beats it, else its output and file
activity under the checkpoint directory; a save that is still writing is never a hang."""

from __future__ import annotations

import pytest
from supervisor_jobs import (
    PY,
    events_of,
    finish,
    procs,  # noqa: F401 - a fixture, used as an argument
    summary_of,
)

TIMEOUT = 1.0

# Freezes (no output, no heartbeat, no files) for 3x the timeout on its first start only, then finishes.
FREEZE_ONCE = f"""
import os, sys, time
marker = os.path.join(sys.argv[1], "froze-once")
print("job: started", flush=True)
if not os.path.exists(marker):
    open(marker, "w").close()
    time.sleep({3 * TIMEOUT})
print("job: done", flush=True)
"""

# A long save: no output for 3x the timeout while a file under the checkpoint directory grows (optionally after
# beating the heartbeat once, as a job with an integration does).
SLOW_SAVE = f"""
import os, sys, time
d = sys.argv[1]
if sys.argv[2] == "beat":
    from resumekit.events import Heartbeat
    Heartbeat.from_env().beat(1, force=True)
os.makedirs(os.path.join(d, ".tmp-checkpoint-2"), exist_ok=True)
end = time.monotonic() + {3 * TIMEOUT}
with open(os.path.join(d, ".tmp-checkpoint-2", "model.bin"), "wb") as f:
    while time.monotonic() < end:
        f.write(b"x" * 1024)
        f.flush()
        time.sleep(0.1)
"""


@pytest.mark.timeout(60)
def test_a_job_without_heartbeat_frozen_for_3x_the_timeout_is_killed_and_restarted(tmp_path, procs):
    d = tmp_path / "ckpt"
    d.mkdir()
    p = procs.run(
        d, "--hang-timeout", str(TIMEOUT), "--backoff", "0.05", "--json", command=[PY, "-c", FREEZE_ONCE, str(d)]
    )
    rc, out, err = finish(p)
    assert rc == 0, err
    assert "hang detection: output and checkpoint activity (--hang-timeout 1 s" in err
    (hang,) = events_of(d, "hang")
    assert hang["mode"] == "output and checkpoint activity" and hang["heartbeat_age_s"] is None
    assert TIMEOUT < hang["output_idle_s"] < 3 * TIMEOUT
    assert "no output for" in hang["reason"] and "no heartbeat" in hang["reason"]
    s = summary_of(out)
    assert s["hangs"] == 1 and s["starts"] == 2 and s["outcome"] == "success"
    # The job's output reached the supervisor's stdout unchanged, before the summary line.
    assert out.splitlines()[:3] == ["job: started", "job: started", "job: done"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("beat", ["beat", "silent"])
def test_a_long_save_that_keeps_writing_is_not_a_hang(tmp_path, procs, beat):
    d = tmp_path / "ckpt"
    d.mkdir()
    p = procs.run(d, "--hang-timeout", str(TIMEOUT), "--json", command=[PY, "-c", SLOW_SAVE, str(d), beat])
    rc, out, err = finish(p)
    assert rc == 0, err
    assert not events_of(d, "hang")
    s = summary_of(out)
    assert s["hangs"] == 0 and s["starts"] == 1
    modes = [e["mode"] for e in events_of(d, "hang_detection")]
    expected = ["output and checkpoint activity"] + (["heartbeat"] if beat == "beat" else [])
    assert modes == expected
    if beat == "beat":
        assert "hang detection: heartbeat (the job beats RESUMEKIT_HEARTBEAT" in err


def test_hang_detection_is_announced_off_without_a_timeout(tmp_path, procs):
    d = tmp_path / "ckpt"
    p = procs.run(d, command=[PY, "-c", "pass"])
    rc, _, err = finish(p)
    assert rc == 0, err
    assert "resumekit run: hang detection: off (pass --hang-timeout S" in err
    assert events_of(d, "hang_detection")[0]["mode"] == "off"
