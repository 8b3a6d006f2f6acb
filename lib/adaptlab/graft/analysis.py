"""Numbers for grafting results tables: graft sizes, multi-task mask overlap and recovery.

A mask says which entries of each eligible tensor are grafted (take θ_ft instead of θ_pre).
Two forms are accepted, also mixed within one mask:

- sparse: ``{parameter_name: LongTensor [n_selected]}`` of flat positions into that tensor
  (``tensor.flatten()[idx]``), int64, no repeats (the grafting code writes them sorted);
- dense: ``{parameter_name: BoolTensor [*param.shape]}``, True where grafted.

A name missing from a mask grafts nothing of that tensor. The flat positions of a dense tensor
are those of ``tensor.flatten()``, so the two forms of the same mask compare equal.

Multi-task overlap (Panigrahi et al. 2023, figure 8): with g_i the set of (name, position)
pairs grafted for task i, overlap(i, j) = |g_i ∩ g_j| / |g_j|, the share of task j's graft
that task i's graft also holds. It is asymmetric; the diagonal is 1. When g_j is empty the
ratio has no value and is NaN (``null`` once written as strict JSON by :func:`overlap_json`).

Example::

    >>> import torch
    >>> a = {"w": torch.tensor([0, 1, 2, 3])}
    >>> b = {"w": torch.tensor([False, True, False, False, False, True])}
    >>> result = mask_overlap({"a": a, "b": b})
    >>> result["sizes"], result["overlap"]
    ({'a': 4, 'b': 2}, [[1.0, 0.5], [0.25, 1.0]])
    >>> graft_sizes(b, n_eligible=100, n_params=1000)
    {'n_grafted': 2, 'fraction_eligible': 0.02, 'fraction_all': 0.002}
    >>> recovery(grafted_acc=0.75, base_acc=0.5, ft_acc=1.0)
    {'relative': 0.75, 'gain': 0.5}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

Mask = Mapping[str, torch.Tensor]


def mask_indices(mask: Mask) -> dict[str, np.ndarray]:
    """Each tensor's grafted flat positions, sorted, whichever form the mask has.

    Args:
        mask: ``{name: LongTensor [n_selected]}`` or ``{name: BoolTensor [*shape]}`` entries.

    Returns:
        ``{name: int64 array [n_selected]}``, sorted ascending.

    Raises:
        ValueError: an entry that is neither a bool tensor nor a 1-D integer tensor of
            non-negative, distinct positions.
    """
    out = {}
    for name, value in mask.items():
        value = torch.as_tensor(value).detach().cpu()
        if value.dtype == torch.bool:
            out[name] = torch.flatten(value).nonzero().flatten().numpy().astype(np.int64)
            continue
        if value.is_floating_point() or value.is_complex() or value.dim() != 1:
            raise ValueError(
                f"Mask entry {name!r} is a {value.dtype} tensor of shape {list(value.shape)}; "
                "give a bool tensor shaped like the parameter or a 1-D int64 tensor of flat "
                "positions."
            )
        idx = value.numpy().astype(np.int64)
        unique = np.unique(idx)
        if len(unique) != len(idx) or (len(idx) and unique[0] < 0):
            raise ValueError(
                f"Mask entry {name!r} has repeated or negative positions; give each grafted "
                "flat position once."
            )
        out[name] = unique
    return out


def graft_size(mask: Mask) -> int:
    """Number of grafted entries over all tensors of ``mask``."""
    return int(sum(len(idx) for idx in mask_indices(mask).values()))


def graft_sizes(mask: Mask, n_eligible: int, n_params: int) -> dict[str, float | int]:
    """Graft size as a count and as fractions of the eligible and of all parameters (graft.md §3).

    Args:
        mask: the grafted entries (sparse or dense, see the module docstring).
        n_eligible: N_E, entries of the eligible tensors (what fine-tuning trained).
        n_params: all parameters of the model.

    Returns:
        ``{"n_grafted": int, "fraction_eligible": float, "fraction_all": float}``.

    Raises:
        ValueError: ``n_eligible`` < 1, ``n_params`` < ``n_eligible``, or a mask larger than
            ``n_eligible``.
    """
    if n_eligible < 1 or n_params < n_eligible:
        raise ValueError(
            f"n_eligible={n_eligible} and n_params={n_params}: need 1 <= n_eligible <= n_params "
            "(count the eligible tensors' entries and the whole model's)."
        )
    n = graft_size(mask)
    if n > n_eligible:
        raise ValueError(
            f"The mask grafts {n} entries, more than the {n_eligible} eligible ones; was "
            "n_eligible counted over the same tensors?"
        )
    return {"n_grafted": n, "fraction_eligible": n / n_eligible, "fraction_all": n / n_params}


def mask_overlap(masks: Mapping[str, Mask]) -> dict[str, Any]:
    """The asymmetric overlap matrix of per-task masks (module docstring; paper figure 8).

    Args:
        masks: task name -> that task's mask, in the order rows and columns should take.

    Returns:
        ``{"tasks": [name], "sizes": {name: |g|}, "overlap": [[overlap(i, j)]]}`` with row i,
        column j = |g_i ∩ g_j| / |g_j| (NaN where |g_j| = 0). Plain Python numbers.

    Raises:
        ValueError: no masks, or a malformed mask entry.
    """
    if not masks:
        raise ValueError("No masks given; pass {task_name: mask} with at least one task.")
    tasks = list(masks)
    indices = {task: mask_indices(masks[task]) for task in tasks}
    sizes = {task: int(sum(len(v) for v in indices[task].values())) for task in tasks}
    overlap = []
    for gi in tasks:
        row = []
        for gj in tasks:
            common = 0
            for name, idx_j in indices[gj].items():
                idx_i = indices[gi].get(name)
                if idx_i is not None:
                    common += len(np.intersect1d(idx_i, idx_j, assume_unique=True))
            row.append(common / sizes[gj] if sizes[gj] else math.nan)
        overlap.append(row)
    return {"tasks": tasks, "sizes": sizes, "overlap": overlap}


def overlap_json(result: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`mask_overlap`'s result with NaN as None, so ``json.dumps`` writes strict JSON."""
    return {
        **result,
        "overlap": [[None if math.isnan(v) else v for v in row] for row in result["overlap"]],
    }


