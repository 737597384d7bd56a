"""Attack: a kill while a step is saved again (issue 12, point 5).

Re-saving an existing step used to move the old copy aside (local) or delete it (S3) before the new one committed;
a kill in between left no valid copy, and the moved-aside folder was later collected as garbage. The new copy now
commits under a protected name first (or swaps atomically with ``RENAME_EXCHANGE``) and replaces the old one only
then; a kill at any point leaves a valid copy, which the next writer puts in place.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from attack_helpers import REPO
from click.testing import CliRunner

from resumekit.cli import main
from resumekit.format import KEEP_PREFIX, MANIFEST, FileEntry, Manifest, new_hasher, step_dirname
from resumekit.layouts.native import NativeLayout
from resumekit.storage import open_storage
from resumekit.storage.resave import recover_resaves


def commit_step(storage, step: int, payload: bytes) -> str:
    """A valid native checkpoint holding one file, written through the storage's own commit (torch-free)."""
    txn = storage.begin(step_dirname(step))
    with txn.open_write("payload.bin") as f:
        f.write(payload)
    h = new_hasher()
    h.update(payload)
    return txn.commit(Manifest(step=step, files={"payload.bin": FileEntry(len(payload), h.hexdigest())}).to_json())


def payload_of(storage, name: str) -> bytes:
    info = NativeLayout().validate(storage, NativeLayout().candidate(storage, name, 4), full=True)
    assert info.valid, info.reason
    return storage.read_bytes(f"{name}/payload.bin")


COMMIT = """
    import sys
    sys.path.insert(0, {tests!r})
    from resumekit.storage import open_storage
    from test_resave_window import commit_step
    commit_step(open_storage({d!r}), 4, b"new" * 1000)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "fault",
    ["no-exchange,resave-keep-committed", "no-exchange,resave-old-removed", "resave-exchanged"],
    ids=["keep-committed", "between-the-renames", "after-the-exchange"],
)
def test_a_kill_during_a_resave_leaves_a_valid_copy_that_the_next_writer_puts_in_place(tmp_path, fault):
    d = str(tmp_path)
    st = open_storage(d)
    commit_step(st, 4, b"old" * 1000)
    code = textwrap.dedent(COMMIT.format(tests=os.path.dirname(__file__), d=d))
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "src"), RESUMEKIT_TEST_FAULT=fault)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == -9, r.stderr  # SIGKILLed at the fault point
    names = sorted(os.listdir(d))
    copies = [n for n in names if n == step_dirname(4) or n.startswith(KEEP_PREFIX)]
    assert copies, names
    assert any(NativeLayout().validate(st, NativeLayout().candidate(st, n, 4)).valid for n in copies), names
    # gc is a writer: it takes the lease, puts the new copy in place, and never deletes the protected one.
    res = CliRunner().invoke(main, ["gc", d, "--tmp-age", "0", "--keep-last", "1"])
    assert res.exit_code == 0, res.output
    assert [n for n in os.listdir(d) if not n.startswith(".tmp-")] == [step_dirname(4)]
    assert payload_of(st, step_dirname(4)) == b"new" * 1000
    assert not [n for n in os.listdir(d) if n.startswith(".")]


def test_the_manager_finishes_an_interrupted_resave_before_restoring(tmp_path, monkeypatch):
    from conftest import make_training, train_steps
    from resumekit import CheckpointManager
    from resumekit.storage import resave

    class Killed(BaseException):
        pass

    def die(name):
        if name == "resave-old-removed":
            raise Killed(name)

    a = make_training()
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(4, a)
    mgr.close()
    b = make_training(seed=3)
    train_steps(b, 4)
    mgr = CheckpointManager(str(tmp_path), resume="never")  # a fresh run: step 4 on disk is not its own
    assert mgr.restore(b) == 0
    monkeypatch.setattr(resave, "_FAULTS", frozenset({"no-exchange"}))
    monkeypatch.setattr(resave, "fault_point", die)
    with pytest.raises(Killed):
        mgr.save(4, b)
    monkeypatch.undo()
    assert not (tmp_path / step_dirname(4)).exists()  # between the two renames: only the keep copy is left
    mgr.close()
    c = make_training(seed=7)
    mgr = CheckpointManager(str(tmp_path))
    assert mgr.restore(c) == 4
    from conftest import assert_same, state_tensors

    assert_same(state_tensors(b)["model"], state_tensors(c)["model"])
    mgr.close()


@pytest.mark.timeout(120)
def test_s3_resave_commits_the_new_copy_before_the_old_one_goes(s3_bucket, monkeypatch):
    from resumekit.storage import resave
    from resumekit.storage.remote import RemoteStorage

    st = RemoteStorage(s3_bucket.uri("run"))
    commit_step(st, 4, b"old" * 1000)
    calls = []
    real = st._call

    async def spy(what, method, **kw):
        calls.append((method, kw.get("Key") or ""))
        return await real(what, method, **kw)

    st._call = spy  # type: ignore[method-assign]

    class Killed(BaseException):
        pass

    def die(name):
        if name == "resave-old-removed":
            raise Killed(name)

    monkeypatch.setattr(resave, "fault_point", die)
    with pytest.raises(Killed):
        commit_step(st, 4, b"new" * 1000)
    monkeypatch.undo()
    keep_manifest = next(
        i for i, (m, k) in enumerate(calls) if m == "put_object" and KEEP_PREFIX in k and k.endswith(MANIFEST)
    )
    old_manifest_gone = calls.index(("delete_object", f"run/{step_dirname(4)}/{MANIFEST}"))
    assert keep_manifest < old_manifest_gone  # the new copy was whole before the old one went
    assert not st.exists(f"{step_dirname(4)}/{MANIFEST}")
    assert recover_resaves(st) == [step_dirname(4)]
    assert payload_of(st, step_dirname(4)) == b"new" * 1000
    assert [e.name for e in st.listdir("")] == [step_dirname(4)]
