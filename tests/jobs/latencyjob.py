"""A job that uses :class:`resumekit.CheckpointManager` on a plain-value state, for the restart-latency tests: it
reports everything the breakdown needs (``job_init``, a timed ``restore``, ``first_step``, ``metrics``, ``save``).

    python tests/jobs/latencyjob.py DIR [STEP_TIME]
"""

from __future__ import annotations

import sys
import time

from resumekit import CheckpointManager


def main() -> None:
    directory = sys.argv[1]
    step_time = float(sys.argv[2]) if len(sys.argv) > 2 else 0.02
    mgr = CheckpointManager(directory, every_steps=5, keep_last=2)
    state = {"w": 0.0}
    step = mgr.restore(state)
    while step < 10**6:
        time.sleep(step_time)
        state["w"] = state["w"] + 1.0
        step += 1
        mgr.maybe_save(step, state, metrics={"loss": 1.0 / step})


if __name__ == "__main__":
    main()
