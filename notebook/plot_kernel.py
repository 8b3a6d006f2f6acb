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
# # Kernel vs fine-tuning
# Test accuracy of the eNTK solution (best dev solver setting per seed) next to prompt-based
# fine-tuning (best dev step) on the same task and k-shot split (Malladi et al. 2023, table 1
# style), from a `comparison.json` of `adaptlab.ntk.compare` (`make demo` writes one).
# Headless: `ADAPTLAB_COMPARISON=results/demo/kernel_vs_ft/comparison.json python
# notebook/plot_kernel.py`.

# %%
import json
import os
from pathlib import Path

import matplotlib.pyplot as plt

from adaptlab.plotting.kernel import plot_kernel_vs_finetune

COMPARISON = Path(
    os.environ.get("ADAPTLAB_COMPARISON", "results/demo/kernel_vs_ft/comparison.json")
)
OUT = Path(os.environ.get("ADAPTLAB_FIGURES", COMPARISON.parent / "figures"))
record = json.loads(COMPARISON.read_text())
ft = record["finetune"]
print(f"{record['task']} {record['shots']}-shot, {record['model']}, seeds {record['seeds']}")
print(f"fine-tuning: {ft['mean']:.1f} ({ft['std']:.1f})")
for name, k in record["kernel"].items():
    print(f"kernel {record['formula']} / {name}: {k['mean']:.1f} ({k['std']:.1f})")

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
plot_kernel_vs_finetune(record, ax)
fig.tight_layout()
OUT.mkdir(parents=True, exist_ok=True)
fig.savefig(OUT / "kernel_vs_finetune.png", dpi=120)
print(f"saved {OUT / 'kernel_vs_finetune.png'}")
