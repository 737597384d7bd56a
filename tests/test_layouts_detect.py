"""Detection across layouts (native always wins for step_N roots) and the no-torch import rule."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import layout_fixtures as F
from resumekit.layouts import detect_layout
from resumekit.storage import open_storage


def _native(root):
    os.makedirs(os.path.join(root, "step_000000100"))


@pytest.mark.parametrize(
    "build,expected",
    [
        (lambda r: F.hf_checkpoint(r, 2), "hf"),
        (lambda r: F.megatron_iter(r, 100), "megatron"),
        (lambda r: F.verl_step(r, 5), "verl"),
        (lambda r: F.deepspeed_tag(r, "global_step5"), "deepspeed"),
        (lambda r: F.lightning_ckpt(os.path.join(r, "last.ckpt"), 3), "lightning"),
        (lambda r: F.write_torch(os.path.join(r, "ckpt_3.pth")), "torchfiles"),
        (_native, "native"),
        (lambda r: (_native(r), F.hf_checkpoint(r, 2), F.write_torch(os.path.join(r, "ckpt_3.pth"))), "native"),
        (lambda r: F.write(os.path.join(r, "latest_checkpointed_iteration.txt"), b"5"), "native"),  # nothing to go on
        (lambda r: None, "native"),
    ],
)
def test_detect(tmp_path, build, expected):
    build(str(tmp_path))
    assert detect_layout(open_storage(str(tmp_path), create=False)).name == expected


def test_layouts_import_without_torch():
    code = (
        "import sys, resumekit.layouts as L, resumekit.yamlconfig, resumekit.cli; "
        "assert len(L.layout_names()) == 10, L.layout_names(); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
