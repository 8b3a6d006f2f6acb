"""Tensor-list operations of adaptlab's IVON (:mod:`adaptlab.training.ivon`): the posterior
noise, foreach scalars and the data-parallel average of its per-step sums."""

from __future__ import annotations

import torch
import torch.distributed as dist


def posterior_noise(
    zs: list[torch.Tensor], hess: list[torch.Tensor], ess: float, decay: float, foreach: bool
) -> list[torch.Tensor]:
    """ε = z / √(λ(h + δ)) for standard normals ``zs`` (left unchanged)."""
    if not foreach:
        return [z / (ess * (h + decay)).sqrt() for z, h in zip(zs, hess, strict=True)]
    scale = torch._foreach_add(hess, scalar(decay, zs[0].device))
    torch._foreach_mul_(scale, scalar(ess, zs[0].device))
    torch._foreach_sqrt_(scale)
    return torch._foreach_div(zs, scale)


def scalar(value: float, device: torch.device) -> float | torch.Tensor:
    """``value`` as a foreach op's scalar operand on ``device``.

    On the CPU a 0-dim fp32 tensor: a Python number would be wrapped into a tensor once per
    list entry, which triples the cost of an op on small tensors. The result is the same: the
    kernel reads the number as fp32 either way. Elsewhere the number itself (no copy to the
    device).
    """
    return torch.tensor(value, dtype=torch.float32) if device.type == "cpu" else value


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
