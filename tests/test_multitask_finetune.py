"""Multi-task prompt-based fine-tuning through scripts/finetune.py (``--task a+b``, graft.md §8)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForMaskedLM

from adaptlab.data import encode_examples, label_word_ids, load_task, split_tasks
from adaptlab.models import load_tokenizer
from adaptlab.training.loop import BatchPlan, read_metrics
from tests.conftest import load_script, write_mrpc_kshot, write_sst2_kshot

finetune = load_script("finetune")


@pytest.fixture(scope="module")
def two_tasks_dir(tmp_path_factory) -> Path:
    """k-shot root with SST-2 and MRPC 8-42 (8 per label in train and dev, 12 test each)."""
    root = write_sst2_kshot(tmp_path_factory.mktemp("kshot2"), k=8, seed=42)
    return write_mrpc_kshot(root, k=8, seed=42)


def multitask_args(model_dir, data_dir, out, *extra: str) -> list[str]:
    return [
        "--model", str(model_dir), "--task", "sst-2+mrpc", "--task_dir", str(data_dir),
        "--shots", "8", "--data_seed", "42", "--output_dir", str(out),
        "--method", "full", "--optimizer", "sgd", "--lr", "0.5", "--schedule", "constant",
        "--batch_size", "16", "--micro_batch_size", "8", "--max_steps", "2",
        "--eval_points", "1", "--checkpoints", "0", "--save_init", "false",
        "--report_to", "none", "--progress", "false", *extra,
    ]  # fmt: skip


def scores_one_by_one(model, examples, ids) -> torch.Tensor:
    """[M, C] label-word logits, one example at a time (no padding, no batch mixing)."""
    with torch.no_grad():
        return torch.stack([
            model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, ex["position"], ids]
            for ex in examples
        ])  # fmt: skip


def test_multitask_run_uses_each_tasks_label_words(tiny_bert_dir, two_tasks_dir, tmp_path):
    out = tmp_path / "run"
    finetune.main(multitask_args(tiny_bert_dir, two_tasks_dir, out))
    result = json.loads((out / "result.json").read_text())
    recorded = json.loads((out / "run.json").read_text())["config"]["task"]
    assert recorded == "SST-2+MRPC" and split_tasks(recorded) == ["SST-2", "MRPC"]
    assert result["data"]["n"] == {
        "SST-2": {"train": 16, "dev": 16, "test": 12},
        "MRPC": {"train": 16, "dev": 16, "test": 12},
    }

    tokenizer = load_tokenizer(str(tiny_bert_dir))
    tasks = {}
    for name in ("SST-2", "MRPC"):
        splits = load_task(name, two_tasks_dir, k=8, seed=42)
        encode = dict(task=splits.task, tokenizer=tokenizer, kind="masked")
        tasks[name] = (
            label_word_ids(splits.task, tokenizer),
            encode_examples(splits.train, **encode),
            encode_examples(splits.dev, **encode),
        )
    assert tasks["SST-2"][0] != tasks["MRPC"][0]  # the two tasks score different words
    train = [(ex, ids) for ids, examples, _ in tasks.values() for ex in examples]

    # step 1's loss: the mean of per-example CEs, each over its own task's label words
    base = AutoModelForMaskedLM.from_pretrained(tiny_bert_dir).eval()
    plan = BatchPlan(32, 16, 8, 1, 0, 42)
    first = [train[i] for i in plan.global_indices(0)]
    assert len({tuple(ids) for _, ids in first}) == 2  # the batch mixes the tasks
    expected = [
        F.cross_entropy(scores_one_by_one(base, [ex], ids), torch.tensor([ex["label"]]))
        for ex, ids in first
    ]
    losses = {r["step"]: r["train/loss"] for r in read_metrics(out) if "train/loss" in r}
    assert losses[1] == pytest.approx(float(torch.stack(expected).mean()), rel=1e-5)

    # dev metrics per task, each scored with its own words; accuracy is their mean
    final_model = AutoModelForMaskedLM.from_pretrained(out / "final").eval()
    final = result["metrics"]["final"]
    for name, (ids, _, dev) in tasks.items():
        logits = scores_one_by_one(final_model, dev, ids)
        labels = torch.tensor([ex["label"] for ex in dev])
        accuracy = float((logits.argmax(1) == labels).double().mean())
        assert final[name]["accuracy"] == pytest.approx(accuracy)
        assert final[name]["loss"] == pytest.approx(float(F.cross_entropy(logits, labels)), 1e-5)
    assert "f1" in final["MRPC"] and "f1" not in final["SST-2"]
    mean = (final["SST-2"]["accuracy"] + final["MRPC"]["accuracy"]) / 2
    assert final["accuracy"] == pytest.approx(mean)
    assert result["metrics"]["best"]["metric"] == "accuracy"
    for split in ("test_final", "test_at_best"):
        test = result["metrics"][split]
        assert test["SST-2"]["n"] == test["MRPC"]["n"] == 12
        assert test["accuracy"] == pytest.approx(
            (test["SST-2"]["accuracy"] + test["MRPC"]["accuracy"]) / 2
        )
    assert any("eval/MRPC/accuracy" in r for r in read_metrics(out))


@pytest.mark.parametrize(
    ("task", "flags", "message"),
    [
        ("sst-2+sst-5", [], "(2 labels), sst-5 (5 labels)"),
        ("sst-2+nope", [], "Unknown task 'nope'"),
        ("sst-2+SST-2", [], "names SST-2 twice"),
        ("sst-2+mrpc", ["--template", "*cls**sent_0*_It_was*mask*.*sep+*"], "apply to one task"),
        ("sst-2+mrpc", ["--head", "linear"], "use head=prompt"),
        ("sst-2+mrpc", ["--best_metric", "f1"], "best_metric='f1' does not apply"),
        ("sst-2+QNLI", [], "QNLI/8-42 nor"),
    ],
    ids=["label-counts", "unknown", "twice", "template", "linear-head", "f1", "missing-task-data"],
)
def test_multitask_bad_input_fails_in_one_line(
    task, flags, message, tiny_bert_dir, two_tasks_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    args = multitask_args(tiny_bert_dir, two_tasks_dir, out, "--task", task, *flags)
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(args)
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert exit_info.value.code == 2
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists()
