"""Paper-style figures of the landscape study, drawn from ``metrics.json`` records alone.

Each figure has one line per run against layer depth (Doimo et al. 2024, figures of §10):
intrinsic dimension, ARI with subjects and with answer letters, number of density peaks, label
overlap; and, when checkpoints were analysed, the data overlap with the reference run per
layer against training step.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

FIGURES = {
    "intrinsic_dimension": [("id_gride", "ID (GRIDE)")],
    "ari": [("ari_subjects", "ARI subjects"), ("ari_letters", "ARI letters")],
    "clusters": [("n_clusters", "number of density peaks")],
    "label_overlap": [
        ("overlap_subjects", "overlap subjects"),
        ("overlap_letters", "overlap letters"),
    ],
}


def smooth(values: np.ndarray, width: int) -> np.ndarray:
    """Block average over ``width`` consecutive layers (the paper's curves use 2)."""
    if width <= 1 or len(values) < width:
        return values
    kernel = np.ones(width) / width
    return np.convolve(values, kernel, mode="valid")


def by_run(records: list[dict], kind: str = "run") -> dict[str, list[dict]]:
    """Records of each run (of one ``kind``), ordered by layer; only the per-block point."""
    runs: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        if record.get("kind", "run") == kind and record["point"] not in ("final_norm", "logits"):
            runs[record["run"]].append(record)
    return {name: sorted(rs, key=lambda r: r["layer"]) for name, rs in runs.items()}


def plot_vs_layer(records: list[dict], key: str, ax: plt.Axes, smoothing: int = 1) -> plt.Axes:
    """``key`` against layer, one line per run."""
    for name, rows in by_run(records).items():
        layers = np.array([r["layer"] for r in rows], dtype=float)
        values = np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)
        ax.plot(smooth(layers, smoothing), smooth(values, smoothing), marker="o", ms=3, label=name)
    ax.set_xlabel("layer")
    return ax


def plot_checkpoint_overlap(records: list[dict], ax: plt.Axes) -> plt.Axes:
    """Data overlap with the reference run against training step, one line per layer."""
    rows = [r for r in records if r.get("kind") == "checkpoint" and "overlap_reference" in r]
    curves: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        curves[r["layer"]].append((_step(r["run"]), r["overlap_reference"]))
    cmap = plt.get_cmap("viridis")
    for i, (layer, points) in enumerate(sorted(curves.items())):
        steps, values = zip(*sorted(points), strict=True)
        ax.plot(steps, values, color=cmap(i / max(len(curves) - 1, 1)), label=f"l{layer}")
    ax.set_xscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("overlap with reference")
    return ax


def _step(name: str) -> int:
    numbers = re.findall(r"\d+", name)
    return int(numbers[-1]) if numbers else 0


def draw_all(records: list[dict], out: Path, smoothing: int = 1) -> list[Path]:
    """Write every figure as PNG into ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, panels in FIGURES.items():
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
        for ax, (key, label) in zip(axes[0], panels, strict=True):
            plot_vs_layer(records, key, ax, smoothing)
            ax.set_ylabel(label)
            ax.legend(frameon=False, fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=120)
        plt.close(fig)
        paths.append(out / f"{name}.png")
    if any(r.get("kind") == "checkpoint" for r in records):
        fig, ax = plt.subplots(figsize=(6, 3.8))
        plot_checkpoint_overlap(records, ax)
        ax.legend(frameon=False, fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / "checkpoint_overlap.png", dpi=120)
        plt.close(fig)
        paths.append(out / "checkpoint_overlap.png")
    return paths


def draw_shot_controls(records: list[dict], names: list[str], path: Path) -> Path:
    """ARI with subjects against layer for the runs ``names`` (a shot rule and its controls)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    plot_vs_layer([r for r in records if r["run"] in names], "ari_subjects", ax)
    ax.set_ylabel("ARI subjects")
    ax.set_title("fixed shots vs per-query random and other-subject shots", fontsize=9)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
