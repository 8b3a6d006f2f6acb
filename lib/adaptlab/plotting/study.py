"""Figures of ``scripts/study.py`` from its record (``study.json``): reliability curves and the
spread over seeds, one line or column per method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from adaptlab.plotting.save import save_figure


def draw_reliability(record: dict[str, Any], path: Path) -> None:
    """One reliability curve per method (pooled over seeds) and the diagonal."""
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    for method, entry in record["methods"].items():
        points = [
            (c, a)
            for c, a in zip(
                entry["reliability"]["confidence"], entry["reliability"]["accuracy"], strict=True
            )
            if c is not None
        ]
        if points:
            axis.plot(*zip(*points, strict=True), marker="o", label=method)
    axis.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    axis.legend(fontsize=8)
    save_figure(figure, path)
    plt.close(figure)


def draw_spread(record: dict[str, Any], path: Path) -> None:
    """Accuracy, macro-F1 and ECE per method: every seed a dot, the mean ± std a bar."""
    names = list(record["methods"])
    figure, axes = plt.subplots(1, 3, figsize=(3.2 * 3, 3.2), sharex=True)
    for axis, metric in zip(axes, ("accuracy", "macro_f1", "ece"), strict=True):
        for x, name in enumerate(names):
            entry = record["methods"][name][metric]
            values = list(entry["values"].values())
            axis.scatter([x] * len(values), values, s=12, color="grey", zorder=2)
            axis.errorbar(x, entry["mean"], yerr=entry["std"], fmt="o", color="C0", capsize=4)
        axis.set(title=metric.replace("_", "-"), xticks=range(len(names)))
        axis.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    save_figure(figure, path)
    plt.close(figure)
