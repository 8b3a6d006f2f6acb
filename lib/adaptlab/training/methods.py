"""Fine-tuning methods by name: which parameters train and how the model is wrapped.

| method    | trains                               | base weights        | checkpoints           |
|-----------|--------------------------------------|---------------------|-----------------------|
| ``full``  | every parameter                      | as loaded           | whole model (HF)      |
| ``lora``  | LoRA A, B on ``target_modules``       | frozen              | adapter only (PEFT)   |
| ``dora``  | LoRA + magnitude vector (DoRA)       | frozen              | adapter only (PEFT)   |
| ``adalora``| SVD-form LoRA with rank reallocation | frozen              | adapter + rank_pattern|
|           | (ViLoRA: ranks by IVON's posterior)  |                     |                       |
| ``bitfit``| biases only                          | frozen              | whole model (HF)      |
| ``qlora`` | LoRA                                 | bitsandbytes NF4    | adapter only (PEFT)   |
| ``houlsby``| bottleneck adapters after attention and FFN | frozen       | adapter (adaptlab)    |
| ``pfeiffer``| a bottleneck adapter after the FFN  | frozen              | adapter (adaptlab)    |
| ``parallel``| a bottleneck adapter beside the FFN | frozen              | adapter (adaptlab)    |
| ``prefix``, ``mam``, ``inducer``, ``kernel_adapter``, ``kernel_mix``: attention adapters  |
| (``adaptlab.training.kernel_view``); frozen base; adapter (adaptlab) checkpoints          |

The bottleneck and attention adapters are adaptlab's own (``adaptlab.adapters``: forward hooks
and transformers' attention registry); their checkpoints are PEFT-layout adaptlab adapter
folders (``adaptlab.adapters.folder``) that ``load_model`` reloads on their base. The other
adapters are PEFT's; this module only builds their configs, checks the names in
``target_modules`` against the real model before anything is loaded (PEFT silently skips a name
that matches nothing as long as another one matches), and applies the freezing flags on top.

AdaLoRA (P = B·diag(E)·A with ``lora_A`` [r, d_in], ``lora_E`` [r, 1], ``lora_B``
[d_out, r]) reallocates ranks only when ``update_and_allocate(step)`` runs after every optimiser
step with the true number of steps in its config (peft #432, #1801); :class:`Method` carries
that hook, its orthogonality regulariser (PEFT adds it only when the model computes its own
loss) and the allocator state a resumed run needs::

    method = get_method(cfg.method)
    check_method(cfg, model_skeleton(cfg.model), total_steps)   # before loading
    model = method.prepare(load_model(cfg.model, quantization=method.quantization), cfg,
                           total_steps)
    ...
    loss = objective(model, batch).loss + method.regularizer(model)
    optimizer.step()
    method.after_step(model, step, optimizer)

Its importance score is ``vilora_criterion``: ``sensitivity`` keeps PEFT's allocator (EMAs of
|θ ⊙ ∇θ| and their uncertainty, every step); the ViLoRA criteria (``SNR_mean_abs``, ``SNR``,
``mean``, ``sigma``, ``E_mean_abs``) score each entry from IVON's posterior N(μ, σ²), read from
the optimiser the hook receives, on masking steps only (:mod:`adaptlab.training.vilora`). The
saved adapter's ``rank_pattern`` (``lora_E`` name -> kept triplets) resizes every module,
rank 0 included, when the folder is loaded again.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from adaptlab.adapters.bottleneck import BottleneckConfig, attach_bottleneck, check_architecture
from adaptlab.adapters.settings import bottleneck_settings
from adaptlab.extract.points import unwrap
from adaptlab.training import kernel_view
from adaptlab.training.freezing import freeze
from adaptlab.training.optim import TrainingError
from adaptlab.training.posterior_settings import SENSITIVITY


class MethodSettings(Protocol):
    """The fields of a fine-tuning config a method reads (``MethodSettings`` has them all);
    a protocol, so this module needs no config import."""

    method: str
    target_modules: list[str]
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    adalora_init_r: int
    adalora_target_r: int
    adalora_tinit: int
    adalora_tfinal: int
    adalora_delta_t: int
    adalora_beta1: float
    adalora_beta2: float
    adalora_orth_reg_weight: float
    vilora_criterion: str
    adapter_reduction_factor: float
    adapter_dim: int | None
    adapter_activation: str
    adapter_scaling: float
    adapter_layer_norm: bool
    adapter_location: str
    fix_head: bool
    fix_embeddings: bool
    fix_first_n_layers: int
    gradient_checkpointing: bool


ALL_LINEAR = "all-linear"


def _no_regularizer(model: nn.Module) -> torch.Tensor | None:
    return None


def _no_after_step(model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> None:
    return None


def _no_state(model: nn.Module) -> dict[str, Any]:
    return {}


def _no_load_state(model: nn.Module, state: dict[str, Any]) -> None:
    return None


def _no_check(cfg: MethodSettings, skeleton: nn.Module) -> None:
    return None


@dataclass(frozen=True)
class Method:
    """A fine-tuning method.

    Attributes:
        name: the name users type.
        prepare: ``(model, cfg, total_steps) -> model``: wraps (PEFT) and freezes the loaded
            model and returns it in train mode.
        adapter: checkpoints hold only the adapter (PEFT format) instead of the whole model.
        quantization: how the base model is loaded (``"4bit"`` for QLoRA).
        requires: packages that must import before the model is loaded.
        uses_targets: whether ``target_modules`` is read (and so checked).
        regularizer: extra loss term of the model, or ``None``.
        after_step: ``(model, step, optimizer)``, called with the 1-based step and the
            optimiser after every optimiser step, before ``zero_grad``.
        state: method state a resumed run needs (beyond parameters and optimiser).
        load_state: restores :attr:`state`.
        whole_trainable: needs the whole trainable weights and gradients on every rank
            (AdaLoRA allocates ranks from whole gradients): FSDP then shards only the frozen
            weights, and ZeRO cannot run it.
        check: ``(cfg, skeleton)``: raises a :class:`UserError` for a model or setting the
            method cannot use, before the weights load.
    """

    name: str
    prepare: Callable[[nn.Module, MethodSettings, int], nn.Module]
    adapter: bool
    quantization: str | None = None
    requires: tuple[str, ...] = ()
    uses_targets: bool = False
    regularizer: Callable[[nn.Module], torch.Tensor | None] = _no_regularizer
    after_step: Callable[[nn.Module, int, torch.optim.Optimizer], None] = _no_after_step
    state: Callable[[nn.Module], dict[str, Any]] = _no_state
    load_state: Callable[[nn.Module, dict[str, Any]], None] = _no_load_state
    whole_trainable: bool = False
    check: Callable[[MethodSettings, nn.Module], None] = _no_check


# ---------------------------------------------------------------------------------------------
# Preparation


def _targets(cfg: MethodSettings) -> list[str] | str:
    return ALL_LINEAR if cfg.target_modules == [ALL_LINEAR] else list(cfg.target_modules)


def _finish(model: nn.Module, cfg: MethodSettings, biases_only: bool = False) -> nn.Module:
    freeze(
        model,
        fix_head=cfg.fix_head,
        fix_embeddings=cfg.fix_embeddings,
        fix_first_n_layers=cfg.fix_first_n_layers,
        biases_only=biases_only,
    )
    return model.train()


def _checkpointing(model: nn.Module, cfg: MethodSettings) -> None:
    if cfg.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (PEFT) without enable_input_require_grads.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _prepare_full(model: nn.Module, cfg: MethodSettings, total_steps: int) -> nn.Module:
    for param in model.parameters():
        param.requires_grad_(True)
    _checkpointing(model, cfg)
    return _finish(model, cfg)


def _prepare_bitfit(model: nn.Module, cfg: MethodSettings, total_steps: int) -> nn.Module:
    _checkpointing(model, cfg)
    return _finish(model, cfg, biases_only=True)


def _lora_config(cfg: MethodSettings, use_dora: bool = False) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=_targets(cfg),
        use_dora=use_dora,
        task_type="CAUSAL_LM",
    )


def _wrap(model: nn.Module, peft_config: Any, cfg: MethodSettings) -> nn.Module:
    from peft import get_peft_model

    if not hasattr(model, "prepare_inputs_for_generation"):  # a bare encoder (linear head)
        peft_config.task_type = "FEATURE_EXTRACTION"
    _checkpointing(model, cfg)
    return _finish(get_peft_model(model, peft_config), cfg)


def _prepare_lora(model: nn.Module, cfg: MethodSettings, total_steps: int) -> nn.Module:
    return _wrap(model, _lora_config(cfg), cfg)


def _prepare_dora(model: nn.Module, cfg: MethodSettings, total_steps: int) -> nn.Module:
    return _wrap(model, _lora_config(cfg, use_dora=True), cfg)


def _prepare_qlora(model: nn.Module, cfg: MethodSettings, total_steps: int) -> nn.Module:
    from peft import get_peft_model, prepare_model_for_kbit_training

    # Casts the non-quantized weights (norms, embeddings) to fp32 and freezes the base.
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    return _finish(get_peft_model(model, _lora_config(cfg)), cfg)


def _prepare_adalora(model: nn.Module, cfg: MethodSettings, total_steps: int) -> nn.Module:
    from peft import AdaLoraConfig

    config = AdaLoraConfig(
        init_r=cfg.adalora_init_r,
        target_r=cfg.adalora_target_r,
        tinit=cfg.adalora_tinit,
        tfinal=cfg.adalora_tfinal,
        deltaT=cfg.adalora_delta_t,
        beta1=cfg.adalora_beta1,
        beta2=cfg.adalora_beta2,
        orth_reg_weight=cfg.adalora_orth_reg_weight,
        total_step=total_steps,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=_targets(cfg),
        task_type="CAUSAL_LM",
    )
    model = _wrap(model, config, cfg)
    if cfg.vilora_criterion != SENSITIVITY:
        from adaptlab.training import vilora

        vilora.install_allocator(_peft_model(model).base_model, cfg.vilora_criterion)
    return model


def _bottleneck_config(cfg: MethodSettings) -> BottleneckConfig:
    return bottleneck_settings(cfg, cfg.method)


def _prepare_bottleneck(model: nn.Module, cfg: MethodSettings, total_steps: int) -> nn.Module:
    for param in model.parameters():
        param.requires_grad_(False)
    attach_bottleneck(model, _bottleneck_config(cfg))  # the adapters train
    _checkpointing(model, cfg)
    return _finish(model, cfg)


def _check_bottleneck(cfg: MethodSettings, skeleton: nn.Module) -> None:
    check_architecture(skeleton)
    _bottleneck_config(cfg).width(unwrap(skeleton).config.hidden_size)


def _bottleneck(name: str) -> Method:
    return Method(name, _prepare_bottleneck, adapter=True, check=_check_bottleneck)


def _finish_kernel_view(model: nn.Module, cfg: MethodSettings) -> nn.Module:
    _checkpointing(model, cfg)
    return _finish(model, cfg)


def _kernel_view(name: str) -> Method:
    prepare = kernel_view.preparer(name, _finish_kernel_view)
    return Method(name, prepare, adapter=True, check=kernel_view.checker(name))


# ---------------------------------------------------------------------------------------------
# AdaLoRA hooks


def _peft_model(model: nn.Module) -> Any:
    """The PeftModel under DDP-style wrappers."""
    while not hasattr(model, "peft_config") and isinstance(
        getattr(model, "module", None), nn.Module
    ):
        model = model.module
    return model


def _adalora_parts(model: nn.Module) -> tuple[Any, Any, str]:
    peft_model = _peft_model(model)
    tuner = peft_model.base_model
    name = tuner.trainable_adapter_name
    return tuner, tuner.peft_config[name], name


def adalora_orth_regularizer(model: nn.Module) -> torch.Tensor | None:
    """AdaLoRA's orthogonality penalty, as ``AdaLoraModel.forward`` adds it to a model loss.

    w * mean over the adapter's matrices of ||A Aᵀ - I||_F (``lora_A`` [r, d_in]) and
    ||Bᵀ B - I||_F (``lora_B`` [d_out, r]), w = ``orth_reg_weight``.

    Returns:
        Scalar tensor, or ``None`` when the weight is 0.
    """
    tuner, config, name = _adalora_parts(model)
    if config.orth_reg_weight == 0:
        return None
    terms = []
    for param_name, param in tuner.model.named_parameters():
        if ("lora_A" in param_name or "lora_B" in param_name) and name in param_name:
            cov = param @ param.T if "lora_A" in param_name else param.T @ param
            eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
            terms.append(torch.linalg.matrix_norm(cov - eye, ord="fro"))
    if not terms:
        return None
    return config.orth_reg_weight * torch.stack(terms).mean()


def adalora_after_step(model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> None:
    """Reallocate AdaLoRA ranks after optimiser step ``step`` (1-based), before ``zero_grad``.

    A ViLoRA allocator reads σ from ``optimizer`` (IVON, plain or wrapped); PEFT's sensitivity
    allocator reads the gradients and ignores it. An adapted module the loss never reaches (a
    pooler or MLM-head ``dense`` under a linear head) has no gradient: its sensitivity is 0, so
    its ranks are the first to go (PEFT would fail on the missing gradient).
    """
    from adaptlab.training.vilora import PosteriorRankAllocator

    tuner, _, name = _adalora_parts(model)
    if isinstance(tuner.rankallocator, PosteriorRankAllocator):
        tuner.rankallocator.optimizer = optimizer
    else:
        for param_name, param in tuner.model.named_parameters():
            if "lora_" in param_name and name in param_name and param.grad is None:
                param.grad = torch.zeros_like(param)
    tuner.update_and_allocate(step)


_ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc", "scores")
"""Allocator attributes a resume restores: PEFT's sensitivity EMAs, ViLoRA's last scores."""


def adalora_state(model: nn.Module) -> dict[str, Any]:
    """The rank allocator's scores (sensitivity EMAs or ViLoRA's last posterior scores,
    ``{parameter name: tensor}``) and the current rank pattern, for an exact resume."""
    tuner, config, _ = _adalora_parts(model)
    allocator = tuner.rankallocator
    state = {"rank_pattern": config.rank_pattern}
    for key in _ALLOCATOR_STATE:
        if hasattr(allocator, key):
            state[key] = getattr(allocator, key)
    return state


def adalora_load_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Restore :func:`adalora_state` onto a freshly prepared AdaLoRA model."""
    tuner, config, _ = _adalora_parts(model)
    config.rank_pattern = state["rank_pattern"]
    device = next(p.device for p in model.parameters() if p.requires_grad)
    for key in _ALLOCATOR_STATE:
        if hasattr(tuner.rankallocator, key) and key in state:
            setattr(tuner.rankallocator, key, {k: v.to(device) for k, v in state[key].items()})


