"""The L1-to-init penalty λ·Σ|θ − θ_init| over the trainable parameters (graft.md §2,
upstream ``--l1_reg``).

The penalty is not added to the loss of every micro-batch: its gradient λ·sign(θ − θ_init)
is added to the gradients once per optimiser step, after the backward passes (and their
data-parallel reduction) and before clipping. That is the gradient of
``loss + λ·Σ|θ − θ_init|`` whatever the accumulation, and it needs no communication: each
process adds it to the gradient entries it holds, a whole replicated parameter (plain, DDP) or
its FSDP2 shard. Only the logged value is reduced::

    penalty = L1ToInit(model, strength=1e-4)    # snapshot θ_init: before a resume restores θ
    ...backward passes of the step...
    value = penalty.apply(accelerator)          # grads += λ·sign(θ − θ_init); λ·Σ|θ − θ_init|
    clip, optimizer.step()

``sign(0) = 0``, as autograd differentiates ``abs`` at 0, so the first step from θ_init feels
no penalty. θ_init costs one more copy of the trainable weights (of this process's shards under
FSDP). DeepSpeed keeps its gradients in its own partitioned buffers and is not supported.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's entries of a ``DTensor`` (a view of its FSDP2 shard), or the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class L1ToInit:
    """λ·Σ|θ − θ_init| over the trainable parameters of ``model``, θ_init taken now.

    Args:
        model: the model as the optimiser sees it (plain, DDP-wrapped or FSDP2-sharded), with
            the weights training starts from.
        strength: λ, the weight of the penalty.
    """

    def __init__(self, model: nn.Module, strength: float) -> None:
        self.strength = strength
        self.params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            self.init = [_local(p).detach().clone() for p in self.params]

    @torch.no_grad()
    def apply(self, accelerator: Any) -> float:
        """Add λ·sign(θ − θ_init) to every trainable gradient; return the penalty value.

        Call it on every process once per optimiser step, after the backward passes: it
        all-reduces the value (FSDP shards sum to the whole; replicated parameters count once).

        Returns:
            λ·Σ|θ − θ_init| of the weights before the step.
        """
        device = accelerator.device
        sharded = torch.zeros((), dtype=torch.float64, device=device)
        replicated = torch.zeros((), dtype=torch.float64, device=device)
        for param, init in zip(self.params, self.init, strict=True):
            diff = _local(param) - init
            total = diff.abs().sum(dtype=torch.float64).to(device)
            if hasattr(param, "to_local"):
                sharded += total
            else:
                replicated += total
            if param.grad is None:  # a parameter no micro-batch reached
                param.grad = torch.zeros_like(param)
            _local(param.grad).add_(torch.sign(diff).to(param.grad.dtype), alpha=self.strength)
        if accelerator.num_processes > 1:
            sharded = accelerator.reduce(sharded, reduction="sum")
        return self.strength * float(sharded + replicated)
