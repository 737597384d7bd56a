"""Real Lightning (CPU): the example under `resumekit run` with SIGKILLs ends bitwise equal to a straight run; a
truncated last.ckpt with ckpt_path="last"; SIGTERM saves and exits 0; sidecars; allow-listed loading; evidence."""

from __future__ import annotations

import decimal
import glob
import importlib.util
import json
import os
import pathlib
import runpy
import signal
import subprocess
import sys
import time

import pytest

lightning = pytest.importorskip("lightning")
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

import resumekit  # noqa: E402
from resumekit.errors import CorruptCheckpointError  # noqa: E402
from resumekit.events import EVENTS_FILE, EventTail, read_events  # noqa: E402
from resumekit.integrations.lightning import ResumekitCallback, resume_path, safe_load  # noqa: E402
from resumekit.layouts import get_layout  # noqa: E402
from resumekit.layouts.checks import sidecar_name  # noqa: E402
from resumekit.storage import open_storage  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "lightning_train.py")
_ENV = ("RESUMEKIT_RESUME_FROM", "RESUMEKIT_DIR", "RESUMEKIT_HEARTBEAT", "RESUMEKIT_EVENTS", "RESUMEKIT_RESTART_COUNT")


@pytest.fixture(autouse=True)
def _no_supervisor_env(monkeypatch):
    for k in _ENV + ("RESUMEKIT_RESUME",):
        monkeypatch.delenv(k, raising=False)


