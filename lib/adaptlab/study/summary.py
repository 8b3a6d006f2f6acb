"""A study's record (``study.json``), its report (``report.md``) and its figures.

``study.json`` (format ``adaptlab.study/1``)::

    {"config": ..., "stages": {name: {"seconds", "hash", "folder"}},
     "methods": {method: {metric: {"mean", "std", "n", "values": {seed: value}}},
                 ... "reliability": {"confidence", "accuracy", "count"} (pooled over seeds)},
     "kernel": {solver: {"accuracy": spread, "settings": {"formula", "lora", "head"},
                         "agreement": {method: {"identical": spread, "logit_corr": spread}}}}}

with metrics ``accuracy``, ``macro_f1``, ``ece``, ``trainable_parameters``, ``train_seconds``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from adaptlab.io import write_json
from adaptlab.study.collect import (
    LAYER_QUANTITIES,
    Scored,
    agreement,
    base_accuracy,
    finetune_scored,
    graft_scored,
    kernel_scored,
    layer_metrics,
    softmax,
    spread,
)
from adaptlab.study.plan import Stage
from adaptlab.telemetry import now
from adaptlab.training.metrics import reliability_bins

METRICS = ("accuracy", "macro_f1", "ece", "trainable_parameters", "train_seconds")
READERS = {"finetune": finetune_scored, "graft": graft_scored}


def summarise(
    stages: list[Stage], recorded: dict[str, dict[str, Any]], config: dict[str, Any]
) -> dict[str, Any]:
    """The study's record from its stages' output files (see the module docstring)."""
    scored: dict[str, dict[int, Scored]] = {}
    for stage in stages:
        if stage.recipe in READERS:
            scored.setdefault(stage.method, {})[stage.seed] = READERS[stage.recipe](stage.folder)
    methods: dict[str, Any] = {}
    for method, seeds in scored.items():
        entry = {m: spread({s: r.metrics[m] for s, r in seeds.items()}) for m in METRICS}
        labels = np.concatenate([r.labels for r in seeds.values()])
        probs = np.concatenate([softmax(r.logits) for r in seeds.values()])
        bins = reliability_bins(probs, labels)
        entry["reliability"] = {
            "edges": bins.edges.tolist(),
            "confidence": [None if math.isnan(v) else v for v in bins.confidence.tolist()],
            "accuracy": [None if math.isnan(v) else v for v in bins.accuracy.tolist()],
            "count": bins.count.tolist(),
        }
        methods[method] = entry
    kernel: dict[str, Any] = {}
    kernel_stage = next((s for s in stages if s.recipe == "compute_kernel"), None)
    if kernel_stage is not None:
        for solver, by_seed in kernel_scored(kernel_stage.folder).items():
            agree: dict[str, Any] = {}
            for method, seeds in scored.items():
                pairs = {
                    s: agreement(by_seed[s], seeds[s], f"kernel {solver} vs {method} seed {s}")
                    for s in seeds
                    if s in by_seed
                }
                agree[method] = {
                    key: spread({s: pair[key] for s, pair in pairs.items()})
                    for key in ("identical", "logit_corr")
                }
            accuracy = spread({s: r.metrics["accuracy"] for s, r in by_seed.items()})
            settings = {k: kernel_stage.config.get(k) for k in ("formula", "lora", "head")}
            kernel[solver] = {"accuracy": accuracy, "agreement": agree, "settings": settings}
    layers: dict[str, Any] = {}
    base: dict[str, Any] = {}
    by_name = {stage.name: stage for stage in stages}
    if "analysis" in by_name:
        pretrained = base_accuracy(by_name["extract/pretrained"].folder)
        base["pretrained"] = pretrained
        per_run = layer_metrics(by_name["analysis"].folder)
        layers["pretrained"] = {
            q: {
                str(layer): {"mean": v, "std": 0.0, "n": 1, "values": {}} for layer, v in by.items()
            }
            for q, by in per_run["pretrained"].items()
        }
        for method in methods:
            extracts = [s for s in stages if s.recipe == "extract_repr" and s.method == method]
            accuracy = {s.seed: base_accuracy(s.folder) for s in extracts}
            methods[method]["base_accuracy"] = spread(accuracy)
            methods[method]["forgetting"] = spread({k: pretrained - v for k, v in accuracy.items()})
            runs = {s.seed: per_run[s.folder.name] for s in extracts}
            layers[method] = {
                quantity: {
                    str(layer): spread({seed: run[quantity][layer] for seed, run in runs.items()})
                    for layer in sorted(next(iter(runs.values()))[quantity])
                }
                for quantity in LAYER_QUANTITIES
            }
    stage_times = {
        name: {"seconds": entry["seconds"], "hash": entry["hash"], "folder": entry["folder"]}
        for name, entry in recorded.items()
        if name in {s.name for s in stages}
    }
    return {
        "format": "adaptlab.study/1",
        "config": config,
        "stages": stage_times,
        "methods": methods,
        "kernel": kernel,
        "base_task": base,
        "layers": layers,
        "created": now(),
    }


def _cell(value: dict[str, Any], digits: int = 3) -> str:
    if value["n"] == 1:
        return f"{value['mean']:.{digits}f}"
    return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"


def report_markdown(record: dict[str, Any]) -> str:
    """``report.md``: the method table, the kernel view and the stage times."""
    cfg = record["config"]
    lines = [
        f"# Study: {cfg['task']} on {cfg['model']}",
        "",
        f"{cfg['shots']} examples per class, seeds {cfg['seeds']}, test sample "
        f"{cfg['test_limit'] or 'all'}; mean ± std over seeds (sample std).",
        "",
        "| method | accuracy | macro-F1 | ECE | trainable parameters | train s | MMLU "
        "| forgetting |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, entry in record["methods"].items():
        size = f"{entry['trainable_parameters']['mean']:,.0f}"
        base = [_cell(entry[k]) if k in entry else "—" for k in ("base_accuracy", "forgetting")]
        lines.append(
            f"| {method} | {_cell(entry['accuracy'])} | {_cell(entry['macro_f1'])} | "
            f"{_cell(entry['ece'])} | {size} | {_cell(entry['train_seconds'], 1)} | "
            f"{base[0]} | {base[1]} |"
        )
    if record["base_task"]:
        lines += [
            "",
            f"MMLU: 0-shot accuracy over the four letters of each run (pretrained "
            f"{record['base_task']['pretrained']:.3f}); forgetting = pretrained minus run. Per "
            "layer (figures/layers_{id,ari,overlap}.png): intrinsic dimension, ARI with the "
            "subjects, neighbourhood overlap with the pretrained model's representation.",
        ]
    lines += ["", "graft: trainable parameters = grafted entries; its time excludes the run it "]
    lines[-1] += (
        "grafts. Reliability curves: figures/reliability.png; every seed: figures/spread.png."
    )
    for solver, entry in record["kernel"].items():
        kind = "LoRA" if entry["settings"]["lora"] else "full"
        lines += [
            "",
            f"## eNTK of the pretrained model ({entry['settings']['formula']} kernel of {kind} "
            f"fine-tuning), {solver} solver: test accuracy {_cell(entry['accuracy'])}",
            "",
            "| method | identical predictions | logit correlation |",
            "|---|---|---|",
        ]
        for method, agree in entry["agreement"].items():
            corr = agree["logit_corr"]
            corr_cell = "—" if any(math.isnan(v) for v in corr["values"].values()) else _cell(corr)
            lines.append(f"| {method} | {_cell(agree['identical'])} | {corr_cell} |")
    lines += ["", "## Stage times", "", "| stage | seconds |", "|---|---|"]
    for name, entry in record["stages"].items():
        lines.append(f"| {name} | {entry['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def write_outputs(record: dict[str, Any], out: Path) -> None:
    """``study.json``, ``report.md`` and ``figures/`` (reliability, spread, per-layer), each
    atomically."""
    from adaptlab.io import atomic_open
    from adaptlab.plotting.study import draw_layers, draw_reliability, draw_spread

    draw_reliability(record, out / "figures" / "reliability.png")
    draw_spread(record, out / "figures" / "spread.png")
    if record["layers"]:
        draw_layers(record, out / "figures")
    with atomic_open(out / "report.md") as handle:
        handle.write(report_markdown(record))
    write_json(out / "study.json", record)
