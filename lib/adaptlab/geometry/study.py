"""The landscape study over extraction runs: every metric at every layer of every run.

Used by ``scripts/analyze_repr.py``. A run is one extraction folder (``0shot``, ``5shot``,
a fine-tuned model, a checkpoint); the result is one flat record per (run, layer), so that
tables, figures and regression checks all read the same ``metrics.json``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from adaptlab.errors import UserError
from adaptlab.extract.reader import ExtractionRun, find_runs
from adaptlab.geometry.layer import MetricSettings, data_overlap, layer_metrics
from adaptlab.io import atomic_open


@dataclass
class AnalyzeConfig:
    """Compute intrinsic dimension, density peaks and overlaps per layer of extraction runs.

    Args:
        runs: extraction folders (or folders of them) to analyse, e.g. ``results/demo``.
        point: extraction point whose layers are analysed (``norm1`` in the paper).
        skip_layers: layer labels left out (the paper skips ``l0``, the embedding norm).
        include_final: also analyse the final norm and the logits when they were extracted.
        reference: run (folder name) the other runs' data overlap is measured against;
            default: the first run. Only runs on the same examples are compared.
        checkpoints: extraction folders of training checkpoints (e.g. log-spaced steps); each
            is compared with ``reference`` by data overlap, per layer, for the dynamics figure.
        metrics: metric parameters (spec defaults: maxk 1000, GRIDE to rank 100 reported at
            n1=16, kNN density k=16, ADP Z=1.6, class fraction 0.3, overlap k=30).
        device: ``auto`` (GPU when there is one), ``cpu`` or ``cuda``: where kNN runs.
        output_dir: where ``metrics.json``, ``metrics.csv`` and figures go.
        plot: draw the figures into ``output_dir/figures``.
        progress: show a progress bar over layers.
    """

    runs: list[str] = field(default_factory=lambda: ["results/demo"])
    point: str = "norm1"
    skip_layers: list[int] = field(default_factory=lambda: [0])
    include_final: bool = True
    reference: str | None = None
    checkpoints: list[str] = field(default_factory=list)
    metrics: MetricSettings = field(default_factory=MetricSettings)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output_dir: str = "results/analysis"
    plot: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.runs:
            raise ValueError("runs is empty; name one or more extraction folders.")


def open_runs(paths: list[str]) -> list[ExtractionRun]:
    """Every run under each path, in the order given (a folder of runs: fewest shots first)."""
    runs = [run for path in paths for run in find_runs(path)]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise UserError(f"Two runs share the folder name {', '.join(dup)}; rename one of them.")
    return runs


def layers_of(run: ExtractionRun, cfg: AnalyzeConfig) -> list[tuple[str, int]]:
    """(point, layer) pairs to analyse in ``run``, in depth order."""
    pairs = [(cfg.point, e["layer"]) for e in run.entries(cfg.point)]
    if not pairs:
        points = sorted({e["point"] for e in run.entries()})
        raise UserError(f"{run.path} has no '{cfg.point}' layers; it holds {', '.join(points)}.")
    pairs = [(p, i) for p, i in pairs if i not in cfg.skip_layers]
    if cfg.include_final:
        pairs += [
            (e["point"], e["layer"])
            for e in run.entries()
            if e["point"] in ("final_norm", "logits")
        ]
    return pairs


def analyze(cfg: AnalyzeConfig, runs: list[ExtractionRun], device) -> list[dict]:
    """Metric records, one per (run, layer), plus data overlap with the reference run.

    Neighbour lists of the reference run are kept per layer, so the overlap of another run on
    the same examples costs no second kNN.
    """
    checkpoints = open_runs(cfg.checkpoints) if cfg.checkpoints else []
    names = [r.name for r in runs]
    if cfg.reference is not None and cfg.reference not in names:
        raise UserError(f"reference {cfg.reference!r} is not among the runs ({', '.join(names)}).")
    ref_name = cfg.reference or names[0]
    ordered = sorted(runs, key=lambda r: r.name != ref_name) + checkpoints
    ref_run = ordered[0]
    work = [(run, point, layer) for run in ordered for point, layer in layers_of(run, cfg)]
    reference_neighbours = {}
    records = []
    bar = tqdm(work, desc="analyse", unit="layer", disable=not cfg.progress, dynamic_ncols=True)
    for run, point, layer in bar:
        bar.set_postfix(run=run.name, layer=f"{point}/l{layer}")
        x = run.layer(point, layer)
        labels = run.labels()
        record, neighbours = layer_metrics(x, labels, cfg.metrics, device=device)
        record = {
            "run": run.name,
            "kind": "checkpoint" if run in checkpoints else "run",
            "num_shots": run.manifest["prompt"]["num_shots"],
            "point": point,
            "layer": layer,
            "label": f"l{layer}",
            "depth": _depth(run, point, layer),
            **record,
        }
        if run is ref_run:
            reference_neighbours[(point, layer)] = neighbours
        elif run.rows == ref_run.rows and (point, layer) in reference_neighbours:
            record["overlap_reference"] = data_overlap(
                reference_neighbours[(point, layer)], neighbours, cfg.metrics.overlap_k
            )
        record["reference"] = ref_name
        records.append(record)
    return records


def _depth(run: ExtractionRun, point: str, layer: int) -> float:
    """Relative depth in [0, 1] (final norm = 1, logits just past it), for cross-model plots."""
    n_layers = run.manifest["n_layers"]
    return round(layer / n_layers, 4)


def write_metrics(records: list[dict], out: Path) -> tuple[Path, Path]:
    """``metrics.json`` (records) and ``metrics.csv`` (scalar columns), both atomically."""
    from adaptlab.io import write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", records)
    columns = []
    for record in records:
        columns += [
            k for k, v in record.items() if not isinstance(v, list | dict) and k not in columns
        ]
    with atomic_open(out / "metrics.csv") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for record in records:
            writer.writerow({k: _cell(record.get(k)) for k in columns})
    return out / "metrics.json", out / "metrics.csv"


def _cell(value):
    if isinstance(value, float) and math.isnan(value):
        return ""
    return value
