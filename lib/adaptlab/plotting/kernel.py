"""Figures of the kernel view of fine-tuning, drawn from ``comparison.json`` records alone."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np


def plot_kernel_vs_finetune(record: dict[str, Any], ax: plt.Axes | None = None) -> plt.Axes:
    """Test accuracy per data seed: fine-tuning next to each kernel solver, means dashed.

    Args:
        record: from :func:`adaptlab.ntk.compare.compare_kernel_finetune`.
        ax: where to draw (a new figure when None).
    """
    ax = ax or plt.subplots(figsize=(6, 3.5))[1]
    seeds = [str(s) for s in record["seeds"]]
    series = {"fine-tuning": record["finetune"]}
    series.update({f"kernel ({name})": v for name, v in record["kernel"].items()})
    width = 0.8 / len(series)
    x = np.arange(len(seeds))
    for i, (label, values) in enumerate(series.items()):
        bars = ax.bar(x + i * width, [values["seeds"][s] for s in seeds], width, label=label)
        ax.axhline(values["mean"], color=bars.patches[0].get_facecolor(), ls="--", lw=1)
    ax.set_xticks(x + width * (len(series) - 1) / 2, [f"seed {s}" for s in seeds])
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{record['task']} {record['shots']}-shot, {record['formula']} kernel")
    ax.legend(frameon=False, fontsize=8)
    return ax
