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


LAYER_TITLES = {
    "id": "intrinsic dimension (Gride)",
    "ari": "ARI with the MMLU subjects",
    "overlap": "neighbourhood overlap with the pretrained model",
}


def draw_layers(record: dict[str, Any], folder: Path) -> list[Path]:
    """``layers_{id,ari,overlap}.png``: a quantity against depth, a line per method (mean over
    seeds, ± std shaded) and the pretrained model dashed."""
    paths = []
    for quantity, title in LAYER_TITLES.items():
        figure, axis = plt.subplots(figsize=(5.5, 3.6))
        for method, by_quantity in record["layers"].items():
            points = sorted((int(layer), v) for layer, v in by_quantity[quantity].items())
            if not points:
                continue
            layers = [layer for layer, _ in points]
            mean = [v["mean"] for _, v in points]
            std = [v["std"] for _, v in points]
            style = {"linestyle": "--", "color": "black"} if method == "pretrained" else {}
            (line,) = axis.plot(layers, mean, label=method, **style)
            low = [m - s for m, s in zip(mean, std, strict=True)]
            high = [m + s for m, s in zip(mean, std, strict=True)]
            axis.fill_between(layers, low, high, color=line.get_color(), alpha=0.15)
        axis.set(xlabel="layer", title=title)
        axis.legend(fontsize=7, ncol=2)
        paths.append(save_figure(figure, folder / f"layers_{quantity}.png"))
        plt.close(figure)
    return paths
