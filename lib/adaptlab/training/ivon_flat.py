"""Flat fp32 buffers behind adaptlab's IVON state (:mod:`adaptlab.training.ivon`).

The state of a bucket (a group's parameters that share a device and dtype) stays per parameter,
``optimizer.state[p]["hess"]`` of p's shape, but each of those tensors is a view of one
contiguous 1-D buffer ``[n]`` per state key, n the bucket's entry count in parameter order. The
update then runs a handful of ops on whole buffers instead of one op per parameter and op: on
the CPU a ``torch._foreach_*`` op is a loop of per-tensor ops, and a model's adapters are
hundreds of small tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

CHUNK = 1 << 15
"""Entries of the update computed at a time on the CPU, so that its operands (8 of 128 KiB)
stay in cache from op to op: about a quarter less time than whole-buffer ops on SmolLM2's
adapters."""
DEVICE_CHUNK = 1 << 24
"""The same elsewhere (a GPU): only bounds each temporary of the update to 64 MiB."""


class FlatBuffers:
    """The flat buffers of one bucket and the per-parameter views cut from them.

    Args:
        params: the bucket's parameters, in order; a buffer ``[n]`` holds their entries one
            after the other, each in its own row-major order.
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.shapes = [param.shape for param in params]
        self.strides = [torch.empty(shape, device="meta").stride() for shape in self.shapes]
        self.offsets, self.numel = [], 0
        for param in params:
            self.offsets.append(self.numel)
            self.numel += param.numel()
        self._views: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def split(self, flat: torch.Tensor, name: str | None = None) -> list[torch.Tensor]:
        """Views of ``flat`` ``[n]`` in the parameters' shapes; under ``name``, remembered so
        that :meth:`join` gives ``flat`` back for exactly these views."""
        start = flat.storage_offset()  # as_strided: one op a view, half of split and view
        views = [
            flat.as_strided(shape, stride, start + offset)
            for shape, stride, offset in zip(self.shapes, self.strides, self.offsets, strict=True)
        ]
        if name is not None:
            self._views[name] = (flat, views)
        return views

    def join(self, tensors: Sequence[torch.Tensor], name: str | None = None) -> torch.Tensor:
        """``[n]``: the buffer whose views (split under ``name``) ``tensors`` are, else a copy
        of their entries (``torch.cat``)."""
        known = self._views.get(name) if name is not None else None
        if (
            known is not None
            and len(known[1]) == len(tensors)
            and all(tensor is view for tensor, view in zip(tensors, known[1], strict=True))
        ):
            return known[0]
        return torch.cat([tensor.reshape(-1) for tensor in tensors])

    def state(self, states: Sequence[dict[str, Any]], key: str) -> torch.Tensor:
        """The fp32 buffer ``[n]`` behind ``state[key]`` of every state in ``states``.

        Where the states do not hold its views (new state, a loaded state dict, a tensor set
        from outside), their tensors are copied into a new buffer and replaced by its views.
        """
        tensors = [state[key] for state in states]
        flat = self.join(tensors, key)
        if flat is not self._views.get(key, (None,))[0]:
            flat = flat.float()
            for state, view in zip(states, self.split(flat, key), strict=True):
                state[key] = view
        return flat

    def forget(self, name: str) -> None:
        """Drop the buffer remembered under ``name`` (its memory goes with the last view)."""
        self._views.pop(name, None)


def flat_key(params: Sequence[torch.Tensor]) -> tuple[tuple[int, torch.Size], ...]:
    """The key of a bucket's :class:`FlatBuffers`: its parameters' ids and shapes (an id freed
    and reused for a tensor of another shape must not find the old views)."""
    return tuple((id(param), param.shape) for param in params)


def add_sample(
    flat: FlatBuffers,
    states: Sequence[dict[str, Any]],
    grads: Sequence[torch.Tensor],
    noise: Sequence[torch.Tensor],
    key: str,
    price: bool,
) -> None:
    """Add one sample to the step's flat sums of ``states`` (all at the same sample count):
    ``grad_sum`` += g and ``key`` += ε ⊙ g (``price``) or g², g the ``grads`` and ε the
    ``noise`` (per parameter); at the step's first sample the sums are made from its terms."""
    grad = flat.join(grads).float()  # a new buffer [n]: it may become the sum
    factor = flat.join(noise, "noise") if price else grad
    flat.forget("noise")
    if "samples" not in states[0]:
        for name, total in (("grad_sum", grad), (key, factor * grad)):
            for state, view in zip(states, flat.split(total, name), strict=True):
                state[name] = view
    else:
        flat.state(states, "grad_sum").add_(grad)
        flat.state(states, key).addcmul_(factor, grad)
    for state in states:
        state["samples"] = state.get("samples", 0) + 1


def sync_master(master: torch.Tensor, weights: torch.Tensor) -> None:
    """Copy into the fp32 ``master`` ``[n]`` the entries where the low-precision ``weights``
    ``[n]`` no longer equal it rounded (changed from outside: AdaLoRA masking, loading)."""
    stale = master.to(weights.dtype) != weights
    master[stale] = weights[stale].float()


def flat_update(
    group: dict[str, Any],
    buffers: dict[str, torch.Tensor],
    price: bool,
    lr: float,
    debias: float,
) -> None:
    """IVON's update of one bucket's flat buffers, op for op as ``IVON._update``.

    Args:
        group: the parameter group (``ess``, ``weight_decay``, ``beta1``, ``beta2``,
            ``clip_radius``).
        buffers: fp32 ``[n]`` tensors: ``hess`` and ``momentum`` (updated), ``mean`` (m,
            updated), ``grad`` (mean gradient ĝ) and ``curv`` (mean ε⊙g or g², overwritten
            with ĥ).
        price: ĥ by Price's theorem (else from squared gradients).
        lr: the step size α'.
        debias: the momentum's divisor d.
    """
    ess, decay = group["ess"], group["weight_decay"]
    beta1, beta2, radius = group["beta1"], group["beta2"], group["clip_radius"]
    total, device = buffers["hess"].numel(), buffers["hess"].device
    chunk = CHUNK if device.type == "cpu" else DEVICE_CHUNK
    for start in range(0, total, chunk):
        hess, momentum, mean, grad, curv = (
            buffers[name][start : start + chunk]
            for name in ("hess", "momentum", "mean", "grad", "curv")
        )
        hess_decay = hess + decay
        curv.mul_(ess * hess_decay if price else ess)
        momentum.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        correction = (hess - curv).square_().div_(hess_decay)
        hess.mul_(beta2).add_(curv, alpha=1.0 - beta2)
        hess.add_(correction, alpha=0.5 * (1.0 - beta2) ** 2)
        direction = torch.div(momentum, debias, out=correction).add_(decay * mean)
        direction.div_(torch.add(hess, decay, out=hess_decay))
        if radius < math.inf:
            direction.clamp_(-radius, radius)
        mean.sub_(direction, alpha=lr)
