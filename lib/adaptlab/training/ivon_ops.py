"""Helpers of adaptlab's IVON (:mod:`adaptlab.training.ivon`): the range checks of its
settings, the posterior noise of its per-parameter path and the data-parallel average of its
per-step sums."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from adaptlab.training.errors import TrainingError


def posterior_noise(
    zs: list[torch.Tensor], hess: list[torch.Tensor], ess: float, decay: float
) -> list[torch.Tensor]:
    """ε = z / √(λ(h + δ)) for standard normals ``zs`` (left unchanged), each of its h's shape."""
    return [z / (ess * (h + decay)).sqrt() for z, h in zip(zs, hess, strict=True)]


def all_reduce_mean(tensors: list[torch.Tensor]) -> None:
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


def check_hyperparameters(group: dict[str, Any]) -> None:
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


def summary_stats(values: torch.Tensor) -> dict[str, float]:
    """``mean``, ``std`` (population), ``min``, ``median`` (the lower middle value for an even
    count) and ``max`` of a 1-D tensor, as floats (IVON's Hessian summary)."""
    return {
        "mean": float(values.mean()),
        "std": float(values.std(correction=0)),
        "min": float(values.min()),
        "median": float(values.median()),
        "max": float(values.max()),
    }
