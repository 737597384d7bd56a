import json

import pytest

from resumekit.errors import CorruptCheckpointError, UnsafePathError
from resumekit.format import FileEntry, Manifest, parse_step_dirname, step_dirname, validate_relpath


def test_step_names_are_integers():
    assert parse_step_dirname(step_dirname(12)) == 12
    assert parse_step_dirname("step_10000000000") == 10000000000
    assert parse_step_dirname(".tmp-step_000000001-abc") is None
    assert parse_step_dirname("step_12a") is None
    names = [step_dirname(s) for s in (9, 10, 100)]
    assert sorted(names, key=parse_step_dirname) == names


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../b", "a//b", "", "C:/x", "./a"])
def test_unsafe_paths_rejected(bad):
    with pytest.raises(UnsafePathError):
        validate_relpath(bad, "ckpt")


def test_manifest_roundtrip():
    m = Manifest(step=5, files={"a.bin": FileEntry(3, "abc")}, metadata={"loss": 0.5})
    back = Manifest.from_json(m.to_json(), "x")
    assert back.step == 5 and back.files["a.bin"].size == 3 and back.metadata == {"loss": 0.5}


def _doc(**over):
    d = {"format": "resumekit", "version": 1, "step": 1, "files": {"a": {"size": 1, "xxh3": "0"}}}
    d.update(over)
    return json.dumps(d).encode()


@pytest.mark.parametrize(
    "data,msg",
    [
        (b"{not json", "not valid JSON"),
        (_doc(format="other"), "not a resumekit manifest"),
        (_doc(version=99), "newer than this resumekit supports"),
        (_doc(step="7"), "integer 'step'"),
        (_doc(files={"../../etc/passwd": {"size": 1, "xxh3": "0"}}), "unsafe path"),
        (_doc(files={"/abs": {"size": 1, "xxh3": "0"}}), "absolute path"),
        (_doc(files={"a": {"size": -1, "xxh3": "0"}}), "lacks size"),
    ],
)
def test_bad_manifests(data, msg):
    with pytest.raises(CorruptCheckpointError, match=msg):
        Manifest.from_json(data, "ckpt")
