"""Optimisers by name: AdamW, SGD, SignGD and IVON (two of it), with no-decay parameter groups.

``build_optimizer("adamw", model, lr=5e-5, weight_decay=0.01)`` puts every trainable weight in a
decayed group and every bias and norm weight in an undecayed one (landscape.md §4, kernel.md §10).
Norms are found by module type, so PEFT/DDP prefixes and Llama's ``input_layernorm`` naming do
not matter.

IVON keeps a Gaussian posterior over the trainable weights. Its gradient is the
average of gradient *samples*, each taken inside ``sampled_params(train=True)``; a training loop
therefore wraps every micro-batch (and every Monte Carlo draw) in :func:`ivon_step_context` and
calls ``optimizer.step()`` once per optimiser step::

    optimizer = build_optimizer("ivon", model, lr=0.4, weight_decay=1e-8, ivon_ess=len(train))
    scale = accumulation_loss_scale(optimizer, accumulation_steps)
    for micro_batch in step_batches:
        for _ in range(train_mc_samples(optimizer)):
            with ivon_step_context(optimizer):
                (loss_fn(model, micro_batch) * scale).backward()
    optimizer.step()
    optimizer.zero_grad()

The same loop is correct for the other optimisers: the context is then a null context, the
Monte Carlo count is 1 and ``scale`` is ``1 / accumulation_steps``.

``ivon`` is adaptlab's own IVON (:class:`adaptlab.training.ivon.IVON`, per-parameter fp32
state, the same noise on every process), written from the paper. ``ivon_opt`` is the
``ivon-opt`` package, kept to compare against: it is GPL-3.0-or-later, so adaptlab installs it
only with its test dependencies (the ``dev`` extra) and imports it, through
:mod:`adaptlab.training.ivon_optim`, only when ``ivon_opt`` is built. The same loop drives both.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from adaptlab.training.errors import TrainingError
from adaptlab.training.ivon import IVON
from adaptlab.training.ivon_ops import summary_stats
from adaptlab.training.ivon_zero import ZeroIVON

IVON_MISSING = (
    "optimizer=ivon_opt needs the ivon-opt package, which is GPL-3.0-or-later and so only a "
    "test dependency of adaptlab (pip install 'adaptlab[dev]', for comparisons); use "
    "optimizer=ivon, adaptlab's own IVON."
)

# A norm class, or a base class of it, is named like LayerNorm, LlamaRMSNorm, BatchNorm2d.
_NORM_NAME = re.compile(r"Norm(\d+d)?$")


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer: a class in its MRO is named ``*Norm[Nd]``."""
    return any(_NORM_NAME.search(cls.__name__) for cls in type(module).__mro__)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into a decayed group and a no-decay group.

    The no-decay group holds every parameter registered as ``bias`` on its module and every
    parameter of a norm module (:func:`is_norm`); the decayed group holds the rest. Frozen
    parameters are left out, shared (tied) parameters appear once, and empty groups are dropped.

    Args:
        model: any module (plain, PEFT- or DDP-wrapped).
        weight_decay: decay of the first group.

    Returns:
        Groups ``{"params", "param_names", "weight_decay"}`` for ``torch.optim`` constructors.

    Raises:
        TrainingError: negative ``weight_decay``, or no trainable parameter.
    """
    if weight_decay < 0:
        raise TrainingError(f"weight_decay={weight_decay} is negative; use 0 or more.")
    decay: dict[str, nn.Parameter] = {}
    no_decay: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        norm = is_norm(module)
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{name}" if module_name else name
            (no_decay if norm or name == "bias" else decay)[full_name] = param
    if not seen:
        raise TrainingError(
            f"{type(model).__name__} has no trainable parameter; unfreeze some (check the "
            "freezing flags and the PEFT method) before building the optimiser."
        )
    groups = [
        {"params": list(decay.values()), "param_names": list(decay), "weight_decay": weight_decay},
        {"params": list(no_decay.values()), "param_names": list(no_decay), "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters with ``requires_grad``, each once, in ``model.parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


class SignSGD(torch.optim.Optimizer):
    """SGD on the sign of the gradient, with decoupled weight decay.

    Per parameter, with u = sign(g): ``buf <- momentum * buf + u`` (``buf = u`` on the first
    step; no buffer when ``momentum`` is 0), then ``p <- p * (1 - lr * weight_decay) - lr * buf``.
    With momentum 0 this equals LM-Kernel-FT's ``--optimizer_variant signgd`` (torch SGD on the
    signed gradient, whose coupled decay is then the same update).

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        momentum: heavy-ball momentum on the signed gradient.
        weight_decay: decoupled decay rate (multiplied by ``lr``).
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0:
            raise TrainingError(f"SignSGD lr={lr} is negative; use a positive learning rate.")
        if not 0.0 <= momentum < 1.0:
            raise TrainingError(f"SignSGD momentum={momentum} is outside [0, 1); pick 0 or 0.9.")
        if weight_decay < 0:
            raise TrainingError(f"SignSGD weight_decay={weight_decay} is negative; use 0 or more.")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update of every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = torch.sign(param.grad)
                if momentum:
                    state = self.state[param]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = update.clone()
                    else:
                        state["momentum_buffer"].mul_(momentum).add_(update)
                    update = state["momentum_buffer"]
                if decay:
                    param.mul_(1.0 - lr * decay)
                param.add_(update, alpha=-lr)
        return loss


