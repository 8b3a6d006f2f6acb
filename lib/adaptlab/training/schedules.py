"""Learning-rate schedules: warmup, then linear decay, cosine decay, a constant, or clr.

The factor multiplies the optimiser's base learning rate at optimiser step x (0-based), with
w warmup steps, T total steps and floor f = ``min_lr_ratio``:

| name       | warmup (x < w)        | after warmup (x >= w)                               |
|------------|-----------------------|-----------------------------------------------------|
| ``linear`` | x / w                 | f + (1 - f) (T - x) / (T - w)                       |
| ``cosine`` | f + (1 - f) x / w     | f + ½ (1 - f) (1 + cos(π (x - w) / (T - w)))        |
| ``constant``| x / w                | 1                                                   |
| ``clr``    | x / w                 | 1 for x < C; max(s - (s - e) (x - C) / (T - C), e)   |

``cosine`` is geometry_icl_finetuning's schedule (landscape.md §4): warmup starts at the floor
f, not at 0. ``linear`` and ``constant`` are Hugging Face's (warmup from 0); with f = 0 all three
equal ``get_{linear,cosine,constant}_schedule_with_warmup`` for 0 <= x <= T. Decay stops at x = T
(factor f) and stays there.

``clr`` is ViLoRA's custom schedule (peft_methods.md §7): the base lr (its ``first_lr``) after
warmup until step C, then a jump to the second lr s, decaying linearly to the end lr e at T
(held at e after T). s and e are factors of the base lr here (:class:`ClrShape`); the config
takes them as absolute lrs (:class:`ClrSettings`). C is in optimiser steps, w <= C <= T; f is not
used. Upstream read ``const_epochs`` <= 100 as epochs: give C = epochs x steps per epoch instead.

Warmup is given as steps or as a ratio of T (``round(ratio * T)``), never capped; w = 0 and
w = T are allowed (upstream divided by zero at w = 0 and capped w at 3, landscape.md §12).

Example::

    >>> lr_factor("cosine", 0, total_steps=100, warmup_steps=10, min_lr_ratio=0.01)
    0.01
    >>> lr_factor("cosine", 10, total_steps=100, warmup_steps=10, min_lr_ratio=0.01)
    1.0
    >>> lr_factor("clr", 75, 100, 10, clr=ClrShape(const_steps=50, second=0.2, end=0.0))
    0.1
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ClrShape:
    """The part of ``clr`` after the constant lr, in factors of the base lr.

    Args:
        const_steps: C, the optimiser step at which the factor drops from 1 to ``second``.
        second: s, the factor at step C, decaying linearly to ``end``.
        end: e, the factor at step T and after.
    """

    const_steps: int
    second: float
    end: float


def _clr(
    step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float, shape: ClrShape
) -> float:
    if step < warmup_steps:
        return _warmup(step, warmup_steps, 0.0)
    if step < shape.const_steps:
        return 1.0
    # _progress stops at 1 from T on: the factor stays at e, the spec's max(..., e)
    done = _progress(step, total_steps, shape.const_steps)
    return shape.second - (shape.second - shape.end) * done


SCHEDULES: dict[str, Callable[..., float]] = {
    "linear": _linear,
    "cosine": _cosine,
    "constant": _constant,
    "clr": _clr,
}
"""Name -> factor ``(step, total_steps, warmup_steps, min_lr_ratio)``; ``clr`` also takes its
:class:`ClrShape`."""


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


def _schedule(
    name: str, total_steps: int, warmup_steps: int, min_lr_ratio: float, clr: ClrShape | None
) -> Callable[[int], float]:
    """The factor of step x for one run, after checking the schedule's settings."""
    if name not in SCHEDULES:
        raise TrainingError(f"Unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}.")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise TrainingError(f"min_lr_ratio={min_lr_ratio} is outside [0, 1]; upstream uses 0.01.")
    if name == "clr" and clr is None:
        raise TrainingError("schedule='clr' needs its shape: pass clr=ClrShape(C, s, e).")
    if name != "clr" and clr is not None:
        raise TrainingError(f"clr={clr} applies to schedule='clr' only, not to {name!r}.")
    factor = partial(
        SCHEDULES[name],
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        min_lr_ratio=min_lr_ratio,
    )
    if clr is None:
        return factor
    if not warmup_steps <= clr.const_steps <= total_steps:
        raise TrainingError(
            f"clr const_steps={clr.const_steps} must lie between the warmup ({warmup_steps} "
            f"steps) and the run's total_steps={total_steps}; shorten the constant phase or "
            "train longer."
        )
    if not 0.0 <= clr.end <= clr.second:
        raise TrainingError(
            f"clr factors second={clr.second}, end={clr.end} must satisfy 0 <= end <= second "
            "(the lr decays from the second lr to the end lr)."
        )
    return partial(factor, shape=clr)


