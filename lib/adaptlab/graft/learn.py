"""Mask learning: the §5 loop of graft.md, with the best (train + dev) mask kept.

Per mask step:

1. θ ← θ(γ) with the continuous γ; the model in eval mode (no dropout).
2. For up to A batches: L_t = the task loss, backward (gradients accumulate in ``.grad``).
3. Ḡ = η · (Σ_t ∂L_t/∂θ) ⊙ Δ / n; S ← S − (1 − 2b) ⊙ Ḡ ⊙ σ'(S − β) (:mod:`adaptlab.graft.mask`).
4. θ ← θ(γ_bin); score on the training examples of the first A batches and on dev; the mask
   with the highest train + dev score so far is the best (``>=``: a later tie wins).

Step 0 is the base patch itself, scored the same way, so ``best_step == 0`` says no learned mask
did better than the patch. θ is back at θ_pre after every step.

Example::

    tensors = collect(model, names, finetuned_state)       # θ_pre, θ_ft of E
    tensors.base = top_delta_patch([tensors.delta(i) for i in range(len(tensors))], k)
    tensors.scores = init_scores(...)
    result = learn_mask(model, tensors, settings, batches_of_step, score, on_step)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from adaptlab.graft.mask import binary, gamma, update_scores
from adaptlab.graft.sharded import all_sum, split_batches
from adaptlab.graft.tensors import GraftTensors, local

LossFn = Callable[[nn.Module, Mapping[str, Tensor]], Tensor]
"""``(model, batch) -> scalar loss`` of one batch (the task loss, mean over its examples)."""
ScoreFn = Callable[[nn.Module], dict[str, dict[str, Any]]]
"""``model -> {"train": metrics, "dev": metrics}`` of the model as it stands."""


@dataclass(frozen=True)
class MaskSettings:
    """The hyper-parameters of §4–§5.

    Attributes:
        lr: η, the step on S (1e7 in the paper's scripts: σ' ≈ 5e-5 and |Δ| is small).
        beta: β, ``sigmoid_bias``.
        steps: mask steps (0: evaluate the base patch only).
        metric: the score whose train + dev sum selects the best mask (``accuracy``; ``f1``
            for MRPC/QQP).
    """

    lr: float = 1e7
    beta: float = 10.0
    steps: int = 10
    metric: str = "accuracy"


@dataclass
class MaskHistory:
    """Where mask learning stands: per-step records, the best step and its scores."""

    records: list[dict[str, Any]] = field(default_factory=list)
    best_step: int | None = None
    best_value: float = float("-inf")
    best_scores: list[Tensor] | None = None


def prepare_model(model: nn.Module, tensors: GraftTensors) -> None:
    """Gradients only for the eligible parameters; eval mode (no dropout)."""
    eligible = {id(p) for p in tensors.params}
    for p in model.parameters():
        p.requires_grad_(id(p) in eligible)
    model.eval()


def gammas(tensors: GraftTensors, beta: float) -> list[Tensor]:
    """The continuous γ of every eligible tensor."""
    return [gamma(b, s, beta) for b, s in zip(tensors.base, tensors.scores, strict=True)]


def binary_masks(tensors: GraftTensors, beta: float) -> list[Tensor]:
    """γ_bin of every eligible tensor (bool)."""
    return [binary(b, s, beta) for b, s in zip(tensors.base, tensors.scores, strict=True)]


def accumulate_gradients(
    model: nn.Module, tensors: GraftTensors, batches: Sequence[Mapping[str, Tensor]], loss: LossFn
) -> float:
    """Σ_t ∂L_t/∂θ into the eligible parameters' ``.grad`` at the model's current weights.

    Sharded (FSDP2), every rank is given the same n batches and runs its share of them
    (:func:`~adaptlab.graft.sharded.split_batches`); FSDP2 averages the gradients over the W
    ranks, so the local shard of ``.grad`` holds (1/W) Σ_t ∂L_t/∂θ.

    Returns:
        The mean loss of the n batches (over every rank).
    """
    for p in tensors.params:
        p.grad = None
    total = 0.0
    for batch, weight in split_batches(batches, tensors.rank, tensors.world):
        value = loss(model, batch)
        (value if weight == 1.0 else value * weight).backward()
        total += weight * float(value.detach())
    return all_sum(total, tensors) / max(len(batches), 1)


def _grad_times_delta(tensors: GraftTensors, i: int, p: Tensor, scale: float) -> Tensor:
    """scale · ∂L/∂θ_i ⊙ Δ_i, computed into the fresh Δ_i (no other temporary)."""
    delta = tensors.delta(i)
    if p.grad is None:
        return torch.zeros_like(delta)
    return delta.mul_(local(p.grad)).mul_(scale)


def mask_step(
    model: nn.Module,
    tensors: GraftTensors,
    batches: Sequence[Mapping[str, Tensor]],
    loss: LossFn,
    settings: MaskSettings,
) -> float:
    """One §5 update of S in place; θ is left at θ_pre. Returns the mean training loss at θ(γ).

    Tensor by tensor: θ(γ) is written without a list of every γ, and each S is updated from
    its gradient as soon as it is read, so no second copy of all gradients exists.
    """
    for i, (b, s) in enumerate(zip(tensors.base, tensors.scores, strict=True)):
        tensors.set_tensor(i, gamma(b, s, settings.beta))
    mean_loss = accumulate_gradients(model, tensors, batches, loss)
    scale = tensors.world / max(len(batches), 1)
    for i, p in enumerate(tensors.params):
        g = _grad_times_delta(tensors, i, p, scale)
        p.grad = None
        scores = tensors.scores[i]  # host-resident S is updated where it lives
        update_scores(scores, tensors.base[i], g.to(scores.device), settings.beta, settings.lr)
    tensors.reset()
    return mean_loss


def evaluate_binary(
    model: nn.Module, tensors: GraftTensors, beta: float, score: ScoreFn
) -> dict[str, Any]:
    """Scores of θ(γ_bin) and the mask's size; θ is left at θ_pre."""
    masks = binary_masks(tensors, beta)
    tensors.set_binary(masks)
    with torch.no_grad():
        metrics = score(model)
    tensors.reset()
    n_grafted = all_sum(sum(int(m.sum()) for m in masks), tensors)
    return {"n_grafted": int(n_grafted), **metrics}


