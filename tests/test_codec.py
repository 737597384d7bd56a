import io
import os
import pickle
import random

import numpy as np
import pytest
import torch

from resumekit.codec import TreeEncoder, decode, read_tensors, write_tensors
from resumekit.errors import CorruptCheckpointError, UnsupportedStateError
from resumekit.format import new_hasher
from resumekit.state import capture_rng


def roundtrip(tree):
    enc = TreeEncoder()
    js = enc.encode(tree)
    buf = io.BytesIO()
    h = new_hasher()
    n = write_tensors(buf, enc.tensors, h)
    assert n == len(buf.getvalue())
    buf.seek(0)
    h2 = new_hasher()
    tensors = read_tensors(buf, n, "mem", h2)
    assert h.hexdigest() == h2.hexdigest()
    import json

    return decode(json.loads(json.dumps(js)), tensors)


def test_types_survive():
    tree = {
        "t": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(),  # non-contiguous
        "bf": torch.ones(3, dtype=torch.bfloat16),
        "b": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "tuple": (0.9, 0.999),
        "intkeys": {0: {"x": 1}, 5: None},
        "inf": float("inf"),
        "nan": float("nan"),
        "bytes": b"\x00\x01",
        "np": np.arange(5, dtype=np.uint32),
        "npscalar": np.float64(2.5),
        "dtype": torch.float16,
        "nested": [[1, "a"], {"k": (1, 2)}],
    }
    back = roundtrip(tree)
    assert torch.equal(back["t"], tree["t"]) and back["t"].is_contiguous()
    assert back["bf"].dtype == torch.bfloat16 and back["b"].dtype == torch.bool
    assert back["scalar"].shape == () and back["empty"].shape == (0, 4)
    assert back["tuple"] == (0.9, 0.999) and isinstance(back["tuple"], tuple)
    assert back["intkeys"] == {0: {"x": 1}, 5: None}
    assert back["inf"] == float("inf") and back["nan"] != back["nan"]
    assert back["bytes"] == b"\x00\x01"
    assert back["np"].dtype == np.uint32 and list(back["np"]) == [0, 1, 2, 3, 4]
    assert isinstance(back["npscalar"], np.float64) and back["dtype"] is torch.float16
    assert back["nested"] == [[1, "a"], {"k": (1, 2)}]


def test_rng_state_roundtrip():
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    back = roundtrip(capture_rng())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    from resumekit.state import restore_rng

    restore_rng(back)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    assert a == (random.random(), np.random.rand(), torch.rand(1).item())


class Opaque:
    pass


def test_unsupported_object_names_its_key():
    with pytest.raises(UnsupportedStateError, match=r"state\['extra'\]\['thing'\].*Opaque.*without pickle"):
        TreeEncoder().encode({"extra": {"thing": Opaque()}})


def test_file_is_readable_by_safetensors():
    from safetensors.torch import load_file

    enc = TreeEncoder()
    enc.encode({"model": {"w": torch.randn(3, 4), "b": torch.zeros(4, dtype=torch.float16)}})
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"rk-{os.getpid()}.safetensors")
    with open(path, "wb") as f:
        write_tensors(f, enc.tensors, new_hasher())
    try:
        loaded = load_file(path)
        assert torch.equal(loaded["model/w"], enc.tensors["model/w"])
    finally:
        os.unlink(path)


def _file(tensors):
    enc = TreeEncoder()
    enc.encode(tensors)
    buf = io.BytesIO()
    write_tensors(buf, enc.tensors, new_hasher())
    return bytearray(buf.getvalue())


@pytest.mark.parametrize(
    "mutate,msg",
    [
        (lambda b: b[:-3], "header describes"),
        (lambda b: b[:5], "shorter than the 8-byte"),
        (lambda b: b"\xff" * 8 + b[8:], "header length"),
        (lambda b: b[:8] + b"x" + b[9:], "not valid JSON"),
        (lambda b: (8).to_bytes(8, "little") + b"[1]     ", "not an object"),
    ],
)
def test_lying_or_truncated_files(mutate, msg):
    data = bytes(mutate(_file({"w": torch.randn(10)})))
    with pytest.raises(CorruptCheckpointError, match=msg):
        read_tensors(io.BytesIO(data), len(data), "t.safetensors", new_hasher())


def test_decoding_never_unpickles():
    # A pickle payload smuggled into the tree file is just an unknown tag or a string, never executed.
    payload = pickle.dumps(Opaque())
    with pytest.raises(ValueError, match="unknown tag"):
        decode({"__rk__": "pickle", "v": payload.hex()}, {})


def test_negative_dimension_in_header_is_corrupt():
    import json as _json
    import struct

    header = _json.dumps({"w": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}).encode()
    header += b" " * (-(8 + len(header)) % 8)
    data = struct.pack("<Q", len(header)) + header + bytes(16)
    with pytest.raises(CorruptCheckpointError, match="negative dimension"):
        read_tensors(io.BytesIO(data), len(data), "t.safetensors", new_hasher())


def test_pipelined_hash_of_a_large_state_matches_a_plain_hash():
    import xxhash

    big = {"w": torch.arange(18 << 20, dtype=torch.float32)}  # 72 MiB: hashed on the helper thread
    buf = io.BytesIO()
    h = new_hasher()
    n = write_tensors(buf, big, h)
    assert n == len(buf.getvalue()) and h.hexdigest() == xxhash.xxh3_64(buf.getvalue()).hexdigest()


def test_materialize_copies_large_tensors_into_one_writable_arena_and_keeps_the_tree():
    from resumekit.codec import materialize

    big = torch.arange(1 << 19, dtype=torch.float32)  # 2 MiB: arena
    other = torch.ones(3, 1 << 18, dtype=torch.bfloat16)[:, ::2]  # non-contiguous, 0.75 MiB: a plain clone
    d = torch.full((1 << 18,), -3, dtype=torch.int64)
    tree = {"a": big, "b": [big, other, 7, "x"], "c": (torch.tensor(1.5),), "d": d}
    out = materialize(tree)
    assert out["b"][2:] == [7, "x"] and isinstance(out["c"], tuple)
    for got, want in ((out["a"], big), (out["b"][1], other), (out["c"][0], tree["c"][0]), (out["d"], tree["d"])):
        assert torch.equal(got, want) and got.dtype == want.dtype and got.shape == want.shape
        assert got.data_ptr() != want.data_ptr()
    assert out["a"] is out["b"][0]  # one tensor listed twice: copied once, still one tensor
    out["a"] += 1  # writable, and the source is untouched
    assert big[0] == 0 and out["a"][0] == 1
    # the large ones share one mapping (their storages are views of the same buffer)
    ptrs = sorted((out["a"].data_ptr(), out["d"].data_ptr()))
    assert ptrs[1] - ptrs[0] < (4 << 20)
