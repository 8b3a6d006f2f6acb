"""Analyse extracted representations layer by layer (Doimo et al. 2024, metrics of §9).

For every layer of every run: intrinsic dimension (TwoNN, GRIDE), density-peak clustering
(ADP: number of peaks, core fraction), agreement of the peaks with subjects and answer letters
(ARI, AMI, NMI, homogeneity, completeness), label overlap, a linear probe, and the data
overlap with a reference run on the same examples. Writes ``metrics.json`` (one record per run
x layer), ``metrics.csv`` and, with ``--plot true``, the figures.

Launch:
    python scripts/analyze_repr.py --config scripts/configs/analyze_demo.yaml
    python scripts/analyze_repr.py --runs '[runs/0shot,runs/5shot,runs/finetuned]' \
        --checkpoints '[runs/ckpt/step_1,runs/ckpt/step_8,runs/ckpt/step_64]' --reference finetuned
    python scripts/analyze_repr.py --config scripts/configs/analyze_paper.yaml --runs '[...]'
    sbatch slurm/submit_analysis --runs '[results/llama3-8b/mmlu_test]' --output_dir ...

kNN runs on the GPU when there is one (blockwise, memory bounded by --metrics.block_size);
DADApy's estimators run on the CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from adaptlab.config import parse_config, to_dict
from adaptlab.errors import UserError, report_user_errors
from adaptlab.geometry.study import AnalyzeConfig, analyze, layers_of, open_runs, write_metrics
from adaptlab.io import write_json
from adaptlab.rundir import Layout, check_ours, lock_output
from adaptlab.telemetry import hardware, now, package_versions

LAYOUT = Layout(
    "analysis",
    markers=("analysis_manifest.json", "metrics.json"),
    owned=("analysis_manifest.json", "metrics.json", "metrics.csv", "figures"),
)
"""What this recipe writes into ``output_dir`` (a rerun replaces these files)."""


def setup(cfg: AnalyzeConfig):
    """Lock the output folder, open every run and check its layers, before any computation."""
    lock = lock_output(cfg.output_dir, "analysis")  # held until the process ends
    check_ours(cfg.output_dir, LAYOUT)
    runs = open_runs(cfg.runs)
    for run in runs + (open_runs(cfg.checkpoints) if cfg.checkpoints else []):
        layers_of(run, cfg)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "--device cuda was asked for but no CUDA device is visible; use auto or cpu."
        )
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    return runs, torch.device("cuda" if cuda else "cpu"), lock


def summarise(records: list[dict]) -> list[dict]:
    """Per run: where the intrinsic dimension and ARI(subjects) peak."""
    rows = []
    for name in dict.fromkeys(r["run"] for r in records):
        block = [
            r for r in records if r["run"] == name and r["point"] not in ("final_norm", "logits")
        ]
        peak_id = max(block, key=lambda r: r["id_gride"])
        peak_ari = max(block, key=lambda r: r["ari_subjects"])
        rows.append({
            "run": name,
            "n": block[0]["n"],
            "id_peak_layer": peak_id["layer"],
            "id_peak": round(peak_id["id_gride"], 2),
            "ari_subjects_peak_layer": peak_ari["layer"],
            "ari_subjects_peak": round(peak_ari["ari_subjects"], 3),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(AnalyzeConfig, argv)
    with report_user_errors():
        runs, device, lock = setup(cfg)
        records = analyze(cfg, runs, device)
    out = Path(cfg.output_dir)
    write_metrics(records, out)
    summary = summarise(records)
    write_json(
        out / "analysis_manifest.json",
        {
            "config": to_dict(cfg),
            "runs": {r.name: str(r.path) for r in runs},
            "summary": summary,
            "versions": package_versions(),
            "hardware": hardware(),
            "created": now(),
        },
    )
    if cfg.plot:
        from adaptlab.plotting.landscape import draw_all

        draw_all(records, out / "figures")
    for row in summary:
        print(
            f"{row['run']:>12}: N={row['n']}  ID peaks at l{row['id_peak_layer']} "
            f"({row['id_peak']})  ARI(subjects) peaks at l{row['ari_subjects_peak_layer']} "
            f"({row['ari_subjects_peak']})"
        )
    print(f"metrics -> {out / 'metrics.json'}")
    lock.release()


if __name__ == "__main__":
    sys.exit(main())
