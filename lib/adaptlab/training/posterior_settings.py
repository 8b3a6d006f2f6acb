"""The AdaLoRA / ViLoRA and IVON fields of a fine-tuning config (spec peft_methods.md §6–§9).

``FinetuneConfig`` inherits :class:`AdaLoRASettings` and :class:`IvonSettings`, so every field is
a CLI flag of ``scripts/finetune.py`` (``--vilora_criterion SNR --ivon_hess_init 0.1``) and a
YAML key. ViLoRA is ``method: adalora`` with an IVON optimiser and a posterior criterion::

    python scripts/finetune.py --method adalora --optimizer ivon \
        --vilora_criterion SNR_mean_abs --lr 0.4
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

SENSITIVITY = "sensitivity"
"""AdaLoRA's own importance score (sensitivity x uncertainty EMAs); every other criterion reads
IVON's posterior."""
CRITERIA = (SENSITIVITY, "SNR_mean_abs", "SNR", "mean", "sigma", "E_mean_abs", "random")
"""The names ``vilora_criterion`` may take (``adaptlab.training.vilora.CRITERIA`` scores them)."""
IVON_NAMES = ("ivon", "ivon_opt")
"""The ``optimizer`` names of IVON: adaptlab's own and the ivon-opt package."""


@dataclass
class AdaLoRASettings:
    """Settings of ``method: adalora`` (AdaLoRA, and ViLoRA with a posterior criterion).

    Args:
        adalora_init_r: AdaLoRA starting rank of every matrix.
        adalora_target_r: AdaLoRA average final rank (budget = target_r x matrices).
        adalora_tinit: AdaLoRA steps before the budget starts to shrink.
        adalora_tfinal: AdaLoRA last steps with the final rank pattern frozen.
        adalora_delta_t: AdaLoRA steps between two rank reallocations.
        adalora_beta1: AdaLoRA EMA rate of the sensitivity.
        adalora_beta2: AdaLoRA EMA rate of the uncertainty.
        adalora_orth_reg_weight: weight of AdaLoRA's orthogonality regulariser in the loss.
        vilora_criterion: importance score of a rank-1 triplet: ``sensitivity`` (AdaLoRA's
            sensitivity x uncertainty EMAs, any optimiser) or a ViLoRA score of IVON's posterior
            N(μ, σ²) (optimizer ``ivon``/``ivon_opt``): ``SNR_mean_abs`` (the paper's
            default, E|θ| / sd|θ|), ``SNR`` (|μ|/σ), ``mean`` (|μ|), ``sigma`` (1/σ) or
            ``E_mean_abs`` (E|θ|); or the control ``random`` (uniform scores, seeded by the
            step: the budget schedule without any importance signal).
    """

    adalora_init_r: int = 12
    adalora_target_r: int = 8
    adalora_tinit: int = 0
    adalora_tfinal: int = 0
    adalora_delta_t: int = 1
    adalora_beta1: float = 0.85
    adalora_beta2: float = 0.85
    adalora_orth_reg_weight: float = 0.5
    vilora_criterion: str = SENSITIVITY

    def adalora_checks(self) -> list[tuple[bool, str]]:
        """``(ok, message)`` for each setting (the config refuses the first one not ok)."""
        ivon = getattr(self, "optimizer", "") in IVON_NAMES
        return [
            (
                1 <= self.adalora_target_r <= self.adalora_init_r,
                f"adalora_target_r={self.adalora_target_r} must be between 1 and "
                f"adalora_init_r={self.adalora_init_r} (the final rank cannot exceed the "
                "initial one).",
            ),
            (
                min(self.adalora_tinit, self.adalora_tfinal) >= 0 and self.adalora_delta_t >= 1,
                "adalora_tinit and adalora_tfinal must be >= 0 and adalora_delta_t >= 1.",
            ),
            (
                0 < self.adalora_beta1 < 1 and 0 < self.adalora_beta2 < 1,
                f"adalora_beta1={self.adalora_beta1} and adalora_beta2={self.adalora_beta2} must "
                "be in (0, 1); AdaLoRA uses 0.85.",
            ),
            (
                self.vilora_criterion in CRITERIA,
                f"Unknown vilora_criterion {self.vilora_criterion!r}; choose from "
                f"{', '.join(CRITERIA)}.",
            ),
            (
                self.vilora_criterion == SENSITIVITY or ivon,
                f"vilora_criterion={self.vilora_criterion} reads IVON's posterior; use "
                "optimizer=ivon (or vilora_criterion=sensitivity with another optimiser).",
            ),
            (
                self.vilora_criterion == SENSITIVITY or getattr(self, "method", "") == "adalora",
                f"vilora_criterion={self.vilora_criterion} allocates AdaLoRA ranks; use "
                "method=adalora with it.",
            ),
        ]