METHODS: dict[str, Method] = {
    "full": Method("full", _prepare_full, adapter=False),
    "lora": Method("lora", _prepare_lora, adapter=True, uses_targets=True),
    "dora": Method("dora", _prepare_dora, adapter=True, uses_targets=True),
    "adalora": Method(
        "adalora",
        _prepare_adalora,
        adapter=True,
        uses_targets=True,
        regularizer=adalora_orth_regularizer,
        after_step=adalora_after_step,
        state=adalora_state,
        load_state=adalora_load_state,
        whole_trainable=True,
    ),
    "bitfit": Method("bitfit", _prepare_bitfit, adapter=False),
    "qlora": Method(
        "qlora",
        _prepare_qlora,
        adapter=True,
        quantization="4bit",
        requires=("bitsandbytes",),
        uses_targets=True,
    ),
    "houlsby": _bottleneck("houlsby"),
    "pfeiffer": _bottleneck("pfeiffer"),
    "parallel": _bottleneck("parallel"),
    **{name: _kernel_view(name) for name in kernel_view.TITLES},
}


def get_method(name: str) -> Method:
    """The method called ``name``; raises :class:`TrainingError` listing the choices."""
    if name not in METHODS:
        raise TrainingError(f"Unknown method {name!r}; choose from {', '.join(METHODS)}.")
    return METHODS[name]


