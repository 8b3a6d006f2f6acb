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
# # Extraction runs at a glance
# Accuracy by subject and a per-layer profile of the representations, for every run under
# `RESULTS` (default: the `make demo` output). Open it as a notebook with jupytext, or run it
# headless: `ADAPTLAB_RESULTS=results/demo python notebook/plot_extraction.py`.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt

from adaptlab.extract.reader import find_runs
from adaptlab.plotting.extraction import plot_accuracy_by_subject, plot_layer_norms

RESULTS = Path(os.environ.get("ADAPTLAB_RESULTS", "results/demo"))
FIGURES = RESULTS / "figures"
runs = find_runs(RESULTS)
for run in runs:
    acc = run.manifest["accuracy"]
    print(f"{run.name}: N={run.manifest['n_examples']} accuracy A-D {acc['constrained_micro']:.3f}")

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.8), width_ratios=[3, 2])
plot_accuracy_by_subject(runs, ax=left)
plot_layer_norms(runs, ax=right)
fig.tight_layout()
FIGURES.mkdir(parents=True, exist_ok=True)
fig.savefig(FIGURES / "extraction.png", dpi=120)
print(f"saved {FIGURES / 'extraction.png'}")
