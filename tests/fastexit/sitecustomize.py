"""Test-suite only, loaded by every Python process the tests start (``tests/conftest.py`` puts this folder first on
``PYTHONPATH``): skip the interpreter's last garbage collection at exit.

A process that imported torch spends 0.5-1.5 s of CPU at exit walking its object graph in that collection (more on
a loaded 2-core machine), and the tests start hundreds of such processes: straight runs, last attempts, torchrun
agents and workers, warm standbys. ``gc.freeze()`` as the last exit hook leaves every object to the operating system
instead. Nothing a test checks happens there: every other exit hook (registered later, so run earlier), every
``finally`` and every explicit close still run, and objects freed by reference counting during shutdown are still
finalized; only garbage held in reference cycles is not collected at the very end.

``RESUMEKIT_TEST_FULL_EXIT=1`` runs the tests without it (the interpreter's full exit). A test that sets its own
``PYTHONPATH`` (e.g. ``tests/hashcount``, whose ``sitecustomize`` then wins) does without it too.
"""

from __future__ import annotations

import atexit
import gc

atexit.register(gc.freeze)
