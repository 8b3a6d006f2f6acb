"""LoRA on the query projection only, for fused and unfused projections alike.

PEFT's LoRA cannot target a third of GPT-2's fused ``c_attn``; inducer-tuning's Q-LoRA
(``lora="Q"`` upstream) needs exactly that. ``QueryLoRA(x) = (α / r) · B A dropout(x)``,
A: r x hidden (He/Kaiming-uniform init, as PEFT), B: out x r (zeros), added to the query
projection's output by :func:`adaptlab.adapters.families.add_to_projection`.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class QueryLoRA(nn.Module):
    """x [B, T, hidden] -> ΔQ [B, T, out].

    Args:
        hidden: input width.
        out: query width (heads * head_dim).
        r: rank (≥ 1).
        alpha: LoRA α; the update is scaled by α / r.
        dropout: dropout on x.
    """

    def __init__(self, hidden: int, out: int, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, hidden))
        self.lora_B = nn.Parameter(torch.zeros(out, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def output_parameters(self) -> list[nn.Parameter]:
        """B: at zero the update is zero."""
        return [self.lora_B]
