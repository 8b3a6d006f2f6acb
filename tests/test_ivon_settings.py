"""Bad IVON settings are refused with one sentence before anything loads."""

from __future__ import annotations

import pytest

from adaptlab.training.config import FinetuneConfig
from adaptlab.training.errors import TrainingError
from adaptlab.training.parallel import Strategy, check_strategy


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"ivon_ess": -1.0}, r"ivon_ess=-1.0 must be > 0 \(or 0 / omitted: the number of train"),
        ({"ivon_hess_init": 0.0}, r"ivon_hess_init=0.0 must be > 0"),
        ({"ivon_hess_init": -0.5}, r"ivon_hess_init=-0.5 must be > 0"),
        (
            {"betas": (1.0, 0.999)},
            r"betas\[0\]=1.0 is IVON's momentum rate and must be in \[0, 1\)",
        ),
        ({"betas": (-0.1, 0.999)}, r"betas\[0\]=-0.1 is IVON's momentum rate"),
        ({"ivon_beta2": 1.0}, r"ivon_beta2=1.0 must be in \[0, 1\)"),
        ({"ivon_beta2": -0.1}, r"ivon_beta2=-0.1 must be in \[0, 1\)"),
        ({"ivon_mc_samples": 0}, r"ivon_mc_samples=0 must be at least 1"),
        ({"ivon_infer_mc_samples": -1}, r"ivon_infer_mc_samples=-1 must be 0 \(the mean\) or more"),
        ({"ivon_hessian_from": "h.pt"}, r"h.pt is not a .safetensors file.*pickles are refused"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_bad_ivon_setting_is_one_sentence(fields, message):
    with pytest.raises(TrainingError, match=message):
        FinetuneConfig(optimizer="ivon", **fields)


def test_ess_zero_or_omitted_means_the_training_set_size_and_ivon_only_fields_need_ivon():
    assert FinetuneConfig(optimizer="ivon", ivon_ess=0).ivon_ess == 0
    assert FinetuneConfig(optimizer="ivon").ivon_ess is None
    assert FinetuneConfig(optimizer="adamw", betas=(0.9, 0.999)).optimizer == "adamw"
    with pytest.raises(TrainingError, match="need an IVON optimiser; use optimizer=ivon"):
        FinetuneConfig(optimizer="adamw", ivon_infer_mc_samples=2)


def test_ivon_infer_mc_samples_is_refused_for_generation_only():
    """A generated title would mix the draws in its key/value cache; a linear head averages its
    logits over the draws (tests/test_ivon_mc_linear_head.py)."""
    with pytest.raises(TrainingError, match="ivon_infer_mc_samples=2 does not apply to task"):
        FinetuneConfig(optimizer="ivon", task="bbc-headline", ivon_infer_mc_samples=2)
    for task in ("SST-2", "STS-B"):
        cfg = FinetuneConfig(optimizer="ivon", task=task, head="linear", ivon_infer_mc_samples=2)
        assert cfg.ivon_infer_mc_samples == 2


def test_ivon_is_refused_where_its_trainable_weights_would_be_sharded():
    with pytest.raises(TrainingError, match="method=full under fsdp would need every"):
        check_strategy(Strategy("fsdp"), "ivon", "full", from_linearhead=False)
    with pytest.raises(TrainingError, match="method=full under zero3 would draw the posterior"):
        check_strategy(Strategy("zero3"), "ivon", "full", from_linearhead=False)
    with pytest.raises(TrainingError, match="ivon_opt needs whole, replicated trainable weights"):
        check_strategy(Strategy("zero3"), "ivon_opt", "lora", from_linearhead=False)
    check_strategy(Strategy("fsdp"), "ivon", "lora", from_linearhead=False)  # base sharded only
    check_strategy(Strategy("ddp"), "ivon", "full", from_linearhead=False)
    check_strategy(Strategy("fsdp"), "adamw", "full", from_linearhead=False)
