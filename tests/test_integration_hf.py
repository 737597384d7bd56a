"""Real HF Trainer runs: SIGKILL mid-save, `resumekit latest`, resume, manifests, preemption save, resolve."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

import hf_tiny  # noqa: E402
from resumekit.cli import main  # noqa: E402
from resumekit.integrations.hf import MANIFEST_NAME, ResumekitCallback  # noqa: E402
from resumekit.yamlconfig import resolve_config  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def kill_when(proc: subprocess.Popen, ready, timeout: float = 90.0) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; fail with its output if it exits or times out first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"training exited ({proc.returncode}) before the kill point:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no kill point within {timeout}s:\n{proc.stdout.read()}")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A run SIGKILLed while writing checkpoint-6 (model, optimizer, scheduler on disk; rng, trainer_state not)."""
    out = str(tmp_path_factory.mktemp("hf") / "out")
    marker = out + ".stalled"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([HERE] + sys.path))
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "hf_tiny.py"), out, "10", "6", marker],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    kill_when(proc, lambda: os.path.exists(marker))
    assert proc.returncode == -signal.SIGKILL
    return out


def test_kill_mid_save_latest_resume_and_resolve(killed_run, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(killed_run, out)
    ck = {n: os.path.join(out, n) for n in ("checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8")}
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert {"optimizer.pt", "scheduler.pt", "model.safetensors"} <= set(os.listdir(ck["checkpoint-6"]))
    assert "trainer_state.json" not in os.listdir(ck["checkpoint-6"])
    # What the Trainer itself would resume from: the highest N, not looked into.
    assert transformers.trainer_utils.get_last_checkpoint(out) == ck["checkpoint-6"]

    r = CliRunner().invoke(main, ["latest", out, "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["latest"]["path"] == ck["checkpoint-4"] and doc["latest"]["layout"] == "hf"
    assert [(s["name"], s["reason"]) for s in doc["skipped"]] == [
        ("checkpoint-6", "trainer_state.json is missing (the Trainer writes it last: the save never finished)")
    ]
    for name in ("checkpoint-2", "checkpoint-4"):  # the callback's manifests verify, by checksum
        r = CliRunner().invoke(main, ["verify", ck[name], "--json"])
        assert r.exit_code == 0 and json.loads(r.stdout)["metadata"]["verified_by"] == MANIFEST_NAME

    # resolve: the LLaMA-Factory recipe with resume_from_checkpoint = output_dir.
    yml = tmp_path / "sft.yaml"
    yml.write_text(f"### output\noutput_dir: {out}\nsave_steps: 2\n\n### train\nresume_from_checkpoint: {out}\n")
    res = resolve_config(str(yml))
    assert res.new == ck["checkpoint-4"]
    assert yml.read_text().endswith(f"resume_from_checkpoint: {ck['checkpoint-4']}\n")

    trainer = hf_tiny.make_trainer(out, 8, [ResumekitCallback(exit_code=None)])
    trainer.train(resume_from_checkpoint=res.new)
    assert trainer.state.global_step == 8
    r = CliRunner().invoke(main, ["ls", out, "--json", "--full"])
    assert [(i["name"], i["valid"]) for i in json.loads(r.stdout)] == [
        ("checkpoint-2", True),
        ("checkpoint-4", True),
        ("checkpoint-6", True),
        ("checkpoint-8", True),
    ]

    # The hard case: a file damaged after the fact, in a checkpoint that looks complete.
    weights = os.path.join(ck["checkpoint-8"], "model.safetensors")
    size = os.path.getsize(weights)
    with open(weights, "r+b") as f:
        f.truncate(size - 100)
    r = CliRunner().invoke(main, ["latest", out, "--quick", "--json"])
    doc = json.loads(r.stdout)
    assert doc["latest"]["name"] == "checkpoint-6"
    assert doc["skipped"][0]["reason"] == (
        f"model.safetensors has {size - 100} bytes, {MANIFEST_NAME} says {size} (truncated?)"
    )
    os.remove(os.path.join(ck["checkpoint-8"], MANIFEST_NAME))  # without the callback: the header check sees it
    r = CliRunner().invoke(main, ["latest", out, "--json"])
    assert json.loads(r.stdout)["skipped"][0]["reason"].startswith("model.safetensors is truncated: its header")
    assert resolve_config(str(yml)).new == ck["checkpoint-6"]


class _SigtermAt(transformers.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_at_step_end_and_exits_143(tmp_path):
    out = str(tmp_path / "out")
    cb = ResumekitCallback()
    trainer = hf_tiny.make_trainer(out, 50, [cb, _SigtermAt(3)])
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exc:
        trainer.train()
    assert exc.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is before  # handler restored
    assert (trainer.state.global_step, cb.preempted_at) == (3, 3)
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-3"]
    r = CliRunner().invoke(main, ["latest", out])
    assert (r.exit_code, r.stdout.strip()) == (0, os.path.join(out, "checkpoint-3"))
    man = json.load(open(os.path.join(out, "checkpoint-3", MANIFEST_NAME)))
    assert man["step"] == 3 and "trainer_state.json" in man["files"] and "optimizer.pt" in man["files"]


def test_callback_beats_the_heartbeat_and_reports_what_it_loaded(tmp_path, monkeypatch):
    """The evidence `resumekit run` acts on: the heartbeat's step, and restore/metrics/save events."""
    out = str(tmp_path / "out")
    events, hb = str(tmp_path / "events.jsonl"), str(tmp_path / "hb")
    monkeypatch.setenv("RESUMEKIT_EVENTS", events)
    monkeypatch.setenv("RESUMEKIT_HEARTBEAT", hb)
    hf_tiny.make_trainer(out, 2, [ResumekitCallback(exit_code=None)]).train()
    assert json.load(open(hb))["step"] == 2
    trainer = hf_tiny.make_trainer(out, 4, [ResumekitCallback(exit_code=None)])
    trainer.train(resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
    assert json.load(open(hb))["step"] == 4
    from resumekit.events import read_events

    evs = [e for e in read_events(events) if e["event"] in ("restore", "save")]
    assert [(e["event"], e["step"], e["path"]) for e in evs] == [
        ("restore", 0, None),
        ("save", 2, os.path.join(out, "checkpoint-2")),
        ("restore", 2, os.path.join(out, "checkpoint-2")),
        ("save", 4, os.path.join(out, "checkpoint-4")),
    ]
    assert all(e["framework"] == "hf" and e["source"] == "job" for e in evs)
    metrics = [e for e in read_events(events) if e["event"] == "metrics"]
    assert metrics and all(isinstance(e["step"], int) for e in metrics)
