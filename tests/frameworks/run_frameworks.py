"""`make test-frameworks`: the seed guide's recipes end to end, with the real frameworks, under `resumekit run` with
SIGKILLs, each compared with a straight run of the same recipe. Not part of `make test` or CI: it needs
LLaMA-Factory and DeepSpeed (installed by the Makefile into .venv-frameworks) and takes minutes.

Recipes:
  llamafactory  The seed's YAML as written (``output_dir: ${train_output}``, ``resume_from_checkpoint:
                ${train_output}``, ``train_output`` exported) under ``resumekit run --layout llamafactory --config``,
                full fine-tuning of a tiny local Llama on CPU. Checks: the job is killed 3 times, each restart
                resumes from the newest valid ``checkpoint-N``, the run finishes, the final checkpoint's weights,
                optimizer and scheduler are bitwise equal to a straight run's, and the YAML is as it was.
  deepspeed     ``examples/deepspeed_train.py``: DeepSpeed ZeRO-1 on CPU (gloo), 2 processes under torchrun, under
                ``resumekit run --layout deepspeed``. Checks: killed 3 times (the whole process tree, as a node
                failure), final parameters and optimizer partition bitwise equal to a straight run's.

Usage: python tests/frameworks/run_frameworks.py [--only llamafactory|deepspeed] [--work DIR] [--kills N]
Exit status 0 when every recipe passed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import psutil
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BIN = os.path.dirname(sys.executable)
sys.path.insert(0, HERE)

import tiny_assets  # noqa: E402

from resumekit.events import EVENTS_FILE, EventTail  # noqa: E402


def say(msg: str) -> None:
    print(f"[frameworks] {msg}", flush=True)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (a node failure, not a polite stop)."""
    try:
        proc = psutil.Process(pid)
        procs = proc.children(recursive=True) + [proc]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def supervised(
    cmd: Sequence[str],
    events_path: str,
    checkpoints: Callable[[], set[str]],
    *,
    env: dict[str, str],
    kills: int,
    timeout: float,
    log_path: str,
    slow_steps: bool = True,
) -> dict:
    """Run ``resumekit run ...`` and SIGKILL each attempt's tree once it has written new checkpoints (1, 2, 1, ...;
    with fast steps at once after the first, so every kill lands before the job ends).

    Returns:
        ``rc``, ``kills`` and ``starts`` (the supervisor's ``start`` events).
    """
    plan = [1 + (i % 2) for i in range(kills)] if slow_steps else [1] * kills
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        tail = EventTail(events_path, EventTail.size_of(events_path))
        starts: list[dict] = []
        seen_at_start: set[str] = set()
        done = 0
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if time.monotonic() > deadline:
                kill_tree(proc.pid)
                raise SystemExit(f"timed out; see {log_path}")
            for ev in tail.read():
                if ev.get("source") == "supervisor" and ev.get("event") == "start":
                    starts.append(ev)
                    seen_at_start = checkpoints()
            if starts and done < kills and len(starts) == done + 1:
                new = checkpoints() - seen_at_start
                if len(new) >= plan[done]:
                    if slow_steps:
                        time.sleep(0.2)  # somewhere in the next steps, maybe inside the next save
                    kill_tree(starts[-1]["pid"])
                    done += 1
                    say(f"  SIGKILL {done}/{kills}: attempt {len(starts)} after {sorted(new)}")
            time.sleep(0.05)
    return {"rc": proc.returncode, "kills": done, "starts": starts}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if hasattr(a, "__dict__") and type(a) is type(b) and not callable(a):
        return same(vars(a), vars(b))  # e.g. DeepSpeed's LossScaler, which has no __eq__
    return a == b


def check(cond: bool, what: str, failures: list[str]) -> None:
    say(f"  {'ok  ' if cond else 'FAIL'} {what}")
    if not cond:
        failures.append(what)


