"""STS-B, GLUE's regression task: score bins for k-shot sampling, a one-output linear head
trained on the squared error to the score, Pearson / Spearman metrics."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from transformers import AutoModelForMaskedLM

from adaptlab.data import (
    DataError,
    encode_examples,
    generate_kshot,
    get_task,
    load_task,
    regression_metrics,
)
from adaptlab.models import load_tokenizer
from adaptlab.training.fewshot import fit_regression_head, prepare_fewshot
from adaptlab.training.loop import BatchPlan, read_metrics
from tests.conftest import load_script

finetune = load_script("finetune")

HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
WORDS = ["good", "bad", "great", "film", "plot", "cast", "story", "music", "day", "night"]


def stsb_lines(rng: random.Random, n: int) -> list[str]:
    """GLUE STS-B rows whose score (0-5, 3 decimals) is 5 x the share of repeated words."""
    lines = []
    for i in range(n):
        first = [rng.choice(WORDS) for _ in range(6)]
        kept = rng.randint(0, 6)
        second = first[:kept] + [rng.choice(WORDS) for _ in range(6 - kept)]
        score = f"{5 * kept / 6:.3f}"
        lines.append(f"{i}\tmain\tfile\t2012\t{i}\tnone\tnone\t{' '.join(first)}\t"
                     f"{' '.join(second)}\t{score}")  # fmt: skip
    return lines


def write_stsb_kshot(root, k: int = 8, seed: int = 42, n_test: int = 12):
    """A synthetic STS-B k-shot folder ``root/k-shot/STS-B/{k}-{seed}`` (GLUE TSV, header):
    k rows below 2.5 and k from 2.5 on in train and dev, as LM-BFF's bins give."""
    rng = random.Random(seed)
    folder = root / "k-shot" / "STS-B" / f"{k}-{seed}"
    folder.mkdir(parents=True)
    pool = stsb_lines(rng, 400)
    low = [line for line in pool if float(line.split("\t")[-1]) < 2.5]
    high = [line for line in pool if float(line.split("\t")[-1]) >= 2.5]
    splits = {"train": low[:k] + high[:k], "dev": low[k : 2 * k] + high[k : 2 * k]}
    splits["test"] = pool[-n_test:]
    for split, lines in splits.items():
        (folder / f"{split}.tsv").write_text("\n".join([HEADER, *lines]) + "\n")
    return root


@pytest.fixture(scope="module")
def stsb_dir(tmp_path_factory):
    return write_stsb_kshot(tmp_path_factory.mktemp("stsb"))


def stsb_args(model_dir, data_dir, out, *extra: str) -> list[str]:
    return [
        "--model", str(model_dir), "--task", "STS-B", "--task_dir", str(data_dir),
        "--shots", "8", "--data_seed", "42", "--output_dir", str(out), "--head", "linear",
        "--method", "full", "--optimizer", "sgd", "--lr", "0.05", "--schedule", "constant",
        "--batch_size", "4", "--micro_batch_size", "2", "--max_steps", "3",
        "--eval_points", "1", "--checkpoints", "0", "--save_init", "false",
        "--report_to", "none", "--progress", "false", *extra,
    ]  # fmt: skip


def test_regression_metrics_are_scipys_correlations():
    predictions = [0.1, 2.0, 1.5, 4.2, 3.3, 0.7]
    scores = [0.0, 2.4, 1.0, 5.0, 3.8, 1.2]
    metrics = regression_metrics(predictions, scores)
    assert metrics["pearson"] == pytest.approx(pearsonr(predictions, scores)[0], rel=1e-12)
    assert metrics["spearman"] == pytest.approx(spearmanr(predictions, scores)[0], rel=1e-12)
    assert metrics["corr"] == pytest.approx((metrics["pearson"] + metrics["spearman"]) / 2)
    # by hand: reversed ranks
    assert regression_metrics([1, 2, 3], [3, 2, 1])["spearman"] == pytest.approx(-1.0)


def test_stsb_reads_real_scores_and_their_bins(stsb_dir):
    splits = load_task("STS-B", stsb_dir, k=8, seed=42)
    lines = (stsb_dir / "k-shot/STS-B/8-42/train.tsv").read_text().splitlines()[1:]
    assert [ex.score for ex in splits.train] == [float(line.split("\t")[9]) for line in lines]
    assert [ex.label for ex in splits.train] == [
        "0" if ex.score < 2.5 else "1" for ex in splits.train
    ]
    assert splits.train[0].text_b == lines[0].split("\t")[8]


