"""A world-of-one sharded (DCP) job for ``resumekit run --dir s3://... --local-tier DIR`` (tests/test_dcp_remote.py).

The root comes from ``RESUMEKIT_DIR`` and the node tier from ``RESUMEKIT_LOCAL_TIER``, both exported by the
supervisor: the job passes neither, as a user's job would. Trains to ``STEPS`` saving every 2 steps and writes the
step ``restore`` returned to ``OUT``.

Usage: python dcp_remote_job.py STEPS OUT
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: conftest's helpers
_ENV = dict(os.environ)
from conftest import make_training, train_steps  # noqa: E402

os.environ.update(_ENV)  # conftest clears the supervisor's hand-off variables (for the tests themselves)

from resumekit import CheckpointManager  # noqa: E402


def main(argv: list[str]) -> None:
    steps, out = int(argv[0]), argv[1]
    state = make_training()
    mgr = CheckpointManager(os.environ["RESUMEKIT_DIR"], every_steps=2, keep_last=2, distributed=True)
    start = mgr.restore(state)
    with open(out, "w") as f:
        f.write(str(start))
    train_steps(state, steps, mgr, start=start)
    mgr.close()


if __name__ == "__main__":
    main(sys.argv[1:])