@dataclass
class IvonSettings:
    """Settings of the IVON optimisers (``ivon``: adaptlab's own; ``ivon_opt``: the GPL
    ivon-opt package, only a test dependency, kept for comparisons).

    Args:
        ivon_ess: IVON effective sample size λ (None or 0: the number of training examples).
        ivon_hess_init: IVON initial Hessian diagonal h0 (> 0).
        ivon_mc_samples: IVON posterior draws per micro-batch in training (>= 1).
        ivon_beta2: IVON Hessian EMA rate, in [0, 1).
        ivon_clip_radius: IVON elementwise clip of the update (None: no clipping; ViLoRA 1e-3).
        ivon_hess_approx: IVON Hessian estimator, ``price`` or ``gradsq``.
        ivon_infer_mc_samples: posterior draws whose LOGITS (not probabilities) every
            evaluation averages (dev, test, MMLU, few-shot tasks; 0: the posterior mean, one
            forward pass; upstream ``--ivon_infer_mc_samples``): the LM logits of a prompt, or
            with ``head=linear`` the head's logits (STS-B: its predicted score), each draw
            perturbing the adapter and the head alike; seeded by ``seed`` and the step, so
            evaluations are reproducible; generation tasks refuse it.
        ivon_hessian_from: an ``ivon_hessian.safetensors`` saved by an earlier IVON run to start
            IVON's Hessian h from instead of ``ivon_hess_init`` (by parameter name; this run's
            ess and weight decay apply); its tensors must have the shapes of this run's
            trainable parameters (for AdaLoRA, load the ``ivon_hessian_resized`` file with the
            adapter whose rank pattern it matches). Safetensors only, never a pickle.
    """

    ivon_ess: float | None = None
    ivon_hess_init: float = 1.0
    ivon_mc_samples: int = 1
    ivon_beta2: float = 0.99999
    ivon_clip_radius: float | None = None
    ivon_hess_approx: Literal["price", "gradsq"] = "price"
    ivon_infer_mc_samples: int = 0
    ivon_hessian_from: str | None = None

    def ivon_checks(self) -> list[tuple[bool, str]]:
        """``(ok, message)`` for each setting (the config refuses the first one not ok)."""
        betas = getattr(self, "betas", (0.9, 0.999))
        ivon = getattr(self, "optimizer", "") in IVON_NAMES
        return [
            (
                self.ivon_ess is None or (math.isfinite(self.ivon_ess) and self.ivon_ess >= 0),
                f"ivon_ess={self.ivon_ess} must be > 0 (or 0 / omitted: the number of training "
                "examples).",
            ),
            (
                math.isfinite(self.ivon_hess_init) and self.ivon_hess_init > 0,
                f"ivon_hess_init={self.ivon_hess_init} must be > 0 (ViLoRA uses 1.0; lower it if "
                "h stays at its initial value).",
            ),
            (
                self.ivon_mc_samples >= 1,
                f"ivon_mc_samples={self.ivon_mc_samples} must be at least 1 (ViLoRA uses 1).",
            ),
            (
                not ivon or 0.0 <= betas[0] < 1.0,
                f"betas[0]={betas[0]} is IVON's momentum rate and must be in [0, 1).",
            ),
            (
                0.0 <= self.ivon_beta2 < 1.0,
                f"ivon_beta2={self.ivon_beta2} must be in [0, 1) (ViLoRA uses 0.99999).",
            ),
            (
                self.ivon_clip_radius is None or self.ivon_clip_radius > 0,
                f"ivon_clip_radius={self.ivon_clip_radius} must be > 0 (or omitted: no clip).",
            ),
            (
                self.ivon_infer_mc_samples >= 0,
                f"ivon_infer_mc_samples={self.ivon_infer_mc_samples} must be 0 (the mean) or more.",
            ),
            (
                self.ivon_hessian_from is None
                or str(self.ivon_hessian_from).endswith(".safetensors"),
                f"ivon_hessian_from={self.ivon_hessian_from} is not a .safetensors file; pass the "
                "ivon_hessian.safetensors (or _resized) an IVON run wrote (pickles are refused).",
            ),
            (
                ivon or (self.ivon_infer_mc_samples == 0 and self.ivon_hessian_from is None),
                "ivon_infer_mc_samples and ivon_hessian_from need an IVON optimiser; use "
                "optimizer=ivon.",
            ),
        ]