def test_kshot_generator_samples_by_lm_bffs_score_bins(tmp_path):
    original = tmp_path / "original" / "STS-B"
    original.mkdir(parents=True)
    train = stsb_lines(random.Random(0), 60)
    (original / "train.tsv").write_text("\n".join([HEADER, *train]) + "\n")
    (original / "dev.tsv").write_text("\n".join([HEADER, *stsb_lines(random.Random(1), 5)]) + "\n")
    [folder] = generate_kshot(get_task("STS-B"), tmp_path / "original", tmp_path, k=4, seeds=[13])
    # LM-BFF by hand: shuffle the lines with seed 13, bucket by score < 2.5, k of each bucket
    lines = [line + "\n" for line in train]
    np.random.seed(13)
    np.random.shuffle(lines)
    buckets: dict[int, list[str]] = {}
    for line in lines:
        buckets.setdefault(int(float(line.strip().split("\t")[-1]) >= 2.5), []).append(line)
    expected = [line for bucket in buckets.values() for line in bucket[:4]]
    written = (folder / "train.tsv").read_text().splitlines(keepends=True)
    assert written[1:] == expected
    loaded = load_task("STS-B", tmp_path, k=4, seed=13)
    assert sorted(ex.score for ex in loaded.train) == sorted(
        float(line.split("\t")[-1]) for line in expected
    )
    # mode=full reads the original files the same way: every training score, in file order
    full = load_task("STS-B", tmp_path / "original", mode="full")
    assert [ex.score for ex in full.train] == [float(line.split("\t")[-1]) for line in train]
    assert len(full.test) == 5


def test_non_numeric_score_is_a_one_sentence_error(tmp_path):
    root = write_stsb_kshot(tmp_path)
    path = root / "k-shot/STS-B/8-42/dev.tsv"
    lines = path.read_text().splitlines()
    lines[3] = lines[3].rsplit("\t", 1)[0] + "\thigh"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"Row 4 of .*dev.tsv has score 'high'; task STS-B"):
        load_task("STS-B", root, k=8, seed=42)


def test_least_squares_head_init_is_ordinary_least_squares():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(20, 3, generator=generator, dtype=torch.float64)
    scores = (features @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3).tolist()
    scores = [s + 0.1 * (-1) ** i for i, s in enumerate(scores)]
    head = fit_regression_head(features, scores)
    design = np.hstack([features.numpy(), np.ones((20, 1))])
    solution = np.linalg.lstsq(design, np.array(scores), rcond=None)[0]
    assert head.weight.shape == (1, 3)
    np.testing.assert_allclose(head.weight.detach().numpy()[0], solution[:3], rtol=1e-5)
    assert float(head.bias.detach()) == pytest.approx(solution[3], rel=1e-5)


def head_predictions(model, head, examples) -> torch.Tensor:
    """[N] the head's output on each example's [CLS] state, one example at a time."""
    rows = []
    with torch.no_grad():
        for ex in examples:
            out = model(input_ids=torch.tensor([ex["input_ids"]]), output_hidden_states=True)
            rows.append(out.hidden_states[-1][0, ex["position"]].double())
        return copy.deepcopy(head).double()(torch.stack(rows)[:, None], None)[:, 0]


