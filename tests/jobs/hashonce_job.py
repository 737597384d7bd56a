"""A small torch job for the hash-once tests: the first attempt saves one checkpoint and is SIGKILLed, the next
restores it through ``CheckpointManager`` and writes what it restored to ``restored.json``. With
``HASHONCE_DROP_TIER`` set the first attempt removes its local-tier copy before dying (a new node: the supervisor
must download the durable copy).

The checkpoint directory is ``RESUMEKIT_DIR`` and the local tier ``RESUMEKIT_LOCAL_TIER`` (both set by
``resumekit run``), so the job is exactly what a user's job does under the supervisor.
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import torch

from resumekit import CheckpointManager
from resumekit.format import step_dirname

directory = os.environ["RESUMEKIT_DIR"]
tier = os.environ.get("RESUMEKIT_LOCAL_TIER") or None
torch.manual_seed(0)
model = torch.nn.Linear(256, 256)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
state = {"model": model, "optimizer": opt}
mgr = CheckpointManager(directory, local_tier=tier)
step = mgr.restore(state)
if step == 0:
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 256)).sum().backward()
        opt.step()
    mgr.save(3, state, block=True)
    mgr.wait()  # with a local tier: the upload is done too
    if tier and os.environ.get("HASHONCE_DROP_TIER"):
        shutil.rmtree(os.path.join(tier, step_dirname(3)))  # as on a fresh node: only the durable copy is left
    os.kill(os.getpid(), signal.SIGKILL)  # at once: the supervisor verifies a checkpoint written a moment ago
with open(os.path.join(os.environ.get("HASHONCE_OUT", directory), "restored.json"), "w") as f:
    json.dump({"step": step, "weight_sum": float(model.weight.sum())}, f)
mgr.close()
