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

- the state is per parameter, fp32 on the parameter's device (``optimizer.state[p]["hess"]``
  and ``"momentum"``), so parameter groups, several devices and bf16 weights work, and
  ``state_dict()`` resumes a run exactly. The step's sample sums exist only from its first
  sample to ``step()``, so between steps the state is two fp32 copies of the weights, as
  ivon-opt's flat buffers;
- the parameters of a group that share a device and dtype form a bucket whose state tensors
  (``hess``, ``momentum``, ``master``, ``grad_sum``, ``nxg_sum``/``gsq_sum``) are views of one
  contiguous fp32 buffer ``[n]`` per key, n the bucket's entries parameter after parameter
  (:mod:`adaptlab.training.ivon_flat`), so ``step()`` and ``sampled_params`` run a handful of
  ops on whole buffers. A state tensor replaced from outside (or loaded) goes back into a
  buffer at its next use. A ``DTensor``, or every parameter with ``foreach=False``, is updated
  one tensor at a time, with the same numbers;
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
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from adaptlab.training.errors import TrainingError
from adaptlab.training.ivon_flat import FlatBuffers, add_sample, flat_key, flat_update, sync_master
from adaptlab.training.ivon_ops import (
    all_reduce_mean,
    check_hyperparameters,
    posterior_noise,
    summary_stats,
)

HessApprox = Literal["price", "gradsq"]
_LOW_PRECISION = (torch.bfloat16, torch.float16)
"""Parameter dtypes whose mean m IVON keeps in an fp32 master copy."""
_SAMPLE_SUMS = {"price": "nxg_sum", "gradsq": "gsq_sum"}
"""The state key of each estimator's per-step sum: Σ_s ε_s ⊙ g_s (Price) or Σ_s g_s²."""
_STEP_KEYS = ("samples", "grad_sum", *_SAMPLE_SUMS.values())
"""State keys that live from a step's first sample to its ``step()`` only."""
_FLAT_TYPES = (torch.Tensor, nn.Parameter)
"""Tensor types whose state shares a flat buffer (a subclass such as DTensor goes alone)."""


