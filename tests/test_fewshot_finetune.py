"""Prompt-based few-shot fine-tuning through scripts/finetune.py (kernel.md §4, §10)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from adaptlab.data import collate_prompts, encode_examples, label_word_ids, load_task
from adaptlab.models import load_tokenizer
from adaptlab.training.loop import BatchPlan, read_metrics
from tests.conftest import load_script

finetune = load_script("finetune")


def fewshot_args(model_dir, data_dir, out, *extra: str) -> list[str]:
    return [
        "--model", str(model_dir), "--task", "sst-2", "--task_dir", str(data_dir),
        "--shots", "8", "--data_seed", "42", "--output_dir", str(out),
        "--method", "full", "--optimizer", "sgd", "--lr", "0.5", "--schedule", "constant",
        "--batch_size", "4", "--micro_batch_size", "2", "--max_steps", "4",
        "--eval_points", "2", "--checkpoints", "0", "--save_init", "false",
        "--report_to", "none", "--progress", "false", *extra,
    ]  # fmt: skip


def whole_and_killed_runs(model_dir, data_dir, tmp_path, extra, monkeypatch, capsys):
    """The same few-shot run twice: whole, and killed before step 3 then resumed (it must say
    it resumed at step 2). Returns the two output folders ``(whole, killed)``."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    finetune.main(fewshot_args(model_dir, data_dir, whole, *extra))
    step = finetune.train_step

    def killed_at_step_3(*args, **kwargs):
        if args[7] == 3:
            raise KeyboardInterrupt("killed")
        return step(*args, **kwargs)

    monkeypatch.setattr(finetune, "train_step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(fewshot_args(model_dir, data_dir, killed, *extra))
    monkeypatch.setattr(finetune, "train_step", step)
    capsys.readouterr()
    finetune.main(fewshot_args(model_dir, data_dir, killed, *extra))
    assert "resumed at step 2" in capsys.readouterr().out
    return whole, killed


def label_word_scores(model, examples, tokenizer, ids) -> torch.Tensor:
    """[M, C] label-word logits, one example at a time (no padding involved)."""
    rows = []
    with torch.no_grad():
        for ex in examples:
            logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
            rows.append(logits[ex["position"], ids])
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_fewshot_sgd_run_trains_on_label_words(
    kind, tiny_model_dir, tiny_bert_dir, sst2_dir, tmp_path
):
    model_dir = tiny_model_dir if kind == "causal" else tiny_bert_dir
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM
    out = tmp_path / "run"
    finetune.main(fewshot_args(model_dir, sst2_dir, out))
    result = json.loads((out / "result.json").read_text())

    tokenizer = load_tokenizer(str(model_dir))
    splits = load_task("sst-2", sst2_dir, k=8, seed=42)
    ids = label_word_ids(splits.task, tokenizer)
    encode = dict(task=splits.task, tokenizer=tokenizer, kind=kind)
    train = encode_examples(splits.train, **encode)
    dev = encode_examples(splits.dev, **encode)
    test = encode_examples(splits.test, **encode)
    assert result["data"]["n"] == {"train": 16, "dev": 16, "test": 12}

    # the first step's loss is the CE over the label words of the pretrained model
    base = auto.from_pretrained(model_dir).eval()
    plan = BatchPlan(16, 4, 2, 1, 0, 42)
    first = [train[i] for i in plan.global_indices(0)]
    scores = label_word_scores(base, first, tokenizer, ids)
    expected = F.cross_entropy(scores, torch.tensor([ex["label"] for ex in first]))
    losses = {r["step"]: r["train/loss"] for r in read_metrics(out) if "train/loss" in r}
    assert losses[1] == pytest.approx(float(expected), rel=1e-5)

    # one SGD step on that batch, by hand, then the rest of the run: the final weights'
    # dev/test accuracy in result.json is what an independent evaluation finds
    final = auto.from_pretrained(out / "final").eval()
    for split, examples in (("final", dev), ("test_final", test)):
        logits = label_word_scores(final, examples, tokenizer, ids)
        labels = torch.tensor([ex["label"] for ex in examples])
        accuracy = float((logits.argmax(1) == labels).double().mean())
        metrics = result["metrics"][split]
        assert metrics["accuracy"] == pytest.approx(accuracy)
        assert metrics["loss"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)
    best = result["metrics"]["best"]
    assert best["metric"] == "accuracy" and "accuracy" in result["metrics"]["test_at_best"]
    changed = [
        name
        for name, p in final.state_dict().items()
        if not torch.equal(p, base.state_dict()[name])
    ]
    assert changed  # SGD moved the weights


def test_first_sgd_step_matches_a_hand_step(tiny_model_dir, sst2_dir, tmp_path):
    out = tmp_path / "one"
    finetune.main(fewshot_args(tiny_model_dir, sst2_dir, out, "--max_steps", "1",
                               "--eval_points", "1"))  # fmt: skip
    tokenizer = load_tokenizer(str(tiny_model_dir))
    splits = load_task("sst-2", sst2_dir, k=8, seed=42)
    ids = label_word_ids(splits.task, tokenizer)
    train = encode_examples(splits.train, splits.task, tokenizer, kind="causal")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    plan = BatchPlan(16, 4, 2, 1, 0, 42)
    batch = collate_prompts([train[i] for i in plan.global_indices(0)], tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    rows = torch.arange(4)
    loss = F.cross_entropy(logits[rows, batch["positions"]][:, ids], batch["class_labels"])
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    tuned = AutoModelForCausalLM.from_pretrained(out / "final")
    for name, value in tuned.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--label_words", "{'0': terrible, '1': great good}"], "great good"),
        (["--shots", "9"], "SST-2/9-42 nor"),
        (["--best_metric", "constrained_macro"], "does not apply to task='SST-2'"),
        (["--packing", "true"], "packing=true does not apply"),
        (["--from_linearhead", "true"], "use head=linear"),
        (["--head", "linear", "--objective", "label_words"], "use linear_head"),
    ],
    ids=["multi-token-word", "no-split-for-k", "mmlu-metric", "packing", "head-init", "head"],
)
def test_fewshot_bad_input_fails_in_one_line(
    flags, message, tiny_model_dir, sst2_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(fewshot_args(tiny_model_dir, sst2_dir, out, *flags))
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert exit_info.value.code == 2
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists()


def first_token_features(model, examples) -> torch.Tensor:
    """[N, H] float64 last hidden state at each example's scored position, one at a time."""
    rows = []
    with torch.no_grad():
        for ex in examples:
            out = model(input_ids=torch.tensor([ex["input_ids"]]), output_hidden_states=True)
            rows.append(out.hidden_states[-1][0, ex["position"]].double())
    return torch.stack(rows)


def test_linear_head_run_starts_from_logistic_regression(tiny_bert_dir, sst2_dir, tmp_path, capfd):
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import log_loss

    from adaptlab.training.checkpoint import HEAD_FILE, load_linear_head

    out = tmp_path / "linear"
    finetune.main(fewshot_args(tiny_bert_dir, sst2_dir, out, "--head", "linear",
                               "--from_linearhead", "true", "--max_steps", "2",
                               "--progress", "true"))  # fmt: skip
    bars = capfd.readouterr().err.replace("\r", "\n")
    for desc, n in (("head features", 16), ("evaluate", 16), ("evaluate", 12)):
        # 16 training examples' features, 16 dev and 12 test examples, with their rate
        assert re.search(rf"{desc}:\s+\d+%\|[^|]*\| \d+/{n} \[[^]]*ex/s\]", bars), (desc, n)
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["objective"] == "linear_head"

    tokenizer = load_tokenizer(str(tiny_bert_dir))
    splits = load_task("sst-2", sst2_dir, k=8, seed=42)
    encode = dict(task=splits.task, tokenizer=tokenizer, kind="masked", head="linear")
    train, dev, test = (encode_examples(s, **encode) for s in (splits.train, splits.dev,
                                                                splits.test))  # fmt: skip
    assert all(ex["position"] == 0 for ex in train)  # [CLS]

    # step 0: the head is scikit-learn's logistic regression on the pretrained [CLS] features
    base = AutoModelForMaskedLM.from_pretrained(tiny_bert_dir).eval()
    clf = LogisticRegressionCV(max_iter=5000, cv=5, random_state=0)
    clf.fit(first_token_features(base, train).numpy(), [ex["label"] for ex in train])
    x_dev, y_dev = first_token_features(base, dev).numpy(), [ex["label"] for ex in dev]
    start = result["metrics"]["evals"][0]
    assert start["step"] == 0
    assert start["accuracy"] == pytest.approx(clf.score(x_dev, y_dev))
    # near-separable features (C = 1e4): float32 padded batches move the fit by ~1e-3
    assert start["loss"] == pytest.approx(log_loss(y_dev, clf.predict_proba(x_dev)), rel=1e-2)

    # the saved final model + head reproduce the recorded test metrics, and the head trained
    final = AutoModelForMaskedLM.from_pretrained(out / "final").eval()
    head = load_linear_head(out / "final").double()
    scores = head(first_token_features(final, test)[:, None], None)
    labels = torch.tensor([ex["label"] for ex in test])
    metrics = result["metrics"]["test_final"]
    assert metrics["accuracy"] == pytest.approx(float((scores.argmax(1) == labels).double().mean()))
    assert metrics["loss"] == pytest.approx(float(F.cross_entropy(scores, labels)), rel=1e-5)
    initial = torch.cat([torch.as_tensor(-clf.coef_ / 2), torch.as_tensor(clf.coef_ / 2)])
    assert not torch.allclose(head.linear.weight, initial, atol=1e-6)
    assert (out / "best" / HEAD_FILE).is_file()


def test_l2_loss_is_the_squared_error_to_one_hot(tiny_model_dir, sst2_dir, tmp_path):
    out = tmp_path / "l2"
    finetune.main(fewshot_args(tiny_model_dir, sst2_dir, out, "--l2_loss", "true",
                               "--max_steps", "1", "--eval_points", "1"))  # fmt: skip
    tokenizer = load_tokenizer(str(tiny_model_dir))
    splits = load_task("sst-2", sst2_dir, k=8, seed=42)
    ids = label_word_ids(splits.task, tokenizer)
    train = encode_examples(splits.train, splits.task, tokenizer, kind="causal")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    plan = BatchPlan(16, 4, 2, 1, 0, 42)
    first = [train[i] for i in plan.global_indices(0)]
    scores = label_word_scores(base, first, tokenizer, ids)
    one_hot = F.one_hot(torch.tensor([ex["label"] for ex in first]), 2).float()
    losses = {r["step"]: r["train/loss"] for r in read_metrics(out) if "train/loss" in r}
    assert losses[1] == pytest.approx(float(torch.nn.MSELoss()(scores, one_hot)), rel=1e-5)


def test_killed_linear_head_run_resumes_exactly(
    tiny_bert_dir, sst2_dir, tmp_path, monkeypatch, capsys
):
    from adaptlab.training.checkpoint import load_linear_head

    extra = ("--head", "linear", "--max_steps", "4", "--save_state_every", "1")
    whole, killed = whole_and_killed_runs(tiny_bert_dir, sst2_dir, tmp_path, extra, monkeypatch,
                                          capsys)  # fmt: skip
    a, b = load_linear_head(whole / "final"), load_linear_head(killed / "final")
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=1e-6)
    ma = AutoModelForMaskedLM.from_pretrained(whole / "final").state_dict()
    mb = AutoModelForMaskedLM.from_pretrained(killed / "final").state_dict()
    assert ma.keys() == mb.keys() and not any("linear_head" in key for key in ma)
    for key in ma:
        torch.testing.assert_close(mb[key], ma[key], rtol=0, atol=1e-6)


