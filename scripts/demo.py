"""The demo behind `make demo`: the representation landscape of SmolLM2-135M on MMLU.

1. extracts every layer's last-token representation of a subject-balanced MMLU subset, once
   per shot count (0, 2 and 5 shots by default) with scripts/extract_repr.py;
2. analyses every layer of every run with scripts/analyze_repr.py (intrinsic dimension,
   density peaks, ARI with subjects and letters, overlaps) and draws the figures;
3. writes a one-page report, results/demo/report.md, with a table per run and the figures.

Each step is the recipe a user runs by hand. Runs on 2 CPU cores in under 10 minutes; a
rerun reuses finished extractions.

Launch:
    make demo
    python scripts/demo.py --shots '[0,5]' --samples_per_subject 20
    python scripts/demo.py --config scripts/configs/demo.yaml
    # the paper-size study (Llama-3-8B, all subjects, 0/1/2/5 shots) on a GPU node
    python scripts/demo.py --config scripts/configs/demo_full.yaml
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from adaptlab.config import parse_config
from adaptlab.demo import DemoConfig
from adaptlab.extract.reader import open_run
from adaptlab.io import read_json
from adaptlab.plotting.report import write_report

ROOT = Path(__file__).resolve().parents[1]


def extract(cfg: DemoConfig, shots: int) -> Path:
    """One extraction run, exactly as a user would launch it."""
    out = Path(cfg.output_dir) / f"{shots}shot"
    cmd = [
        sys.executable, str(ROOT / "scripts" / "extract_repr.py"),
        "--config", cfg.extract_preset,
        "--model", cfg.model,
        "--num_shots", str(shots),
        "--samples_per_subject", str(cfg.samples_per_subject),
        "--batch_size", str(cfg.batch_size),
        "--output_dir", str(out),
        "--overwrite", "true",  # the demo owns its folder: a changed setting replaces the run
    ]  # fmt: skip
    if cfg.subjects is not None:
        cmd += ["--subjects", "[" + ",".join(cfg.subjects) + "]"]
    print(f"\n== {shots}-shot extraction -> {out}", flush=True)
    subprocess.run(cmd, check=True)
    return out


def report(runs: dict[int, Path]) -> None:
    """Accuracy and throughput of each run, one line each."""
    columns = ("shots", "N", "acc", "acc A-D", "macro A-D", "tok/s", "layers")
    print("\n" + "  ".join(f"{c:>9}" for c in columns))
    for shots, out in runs.items():
        m = read_json(out / "manifest.json")
        acc, t = m["accuracy"], m["timings"]
        values = (
            shots, m["n_examples"], f"{acc['micro']:.3f}", f"{acc['constrained_micro']:.3f}",
            f"{acc['constrained_macro']:.3f}", f"{t['tokens_per_second']:.0f}", len(m["layers"]),
        )  # fmt: skip
        print("  ".join(f"{v:>9}" for v in values))
    print(f"\nRepresentations, manifests and statistics are in {Path(out).parent}/")


def analyse(cfg: DemoConfig, runs: dict[int, Path]) -> Path:
    """Landscape metrics of every layer of every run, and their figures."""
    out = Path(cfg.output_dir) / "analysis"
    cmd = [
        sys.executable, str(ROOT / "scripts" / "analyze_repr.py"),
        "--config", cfg.analyze_preset,
        "--runs", "[" + ",".join(str(p) for p in runs.values()) + "]",
        "--output_dir", str(out),
        "--plot", "true",
    ]  # fmt: skip
    print(f"\n== analysis of {len(runs)} runs -> {out}", flush=True)
    subprocess.run(cmd, check=True)
    return out


def write_demo_report(cfg: DemoConfig, runs: dict[int, Path], analysis: Path) -> Path:
    manifest = read_json(analysis / "analysis_manifest.json")
    figures = sorted((analysis / "figures").glob("*.png"))
    path = write_report(
        Path(cfg.output_dir) / "report.md",
        [open_run(p) for p in runs.values()],
        manifest["summary"],
        figures,
        title="Representation landscape of SmolLM2-135M on MMLU (make demo)",
    )
    print(f"report -> {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(DemoConfig, argv)
    runs = {k: extract(cfg, k) for k in cfg.shots}
    report(runs)
    analysis = analyse(cfg, runs)
    write_demo_report(cfg, runs, analysis)


if __name__ == "__main__":
    main()
