"""The file checks under resumekit.layouts.checks and the listing/validate plumbing of layouts.base, directly.

The layout suites exercise these through whole checkpoints; here each function answers on its own inputs, so a
change in one shows up next to its module's name.
"""

import json
import os
import re
import struct

import pytest

from resumekit.errors import CorruptCheckpointError
from resumekit.format import FileEntry, Manifest
from resumekit.layouts.base import CheckpointInfo, Layout, match_step, run_check, step_entries
from resumekit.layouts.checks import (
    FOREIGN_MANIFEST,
    check_dcp_dir,
    check_file_nonempty,
    check_foreign_manifest,
    check_safetensors,
    describe_ranks,
    files_of,
    grid_missing,
    join,
    missing_ranks,
    newest_mtime,
    read_json,
    sum_sizes,
)
from resumekit.storage import Entry, LocalStorage
from resumekit.verify import hash_file


def _write(path, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _safetensors(header: dict, data_size: int) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(data_size)


# --- ranks ------------------------------------------------------------------------------------------------------


def test_missing_ranks_against_max_or_expected():
    assert missing_ranks({0, 1, 3}) == [2]
    assert missing_ranks({0, 1}, 4) == [2, 3]
    assert missing_ranks(set()) == []
    assert missing_ranks(set(), 2) == [0, 1]


def test_describe_ranks_counts_the_rest_beyond_the_limit():
    assert describe_ranks([1, 2, 3]) == "1, 2, 3"
    assert describe_ranks(list(range(10))) == "0, 1, 2, 3, 4, 5, 6, 7 and 2 more"
    assert describe_ranks([4, 5, 6], limit=2) == "4, 5 and 1 more"
    assert describe_ranks([]) == ""


def test_grid_missing_finds_holes_in_row_major_order():
    assert grid_missing(set()) == []
    assert grid_missing({(0,), (1,), (2,)}) == []
    assert grid_missing({(0,), (2,)}) == [(1,)]
    full = {(t, p) for t in range(2) for p in range(3)}
    assert grid_missing(full) == []
    assert grid_missing(full - {(1, 0), (0, 2)}) == [(0, 2), (1, 0)]
    # the grid is spanned by the largest index on each axis: a lone far corner implies every point before it
    assert grid_missing({(1, 1, 1)}) == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0)]


# --- common -----------------------------------------------------------------------------------------------------


def test_join_sum_sizes_and_newest_mtime():
    assert join("a", "", "b") == "a/b" and join("", "x") == "x" and join() == ""
    files = {"a": Entry("a", False, 10, 5.0), "d": Entry("d", True, 4096, 9.0), "b": Entry("b", False, 3, None)}
    assert sum_sizes(files) == 13
    assert newest_mtime(files, "a", "b", "missing") == 5.0
    assert newest_mtime(files, "d", "a") == 9.0
    assert newest_mtime(files, "b") is None and newest_mtime(files) is None


def test_files_of_lists_children_or_nothing(tmp_path):
    _write(str(tmp_path / "c" / "x.bin"), b"123")
    st = LocalStorage(str(tmp_path), create=False)
    got = files_of(st, "c")
    assert list(got) == ["x.bin"] and got["x.bin"].size == 3 and not got["x.bin"].is_dir
    assert files_of(st, "nope") == {}


# --- safetensors ------------------------------------------------------------------------------------------------


def test_check_safetensors_returns_the_tensors_in_file_order(tmp_path):
    header = {
        "__metadata__": {"format": "pt"},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]},
        "a": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]},
    }
    _write(str(tmp_path / "m.safetensors"), _safetensors(header, 24))
    st = LocalStorage(str(tmp_path), create=False)
    spans = check_safetensors(st, "m.safetensors", "ck", full=True)
    assert [(s.name, s.dtype, s.shape, s.begin, s.end) for s in spans] == [
        ("a", "I64", (2,), 0, 16),
        ("b", "F32", (2,), 16, 24),
    ]


