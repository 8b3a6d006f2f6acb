"""IVON's Monte Carlo-averaged evaluation under a linear head (``head=linear``): each draw
perturbs the adapter and the head, and the head's logits (STS-B: predicted scores) are averaged,
by hand and through a whole fine-tuning run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score

from adaptlab.data import encode_examples, load_task
from adaptlab.models import load_tokenizer
from adaptlab.models.tiny import tiny_bert
from adaptlab.training.ivon_predict import mc_averaged_logits
from adaptlab.training.objectives import (
    LinearHead,
    attach_linear_head,
    find_linear_head,
    last_token_positions,
    linear_head_objective,
)
from adaptlab.training.optim import build_optimizer, unwrap_optimizer
from tests.conftest import load_script
from tests.test_fewshot_finetune import fewshot_args, whole_and_killed_runs
from tests.test_stsb import stsb_args, write_stsb_kshot

finetune = load_script("finetune")

IVON_FLAGS = (
    "--optimizer", "ivon", "--lr", "0.2", "--ivon_ess", "0", "--ivon_beta2", "0.5",
    "--ivon_infer_mc_samples", "2",
)  # fmt: skip
"""ess 0: the 16 training examples, so σ ≈ 0.25 and the draws move the outputs visibly."""


def head_batch(n_outputs: int) -> dict[str, torch.Tensor]:
    """Three rows, the last two padded, read at their last tokens (not only position 0)."""
    generator = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])
    batch = {
        "input_ids": torch.randint(5, 500, (3, 7), generator=generator) * mask,
        "attention_mask": mask,
        "positions": last_token_positions(mask),
        "class_labels": torch.tensor([0, 2, 1]) % n_outputs,
    }
    if n_outputs == 1:
        batch["target_scores"] = torch.tensor([0.5, 3.0, 4.2])
    return batch


def ivon_head_model(n_outputs: int, trained: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A tiny BERT with a linear head, after one IVON step on the head objective. ``trained``:
    ``lora`` (LoRA on query/value and the head, both in IVON's posterior), ``head`` (the head
    alone) or ``bare`` (LoRA on a bare encoder, no LM head and so no LM logits)."""
    model = tiny_bert().bert if trained == "bare" else tiny_bert()
    if trained == "head":
        model.requires_grad_(False)
    else:
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["query", "value"]))
    attach_linear_head(model, LinearHead(model.config.hidden_size, n_outputs))
    optimizer = build_optimizer("ivon", model, lr=0.1, ivon_ess=50, ivon_beta2=0.5, ivon_seed=3)
    with torch.enable_grad(), optimizer.sampled_params(train=True):
        linear_head_objective(model, head_batch(n_outputs)).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


@pytest.mark.parametrize(
    ("n_outputs", "trained"),
    [(3, "lora"), (1, "lora"), (3, "head"), (1, "bare")],
    ids=["3-classes", "score", "head-only", "bare-encoder"],
)
@torch.no_grad()
def test_mc_averaged_head_logits_equal_a_hand_loop_of_posterior_draws(n_outputs, trained):
    model, optimizer = ivon_head_model(n_outputs, trained)
    head, batch, samples = find_linear_head(model), head_batch(n_outputs), 3
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    at_mean = linear_head_objective(model, batch)

    with mc_averaged_logits(model, optimizer, samples=samples, seed=0):
        averaged = linear_head_objective(model, batch)
        again = linear_head_objective(model, batch)  # the same draws for every batch
    hand = []
    for draw in range(samples):  # encoder and head at the same draw θ_s
        with optimizer.sampled_params(train=False, draw=draw):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=True)  # fmt: skip
            hand.append(head(out.hidden_states[-1], batch["positions"]))
    mean_logits = sum(hand) / samples
    torch.testing.assert_close(averaged.scores, mean_logits, rtol=1e-5, atol=1e-6)
    assert torch.equal(averaged.scores, again.scores)
    assert (averaged.scores - at_mean.scores).abs().max() > 1e-3  # the draws moved the outputs
    if n_outputs == 1:  # the mean predicted score's squared error
        expected = (mean_logits[:, 0] - batch["target_scores"]) ** 2
    else:  # cross-entropy of the mean logits, not of the mean probabilities
        expected = F.cross_entropy(mean_logits, batch["class_labels"], reduction="none")
    torch.testing.assert_close(averaged.per_example, expected, rtol=1e-5, atol=1e-6)

    with mc_averaged_logits(model, optimizer, samples=0, seed=0):  # S = 0: the posterior mean
        assert torch.equal(linear_head_objective(model, batch).scores, at_mean.scores)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert "forward" not in model.__dict__


