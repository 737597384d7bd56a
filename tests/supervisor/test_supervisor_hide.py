"""Before every start, invalid checkpoints a framework would pick by itself go out of its sight (issue 11): HF's
highest ``checkpoint-N``, Lightning's ``last.ckpt``, tracker targets; Lightning's default directories; ``--config``
written as the framework can open it, and put back afterwards."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from supervisor_jobs import PY, events_of, run_cli

import layout_fixtures as F
from resumekit.layouts import get_layout
from resumekit.storage import open_storage
from resumekit.supervisor import Supervisor, SupervisorOptions


def _quarantined(root: Path):
    return sorted(p.name.rsplit("-", 1)[0] for p in (root / "quarantine").iterdir())


def test_hf_invalid_newer_checkpoints_are_moved_aside_and_never_a_valid_one(tmp_path):
    out = tmp_path / "out"
    F.hf_checkpoint(str(out), 2)
    F.hf_checkpoint(str(out), 4, state=False)  # killed mid-save: get_last_checkpoint would take it
    F.hf_checkpoint(str(out), 6, optimizer=False)
    st = open_storage(str(out))
    hidden = get_layout("hf").hide_invalid(st, now=0)
    assert [(h.name, h.to) for h in hidden] == [
        ("checkpoint-6", str(out / "quarantine" / f"checkpoint-6-{_stamp(0)}")),
        ("checkpoint-4", str(out / "quarantine" / f"checkpoint-4-{_stamp(0)}")),
    ]
    assert "optimizer.pt is missing" in hidden[0].reason and "trainer_state.json" in hidden[1].reason
    assert sorted(os.listdir(out)) == ["checkpoint-2", "quarantine"]  # moved, never deleted
    assert (out / "quarantine" / f"checkpoint-4-{_stamp(0)}" / "model.safetensors").is_file()
    assert get_layout("hf").hide_invalid(st) == []  # nothing left in sight; the valid one stays


def _stamp(t: float) -> str:
    import time

    return time.strftime("%Y%m%dT%H%M%S", time.localtime(t))


def test_trackers_are_moved_aside_only_when_nothing_valid_exists(tmp_path):
    ds = tmp_path / "ds"
    F.deepspeed_tag(str(ds), "global_step10", dp=2)
    os.remove(ds / "global_step10" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    (ds / "latest").write_text("global_step10")
    hidden = get_layout("deepspeed").hide_invalid(open_storage(str(ds)))
    assert [h.name for h in hidden] == ["global_step10", "latest"]
    assert "no valid checkpoint exists" in hidden[1].reason and not (ds / "latest").exists()
    meg = tmp_path / "meg"
    F.megatron_iter(str(meg), 100)
    F.megatron_iter(str(meg), 200, fmt="none")
    (meg / "latest_checkpointed_iteration.txt").write_text("200")
    hidden = get_layout("megatron").hide_invalid(open_storage(str(meg)))
    assert [h.name for h in hidden] == ["iter_0000200"]  # a valid one exists: repair() fixes the tracker
    assert (meg / "latest_checkpointed_iteration.txt").read_text() == "200"


def test_lightning_default_directories_are_discovered(tmp_path):
    root = tmp_path / "run"
    v0 = root / "lightning_logs" / "version_0" / "checkpoints"
    v1 = root / "lightning_logs" / "version_1" / "checkpoints"
    F.lightning_ckpt(str(v0 / "epoch=0-step=4.ckpt"), 4)
    F.lightning_ckpt(str(v1 / "epoch=1-step=8.ckpt"), 8, epoch=1)
    F.lightning_ckpt(str(root / "checkpoints" / "epoch=0-step=2.ckpt"), 2)
    r = run_cli_latest(str(root))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["latest"]["path"] == str(v1 / "epoch=1-step=8.ckpt")
    names = [i.name for i in get_layout("lightning").list(open_storage(str(root)))]
    assert sorted(names) == [
        "checkpoints/epoch=0-step=2.ckpt",
        "lightning_logs/version_0/checkpoints/epoch=0-step=4.ckpt",
        "lightning_logs/version_1/checkpoints/epoch=1-step=8.ckpt",
    ]


def run_cli_latest(root: str):
    import subprocess

    return subprocess.run([PY, "-m", "resumekit", "latest", root, "--json"], capture_output=True, text=True, timeout=60)


def test_a_truncated_last_ckpt_is_moved_aside_and_last_links_to_the_newest_valid_one(tmp_path):
    d = tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints"
    F.lightning_ckpt(str(d / "epoch=0-step=4.ckpt"), 4)
    last = F.lightning_ckpt(str(d / "last.ckpt"), 6)
    F.truncate(last, 100)
    (d / "last.ckpt.resumekit.manifest.json").write_text("{}")  # the integration's sidecar of the broken file
    root = tmp_path / "run"
    hidden = get_layout("lightning").hide_invalid(open_storage(str(root)), now=0)
    assert [h.name for h in hidden] == ["lightning_logs/version_0/checkpoints/last.ckpt"]
    assert hidden[0].replaced_by == str(d / "epoch=0-step=4.ckpt")
    assert os.readlink(d / "last.ckpt") == "epoch=0-step=4.ckpt"  # what ckpt_path="last" now loads
    assert sorted(os.listdir(d / "quarantine")) == [
        f"last.ckpt-{_stamp(0)}",
        f"last.ckpt-{_stamp(0)}.resumekit.manifest.json",  # the sidecar went with its file
    ]
    best, skipped = get_layout("lightning").latest(open_storage(str(root)))
    assert best is not None and best.step == 4 and not skipped


def test_the_precheck_does_not_create_a_lightning_version_directory(tmp_path):
    root = tmp_path / "run"
    ckdir = root / "lightning_logs" / "version_0" / "checkpoints"
    seen = tmp_path / "seen.json"
    code = (
        "import os, json, sys; "
        f"json.dump({{'v0': os.path.exists({str(ckdir.parent)!r}), "
        "'resume': os.environ.get('RESUMEKIT_RESUME_FROM', '<unset>')}, "
        f"open({str(seen)!r}, 'w'))"
    )
    sup = Supervisor(SupervisorOptions(command=[PY, "-c", code], directory=str(ckdir), quiet=True))
    assert sup.run() == 0
    assert json.loads(seen.read_text()) == {"v0": False, "resume": "<unset>"}
    assert not (root / "lightning_logs" / "version_0").exists()  # Lightning would have picked version_1
    logs = root / "lightning_logs"
    assert (logs / "events.jsonl").is_file()
    (warn,) = events_of(logs, "warning")
    assert "Pass the Trainer's default_root_dir as --dir" in warn["message"]


SEED_YAML = """\
### output
output_dir: ${train_output}   # where checkpoint-N go
save_steps: 2
### train
resume_from_checkpoint: ${train_output}
"""


def test_config_is_handed_over_expanded_invalid_ones_hidden_and_put_back_after_the_run(tmp_path, monkeypatch):
    pytest.importorskip("ruamel.yaml")
    out = tmp_path / "train_output"
    F.hf_checkpoint(str(out), 2)
    F.hf_checkpoint(str(out), 4, state=False)
    monkeypatch.setenv("train_output", str(out))
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(SEED_YAML)
    seen = tmp_path / "seen.yaml"
    code = f"import shutil; shutil.copy({str(cfg)!r}, {str(seen)!r})"
    sup = Supervisor(SupervisorOptions(command=[PY, "-c", code], config=str(cfg), layout="hf", quiet=True))
    assert sup.run() == 0
    # What the job read: paths LLaMA-Factory can open (it does not expand ${...}), the valid checkpoint.
    assert seen.read_text() == (
        f"### output\noutput_dir: {out}   # where checkpoint-N go\nsave_steps: 2\n"
        f"### train\nresume_from_checkpoint: {out}/checkpoint-2\n"
    )
    assert _quarantined(out) == ["checkpoint-4"]
    assert cfg.read_text() == SEED_YAML  # the user's own text, back after the run
    (restored,) = events_of(out, "config_restored")
    assert restored["ok"] is True
    assert sup.summary.hidden_invalid == 1 and sup.summary.quarantined == 0


def test_config_with_an_unset_variable_is_refused_in_one_line(tmp_path, monkeypatch):
    pytest.importorskip("ruamel.yaml")
    monkeypatch.delenv("train_output", raising=False)
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(SEED_YAML)
    r = run_cli("--config", str(cfg), "--layout", "hf", "--", sys.executable, "-c", "pass")
    assert r.returncode == 1
    assert "output_dir is '${train_output}' but $train_output is not set; export it" in r.stderr
    assert cfg.read_text() == SEED_YAML and not (tmp_path / "${train_output}").exists()


def test_a_checkpoint_still_being_written_is_never_moved(tmp_path):
    import threading
    import time

    from resumekit.supervisor.activity import still_written

    settled = tmp_path / "checkpoint-2"
    F.hf_checkpoint(str(tmp_path), 2, state=False)
    for f in settled.iterdir():
        os.utime(f, (time.time() - 60, time.time() - 60))
    os.utime(settled, (time.time() - 60, time.time() - 60))
    live = tmp_path / "checkpoint-4"
    live.mkdir()
    stop = threading.Event()

    def writer():
        with open(live / "model.safetensors", "wb") as f:
            while not stop.is_set():
                f.write(b"x" * 512)
                f.flush()
                time.sleep(0.02)

    t = threading.Thread(target=writer)
    t.start()
    try:
        t0 = time.monotonic()
        assert still_written([str(settled)]) == [] and time.monotonic() - t0 < 0.5  # settled: no wait
        assert still_written([str(settled), str(live)], wait_s=0.3) == [str(live)]
    finally:
        stop.set()
        t.join()
