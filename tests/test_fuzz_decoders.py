"""Fuzzing the decoders of everything read from a checkpoint (issue 12): the manifest, the JSON tree and the tensor
file header. Each must return a result or raise :class:`CorruptCheckpointError`, never anything else.

A few hundred examples each in ``make test`` (seconds, derandomized so a run is repeatable); set
``RESUMEKIT_FUZZ_EXAMPLES`` (e.g. 20000) for a longer, randomized run.
"""

from __future__ import annotations

import io
import json
import os
import random
import struct

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resumekit.codec import TAG, decode_tree, read_header
from resumekit.errors import CorruptCheckpointError
from resumekit.format import Manifest, parse_json
from resumekit.state import check_rng
from resumekit.verify import check_tree, read_safetensors_header

LONG = int(os.environ.get("RESUMEKIT_FUZZ_EXAMPLES", "0") or 0)
FUZZ = settings(
    max_examples=LONG or 150,
    deadline=None,
    derandomize=not LONG,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

TAGS = ["tensor", "ndarray", "float", "npscalar", "dict", "tuple", "bytes", "dtype", "device", "size", "set", "x"]
KEYS = [TAG, "k", "v", "dtype", "shape", "items", "state", "rng", "python", "numpy", "torch", "cuda"]
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=6)
    | st.sampled_from(["<f4", "|O", "<u4", "|V8", "float32", "cpu", "cuda:1", "foo:99", "nan", "inf", "QUJD", "u8"])
)


def _trees(children):
    tagged = st.fixed_dictionaries(
        {TAG: st.sampled_from(TAGS)},
        optional={
            "k": st.sampled_from(["t", "r", "missing"]) | st.integers(),
            "v": children,
            "dtype": scalars,
            "shape": st.lists(st.integers(-2, 6), max_size=3) | scalars,
            "items": st.lists(st.lists(children, max_size=3), max_size=3) | children,
        },
    )
    return (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=3), children, max_size=4)
        | tagged
    )


trees = st.recursive(scalars, _trees, max_leaves=40)
TENSORS = {"t": torch.zeros(8, dtype=torch.uint8), "r": torch.get_rng_state()}


@FUZZ
@given(st.binary(max_size=300) | trees.map(lambda t: json.dumps(t).encode()))
def test_manifest_parser_is_total(data):
    try:
        Manifest.from_json(data, "ck")
    except CorruptCheckpointError:
        pass


@FUZZ
@given(
    st.fixed_dictionaries(
        {"format": st.just("resumekit"), "version": st.integers(-1, 2) | scalars, "step": st.integers(-1, 9) | scalars},
        optional={"files": trees, "time": scalars, "metadata": trees, "entries": trees},
    )
)
def test_manifest_documents_are_total(doc):
    try:
        Manifest.from_json(json.dumps(doc).encode(), "ck")
    except CorruptCheckpointError:
        pass


@FUZZ
@given(trees)
def test_tree_check_and_decoder_are_total(tree):
    # The decoder itself is total, checked or not; the check and the decoder together are what a restore runs.
    blob = json.dumps({"state": tree, "rng": tree}).encode()
    try:
        decoded = decode_tree(blob, TENSORS, "ck", "state.json")
    except CorruptCheckpointError:
        return
    try:
        check_rng(decoded.get("rng"), "ck")
    except CorruptCheckpointError:
        pass


@FUZZ
@given(st.binary(max_size=200))
def test_json_parser_is_total(data):
    try:
        doc = parse_json(data, "ck", "x.json")
    except CorruptCheckpointError:
        return
    try:
        check_tree(doc, {"t": ("U8", (8,))}, "ck")
    except CorruptCheckpointError:
        pass


headers = st.dictionaries(
    st.sampled_from(["a", "b", "__metadata__"]) | st.text(max_size=3),
    st.fixed_dictionaries(
        {},
        optional={
            "dtype": st.sampled_from(["F32", "U8", "BOOL", "F64", "X"]) | scalars,
            "shape": st.lists(st.integers(-1, 4), max_size=3) | scalars,
            "data_offsets": st.lists(st.integers(-1, 40), min_size=0, max_size=3) | scalars,
        },
    )
    | scalars,
    max_size=4,
)


@FUZZ
@given(headers, st.integers(0, 48), st.sampled_from(["exact", "big", "small", "garbage"]))
def test_tensor_file_header_is_total(header, data_len, lying):
    raw = json.dumps(header).encode()
    n = {
        "exact": len(raw),
        "big": 1 << 40,
        "small": max(0, len(raw) - 3),
        "garbage": random.Random(data_len).getrandbits(64),
    }
    blob = struct.pack("<Q", n[lying]) + raw + bytes(data_len)
    for full in (False, True):
        try:
            read_safetensors_header(io.BytesIO(blob), len(blob), "ck", "t.safetensors", full=full)
        except CorruptCheckpointError:
            pass
    try:
        read_header(io.BytesIO(blob), len(blob), "ck/t.safetensors")
    except CorruptCheckpointError:
        pass


@FUZZ
@given(st.binary(max_size=64))
def test_tensor_file_bytes_are_total(blob):
    try:
        read_safetensors_header(io.BytesIO(blob), len(blob), "ck", "t.safetensors", full=True)
    except CorruptCheckpointError:
        pass


def test_rng_check_on_values_a_tree_can_hold():
    for bad in (
        [1, 2],
        "x",
        {"python": (3, (1,) * 10, None)},
        {"numpy": ("MT19937", np.zeros(3, np.uint32), 0, 0, 0.0)},
    ):
        try:
            check_rng(bad, "ck")
        except CorruptCheckpointError:
            pass
