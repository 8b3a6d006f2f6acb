"""Figures of grafting results: reliability diagrams, multi-task mask overlap, accuracy vs size.

Each function draws from plain data (what a grafting run writes as JSON) and saves one PNG
atomically, so a figure is never half written. The figures are built on a bare
:class:`matplotlib.figure.Figure` (Agg canvas), so they need no display and leave pyplot's
state alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from adaptlab.plotting.save import save_figure
from adaptlab.training.metrics import ReliabilityBins, reliability_bins

KINDS = {
    "learned": "learned mask",
    "top_delta": "top-|Δ| mask",
    "top_delta_matched": "top-|Δ| mask, the learned mask's size",
}


def as_bins(curve: ReliabilityBins | tuple[Any, Any], n_bins: int = 10) -> ReliabilityBins:
    """Bins as given, or :func:`~adaptlab.training.metrics.reliability_bins` of
    ``(probs [N, C], labels [N])``."""
    if isinstance(curve, ReliabilityBins):
        return curve
    if not isinstance(curve, Sequence) or len(curve) != 2:
        raise ValueError(
            f"A reliability curve is a ReliabilityBins or a (probs, labels) pair, not "
            f"{type(curve).__name__}."
        )
    return reliability_bins(curve[0], curve[1], n_bins)


def bins_ece(bins: ReliabilityBins) -> float:
    """ECE of binned predictions: Σ_b |B_b|/N · |acc(B_b) − conf(B_b)| (graft.md §8)."""
    full = bins.count > 0
    gaps = np.abs(bins.accuracy[full] - bins.confidence[full])
    return float(np.sum(bins.count[full] / bins.count.sum() * gaps))


def plot_reliability(
    curves: Mapping[str, ReliabilityBins | tuple[Any, Any]], path: str | Path, n_bins: int = 10
) -> Path:
    """Reliability diagrams side by side, e.g. base, fine-tuned and grafted, ECE in each title.

    Each panel has the accuracy of every confidence bin as a bar over the bin, a dot at the
    bin's (mean confidence, accuracy), and the diagonal of perfect calibration.

    Args:
        curves: model name -> its bins, or ``(probs [N, C], labels [N])`` to bin here.
        path: the PNG to write.
        n_bins: equal-width bins for ``(probs, labels)`` curves.

    Returns:
        ``path``.

    Raises:
        ValueError: no curves, or a curve that is neither form.
    """
    if not curves:
        raise ValueError("No reliability curves given; pass {model_name: (probs, labels)}.")
    binned = {name: as_bins(curve, n_bins) for name, curve in curves.items()}
    fig = Figure(figsize=(3.2 * len(binned), 3.4))
    axes = fig.subplots(1, len(binned), squeeze=False)[0]
    for ax, (name, bins) in zip(axes, binned.items(), strict=True):
        full = bins.count > 0
        widths = np.diff(bins.edges)
        ax.bar(
            bins.edges[:-1][full], bins.accuracy[full], widths[full], align="edge",
            edgecolor="black", lw=0.5, alpha=0.7, label="accuracy",
        )  # fmt: skip
        ax.plot(bins.confidence[full], bins.accuracy[full], "o", ms=3, color="C3",
                label="(confidence, accuracy)")  # fmt: skip
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("confidence")
        ax.set_title(f"{name}: ECE {bins_ece(bins):.3f} (n={int(bins.count.sum())})", fontsize=9)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(frameon=False, fontsize=7, loc="upper left")
    return save_figure(fig, path)


def plot_overlap_heatmap(overlap: Mapping[str, Any], path: str | Path) -> Path:
    """Heat map of overlap(i, j) = |g_i ∩ g_j| / |g_j|, every cell annotated ("n/a" for NaN).

    Args:
        overlap: :func:`adaptlab.graft.analysis.mask_overlap`'s result or its JSON
            (``{"tasks": [...], "sizes": {...}, "overlap": [[...]]}``; None counts as NaN).
        path: the PNG to write.

    Returns:
        ``path``.

    Raises:
        ValueError: no tasks, or an overlap matrix that is not tasks x tasks.
    """
    tasks = list(overlap.get("tasks") or [])
    if not tasks:
        raise ValueError("The overlap record has no tasks; give mask_overlap's result.")
    matrix = np.array(
        [[math.nan if v is None else v for v in row] for row in overlap.get("overlap", [])],
        dtype=float,
    )
    if matrix.shape != (len(tasks), len(tasks)):
        raise ValueError(
            f"The overlap matrix has shape {list(matrix.shape)}; expected one row and one "
            f"column per task ({len(tasks)})."
        )
    sizes = overlap.get("sizes", {})
    labels = [f"{t}\n({sizes[t]})" if t in sizes else t for t in tasks]
    side = 1.0 + 0.9 * len(tasks)
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(matrix), vmin=0, vmax=1, cmap="viridis")
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            value = matrix[i, j]
            text = "n/a" if math.isnan(value) else f"{value:.2f}"
            color = "white" if value < 0.6 else "black"  # NaN compares False: black on blank
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(len(tasks)), labels, fontsize=8, rotation=30, ha="right")
    ax.set_yticks(range(len(tasks)), labels, fontsize=8)
    ax.set_xlabel("task j (graft size)")
    ax.set_ylabel("task i")
    ax.set_title("|g_i ∩ g_j| / |g_j|", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    return save_figure(fig, path)


def plot_accuracy_vs_size(
    records: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    finetuned: float | None = None,
    base: float | None = None,
    ylabel: str = "test accuracy",
) -> Path:
    """Accuracy against graft size (fraction of eligible parameters, log x), one line per kind.

    Args:
        records: ``{"kind": "learned" | "top_delta" | "top_delta_matched", "sparsity": float,
            "fraction_eligible": float, "accuracy": float}`` each.
        path: the PNG to write.
        finetuned: accuracy of θ_ft, drawn as a horizontal line.
        base: accuracy of θ_pre, drawn as a horizontal line.
        ylabel: what the accuracy was measured on.

    Returns:
        ``path``.

    Raises:
        ValueError: no records, an unknown kind, a missing key, or a size that is not > 0
            (a log axis cannot show it).
    """
    if not records:
        raise ValueError("No sweep records given; pass one dict per (mask kind, sparsity).")
    series: dict[str, list[tuple[float, float]]] = {}
    for record in records:
        missing = {"kind", "fraction_eligible", "accuracy"} - set(record)
        if missing:
            raise ValueError(f"Sweep record {dict(record)} lacks {sorted(missing)}.")
        if record["kind"] not in KINDS:
            raise ValueError(
                f"Sweep record kind {record['kind']!r} is unknown; use one of {list(KINDS)}."
            )
        if not record["fraction_eligible"] > 0:
            raise ValueError(
                f"Sweep record {dict(record)} has graft size {record['fraction_eligible']}; "
                "sizes must be > 0 on the log axis (leave empty grafts out, they equal base)."
            )
        series.setdefault(record["kind"], []).append(
            (float(record["fraction_eligible"]), float(record["accuracy"]))
        )
    fig = Figure(figsize=(5.5, 3.6))
    ax = fig.subplots()
    for kind, points in series.items():
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker="o", ms=4, label=KINDS[kind])
    for value, label, style in ((finetuned, "fine-tuned", "-"), (base, "base", ":")):
        if value is not None:
            ax.axhline(value, color="black", ls=style, lw=1, label=f"{label} ({value:.3f})")
    ax.set_xscale("log")
    ax.set_xlabel("graft size (fraction of eligible parameters)")
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False, fontsize=8)
    return save_figure(fig, path)