def lr_factor(
    name: str,
    step: int,
    total_steps: int,
    warmup_steps: int,
    min_lr_ratio: float = 0.0,
    clr: ClrShape | None = None,
) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (see the module table).

    Args:
        name: a key of :data:`SCHEDULES`.
        step: optimiser steps taken so far (0 before the first update).
        total_steps: T, optimiser steps of the run.
        warmup_steps: w, already resolved (:func:`resolve_warmup_steps`).
        min_lr_ratio: floor f of the decay (``linear``, ``cosine``) and start of the cosine
            warmup.
        clr: C, s and e of ``clr`` (required with it, refused with the others).

    Returns:
        The factor, in [0, 1] (``clr``: in [0, max(1, s)]).

    Raises:
        TrainingError: unknown name, ``min_lr_ratio`` outside [0, 1], a missing or stray
            ``clr``, or one with C outside w..T or not 0 <= e <= s.
    """
    return _schedule(name, total_steps, warmup_steps, min_lr_ratio, clr)(step)


def build_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int | None = None,
    warmup_ratio: float | None = None,
    min_lr_ratio: float = 0.0,
    clr: ClrShape | None = None,
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
        clr: the shape of ``clr`` (:meth:`ClrSettings.clr_shape`); None for the others.

    Returns:
        The scheduler.

    Raises:
        TrainingError: unknown name or bad warmup / floor / clr values.
    """
    warmup = resolve_warmup_steps(total_steps, warmup_steps, warmup_ratio)
    factor = _schedule(name, total_steps, warmup, min_lr_ratio, clr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class ClrSettings:
    """Settings of ``schedule: clr`` (ViLoRA's custom schedule, peft_methods.md §7): warmup to
    ``lr`` (upstream's ``first_lr``) over ``warmup_steps``, ``lr`` until ``clr_const_steps``,
    then ``clr_second_lr`` decaying linearly to ``clr_end_lr`` at the last step.

    Args:
        clr_const_steps: C, the optimiser step (warmup included) at which the lr drops from
            ``lr`` to ``clr_second_lr``; schedule clr only. Upstream's ``--const_epochs`` n <= 100
            meant epochs: give n x steps per epoch.
        clr_second_lr: the lr at step C (absolute, e.g. 0.4 after ``lr`` 2.0); schedule clr only.
        clr_end_lr: the lr at the last step and after (absolute; None: 0); schedule clr only.
    """

    clr_const_steps: int | None = None
    clr_second_lr: float | None = None
    clr_end_lr: float | None = None

    def clr_shape(self) -> ClrShape | None:
        """C, s and e as factors of ``lr`` for :func:`build_scheduler` (None unless clr)."""
        if getattr(self, "schedule", None) != "clr":
            return None
        assert self.clr_const_steps is not None and self.clr_second_lr is not None
        lr = self.lr  # the config's field, > 0 with clr (clr_checks)
        end = self.clr_end_lr or 0.0
        return ClrShape(self.clr_const_steps, self.clr_second_lr / lr, end / lr)

    def clr_checks(self) -> list[tuple[bool, str]]:
        """``(ok, message)`` for each setting (the config refuses the first one not ok)."""
        given = {
            name: value
            for name, value in (
                ("clr_const_steps", self.clr_const_steps),
                ("clr_second_lr", self.clr_second_lr),
                ("clr_end_lr", self.clr_end_lr),
            )
            if value is not None
        }
        if getattr(self, "schedule", None) != "clr":
            return [
                (
                    not given,
                    f"{', '.join(given)} apply to schedule=clr only; drop them or use "
                    "schedule=clr.",
                )
            ]
        const, second = self.clr_const_steps, self.clr_second_lr
        end = self.clr_end_lr or 0.0
        lr = getattr(self, "lr", 0.0)
        warmup = getattr(self, "warmup_steps", None)
        max_steps = getattr(self, "max_steps", None)
        return [
            (
                const is not None and second is not None,
                "schedule=clr needs clr_const_steps and clr_second_lr (ViLoRA: 400-500 steps, "
                "0.4-0.5 after lr 2.0).",
            ),
            (lr > 0, f"schedule=clr needs lr > 0 (its first lr), not {lr}."),
            (
                second is None or (math.isfinite(second) and second >= 0),
                f"clr_second_lr={second} must be a learning rate >= 0.",
            ),
            (
                math.isfinite(end) and end >= 0,
                f"clr_end_lr={self.clr_end_lr} must be a learning rate >= 0 (or omitted: 0).",
            ),
            (
                second is None or end <= second,
                f"clr_end_lr={end} exceeds clr_second_lr={second}; the lr decays from the second "
                "lr to the end lr.",
            ),
            (
                const is None or const >= (warmup or 0),
                f"clr_const_steps={const} is shorter than warmup_steps={warmup}; the constant "
                "phase starts after the warmup.",
            ),
            (
                const is None or max_steps is None or const <= max_steps,
                f"clr_const_steps={const} is beyond max_steps={max_steps}; shorten it.",
            ),
        ]
