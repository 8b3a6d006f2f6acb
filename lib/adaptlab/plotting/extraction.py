"""Figures of extraction runs: accuracy by subject and a per-layer profile of the representations.

Reads only what ``scripts/extract_repr.py`` writes (through :mod:`adaptlab.extract.reader`),
so the figures can be redrawn without the model.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from adaptlab.extract.reader import ExtractionRun


def layer_norms(run: ExtractionRun, point: str = "norm1") -> tuple[list[int], list[float]]:
    """Mean L2 norm of the rows of each layer file of ``point``: ``([layer], [norm])``."""
    layers = [e["layer"] for e in run.entries(point)]
    norms = [float(np.linalg.norm(run.layer(point, i), axis=1).mean()) for i in layers]
    return layers, norms


def plot_accuracy_by_subject(runs: list[ExtractionRun], ax: plt.Axes | None = None) -> plt.Axes:
    """Constrained (A-D) accuracy per subject, one bar group per subject, one bar per run."""
    ax = ax or plt.subplots(figsize=(8, 3.5))[1]
    subjects = sorted(runs[0].statistics["constrained_accuracy"]["subjects"])
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        acc = run.statistics["constrained_accuracy"]["subjects"]
        xs = [j + i * width for j in range(len(subjects))]
        ax.bar(xs, [acc.get(s, float("nan")) for s in subjects], width, label=run.name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(subjects))])
    ax.set_xticklabels([s.replace("_", " ") for s in subjects], rotation=20, ha="right")
    ax.axhline(0.25, color="grey", lw=0.8, ls=":")
    ax.set_ylabel("accuracy (A-D)")
    ax.legend(frameon=False)
    return ax


def plot_layer_norms(runs: list[ExtractionRun], point: str = "norm1", ax: plt.Axes | None = None):
    """Mean representation norm vs layer, one line per run."""
    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    for run in runs:
        ax.plot(*layer_norms(run, point), marker="o", ms=3, label=run.name)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"mean ||{point}||")
    ax.legend(frameon=False)
    return ax
