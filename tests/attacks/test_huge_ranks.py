"""Attack: rank numbers far beyond the files present (issue 12, point 4).

Rank checks built lists sized by the largest rank seen in a file name or a pickle, so one stray file
(``rng_state_99999999999.pth``, ``mp_rank_9999_9999_9999``) hung or killed ``ls`` and every supervisor start. They
now cost in proportion to the files present.
"""

from __future__ import annotations

import os

import pytest
from attack_helpers import assert_prompt_verdicts, probe

import layout_fixtures as F

HUGE = 99_999_999_999


def _hf(root: str) -> tuple:
    F.hf_checkpoint(root, 2)
    d = F.hf_checkpoint(root, 4, rng_ranks=[0])
    F.write_torch(os.path.join(d, f"rng_state_{HUGE}.pth"))
    return "checkpoint-2", "checkpoint-4", f"rng_state_1.pth is missing (process ranks 0-{HUGE} expected)"


def _megatron(root: str) -> tuple:
    F.megatron_iter(root, 100, fmt="legacy", grid=(2,))
    d = F.megatron_iter(root, 200, fmt="legacy", grid=(1, 1, 1))
    F.write_torch(os.path.join(d, "mp_rank_9999_9999_9999", "model_optim_rng.pt"))
    absent = 10_000**3 - 2
    why = f"1/ is missing (the rank grid 10000 x 10000 x 10000 is incomplete: {absent} of"
    return "iter_0000100", "iter_0000200", why


def _deepspeed(root: str) -> tuple:
    F.deepspeed_tag(root, "global_step10", dp=2)
    d = F.deepspeed_tag(root, "global_step20", dp=2)
    F.write_torch(os.path.join(d, f"zero_pp_rank_{HUGE}_mp_rank_00_optim_states.pt"))
    F.write(os.path.join(root, "latest"), b"global_step20")
    return "global_step10", "global_step20", "zero_pp_rank_2_mp_rank_00_optim_states.pt is missing"


def _deepspeed_pickle(root: str) -> tuple:
    F.deepspeed_tag(root, "global_step10", dp=2)
    F.deepspeed_tag(root, "global_step20", dp=2, recorded_dp=10**15)  # the size recorded inside the file
    F.write(os.path.join(root, "latest"), b"global_step20")
    return "global_step10", "global_step20", "records dp_world_size=1000000000000000 but there are 2"


def _verl(root: str) -> tuple:
    F.verl_step(root, 5)
    d = os.path.join(root, "global_step_10")
    for kind in ("model", "optim", "extra_state"):
        F.write_torch(os.path.join(d, "actor", f"{kind}_world_size_{HUGE}_rank_0.pt"))
    F.write_torch(os.path.join(d, "data.pt"))
    return "global_step_5", "global_step_10", f"actor/model_world_size_{HUGE}_rank_1.pt is missing"


CASES = {
    "hf": _hf,
    "megatron": _megatron,
    "deepspeed": _deepspeed,
    "deepspeed-pickle": _deepspeed_pickle,
    "verl": _verl,
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(CASES))
def test_huge_rank_numbers_cost_nothing(tmp_path, case):
    root = str(tmp_path)
    good, bad, reason = CASES[case](root)
    results = probe(
        [
            ["ls", root],
            ["ls", root, "--full"],
            ["latest", root],
            ["latest", root, "--quick"],
            ["verify", os.path.join(root, bad)],
            ["repair", root, "--dry-run"],
        ]
    )
    assert_prompt_verdicts(results)
    assert results[2]["out"].strip() == os.path.join(root, good), results[2]
    assert results[4]["code"] == 1 and reason in results[4]["out"], results[4]["out"]
