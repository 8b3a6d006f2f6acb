"""Kernel vs fine-tuning: does the eNTK predict what prompt-based fine-tuning reaches?

Reads a kernel run (``sweep.json`` of ``scripts/compute_kernel.py``) and one fine-tuning run per
data seed (``result.json`` of ``scripts/finetune.py`` on the same task and split) and pairs,
per seed, the kernel's test accuracy at its best-dev solver setting with the fine-tuned
model's test accuracy at its best-dev step (both selected on dev, the upstream protocol)::

    record = compare_kernel_finetune("results/kernel/topics", {13: "results/ft/16-13"})
    write_json("comparison.json", record)

Accuracies are in percent; mean and std (population, as upstream's gather) over seeds.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from adaptlab.io import read_json
from adaptlab.ntk.errors import KernelError


def _stats(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std())}


def finetune_test_accuracy(run: str | Path) -> float:
    """Test accuracy (0-1) of a few-shot fine-tuning run at its best dev step.

    Raises:
        KernelError: the folder holds no finished few-shot run.
    """
    path = Path(run) / "result.json"
    if not path.is_file():
        raise KernelError(f"{run} holds no result.json; finish the fine-tuning run first.")
    metrics = read_json(path)["metrics"]
    best = metrics.get("test_at_best") or metrics.get("test_final")
    if not best:
        raise KernelError(
            f"{path} has no test metrics; it is not a few-shot task run of scripts/finetune.py."
        )
    return float(best["accuracy"])


def compare_kernel_finetune(
    kernel_dir: str | Path, finetune_runs: Mapping[int, str | Path]
) -> dict[str, Any]:
    """Kernel vs fine-tuned test accuracy per seed and solver.

    Args:
        kernel_dir: output folder of ``scripts/compute_kernel.py`` (holds ``sweep.json`` and
            ``result.json``).
        finetune_runs: data seed -> folder of the fine-tuning run on that seed's split.

    Returns:
        ``{"task", "shots", "formula", "model", "seeds", "finetune": {seed: acc, mean, std},
        "kernel": {solver: {seed: acc, mean, std, settings}}}`` with accuracies in percent.

    Raises:
        KernelError: missing files, or seeds the kernel run did not cover.
    """
    kernel_dir = Path(kernel_dir)
    for name in ("sweep.json", "result.json"):
        if not (kernel_dir / name).is_file():
            raise KernelError(f"{kernel_dir} holds no {name}; run scripts/compute_kernel.py first.")
    sweep = read_json(kernel_dir / "sweep.json")
    config = read_json(kernel_dir / "result.json")["config"]
    seeds = sorted(int(s) for s in finetune_runs)
    finetuned = {s: 100 * finetune_test_accuracy(finetune_runs[s]) for s in seeds}
    kernel: dict[str, Any] = {}
    for solver, summary in sweep["by_solver"].items():
        best = {int(b["seed"]): b for b in summary["best"]}
        missing = sorted(set(seeds) - set(best))
        if missing:
            raise KernelError(
                f"The kernel run in {kernel_dir} has no seed(s) {missing}; compute them or drop "
                "those fine-tuning runs."
            )
        accuracy = {s: 100 * float(best[s]["test"]["accuracy"]) for s in seeds}
        kernel[solver] = {
            "seeds": {str(s): a for s, a in accuracy.items()},
            **_stats(list(accuracy.values())),
            "settings": {str(s): best[s]["settings"] for s in seeds},
        }
    return {
        "format": "adaptlab.kernel_vs_finetune/1",
        "task": config["task"],
        "shots": config["shots"],
        "formula": config["formula"],
        "model": config["model"],
        "seeds": seeds,
        "finetune": {
            "seeds": {str(s): a for s, a in finetuned.items()},
            **_stats(list(finetuned.values())),
        },
        "kernel": kernel,
    }