def recovery(grafted_acc: float, base_acc: float, ft_acc: float) -> dict[str, float]:
    """How much of fine-tuning's accuracy a graft recovers, two ways.

    - ``relative`` = grafted / ft: the paper's ">95% of fine-tuned performance" (graft.md §10);
      it credits the graft with what the base model already gets right.
    - ``gain`` = (grafted − base) / (ft − base): the share of fine-tuning's improvement over the
      base model that the graft keeps; 0 means no better than θ_pre, 1 as good as θ_ft.

    Either is NaN when its denominator is 0 (ft = 0; ft = base).

    Args:
        grafted_acc: accuracy of θ_pre + γ ⊙ Δ.
        base_acc: accuracy of θ_pre (the model before fine-tuning).
        ft_acc: accuracy of θ_ft.

    Returns:
        ``{"relative": float, "gain": float}``.
    """
    return {
        "relative": grafted_acc / ft_acc if ft_acc else math.nan,
        "gain": (grafted_acc - base_acc) / (ft_acc - base_acc) if ft_acc != base_acc else math.nan,
    }


def strip_logits(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-split metrics without their ``logits`` (what a result record keeps)."""
    return {split: {k: v for k, v in m.items() if k != "logits"} for split, m in metrics.items()}


def reliability_curves(
    logits: Mapping[str, Sequence[Sequence[float]]], labels: Sequence[int]
) -> dict[str, dict[str, list]]:
    """``{model: {"probs": [M, C] softmax of its scores, "labels": [M]}}`` for reliability
    diagrams (``adaptlab.plotting.graft.plot_reliability``, ``reliability.json``).

    Args:
        logits: model name -> ``[M, C]`` class scores of one split.
        labels: ``[M]`` gold classes of that split.
    """
    return {
        name: {"probs": torch.softmax(torch.tensor(rows), 1).tolist(), "labels": list(labels)}
        for name, rows in logits.items()
    }