def hand_head_outputs(model, optimizer, examples, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """``[M, C]`` the head's outputs averaged over draws 0..S-1 of IVON's current posterior, and
    at the mean, one example at a time (no padding, no batching)."""
    ivon, head = unwrap_optimizer(optimizer), find_linear_head(model)
    was_training = model.training
    model.eval()

    def outputs() -> torch.Tensor:
        rows = []
        for ex in examples:
            out = model(input_ids=torch.tensor([ex["input_ids"]]), output_hidden_states=True)
            rows.append(head(out.hidden_states[-1], torch.tensor([ex["position"]]))[0])
        return torch.stack(rows).double()

    with torch.no_grad():
        at_mean = outputs()
        draws = []
        for draw in range(samples):
            with ivon.sampled_params(train=False, draw=draw):
                draws.append(outputs())
    model.train(was_training)
    return (sum(draws) / samples).numpy(), at_mean.numpy()


def mc_run(monkeypatch, args: list[str], examples: list[dict]) -> tuple[dict, np.ndarray]:
    """Run finetune with ``args``; return its test metrics at the end and the hand MC outputs
    on ``examples`` (the test split) at that evaluation, the last one averaged."""
    calls = []

    def spy(model, optimizer, samples, seed):
        assert samples == 2
        calls.append(hand_head_outputs(model, optimizer, examples, samples))
        return mc_averaged_logits(model, optimizer, samples, seed)

    monkeypatch.setattr(finetune, "mc_averaged_logits", spy)
    finetune.main(args)
    out = Path(args[args.index("--output_dir") + 1])
    result = json.loads((out / "result.json").read_text())
    averaged, at_mean = calls[-1]  # finalize scores the test split last
    assert np.abs(averaged - at_mean).max() > 1e-3  # the reported outputs are not the mean's
    return result["metrics"]["test_final"], averaged


def encoded_test(name: str, data_dir, model_dir) -> list[dict]:
    splits = load_task(name, data_dir, k=8, seed=42)
    tokenizer = load_tokenizer(str(model_dir))
    return encode_examples(splits.test, splits.task, tokenizer, kind="masked", head="linear")


def test_classification_run_reports_metrics_of_the_averaged_head_logits(
    tiny_bert_dir, sst2_dir, tmp_path, monkeypatch
):
    test = encoded_test("sst-2", sst2_dir, tiny_bert_dir)
    args = fewshot_args(tiny_bert_dir, sst2_dir, tmp_path / "run", "--head", "linear",
                        "--method", "lora", "--target_modules", "[query,value]", "--lora_r", "2",
                        "--max_steps", "2", "--eval_points", "1", *IVON_FLAGS)  # fmt: skip
    metrics, logits = mc_run(monkeypatch, args, test)
    labels = [ex["label"] for ex in test]
    assert metrics["n"] == len(test)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, logits.argmax(1)))
    log_probs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    cross_entropy = -log_probs[np.arange(len(labels)), labels].mean()
    assert metrics["loss"] == pytest.approx(cross_entropy, rel=1e-4)


def test_stsb_run_reports_correlations_of_the_averaged_scores(tiny_bert_dir, tmp_path, monkeypatch):
    data_dir = write_stsb_kshot(tmp_path / "data")
    test = encoded_test("STS-B", data_dir, tiny_bert_dir)
    args = stsb_args(tiny_bert_dir, data_dir, tmp_path / "run", "--max_steps", "2",
                     *IVON_FLAGS)  # fmt: skip
    metrics, predicted = mc_run(monkeypatch, args, test)
    predicted, scores = predicted[:, 0], [ex["score"] for ex in test]
    assert metrics["pearson"] == pytest.approx(pearsonr(predicted, scores)[0], rel=1e-4)
    assert metrics["spearman"] == pytest.approx(spearmanr(predicted, scores)[0], rel=1e-4)
    assert metrics["loss"] == pytest.approx(float(np.mean((predicted - scores) ** 2)), rel=1e-4)


def test_averaged_evaluations_are_the_same_after_a_resume(
    tiny_bert_dir, sst2_dir, tmp_path, monkeypatch, capsys
):
    """Killed after step 2 and resumed, a run evaluates with the same draws as a whole run."""
    extra = ("--head", "linear", "--method", "lora", "--target_modules", "[query,value]",
             "--lora_r", "2", "--save_state_every", "1", *IVON_FLAGS)  # fmt: skip
    whole, killed = whole_and_killed_runs(tiny_bert_dir, sst2_dir, tmp_path, extra, monkeypatch,
                                          capsys)  # fmt: skip
    a, b = (json.loads((run / "result.json").read_text())["metrics"] for run in (whole, killed))
    assert [e["step"] for e in a["evals"]] == [e["step"] for e in b["evals"]] == [0, 2, 4]
    pairs = [*zip(a["evals"], b["evals"], strict=True), (a["test_final"], b["test_final"])]
    for first, second in pairs:  # the evaluation at step 4 ran after the resume
        for key in ("accuracy", "loss", "ece"):
            assert second[key] == pytest.approx(first[key], rel=1e-5, abs=1e-6), key
