"""resolve_config / `resumekit resolve`: byte-exact edits of LLaMA-Factory / HF YAML, null when nothing is valid."""

from __future__ import annotations

import json
import os
import sys

import pytest
from click.testing import CliRunner

import layout_fixtures as F
from resumekit.cli import main
from resumekit.errors import ConfigError
from resumekit.yamlconfig import MissingDependencyError, format_scalar, resolve_config

# The seed recipe (LLaMA-Factory on ModelArts): resume_from_checkpoint set to the run directory itself.
SEED = """\
### model
model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct   # base model
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_target: all
dataset: identity,alpaca_en_demo
template: "qwen"
cutoff_len: 2048
flags:
    - a
    - 'b'
maybe: ~

### output
output_dir: ${train_output}
save_steps: 500
overwrite_output_dir: true

### train
per_device_train_batch_size: 1
resume_from_checkpoint: ${train_output}
learning_rate:   1.0e-4
bf16: true
"""


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    out = tmp_path / "out"
    for s in (2, 4):
        F.hf_checkpoint(str(out), s)
    F.hf_checkpoint(str(out), 6, state=False)  # killed mid-save: what get_last_checkpoint would pick
    monkeypatch.setenv("train_output", str(out))
    return out


def write_yaml(tmp_path, text, name="sft.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_seed_recipe_points_at_newest_valid(tmp_path, run_dir):
    p = write_yaml(tmp_path, SEED)
    res = resolve_config(p)
    assert (res.old, res.new, res.changed, res.written) == (
        "${train_output}",
        "${train_output}/checkpoint-4",
        True,
        True,
    )
    assert res.checkpoint.name == "checkpoint-4" and [s.name for s in res.skipped] == ["checkpoint-6"]
    assert open(p).read() == SEED.replace(
        "resume_from_checkpoint: ${train_output}", "resume_from_checkpoint: ${train_output}/checkpoint-4"
    )
    again = resolve_config(p)  # idempotent: nothing to change, nothing written
    assert (again.changed, again.written, again.new) == (False, False, "${train_output}/checkpoint-4")


@pytest.mark.parametrize(
    "before,after",
    [
        ("resume_from_checkpoint: 'out'  # parent dir\n", "resume_from_checkpoint: 'out/checkpoint-4'  # parent dir\n"),
        ('resume_from_checkpoint: "out"\n', 'resume_from_checkpoint: "out/checkpoint-4"\n'),
        (
            "resume_from_checkpoint: null   # set by resumekit\n",
            "resume_from_checkpoint: out/checkpoint-4   # set by resumekit\n",
        ),
        (
            "resume_from_checkpoint:  # set by resumekit\n",
            "resume_from_checkpoint:  out/checkpoint-4 # set by resumekit\n",
        ),
        ("resume_from_checkpoint:\n", "resume_from_checkpoint: out/checkpoint-4\n"),
        ("resume_from_checkpoint: true\n", "resume_from_checkpoint: out/checkpoint-4\n"),
        ("resume_from_checkpoint: out/checkpoint-6\n", "resume_from_checkpoint: out/checkpoint-4\n"),
    ],
)
def test_value_forms_and_quoting(tmp_path, run_dir, monkeypatch, before, after):
    monkeypatch.chdir(tmp_path)
    head = "# LLaMA-Factory\noutput_dir: out   # where checkpoint-N go\n"
    p = write_yaml(tmp_path, head + before + "bf16: true\n")
    res = resolve_config(p)
    assert res.changed and res.new == "out/checkpoint-4"
    assert open(p).read() == head + after + "bf16: true\n"


def test_key_absent_is_added_after_output_dir(tmp_path, run_dir):
    text = "stage: sft\noutput_dir: ${train_output}  # out\n\n### train\nlearning_rate: 1.0e-4\n"
    p = write_yaml(tmp_path, text)
    res = resolve_config(p)
    assert (res.old, res.key_added, res.key_present) == (None, True, False)
    assert open(p).read() == (
        "stage: sft\noutput_dir: ${train_output}  # out\n"
        "resume_from_checkpoint: ${train_output}/checkpoint-4\n"
        "\n### train\nlearning_rate: 1.0e-4\n"
    )


def test_nothing_valid_gives_null_and_absent_stays_absent(tmp_path, monkeypatch):
    out = tmp_path / "out"
    F.hf_checkpoint(str(out), 6, optimizer=False)
    monkeypatch.setenv("train_output", str(out))
    p = write_yaml(tmp_path, SEED)
    res = resolve_config(p)
    assert (res.new, res.changed) == (None, True)
    assert res.skipped[0].reason.startswith("optimizer.pt is missing")
    assert open(p).read() == SEED.replace("resume_from_checkpoint: ${train_output}", "resume_from_checkpoint: null")
    absent = "output_dir: ${train_output}\nseed: 1\n"
    q = write_yaml(tmp_path, absent, "absent.yaml")
    before = os.stat(q)
    res = resolve_config(q)
    assert (res.new, res.changed, res.written, res.key_added) == (None, False, False, False)
    assert open(q).read() == absent and os.stat(q).st_ino == before.st_ino


def test_explicit_checkpoint_elsewhere_is_kept_until_the_run_saves(tmp_path, monkeypatch):
    F.hf_checkpoint(str(tmp_path / "base"), 100)
    os.makedirs(tmp_path / "new")
    text = f"output_dir: {tmp_path / 'new'}\nresume_from_checkpoint: {tmp_path / 'base' / 'checkpoint-100'}\n"
    p = write_yaml(tmp_path, text)
    res = resolve_config(p)
    assert (res.changed, res.checkpoint.name) == (False, "checkpoint-100")
    F.hf_checkpoint(str(tmp_path / "new"), 10)
    res = resolve_config(p)
    assert res.new == f"{tmp_path / 'new'}/checkpoint-10"


def test_same_checkpoint_spelled_differently_is_left_alone(tmp_path, run_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = f"output_dir: out\nresume_from_checkpoint: {run_dir / 'checkpoint-4'}\n"
    p = write_yaml(tmp_path, text)
    res = resolve_config(p)
    assert (res.changed, res.written) == (False, False) and open(p).read() == text


def test_supervisor_arguments(tmp_path, run_dir):
    p = write_yaml(tmp_path, SEED)
    res = resolve_config(p, checkpoint="/ckpts/checkpoint-9", dry_run=True)
    assert (res.new, res.changed, res.written) == ("/ckpts/checkpoint-9", True, False)
    assert open(p).read() == SEED
    res = resolve_config(p, fresh=True)
    assert res.new is None and "resume_from_checkpoint: null\n" in open(p).read()


def test_atomic_write_keeps_mode_and_leaves_no_temp(tmp_path, run_dir, monkeypatch):
    p = write_yaml(tmp_path, SEED)
    os.chmod(p, 0o640)
    ino = os.stat(p).st_ino

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        resolve_config(p)
    assert open(p).read() == SEED and sorted(os.listdir(tmp_path)) == ["out", "sft.yaml"]
    monkeypatch.undo()
    monkeypatch.setenv("train_output", str(run_dir))
    resolve_config(p)
    st = os.stat(p)
    assert st.st_ino != ino and st.st_mode & 0o777 == 0o640  # replaced by rename, permissions kept
    assert sorted(os.listdir(tmp_path)) == ["out", "sft.yaml"]


def test_crlf_and_symlinked_yaml(tmp_path, run_dir):
    real = write_yaml(tmp_path, SEED.replace("\n", "\r\n"), "real.yaml")
    link = tmp_path / "sft.yaml"
    os.symlink(real, link)
    resolve_config(str(link))
    assert os.path.islink(link)  # the link is kept, its target is rewritten
    assert open(real, newline="").read() == SEED.replace(
        "resume_from_checkpoint: ${train_output}", "resume_from_checkpoint: ${train_output}/checkpoint-4"
    ).replace("\n", "\r\n")


def test_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("train_output", raising=False)
    p = write_yaml(tmp_path, SEED)
    with pytest.raises(ConfigError, match=r"output_dir is '\$\{train_output\}' but \$train_output is not set"):
        resolve_config(p)
    with pytest.raises(ConfigError, match="resume_from_checkpoint is a CommentedSeq, expected a path or null"):
        resolve_config(write_yaml(tmp_path, "resume_from_checkpoint: [a]\n", "bad.yaml"))
    with pytest.raises(ConfigError, match="is not a YAML mapping of options"):
        resolve_config(write_yaml(tmp_path, "- a\n", "list.yaml"))


def test_format_scalar():
    assert format_scalar(None, "plain") == "null"
    assert format_scalar("a/b-1", None) == "a/b-1"
    assert format_scalar("a b: c", None) == "'a b: c'"
    assert format_scalar("true", None) == "'true'" and format_scalar("1e3", None) == "'1e3'"
    assert format_scalar("it's", "'") == "'it''s'"
    assert format_scalar('say "x"', '"') == '"say \\"x\\""'


def test_cli(tmp_path, run_dir):
    p = write_yaml(tmp_path, SEED)
    r = CliRunner().invoke(main, ["resolve", p, "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert (doc["new"], doc["changed"], doc["written"], doc["dry_run"]) == (
        "${train_output}/checkpoint-4",
        True,
        False,
        True,
    )
    assert open(p).read() == SEED
    r = CliRunner().invoke(main, ["resolve", p])
    assert r.exit_code == 0
    assert r.stdout.strip() == (
        f"{p}: set resume_from_checkpoint: ${{train_output}}/checkpoint-4 (was ${{train_output}})"
    )
    assert "skipped" in r.stderr and "checkpoint-6" in r.stderr
    q = write_yaml(tmp_path, "output_dir: nowhere\n", "empty.yaml")
    r = CliRunner().invoke(main, ["resolve", q, "--key", "ckpt", "--layout", "auto"])
    assert r.exit_code == 1
    assert r.stdout.strip().startswith(f"{q}: no valid checkpoint under ") and r.stdout.strip().endswith(
        "nowhere; ckpt left unset"
    )
    r = CliRunner().invoke(main, ["resolve", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2


def test_cli_without_ruamel(tmp_path, run_dir, monkeypatch):
    p = write_yaml(tmp_path, SEED)
    monkeypatch.setitem(sys.modules, "ruamel.yaml", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'resumekit\[yaml\]'"):
        resolve_config(p)
    r = CliRunner().invoke(main, ["resolve", p])
    assert r.exit_code == 2 and "pip install 'resumekit[yaml]'" in r.stderr


def test_expand_writes_paths_the_framework_can_open_and_restore_puts_the_text_back(tmp_path, run_dir):
    from resumekit.yamlconfig import restore_config

    p = write_yaml(tmp_path, SEED)
    res = resolve_config(p, expand=True)
    assert (res.new, res.dir_old, res.dir_new) == (f"{run_dir}/checkpoint-4", "${train_output}", str(run_dir))
    text = open(p).read()
    assert f"output_dir: {run_dir}\n" in text and f"resume_from_checkpoint: {run_dir}/checkpoint-4\n" in text
    assert "${" not in text and res.new_text == text and res.original_text == SEED
    assert restore_config(p, SEED, text) and open(p).read() == SEED
    resolve_config(p, expand=True)
    with open(p, "a") as f:
        f.write("seed: 1\n")  # edited during the run: left alone
    assert not restore_config(p, SEED, text) and open(p).read().endswith("seed: 1\n")


def test_null_only_after_the_invalid_ones_are_out_of_the_frameworks_sight(tmp_path, monkeypatch):
    out = tmp_path / "out"
    F.hf_checkpoint(str(out), 6, state=False)  # get_last_checkpoint(output_dir) would load it on null
    monkeypatch.setenv("train_output", str(out))
    p = write_yaml(tmp_path, SEED)
    res = resolve_config(p, dry_run=True)
    assert res.new is None and res.hidden == [] and (out / "checkpoint-6").is_dir()
    res = resolve_config(p)
    assert res.new is None and [h["name"] for h in res.hidden] == ["checkpoint-6"]
    assert not (out / "checkpoint-6").exists() and len(os.listdir(out / "quarantine")) == 1
    get_last_checkpoint = pytest.importorskip("transformers.trainer_utils").get_last_checkpoint
    assert get_last_checkpoint(str(out)) is None  # null now means a fresh start