def test_stsb_run_trains_a_one_output_head_on_the_squared_error(tiny_bert_dir, stsb_dir, tmp_path):
    from adaptlab.training.checkpoint import load_linear_head

    tokenizer = load_tokenizer(str(tiny_bert_dir))
    splits = load_task("STS-B", stsb_dir, k=8, seed=42)
    encode = dict(task=splits.task, tokenizer=tokenizer, kind="masked", head="linear")
    train, test = (encode_examples(s, **encode) for s in (splits.train, splits.test))

    # lr 0: the saved head is the initial one, so step 1's loss is the hand MSE of its batch
    still = tmp_path / "still"
    finetune.main(stsb_args(tiny_bert_dir, stsb_dir, still, "--lr", "0", "--max_steps", "1"))
    base = AutoModelForMaskedLM.from_pretrained(tiny_bert_dir).eval()
    head = load_linear_head(still / "final")
    assert head.linear.weight.shape == (1, base.config.hidden_size)
    first = [train[i] for i in BatchPlan(16, 4, 2, 1, 0, 42).global_indices(0)]
    gold = torch.tensor([ex["score"] for ex in first], dtype=torch.float64)
    mse = float(((head_predictions(base, head, first) - gold) ** 2).mean())  # scores unscaled
    losses = {r["step"]: r["train/loss"] for r in read_metrics(still) if "train/loss" in r}
    assert losses[1] == pytest.approx(mse, rel=1e-5)

    # a few AdamW steps (SGD on the raw 0-5 scores collapses the tiny model's outputs to one
    # value): the reported test correlations are scipy's on the saved model's outputs
    out = tmp_path / "run"
    adamw = ("--optimizer", "adamw", "--lr", "1e-2", "--max_steps", "4")
    finetune.main(stsb_args(tiny_bert_dir, stsb_dir, out, *adamw))
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["best_metric"] == "pearson"
    final = AutoModelForMaskedLM.from_pretrained(out / "final").eval()
    trained = load_linear_head(out / "final")
    assert not torch.allclose(trained.linear.weight, head.linear.weight)
    predictions = head_predictions(final, trained, test).numpy()
    scores = [ex["score"] for ex in test]
    metrics = result["metrics"]["test_final"]
    assert metrics["pearson"] == pytest.approx(pearsonr(predictions, scores)[0], rel=1e-4)
    assert metrics["spearman"] == pytest.approx(spearmanr(predictions, scores)[0], rel=1e-4)
    assert metrics["corr"] == pytest.approx((metrics["pearson"] + metrics["spearman"]) / 2)
    assert metrics["loss"] == pytest.approx(float(np.mean((predictions - scores) ** 2)), rel=1e-4)
    assert "accuracy" not in metrics
    # a regression task keeps no per-example classification predictions
    assert "predictions" not in metrics and not (out / "predictions").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--head", "prompt"], "head='prompt' does not apply to task='STS-B'; use head=linear"),
        (["--l2_loss", "true"], "l2_loss=true does not apply to task='STS-B'"),
        (["--best_metric", "accuracy"], "best_metric='accuracy' does not apply"),
    ],
    ids=["prompt-head", "l2-loss", "accuracy"],
)
def test_stsb_bad_options_fail_in_one_line(
    flags, message, tiny_bert_dir, stsb_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(stsb_args(tiny_bert_dir, stsb_dir, out, *flags))
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert exit_info.value.code == 2
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists()


def test_prompt_head_is_refused_for_stsb(tiny_bert_dir, stsb_dir):
    tokenizer = load_tokenizer(str(tiny_bert_dir))
    with pytest.raises(DataError, match="regression task.*use head=linear"):
        prepare_fewshot("STS-B", tokenizer, "masked", data_dir=stsb_dir, k=8, seed=42)


def test_kernel_config_refuses_stsb():
    from adaptlab.ntk.config import KernelConfig
    from adaptlab.ntk.errors import KernelError

    with pytest.raises(KernelError, match="STS-B is a regression task; the kernel"):
        KernelConfig(task="STS-B")


def test_a_nan_correlation_never_stays_the_best():
    """Constant predictions have no Pearson correlation (NaN): a later number replaces it."""
    from adaptlab.training.checkpoint import is_better

    assert is_better("pearson", 0.1, {"value": float("nan")})
    assert not is_better("pearson", float("nan"), {"value": 0.1})


def test_encoded_scores_survive_the_cache_and_key_it(tiny_bert_dir, stsb_dir, tmp_path):
    from dataclasses import replace

    tokenizer = load_tokenizer(str(tiny_bert_dir))
    splits = load_task("STS-B", stsb_dir, k=8, seed=42)
    encode = dict(task=splits.task, tokenizer=tokenizer, kind="masked", head="linear")
    first = encode_examples(splits.dev, cache_dir=tmp_path, **encode)
    assert [ex["score"] for ex in first] == [ex.score for ex in splits.dev]
    assert encode_examples(splits.dev, cache_dir=tmp_path, **encode) == first
    moved = [replace(splits.dev[0], score=4.9), *splits.dev[1:]]
    assert encode_examples(moved, cache_dir=tmp_path, **encode)[0]["score"] == 4.9
    assert len(list(tmp_path.glob("prompts-STS-B-*.json"))) == 2
