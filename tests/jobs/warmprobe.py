"""A job that reports everything a warm start could get wrong, for tests/supervisor/test_supervisor_warm.py.

Each attempt appends one JSON line to ``$WARMPROBE_OUT``: argv, ``sys.path[0]``, cwd, environment, signal dispositions
and mask, ``__main__``'s attributes, whether the global RNGs are fresh (not what ``warmprobe_noise``, preloaded by
the standby only, did to them), seeded draws, and what the shared module ``warmprobe_mod`` saw at its import. It then
beats its heartbeat, waits (bounded) until the supervisor's standby behind it is ready, and ends: attempts before
``$WARMPROBE_LAST`` (default 2) raise (an uncaught traceback, exit 1), that one exits 0. A non-daemon thread and an
atexit hook each append a line.
"""

import atexit
import json
import os
import random
import signal
import sys
import threading
import time

import numpy as np
import torch
import warmprobe_mod

OUT = os.environ["WARMPROBE_OUT"]
N = int(os.environ["RESUMEKIT_RESTART_COUNT"])
LAST = int(os.environ.get("WARMPROBE_LAST", "2"))


def write(rec):
    with open(OUT, "a") as f:
        f.write(json.dumps(rec) + "\n")


def leaked_random():
    probe = random.Random(1234)
    probe.random()
    return random.getstate() == probe.getstate()


def leaked_numpy():
    probe = np.random.RandomState(1234)
    probe.random_sample()
    a, b = np.random.get_state(), probe.get_state()
    return bool(np.array_equal(a[1], b[1]) and a[2] == b[2])


def torch_fresh():
    state = torch.default_generator.get_state().clone()
    g = torch.Generator().manual_seed(torch.initial_seed())
    return bool(torch.equal(state, g.get_state())) and torch.initial_seed() != 1234


main = sys.modules["__main__"]
rec = {
    "attempt": N,
    "name": __name__,
    "main_is_me": main.__dict__ is globals(),
    "file": __file__,
    "spec": None if __spec__ is None else __spec__.name,
    "loader": type(__loader__).__name__,
    "package": __package__,
    "argv": sys.argv,
    "orig_argv": getattr(sys, "orig_argv", None),
    "path0": sys.path[0],
    "cwd": os.getcwd(),
    "env": {k: v for k, v in os.environ.items() if k not in ("RESUMEKIT_RESTART_COUNT", "RESUMEKIT_RESUME_FROM")},
    "signals": {int(s): repr(signal.getsignal(s)) for s in signal.valid_signals() if s not in (9, 19)},
    "mask": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
    "flags": repr(sys.flags),
    "stdout_buffered": sys.stdout.line_buffering,
    "random_leaked": leaked_random(),
    "numpy_leaked": leaked_numpy(),
    "torch_fresh": torch_fresh(),
    "mod_seen": warmprobe_mod.SEEN,
}
random.seed(7)
np.random.seed(7)
torch.manual_seed(7)
rec["draws"] = [random.random(), float(np.random.random_sample()), float(torch.rand(1))]
write(rec)

atexit.register(write, {"attempt": N, "atexit": True})
threading.Thread(target=lambda: (time.sleep(0.3), write({"attempt": N, "thread": True}))).start()

hb = os.environ["RESUMEKIT_HEARTBEAT"]
if N == 0:
    # A cold start worth a standby (standby_worthwhile: over 1 s to the first beat) even where torch imports fast:
    # once in CI it beat in 0.97 s, the supervisor rightly kept no standby, and no attempt ran warm.
    time.sleep(1.2)
with open(hb + ".tmp", "w") as f:
    f.write(json.dumps({"step": N + 1, "pid": os.getpid()}))
os.replace(hb + ".tmp", hb)
deadline = time.time() + 60
while time.time() < deadline:  # the standby behind this attempt, so the next one runs warm
    with open(os.environ["RESUMEKIT_EVENTS"]) as f:
        lines = f.readlines()
    if N == LAST or sum('"status": "ready"' in x for x in lines) > N or any('"status": "failed"' in x for x in lines):
        break
    time.sleep(0.05)
if N < LAST:
    raise ValueError("probe failure")