def test_bare_encoder_trains_a_linear_head(tiny_bert_dir, sst2_dir, tmp_path):
    """A BertModel without an LM head (like the embedded MiniLM) fine-tunes with head=linear:
    prompts are built as for a masked LM, the head reads the first token, and LoRA wraps the
    encoder (PEFT's feature-extraction model, which needs no generation hooks)."""
    from transformers import AutoModel

    from adaptlab.training.errors import TrainingError
    from adaptlab.training.fewshot import model_kind

    encoder_dir = tmp_path / "encoder"
    encoder = AutoModelForMaskedLM.from_pretrained(tiny_bert_dir).bert
    encoder.save_pretrained(encoder_dir)
    load_tokenizer(str(tiny_bert_dir)).save_pretrained(encoder_dir)
    config = AutoModel.from_pretrained(encoder_dir).config
    with pytest.raises(TrainingError, match="no LM head"):
        model_kind(config)
    assert model_kind(config, encoder_ok=True) == "masked"

    out = tmp_path / "run"
    finetune.main(fewshot_args(encoder_dir, sst2_dir, out, "--head", "linear", "--method",
                               "lora", "--target_modules", "[query,value]", "--lora_r", "2",
                               "--optimizer", "adamw", "--lr", "1e-3"))  # fmt: skip
    result = json.loads((out / "result.json").read_text())
    hidden, layers = config.hidden_size, config.num_hidden_layers
    lora = layers * 2 * (2 * hidden + hidden * 2)  # A [r, H] and B [H, r] on query and value
    assert result["method"]["trainable_parameters"] == lora + hidden * 2 + 2  # + head H x C + C
    assert 0.0 <= result["metrics"]["test_final"]["accuracy"] <= 1.0
