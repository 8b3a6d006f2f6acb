"""Per-example test predictions of few-shot fine-tuning runs (``predictions/test_step_{s}.jsonl``):
the numbers in result.json are what the files give, recomputed independently."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score
from transformers import AutoModelForCausalLM

from adaptlab.data import encode_examples, label_word_ids, load_task
from adaptlab.models import load_tokenizer
from adaptlab.training.metrics import expected_calibration_error
from tests.conftest import load_script
from tests.test_fewshot_finetune import fewshot_args, label_word_scores

finetune = load_script("finetune")


def read_records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_file_gives(metrics: dict, records: list[dict], labels: list[int]) -> None:
    """The file holds one record per test example in order, and its logits give ``metrics``."""
    assert [r["index"] for r in records] == list(range(len(labels)))
    assert [r["label"] for r in records] == labels
    logits = np.array([r["logits"] for r in records])
    predictions = np.array([r["prediction"] for r in records])
    assert logits.shape == (len(labels), 2)
    assert (logits.argmax(1) == predictions).all()
    assert metrics["n"] == len(records)
    assert metrics["accuracy"] == pytest.approx(float((predictions == labels).mean()), abs=1e-12)
    macro = f1_score(labels, predictions, average="macro", zero_division=0)
    assert metrics["macro_f1"] == pytest.approx(float(macro), abs=1e-12)
    probs = torch.softmax(torch.tensor(logits), 1)
    assert metrics["ece"] == pytest.approx(expected_calibration_error(probs, labels), abs=1e-12)


CASES = {
    "prompt": [],
    "linear-head": ["--head", "linear", "--optimizer", "adamw", "--lr", "1e-3"],
    # IVON's MC inference: the file holds the averaged logits the metrics were computed from
    "ivon-mc": ["--method", "lora", "--lora_r", "2", "--optimizer", "ivon", "--lr", "0.1",
                "--ivon_ess", "0", "--ivon_beta2", "0.5", "--ivon_infer_mc_samples", "2"],
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_test_predictions_give_the_reported_metrics(
    case, tiny_model_dir, tiny_bert_dir, sst2_dir, tmp_path
):
    out = tmp_path / "run"
    model_dir = tiny_bert_dir if case == "linear-head" else tiny_model_dir
    flags = ["--max_steps", "4", "--eval_points", "2", *CASES[case]]
    finetune.main(fewshot_args(model_dir, sst2_dir, out, *flags))
    metrics = json.loads((out / "result.json").read_text())["metrics"]

    splits = load_task("sst-2", sst2_dir, k=8, seed=42)
    labels = [int(ex.label) for ex in splits.test]
    files = {}
    for key in ("test_final", "test_at_best"):
        name = metrics[key]["predictions"]
        step = 4 if key == "test_final" else metrics["best"]["step"]
        assert name == f"predictions/test_step_{step}.jsonl"
        files[key] = read_records(out / name)
        check_file_gives(metrics[key], files[key], labels)
    # only test evaluations write files (not the dev ones), and the dev metrics name none
    tested = {4, metrics["best"]["step"]}
    assert sorted(p.name for p in (out / "predictions").iterdir()) == sorted(
        f"test_step_{s}.jsonl" for s in tested
    )
    assert all("predictions" not in e and "macro_f1" in e for e in metrics["evals"])
    if case != "prompt":
        return
    # the final file's logits are the final weights' label-word logits, computed one by one
    tokenizer = load_tokenizer(str(tiny_model_dir))
    test = encode_examples(splits.test, splits.task, tokenizer, kind="causal")
    final = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    expected = label_word_scores(final, test, tokenizer, label_word_ids(splits.task, tokenizer))
    logits = torch.tensor([r["logits"] for r in files["test_final"]], dtype=torch.float64)
    torch.testing.assert_close(logits, expected.double(), rtol=1e-4, atol=1e-5)