def _example_module():
    spec = importlib.util.spec_from_file_location("lightning_train_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_example_here(monkeypatch, *args: str) -> None:
    """The example as a script, in this process (one Lightning import for the whole module's tests)."""
    monkeypatch.setattr(sys, "argv", [EXAMPLE, *args])
    runpy.run_path(EXAMPLE, run_name="__main__")


def supervise(root: str, *example_args: str, layout_dir: str | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in _ENV}
    cmd = [sys.executable, "-m", "resumekit", "run", "--dir", layout_dir or root, "--layout", "lightning"]
    cmd += ["--max-restarts", "6", "--backoff", "0", "--", sys.executable, EXAMPLE, "--root", root, *example_args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def ckpt_of_step(root: str, step: int) -> str:
    found = sorted(glob.glob(os.path.join(root, "**", f"*step={step}.ckpt"), recursive=True))
    assert found, f"no step={step} checkpoint under {root}"
    return found[-1]


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_example_under_run_with_sigkills_is_bitwise_equal_to_a_straight_run(tmp_path, monkeypatch):
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    run_example_here(monkeypatch, "--root", straight, "--max-steps", "60")

    proc = supervise(killed, "--max-steps", "60")
    tail = EventTail(os.path.join(killed, EVENTS_FILE))
    attempts, kill_after = [], [1, 2, 1]  # kill each attempt once it has saved this many checkpoints
    deadline = time.monotonic() + 400
    while proc.poll() is None:
        assert time.monotonic() < deadline, "supervised run did not finish"
        for ev in tail.read():
            if ev.get("source") != "job":
                continue
            if ev["event"] == "restore":
                attempts.append({"pid": ev["pid"], "step": ev["step"], "path": ev["path"], "saves": [], "killed": 0})
            elif ev["event"] == "save" and attempts and attempts[-1]["pid"] == ev["pid"]:
                attempts[-1]["saves"].append(ev["step"])
        kills = sum(a["killed"] for a in attempts)
        cur = attempts[-1] if attempts else None
        if cur and not cur["killed"] and kills < len(kill_after) and len(cur["saves"]) >= kill_after[kills]:
            os.kill(cur["pid"], signal.SIGKILL)
            cur["killed"] = 1
        time.sleep(0.02)
    out = proc.stdout.read()
    assert proc.returncode == 0, out
    assert [a["killed"] for a in attempts] == [1, 1, 1, 0], (attempts, out)

    # Each start resumed from the newest checkpoint written before it (a kill mid-save may add a newer one).
    assert (attempts[0]["step"], attempts[0]["path"]) == (0, None)
    for i, a in enumerate(attempts[1:], start=1):
        newest = max(s for b in attempts[:i] for s in b["saves"])
        assert 60 > a["step"] >= newest > 0 and a["path"].endswith(".ckpt"), attempts
    layout = get_layout("lightning")
    best, skipped = layout.latest(open_storage(killed, create=False), full=True)
    assert best.step == 60 and not skipped

    a, b = safe_load(ckpt_of_step(straight, 60)), safe_load(ckpt_of_step(killed, 60))
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        assert same(a[key], b[key]), key
    assert same(a["loops"]["fit_loop"]["state_dict"], b["loops"]["fit_loop"]["state_dict"])


def test_truncated_last_ckpt_with_ckpt_path_last_is_moved_aside(tmp_path, monkeypatch):
    root = str(tmp_path / "run")
    ckdir = os.path.join(root, "ckpts")
    run_example_here(monkeypatch, "--root", root, "--ckpt-dir", ckdir, "--max-steps", "10")
    last = os.path.join(ckdir, "last.ckpt")
    assert safe_load(last)["global_step"] == 10  # and epoch=0-step=10.ckpt, the same step
    cut = os.path.getsize(last) // 2
    with open(last, "r+b") as f:
        f.truncate(cut)

    proc = supervise(root, "--ckpt-dir", ckdir, "--resume", "last", "--max-steps", "20", layout_dir=ckdir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    job = [e for e in read_events(os.path.join(ckdir, EVENTS_FILE)) if e.get("source") == "job"]
    restored = [e for e in job if e["event"] == "restore"]
    assert [e["step"] for e in restored] == [10], (restored, out)  # the previous valid one, not from scratch
    assert safe_load(ckpt_of_step(ckdir, 20))["global_step"] == 20
    # Moved aside, never deleted.
    kept = [p for p in glob.glob(os.path.join(ckdir, "**", "*last*"), recursive=True) if os.path.isfile(p)]
    assert any(p != last and os.path.getsize(p) == cut for p in kept), kept


# --- in-process: SIGTERM, sidecars, loading, evidence -------------------------------------------------------------
class _SigtermAt(lightning.pytorch.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGTERM)


class _WithPath(lightning.pytorch.LightningModule):
    def __init__(self, data_dir=pathlib.Path("/data/x"), lr=0.05):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch, i):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def _loader():
    data = torch.utils.data.TensorDataset(torch.randn(32, 4, generator=torch.Generator().manual_seed(0)))
    return resumekit.ResumableDataLoader(data, batch_size=4, seed=0)


def _trainer(root, max_steps, callbacks, **kw):
    return lightning.pytorch.Trainer(
        default_root_dir=root,
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kw,
    )


def test_sigterm_saves_at_the_next_step_and_exits_0(tmp_path, monkeypatch):
    events = str(tmp_path / "events.jsonl")
    monkeypatch.setenv("RESUMEKIT_EVENTS", events)
    monkeypatch.setenv("RESUMEKIT_HEARTBEAT", str(tmp_path / "hb"))
    root = str(tmp_path / "run")
    cb = ResumekitCallback()
    ckpt = ModelCheckpoint(every_n_train_steps=5, save_top_k=-1, save_last=True)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exc:
        _trainer(root, 50, [_SigtermAt(7), cb, ckpt]).fit(_WithPath(), _loader())
    assert exc.value.code == 0
    assert signal.getsignal(signal.SIGTERM) is before
    assert cb.preempted_at == 7
    names = sorted(n for n in os.listdir(os.path.join(root, "checkpoints")) if n.endswith(".ckpt"))
    assert names == ["epoch=0-step=5.ckpt", "epoch=0-step=7.ckpt", "last.ckpt"]
    layout = get_layout("lightning")
    best, _ = layout.latest(open_storage(root, create=False), full=True)
    assert best.step == 7 and best.metadata["verified_by"] == "sidecar manifest"
    timing = ("job_init", "first_step")  # the restart-latency marks (test_integration_report.py)
    kinds = [(e["event"], e["step"]) for e in read_events(events) if e["event"] not in timing]
    assert kinds[0] == ("restore", 0) and ("save", 7) in kinds and kinds[-1] == ("preempted", 7)
    assert json.load(open(tmp_path / "hb"))["step"] == 7


def test_allow_listed_load_verification_and_restore_event(tmp_path, monkeypatch):
    root = str(tmp_path / "run")
    _trainer(root, 4, [ResumekitCallback(), ModelCheckpoint(every_n_train_steps=2, save_top_k=-1)]).fit(
        _WithPath(), _loader()
    )
    path = os.path.join(root, "checkpoints", "epoch=0-step=4.ckpt")
    assert os.path.exists(sidecar_name(path))
    assert resume_path(root) == path  # outside the supervisor: the newest valid file under the root
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 6):
        # Lightning alone refuses the Path hyperparameter it wrote itself (torch's weights_only default) ...
        with pytest.raises(Exception, match=r"weights_only|WeightsUnpickler|PosixPath"):
            _trainer(root, 6, []).fit(_WithPath(), _loader(), ckpt_path=path)
    # ... and loads it through the callback's allow-list, reporting what it loaded.
    events = str(tmp_path / "events.jsonl")
    monkeypatch.setenv("RESUMEKIT_EVENTS", events)
    t = _trainer(root, 6, [ResumekitCallback()])
    t.fit(_WithPath(), _loader(), ckpt_path=path)
    assert t.global_step == 6
    first = next(e for e in read_events(events) if e["event"] != "job_init")
    assert (first["event"], first["step"], first["path"]) == ("restore", 4, path)

    # A type outside the allow-list: refused before unpickling, naming the type.
    ck = torch.load(path, weights_only=False)
    ck["hyper_parameters"]["bad"] = decimal.Decimal(1)
    bad = os.path.join(root, "checkpoints", "epoch=0-step=3.ckpt")
    torch.save(ck, bad)
    with pytest.raises(CorruptCheckpointError, match=r"decimal\.Decimal"):
        _trainer(root, 6, [ResumekitCallback()]).fit(_WithPath(), _loader(), ckpt_path=bad)
    # A file damaged after its sidecar was written: refused by checksum.
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    st = os.stat(path)
    open(path, "wb").write(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        _trainer(root, 6, [ResumekitCallback()]).fit(_WithPath(), _loader(), ckpt_path=path)


def test_resume_path_under_the_supervisor(monkeypatch):
    monkeypatch.setenv("RESUMEKIT_HEARTBEAT", "/tmp/hb")
    assert resume_path("/nonexistent") is None  # supervised, nothing valid: from scratch, never "last"
    monkeypatch.setenv("RESUMEKIT_RESUME_FROM", "/ck/epoch=0-step=5.ckpt")
    assert resume_path() == "/ck/epoch=0-step=5.ckpt"
    monkeypatch.delenv("RESUMEKIT_HEARTBEAT")
    monkeypatch.delenv("RESUMEKIT_RESUME_FROM")
    assert resume_path() == "last"


def test_sidecar_after_an_async_save(tmp_path):
    """With AsyncCheckpointIO the manifest is written in its thread, after the bytes, not when the save is queued."""
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    root = str(tmp_path / "run")
    ckpt = ModelCheckpoint(every_n_train_steps=2, save_top_k=-1)
    _trainer(root, 4, [ResumekitCallback(), ckpt], plugins=[AsyncCheckpointIO()]).fit(_WithPath(), _loader())
    layout = get_layout("lightning")
    infos = layout.list(open_storage(root, create=False))
    checked = [layout.validate(open_storage(root, create=False), i, full=True) for i in infos]
    assert sorted((c.step, c.valid, c.metadata.get("verified_by")) for c in checked) == [
        (2, True, "sidecar manifest"),
        (4, True, "sidecar manifest"),
    ]