def ivon_installed() -> bool:
    """Whether ``ivon-opt`` (a test dependency) is installed, without importing it."""
    return importlib.util.find_spec("ivon") is not None


def import_ivon_optim() -> ModuleType:
    """:mod:`adaptlab.training.ivon_optim`, which needs the GPL-licensed ``ivon-opt``.

    Raises:
        TrainingError: ``ivon-opt`` is not installed (:data:`IVON_MISSING`).
    """
    if not ivon_installed():
        raise TrainingError(IVON_MISSING)
    from adaptlab.training import ivon_optim

    return ivon_optim


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimiser under wrappers that keep it as ``.optimizer`` (accelerate's)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def hess_summary(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """IVON's Hessian diagonal h summarised for the training log (``{}`` for other optimisers).

    Returns:
        ``hess_mean``, ``hess_std`` (population), ``hess_min``, ``hess_median`` (lower middle)
        and ``hess_max`` over every entry: adaptlab's IVON through ``hess_stats()``, ivon-opt's
        from the flat ``hess`` buffer of each parameter group. h that stays at ``hess_init``
        means the posterior is not learning curvature (ivon issue #1, peft_methods.md §11).
    """
    inner = unwrap_optimizer(optimizer)
    if not uses_ivon(inner):
        return {}
    if isinstance(inner, IVON):
        stats = inner.hess_stats()
    else:
        values = torch.cat([g["hess"].detach().float().flatten() for g in inner.param_groups])
        stats = summary_stats(values)
    return {f"hess_{key}": value for key, value in stats.items()}


def uses_ivon(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` (plain or wrapped) is IVON, adaptlab's or ``ivon-opt``'s.

    Never imports ``ivon``: when nothing has imported it, no ``ivon-opt`` optimiser can exist.
    """
    inner = unwrap_optimizer(optimizer)
    ivon_opt = sys.modules.get("ivon")
    return isinstance(inner, IVON) or (ivon_opt is not None and isinstance(inner, ivon_opt.IVON))


def ivon_step_context(
    optimizer: torch.optim.Optimizer, train: bool = True
) -> contextlib.AbstractContextManager[None]:
    """The context every micro-batch forward/backward runs in.

    For IVON (possibly wrapped by accelerate) it draws weights from the posterior, and with
    ``train`` records the gradient as one sample on exit (each sample separate, see
    :class:`~adaptlab.training.ivon_optim.CheckedIVON`); with ``train=False`` it is a
    sampled-weights context for Monte Carlo prediction. For any other optimiser it does nothing.

    Gradient-norm clipping of ``p.grad`` has no effect on IVON (it has read the sample already);
    use ``ivon_clip_radius`` instead. fp16 loss scaling is not supported: IVON would record
    scaled gradients.

    Args:
        optimizer: the training optimiser, plain or wrapped.
        train: record the gradient sample (training) or only perturb the weights (prediction).

    Returns:
        A context manager.
    """
    inner = unwrap_optimizer(optimizer)
    if isinstance(inner, IVON):
        return inner.sampled_params(train)
    if uses_ivon(optimizer):
        return import_ivon_optim().separate_sample(inner, train)
    return contextlib.nullcontext()


def train_mc_samples(optimizer: torch.optim.Optimizer) -> int:
    """Posterior draws per micro-batch during training: IVON's ``mc_samples``, else 1."""
    return unwrap_optimizer(optimizer).mc_samples if uses_ivon(optimizer) else 1


def accumulation_loss_scale(optimizer: torch.optim.Optimizer, accumulation_steps: int) -> float:
    """Factor for each micro-batch loss when a step spans ``accumulation_steps`` micro-batches.

    Ordinary optimisers sum the micro-batch gradients, so a per-micro-batch mean loss is
    divided by the number of micro-batches; IVON averages its gradient samples itself, so the
    loss is left as it is (dividing would shrink both its gradient and its Hessian estimate).

    Returns:
        ``1 / accumulation_steps``, or ``1.0`` for IVON.

    Raises:
        TrainingError: ``accumulation_steps`` below 1.
    """
    if accumulation_steps < 1:
        raise TrainingError(
            f"accumulation_steps={accumulation_steps} must be at least 1 (1 = no accumulation)."
        )
    if uses_ivon(optimizer):
        return 1.0
    return 1.0 / accumulation_steps


@dataclass(frozen=True)
class OptimizerSettings:
    """Everything an optimiser builder may read.

    Attributes:
        lr: learning rate (IVON: O(0.1-1), not 1e-4; peft_methods.md §6).
        weight_decay: decay of weights (never of biases or norm weights); for IVON the prior
            precision δ of every trainable weight (ViLoRA: 1e-8).
        momentum: SGD / SignGD momentum.
        betas: AdamW betas; IVON uses ``betas[0]`` as its β1.
        eps: AdamW epsilon.
        ivon_ess: IVON effective sample size λ, normally the training-set size.
        ivon_hess_init: initial Hessian diagonal h0.
        ivon_mc_samples: posterior draws per micro-batch (see :func:`train_mc_samples`).
        ivon_beta2: Hessian EMA rate β2.
        ivon_clip_radius: elementwise clip ρ of the preconditioned update (ViLoRA: 1e-3).
        ivon_hess_approx: ``"price"`` or ``"gradsq"``.
        ivon_sync: all-reduce the gradient samples across processes (DDP).
        ivon_seed: seed of ``ivon``'s posterior draws (equal on every process).
        ivon_zero: build ``ivon`` as :class:`~adaptlab.training.ivon_zero.ZeroIVON`, the
            optimiser of a DeepSpeed ZeRO engine.
    """

    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    ivon_ess: float | None = None
    ivon_hess_init: float = 1.0
    ivon_mc_samples: int = 1
    ivon_beta2: float = 0.99999
    ivon_clip_radius: float = math.inf
    ivon_hess_approx: str = "price"
    ivon_sync: bool = False
    ivon_seed: int = 0
    ivon_zero: bool = False


def _adamw(model: nn.Module, s: OptimizerSettings) -> torch.optim.Optimizer:
    groups = param_groups(model, s.weight_decay)
    return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, eps=s.eps)


def _sgd(model: nn.Module, s: OptimizerSettings) -> torch.optim.Optimizer:
    return torch.optim.SGD(param_groups(model, s.weight_decay), lr=s.lr, momentum=s.momentum)


def _signgd(model: nn.Module, s: OptimizerSettings) -> torch.optim.Optimizer:
    return SignSGD(param_groups(model, s.weight_decay), lr=s.lr, momentum=s.momentum)


def _ivon_arguments(model: nn.Module, s: OptimizerSettings) -> tuple[list[nn.Parameter], dict]:
    """The trainable parameters and the keyword arguments both IVONs take.

    One group: IVON's weight decay is the prior precision of every weight, as in ViLoRA.
    """
    if s.ivon_ess is None or not s.ivon_ess > 0:
        raise TrainingError(
            f"IVON needs a positive effective sample size (got ivon_ess={s.ivon_ess}); pass the "
            "number of training examples."
        )
    params = trainable_parameters(model)
    if not params:
        raise TrainingError(
            f"{type(model).__name__} has no trainable parameter; unfreeze some before building "
            "IVON."
        )
    arguments = dict(
        lr=s.lr,
        ess=s.ivon_ess,
        hess_init=s.ivon_hess_init,
        beta1=s.betas[0],
        beta2=s.ivon_beta2,
        weight_decay=s.weight_decay,
        mc_samples=s.ivon_mc_samples,
        hess_approx=s.ivon_hess_approx,
        clip_radius=s.ivon_clip_radius,
        sync=s.ivon_sync,
    )
    return params, arguments


def _ivon_opt(model: nn.Module, s: OptimizerSettings) -> torch.optim.Optimizer:
    ivon_optim = import_ivon_optim()
    params, arguments = _ivon_arguments(model, s)
    if s.ivon_mc_samples < 1:
        raise TrainingError(f"ivon_mc_samples={s.ivon_mc_samples} must be at least 1.")
    methods = ivon_optim.CheckedIVON.hessian_approx_methods
    if s.ivon_hess_approx not in methods:
        raise TrainingError(
            f"Unknown ivon_hess_approx {s.ivon_hess_approx!r}; choose from {', '.join(methods)}."
        )
    placements = sorted({f"{p.device}/{p.dtype}" for p in params})
    if len(placements) > 1:
        raise TrainingError(
            "IVON keeps one flat state buffer, so all trainable parameters must share one device "
            f"and dtype (found {', '.join(placements)}); move the model first and keep the "
            "trainable weights in one dtype."
        )
    return ivon_optim.CheckedIVON(params, **arguments)


def _ivon(model: nn.Module, s: OptimizerSettings) -> torch.optim.Optimizer:
    params, arguments = _ivon_arguments(model, s)
    kind = ZeroIVON if s.ivon_zero else IVON
    return kind(params, **arguments, seed=s.ivon_seed)


OPTIMIZERS: dict[str, Callable[[nn.Module, OptimizerSettings], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "sgd": _sgd,
    "signgd": _signgd,
    "ivon": _ivon,
    "ivon_opt": _ivon_opt,
}
IVON_OPTIMIZERS = frozenset({"ivon", "ivon_opt"})
"""The names of IVON (adaptlab's own and ivon-opt's): both sample the weights and read each
gradient sample themselves."""
WHOLE_TRAINABLE_OPTIMIZERS = IVON_OPTIMIZERS
"""Optimisers that need the whole trainable weights and gradients on every rank (IVON samples
whole weights, and its noise of a parameter is drawn whole): never FSDP-sharded. Under DeepSpeed
ZeRO, ``ivon`` runs as :class:`~adaptlab.training.ivon_zero.ZeroIVON` on the engine's
partitions; ``ivon_opt`` cannot run there."""


def build_optimizer(
    name: str,
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    ivon_ess: float | None = None,
    ivon_hess_init: float = 1.0,
    ivon_mc_samples: int = 1,
    ivon_beta2: float = 0.99999,
    ivon_clip_radius: float = math.inf,
    ivon_hess_approx: str = "price",
    ivon_sync: bool = False,
    ivon_seed: int = 0,
    ivon_zero: bool = False,
) -> torch.optim.Optimizer:
    """The optimiser ``name`` over the trainable parameters of ``model``.

    Build it after the model is on its device (IVON allocates its state there) and after
    freezing (frozen parameters are left out). Arguments are those of
    :class:`OptimizerSettings`.

    Args:
        name: a key of :data:`OPTIMIZERS`.
        model: the model to train (plain or PEFT-wrapped).

    Returns:
        ``torch.optim.AdamW``, ``torch.optim.SGD``, :class:`SignSGD`,
        :class:`~adaptlab.training.ivon_optim.CheckedIVON` or
        :class:`~adaptlab.training.ivon.IVON` (:class:`~adaptlab.training.ivon_zero.ZeroIVON`
        with ``ivon_zero``).

    Raises:
        TrainingError: unknown name, negative lr or weight decay, IVON without ``ivon_ess``,
            ``ivon_opt`` without ``ivon-opt`` installed, no trainable parameter.
    """
    if name not in OPTIMIZERS:
        raise TrainingError(f"Unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}.")
    if lr < 0:
        raise TrainingError(f"lr={lr} is negative; use a positive learning rate.")
    if weight_decay < 0:
        raise TrainingError(f"weight_decay={weight_decay} is negative; use 0 or more.")
    settings = OptimizerSettings(
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        betas=betas,
        eps=eps,
        ivon_ess=ivon_ess,
        ivon_hess_init=ivon_hess_init,
        ivon_mc_samples=ivon_mc_samples,
        ivon_beta2=ivon_beta2,
        ivon_clip_radius=ivon_clip_radius,
        ivon_hess_approx=ivon_hess_approx,
        ivon_sync=ivon_sync,
        ivon_seed=ivon_seed,
        ivon_zero=ivon_zero,
    )
    return OPTIMIZERS[name](model, settings)