# ------------------------------------------------------------------------------------------------ LLaMA-Factory
SEED_YAML = """\
### model
model_name_or_path: {model}

### method
stage: sft
do_train: true
finetuning_type: full

### dataset
dataset: tiny
dataset_dir: {data}
template: default
cutoff_len: 64
overwrite_cache: true

### output
output_dir: {output_dir}
logging_steps: 1
save_steps: 2
overwrite_output_dir: false
report_to: none

### train
per_device_train_batch_size: 4
learning_rate: 1.0e-3
max_steps: {steps}
lr_scheduler_type: cosine
seed: 42
{resume}"""


def llamafactory(work: str, kills: int, failures: list[str]) -> None:
    say("llamafactory: LLaMA-Factory SFT, the seed's YAML, under resumekit run with SIGKILLs")
    data, model = tiny_assets.build_dataset(work), tiny_assets.build_model(work)
    steps = 12
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    straight = os.path.join(work, "lf-straight")
    yml = os.path.join(work, "straight.yaml")
    with open(yml, "w") as f:
        f.write(SEED_YAML.format(model=model, data=data, output_dir=straight, steps=steps, resume=""))
    t0 = time.monotonic()
    with open(os.path.join(work, "lf-straight.log"), "w") as log:
        rc = subprocess.call([os.path.join(BIN, "llamafactory-cli"), "train", yml], env=env, stdout=log, stderr=log)
    check(rc == 0, f"straight run finished (exit {rc}, {time.monotonic() - t0:.0f}s)", failures)

    killed = os.path.join(work, "lf-killed")
    yml = os.path.join(work, "seed.yaml")
    text = SEED_YAML.format(
        model=model,
        data=data,
        output_dir="${train_output}",
        steps=steps,
        resume="resume_from_checkpoint: ${train_output}\n",
    )
    with open(yml, "w") as f:
        f.write(text)
    env["train_output"] = killed
    cmd = [os.path.join(BIN, "resumekit"), "run", "--layout", "llamafactory", "--config", yml]
    cmd += ["--max-restarts", str(kills + 3), "--backoff", "0", "--", os.path.join(BIN, "llamafactory-cli")]
    cmd += ["train", yml]

    t0 = time.monotonic()
    res = supervised(
        cmd,
        os.path.join(killed, EVENTS_FILE),
        lambda: checkpoints_dirs(killed),
        env=env,
        kills=kills,
        timeout=1800,
        log_path=os.path.join(work, "lf-killed.log"),
    )
    check(
        res["rc"] == 0 and res["kills"] == kills,
        f"supervised run finished after {res['kills']} SIGKILLs (exit {res['rc']}, {time.monotonic() - t0:.0f}s)",
        failures,
    )
    resumed = [(s.get("resume_step"), os.path.basename(s.get("resume_from") or "-")) for s in res["starts"]]
    say(f"  starts resumed from: {resumed}")
    check(all(step for step, _ in resumed[1:]), "every restart resumed from a checkpoint, none from scratch", failures)
    check(
        not os.path.exists(os.path.join(work, "${train_output}")), "no folder literally named ${train_output}", failures
    )
    with open(yml) as f:
        check(f.read() == text, "the YAML is as it was written (comments, ${train_output}) after the run", failures)
    a, b = os.path.join(straight, f"checkpoint-{steps}"), os.path.join(killed, f"checkpoint-{steps}")
    if not (os.path.isdir(a) and os.path.isdir(b)):
        check(False, f"both runs have checkpoint-{steps}", failures)
        return
    from safetensors.torch import load_file

    check(same(load_file(f"{a}/model.safetensors"), load_file(f"{b}/model.safetensors")), "weights bitwise", failures)
    for name in ("optimizer.pt", "scheduler.pt"):
        x, y = (torch.load(f"{d}/{name}", map_location="cpu", weights_only=True) for d in (a, b))
        check(same(x, y), f"{name} bitwise", failures)
    with open(f"{a}/trainer_state.json") as f1, open(f"{b}/trainer_state.json") as f2:
        la = [round(h["loss"], 6) for h in json.load(f1)["log_history"] if "loss" in h]
        lb = {h["step"]: round(h["loss"], 6) for h in json.load(f2)["log_history"] if "loss" in h}
    check(la[-1] == lb.get(steps), f"final loss equal ({la[-1]} vs {lb.get(steps)})", failures)


