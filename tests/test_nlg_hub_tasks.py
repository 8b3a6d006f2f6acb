"""The hub generation tasks (CNN/DailyMail, WebNLG, CoQA), their scores and label smoothing.

Rows are hand-written in each dataset's schema and served by a stand-in for
``datasets.load_dataset`` (no network); the answer F1 is checked against pairs worked out by
hand, multi-reference BLEU against sacrebleu called directly, and the smoothed answer-only loss
against ``F.cross_entropy(label_smoothing=ε)`` on the same logits.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from adaptlab.data import nlg_hub
from adaptlab.data.errors import DataError
from adaptlab.models.tiny import tiny_tokenizer
from adaptlab.training.answer_only import collate_answer_only
from adaptlab.training.config import FinetuneConfig
from adaptlab.training.generation import GENERATION_TASKS, PromptLayout, encode_prompt
from adaptlab.training.metrics import generation_scores, normalize_answer, token_f1
from adaptlab.training.objectives import IGNORE_INDEX, OBJECTIVES
from adaptlab.training.optim import TrainingError

TOK = tiny_tokenizer()

CNN_ROWS = {
    "train": [
        {"id": "c1", "article": "A  long\narticle.", "highlights": "First point .\nSecond ."}
    ],
    "validation": [{"id": "c2", "article": "Dev article.", "highlights": "Dev point ."}],
    "test": [
        {"id": "c3", "article": "Test one.", "highlights": "One ."},
        {"id": "c4", "article": "Test two.", "highlights": "Two ."},
    ],
}


def webnlg_row(eid: str, triples: list[str], texts: list[str]) -> dict:
    return {
        "eid": eid,
        "category": "Airport",
        "original_triple_sets": {"otriple_set": [triples]},
        "modified_triple_sets": {"mtriple_set": [triples]},
        "lex": {"comment": ["good"] * len(texts), "lid": ["Id1"] * len(texts), "text": texts},
    }


WEBNLG_ROWS = {
    "train": [
        webnlg_row(
            "Id1",
            ["Aarhus_Airport | cityServed | Aarhus,_Denmark", "Aarhus | leader | Jacob_Bundsgaard"],
            ["Aarhus Airport serves Aarhus.", "Aarhus, led by Jacob Bundsgaard, has an airport."],
        ),
        webnlg_row("Id2", ["A | p | B"], []),  # no text: skipped
    ],
    "dev": [webnlg_row("Id3", ["A | p | B"], ["A p B.", "B is the p of A."])],
    "test": [webnlg_row("Id4", ["C | q | D"], ["C q D.", "D is q of C.", "C's q is D."])],
}


def coqa_row(id: str, story: str, questions: list[str], answers: list[str]) -> dict:
    spans = {"answer_start": [0] * len(answers), "answer_end": [1] * len(answers)}
    return {
        "source": "wikipedia",
        "story": story,
        "questions": questions,
        "answers": {"input_text": answers, **spans},
    }


COQA_ROWS = {
    "train": [
        coqa_row(f"s{i}", f"Story {i}.", [f"Who {i}?", "Where?"], [f"Ann {i}", "home"])
        for i in range(3)
    ],
    "validation": [coqa_row("v", "Val story.", ["What?", "Why?"], ["a cat", "it rained"])],
}


@pytest.fixture
def hub(monkeypatch):
    """``datasets.load_dataset`` answers from the fake rows above; the hub is 'reachable'."""
    import datasets

    rows = {"cnn_dailymail": CNN_ROWS, "web_nlg": WEBNLG_ROWS, "stanfordnlp/coqa": COQA_ROWS}
    asked = []

    def load_dataset(path, config=None, split=None):
        asked.append((path, config, split))
        return datasets.Dataset.from_list(rows[path][split])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(nlg_hub, "hub_reachable", lambda: True)
    monkeypatch.setattr(nlg_hub, "hub_offline", lambda: False)
    return asked


# --- parsing ------------------------------------------------------------------------------------


def test_cnn_dailymail_rows_become_article_to_highlights(hub):
    splits = GENERATION_TASKS["cnn-dailymail"].load(k=16, seed=1, mode="k-shot", test_limit=None)
    assert {(p, c) for p, c, _ in hub} == {("cnn_dailymail", "3.0.0")}
    [train] = splits.train
    assert train == ("cnn_dailymail-train-c1", "A long article.", "First point . Second .",
                     ("First point . Second .",))  # fmt: skip
    assert [ex.target for ex in splits.dev] == ["Dev point ."]
    assert [ex.guid for ex in splits.test] == ["cnn_dailymail-test-c3", "cnn_dailymail-test-c4"]
    limited = GENERATION_TASKS["cnn-dailymail"].load(k=16, seed=1, mode="k-shot", test_limit=1)
    assert len(limited.test) == 1 and limited.provenance["n_test"] == 1


def test_webnlg_trains_on_each_lexicalisation_and_scores_against_all(hub):
    splits = GENERATION_TASKS["webnlg"].load(k=16, seed=1, mode="k-shot", test_limit=None)
    assert {(p, c) for p, c, _ in hub} == {("web_nlg", "webnlg_challenge_2017")}
    source = "Aarhus Airport | cityServed | Aarhus, Denmark ; Aarhus | leader | Jacob Bundsgaard"
    assert [(ex.prompt, ex.target, ex.references) for ex in splits.train] == [
        (source, "Aarhus Airport serves Aarhus.", ("Aarhus Airport serves Aarhus.",)),
        (
            source,
            "Aarhus, led by Jacob Bundsgaard, has an airport.",
            ("Aarhus, led by Jacob Bundsgaard, has an airport.",),
        ),
    ]
    [dev] = splits.dev
    assert (dev.prompt, dev.references) == ("A | p | B", ("A p B.", "B is the p of A."))
    [test] = splits.test
    assert test.target == "C q D." and len(test.references) == 3


def test_coqa_turns_carry_the_conversation_so_far(hub, monkeypatch):
    monkeypatch.setattr(nlg_hub, "HELD_OUT_ROWS", 1)
    splits = GENERATION_TASKS["coqa"].load(k=16, seed=1, mode="k-shot", test_limit=None)
    assert {(p, s) for p, _, s in hub} == {("stanfordnlp/coqa", "train"),
                                          ("stanfordnlp/coqa", "validation")}  # fmt: skip
    # validation is the test set, one turn per example
    assert [(ex.prompt, ex.target) for ex in splits.test] == [
        ("Val story.\nQ: What?", "a cat"),
        ("Val story.\nQ: What?\nA: a cat\nQ: Why?", "it rained"),
    ]
    # dev stories (1 held out of 3) are held out of training whole: all their turns
    stories = {ex.prompt.split("\n")[0] for ex in splits.train}
    dev_stories = {ex.prompt.split("\n")[0] for ex in splits.dev}
    assert len(stories) == 2 and len(dev_stories) == 1 and not stories & dev_stories
    assert len(splits.train) == 4 and len(splits.dev) == 2
    assert splits.train[1].prompt.endswith("\nQ: Where?") and splits.train[1].target == "home"


def test_a_hub_task_without_the_hub_says_which_dataset_it_needs(monkeypatch):
    monkeypatch.setattr(nlg_hub, "hub_reachable", lambda: False)
    monkeypatch.setattr(nlg_hub, "hub_offline", lambda: False)
    with pytest.raises(DataError, match="needs the dataset web_nlg"):
        GENERATION_TASKS["webnlg"].load(k=16, seed=1, mode="k-shot", test_limit=None)


def test_coqa_keeps_the_end_of_a_long_source():
    """The question comes last, so a CoQA source loses its first tokens, an article its last."""
    text = "one two three four five six seven eight nine ten"
    end, cut = encode_prompt(text, TOK, 3, PromptLayout("Story:", "\nA:", keep="end"))
    start, _ = encode_prompt(text, TOK, 3)
    body = TOK(" " + text, add_special_tokens=False)["input_ids"]
    assert cut == len(body) - 3
    assert TOK.decode(end).endswith(TOK.decode(body[-3:]) + "\nA:")
    assert TOK.decode(body[:3]) in TOK.decode(start)


# --- scores -------------------------------------------------------------------------------------


def test_answer_f1_equals_hand_computed_pairs():
    assert normalize_answer("The Cat's  hat, an apple!") == ["cats", "hat", "apple"]
    # pred {big, red, dog}, ref {red, dog, barked}: 2 common, P = R = 2/3
    assert token_f1("the big red dog", "a red dog barked") == pytest.approx(2 / 3)
    # multiplicity: pred [cat, cat], ref [cat, sat]: 1 common, P = 1/2, R = 1/2
    assert token_f1("The cat, the cat!", "cat sat") == pytest.approx(0.5)
    # pred [paris], ref [in, paris, france]: P = 1, R = 1/3 -> F = 2 * 1/3 / (4/3) = 1/2
    assert token_f1("Paris.", "in Paris, France") == pytest.approx(0.5)
    assert token_f1("the", "a") == 1.0 and token_f1("yes", "the") == 0.0
    scores = generation_scores(["Paris.", "no"], [["in Paris, France", "Paris"], "No!"], True)
    assert scores["token_f1"] == pytest.approx(1.0)  # the best reference of each


def test_multi_reference_bleu_equals_sacrebleu():
    from rouge_score import rouge_scorer
    from sacrebleu import corpus_bleu

    predictions = ["the cat sat on a mat", "a dog ran in the park today", "hello there"]
    references = [
        ["the cat sat on the mat", "a cat was sitting on a mat"],
        ["the dog ran in the park", "a dog was running in a park", "dogs run in parks"],
        "hello there friend",
    ]
    streams = [
        ["the cat sat on the mat", "the dog ran in the park", "hello there friend"],
        ["a cat was sitting on a mat", "a dog was running in a park", None],
        [None, "dogs run in parks", None],
    ]
    scores = generation_scores(predictions, references)
    assert scores["bleu"] == pytest.approx(corpus_bleu(predictions, streams).score)
    single = generation_scores(predictions, [r if isinstance(r, str) else r[0] for r in references])
    assert scores["bleu"] > single["bleu"]  # more references, more matched n-grams
    scorer = rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True)
    best = [
        max(scorer.score(r, p)["rouge2"].fmeasure for r in ([ref] if isinstance(ref, str) else ref))
        for p, ref in zip(predictions, references, strict=True)
    ]
    assert scores["rouge2"] == pytest.approx(sum(best) / 3)
    with pytest.raises(TrainingError, match="no reference"):
        generation_scores(["x"], [[]])


# --- label smoothing ----------------------------------------------------------------------------


def test_smoothed_answer_loss_equals_torch_cross_entropy(tiny_model_dir):
    """Per example: mean over the answer tokens of F.cross_entropy(label_smoothing=0.1), then
    the mean over the batch, computed apart on each example's own logits."""
    from adaptlab.training.generation import encode_headline

    items = [
        encode_headline("a", "The first and longer story of the two.", "First", TOK, 400, 130),
        encode_headline("b", "Second story.", "A second title", TOK, 400, 130),
    ]
    batch = collate_answer_only(items, TOK.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        plain = OBJECTIVES["answer_only"](model, batch).loss
        smoothed = OBJECTIVES["answer_only"](model, batch, label_smoothing=0.1).loss
        expected = []
        for item in items:
            logits = model(input_ids=torch.tensor([item["input_ids"]])).logits[0]
            first = item["labels"].count(IGNORE_INDEX)
            targets = torch.tensor(item["input_ids"][first:])
            expected.append(F.cross_entropy(logits[first - 1 : -1], targets, label_smoothing=0.1))
    torch.testing.assert_close(smoothed, torch.stack(expected).mean(), rtol=1e-5, atol=1e-6)
    assert not torch.isclose(smoothed, plain)


@pytest.mark.parametrize(
    "options, says",
    [
        ({"label_smoothing": 1.0}, "label_smoothing=1.0 is outside [0, 1)"),
        ({"label_smoothing": -0.1}, "outside [0, 1)"),
        (
            {"label_smoothing": 0.1, "task": "mmlu-topics-2"},
            "label_smoothing applies to the answer_only loss",
        ),
        ({"task": "webnlg", "kshot_mode": "k-shot-10x"}, "kshot_mode='k-shot-10x'"),
        ({"task": "webnlg", "best_metric": "token_f1"}, "best_metric='token_f1'"),
    ],
)
def test_bad_nlg_options_get_one_sentence(options, says):
    with pytest.raises(TrainingError, match=None) as info:
        FinetuneConfig(**options)
    assert says in str(info.value)


def test_each_hub_task_selects_on_its_spec_metric():
    picked = {t: FinetuneConfig(task=t).best_metric for t in ("cnn-dailymail", "webnlg", "coqa")}
    assert picked == {"cnn-dailymail": "rougeL", "webnlg": "bleu", "coqa": "token_f1"}
    assert FinetuneConfig(task="coqa", label_smoothing=0.1).objective == "answer_only"


# --- the recipe on fake hub rows ----------------------------------------------------------------


@pytest.mark.parametrize("task", ["webnlg", "coqa"])
def test_finetune_runs_a_hub_task_and_scores_its_references(
    task, hub, tiny_model_dir, tmp_path, monkeypatch
):
    import json

    from sacrebleu import corpus_bleu

    from adaptlab.training.metrics import token_f1 as f1
    from tests.conftest import load_script

    monkeypatch.setattr(nlg_hub, "HELD_OUT_ROWS", 1)  # CoQA: 1 dev story, 2 to train on
    out = tmp_path / "run"
    load_script("finetune").main([
        "--model", str(tiny_model_dir), "--task", task, "--label_smoothing", "0.1",
        "--method", "full", "--optimizer", "sgd", "--lr", "0.1", "--schedule", "constant",
        "--batch_size", "1", "--micro_batch_size", "1", "--max_steps", "1",
        "--eval_points", "1", "--eval_at_start", "false", "--checkpoints", "0",
        "--save_init", "false", "--save_epochs", "false", "--source_max_tokens", "24",
        "--max_new_tokens", "4", "--output_dir", str(out), "--report_to", "none",
        "--progress", "false",
    ])  # fmt: skip
    result = json.loads((out / "result.json").read_text())
    assert result["data"]["label_smoothing"] == 0.1
    metrics = result["metrics"]["test_final"]
    path = out / "predictions" / "test_step_1.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    predicted = [r["prediction"] for r in records]
    references = [r.get("references", [r["reference"]]) for r in records]
    if task == "webnlg":
        assert references == [["C q D.", "D is q of C.", "C's q is D."]]
        streams = [[refs[j] for refs in references] for j in range(3)]
        assert metrics["bleu"] == pytest.approx(corpus_bleu(predicted, streams).score)
        assert result["metrics"]["best"]["metric"] == "bleu"
    else:
        pairs = zip(predicted, references, strict=True)
        expected = sum(f1(p, refs[0]) for p, refs in pairs) / len(records)
        assert metrics["token_f1"] == pytest.approx(expected)
        assert result["metrics"]["best"]["metric"] == "token_f1"
