"""Shared by the attack tests: a small saved run to damage, and a probe that runs CLI commands in a fresh process,
timing each one and measuring its memory, so a command that hangs or balloons fails the test instead of the suite.

Run as a script, it reads a JSON list of argument lists on stdin and prints one JSON result per command.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
REPO = os.path.dirname(TESTS)
#: every CLI command must answer within this many seconds, whatever the attack
LIMIT_S = 2.0
#: and grow the process by at most this much memory (a 1 GiB manifest must not be read)
LIMIT_RSS_MB = 200


def saved_run(directory: str, steps: int = 8, every: int = 4) -> dict[str, Any]:
    """A native run with a checkpoint every ``every`` steps; returns the live training state after ``steps``."""
    sys.path.insert(0, TESTS)
    from conftest import make_training, train_steps
    from resumekit import CheckpointManager

    st = make_training()
    mgr = CheckpointManager(directory, every_steps=every)
    train_steps(st, steps, mgr)
    mgr.close()
    return st


def probe(commands: list[list[str]], timeout: float = 60.0) -> list[dict[str, Any]]:
    """Run ``resumekit`` commands in one fresh process; each result has ``code``, ``seconds``, ``rss_mb`` (growth
    of the peak RSS during the command), ``out`` and ``err``."""
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "src"))
    r = subprocess.run(
        [sys.executable, os.path.abspath(__file__)],
        input=json.dumps(commands),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def assert_prompt_verdicts(results: list[dict[str, Any]]) -> None:
    """Every command answered in time, within the memory bound, without a traceback."""
    for res in results:
        what = " ".join(res["argv"])
        assert res["seconds"] < LIMIT_S, f"{what} took {res['seconds']:.2f} s"
        assert res["rss_mb"] < LIMIT_RSS_MB, f"{what} grew by {res['rss_mb']:.0f} MB"
        assert "Traceback" not in res["out"] + res["err"], f"{what}:\n{res['out']}{res['err']}"
        assert res["code"] in (0, 1), f"{what} exited {res['code']}:\n{res['out']}{res['err']}"


def _main() -> None:
    from click.testing import CliRunner

    from resumekit.cli import main

    runner = CliRunner()
    for argv in json.loads(sys.stdin.read()):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        r = runner.invoke(main, argv)
        secs = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        err = r.stderr if r.stderr_bytes is not None else ""
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            import traceback

            err += "".join(traceback.format_exception(r.exception))
        rec = {"argv": argv, "code": r.exit_code, "seconds": secs, "rss_mb": (after - before) / 1024, "out": r.stdout}
        rec["err"] = err
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    _main()


def reseal(ckpt: str, rel: str, data: bytes) -> None:
    """Replace a file of a native checkpoint and fix its manifest entry (size and xxh3), as a forger would: only
    the checks of what the file holds can tell."""
    from resumekit.format import MANIFEST, new_hasher

    with open(os.path.join(ckpt, rel), "wb") as f:
        f.write(data)
    man_path = os.path.join(ckpt, MANIFEST)
    with open(man_path) as f:
        man = json.load(f)
    h = new_hasher()
    h.update(data)
    man["files"][rel] = {"size": len(data), "xxh3": h.hexdigest()}
    with open(man_path, "w") as f:
        json.dump(man, f)


def edit_tree(ckpt: str, edit) -> None:
    """Apply ``edit(tree)`` to a native checkpoint's state.json and reseal it."""
    from resumekit.format import TREE_FILE

    with open(os.path.join(ckpt, TREE_FILE)) as f:
        tree = json.load(f)
    edit(tree)
    reseal(ckpt, TREE_FILE, json.dumps(tree).encode())


def one_line_reason(text: str) -> str:
    """The reason a CLI line gives, checked to be one line."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert lines, "no output"
    return lines[-1]
