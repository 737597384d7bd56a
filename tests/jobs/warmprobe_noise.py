"""Preloaded by the standby only (the probe job never imports it): everything a library's import could do to the
process that must not reach the job."""

import os
import random
import signal
import sys

import numpy as np
import torch

random.seed(1234)
random.random()
np.random.seed(1234)
np.random.random_sample()
torch.manual_seed(1234)
torch.rand(5)
signal.signal(signal.SIGTERM, lambda *a: None)
signal.signal(signal.SIGUSR1, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_DFL)
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])
os.environ["WARMPROBE_LEAK"] = "1"
sys.argv.append("--leak")
os.chdir("/")
