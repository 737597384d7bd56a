"""The demo's shared core (``resumekit.demo.core``): state comparison, progress following, the summary table, the
kill loop's helpers; and the demo package's shape (no cycle, workers runnable as modules)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from resumekit.demo import run_demo
from resumekit.demo.core import (
    CrashStats,
    ProgressTail,
    closing_fields,
    count_events,
    final_diffs,
    fresh_run_dirs,
    parse_worker_args,
    print_table,
    report,
    saving,
    stop_tree,
    supervisor_cmd,
    tree_diff,
    worker_args,
)
from resumekit.demo.distributed import job_args
from resumekit.demo.single import job_cmd


# ---------------------------------------------------------------------------------------------- tree_diff
def test_tree_diff_nested_dicts_name_the_differing_tensor():
    a = {
        "model": {"0.weight": torch.ones(2, 3), "0.bias": torch.zeros(3)},
        "optim": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.arange(6.0)}}, "lr": [3e-3, 1e-3]},
        "rng": (np.arange(4, dtype=np.uint8), 7),
    }
    b = {
        "model": {"0.weight": torch.ones(2, 3), "0.bias": torch.zeros(3)},
        "optim": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.arange(6.0)}}, "lr": [3e-3, 1e-3]},
        "rng": (np.arange(4, dtype=np.uint8), 7),
    }
    assert tree_diff(a, b) == []
    b["optim"]["state"][0]["exp_avg"] = torch.tensor([0.0, 1, 2, 3, 4, 6])
    b["optim"]["lr"][1] = 2e-3
    assert sorted(tree_diff(a, b, "ckpt")) == ["ckpt/optim/lr/1", "ckpt/optim/state/0/exp_avg"]


def test_tree_diff_compares_dtype_shape_and_bytes():
    x = torch.zeros(4)
    assert tree_diff({"t": x}, {"t": x.double()}) == ["/t"]  # equal values, other dtype
    assert tree_diff({"t": x}, {"t": x.reshape(2, 2)}) == ["/t"]  # same bytes, other shape
    assert tree_diff({"t": x}, {"t": -x}) == ["/t"]  # 0.0 and -0.0 compare equal as numbers, not as bytes
    assert tree_diff({"t": x}, {"t": [0.0] * 4}) == ["/t"]  # a tensor against a list
    nan = torch.tensor([float("nan")])
    assert tree_diff([nan, float("nan")], [nan.clone(), float("nan")]) == []


# ------------------------------------------------------------------------------------------ ProgressTail
def _append(path, text):
    with open(path, "a") as f:
        f.write(text)


def test_progress_tail_leaves_a_torn_last_line_for_the_next_poll(tmp_path):
    path = tmp_path / "progress.jsonl"
    tail = ProgressTail(str(tmp_path), "progress.jsonl")
    tail.poll()
    assert tail.latest == {}  # no file yet
    _append(path, json.dumps({"step": 1, "pid": 10}) + "\n" + json.dumps({"step": 2, "pid": 10}) + "\n")
    _append(path, '{"step": 3, "pi')  # a writer mid-append (or SIGKILLed there)
    tail.poll()
    assert tail.latest == {10: (0, 2)}
    _append(path, 'd": 10}\n')  # the same line, completed
    tail.poll()
    assert tail.latest == {10: (0, 3)}
    _append(path, json.dumps({"step": 3, "pid": 11}) + "\n")  # the restarted attempt redoes step 3
    tail.poll()
    assert list(tail.latest) == [10, 11] and tail.latest[11] == (0, 3)


def test_progress_tail_skips_a_torn_line_followed_by_a_restart_and_picks_up_new_files(tmp_path):
    tail = ProgressTail(str(tmp_path / "run"), "progress_rank*.jsonl")
    tail.poll()  # the directory does not exist yet
    assert tail.latest == {}
    os.makedirs(tmp_path / "run")
    r0 = tmp_path / "run" / "progress_rank0.jsonl"
    _append(r0, json.dumps({"step": 4, "rank": 0, "pid": 20}) + "\n" + '{"step": 5, "ra')  # killed mid-line
    _append(tmp_path / "run" / "progress.jsonl", json.dumps({"step": 99, "pid": 99}) + "\n")  # not matched
    tail.poll()
    assert tail.latest == {20: (0, 4)}
    # The next attempt appends after the torn fragment: that line is not JSON and is skipped; nothing is lost.
    _append(r0, "\n" + json.dumps({"step": 5, "rank": 0, "pid": 30}) + "\n")
    _append(tmp_path / "run" / "progress_rank1.jsonl", json.dumps({"step": 5, "rank": 1, "pid": 31}) + "\n")
    tail.poll()
    assert tail.latest == {20: (0, 4), 30: (0, 5), 31: (1, 5)}


# ------------------------------------------------------------------------------------- kill-loop helpers
def test_saving_sees_the_tmp_directory_of_a_checkpoint_being_written(tmp_path):
    (tmp_path / "step_000000010").mkdir()
    assert not saving(str(tmp_path))
    (tmp_path / ".tmp-step_000000020-abc").mkdir()
    assert saving(str(tmp_path))


def test_count_events_counts_one_kind_and_tolerates_a_missing_log(tmp_path):
    assert count_events(str(tmp_path), "skip_invalid") == 0
    lines = [
        {"event": "skip_invalid", "step": 20},
        {"event": "restore", "step": 10},
        {"event": "skip_invalid", "step": 30},
    ]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"event": "skip_inv')
    assert count_events(str(tmp_path), "skip_invalid") == 2
    assert count_events(str(tmp_path), "restore") == 1


def test_fresh_run_dirs_empties_both_runs(tmp_path):
    (tmp_path / "straight").mkdir()
    (tmp_path / "straight" / "old").write_text("x")
    straight, crashy = fresh_run_dirs(str(tmp_path))
    assert (straight, crashy) == (str(tmp_path / "straight"), str(tmp_path / "crashy"))
    assert os.listdir(straight) == [] and os.listdir(crashy) == []


def test_crash_stats_do_not_share_their_lists():
    a, b = CrashStats(), CrashStats()
    a.attempts.append({"attempt": 0})
    a.summary["restarts"] = 1
    assert b.attempts == [] and b.summary == {} and b.exit_code is None and b.kills == 0


@pytest.mark.timeout(60)
def test_stop_tree_kills_a_session_and_its_children_and_keeps_the_exit_status():
    code = (
        "import subprocess, sys, time\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
        "print(c.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    child = int(proc.stdout.readline())
    stop_tree(proc)
    assert proc.returncode == -9
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break  # dead, waiting for init to collect it
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the grandchild {child} survived")
    proc.stdout.close()


def test_stop_tree_leaves_a_finished_process_alone():
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    stop_tree(proc)
    assert proc.returncode == 3


# ----------------------------------------------------------------------------------------- the table
def test_print_table_layout_is_the_demo_output(capsys):
    print_table(
        "title here",
        [("kills (SIGKILL)", 2), ("  of which during a save", 1)],
        [],
        ("same batch at every step", True),
        True,
    )
    assert capsys.readouterr().out == (
        "\nresumekit demo: title here\n"
        "  kills (SIGKILL)                  2\n"
        "    of which during a save         1\n"
        "  final state bitwise identical    yes\n"
        "  same batch at every step         yes\n"
        "PASS\n"
    )
    print_table("t", [], [f"/k{i}" for i in range(7)], ("same batch at every step/rank", False), False)
    assert capsys.readouterr().out.splitlines()[2:] == [
        "  final state bitwise identical    NO: /k0, /k1, /k2, /k3, /k4",
        "  same batch at every step/rank    NO",
        "FAIL",
    ]


def test_report_prints_one_json_line_or_the_table_with_the_times_last(capsys):
    fields = closing_fields(steps=8, seed=5, t_straight=1.234, t_crashy=5.678, directory="rel", kills_detail=[])
    assert list(fields) == ["steps", "kill_seed", "kills_detail", "seconds_straight", "seconds_with_kills", "directory"]
    assert (fields["seconds_straight"], fields["directory"]) == (1.23, os.path.abspath("rel"))
    assert "kills_detail" not in closing_fields(steps=8, seed=5, t_straight=1, t_crashy=2, directory="rel")
    result = {"identical": True, "differing_keys": [], "batch_sequence_equal": True, **fields}
    args: dict = {"title": "t", "rows": [("kills", 2)], "batches_label": "same batch"}
    args.update(t_straight=1.234, t_crashy=5.678)
    assert report(result, as_json=True, **args) == 0
    assert json.loads(capsys.readouterr().out) == result
    assert report(dict(result, identical=False, differing_keys=["/w"]), as_json=False, **args) == 1
    assert capsys.readouterr().out.splitlines()[2:] == [
        "  kills                            2",
        "  time straight / with kills       1.2s / 5.7s",
        "  final state bitwise identical    NO: /w",
        "  same batch                       yes",
        "FAIL",
    ]


def test_an_unreadable_final_checkpoint_is_a_difference_not_a_crash():
    def compare(a, b, step):
        raise FileNotFoundError(f"{b}/step_{step} is gone")

    assert final_diffs(compare, "s", "c", 3) == ["final checkpoint unreadable: c/step_3 is gone"]
    assert final_diffs(lambda a, b, step: ["/x"], "s", "c", 3) == ["/x"]


def test_supervisor_cmd_is_resumekit_run_up_to_the_job():
    cmd = supervisor_cmd("/d", max_restarts=4, extra=["--json"])
    assert cmd[1:] == ["-m", "resumekit", "run", "--dir", "/d", "--max-restarts", "4", "--backoff", "0.05"] + [
        "--backoff-max",
        "0.2",
        "--json",
    ]


# ------------------------------------------------------------------------------------ package shape
def test_worker_args_round_trip_through_parse_worker_args():
    args = worker_args("resumekit.demo.single", "/d", 120, 10, 3, True)
    assert args[:3] == ["-m", "resumekit.demo.single", "--worker"]
    a = parse_worker_args("prog", args[2:], steps=300, save_every=20)
    assert (a.dir, a.steps, a.save_every, a.seed, a.async_save) == ("/d", 120, 10, 3, True)
    a = parse_worker_args("prog", ["--worker", "--dir", "/e"], steps=300, save_every=20)
    assert (a.steps, a.save_every, a.seed, a.async_save) == (300, 20, 0, False)
    assert job_cmd("/d", 120, 10, 0, False) == [
        sys.executable,
        "-m",
        "resumekit.demo.single",
        "--worker",
        "--dir",
        "/d",
        "--steps",
        "120",
        "--save-every",
        "10",
        "--seed",
        "0",
    ]
    assert job_args("/d", 30, 5, 0, True)[:2] == ["-m", "resumekit.demo.distributed"]
    assert job_args("/d", 30, 5, 0, True)[-1] == "--async"


def test_the_package_facade_imports_no_worker_module():
    """``python -m resumekit.demo.single`` would warn on stderr if importing the package had loaded it already."""
    code = (
        "import sys, resumekit.demo as d; "
        "print(callable(d.run_demo), 'resumekit.demo.single' in sys.modules, "
        "'resumekit.demo.distributed' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False", "False", "False"]
    assert run_demo.__module__ == "resumekit.demo"


@pytest.mark.parametrize("module", ["resumekit.demo.single", "resumekit.demo.distributed"])
def test_worker_modules_run_with_dash_m_and_print_nothing_unexpected(module):
    r = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", module, "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and "--worker" in r.stdout and "--save-every" in r.stdout and module in r.stdout