def learn_mask(
    model: nn.Module,
    tensors: GraftTensors,
    settings: MaskSettings,
    batches_of_step: Callable[[int], Sequence[Mapping[str, Tensor]]],
    loss: LossFn,
    score: ScoreFn,
    *,
    history: MaskHistory | None = None,
    on_step: Callable[[int, MaskHistory, bool], None] | None = None,
    progress: bool = True,
) -> MaskHistory:
    """Run the mask steps from where ``history`` stands, keeping the best mask's scores.

    Args:
        model: the pretrained model holding θ_pre (:func:`prepare_model` is applied).
        tensors: θ_pre, θ_ft, b and S (S updated in place).
        settings: η, β, steps, selection metric.
        batches_of_step: ``step (1-based) -> up to A batches`` for that step's update.
        loss: the task loss of a batch.
        score: train and dev metrics of the model as it stands.
        history: a resumed history (its last record's step is the last step done).
        on_step: called after each step with ``(step, history, improved)``, e.g. to save the
            best mask and the resume state.
        progress: show a progress bar (steps/s, loss, train + dev score).

    Sharded (FSDP2), every rank calls it with the same batches and a ``score`` that every rank
    runs (its forward passes are collectives); ``best_scores`` then holds this rank's rows
    (:func:`adaptlab.graft.sharded.gather_mask` assembles them for saving).

    Returns:
        The history; ``best_scores`` holds a CPU copy of the best S.
    """
    prepare_model(model, tensors)
    history = history or MaskHistory()
    done = history.records[-1]["step"] if history.records else -1

    def record(step: int, train_loss: float | None) -> None:
        metrics = evaluate_binary(model, tensors, settings.beta, score)
        value = metrics["train"][settings.metric] + metrics["dev"][settings.metric]
        history.records.append({"step": step, "train_loss": train_loss, **metrics})
        improved = value >= history.best_value
        if improved:
            history.best_step, history.best_value = step, value
            history.best_scores = [s.detach().to("cpu", copy=True) for s in tensors.scores]
        if on_step is not None:
            on_step(step, history, improved)

    if done < 0:
        record(0, None)
        done = 0
    bar = tqdm(total=settings.steps, initial=done, desc="mask steps", unit="step",
               disable=not progress)  # fmt: skip
    for step in range(done + 1, settings.steps + 1):
        train_loss = mask_step(model, tensors, batches_of_step(step), loss, settings)
        record(step, train_loss)
        last = history.records[-1]
        bar.update(1)
        bar.set_postfix(
            loss=f"{train_loss:.4f}",
            train=f"{last['train'][settings.metric]:.3f}",
            dev=f"{last['dev'][settings.metric]:.3f}",
            grafted=last["n_grafted"],
        )
    bar.close()
    return history
