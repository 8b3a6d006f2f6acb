"""Figures of extraction runs: accuracy by subject and a per-layer profile of the representations.

Reads only what ``scripts/extract_repr.py`` writes (``manifest.json``, ``statistics.json`` and
the per-layer safetensors files), so the figures can be redrawn without the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless by default; notebooks may switch backends
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from adaptlab.io import read_json  # noqa: E402


@dataclass
class Run:
    """One extraction folder: its name, manifest and statistics."""

    name: str
    path: Path
    manifest: dict
    statistics: dict


def load_runs(folder: str | Path) -> list[Run]:
    """Every finished extraction run under ``folder`` (a run folder itself, or its parent)."""
    folder = Path(folder)
    paths = [folder] if (folder / "manifest.json").exists() else sorted(folder.glob("*/"))
    runs = [
        Run(p.name, p, read_json(p / "manifest.json"), read_json(p / "statistics.json"))
        for p in paths
        if (p / "manifest.json").exists()
    ]
    if not runs:
        raise FileNotFoundError(f"No finished extraction run (manifest.json) under {folder}.")
    return sorted(runs, key=lambda r: r.manifest["prompt"]["num_shots"])


def layer_norms(run: Run, point: str = "norm1") -> tuple[list[int], list[float]]:
    """Mean L2 norm of the rows of each layer file of ``point``: ``([layer], [norm])``."""
    layers, norms = [], []
    for entry in run.manifest["layers"]:
        if entry["point"] != point:
            continue
        with safe_open(str(run.path / entry["file"]), framework="pt") as f:
            rows = f.get_tensor("repr").to(torch.float64)
        layers.append(entry["layer"])
        norms.append(rows.norm(dim=1).mean().item())
    return layers, norms


def plot_accuracy_by_subject(runs: list[Run], ax: plt.Axes | None = None) -> plt.Axes:
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


def plot_layer_norms(runs: list[Run], point: str = "norm1", ax: plt.Axes | None = None):
    """Mean representation norm vs layer, one line per run."""
    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    for run in runs:
        ax.plot(*layer_norms(run, point), marker="o", ms=3, label=run.name)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"mean ||{point}||")
    ax.legend(frameon=False)
    return ax
