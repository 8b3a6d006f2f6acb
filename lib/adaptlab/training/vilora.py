"""ViLoRA: AdaLoRA ranks allocated by IVON's posterior instead of sensitivity (peft_methods.md §8).

IVON trains each weight as a Gaussian N(μ, σ²): μ is the parameter, σ = 1/√(ess·(h + wd)) comes
from the optimiser's Hessian diagonal h. ViLoRA scores every entry of AdaLoRA's ``lora_A``
[r, d_in], ``lora_E`` [r, 1] and ``lora_B`` [d_out, r] by one of :data:`CRITERIA`, and AdaLoRA's
own budget schedule and masking (PEFT's ``RankAllocator``) keep the triplets that score highest::

    cfg = FinetuneConfig(method="adalora", optimizer="ivon", vilora_criterion="SNR_mean_abs")
    model = METHODS["adalora"].prepare(model, cfg, total_steps)  # installs the allocator
    ...
    optimizer.step()
    METHODS["adalora"].after_step(model, step, optimizer)     # σ is read from the optimiser

Unlike the sensitivity score, the posterior scores are recomputed only on masking steps
(tinit < t ≤ T − tfinal and t % ΔT = 0), with no EMA and no uncertainty term, and need no
gradients. σ is looked up by parameter identity, so the optimiser's parameter order does not
matter (upstream assumed it equals ``named_parameters()``, peft_methods.md §11).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from peft.tuners.adalora.layer import RankAllocator
from torch import nn

from adaptlab.training.errors import TrainingError
from adaptlab.training.ivon import IVON
from adaptlab.training.ivon_zero import ZeroIVON
from adaptlab.training.optim import unwrap_optimizer, uses_ivon

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(μ, σ) -> score``: elementwise over tensors of one shape, higher = more important."""

# ---------------------------------------------------------------------------------------------
# Scores of one entry's posterior N(μ, σ²)


