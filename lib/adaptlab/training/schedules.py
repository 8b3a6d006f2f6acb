"""Learning-rate schedules: warmup, then linear decay, cosine decay or a constant.

The factor multiplies the optimiser's base learning rate at optimiser step x (0-based), with
w warmup steps, T total steps and floor f = ``min_lr_ratio``:

| name       | warmup (x < w)        | after warmup (x >= w)                               |
|------------|-----------------------|-----------------------------------------------------|
| ``linear`` | x / w                 | f + (1 - f) (T - x) / (T - w)                       |
| ``cosine`` | f + (1 - f) x / w     | f + ½ (1 - f) (1 + cos(π (x - w) / (T - w)))        |
| ``constant``| x / w                | 1                                                   |

``cosine`` is geometry_icl_finetuning's schedule (landscape.md §4): warmup starts at the floor
f, not at 0. ``linear`` and ``constant`` are Hugging Face's (warmup from 0); with f = 0 all three
equal ``get_{linear,cosine,constant}_schedule_with_warmup`` for 0 <= x <= T. Decay stops at x = T
(factor f) and stays there.

Warmup is given as steps or as a ratio of T (``round(ratio * T)``), never capped; w = 0 and
w = T are allowed (upstream divided by zero at w = 0 and capped w at 3, landscape.md §12).

Example::

    >>> lr_factor("cosine", 0, total_steps=100, warmup_steps=10, min_lr_ratio=0.01)
    0.01
    >>> lr_factor("cosine", 10, total_steps=100, warmup_steps=10, min_lr_ratio=0.01)
    1.0
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch

from adaptlab.training.optim import TrainingError


def _warmup(step: int, warmup_steps: int, start: float) -> float:
    """Linear ramp from ``start`` at step 0 to 1 at ``warmup_steps`` (1 when there is none)."""
    if warmup_steps == 0:
        return 1.0
    return start + (1.0 - start) * min(step, warmup_steps) / warmup_steps


def _progress(step: int, total_steps: int, warmup_steps: int) -> float:
    """Fraction of the decay phase done at ``step``: 0 during warmup, 1 from ``total_steps``."""
    if total_steps == warmup_steps:
        return 0.0 if step < total_steps else 1.0
    return min(1.0, max(0, step - warmup_steps) / (total_steps - warmup_steps))


def _linear(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    if step < warmup_steps:
        return _warmup(step, warmup_steps, 0.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - _progress(step, total_steps, warmup_steps))


def _cosine(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    decay = math.cos(math.pi * _progress(step, total_steps, warmup_steps))
    return min(
        _warmup(step, warmup_steps, min_lr_ratio),
        min_lr_ratio + 0.5 * (1.0 - min_lr_ratio) * (1.0 + decay),
    )


def _constant(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    return _warmup(step, warmup_steps, 0.0) if step < warmup_steps else 1.0


SCHEDULES: dict[str, Callable[[int, int, int, float], float]] = {
    "linear": _linear,
    "cosine": _cosine,
    "constant": _constant,
}


def resolve_warmup_steps(
    total_steps: int, warmup_steps: int | None = None, warmup_ratio: float | None = None
) -> int:
    """Warmup length in optimiser steps from steps or a ratio of ``total_steps``.

    Args:
        total_steps: optimiser steps of the run, at least 1.
        warmup_steps: warmup in steps, 0..``total_steps``.
        warmup_ratio: warmup as a fraction of ``total_steps`` in [0, 1], rounded to steps.

    Returns:
        w, with 0 <= w <= ``total_steps`` (0 when neither is given).

    Raises:
        TrainingError: both given, a negative value, a ratio above 1, more warmup than steps.
    """
    if total_steps < 1:
        raise TrainingError(
            f"total_steps={total_steps} must be at least 1; check the epochs, batch size and "
            "training-set size."
        )
    if warmup_steps is not None and warmup_ratio is not None:
        raise TrainingError(
            f"Both warmup_steps={warmup_steps} and warmup_ratio={warmup_ratio} are set; give one."
        )
    if warmup_ratio is not None:
        if not 0.0 <= warmup_ratio <= 1.0:
            raise TrainingError(f"warmup_ratio={warmup_ratio} is outside [0, 1]; pick e.g. 0.05.")
        return round(warmup_ratio * total_steps)
    if warmup_steps is None:
        return 0
    if not 0 <= warmup_steps <= total_steps:
        raise TrainingError(
            f"warmup_steps={warmup_steps} is outside 0..total_steps={total_steps}; shorten the "
            "warmup."
        )
    return warmup_steps


def _check_schedule(name: str, min_lr_ratio: float) -> None:
    if name not in SCHEDULES:
        raise TrainingError(f"Unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}.")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise TrainingError(f"min_lr_ratio={min_lr_ratio} is outside [0, 1]; upstream uses 0.01.")


def lr_factor(
    name: str, step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0
) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (see the module table).

    Args:
        name: a key of :data:`SCHEDULES`.
        step: optimiser steps taken so far (0 before the first update).
        total_steps: T, optimiser steps of the run.
        warmup_steps: w, already resolved (:func:`resolve_warmup_steps`).
        min_lr_ratio: floor f of the decay (``linear``, ``cosine``) and start of the cosine
            warmup.

    Returns:
        The factor, in [0, 1].

    Raises:
        TrainingError: unknown name or ``min_lr_ratio`` outside [0, 1].
    """
    _check_schedule(name, min_lr_ratio)
    return SCHEDULES[name](step, total_steps, warmup_steps, min_lr_ratio)


def build_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int | None = None,
    warmup_ratio: float | None = None,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_factor` to every parameter group's base lr.

    Call ``scheduler.step()`` once per optimiser step (not per micro-batch).

    Args:
        name: a key of :data:`SCHEDULES`.
        optimizer: the optimiser (plain; wrap the scheduler afterwards if needed).
        total_steps: optimiser steps of the run.
        warmup_steps: warmup in steps (or give ``warmup_ratio``; neither = no warmup).
        warmup_ratio: warmup as a fraction of ``total_steps``.
        min_lr_ratio: floor as a fraction of the base lr (upstream SFT: 0.01).

    Returns:
        The scheduler.

    Raises:
        TrainingError: unknown name or bad warmup / floor values.
    """
    _check_schedule(name, min_lr_ratio)
    warmup = resolve_warmup_steps(total_steps, warmup_steps, warmup_ratio)
    factor = partial(
        SCHEDULES[name], total_steps=total_steps, warmup_steps=warmup, min_lr_ratio=min_lr_ratio
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