def test_check_safetensors_quick_passes_overlapping_ranges_that_full_rejects(tmp_path):
    # Both tensors claim bytes 0..8 of 8: the data ends where the file ends, so only the full check sees it.
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    }
    _write(str(tmp_path / "m.safetensors"), _safetensors(header, 8))
    st = LocalStorage(str(tmp_path), create=False)
    assert len(check_safetensors(st, "m.safetensors", "ck", full=False)) == 2
    with pytest.raises(CorruptCheckpointError) as e:
        check_safetensors(st, "m.safetensors", "ck", full=True)
    assert e.value.path == "ck"
    assert e.value.reason == (
        "m.safetensors: tensor 'b' starts at byte 0, expected 8 (overlapping or missing tensor data)"
    )


def test_check_safetensors_full_compares_bytes_with_dtype_and_shape(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    _write(str(tmp_path / "m.safetensors"), _safetensors(header, 8))
    st = LocalStorage(str(tmp_path), create=False)
    check_safetensors(st, "m.safetensors", "ck", full=False)
    with pytest.raises(
        CorruptCheckpointError,
        match=r"^ck: shown\.st: tensor 'w' has 8 bytes, its dtype and "
        r"shape need 12$",
    ):
        check_safetensors(st, "m.safetensors", "ck", full=True, shown="shown.st")


def test_check_safetensors_missing_file_and_given_size(tmp_path):
    st = LocalStorage(str(tmp_path), create=False)
    with pytest.raises(CorruptCheckpointError, match=r"^ck: gone\.safetensors is missing$"):
        check_safetensors(st, "gone.safetensors", "ck", full=False)
    header = {"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}
    data = _safetensors(header, 4)
    _write(str(tmp_path / "m.safetensors"), data)
    # a size from the caller's listing is believed (no stat): one that disagrees makes the data not fit
    with pytest.raises(CorruptCheckpointError, match="header describes 4 bytes of tensor data but only 2 follow"):
        check_safetensors(st, "m.safetensors", "ck", full=False, size=len(data) - 2)


# --- JSON, marker files, DCP directories ---------------------------------------------------------------------


def test_read_json_and_check_file_nonempty(tmp_path):
    _write(str(tmp_path / "ok.json"), b'{"a": 1}')
    _write(str(tmp_path / "bad.json"), b'{"a": ')
    st = LocalStorage(str(tmp_path), create=False)
    assert read_json(st, "ok.json", "ck") == {"a": 1}
    with pytest.raises(
        CorruptCheckpointError,
        match=r"^ck: bad\.json is not valid JSON \(truncated or still being "
        r"written\)$",
    ):
        read_json(st, "bad.json", "ck")
    with pytest.raises(CorruptCheckpointError, match=r"^ck: S\.json is missing \(written last\)$"):
        read_json(st, "none.json", "ck", "(written last)", shown="S.json")
    files = {"e": Entry("e", False, 0), "d": Entry("d", True), "f": Entry("f", False, 5)}
    check_file_nonempty(files, "f", "ck", "f")
    with pytest.raises(CorruptCheckpointError, match=r"^ck: e is empty \(truncated or still being written\)$"):
        check_file_nonempty(files, "e", "ck", "e")
    with pytest.raises(CorruptCheckpointError, match=r"^ck: d is missing$"):
        check_file_nonempty(files, "d", "ck", "d")
    with pytest.raises(CorruptCheckpointError, match=r"^ck: x is missing \(why\)$"):
        check_file_nonempty(files, "x", "ck", "x", "(why)")


def test_check_dcp_dir(tmp_path):
    st = LocalStorage(str(tmp_path), create=False)
    with pytest.raises(CorruptCheckpointError, match=r"^ck: opt is missing or empty$"):
        check_dcp_dir(st, "opt", "ck")
    _write(str(tmp_path / "opt" / "__0_0.distcp"), b"x")
    with pytest.raises(CorruptCheckpointError, match=r"^ck: opt/\.metadata is missing \(torch\.distributed"):
        check_dcp_dir(st, "opt", "ck")
    _write(str(tmp_path / "opt" / ".metadata"), b"m")
    assert set(check_dcp_dir(st, "opt", "ck")) == {"__0_0.distcp", ".metadata"}
    os.unlink(str(tmp_path / "opt" / "__0_0.distcp"))
    with pytest.raises(CorruptCheckpointError, match=r"^ck: \*\.distcp data files are missing$"):
        check_dcp_dir(st, "opt", "ck", shown="")


# --- resumekit manifests in foreign checkpoints -----------------------------------------------------------------


def test_check_foreign_manifest_reports_for_the_checkpoint(tmp_path):
    _write(str(tmp_path / "checkpoint-3" / "w.bin"), b"weights")
    st = LocalStorage(str(tmp_path), create=False)
    files = {"w.bin": FileEntry(*hash_file(st, "checkpoint-3/w.bin"))}
    _write(str(tmp_path / "checkpoint-3" / FOREIGN_MANIFEST), Manifest(step=3, files=files).to_json())
    assert check_foreign_manifest(st, "checkpoint-3", "CK", full=True, step=3).step == 3
    with pytest.raises(
        CorruptCheckpointError,
        match=r"^CK: resumekit\.manifest\.json says step 3 but the "
        r"directory is step 4$",
    ):
        check_foreign_manifest(st, "checkpoint-3", "CK", full=False, step=4)
    _write(str(tmp_path / "checkpoint-3" / "w.bin"), b"weightz")
    check_foreign_manifest(st, "checkpoint-3", "CK", full=False, step=3)  # sizes still agree
    with pytest.raises(CorruptCheckpointError, match=r"^CK: w\.bin checksum mismatch"):
        check_foreign_manifest(st, "checkpoint-3", "CK", full=True, step=3)


# --- layouts.base: listing and validate plumbing ---------------------------------------------------------------


def _step(name):
    return int(name[4:]) if name.startswith("run-") and name[4:].isdigit() else None


class _Toy(Layout):
    name = "toy"

    def detect(self, storage):
        return bool(step_entries(storage, _step))

    def list(self, storage):
        return self.list_matching(storage, _step)

    def validate(self, storage, info, full=True):
        return run_check(info, lambda: None)


def test_step_entries_and_list_matching(tmp_path):
    for d in ("run-10", "run-9", "run-x", ".run-11"):
        os.makedirs(tmp_path / d)
    _write(str(tmp_path / "run-12"), b"abc")
    st = LocalStorage(str(tmp_path), create=False)
    assert sorted((s, e.name) for s, e in step_entries(st, _step)) == [(9, "run-9"), (10, "run-10")]
    assert [(s, e.name) for s, e in step_entries(st, _step, dirs=False)] == [(12, "run-12")]
    lay = _Toy()
    assert lay.detect(st)
    infos = sorted(lay.list(st), key=lambda i: i.step)
    assert [(i.step, i.name, i.layout, i.valid, i.size, i.time) for i in infos] == [
        (9, "run-9", "toy", None, 0, None),
        (10, "run-10", "toy", None, 0, None),
    ]
    assert infos[0].path == st.join("run-9")
    (f,) = lay.list_matching(st, _step, dirs=False)
    assert (f.step, f.size) == (12, 3) and f.time == os.path.getmtime(tmp_path / "run-12")
    assert not _Toy().detect(LocalStorage(str(tmp_path / "run-9"), create=False))


def test_match_step_reads_the_step_group_as_an_integer():
    assert match_step(re.compile(r"^ckpt_(\d+)$"), "ckpt_0010") == 10
    assert match_step(re.compile(r"^ckpt_(\d+)$"), "x_ckpt_1") is None  # matched from the start only
    assert match_step(re.compile(r"^(?P<stem>\D*)(?P<step>\d+)\.pt$"), "model_7.pt") == 7


def test_run_check_turns_outcomes_into_validated_infos():
    info = CheckpointInfo(step=1, name="n", path="/p/n", layout="toy", reason="old")

    def corrupt():
        raise CorruptCheckpointError("/p/n", "x.bin is missing")

    def unreadable():
        raise PermissionError(13, "Permission denied")

    ok = run_check(info, lambda: {"size": 7, "metadata": {"k": 1}})
    assert (ok.valid, ok.reason, ok.size, ok.metadata) == (True, "", 7, {"k": 1})
    assert run_check(info, lambda: None).valid is True
    bad = run_check(info, corrupt)
    assert (bad.valid, bad.reason) == (False, "x.bin is missing")
    denied = run_check(info, unreadable)
    assert (denied.valid, denied.reason) == (False, "unreadable: [Errno 13] Permission denied")
    assert info.valid is None and info.reason == "old"  # the input is never modified
