"""The test-only fault plan (scmm_atlas/faults.py): read from the environment, never from a config."""

from __future__ import annotations

import pytest

from scmm_atlas.config import load_config
from scmm_atlas.errors import InputError
from scmm_atlas.faults import ENV, FaultPlan


def test_the_plan_is_read_from_the_environment() -> None:
    assert FaultPlan.from_env({}) == FaultPlan(train_step=0, infer_block=-1)  # unset: no faults
    assert FaultPlan.from_env({ENV: " train_step=42 , infer_block=2"}) == FaultPlan(train_step=42, infer_block=2)
    assert FaultPlan.from_env({ENV: "infer_block=0"}) == FaultPlan(infer_block=0)
    assert FaultPlan.from_env({ENV: "train_batch_ms=200"}) == FaultPlan(train_batch_ms=200)


@pytest.mark.parametrize("text", ["train_step", "train_step=x", "fault_at_step=3", "infer_block=1.5"])
def test_a_bad_plan_names_the_variable_and_the_item(text: str) -> None:
    known = "infer_block, infer_block_s, train_batch_ms, train_step"
    with pytest.raises(InputError, match=rf"^{ENV}: .*expected KEY=INTEGER items, KEY one of {known}"):
        FaultPlan.from_env({ENV: text})


def test_no_config_carries_a_fault() -> None:
    with pytest.raises(InputError, match="fault_at_step"):
        load_config("atlas_cite", ["distributed.fault_at_step=3"])
