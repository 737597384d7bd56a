"""Imported by the warm-start probe job (and preloaded by its standby): what it saw at its import."""

import os
import sys

SEEN = {"cwd": os.getcwd(), "argv": list(sys.argv), "path0": sys.path[0], "x": os.environ.get("WARMPROBE_X")}
