"""The mask parameterisation and its update (graft.md §4–§5).

    γ = b + (1 − 2b) ⊙ σ(S − β)                    continuous mask, ≈ b at the start
    γ_bin = round(γ)                                 binary mask: differs from b iff S crosses β
    S ← S − (1 − 2b) ⊙ Ḡ ⊙ σ(S − β) ⊙ (1 − σ(S − β))
    Ḡ = (1/n) Σ_t η · ∂L_t/∂θ ⊙ Δ                   n batches of one mask step, at θ(γ)

which is gradient descent on S with step η: ∂L/∂S = (1 − 2b) ⊙ σ'(S − β) ⊙ (∂L/∂θ ⊙ Δ). No torch
optimiser, no sparsity term: sparsity comes from the patch size, the near-zero σ(S − β) at the
start (S ~ U[0, 1), β = 10: σ ≈ 4.5e-5 … 1.2e-4) and the few mask steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def gamma(base: Tensor, scores: Tensor, beta: float) -> Tensor:
    """γ = b + (1 − 2b) ⊙ σ(S − β), shaped like ``scores``, in its dtype."""
    b = base.to(scores.dtype)
    return b + (1 - 2 * b) * torch.sigmoid(scores - beta)


def binary(base: Tensor, scores: Tensor, beta: float) -> Tensor:
    """γ_bin = round(γ) as a bool tensor.

    γ > 1/2 iff S > β where b = 0 and S < β where b = 1 (σ is monotone; γ = 1/2 rounds to 0),
    so it is computed from S directly, free of rounding in σ.
    """
    return torch.where(base, scores < beta, scores > beta)


def init_scores(shapes: Sequence[torch.Size], generator: torch.Generator, dtype, device) -> list:
    """S ~ U[0, 1) per tensor, drawn in order from ``generator`` on the CPU (seeded, so the same
    on every device), then moved."""
    return [torch.rand(shape, generator=generator, dtype=dtype).to(device) for shape in shapes]


@torch.no_grad()
def update_scores(
    scores: Tensor, base: Tensor, grad_times_delta: Tensor, beta: float, lr: float
) -> None:
    """S ← S − (1 − 2b) ⊙ η·Ḡ ⊙ σ'(S − β), in place.

    Entry by entry, so under FSDP each rank updates its own rows of S with its rows of Ḡ.

    Args:
        scores: S of one tensor.
        base: its bool base patch b.
        grad_times_delta: (1/n) Σ_t ∂L_t/∂θ ⊙ Δ, the batch-averaged chain rule to γ.
        beta: β (``sigmoid_bias``).
        lr: η (``learning_rate``).
    """
    s = torch.sigmoid(scores - beta)
    sign = 1 - 2 * base.to(scores.dtype)
    scores.sub_(sign * (lr * grad_times_delta.to(scores.dtype)) * s * (1 - s))
