"""A job for the preemption test: saves step 1 to an object store, waits for a go file, then saves step 2 (which
the test makes hang by turning the endpoint into a blackhole before creating the file).

    python remote_stuck_job.py S3_URI GO_FILE

Prints ``saved 1``, ``saving 2`` and, should the save end, ``saved 2``.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from resumekit import CheckpointManager


def main() -> None:
    uri, go = sys.argv[1], sys.argv[2]
    state = {"model": torch.nn.Linear(4, 4)}
    mgr = CheckpointManager(uri)
    mgr.save(1, state)
    print("saved 1", flush=True)
    while not os.path.exists(go):
        time.sleep(0.05)
    print("saving 2", flush=True)
    mgr.save(2, state)
    print("saved 2", flush=True)
    mgr.close()


if __name__ == "__main__":
    main()
