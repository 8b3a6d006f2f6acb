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
# # Skill localization by grafting
# Accuracy and calibration of the base, fine-tuned and grafted models, graft size, accuracy
# against graft size for learned and top-|Δ| masks, reliability diagrams and the multi-task
# mask overlap (Panigrahi et al. 2023), from one grafting output folder:
#
# - `result.json`: `n_eligible`, `n_params`, `n_grafted`, `fraction_eligible`, `fraction_all`,
#   and `splits`: for each of `base`, `finetuned`, `grafted`,
#   `{"train" | "dev" | "test" | "ood:TASK": {"accuracy": float, "ece": float, ...}}` (the
#   table; what `scripts/graft.py` writes);
# - `sweep.json` (optional): `[{"kind": "learned" | "top_delta", "sparsity", "fraction_eligible",
#   "accuracy"}]` (accuracy vs graft size);
# - `reliability.json` (optional): `{model: {"probs": [[...]], "labels": [...]}}` (reliability
#   diagrams);
# - `overlap.json` (optional): what `adaptlab.graft.analysis.mask_overlap` returns (heat map);
# - `continual.json` (optional): accuracy on tasks A and B of θ_pre, θ_A, θ_AB, θ_AB with A's
#   graft restored and A's graft alone (a table).
#
# `scripts/graft_study.py` writes all five into its output folder. A figure whose input is
# absent is skipped. Headless: `ADAPTLAB_GRAFT=results/graft python
# notebook/plot_graft.py` (figures go to `<folder>/figures`, or `ADAPTLAB_FIGURES`).

# %%
import json
import os
from pathlib import Path

from adaptlab.graft.analysis import recovery
from adaptlab.plotting.graft import plot_accuracy_vs_size, plot_overlap_heatmap, plot_reliability

RESULTS = Path(os.environ.get("ADAPTLAB_GRAFT", "results/graft"))
OUT = Path(os.environ.get("ADAPTLAB_FIGURES", RESULTS / "figures"))
MODELS = ("base", "finetuned", "grafted")
result = json.loads((RESULTS / "result.json").read_text())
print(
    f"graft: {result['n_grafted']} of {result['n_eligible']} eligible parameters "
    f"({result['fraction_eligible']:.3e}; {result['fraction_all']:.3e} of all {result['n_params']})"
)
print(f"{'model':<10} {'split':<6} {'accuracy':>9} {'ECE':>7}")
for model in MODELS:
    for split, scores in result["splits"][model].items():
        print(f"{model:<10} {split:<6} {scores['accuracy']:>9.4f} {scores['ece']:>7.4f}")
test = {model: result["splits"][model]["test"]["accuracy"] for model in MODELS}
rec = recovery(test["grafted"], test["base"], test["finetuned"])
print(f"test recovery: grafted/ft {rec['relative']:.3f}, of the gain over base {rec['gain']:.3f}")

# %%
if (RESULTS / "sweep.json").exists():
    sweep = json.loads((RESULTS / "sweep.json").read_text())
    path = plot_accuracy_vs_size(
        sweep, OUT / "accuracy_vs_size.png", finetuned=test["finetuned"], base=test["base"]
    )
    print(f"saved {path}")
else:
    print("no sweep.json: accuracy vs graft size skipped")

# %%
if (RESULTS / "reliability.json").exists():
    raw = json.loads((RESULTS / "reliability.json").read_text())
    curves = {name: (c["probs"], c["labels"]) for name, c in raw.items()}
    print(f"saved {plot_reliability(curves, OUT / 'reliability.png')}")
else:
    print("no reliability.json: reliability diagrams skipped")

# %%
if (RESULTS / "overlap.json").exists():
    overlap = json.loads((RESULTS / "overlap.json").read_text())
    print(f"saved {plot_overlap_heatmap(overlap, OUT / 'overlap.png')}")
else:
    print("no overlap.json: overlap heat map skipped")

# %%
if (RESULTS / "continual.json").exists():
    continual = json.loads((RESULTS / "continual.json").read_text())
    a, b = continual["tasks"]["A"], continual["tasks"]["B"]
    print(f"{'model':<8} {a + ' acc':>12} {b + ' acc':>12}")
    for model, scores in continual["models"].items():
        print(f"{model:<8} {scores[a]['accuracy']:>12.4f} {scores[b]['accuracy']:>12.4f}")
    gain, cost = continual["restored_gain_A"], continual["restored_cost_B"]
    print(
        f"forgetting of {a}: {continual['forgetting_A']:.3f}; restoring A's graft gains "
        f"{gain:.3f} on {a}, costs {cost:.3f} on {b}"
    )
else:
    print("no continual.json: continual-learning table skipped")