# ---------------------------------------------------------------------------------------------
# Checks before loading


def linear_module_names(model: nn.Module) -> list[str]:
    """Sorted distinct last names of the linear layers of ``model`` (the usual targets)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_linear(m)})


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def check_target_modules(targets: list[str], model: nn.Module) -> None:
    """Every entry of ``targets`` names at least one module of ``model`` (PEFT's suffix rule).

    Args:
        targets: module names; a name matches a module whose dotted path equals it or ends
            with ``"." + name``. ``["all-linear"]`` is always valid.
        model: the model, e.g. its meta-device skeleton.

    Raises:
        TrainingError: a name that matches no module.
    """
    if targets == [ALL_LINEAR]:
        return
    names = [name for name, _ in model.named_modules()]
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in names):
            raise TrainingError(
                f"target_modules entry {target!r} matches no module of "
                f"{type(unwrap(model)).__name__}; its linear layers are "
                f"{', '.join(linear_module_names(model))}."
            )


def check_method(cfg: MethodSettings, skeleton: nn.Module, total_steps: int) -> Method:
    """Check ``cfg``'s method against the model and the run length, before loading weights.

    Args:
        cfg: the run config.
        skeleton: the model's module tree (``adaptlab.models.model_skeleton``).
        total_steps: optimiser steps of the run.

    Returns:
        The method.

    Raises:
        TrainingError: a missing package (bitsandbytes for QLoRA), a target module the model
            lacks, BitFit on a model without biases, too many frozen blocks, or an AdaLoRA
            schedule that leaves no budgeting phase.
        AdapterError: a model other than Llama or BERT/RoBERTa, or an adapter width of 0, for
            the bottleneck adapters.
    """
    method = get_method(cfg.method)
    for package in method.requires:
        try:
            importlib.import_module(package)
        except ImportError:
            raise TrainingError(
                f"method={cfg.method} needs the {package} package, which does not import here; "
                f"install it (pip install {package}) or pick method=lora."
            ) from None
    if method.uses_targets:
        check_target_modules(list(cfg.target_modules), skeleton)
    method.check(cfg, skeleton)
    if cfg.method == "bitfit" and not any(
        name.rsplit(".", 1)[-1] == "bias" for name, _ in skeleton.named_parameters()
    ):
        raise TrainingError(
            f"method=bitfit trains biases only, but {type(skeleton).__name__} has no bias "
            "parameters; pick lora or full."
        )
    n_layers = getattr(getattr(skeleton, "config", None), "num_hidden_layers", None)
    if n_layers is not None and cfg.fix_first_n_layers > n_layers:
        raise TrainingError(
            f"fix_first_n_layers={cfg.fix_first_n_layers} is more than the model's {n_layers} "
            "blocks."
        )
    if cfg.method == "adalora" and cfg.adalora_tinit >= total_steps - cfg.adalora_tfinal:
        raise TrainingError(
            f"AdaLoRA needs adalora_tinit + adalora_tfinal < total steps (a phase in which the "
            f"budget shrinks), but tinit={cfg.adalora_tinit} + tfinal={cfg.adalora_tfinal} = "
            f"{cfg.adalora_tinit + cfg.adalora_tfinal} and the run has {total_steps} steps; "
            "lower them or train longer."
        )
    return method


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, shared weights once, 4-bit weights unpacked.

    ZeRO-3 partitioned parameters count with their full size (``ds_numel``).
    """
    trainable = total = 0
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        n = getattr(param, "ds_numel", param.numel())
        if type(param).__name__ == "Params4bit":
            n *= 2 * param.element_size()  # two 4-bit values per stored byte (uint8 or packed)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
