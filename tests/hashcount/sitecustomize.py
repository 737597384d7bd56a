"""Test instrumentation, loaded by every Python process whose ``PYTHONPATH`` starts with this folder: counts the
bytes fed to xxh3 (the checksum of every checkpoint file, :func:`resumekit.format.new_hasher`) and appends one
JSON line per process to ``RESUMEKIT_TEST_HASH_LOG`` when the process exits normally.

It patches the ``xxhash`` module before anything imports it, so the production code has no test hook.
"""

from __future__ import annotations

import atexit
import json
import os
import sys

_LOG = os.environ.get("RESUMEKIT_TEST_HASH_LOG")

if _LOG:
    import xxhash

    _orig = xxhash.xxh3_64
    _total = [0]

    class _Counting:
        def __init__(self, *args, **kwargs):
            self._h = _orig(*args, **kwargs)
            if args:
                _total[0] += memoryview(args[0]).nbytes

        def update(self, data):
            _total[0] += memoryview(data).nbytes
            self._h.update(data)

        def hexdigest(self):
            return self._h.hexdigest()

        def digest(self):
            return self._h.digest()

        def intdigest(self):
            return self._h.intdigest()

    xxhash.xxh3_64 = _Counting

    def _flush() -> None:
        line = {
            "pid": os.getpid(),
            "attempt": os.environ.get("RESUMEKIT_RESTART_COUNT"),
            "argv": sys.argv[:3],
            "bytes": _total[0],
        }
        with open(_LOG, "a") as f:
            f.write(json.dumps(line) + "\n")

    atexit.register(_flush)
