"""The ground and verification modules: units, the JSONL tail reader, manifest and safetensors checks."""

from __future__ import annotations

import errno
import hashlib
import io
import json

import pytest

from resumekit.errors import ConfigError, CorruptCheckpointError
from resumekit.events import EventLog, EventTail, read_events
from resumekit.format import FileEntry, Manifest, new_hasher
from resumekit.storage import open_parent, open_storage
from resumekit.units import errno_hint, format_bytes, one_line, parse_size
from resumekit.verify import check_checkpoint, hash_file, read_safetensors_header, read_verified


# ----------------------------------------------------------------------------------------------------- units
@pytest.mark.parametrize(
    "n,sep,missing,want",
    [
        (None, " ", "?", "?"),
        (0, " ", "?", "0 B"),
        (1536, " ", "?", "1.5 KiB"),
        (3 << 30, "", "-", "3.0GiB"),
        (5 << 50, " ", "?", "5120.0 TiB"),
    ],
)
def test_format_bytes(n, sep, missing, want):
    assert format_bytes(n, sep=sep, missing=missing) == want


def test_parse_size_units_and_errors():
    assert parse_size("500M") == 500 << 20
    assert parse_size("1GB") == 10**9
    assert parse_size("2.5G") == int(2.5 * (1 << 30))
    with pytest.raises(ConfigError, match="cannot read size 'lots'"):
        parse_size("lots")


def test_one_line_folds_and_cuts():
    assert one_line(ValueError("a\n  b")) == "a b"
    assert one_line(KeyError()) == "KeyError"
    long = one_line(RuntimeError("x" * 400))
    assert len(long) == 300 and long.endswith("...")


def test_errno_hint():
    assert errno_hint(errno.ENOSPC) == "the disk is full: free space or lower keep_last"
    assert errno_hint(None, "fallback") == "fallback"


# ----------------------------------------------------------------------------------------------- event tail
def test_event_tail_reads_only_new_whole_records(tmp_path):
    path = str(tmp_path / "events.jsonl")
    log = EventLog(path, "test")
    log.emit("a", step=1)
    tail = EventTail(path, EventTail.size_of(path))
    assert tail.read() == []
    log.emit("b", step=2)
    with open(path, "ab") as f:
        f.write(b'{"event": "torn"')  # a writer killed mid-line
    assert [e["event"] for e in tail.read()] == ["b"]
    with open(path, "ab") as f:
        f.write(b', "step": 3}\nnot json\n')
    assert [e["event"] for e in tail.read()] == ["torn"]  # completed on the next read; junk skipped
    assert [e["event"] for e in read_events(path)] == ["a", "b", "torn"]


def test_event_tail_final_takes_an_unterminated_last_record(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2}')
    assert [e["step"] for e in EventTail(str(path)).read(final=True)] == [1, 2]
    assert EventTail(str(tmp_path / "missing")).read() == []


# ------------------------------------------------------------------------------------------------- verify
def _checkpoint(root, name="step_000000005"):
    st = open_storage(str(root))
    (root / name).mkdir()
    (root / name / "a.bin").write_bytes(b"hello")
    h = new_hasher()
    h.update(b"hello")
    man = Manifest(step=5, files={"a.bin": FileEntry(5, h.hexdigest())})
    (root / name / "manifest.json").write_bytes(man.to_json())
    return st, name, man


def test_check_checkpoint_quick_and_full(tmp_path):
    st, name, man = _checkpoint(tmp_path)
    assert check_checkpoint(st, name).step == 5
    (tmp_path / name / "a.bin").write_bytes(b"hellO")  # same size, other bytes
    assert check_checkpoint(st, name, full=False).step == 5
    with pytest.raises(CorruptCheckpointError, match=r"a\.bin checksum mismatch"):
        check_checkpoint(st, name, full=True)
    with pytest.raises(CorruptCheckpointError, match="does not match the manifest"):
        read_verified(st, name, "a.bin", man)


def test_hash_file_takes_another_hasher(tmp_path):
    st, name, _ = _checkpoint(tmp_path)
    assert hash_file(st, f"{name}/a.bin", hashlib.sha256) == (5, hashlib.sha256(b"hello").hexdigest())


def test_open_parent_splits_a_checkpoint_path(tmp_path):
    st, name = open_parent(str(tmp_path / "run" / "step_000000001") + "/")
    assert (st.uri, name) == (str(tmp_path / "run"), "step_000000001")


def _safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def test_safetensors_header_quick_and_full():
    good = _safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8))
    spans, start = read_safetensors_header(io.BytesIO(good), len(good), "ckpt", "m.safetensors")
    assert [(s.name, s.shape, s.begin, s.end) for s in spans] == [("w", (2,), 0, 8)] and start == len(good) - 8
    # Overlapping ranges whose end still matches the file: quick accepts, full refuses.
    overlap = _safetensors(
        {
            "a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
            "b": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]},
        },
        bytes(8),
    )
    read_safetensors_header(io.BytesIO(overlap), len(overlap), "ckpt", "m.safetensors", full=False)
    with pytest.raises(CorruptCheckpointError, match="overlapping or missing tensor data"):
        read_safetensors_header(io.BytesIO(overlap), len(overlap), "ckpt", "m.safetensors", full=True)
    with pytest.raises(CorruptCheckpointError, match=r"m.safetensors is truncated: 3 bytes, shorter than the 8-byte"):
        read_safetensors_header(io.BytesIO(b"abc"), 3, "ckpt", "m.safetensors")


# ---------------------------------------------------------------------------------------- hashed-file records
def test_record_hashed_keeps_only_whole_unchanged_local_xxh3_passes(tmp_path, monkeypatch):
    import os

    from resumekit import verify
    from resumekit.verify import FileIdentity, record_hashed

    st = open_storage(str(tmp_path))
    st.write_bytes_atomic("a.bin", b"x" * 1000)
    st.write_bytes_atomic("b.bin", b"y" * 1000)
    hash_file(st, "a.bin")  # outside the block: nothing is recorded anywhere
    with record_hashed() as seen:
        size, digest = hash_file(st, "a.bin")
        hash_file(st, "b.bin", hashlib.sha256)  # another hash is not the manifest's checksum: not recorded
    assert list(seen) == [st.join("a.bin")]
    rec = seen[st.join("a.bin")]
    assert rec.digest == digest and rec.identity == FileIdentity.of(os.stat(st.join("a.bin"))) and size == 1000

    # A file written to while it is hashed is not recorded (its identity changed between the first and last read).
    monkeypatch.setattr(verify, "HASH_CHUNK", 100)  # hash_file reads it from its module at each call
    real_open = st.open_read

    class Growing(io.RawIOBase):  # the file grows after its first chunk was read
        def __init__(self, rel):
            self.f, self.rel, self.reads = real_open(rel), rel, 0

        def fileno(self):
            return self.f.fileno()

        def read(self, n=-1):
            self.reads += 1
            if self.reads == 2:
                with open(st.join(self.rel), "ab") as g:
                    g.write(b"z")
            return self.f.read(n)

        def close(self):
            self.f.close()
            super().close()

    def open_and_append(rel):
        return Growing(rel)

    monkeypatch.setattr(st, "open_read", open_and_append)
    with record_hashed() as seen:
        hash_file(st, "a.bin")
    assert seen == {}
