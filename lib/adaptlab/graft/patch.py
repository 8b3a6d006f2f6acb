"""The base patch b: the k entries of largest |Δ|, a loaded mask, or nothing (graft.md §3).

``top_delta_patch`` takes exactly k = ⌊s·N_E⌋ entries by global |Δ| over all eligible tensors,
ties broken by position (tensor order, then flat index: the lower position wins), which is
``numpy.lexsort((position, -|Δ|))[:k]`` over the concatenated Δ. The upstream rule
(``|Δ| > t``, t the k-th largest) gives k − 1 entries, or crashes for k = 0; here k = 0 is an
empty patch (with a warning from the caller).

It never sorts all of Δ: the k-th largest value t comes from the per-tensor top-k candidates
(the global top k is among them), then every tensor takes its entries above t and, in position
order, as many entries equal to t as are still missing. The same two passes work on shards of a
tensor (:mod:`adaptlab.graft.sharded`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from adaptlab.graft.errors import GraftError


def patch_size(sparsity: float, n_eligible: int) -> int:
    """k = ⌊s·N_E⌋.

    Raises:
        GraftError: ``sparsity`` is not in (0, 1].
    """
    if not (math.isfinite(sparsity) and 0.0 < sparsity <= 1.0):
        raise GraftError(
            f"sparsity={sparsity} is not in (0, 1]; it is the grafted fraction of the eligible "
            "parameters (the paper uses 1e-5 to 1e-4)."
        )
    return math.floor(sparsity * n_eligible)


def top_candidates(magnitudes: Sequence[Tensor], k: int) -> Tensor:
    """The ``min(k, total)`` largest values over all tensors, unsorted, on the CPU: the global
    top k is among the union of every tensor's (or shard's) candidates."""
    candidates = [
        torch.topk(m.reshape(-1), min(k, m.numel()), sorted=False).values.cpu()
        for m in magnitudes
        if m.numel()
    ]
    if not candidates:
        return torch.empty(0, dtype=magnitudes[0].dtype if magnitudes else torch.float32)
    joined = torch.cat(candidates)
    return torch.topk(joined, min(k, joined.numel()), sorted=False).values


def kth_largest(magnitudes: Sequence[Tensor], k: int) -> float:
    """The k-th largest value over all tensors (1 ≤ k ≤ total), from per-tensor top-k
    candidates (in the tensors' dtype, so comparisons with it are exact)."""
    return float(torch.topk(top_candidates(magnitudes, k), k).values[-1])


def tie_quota(n_tied: Sequence[int], missing: int) -> list[int]:
    """How many entries equal to the threshold each tensor takes: the first ``missing`` tied
    entries in position order (tensors in order)."""
    quota = []
    for n in n_tied:
        take = max(0, min(missing, n))
        quota.append(take)
        missing -= take
    return quota


def take_top(magnitudes: Sequence[Tensor], threshold: float, quota: Sequence[int]) -> list[Tensor]:
    """Masks of the entries above ``threshold`` plus the first ``quota[i]`` entries equal to it
    (in flat order) of tensor i.

    Args:
        magnitudes: ``[T]`` |Δ| tensors.
        threshold: the k-th largest value (:func:`kth_largest`).
        quota: ``[T]`` tied entries to take per tensor (:func:`tie_quota`).

    Returns:
        ``[T]`` bool masks shaped like ``magnitudes``.
    """
    masks = []
    for m, take in zip(magnitudes, quota, strict=True):
        mask = m > threshold
        if take:
            positions = (m == threshold).reshape(-1).nonzero().squeeze(1)[:take]
            mask.view(-1)[positions] = True
        masks.append(mask)
    return masks


def top_delta_patch(deltas: Sequence[Tensor], k: int) -> list[Tensor]:
    """b with exactly k ones at the largest |Δ| over all tensors (ties: lower position).

    Args:
        deltas: ``[T]`` Δ tensors (any shapes, one device).
        k: patch size, 0 ≤ k ≤ N_E.

    Returns:
        ``[T]`` bool tensors shaped like ``deltas``.
    """
    n = sum(d.numel() for d in deltas)
    if not 0 <= k <= n:
        raise GraftError(f"A patch of {k} entries does not fit {n} eligible entries.")
    if k == 0:
        return [torch.zeros_like(d, dtype=torch.bool) for d in deltas]
    magnitudes = [d.abs() for d in deltas]
    threshold = kth_largest(magnitudes, k)
    above = sum(int((m > threshold).sum()) for m in magnitudes)
    tied = [int((m == threshold).sum()) for m in magnitudes]
    return take_top(magnitudes, threshold, tie_quota(tied, k - above))
