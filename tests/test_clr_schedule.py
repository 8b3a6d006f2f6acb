"""ViLoRA's clr schedule (peft_methods.md §7) against hand-computed learning rates."""

from __future__ import annotations

import pytest
import torch

from adaptlab.training.config import FinetuneConfig
from adaptlab.training.errors import TrainingError
from adaptlab.training.schedules import ClrShape, build_scheduler, lr_factor

# first lr 2.0, warmup W = 100, C = 500, second lr 0.4, end lr 0.1, T = 1000. By hand:
# t < W: 2.0 t / 100; W <= t < C: 2.0; t >= C: max(0.4 - 0.3 (t - 500) / 500, 0.1).
FIRST, W, C, T = 2.0, 100, 500, 1000
HAND_LRS = {
    0: 0.0,
    50: 1.0,
    99: 1.98,
    100: 2.0,  # t = W
    300: 2.0,
    499: 2.0,
    500: 0.4,  # t = C: the drop to the second lr
    750: 0.25,  # 0.4 - 0.3 * 250 / 500
    999: 0.1006,  # 0.4 - 0.3 * 499 / 500
    1000: 0.1,  # t = T
    1200: 0.1,  # past T the spec's max(..., end) holds the end lr
}
SHAPE = ClrShape(const_steps=C, second=0.4 / FIRST, end=0.1 / FIRST)


@pytest.mark.parametrize("step", sorted(HAND_LRS))
def test_clr_factor_equals_hand_computed_lr(step):
    assert FIRST * lr_factor("clr", step, T, W, clr=SHAPE) == pytest.approx(HAND_LRS[step])


def test_clr_lambda_lr_gives_the_same_lrs():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=FIRST)
    scheduler = build_scheduler("clr", optimizer, T, warmup_steps=W, clr=SHAPE)
    seen = {}
    for step in range(T + 1):
        seen[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    for step in (s for s in HAND_LRS if s <= T):
        assert seen[step] == pytest.approx(HAND_LRS[step]), step


def test_clr_from_the_config_fields():
    cfg = FinetuneConfig(
        schedule="clr",
        lr=FIRST,
        warmup_steps=W,
        clr_const_steps=C,
        clr_second_lr=0.4,
        clr_end_lr=0.1,
    )
    assert cfg.clr_shape() == SHAPE
    no_end = FinetuneConfig(schedule="clr", lr=2.0, clr_const_steps=400, clr_second_lr=0.5)
    assert no_end.clr_shape() == ClrShape(400, 0.25, 0.0)
    assert FinetuneConfig(schedule="linear").clr_shape() is None


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"clr_const_steps": 300, "warmup_steps": 400}, "shorter than warmup_steps"),
        ({"clr_const_steps": 900, "max_steps": 800}, "beyond max_steps"),
        ({"clr_second_lr": -0.4}, "clr_second_lr=-0.4 must be"),
        ({"clr_end_lr": -0.1}, "clr_end_lr=-0.1 must be"),
        ({"clr_end_lr": 0.6}, "exceeds clr_second_lr"),
        ({"clr_second_lr": None}, "needs clr_const_steps and clr_second_lr"),
        ({"lr": 0.0}, "needs lr > 0"),
        ({"schedule": "linear"}, "apply to schedule=clr only"),
    ],
)
def test_clr_config_errors(fields, match):
    base = {"schedule": "clr", "lr": 2.0, "clr_const_steps": 500, "clr_second_lr": 0.4}
    with pytest.raises(TrainingError, match=match):
        FinetuneConfig(**{**base, **fields})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"total_steps": 400}, "between the warmup"),  # C > T, known once T is
        ({"warmup_ratio": 0.6}, "between the warmup"),  # C < W = 600
        ({"clr": None}, "needs its shape"),
        ({"name": "linear"}, "applies to schedule='clr' only"),
        ({"clr": ClrShape(500, 0.1, 0.2)}, "0 <= end <= second"),
    ],
)
def test_clr_scheduler_errors(kwargs, match):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=FIRST)
    args = {"name": "clr", "optimizer": optimizer, "total_steps": T, "clr": SHAPE, **kwargs}
    with pytest.raises(TrainingError, match=match):
        build_scheduler(**args)
