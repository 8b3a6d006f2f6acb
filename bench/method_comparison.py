"""Benchmark: fine-tuning methods side by side on one model, task and step budget, in the spirit
of PEFT's ``method_comparison`` (anchors.md §2.1).

Each configuration of ``CONFIGS`` is a set of ``scripts/finetune.py`` flags; the same few-shot
task, k-shot split, batch, step budget and seed go to every one. Each runs in its own Python
process (so peaks of memory do not mix) through the recipe's own ``setup -> load -> train ->
finalize``, and the numbers are read from what the recipe writes:

- trainable parameters: ``result.json`` (``count_parameters`` of the prepared model), and their
  share of the model;
- task accuracy: ``metrics.test_final`` of ``result.json``, the test split after the last step
  (no evaluation during training, so no run gets a best-of-N selection the others lack);
- train tokens/s: real tokens (no padding) over seconds of the optimiser steps after the first
  ``--warmup`` ones; a step's seconds are its tokens over the ``train/tokens_per_second`` that
  ``metrics.jsonl`` logs for it, so this is the time the recipe measures around each step;
- peak memory of the training steps: on CUDA ``torch.cuda.max_memory_allocated`` (stats reset
  after loading, ``above_resident`` is what training adds to the loaded model); on a CPU the
  process's peak resident set during training (Linux: the high-water mark reset through
  ``/proc/self/clear_refs`` after loading), less the resident set before training; the record
  names the measure;
- forgetting: answer-only MMLU (0-shot, ``--mmlu_per_subject`` questions of every subject, the
  same for every method) scored by ``adaptlab.training.loop.evaluate`` on the fine-tuned model,
  minus the base model's score measured in the same run (accuracy over the four letters and
  the mean cross-entropy of the gold letter).

Peer ratios (goals from the issue, reported, never asserted), every one against ``lora`` (PEFT
LoRA r8 on every projection; the trainable counts show how close in size each method is): the
tokens/s of prefix, MAM, the inducers, the kernel adapters, Kernel-mix and the three bottleneck
adapters, goal >= 0.9x; their peak memory, goal at most 10% above LoRA's (the whole peak, as
PEFT reports it; what training adds to the loaded model is in the record and the table too).
Methods run one after the other, not interleaved: on a shared machine the load can change
between them (each row records the load average), so read CPU ratios as rough. A JSON record goes to
bench/results/method_comparison_<device>.json and a markdown table next to it (.md).

    python bench/method_comparison.py                                 # SmolLM2-135M, all methods
    python bench/method_comparison.py --methods lora inducer kernel_mix --steps 10
    python bench/method_comparison.py --device cuda --steps 200 --shots 64
    python bench/method_comparison.py --quick                         # tiny random Llama, seconds
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from adaptlab.config import parse_config
from adaptlab.data import answer_letter_ids, load_mmlu, subset_by_subject, tokenize_prompts
from adaptlab.io import read_json, write_json
from adaptlab.signals import StopAtStep
from adaptlab.telemetry import hardware, now, package_versions
from adaptlab.training.config import FinetuneConfig
from adaptlab.training.loop import evaluate, read_metrics, step_micro_batches

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
EMBEDDED = "embedded:smollm2-135m"
BASE = "base"  # the pretrained model, not trained: the reference of the forgetting columns
PEER = "lora"  # the row every ratio is taken against


@dataclass(frozen=True)
class Entry:
    """One configuration: a ``scripts/finetune.py`` method and its flags."""

    method: str
    flags: tuple[str, ...] = ()
    lr: float = 1e-3  # AdamW; the kernel-adapters NLG configs use 1.25e-3 for every PEFT method
    about: str = ""


CONFIGS: dict[str, Entry] = {
    "full": Entry("full", lr=2e-5, about="every weight"),
    "lora": Entry("lora", ("--lora_r", "8", "--lora_alpha", "16"), about="PEFT, r8, all proj."),
    "dora": Entry("dora", ("--lora_r", "8", "--lora_alpha", "16"), about="PEFT, r8, all proj."),
    "adalora": Entry(
        "adalora",
        ("--adalora_init_r", "12", "--adalora_target_r", "8"),
        about="PEFT, r12 -> 8, all proj.",
    ),
    "houlsby": Entry("houlsby", ("--adapter_reduction_factor", "16"), about="reduction 16"),
    "pfeiffer": Entry("pfeiffer", ("--adapter_reduction_factor", "16"), about="reduction 16"),
    "parallel": Entry("parallel", ("--adapter_reduction_factor", "16"), about="reduction 16"),
    "prefix": Entry("prefix", ("--prefix_length", "10"), about="10 virtual tokens"),
    "mam": Entry(
        "mam",
        ("--prefix_length", "10", "--adapter_reduction_factor", "16"),
        about="prefix 10 + parallel FFN adapter",
    ),
    "inducer": Entry(
        "inducer", ("--prefix_length", "10", "--prefix_dim", "15"), about="inducer-no-lora"
    ),
    "inducer_lora": Entry(
        "inducer",
        ("--prefix_length", "5", "--prefix_dim", "12", "--inducer_lora_q_r", "24"),
        about="+ Q-LoRA r24",
    ),
    "inducer_mam": Entry(
        "inducer",
        (
            "--prefix_length",
            "3",
            "--prefix_dim",
            "7",
            "--inducer_lora_q_r",
            "16",
            "--inducer_parallel_adapter",
            "true",
            "--adapter_reduction_factor",
            "18.2",
        ),
        about="+ Q-LoRA r16 + parallel adapter",
    ),  # fmt: skip
    "inducer_no_value_ext": Entry(
        "inducer",
        ("--prefix_length", "10", "--prefix_dim", "15", "--inducer_value_extension", "false"),
        about="value MLP per head, before W_O",
    ),
    "inducer_gating": Entry(
        "inducer",
        ("--prefix_length", "10", "--prefix_dim", "15", "--inducer_gating_ablation", "true"),
        about="(1 - w) Attn + w P_v",
    ),
    "inducer_value_gating": Entry(
        "inducer",
        ("--prefix_length", "10", "--prefix_dim", "15", "--inducer_value_gating", "true"),
        about="+ key MLP gated by (1 - w)",
    ),
    "inducer_mh_adapter": Entry(
        "inducer",
        ("--prefix_length", "10", "--prefix_dim", "15", "--inducer_mh_adapter", "true"),
        about="value MLP without w",
    ),
    "inducer_bare_query": Entry(
        "inducer", ("--prefix_length", "1", "--prefix_dim", "15"), about="key = q (length 1)"
    ),
    "inducer_adaptive": Entry(
        "inducer", ("--prefix_length", "0", "--prefix_dim", "15"), about="key = q, √position"
    ),
    "kernel_adapter": Entry("kernel_adapter", ("--kernel_variant", "kerfit"), about="kerfit"),
    "kernel_bandwidth": Entry(
        "kernel_adapter", ("--kernel_variant", "bandwidth"), about="bandwidth, per head"
    ),
    "kernel_bitfit": Entry("kernel_adapter", ("--kernel_variant", "bitfit"), about="bitfit"),
    "kernel_sep": Entry("kernel_adapter", ("--kernel_variant", "kerfit_sep"), about="kerfit_sep"),
    "kernel_X": Entry("kernel_adapter", ("--kernel_variant", "kerfit_X"), about="kerfit_X"),
    "kernel_mix": Entry("kernel_mix", about="QVO head-wise 3/8, shared 12/8"),
}
"""The predefined configurations (``--methods``); spec ranks from peft_methods.md §4. ``bitfit``
is left out: Llama projections have no biases."""

KERNEL_VIEW = ("prefix", "mam", "inducer", "kernel_adapter", "kernel_mix")
QUICK_METHODS = ["lora", "inducer", "kernel_mix"]
TOKENS_GOAL, MEMORY_GOAL = 0.9, 0.1
RATIOS = ("tokens_per_second", "peak_memory", "memory_above_resident", "trainable")


def load_finetune():
    """``scripts/finetune.py`` as a module (scripts are not a package)."""
    spec = importlib.util.spec_from_file_location("finetune_recipe", ROOT / "scripts/finetune.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def recipe_argv(name: str, args: argparse.Namespace, out: Path) -> list[str]:
    """The ``scripts/finetune.py`` command line of configuration ``name`` (``base``: no steps)."""
    entry = CONFIGS.get(name, Entry("full"))
    return [
        "--model", args.model, "--task", args.task, "--shots", str(args.shots),
        "--data_seed", str(args.data_seed), "--test_limit", str(args.test_limit),
        "--max_seq_len", str(args.max_seq_len), "--method", entry.method,
        "--optimizer", "adamw", "--lr", str(entry.lr), "--schedule", "constant",
        "--warmup_steps", "0", "--batch_size", str(args.batch_size),
        "--micro_batch_size", str(args.batch_size), "--max_steps", str(args.steps),
        "--eval_points", "0", "--eval_at_start", "false",
        "--eval_batch_size", str(args.eval_batch_size), "--checkpoints", "0",
        "--save_init", "false", "--save_epochs", "false", "--report_to", "none",
        "--progress", "false", "--seed", str(args.seed), "--output_dir", str(out),
        "--overwrite", "true", "--cpu", str(args.device == "cpu").lower(), *entry.flags,
    ]  # fmt: skip


class PeakMemory:
    """Peak memory of a stretch of work, in MiB: the whole peak and what it adds to the start."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.measure = "cuda max_memory_allocated"
        if device.type != "cuda":
            self.measure = "peak RSS of the process during training (VmHWM reset after loading)"
            if not self._reset_rss_peak():
                self.measure = "peak RSS of the process since it started (ru_maxrss)"
        self.start = 0.0

    @staticmethod
    def _reset_rss_peak() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
        except OSError:
            return False
        return True

    @staticmethod
    def _status_mib(key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        raise KeyError(key)

    def begin(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self._reset_rss_peak()
            self.start = self._status_mib("VmRSS")

    def end(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.measure.startswith("peak RSS of the process during"):
            peak = self._status_mib("VmHWM")
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"peak_mib": round(peak, 1), "above_resident_mib": round(peak - self.start, 1)}


def mmlu_ability(model, tokenizer, accelerator, args) -> dict:
    """Answer-only 0-shot MMLU on a fixed subset: the base ability fine-tuning may erode."""
    splits = load_mmlu()
    rows = subset_by_subject(splits.test, args.mmlu_per_subject, seed=0)[: args.mmlu_limit]
    questions = [splits.test[i] for i in rows]
    prompts = tokenize_prompts(questions, splits.dev, tokenizer, 0, 0, None)  # whole questions
    scores = evaluate(
        model, prompts, answer_letter_ids(tokenizer), tokenizer, accelerator, args.eval_batch_size
    )
    return {"accuracy": scores["constrained_micro"], "loss": scores["loss"], "n": scores["n"]}


def step_tokens(job, steps: range) -> list[int]:
    """Real tokens (no padding) of each step's batches, as ``train_step`` counts them."""
    cpu = torch.device("cpu")
    pad = job.tokenizer.pad_token_id
    return [
        sum(
            int(batch["attention_mask"].sum())
            for batch in step_micro_batches(
                job.data.train_items, job.plan, step - 1, job.data.collate, pad, cpu
            )
        )
        for step in steps
    ]


def run_one(name: str, args: argparse.Namespace) -> dict:
    """Train configuration ``name`` with the recipe and measure it (in this process)."""
    finetune = load_finetune()
    with tempfile.TemporaryDirectory(prefix=f"method_comparison_{name}_") as folder:
        out = Path(folder)
        cfg = parse_config(FinetuneConfig, recipe_argv(name, args, out))
        job = finetune.setup(cfg)
        run = finetune.load(job)
        memory = PeakMemory(job.accelerator.device)
        load_before = os.getloadavg()[0]
        row: dict = {"name": name}
        if name == BASE:
            row["test"] = job.data.test(run.model, job.accelerator)
        else:
            memory.begin()
            with StopAtStep() as stop:
                finetune.train(job, run, stop)
            row["memory"] = {**memory.end(), "measure": memory.measure}
            result = finetune.finalize(job, run)
            per_step = read_metrics(out)
            steps = range(args.warmup + 1, job.total_steps + 1)
            tokens = step_tokens(job, steps)
            rates = [r["train/tokens_per_second"] for r in per_step if r["step"] in steps]
            seconds = sum(t / r for t, r in zip(tokens, rates, strict=True))
            row |= {
                "method": cfg.method,
                "flags": list(CONFIGS[name].flags),
                "lr": cfg.lr,
                "trainable": result["method"]["trainable_parameters"],
                "total": result["method"]["total_parameters"],
                "test": result["metrics"]["test_final"],
                "tokens_per_second": round(sum(tokens) / seconds, 2),
                "timed_steps": len(tokens),
                "timed_tokens": sum(tokens),
                "timed_seconds": round(seconds, 3),
                "final_loss": per_step[-1]["train/loss"],
            }
        row["mmlu"] = mmlu_ability(run.model, job.tokenizer, job.accelerator, args)
        row["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return row


def launch(name: str, args: argparse.Namespace, argv: list[str], folder: Path) -> dict:
    """Run ``name`` in a fresh Python process (its own peak memory); returns its row."""
    row_file = folder / f"{name}.json"
    command = [sys.executable, __file__, *argv, "--worker", name, "--row_file", str(row_file)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", file=sys.stderr)
        return {"name": name, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    row = read_json(row_file)
    row["wall_seconds"] = round(time.perf_counter() - started, 1)
    return row


def add_comparisons(rows: dict[str, dict]) -> dict:
    """Forgetting against ``base`` and ratios against ``lora``, in place; returns the goals met."""
    base, peer = rows.get(BASE), rows.get(PEER)
    goals = {}
    for name, row in rows.items():
        if name == BASE or "error" in row:
            continue
        row["percent_trainable"] = round(100 * row["trainable"] / row["total"], 4)
        if base is not None:
            row["forgetting"] = {
                "mmlu_accuracy_change": round(
                    row["mmlu"]["accuracy"] - base["mmlu"]["accuracy"], 4
                ),
                "mmlu_loss_change": round(row["mmlu"]["loss"] - base["mmlu"]["loss"], 4),
            }
        if peer is None or "error" in peer or name == PEER:
            continue
        row["vs_lora"] = {
            "tokens_per_second": round(row["tokens_per_second"] / peer["tokens_per_second"], 3),
            "peak_memory": round(row["memory"]["peak_mib"] / peer["memory"]["peak_mib"], 3),
            "memory_above_resident": round(
                row["memory"]["above_resident_mib"] / peer["memory"]["above_resident_mib"], 3
            ),
            "trainable": round(row["trainable"] / peer["trainable"], 3),
        }
        if CONFIGS[name].method in KERNEL_VIEW or name in ("houlsby", "pfeiffer", "parallel"):
            goals[name] = {
                "tokens_per_second_vs_lora": row["vs_lora"]["tokens_per_second"],
                "tokens_goal_met": row["vs_lora"]["tokens_per_second"] >= TOKENS_GOAL,
                "peak_memory_vs_lora": row["vs_lora"]["peak_memory"],
                "memory_goal_met": row["vs_lora"]["peak_memory"] <= 1 + MEMORY_GOAL,
            }
    return goals


def cell(values: dict, key: str, spec: str) -> str:
    """A table cell: ``values[key]`` formatted, empty when there is none."""
    return format(values[key], spec) if key in values else ""


def markdown(rows: dict[str, dict], record: dict) -> str:
    """The table for the README: one line per configuration."""
    s = record["settings"]
    lines = [
        f"{s['model']}, {s['task']} {s['shots']}-shot, {s['steps']} steps of {s['batch_size']}, "
        f"{s['test_limit']} test examples, {record['device']} "
        f"(tokens/s over steps {s['warmup'] + 1}-{s['steps']}; memory: {record['memory_measure']}; "
        f"MMLU: {s['mmlu_per_subject']} question(s) per subject, 0-shot).",
        "",
        "| method | config | trainable | % | test acc. | tokens/s | × LoRA | peak MiB | × LoRA "
        "| train adds MiB | × LoRA | MMLU acc. Δ | MMLU loss Δ |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error']} |" + " |" * 11)
            continue
        if name == BASE:
            lines.append(
                f"| base | not trained | 0 | 0 | {row['test']['accuracy']:.3f} | | | | | | "
                f"| MMLU {row['mmlu']['accuracy']:.3f} | loss {row['mmlu']['loss']:.3f} |"
            )
            continue
        vs = row.get("vs_lora", {key: 1.0 for key in RATIOS} if name == PEER else {})
        forget = row.get("forgetting", {})
        memory = row["memory"]
        lines.append(
            f"| {name} | {CONFIGS[name].about} | {row['trainable']:,} | "
            f"{row['percent_trainable']:.3f} | {row['test']['accuracy']:.3f} | "
            f"{row['tokens_per_second']:.1f} | {cell(vs, 'tokens_per_second', '.2f')} | "
            f"{memory['peak_mib']:.0f} | {cell(vs, 'peak_memory', '.2f')} | "
            f"{memory['above_resident_mib']:.0f} | {cell(vs, 'memory_above_resident', '.2f')} | "
            f"{cell(forget, 'mmlu_accuracy_change', '+.3f')} | "
            f"{cell(forget, 'mmlu_loss_change', '+.3f')} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=EMBEDDED, help="a model name or folder")
    parser.add_argument("--task", default="tweet-sentiment", help="a few-shot task")
    parser.add_argument("--shots", type=int, default=16, help="training examples per label")
    parser.add_argument("--data_seed", type=int, default=13, help="which k-shot split")
    parser.add_argument("--test_limit", type=int, default=200, help="test examples scored")
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps per method")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left untimed")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--eval_batch_size", type=int, default=16)
    parser.add_argument("--max_seq_len", type=int, default=256)
    parser.add_argument("--mmlu_per_subject", type=int, default=1, help="forgetting subset")
    parser.add_argument("--mmlu_limit", type=int, default=None, help="its first n questions")
    parser.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--quick", action="store_true", help="tiny random Llama, 3 steps")
    parser.add_argument("--output", default=None, help="JSON path (default: bench/results/)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--row_file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} leaves no timed step after --warmup {args.warmup}.")
    return args


def quick_settings(args: argparse.Namespace, argv: list[str], folder: Path) -> list[str]:
    """``--quick``: a tiny random Llama saved in ``folder``, 3 steps of 4, 16 test examples and
    16 MMLU questions."""
    from adaptlab.models.tiny import save_tiny_llama

    model = save_tiny_llama(str(folder / "tiny_llama"))
    settings = {"model": model, "steps": 3, "warmup": 1, "batch_size": 4, "shots": 4,
                "test_limit": 16, "max_seq_len": 128, "mmlu_limit": 16}  # fmt: skip
    vars(args).update(settings)
    explicit = [a for a in argv if a != "--quick"]
    return explicit + [f"--{k}={v}" for k, v in settings.items()]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker is not None:
        write_json(Path(args.row_file), run_one(args.worker, args))
        return
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="method_comparison_") as tmp:
        folder = Path(tmp)
        passed = quick_settings(args, argv, folder) if args.quick else argv
        if args.quick and "--methods" not in argv:
            args.methods = QUICK_METHODS
            passed += ["--methods", *QUICK_METHODS]
        names = [BASE] + [m for m in args.methods if m != BASE]
        if PEER not in names:
            names.insert(1, PEER)
        rows = {}
        for name in names:
            rows[name] = launch(name, args, passed, folder)
            row = rows[name]
            summary = row.get("error") or (
                f"{row.get('trainable', 0):,} trainable, test {row['test']['accuracy']:.3f}"
                + (f", {row['tokens_per_second']:.1f} tok/s" if name != BASE else "")
                + f" ({row['wall_seconds']} s)"
            )
            print(f"{name}: {summary}", flush=True)
    goals = add_comparisons(rows)
    measures = {r["memory"]["measure"] for r in rows.values() if "memory" in r}
    record = {
        "benchmark": "method_comparison",
        "device": str(device),
        "memory_measure": "; ".join(sorted(measures)),
        "settings": {
            k: getattr(args, k)
            for k in (
                "model",
                "task",
                "shots",
                "data_seed",
                "test_limit",
                "steps",
                "warmup",
                "batch_size",
                "max_seq_len",
                "mmlu_per_subject",
                "seed",
                "quick",
            )
        },  # fmt: skip
        "recipe": "scripts/finetune.py setup -> load -> train -> finalize, AdamW, constant lr",
        "configs": {
            n: vars(CONFIGS[n]) | {"flags": list(CONFIGS[n].flags)} for n in rows if n in CONFIGS
        },
        "rows": list(rows.values()),
        "goals": {
            "tokens_per_second_vs_lora": f">= {TOKENS_GOAL}",
            "peak_memory_vs_lora": f"<= {1 + MEMORY_GOAL}",
            "per_method": goals,
        },  # fmt: skip
        "hardware": hardware(),
        "versions": package_versions(),
        "threads": torch.get_num_threads(),
        "created": now(),
    }
    if args.quick and args.output is None:
        path = RESULTS / f"method_comparison_quick_{device.type}.json"
    else:
        path = Path(args.output or RESULTS / f"method_comparison_{device.type}.json")
    write_json(path, record)
    table = markdown(rows, record)
    path.with_suffix(".md").write_text(table)
    print(table)
    for name, goal in goals.items():
        print(
            f"{name}: tokens/s {goal['tokens_per_second_vs_lora']:.2f}x LoRA "
            f"({'met' if goal['tokens_goal_met'] else 'not met'}, goal >= {TOKENS_GOAL}), "
            f"peak memory {goal['peak_memory_vs_lora']:.2f}x "
            f"({'met' if goal['memory_goal_met'] else 'not met'}, goal <= {1 + MEMORY_GOAL}x)"
        )
    print(f"-> {path}")


if __name__ == "__main__":
    main()