class _Bucket(NamedTuple):
    """Parameters of one group updated together on flat buffers (or one updated alone)."""

    group_index: int
    group: dict[str, Any]
    positions: list[int]  # in group["params"]
    params: list[nn.Parameter]
    foreach: bool


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
        foreach: update the parameters of a group that share a device and dtype together, on
            flat state buffers (the same numbers, far fewer ops); False: one parameter at a
            time.

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
        foreach: bool = True,
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
        check_hyperparameters(defaults)
        super().__init__(params, defaults)
        for group in self.param_groups:
            check_hyperparameters(group)
        self.mc_samples = mc_samples
        self.hess_approx = hess_approx
        self.sync = sync
        self.debias = debias
        self.rescale_lr = rescale_lr
        self.seed = seed
        self.foreach = foreach
        self._prediction_draws = 0  # draws with train=False, for a fresh seed each time
        self._flat_buffers: dict[tuple, FlatBuffers] = {}  # by flat_key of the bucket

    # -----------------------------------------------------------------------------------------
    # State

    def _params(self) -> Iterator[tuple[dict[str, Any], nn.Parameter]]:
        """``(group, parameter)`` for every parameter, in group order."""
        for group in self.param_groups:
            for param in group["params"]:
                yield group, param

    def _buckets(self) -> list[_Bucket]:
        """Each group's parameters split by device and dtype, as torch.optim's foreach paths do.

        A parameter that cannot share a flat buffer with plain tensors (a ``DTensor``), or every
        parameter with ``foreach=False``, is a bucket of its own, updated one tensor at a time.
        """
        buckets = []
        for index, group in enumerate(self.param_groups):
            shared: dict[tuple[torch.device, torch.dtype], list[int]] = {}
            for position, param in enumerate(group["params"]):
                if self.foreach and type(param) in _FLAT_TYPES:
                    shared.setdefault((param.device, param.dtype), []).append(position)
                else:
                    buckets.append(_Bucket(index, group, [position], [param], False))
            for positions in shared.values():
                params = [group["params"][i] for i in positions]
                buckets.append(_Bucket(index, group, positions, params, True))
        return buckets

    def _param_state(self, param: nn.Parameter, group: dict[str, Any]) -> dict[str, Any]:
        """The parameter's state, created on first use on its device (fp32)."""
        state = self.state[param]
        if "hess" not in state:
            zeros = torch.zeros_like(
                param, dtype=torch.float32, memory_format=torch.preserve_format
            )
            state["momentum"] = zeros
            state["hess"] = torch.full_like(zeros, group["hess_init"])
            if param.dtype in _LOW_PRECISION:
                state["master"] = param.detach().float()
        return state

    def _flat(self, params: list[nn.Parameter]) -> FlatBuffers:
        """The flat buffers of the bucket ``params`` (made at its first use)."""
        key = flat_key(params)
        if key not in self._flat_buffers:
            self._flat_buffers[key] = FlatBuffers(params)
        return self._flat_buffers[key]

    def _flat_state(self, bucket: _Bucket) -> tuple[FlatBuffers, dict[str, torch.Tensor]]:
        """The bucket's buffers and its ``hess``, ``momentum`` (and ``master``) as ``[n]``."""
        flat = self._flat(bucket.params)
        states = [self._param_state(param, bucket.group) for param in bucket.params]
        keys: tuple[str, ...] = ("hess", "momentum")
        if bucket.params[0].dtype in _LOW_PRECISION:
            for param, state in zip(bucket.params, states, strict=True):
                state.setdefault("master", param.detach().float())
            keys += ("master",)
        return flat, {key: flat.state(states, key) for key in keys}

    def _hess(self, param: nn.Parameter, group: dict[str, Any]) -> torch.Tensor:
        """h of ``param``: its state's, or ``hess_init`` before the first use (state untouched)."""
        state = self.state[param]
        if "hess" in state:
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
        return summary_stats(torch.cat([h.to(device) for h in hess]))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`, keeping the state fp32 (and a copy) whatever the weights.

        ``torch.optim.Optimizer`` casts floating state to the parameter's dtype, which would
        round a bf16 model's Hessian and momentum to bf16. A state dict saved between steps by
        an older adaptlab holds zero sample sums; they are dropped. The loaded tensors go back
        into flat buffers at their bucket's next use.
        """
        super().load_state_dict(state_dict)
        self._flat_buffers.clear()
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for (_, param), saved_id in zip(self._params(), saved_ids, strict=True):
            if saved_id in state_dict["state"]:
                self.state[param] = {
                    key: value.to(param.device, torch.float32, copy=True)
                    if isinstance(value, torch.Tensor)
                    else value
                    for key, value in state_dict["state"][saved_id].items()
                }
                if self.state[param].get("samples") == 0:
                    for key in _STEP_KEYS:
                        self.state[param].pop(key, None)

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
            index = next((self.state[p].get("samples", 0) for _, p in self._params()), 0)
            stream = 0
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
        buckets = self._buckets()
        if train:
            for bucket in buckets:
                grads = [p.grad for p in bucket.params if p.grad is not None]
                if bucket.foreach and grads:
                    torch._foreach_zero_(grads)
                elif not bucket.foreach:
                    for grad in grads:
                        grad.zero_()
                for param in bucket.params:
                    self._param_state(param, bucket.group)
        draws = self._standard_normals(train, draw)
        means, noises = [], []
        with torch.no_grad():
            for bucket in buckets:
                group, params = bucket.group, bucket.params
                zs = [draws[bucket.group_index][i] for i in bucket.positions]
                if bucket.foreach:
                    mean, noise = self._perturb_flat(bucket, zs, train)
                    means.append(mean)
                    noises.append(noise)
                    continue
                hess = [self._hess(p, group) for p in params]
                noise = posterior_noise(zs, hess, group["ess"], group["weight_decay"])
                means.append([p.detach().clone() for p in params])
                self._perturb(params, noise)
                noises.append(noise)
        try:
            yield
        finally:
            with torch.no_grad():
                for bucket, saved in zip(buckets, means, strict=True):
                    if bucket.foreach:
                        saved = self._flat(bucket.params).split(saved)
                        torch._foreach_copy_(bucket.params, saved)
                        continue
                    for param, mean in zip(bucket.params, saved, strict=True):
                        param.copy_(mean)
        if train:
            for bucket, noise in zip(buckets, noises, strict=True):
                self._record(bucket.params, noise, bucket.foreach)

    def _perturb_flat(
        self, bucket: _Bucket, zs: list[torch.Tensor], train: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """:meth:`_perturb` of a bucket on flat buffers, from its standard normals ``zs``; with
        ``train`` the noise's buffer is kept for :meth:`_record`.

        Returns:
            The weights before the draw ``[n]`` (their dtype) and the noise ε, views of one
            fp32 buffer ``[n]`` in the parameters' shapes.
        """
        group, params = bucket.group, bucket.params
        flat = self._flat(params)
        states = [self.state[param] for param in params]
        if all("hess" in state for state in states):
            hess = flat.state(states, "hess")
        else:  # a prediction before the first sample: h0, the state untouched
            hess = flat.join([self._hess(param, group) for param in params])
        noise = flat.join(zs) / (group["ess"] * (hess + group["weight_decay"])).sqrt()
        weights = flat.join(params)
        if all("master" in state for state in states):
            master = flat.state(states, "master")
            sync_master(master, weights)
            drawn = master + noise
        else:
            drawn = weights + noise.to(weights.dtype)
        torch._foreach_copy_(params, flat.split(drawn))
        return weights, flat.split(noise, "noise" if train else None)

    def _perturb(self, params: list[nn.Parameter], noise: list[torch.Tensor]) -> None:
        """θ = m + ε in place; from the fp32 master m where a weight has one."""
        for param, eps in zip(params, noise, strict=True):
            if self.state[param].get("master") is not None:
                param.copy_(self._mean(param) + eps)
            else:
                param.add_(eps.to(param.dtype))

    @torch.no_grad()
    def _record(self, params: list[nn.Parameter], noise: list[torch.Tensor], foreach: bool) -> None:
        """Add one draw's gradient (and ε⊙g or g²) to the step's sums, made at its first draw.

        With ``foreach``, ``params`` (plain tensors of one device and dtype, at the same sample
        count) share flat sum buffers, else each parameter gets its own.
        """
        key = _SAMPLE_SUMS[self.hess_approx]
        if foreach and self._record_flat(params, noise, key):
            return
        grads, noises, grad_sums, sums = [], [], [], []
        for param, eps in zip(params, noise, strict=True):
            state = self.state[param]
            if "samples" not in state:
                state["samples"] = 0
                for name in ("grad_sum", key):
                    state[name] = torch.zeros_like(state["hess"])
            state["samples"] += 1
            if param.grad is not None:
                grads.append(param.grad.float())
                noises.append(eps)
                grad_sums.append(state["grad_sum"])
                sums.append(state[key])
        if not grads:
            return
        factors = noises if self.hess_approx == "price" else grads
        if foreach:
            torch._foreach_add_(grad_sums, grads)
            torch._foreach_addcmul_(sums, factors, grads)
            return
        for grad_sum, total, factor, grad in zip(grad_sums, sums, factors, grads, strict=True):
            grad_sum.add_(grad)
            total.addcmul_(factor, grad)

    def _record_flat(self, params: list[nn.Parameter], noise: list[torch.Tensor], key: str) -> bool:
        """:meth:`_record` into flat sums ``[n]``; False (nothing done) where it cannot: no
        gradient at all, or parameters at different sample counts."""
        states = [self.state[param] for param in params]
        counts = {state.get("samples", 0) for state in states}
        if len(counts) != 1 or all(param.grad is None for param in params):
            return False
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        add_sample(self._flat(params), states, grads, noise, key, self.hess_approx == "price")
        return True

    # -----------------------------------------------------------------------------------------
    # The update

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Update m, h and the momentum from the samples recorded since the last step.

        The step's sample sums are dropped afterwards: they are rebuilt at the next sample.

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
        buckets = self._buckets()
        states = [self.state[p] for bucket in buckets for p in bucket.params]
        if not states:
            return loss
        if any(state.get("samples", 0) == 0 for state in states):
            raise TrainingError(
                "IVON step() found no gradient sample; run every micro-batch's forward and "
                "backward inside optimizer.sampled_params(train=True) before calling step()."
            )
        key = _SAMPLE_SUMS[self.hess_approx]
        sums = []
        for bucket in buckets:  # the sums become means in place
            sums += self._average(bucket.params, key, bucket.foreach)
        if self.sync and dist.is_available() and dist.is_initialized():
            all_reduce_mean(sums)
        for bucket in buckets:
            group, params = bucket.group, bucket.params
            if bucket.foreach:
                self._update_flat(bucket, key)
                continue
            for param in params:
                state = self.state[param]
                self._update(group, param, state, state["grad_sum"], state[key])
        for state in states:
            for name in _STEP_KEYS:
                state.pop(name, None)
        live = {flat_key(bucket.params) for bucket in buckets if bucket.foreach}
        self._flat_buffers = {k: v for k, v in self._flat_buffers.items() if k in live}
        for group in self.param_groups:
            group["step"] += 1
        return loss

    def _average(self, params: list[nn.Parameter], key: str, foreach: bool) -> list[torch.Tensor]:
        """Divide the step's sums of ``params`` by their sample count, in place.

        Returns:
            The sums: with ``foreach`` the flat ``[n]`` buffers, else the parameters' own.
        """
        states = [self.state[p] for p in params]
        if foreach:
            flat = self._flat(params)
            sums = [flat.state(states, name) for name in ("grad_sum", key)]
            counts = {state["samples"] for state in states}
            if len(counts) == 1:
                count = counts.pop()
                if count != 1:
                    for total in sums:
                        total.div_(count)
                return sums
        else:
            sums = [state[name] for state in states for name in ("grad_sum", key)]
        for state in states:
            state["grad_sum"].div_(state["samples"])
            state[key].div_(state["samples"])
        return sums

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
        lr, debias = self._lr_and_debias(group)
        mean = self._mean(param)
        direction = (momentum / debias + decay * mean) / (hess + decay)
        radius = group["clip_radius"]
        mean.sub_(direction.clamp_(-radius, radius), alpha=lr)
        param.copy_(mean)

    def _update_flat(self, bucket: _Bucket, key: str) -> None:
        """:meth:`_update` of a bucket, op for op on its flat buffers ``[n]``; the step's
        ``key`` sum (its own buffer) is overwritten with ĥ."""
        flat, buffers = self._flat_state(bucket)
        states = [self.state[param] for param in bucket.params]
        buffers["grad"] = flat.state(states, "grad_sum")
        buffers["curv"] = flat.state(states, key)
        weights = flat.join(bucket.params)
        if "master" in buffers:
            sync_master(buffers["master"], weights)
            buffers["mean"] = buffers.pop("master")
        else:
            buffers["mean"] = weights.float()
        lr, debias = self._lr_and_debias(bucket.group)
        flat_update(bucket.group, buffers, self.hess_approx == "price", lr, debias)
        torch._foreach_copy_(bucket.params, flat.split(buffers["mean"]))
        for name in ("grad_sum", key, "noise"):  # "noise": a draw whose body raised
            flat.forget(name)

    def _lr_and_debias(self, group: dict[str, Any]) -> tuple[float, float]:
        """The step size α' and the momentum's debiasing divisor d of this step."""
        lr = (
            group["lr"] * (group["hess_init"] + group["weight_decay"])
            if self.rescale_lr
            else group["lr"]
        )
        debias = 1.0 - group["beta1"] ** (group["step"] + 1) if self.debias else 1.0
        return lr, debias
