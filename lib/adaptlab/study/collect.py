"""What a study reads back from its stages' own output files, and how it summarises them.

Per method and seed, the test numbers are the ones the recipe reported (never recomputed):

- fine-tuning: accuracy, macro-F1 and ECE from ``result.json`` ``metrics.test_at_best`` (the
  best dev step; ``test_final`` without dev evaluation), the per-example class logits from the
  ``predictions`` file that entry names, ``method.trainable_parameters`` and
  ``timings.train_seconds``;
- ``graft``: accuracy and ECE from ``result.json`` ``splits.grafted.test``, macro-F1 (sklearn)
  and the per-example class probabilities (their log as logits) from ``reliability.json``
  ``grafted``, ``n_grafted`` entries as its size, ``timings.total_seconds`` (without the run it
  grafts) as its time;
- base task (MMLU, 0-shot): each run's accuracy over the four letters from its extraction's
  ``manifest.json`` (forgetting = the pretrained model's minus the run's), and per layer the
  intrinsic dimension (``id_gride``), ARI with the subjects and neighbourhood overlap with the
  pretrained model's representation from the analysis' ``metrics.json``;
- eNTK, per solver: the test accuracy of the best dev setting per seed from ``sweep.json``
  ``by_solver.{solver}.best`` and the per-example logits from the ``predictions`` file it names.

Agreement of the kernel with a method on one seed: the fraction of test examples with the same
predicted class, and the Pearson correlation of the class logits centred per example (a
per-example constant, such as a log-softmax shift, does not change it). The stages must score
the same test rows in the same order (same task, split seed and ``test_limit``); a mismatch of
the labels is an error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adaptlab.errors import UserError
from adaptlab.io import read_json


@dataclass
class Scored:
    """One stage's test predictions.

    Attributes:
        metrics: the numbers the recipe reported (``accuracy``, ``macro_f1``, ``ece``, and
            where it applies ``trainable_parameters`` and ``train_seconds``).
        labels: ``[N]`` gold class indices, test-split order.
        logits: ``[N, C]`` class scores (log-probabilities for a graft).
    """

    metrics: dict[str, float]
    labels: np.ndarray
    logits: np.ndarray


def _read_predictions(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise UserError(
            f"{path} is missing: the stage that wrote {path.parent} predates per-example "
            "outputs; run the study again with --rerun_changed true."
        )
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows.sort(key=lambda row: row["index"])
    labels = np.array([row["label"] for row in rows], dtype=np.int64)
    logits = np.array([row["logits"] for row in rows], dtype=np.float64)
    return labels, logits


def finetune_scored(folder: Path) -> Scored:
    """A fine-tuning run's reported test numbers and per-example logits."""
    result = read_json(folder / "result.json")
    test = result["metrics"].get("test_at_best") or result["metrics"].get("test_final")
    if not test or "predictions" not in test:
        raise UserError(
            f"{folder}/result.json has no test predictions; the study needs a few-shot "
            "classification task."
        )
    labels, logits = _read_predictions(folder / test["predictions"])
    metrics = {key: float(test[key]) for key in ("accuracy", "macro_f1", "ece")}
    metrics["trainable_parameters"] = float(result["method"]["trainable_parameters"])
    metrics["train_seconds"] = float(result["timings"]["train_seconds"])
    return Scored(metrics, labels, logits)


def graft_scored(folder: Path) -> Scored:
    """A graft's reported test numbers and per-example log-probabilities."""
    from sklearn.metrics import f1_score

    result = read_json(folder / "result.json")
    test = result["splits"]["grafted"]["test"]
    reliability = read_json(folder / "reliability.json")["grafted"]
    probs = np.asarray(reliability["probs"], dtype=np.float64)
    labels = np.asarray(reliability["labels"], dtype=np.int64)
    macro = f1_score(labels, probs.argmax(axis=1), average="macro")
    metrics = {"accuracy": float(test["accuracy"]), "macro_f1": float(macro)}
    metrics["ece"] = float(test["ece"])
    metrics["trainable_parameters"] = float(result["n_grafted"])
    metrics["train_seconds"] = float(result["timings"]["total_seconds"])
    return Scored(metrics, labels, np.log(np.clip(probs, 1e-300, None)))


def kernel_scored(folder: Path) -> dict[str, dict[int, Scored]]:
    """Per solver and seed, the eNTK solution's test accuracy (best dev setting) and logits."""
    sweep = read_json(folder / "sweep.json")
    solvers: dict[str, dict[int, Scored]] = {}
    for solver, entry in sweep["by_solver"].items():
        for best in entry["best"]:
            labels, logits = _read_predictions(folder / best["predictions"])
            metrics = {"accuracy": float(best["test"]["accuracy"])}
            solvers.setdefault(solver, {})[int(best["seed"])] = Scored(metrics, labels, logits)
    return solvers


LAYER_QUANTITIES = {"id": "id_gride", "ari": "ari_subjects", "overlap": "overlap_reference"}
"""Per-layer quantities of the base-task analysis: the study's name -> ``metrics.json`` key."""


def base_accuracy(folder: Path) -> float:
    """A model's 0-shot MMLU accuracy over the four letters, as its extraction reported it
    (``manifest.json`` ``accuracy.constrained_micro``)."""
    return float(read_json(folder / "manifest.json")["accuracy"]["constrained_micro"])


def layer_metrics(folder: Path) -> dict[str, dict[str, dict[int, float]]]:
    """``{run: {quantity: {layer: value}}}`` of the analysis' ``metrics.json`` (quantities of
    :data:`LAYER_QUANTITIES`; the reference run has no overlap with itself)."""
    layers: dict[str, dict[str, dict[int, float]]] = {}
    for record in read_json(folder / "metrics.json"):
        run = layers.setdefault(record["run"], {name: {} for name in LAYER_QUANTITIES})
        for name, key in LAYER_QUANTITIES.items():
            value = record.get(key)
            if isinstance(value, int | float):
                run[name][int(record["layer"])] = float(value)
    return layers


def agreement(a: Scored, b: Scored, what: str) -> dict[str, float]:
    """Fraction of identical predicted classes and correlation of centred logits.

    Raises:
        UserError: the two scored different test examples.
    """
    if not np.array_equal(a.labels, b.labels):
        raise UserError(
            f"{what}: the two stages scored different test examples; give them the same task, "
            "split seed and test_limit."
        )
    same = float(np.mean(a.logits.argmax(axis=1) == b.logits.argmax(axis=1)))
    x = (a.logits - a.logits.mean(axis=1, keepdims=True)).ravel()
    y = (b.logits - b.logits.mean(axis=1, keepdims=True)).ravel()
    corr = float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else math.nan
    return {"identical": same, "logit_corr": corr}


def spread(values: dict[int, float]) -> dict[str, Any]:
    """``mean``, ``std`` (sample, ddof 1; 0 for one seed), ``n`` and the per-seed ``values``."""
    array = np.array(list(values.values()), dtype=np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {
        "mean": float(array.mean()),
        "std": std,
        "n": len(array),
        "values": {str(k): v for k, v in values.items()},
    }


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``[N, C]`` scores."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
