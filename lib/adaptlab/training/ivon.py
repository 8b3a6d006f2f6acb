"""IVON (Shen et al. 2024, arXiv 2402.17641), written for adaptlab from peft_methods.md §6.

IVON keeps a diagonal Gaussian posterior N(m, σ²) over the weights: the mean m is the parameter
itself, and σ = 1/√(λ(h + δ)) comes from a Hessian estimate h (λ = ``ess``, δ =
``weight_decay``). Every forward/backward runs at a posterior draw θ_s = m + ε_s, inside
:meth:`IVON.sampled_params`; ``step()`` then moves m and h from the samples' average::

    optimizer = IVON(model.parameters(), lr=0.4, ess=len(train_set), weight_decay=1e-8)
    for micro_batch in step_batches:               # gradient accumulation
        for _ in range(optimizer.mc_samples):      # Monte Carlo draws
            with optimizer.sampled_params(train=True):
                loss_fn(model, micro_batch).backward()
    optimizer.step()

The constructor and ``sampled_params`` are those of ``ivon-opt``'s ``IVON`` (plus ``seed``), so
code written for that package switches by changing the import. Unlike it:

- the state is per parameter, fp32 on the parameter's device (``optimizer.state[p]["hess"]``,
  ``"momentum"`` and the step's sample sums), so parameter groups, several devices and bf16
  weights work, and ``state_dict()`` resumes a run exactly;
- a bf16 or fp16 parameter's mean m is kept in fp32 (``state[p]["master"]``) and written back
  rounded after each step: a bf16 weight cannot hold an update of 1e-4 of its size (its spacing
  is 2^-8 ≈ 4e-3 relative), so without the copy small steps would be rounded away;
- each ``sampled_params(train=True)`` exit records the gradient of that forward/backward only
  (gradients are zeroed on entry), so micro-batches and MC draws all count as samples, and a
  ``step()`` without a sample is an error instead of a crash;
- the noise of draw s of step t comes from a generator seeded by (``seed``, t, s): every process
  of a data-parallel run perturbs its weights alike, and ``sync=True`` averages the gradient
  and ε⊙g samples over the processes before the update.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from adaptlab.training.errors import TrainingError

HessApprox = Literal["price", "gradsq"]
_LOW_PRECISION = (torch.bfloat16, torch.float16)
"""Parameter dtypes whose mean m IVON keeps in an fp32 master copy."""
_SAMPLE_SUMS = {"price": "nxg_sum", "gradsq": "gsq_sum"}
"""The state key of each estimator's per-step sum: Σ_s ε_s ⊙ g_s (Price) or Σ_s g_s²."""


