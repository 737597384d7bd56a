"""codec.read_header: the one safetensors parser (resumekit.verify) plus the dtype-code -> torch mapping."""

import io
import json
import struct

import pytest
import torch

from resumekit.codec import _CODES, read_header
from resumekit.errors import CorruptCheckpointError
from resumekit.format import new_hasher
from resumekit.verify import SAFETENSORS_DTYPE_BYTES


def _file(header: dict, data_size: int) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(data_size)


def test_every_codec_dtype_has_the_byte_width_the_parser_checks():
    # The parser checks byte counts with its own table; a code torch sizes differently would pass it wrongly.
    for code, dtype in _CODES.items():
        assert SAFETENSORS_DTYPE_BYTES[code] == torch.empty((), dtype=dtype).element_size(), code


def test_entries_in_file_order_with_torch_dtypes_and_the_data_start():
    header = {
        "__metadata__": {"writer": "x"},
        "b": {"dtype": "BF16", "shape": [2, 1], "data_offsets": [8, 12]},
        "a": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]},
    }
    data = _file(header, 12)
    h = new_hasher()
    entries, start = read_header(io.BytesIO(data), len(data), "ck/t.safetensors", h)
    assert entries == [
        ("a", {"dtype": torch.int32, "shape": [2], "begin": 0, "end": 8}),
        ("b", {"dtype": torch.bfloat16, "shape": [2, 1], "begin": 8, "end": 12}),
    ]
    assert start == len(data) - 12
    ref = new_hasher()
    ref.update(data[:start])
    assert h.hexdigest() == ref.hexdigest()  # the hasher saw exactly the length and the header


def test_unknown_dtype_names_the_tensor_and_the_file():
    data = _file({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, 1)
    with pytest.raises(CorruptCheckpointError) as e:
        read_header(io.BytesIO(data), len(data), "ck/step_1/tensors.safetensors")
    assert e.value.path == "ck/step_1/tensors.safetensors"
    assert e.value.reason == "tensors.safetensors: tensor 'w' has an unknown dtype 'Q7' (no torch dtype for it)"


def test_bad_shape_is_corrupt_not_a_crash():
    data = _file({"w": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}, 16)
    with pytest.raises(
        CorruptCheckpointError,
        match=r"t\.safetensors has a damaged safetensors header \(bad shape "
        r"for 'w'\)",
    ):
        read_header(io.BytesIO(data), len(data), "t.safetensors")
