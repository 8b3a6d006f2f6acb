"""Test-time Monte Carlo averaging over IVON's posterior (``ivon_infer_mc_samples``).

With S > 0 draws every forward of the model inside :func:`mc_averaged_logits` returns the mean
of the LOGITS of S forwards, each at a posterior draw θ_s = m + ε_s, ε_s ~ N(0, σ²): a plain
average of logits, not of softmax probabilities, as the ViLoRA/IVON code does
(``--ivon_infer_mc_samples``). S = 0 leaves the model at the posterior mean m (one forward)::

    with mc_averaged_logits(model, optimizer, samples=8, seed=cfg.seed):
        metrics = evaluate(model, accelerator)   # every model(...) call is averaged

Draw s of an evaluation is the same for every batch and depends only on (seed, optimiser step,
s), so an evaluation is reproducible, also after a resume, and independent of the batch size and
the number of processes. The draws come from their own generators (adaptlab's IVON) or a forked
RNG (ivon-opt's, which draws with ``torch.randn``), so the training RNG stream and the optimiser
state are left as they were. Text generation is not averaged: its key/value cache would mix the
draws, so the config refuses ``ivon_infer_mc_samples`` for generation tasks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from adaptlab.training.ivon import IVON
from adaptlab.training.optim import ivon_step_context, unwrap_optimizer, uses_ivon


def posterior_draw(
    optimizer: torch.optim.Optimizer, draw: int, seed: int
) -> contextlib.AbstractContextManager[None]:
    """The weights at prediction draw ``draw`` of IVON's current posterior (no state change).

    Args:
        optimizer: adaptlab's IVON or ivon-opt's (plain or wrapped by accelerate).
        draw: index of the draw in this evaluation.
        seed: seed of ivon-opt's draws (adaptlab's IVON uses its own ``seed``).
    """
    inner = unwrap_optimizer(optimizer)
    if isinstance(inner, IVON):
        return inner.sampled_params(train=False, draw=draw)
    return _seeded_ivon_opt_draw(inner, draw, seed)


@contextlib.contextmanager
def _seeded_ivon_opt_draw(optimizer: torch.optim.Optimizer, draw: int, seed: int) -> Iterator[None]:
    """ivon-opt's draw from ``torch.randn`` under an RNG forked and seeded by (seed, step, draw)."""
    devices = sorted(
        {p.device.index or 0 for g in optimizer.param_groups for p in g["params"] if p.is_cuda}
    )
    key = [seed, optimizer.current_step, draw, 2]
    entropy = int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0])
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(entropy)
        with ivon_step_context(optimizer, train=False):
            yield


def _logits(output: Any) -> torch.Tensor:
    """The logits of a model output: the tensor itself or its ``logits`` field."""
    return output if isinstance(output, torch.Tensor) else output["logits"]


@contextlib.contextmanager
def mc_averaged_logits(
    model: nn.Module, optimizer: torch.optim.Optimizer, samples: int, seed: int
) -> Iterator[None]:
    """Inside, ``model(...)`` returns logits averaged over ``samples`` posterior draws.

    The output of the first draw is returned with its ``logits`` (a tensor output: itself)
    replaced by the mean of the S draws' logits; its other fields (hidden states, cache) are
    the first draw's. Nothing changes for ``samples == 0`` or an optimiser other than IVON.

    Args:
        model: the model evaluated (plain, PEFT-, DDP- or FSDP-wrapped).
        optimizer: the training optimiser.
        samples: posterior draws S per forward (0: the mean).
        seed: the run's seed (for ivon-opt's draws).
    """
    if samples == 0 or not uses_ivon(optimizer):
        yield
        return
    forward = model.forward

    def averaged_forward(*args: Any, **kwargs: Any) -> Any:
        total = None  # a running fp32 sum: one [B, T, V] buffer whatever S is
        for draw in range(samples):
            with posterior_draw(optimizer, draw, seed):
                output = forward(*args, **kwargs)
            if total is None:
                first, total = output, _logits(output).float()
            else:
                total += _logits(output).float()
        mean = (total / samples).to(_logits(first).dtype)
        if isinstance(first, torch.Tensor):
            return mean
        first["logits"] = mean  # a ModelOutput sets the attribute too
        return first

    own = model.__dict__.get("forward")  # accelerate may have set an instance forward
    model.forward = averaged_forward
    try:
        yield
    finally:
        if own is None:
            del model.forward  # the class's forward again
        else:
            model.forward = own