class IVON(torch.optim.Optimizer):
    """The IVON optimiser with per-parameter fp32 state (peft_methods.md §6).

    One step, with ĝ and ĥ averaged over the S samples recorded since the last step, t the
    step number, h0 = ``hess_init``, α = ``lr`` and ρ = ``clip_radius``:

    - ĝ = mean_s g_s; Price: ĥ = mean_s(ε_s ⊙ g_s) ⊙ λ(h + δ); gradsq: ĥ = mean_s(g_s²) ⊙ λ
    - g ← β1 g + (1 − β1) ĝ
    - h ← β2 h + (1 − β2) ĥ + ½(1 − β2)² (h − ĥ)² / (h + δ)
    - m ← m − α' clip((g / d + δ m) / (h + δ), ±ρ), the new h and g on the right;
      α' = α (h0 + δ) with ``rescale_lr`` (else α), d = 1 − β1^t with ``debias`` (else 1).

    Args:
        params: parameters or parameter groups; a group may set its own ``lr``,
            ``weight_decay``, ``ess``, ``hess_init``, ``beta1``, ``beta2`` and ``clip_radius``.
        lr: learning rate α (O(0.1-1) with ``rescale_lr``, not 1e-4).
        ess: effective sample size λ, normally the number of training examples.
        hess_init: initial Hessian diagonal h0.
        beta1: momentum rate β1, in [0, 1).
        beta2: Hessian rate β2, in [0, 1).
        weight_decay: prior precision δ (>= 0).
        mc_samples: posterior draws per micro-batch the training loop is asked to run (and
            closure calls per ``step(closure)``).
        hess_approx: ``"price"`` (ε⊙g, Price's theorem) or ``"gradsq"`` (squared gradients).
        clip_radius: elementwise clip ρ of the preconditioned update (``inf``: none).
        sync: with ``torch.distributed`` initialised, average the step's mean gradient and
            mean ε⊙g (or g²) over the processes before the update.
        debias: divide the momentum by 1 − β1^t.
        rescale_lr: multiply the learning rate by h0 + δ.
        seed: seed of the posterior draws (non-negative); equal seeds give equal draws.

    Raises:
        TrainingError: a setting outside its range (each named with the range).
    """

    hessian_approx_methods = tuple(_SAMPLE_SUMS)

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
        lr: float,
        ess: float,
        hess_init: float = 1.0,
        beta1: float = 0.9,
        beta2: float = 0.99999,
        weight_decay: float = 1e-4,
        mc_samples: int = 1,
        hess_approx: HessApprox = "price",
        clip_radius: float = math.inf,
        sync: bool = False,
        debias: bool = True,
        rescale_lr: bool = True,
        seed: int = 0,
    ) -> None:
        if not mc_samples >= 1:
            raise TrainingError(f"IVON mc_samples={mc_samples} must be at least 1.")
        if hess_approx not in _SAMPLE_SUMS:
            raise TrainingError(
                f"Unknown IVON hess_approx {hess_approx!r}; choose from {', '.join(_SAMPLE_SUMS)}."
            )
        if not (isinstance(seed, int) and seed >= 0):
            raise TrainingError(f"IVON seed={seed!r} must be a non-negative integer.")
        defaults = dict(
            lr=lr,
            ess=ess,
            hess_init=hess_init,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            clip_radius=clip_radius,
            step=0,
        )
        _check_hyperparameters(defaults)
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_hyperparameters(group)
        self.mc_samples = mc_samples
        self.hess_approx = hess_approx
        self.sync = sync
        self.debias = debias
        self.rescale_lr = rescale_lr
        self.seed = seed
        self._prediction_draws = 0  # draws with train=False, for a fresh seed each time

    # -----------------------------------------------------------------------------------------
    # State

    def _params(self) -> Iterator[tuple[dict[str, Any], nn.Parameter]]:
        """``(group, parameter)`` for every parameter, in group order."""
        for group in self.param_groups:
            for param in group["params"]:
                yield group, param

    def _param_state(self, param: nn.Parameter, group: dict[str, Any]) -> dict[str, Any]:
        """The parameter's state, created on first use on its device (fp32)."""
        state = self.state[param]
        if not state:
            zeros = torch.zeros_like(
                param, dtype=torch.float32, memory_format=torch.preserve_format
            )
            state["momentum"] = zeros.clone()
            state["hess"] = torch.full_like(zeros, group["hess_init"])
            state["grad_sum"] = zeros.clone()
            state[_SAMPLE_SUMS[self.hess_approx]] = zeros
            state["samples"] = 0
            if param.dtype in _LOW_PRECISION:
                state["master"] = param.detach().float()
        return state

    def _hess(self, param: nn.Parameter, group: dict[str, Any]) -> torch.Tensor:
        """h of ``param``: its state's, or ``hess_init`` before the first use (state untouched)."""
        state = self.state[param]
        if state:
            return state["hess"]
        return torch.full_like(param, group["hess_init"], dtype=torch.float32)

    def _mean(self, param: nn.Parameter) -> torch.Tensor:
        """The fp32 mean m of ``param``: its master copy, synced where the weight was changed
        from outside (AdaLoRA masking ranks, loaded weights), else the weight itself."""
        master = self.state[param].get("master")
        if master is None:
            return param.detach().float()
        stale = master.to(param.dtype) != param
        master[stale] = param.detach()[stale].float()
        return master

    def hess_stats(self) -> dict[str, float]:
        """Summary of every entry of the Hessian diagonal h, for the training log.

        Returns:
            ``mean``, ``std`` (population), ``min``, ``median`` (the lower middle value for an
            even count) and ``max`` over all parameters' h.
        """
        hess = [self._param_state(p, g)["hess"].flatten() for g, p in self._params()]
        if not hess:
            raise TrainingError("IVON has no parameter, so no Hessian to summarise.")
        device = hess[0].device
        values = torch.cat([h.to(device) for h in hess])
        return {
            "mean": float(values.mean()),
            "std": float(values.std(correction=0)),
            "min": float(values.min()),
            "median": float(values.median()),
            "max": float(values.max()),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`, keeping the state fp32 (and a copy) whatever the weights.

        ``torch.optim.Optimizer`` casts floating state to the parameter's dtype, which would
        round a bf16 model's Hessian and momentum to bf16.
        """
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for (_, param), saved_id in zip(self._params(), saved_ids, strict=True):
            if saved_id in state_dict["state"]:
                self.state[param] = {
                    key: value.to(param.device, torch.float32, copy=True)
                    if isinstance(value, torch.Tensor)
                    else value
                    for key, value in state_dict["state"][saved_id].items()
                }

    # -----------------------------------------------------------------------------------------
    # Posterior draws

    def _generator(self, device: torch.device, key: tuple[int, ...]) -> torch.Generator:
        """A generator on ``device`` seeded by ``(seed, *key)`` alone (equal on every process)."""
        entropy = np.random.SeedSequence([self.seed, *key]).generate_state(1, np.uint64)[0]
        return torch.Generator(device=device).manual_seed(int(entropy))

    def _standard_normals(self, train: bool, draw: int | None) -> list[list[torch.Tensor]]:
        """z ~ N(0, 1) for every parameter of every group (fp32, on its device).

        Training draw s of step t uses the key (t, s, group, 0); prediction draws count apart
        with the key (t, n, group, 1), or (t, ``draw``, group, 2) when ``draw`` is given, so
        evaluating never shifts the training noise.
        """
        if train:
            index, stream = next((self.state[p]["samples"] for _, p in self._params()), 0), 0
        elif draw is not None:
            index, stream = draw, 2
        else:
            index, stream = self._prediction_draws, 1
            self._prediction_draws += 1
        draws = []
        for group_index, group in enumerate(self.param_groups):
            generators: dict[torch.device, torch.Generator] = {}
            key = (group["step"], index, group_index, stream)
            zs = []
            for param in group["params"]:
                if param.device not in generators:
                    generators[param.device] = self._generator(param.device, key)
                zs.append(
                    torch.randn(
                        param.shape,
                        generator=generators[param.device],
                        device=param.device,
                        dtype=torch.float32,
                    )
                )
            draws.append(zs)
        return draws

    @contextlib.contextmanager
    def sampled_params(self, train: bool = False, draw: int | None = None) -> Iterator[None]:
        """Run the body at a posterior draw θ = m + ε, ε ~ N(0, σ²); restore m on exit.

        With ``train``, the gradients are zeroed on entry and, when the body ends without an
        error, its gradient g (zeros where a parameter got none) is recorded as one sample with
        ε ⊙ g (Price) or g² (gradsq). With ``train=False`` it only perturbs the weights, for
        Monte Carlo prediction, and leaves the optimiser state as it was.

        Args:
            train: record the gradient sample.
            draw: prediction only: the index of a fixed draw of this step, (``seed``, step,
                ``draw``) alone choosing the noise, so an evaluation can use the same draws for
                every batch and again after a resume. None: the next of a running count.
        """
        params = [p for _, p in self._params()]
        if train:
            for param in params:
                if param.grad is not None:
                    param.grad.zero_()
            states = [self._param_state(p, g) for g, p in self._params()]
            hessians = [state["hess"] for state in states]
        else:
            hessians = [self._hess(p, g) for g, p in self._params()]
        zs = [z for group_zs in self._standard_normals(train, draw) for z in group_zs]
        means, noises = [], []
        with torch.no_grad():
            for (group, param), hess, z in zip(self._params(), hessians, zs, strict=True):
                noise = z / (group["ess"] * (hess + group["weight_decay"])).sqrt()
                means.append(param.detach().clone())
                noises.append(noise)
                if self.state[param].get("master") is not None:  # θ = m + ε from the fp32 m
                    param.copy_(self._mean(param) + noise)
                else:
                    param.add_(noise.to(param.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for param, mean in zip(params, means, strict=True):
                    param.copy_(mean)
        if train:
            self._record(params, states, noises)

    @torch.no_grad()
    def _record(
        self, params: list[nn.Parameter], states: list[dict[str, Any]], noises: list[torch.Tensor]
    ) -> None:
        """Add one draw's gradient (and ε⊙g or g²) to the step's sums."""
        sums = _SAMPLE_SUMS[self.hess_approx]
        for param, state, noise in zip(params, states, noises, strict=True):
            state["samples"] += 1
            if param.grad is None:
                continue
            grad = param.grad.float()
            state["grad_sum"].add_(grad)
            if self.hess_approx == "price":
                state[sums].addcmul_(noise, grad)
            else:
                state[sums].addcmul_(grad, grad)

    # -----------------------------------------------------------------------------------------
    # The update

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Update m, h and the momentum from the samples recorded since the last step.

        Args:
            closure: called ``mc_samples`` times (with gradients on) before the update, each
                call running its own ``sampled_params(train=True)``; the mean loss is returned.

        Raises:
            TrainingError: no gradient sample was recorded since the last step.
        """
        loss = None
        if closure is not None:
            losses = []
            for _ in range(self.mc_samples):
                with torch.enable_grad():
                    losses.append(closure())
            loss = sum(losses) / self.mc_samples
        entries = [(g, p, self._param_state(p, g)) for g, p in self._params()]
        if not entries:
            return loss
        if any(state["samples"] == 0 for _, _, state in entries):
            raise TrainingError(
                "IVON step() found no gradient sample; run every micro-batch's forward and "
                "backward inside optimizer.sampled_params(train=True) before calling step()."
            )
        sums = _SAMPLE_SUMS[self.hess_approx]
        for _, _, state in entries:  # the sums become means in place: no extra copy
            state["grad_sum"].div_(state["samples"])
            state[sums].div_(state["samples"])
        if self.sync and dist.is_available() and dist.is_initialized():
            _all_reduce_mean([state[key] for _, _, state in entries for key in ("grad_sum", sums)])
        for group, param, state in entries:
            self._update(group, param, state, state["grad_sum"], state[sums])
            state["grad_sum"].zero_()
            state[sums].zero_()
            state["samples"] = 0
        for group in self.param_groups:
            group["step"] += 1
        return loss

    def _update(
        self,
        group: dict[str, Any],
        param: nn.Parameter,
        state: dict[str, Any],
        grad: torch.Tensor,
        curv: torch.Tensor,
    ) -> None:
        """The §6 update of one parameter from its mean gradient and mean ε⊙g (or g²)."""
        ess, decay = group["ess"], group["weight_decay"]
        beta1, beta2 = group["beta1"], group["beta2"]
        hess, momentum = state["hess"], state["momentum"]
        # ĥ: Price scales the mean ε⊙g by λ(h + δ); gradsq's mean g² by λ
        scale = ess * (hess + decay) if self.hess_approx == "price" else ess
        hess_sample = curv * scale
        momentum.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        correction = (hess - hess_sample).square_().div_(hess + decay)
        hess.mul_(beta2).add_(hess_sample, alpha=1.0 - beta2)
        hess.add_(correction, alpha=0.5 * (1.0 - beta2) ** 2)
        lr = group["lr"] * (group["hess_init"] + decay) if self.rescale_lr else group["lr"]
        debias = 1.0 - beta1 ** (group["step"] + 1) if self.debias else 1.0
        mean = self._mean(param)
        direction = (momentum / debias + decay * mean) / (hess + decay)
        radius = group["clip_radius"]
        mean.sub_(direction.clamp_(-radius, radius), alpha=lr)
        param.copy_(mean)


def _check_hyperparameters(group: dict[str, Any]) -> None:
    """Raise :class:`TrainingError` for the first setting of ``group`` outside its range."""
    checks = [
        (group["lr"] > 0, f"IVON lr={group['lr']} must be positive (O(0.1-1) for IVON)."),
        (
            group["ess"] > 0,
            f"IVON ess={group['ess']} must be positive; pass the number of training examples.",
        ),
        (
            group["hess_init"] > 0,
            f"IVON hess_init={group['hess_init']} must be positive (ViLoRA uses 1.0).",
        ),
        (0 <= group["beta1"] < 1, f"IVON beta1={group['beta1']} is outside [0, 1); try 0.9."),
        (0 <= group["beta2"] < 1, f"IVON beta2={group['beta2']} is outside [0, 1); try 0.99999."),
        (
            group["weight_decay"] >= 0,
            f"IVON weight_decay={group['weight_decay']} is negative; use 0 or more.",
        ),
        (
            group["clip_radius"] > 0,
            f"IVON clip_radius={group['clip_radius']} must be positive (inf: no clipping).",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise TrainingError(message)


def _all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    """Average ``tensors`` in place over the processes: one all-reduce per device."""
    world = dist.get_world_size()
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_device.setdefault(tensor.device, []).append(tensor)
    for group in by_device.values():
        flat = torch.cat([t.flatten() for t in group])
        dist.all_reduce(flat)
        flat.div_(world)
        for tensor, part in zip(group, flat.split([t.numel() for t in group]), strict=True):
            tensor.copy_(part.view_as(tensor))