def _folded_excess(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E|θ| − |μ| = σ√(2/π)·exp(−μ²/(2σ²)) − |μ|·erfc(|μ|/(σ√2)), without cancelling |μ|."""
    a = mu.abs()
    return sigma * math.sqrt(2 / math.pi) * torch.exp(-(a**2) / (2 * sigma**2)) - a * torch.erfc(
        a / (sigma * math.sqrt(2))
    )


def folded_normal_mean(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E|θ| for θ ~ N(μ, σ²): μ·erf(μ/(σ√2)) + σ√(2/π)·exp(−μ²/(2σ²)) (the folded normal)."""
    return mu.abs() + _folded_excess(mu, sigma)


def snr_mean_abs(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E|θ| / sd|θ| with sd|θ|² = μ² + σ² − (E|θ|)² (ViLoRA's default, "SNR(|θ|)").

    The variance is evaluated as σ² − d(2|μ| + d), d = E|θ| − |μ|, the same number without the
    cancellation of μ² against (E|θ|)² that loses it when |μ| ≫ σ.
    """
    d = _folded_excess(mu, sigma)
    return (mu.abs() + d) / torch.sqrt(sigma**2 - d * (2 * mu.abs() + d))


def snr(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """|μ| / σ."""
    return mu.abs() / sigma


def mean_abs(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """|μ| (σ unused)."""
    return mu.abs()


def inverse_sigma(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """1 / σ (μ unused)."""
    return 1 / sigma.expand_as(mu)


CRITERIA: dict[str, Criterion] = {
    "SNR_mean_abs": snr_mean_abs,
    "SNR": snr,
    "mean": mean_abs,
    "sigma": inverse_sigma,
    "E_mean_abs": folded_normal_mean,
}
"""The posterior criteria by the name ``vilora_criterion`` takes (all but ``sensitivity``)."""

RANDOM = "random"
"""The control criterion: every entry scores a uniform draw, seeded by the step and the
parameter's position, so a resumed run draws the same scores (no signal, same budget)."""


def element_scores(criterion: str, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The importance of every entry of a weight with posterior N(``mu``, ``sigma``²).

    Args:
        criterion: a key of :data:`CRITERIA`.
        mu: posterior means, any shape (e.g. ``lora_A`` [r, d_in]).
        sigma: posterior standard deviations, the shape of ``mu``.

    Returns:
        Scores [shape of ``mu``], fp32 on ``mu``'s device, computed in fp64; NaN (e.g. from a
        non-positive h + wd) becomes 0.

    Raises:
        TrainingError: an unknown criterion.
    """
    if criterion not in CRITERIA:
        raise TrainingError(
            f"Unknown posterior criterion {criterion!r}; choose from {', '.join(CRITERIA)}."
        )
    score = CRITERIA[criterion](mu.detach().double(), sigma.detach().double())
    return torch.where(torch.isnan(score), 0.0, score).float()


# ---------------------------------------------------------------------------------------------
# σ from the optimiser


def _sigma(hess: torch.Tensor, ess: float, weight_decay: float) -> torch.Tensor:
    return 1 / torch.sqrt(ess * (hess.detach().double() + weight_decay))


def posterior_sigmas(optimizer: torch.optim.Optimizer) -> dict[int, torch.Tensor]:
    """σ = 1/√(ess·(h + wd)) of every parameter an IVON optimiser trains.

    Args:
        optimizer: adaptlab's :class:`~adaptlab.training.ivon.IVON` (h from
            ``optimizer.state[p]["hess"]``, ``hess_init`` before its first step) or ivon-opt's
            ``IVON`` (h sliced from each group's flat ``hess`` buffer in the group's parameter
            order), plain or wrapped by accelerate; under DeepSpeed ZeRO h is gathered from
            the partitions (:class:`~adaptlab.training.ivon_zero.ZeroIVON`: every process
            calls it).

    Returns:
        ``{id(parameter): σ}``, σ [parameter's shape], fp64 on the parameter's device; ess and
        wd are those of the parameter's group.

    Raises:
        TrainingError: ``optimizer`` is not IVON.
    """
    inner = unwrap_optimizer(optimizer)
    sigmas: dict[int, torch.Tensor] = {}
    if isinstance(inner, ZeroIVON) and inner.attached:  # h gathered from the partitions
        group = inner.param_groups[0]
        for param, hess in inner.whole_hessians():
            sigmas[id(param)] = _sigma(hess, group["ess"], group["weight_decay"])
        return sigmas
    if isinstance(inner, IVON):
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state.get(param)
                hess = state["hess"] if state else torch.full_like(param, group["hess_init"])
                sigmas[id(param)] = _sigma(hess, group["ess"], group["weight_decay"])
        return sigmas
    if not uses_ivon(inner):
        raise TrainingError(
            f"A ViLoRA criterion reads IVON's posterior, but the optimiser is "
            f"{type(inner).__name__}; use optimizer=ivon or vilora_criterion=sensitivity."
        )
    for group in inner.param_groups:
        offset = 0
        for param in group["params"]:
            if param is None:
                continue
            hess = group["hess"][offset : offset + param.numel()].view(param.shape)
            sigmas[id(param)] = _sigma(hess, group["ess"], group["weight_decay"])
            offset += param.numel()
        if offset != group["hess"].numel():
            raise TrainingError(
                f"ivon-opt's Hessian buffer holds {group['hess'].numel()} entries but its "
                f"parameters {offset}; build the optimiser after the model's last change."
            )
    return sigmas


# ---------------------------------------------------------------------------------------------
# The rank allocator


class PosteriorRankAllocator(RankAllocator):
    """PEFT's AdaLoRA ``RankAllocator`` with element scores from IVON's posterior.

    The budget b(t) (cubic from b0 = init_r x matrices at tinit to bT = target_r x matrices at
    T − tfinal) and the triplet score S_k = s(E_k) + mean_j s(A_kj) + mean_i s(B_ik) are PEFT's;
    s(·) and when it is computed change (peft_methods.md §8, §9), and the mask drops exactly the
    b0 − b(t) lowest S, ties broken by position (PEFT drops every S ≤ the threshold, more than
    the budget when scores tie: :meth:`mask_to_budget`).

    Attributes:
        criterion: a key of :data:`CRITERIA`.
        optimizer: the IVON optimiser whose σ is read; set before every
            ``update_and_allocate`` (``adalora_after_step`` does).
        scores: ``{parameter name: s}``, s [the parameter's shape], from the last
            recomputation (empty before the first one and after the final mask).
    """

    def __init__(
        self, model: nn.Module, peft_config: Any, adapter_name: str, criterion: str
    ) -> None:
        if criterion not in CRITERIA and criterion != RANDOM:
            raise TrainingError(
                f"Unknown posterior criterion {criterion!r}; choose from {', '.join(CRITERIA)} "
                f"or {RANDOM}."
            )
        self.criterion = criterion
        self.optimizer: torch.optim.Optimizer | None = None
        self.step = 0
        super().__init__(model, peft_config, adapter_name)

    def reset_ipt(self) -> None:
        """Forget the scores (PEFT calls this once the final rank pattern is fixed)."""
        super().reset_ipt()
        self.scores: dict[str, torch.Tensor] = {}

    def scores_due(self, step: int) -> bool:
        """Whether step ``step`` (1-based) recomputes the scores: tinit < t ≤ T − tfinal and
        t % ΔT = 0."""
        config = self.peft_config
        last = config.total_step - config.tfinal
        return config.tinit < step <= last and step % config.deltaT == 0

    def update_scores(self, model: nn.Module) -> None:
        """Score every entry of the adapter's ``lora_A``, ``lora_E`` and ``lora_B`` from the
        current μ (the weights) and the optimiser's σ.

        Raises:
            TrainingError: no optimiser was set, or it does not train an adapter matrix.
        """
        if self.criterion == RANDOM:
            scored = [(n, p) for n, p in model.named_parameters() if self._scored(n)]
            for index, (name, param) in enumerate(scored):
                generator = torch.Generator().manual_seed(self.step * 100_003 + index)
                self.scores[name] = torch.rand(param.shape, generator=generator).to(param.device)
            return
        if self.optimizer is None:
            raise TrainingError(
                "The ViLoRA allocator has no optimiser to read σ from; call the method's "
                "after_step(model, step, optimizer)."
            )
        sigmas = posterior_sigmas(self.optimizer)
        for name, param in model.named_parameters():
            if not self._scored(name):
                continue
            if id(param) not in sigmas:
                raise TrainingError(
                    f"{name} is not trained by the IVON optimiser, so ViLoRA has no σ for it; "
                    "build the optimiser over the AdaLoRA model's trainable parameters."
                )
            self.scores[name] = element_scores(self.criterion, param, sigmas[id(param)])

    def update_and_allocate(
        self, model: nn.Module, global_step: int, force_mask: bool = False
    ) -> tuple[int, dict[str, list[bool]] | None]:
        """Recompute the scores when due, then mask to the step's budget when PEFT would.

        Args:
            model: the model under the PEFT wrapper (``AdaLoraModel.model``).
            global_step: 1-based optimiser step t.
            force_mask: mask even off the ΔT grid (PEFT's final mask at T − tfinal); scores are
                computed first if none exist yet.

        Returns:
            ``(budget, rank_pattern)``; the pattern maps each ``lora_E`` name to its kept
            triplets, or is ``None`` when this step does not mask.
        """
        self.step = global_step
        if self.scores_due(global_step):
            self.update_scores(model)
        budget, mask_ind = self.budget_schedule(global_step)
        if not (mask_ind or force_mask):
            return budget, None
        if not self.scores:
            self.update_scores(model)
        return budget, self.mask_to_budget(model, budget)

    def _scored(self, name: str) -> bool:
        return any(f"{m}.{self.adapter_name}" in name for m in ("lora_A", "lora_B", "lora_E"))

    def _element_score(self, n: str) -> torch.Tensor:
        return self.scores[n]

    def triplet_scores(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """S_k = s(E_k) + mean_j s(A_kj) + mean_i s(B_ik) of every matrix's r triplets.

        Returns:
            ``{lora_E parameter name: S}``, S [r], in ``named_parameters()`` order.
        """
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for name, _ in model.named_parameters():
            for kind, reduce in (("lora_A", 1), ("lora_B", 0), ("lora_E", None)):
                if f"{kind}.{self.adapter_name}" in name:
                    s = self.scores[name]
                    key = name.replace(kind, "lora_E")
                    parts.setdefault(key, {})[kind] = (
                        s.view(-1) if reduce is None else s.mean(dim=reduce)
                    )
        return {key: p["lora_E"] + p["lora_A"] + p["lora_B"] for key, p in parts.items()}

    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        """Zero the ``lora_E`` entries of the b0 − ``budget`` lowest triplet scores, exactly.

        PEFT masks every triplet with S ≤ the (b0 − b)-th smallest S; when scores tie (the
        ``sigma`` criterion while h is still near ``hess_init``, or a score clipped to 0) that
        masks more than the budget asks and the run ends below its target rank. Here ties are
        broken by position (a stable sort), so exactly ``budget`` triplets stay.

        Returns:
            ``{lora_E name: [r] kept flags}``.
        """
        triplets = self.triplet_scores(model)
        flat = torch.cat([s.float().cpu() for s in triplets.values()])
        drop = torch.zeros(flat.numel(), dtype=torch.bool)
        drop[torch.sort(flat, stable=True).indices[: self.init_bgt - budget]] = True
        rank_pattern, start = {}, 0
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, s in triplets.items():
                masked = drop[start : start + s.numel()]
                start += s.numel()
                params[name].masked_fill_(masked.view(-1, 1).to(params[name].device), 0.0)
                rank_pattern[name] = (~masked).tolist()
        return rank_pattern


def install_allocator(tuner: Any, criterion: str) -> PosteriorRankAllocator:
    """Replace an ``AdaLoraModel``'s sensitivity allocator by a :class:`PosteriorRankAllocator`.

    Args:
        tuner: the PEFT ``AdaLoraModel`` (``peft_model.base_model``).
        criterion: a key of :data:`CRITERIA`.

    Returns:
        The new allocator, also set as ``tuner.rankallocator``.
    """
    name = tuner.trainable_adapter_name
    allocator = PosteriorRankAllocator(tuner.model, tuner.peft_config[name], name, criterion)
    tuner.rankallocator = allocator
    return allocator
