"""The ViLoRA GLUE presets (scripts/configs/vilora/) hold peft_methods.md §10 and compose into
valid fine-tuning configs: base.yaml, then glue_<task>.yaml, a budget and a baseline overlay."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from adaptlab.config import parse_config
from adaptlab.training.config import FinetuneConfig
from adaptlab.training.errors import TrainingError

PRESETS = Path(__file__).resolve().parents[1] / "scripts" / "configs" / "vilora"
SUBMIT = Path(__file__).resolve().parents[1] / "slurm" / "submit_vilora_glue"

# peft_methods.md §10: task -> max_len, epochs, lr, warmup, LoRA alpha, tinit, tfinal, delta_t;
# lr is ("linear", lr) or ("clr", first lr, second lr, step C of the drop).
SPEC_TABLE = {
    "MNLI": (256, 7, ("linear", 0.4), 500, 16, 8000, 50000, 100),
    "QQP": (320, 5, ("linear", 0.4), 500, 16, 8000, 25000, 100),
    "QNLI": (512, 5, ("linear", 0.4), 500, 32, 2000, 8000, 100),
    "SST-2": (128, 24, ("linear", 0.4), 500, 16, 6000, 22000, 100),
    "CoLA": (64, 25, ("clr", 2.0, 0.4, 500), 100, 32, 800, 3500, 10),
    "STS-B": (128, 25, ("clr", 2.0, 0.4, 500), 100, 32, 800, 2000, 10),
    "MRPC": (320, 30, ("clr", 2.0, 0.5, 400), 100, 32, 600, 1800, 1),
    "RTE": (320, 50, ("clr", 2.0, 0.5, 400), 100, 32, 600, 1800, 1),
}
BUDGETS = {"budget_r2.yaml": (3, 2), "budget_r4.yaml": (6, 4)}
OVERLAYS = [None, "adalora_ivon_sensitivity", "adalora_adam", "lora", "full"]


def task_file(task: str) -> Path:
    return PRESETS / f"glue_{task.lower().replace('-', '')}.yaml"


ENCODER_TARGETS = ["query_proj", "key_proj", "value_proj", "output.dense", "intermediate.dense"]
"""Spec §9's `dense` without the MLM head's transform (the linear head never reads it)."""


def build(*files: str | Path) -> FinetuneConfig:
    """Parse the presets in order, as ``--config a --config b ...`` on the command line."""
    paths = [PRESETS / "base.yaml", *(PRESETS / f for f in files)]
    merged: dict = {}
    for path in paths:
        merged.update(yaml.safe_load(path.read_text()))
    assert merged["optimizer"] in ("ivon", "adamw")  # ``ivon``: adaptlab's own IVON
    args = [arg for path in paths for arg in ("--config", str(path))]
    return parse_config(FinetuneConfig, args)


@pytest.mark.parametrize("task", SPEC_TABLE)
@pytest.mark.parametrize("budget", BUDGETS)
def test_every_task_builds_vilora(task, budget):
    cfg = build(task_file(task), budget)
    assert (cfg.task, cfg.method, cfg.vilora_criterion) == (task, "adalora", "SNR_mean_abs")
    assert cfg.task_max_len == SPEC_TABLE[task][0]
    assert (cfg.adalora_init_r, cfg.adalora_target_r) == BUDGETS[budget]


@pytest.mark.parametrize("task", sorted(SPEC_TABLE))
def test_task_presets_hold_the_spec_table(task):
    preset = yaml.safe_load(task_file(task).read_text())
    max_len, epochs, lr, warmup, alpha, tinit, tfinal, delta_t = SPEC_TABLE[task]
    assert preset["task"] == task
    assert (preset["task_max_len"], preset["epochs"], preset["warmup_steps"]) == (
        max_len,
        epochs,
        warmup,
    )
    assert preset["lora_alpha"] == alpha
    assert (preset["adalora_tinit"], preset["adalora_tfinal"], preset["adalora_delta_t"]) == (
        tinit,
        tfinal,
        delta_t,
    )
    assert preset["schedule"] == lr[0]
    assert preset["lr"] == lr[1]
    if lr[0] == "clr":
        assert (preset["clr_second_lr"], preset["clr_const_steps"], preset["clr_end_lr"]) == (
            lr[2],
            lr[3],
            0.0,
        )


def test_base_holds_the_common_settings():
    base = yaml.safe_load((PRESETS / "base.yaml").read_text())
    assert base["model"] == "microsoft/deberta-v3-base"
    assert base["target_modules"] == ENCODER_TARGETS
    assert (base["batch_size"], base["method"], base["optimizer"]) == (32, "adalora", "ivon")
    ivon = {  # §6: ViLoRA's IVON settings
        "ivon_ess": 0,
        "ivon_hess_init": 1.0,
        "ivon_beta2": 0.99999,
        "weight_decay": 1e-8,
        "ivon_mc_samples": 1,
        "ivon_clip_radius": 1e-3,
        "ivon_hess_approx": "price",
        "ivon_infer_mc_samples": 0,
    }
    assert {key: base[key] for key in ivon} == ivon
    assert base["betas"][0] == 0.9
    assert base["vilora_criterion"] == "SNR_mean_abs"
    assert (base["kshot_mode"], base["weight_decay"]) == ("full", 1e-8)  # whole training sets
    assert base["adalora_orth_reg_weight"] == 0.1


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("task", ["RTE", "MNLI"])  # a clr task and a linear one
def test_overlays_compose(task, budget, overlay):
    files = [task_file(task), budget] + ([f"{overlay}.yaml"] if overlay else [])
    cfg = build(*files)
    init_r, target_r = BUDGETS[budget]
    assert cfg.task == task
    if overlay in (None, "adalora_ivon_sensitivity"):
        assert cfg.optimizer == "ivon" and cfg.method == "adalora"
        assert cfg.schedule == SPEC_TABLE[task][2][0]
        assert cfg.vilora_criterion == ("sensitivity" if overlay else "SNR_mean_abs")
    elif overlay == "adalora_adam":
        assert (cfg.method, cfg.optimizer, cfg.lr, cfg.warmup_steps) == (
            "adalora",
            "adamw",
            5e-4,
            1000,
        )
        assert cfg.clr_shape() is None and cfg.weight_decay == 0.0
    elif overlay == "lora":
        assert (cfg.method, cfg.lora_r, cfg.lora_alpha, cfg.lr) == ("lora", target_r, 32.0, 2e-4)
        assert cfg.target_modules == ENCODER_TARGETS
    else:
        assert (cfg.method, cfg.optimizer, cfg.weight_decay) == ("full", "adamw", 0.0)
    assert (cfg.adalora_init_r, cfg.adalora_target_r) == (init_r, target_r)


def test_submit_script_runs_every_combination_on_existing_presets():
    listing = subprocess.run(
        ["bash", str(SUBMIT), "--list"], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    runs = [line.split() for line in listing if line]
    tasks = {task: f"glue_{task}.yaml" for task, _, _, _ in runs}
    wanted = {task_file(t).name for t in SPEC_TABLE}
    assert set(tasks.values()) == wanted
    for task, budget, method, seed in runs:
        assert (PRESETS / tasks[task]).is_file() and (PRESETS / f"budget_{budget}.yaml").is_file()
        assert method == "vilora" or (PRESETS / f"{method}.yaml").is_file()
        assert 2021 <= int(seed) <= 2025
    # 8 tasks x (4 methods x 2 budgets + full once) x 5 seeds
    assert len(runs) == len(set(map(tuple, runs))) == 8 * (4 * 2 + 1) * 5


def test_task_max_len_truncates_fewshot_examples(tiny_bert_dir, sst2_dir):
    from transformers import AutoConfig, AutoTokenizer

    from adaptlab.training.data import encode_task

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    config = AutoConfig.from_pretrained(tiny_bert_dir)
    run = {"task": "SST-2", "task_dir": str(sst2_dir), "shots": 8, "head": "linear"}
    lengths = {}
    for limit in (None, 5):
        cfg = FinetuneConfig(**run, task_max_len=limit)
        data = encode_task(cfg, "SST-2", tokenizer, config)
        lengths[limit] = max(len(ex["input_ids"]) for ex in data.train + data.dev + data.test)
    assert lengths[None] > 5 and lengths[5] == 5


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"task": "mmlu", "task_max_len": 128}, "task_max_len does not apply to task='mmlu'"),
        ({"task": "tweet-sentiment", "task_max_len": 1}, "task_max_len=1 must be at least 2"),
    ],
)
def test_task_max_len_errors(fields, match):
    with pytest.raises(TrainingError, match=match):
        FinetuneConfig(**fields)


def write_original(root: Path) -> Path:
    """Tiny original GLUE folders: SST-2 (train, dev) and MNLI (train, dev_matched,
    dev_mismatched; the texts in columns 8 and 9, the label last)."""
    (root / "SST-2").mkdir(parents=True)
    (root / "SST-2" / "train.tsv").write_text("sentence\tlabel\n" + "good\t1\nbad\t0\nok\t1\n")
    (root / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nfine\t1\nawful\t0\n")
    (root / "MNLI").mkdir()
    for stem, label in (("train", "neutral"), ("dev_matched", "entailment")):
        (root / "MNLI" / f"{stem}.tsv").write_text(
            "\t".join(f"c{i}" for i in range(12)) + "\n" + "x\t" * 8 + f"p\th\t{label}\n"
        )
    (root / "MNLI" / "dev_mismatched.tsv").write_text(
        "header\n" + "x\t" * 8 + "p2\th2\tcontradiction\n"
    )
    return root


def test_full_mode_reads_the_whole_original_data(tmp_path):
    from adaptlab.data import load_task
    from adaptlab.data.errors import DataError

    root = write_original(tmp_path / "original")
    sst2 = load_task("SST-2", root, mode="full")
    assert [(e.text_a, e.label) for e in sst2.train] == [("good", "1"), ("bad", "0"), ("ok", "1")]
    assert [e.text_a for e in sst2.dev] == [e.text_a for e in sst2.test] == ["fine", "awful"]
    matched = load_task("MNLI", root, mode="full")
    assert [e.label for e in matched.train + matched.dev] == ["neutral", "entailment"]
    mismatched = load_task("mnli-mm", root, mode="full")
    assert [(e.text_a, e.label) for e in mismatched.test] == [("p2", "contradiction")]
    with pytest.raises(DataError, match="original data root"):
        load_task("RTE", root, mode="full")
    with pytest.raises(DataError, match="no original files"):
        load_task("tweet-sentiment", root, mode="full")


def test_full_data_clr_run_logs_the_hand_computed_lrs(tiny_bert_dir, tmp_path):
    from adaptlab.training.loop import read_metrics
    from tests.conftest import load_script

    root = write_original(tmp_path / "original")
    out = tmp_path / "run"
    load_script("finetune").main([
        "--model", str(tiny_bert_dir), "--task", "SST-2", "--task_dir", str(root),
        "--kshot_mode", "full", "--head", "linear", "--method", "full", "--optimizer", "sgd",
        "--schedule", "clr", "--lr", "2.0", "--warmup_steps", "1", "--clr_const_steps", "2",
        "--clr_second_lr", "0.5", "--batch_size", "1", "--max_steps", "4", "--eval_points", "1",
        "--checkpoints", "0", "--save_init", "false", "--save_epochs", "false",
        "--report_to", "none", "--progress", "false", "--output_dir", str(out),
    ])  # fmt: skip
    steps = [r for r in read_metrics(out) if "train/lr" in r]
    # t = 0: warmup 0/1; t = 1: the first lr; t = C = 2: the second lr; t = 3: 0.5 (1 - 1/2)
    assert [r["train/lr"] for r in steps] == pytest.approx([0.0, 2.0, 0.5, 0.25])
