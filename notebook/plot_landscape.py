# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The representation landscape, paper-style
# Intrinsic dimension, ARI with subjects and letters, number of density peaks and label overlap
# against layer, one line per run, from one or more `metrics.json` files written by
# `scripts/analyze_repr.py` (Doimo et al. 2024, §10). Curves use the paper's 2-layer block
# average. Headless: `ADAPTLAB_METRICS=results/demo/analysis/metrics.json python
# notebook/plot_landscape.py` (several files: separate them with `:`).

# %%
import json
import os
from pathlib import Path

import matplotlib.pyplot as plt

from adaptlab.plotting.landscape import FIGURES, plot_checkpoint_overlap, plot_vs_layer

METRICS = [
    Path(p)
    for p in os.environ.get("ADAPTLAB_METRICS", "results/demo/analysis/metrics.json").split(":")
]
OUT = Path(os.environ.get("ADAPTLAB_FIGURES", METRICS[0].parent / "figures_paper"))
SMOOTHING = int(os.environ.get("ADAPTLAB_SMOOTHING", "2"))
records = [r for path in METRICS for r in json.loads(path.read_text())]
runs = sorted({r["run"] for r in records})
print(f"{len(records)} records from {len(METRICS)} file(s); runs: {runs}")

# %%
panels = [panel for group in FIGURES.values() for panel in group]
fig, axes = plt.subplots(2, 3, figsize=(14, 7))
for ax, (key, label) in zip(axes.flat, panels, strict=False):
    plot_vs_layer(records, key, ax, smoothing=SMOOTHING)
    ax.set_ylabel(label)
axes.flat[0].legend(frameon=False)
if any(r.get("kind") == "checkpoint" for r in records):
    plot_checkpoint_overlap(records, axes.flat[-1])
else:
    axes.flat[-1].axis("off")
fig.tight_layout()
OUT.mkdir(parents=True, exist_ok=True)
fig.savefig(OUT / "landscape.png", dpi=120)
print(f"saved {OUT / 'landscape.png'}")