def checkpoints_dirs(root: str) -> set[str]:
    """The ``checkpoint-N`` directories whose ``trainer_state.json`` (written last) is there."""
    return {os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(root, "checkpoint-*", "*state.json"))}


# ------------------------------------------------------------------------------------------------------ DeepSpeed
def deepspeed(work: str, kills: int, failures: list[str]) -> None:
    say("deepspeed: DeepSpeed ZeRO-1 on CPU, 2 processes, under resumekit run with SIGKILLs")
    example = os.path.join(ROOT, "examples", "deepspeed_train.py")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    steps = 60

    def torchrun(save_dir: str, final: str) -> list[str]:
        launcher = [os.path.join(BIN, "torchrun"), "--standalone", "--nproc-per-node", "2", example]
        return launcher + ["--save-dir", save_dir, "--max-steps", str(steps), "--final", final]

    straight, killed = os.path.join(work, "ds-straight"), os.path.join(work, "ds-killed")
    t0 = time.monotonic()
    with open(os.path.join(work, "ds-straight.log"), "w") as log:
        rc = subprocess.call(torchrun(straight, straight + ".pt"), env=env, stdout=log, stderr=log, cwd=ROOT)
    check(rc == 0, f"straight run finished (exit {rc}, {time.monotonic() - t0:.0f}s)", failures)

    cmd = [os.path.join(BIN, "resumekit"), "run", "--dir", killed, "--layout", "deepspeed"]
    cmd += ["--max-restarts", str(kills + 3), "--backoff", "0", "--", *torchrun(killed, killed + ".pt")]

    def tags() -> set[str]:
        return {os.path.basename(p) for p in glob.glob(os.path.join(killed, "global_step*"))}

    t0 = time.monotonic()
    res = supervised(
        cmd,
        os.path.join(killed, EVENTS_FILE),
        tags,
        env=env,
        kills=kills,
        timeout=1800,
        log_path=os.path.join(work, "ds-killed.log"),
        slow_steps=False,
    )
    check(
        res["rc"] == 0 and res["kills"] == kills,
        f"supervised run finished after {res['kills']} SIGKILLs (exit {res['rc']}, {time.monotonic() - t0:.0f}s)",
        failures,
    )
    resumed = [(s.get("resume_step"), os.path.basename(s.get("resume_from") or "-")) for s in res["starts"]]
    say(f"  starts resumed from: {resumed}")
    check(all(step for step, _ in resumed[1:]), "every restart resumed from a checkpoint, none from scratch", failures)
    if not (os.path.exists(straight + ".pt") and os.path.exists(killed + ".pt")):
        check(False, "both runs wrote their final state", failures)
        return
    a, b = (torch.load(p, map_location="cpu", weights_only=False) for p in (straight + ".pt", killed + ".pt"))
    check(same(a["params"], b["params"]), "parameters bitwise", failures)
    check(same(a["optim"], b["optim"]), "optimizer state (ZeRO-1 partition, rank 0) bitwise", failures)


RECIPES = {"llamafactory": llamafactory, "deepspeed": deepspeed}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(RECIPES), action="append")
    parser.add_argument("--work", default=None, help="working directory (default: a fresh temporary one, kept)")
    parser.add_argument("--kills", type=int, default=3)
    args = parser.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="rk-frameworks-")
    if os.path.exists(work) and args.work:
        shutil.rmtree(work)
    os.makedirs(work, exist_ok=True)
    say(f"working in {work}")
    failures: list[str] = []
    for name in args.only or list(RECIPES):
        os.makedirs(os.path.join(work, name), exist_ok=True)
        RECIPES[name](os.path.join(work, name), args.kills, failures)
    say("PASSED" if not failures else f"FAILED: {len(failures)} check(s): {'; '.join(failures)}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
