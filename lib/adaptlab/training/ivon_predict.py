"""Test-time Monte Carlo averaging over IVON's posterior (``ivon_infer_mc_samples``).

With S > 0 draws every forward of the model inside :func:`mc_averaged_logits` returns the mean
of the LOGITS of S forwards, each at a posterior draw θ_s = m + ε_s, ε_s ~ N(0, σ²): a plain
average of logits, not of softmax probabilities, as the ViLoRA/IVON code does
(``--ivon_infer_mc_samples``). S = 0 leaves the model at the posterior mean m (one forward)::

    with mc_averaged_logits(model, optimizer, samples=8, seed=cfg.seed):
        metrics = evaluate(model, accelerator)   # every model(...) call is averaged

What is averaged, by scoring (then read as without averaging):

| scoring | averaged over the S draws |
|---|---|
| label words, options, MMLU | the LM logits ``[B, T, V]`` |
| ``head=linear``, C classes | the head's logits ``[B, T, C]`` at every token, not the LM's |
| ``head=linear``, one output (STS-B) | the head's output ``[B, T, 1]``: the predicted score |

A draw covers every weight IVON trains, the adapter's and the linear head's alike. The head
scores hidden states after the model's forward, so with a head attached each draw also runs the
head on that draw's last hidden states (encoder and head both at θ_s), and the objective reads
the mean at its positions. Accuracy, ECE (softmax of the mean logits), correlations and the loss
are then taken on the averaged scores, as on a prompt's averaged LM logits.

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
from adaptlab.training.objectives import HEAD_LOGITS, LinearHead, find_linear_head
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


def _draw_logits(output: Any, head: LinearHead | None) -> dict[str, torch.Tensor]:
    """The fp32 logits of one draw's output to average, by output field.

    With a head attached and hidden states returned: :data:`HEAD_LOGITS`, the head's logits at
    every token of the last hidden states (the LM logits, which it never reads, are left out
    of the average: a ``[B, T, V]`` buffer less). Else ``logits``: the tensor output itself or
    its ``logits`` field.
    """
    if head is not None and not isinstance(output, torch.Tensor):
        hidden = output.get("hidden_states")
        if hidden is not None:
            return {HEAD_LOGITS: head.every_token(hidden[-1]).float()}
    return {"logits": _logits(output).float()}


def _logits(output: Any) -> torch.Tensor:
    """The logits of a model output: the tensor itself or its ``logits`` field."""
    return output if isinstance(output, torch.Tensor) else output["logits"]


@contextlib.contextmanager
def mc_averaged_logits(
    model: nn.Module, optimizer: torch.optim.Optimizer, samples: int, seed: int
) -> Iterator[None]:
    """Inside, ``model(...)`` returns logits averaged over ``samples`` posterior draws.

    The output of the first draw is returned with its ``logits`` (a tensor output: itself)
    replaced by the mean of the S draws' logits. With a linear head attached
    (``objectives.attach_linear_head``) and hidden states asked for, it carries ``head_logits``
    ``[B, T, C]`` instead: the mean over the draws of the head's logits at every token, each
    draw's head (its weights at θ_s too) on that draw's last hidden states; its ``logits`` then
    stay the first draw's. Its other fields (hidden states, cache) are the first draw's.
    Nothing changes for ``samples == 0`` or an optimiser other than IVON.

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
    head = find_linear_head(model)

    def averaged_forward(*args: Any, **kwargs: Any) -> Any:
        totals: dict[str, torch.Tensor] = {}  # running fp32 sums: one buffer each whatever S is
        for draw in range(samples):
            with posterior_draw(optimizer, draw, seed):
                output = forward(*args, **kwargs)
                logits = _draw_logits(output, head)  # the head at this draw's weights too
            if draw == 0:
                first, totals = output, logits
            else:
                for name, value in logits.items():
                    totals[name] += value
        if isinstance(first, torch.Tensor):
            return (totals["logits"] / samples).to(first.dtype)
        for name, total in totals.items():  # a ModelOutput sets the attribute too
            dtype = first[name].dtype if name == "logits" else total.dtype
            first[name] = (total / samples).to(dtype)
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
