"""The demo behind `make demo`: the representation landscape of SmolLM2-135M on MMLU.

Extracts every layer's last-token representation of a subject-balanced MMLU subset, once per
shot count (0, 2 and 5 shots by default), with the same recipe a user runs by hand
(scripts/extract_repr.py), then prints accuracy and throughput per run. Runs on 2 CPU cores
in about 5 minutes; a rerun reuses finished runs.

Launch:
    make demo
    python scripts/demo.py --shots '[0,5]' --samples_per_subject 20
    python scripts/demo.py --config scripts/configs/demo.yaml
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from adaptlab.config import parse_config
from adaptlab.demo import DemoConfig
from adaptlab.io import read_json

ROOT = Path(__file__).resolve().parents[1]


def extract(cfg: DemoConfig, shots: int) -> Path:
    """One extraction run, exactly as a user would launch it."""
    out = Path(cfg.output_dir) / f"{shots}shot"
    cmd = [
        sys.executable, str(ROOT / "scripts" / "extract_repr.py"),
        "--config", cfg.extract_preset,
        "--model", cfg.model,
        "--num_shots", str(shots),
        "--subjects", "[" + ",".join(cfg.subjects) + "]",
        "--samples_per_subject", str(cfg.samples_per_subject),
        "--batch_size", str(cfg.batch_size),
        "--output_dir", str(out),
    ]  # fmt: skip
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


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(DemoConfig, argv)
    runs = {k: extract(cfg, k) for k in cfg.shots}
    report(runs)


if __name__ == "__main__":
    main()
