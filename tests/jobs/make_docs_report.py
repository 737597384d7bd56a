"""Regenerate docs/report.png from a real (small) supervised run: ckptjob under ``resumekit run`` with three
SIGKILLs and one hang, then ``resumekit report``.

    python tests/jobs/make_docs_report.py [OUT.png]
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def main() -> int:
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "docs", "report.png")
    d = tempfile.mkdtemp(prefix="resumekit-docs-")
    cmd = [
        sys.executable,
        "-m",
        "resumekit",
        "run",
        "--dir",
        d,
        "--hang-timeout",
        "1.5",
        "--backoff",
        "0.3",
        "--",
        sys.executable,
        os.path.join(HERE, "ckptjob.py"),
        "--steps",
        "400",
        "--save-every",
        "40",
        "--step-time",
        "0.02",
        "--metrics",
        "--hang-at",
        "262",
        "--payload",
        "1000000",
    ]
    run = subprocess.Popen(cmd, start_new_session=True)
    kill_at = [95, 180, 345]  # SIGKILL the job when its heartbeat first reaches these steps
    killed = set()
    while run.poll() is None:
        try:
            with open(os.path.join(d, ".heartbeat")) as f:
                beat = json.load(f)
        except (OSError, ValueError):
            time.sleep(0.005)
            continue
        for k in kill_at:
            if k not in killed and (beat.get("step") or 0) >= k:
                killed.add(k)
                os.kill(beat["pid"], signal.SIGKILL)
        time.sleep(0.005)
    subprocess.run([sys.executable, "-m", "resumekit", "report", d, "-o", out], check=True)
    print(f"run dir {d}; exit {run.returncode}")
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
