"""Option scoring for causal LMs (graft.md §9): each class scores log p(" " + word | prompt),
summed over the option's tokens, checked against one full forward pass per example and option."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from adaptlab.data import (
    DataError,
    collate_prompts,
    encode_examples,
    label_word_ids,
    load_task,
    option_ids,
)
from adaptlab.models import load_tokenizer
from adaptlab.models.tiny import tiny_llama, tiny_tokenizer
from adaptlab.training.fewshot import collate_options, prepare_fewshot, scoring_parts
from adaptlab.training.loop import BatchPlan, read_metrics
from adaptlab.training.objectives import (
    OBJECTIVES,
    label_words_objective,
    option_log_probs,
    options_objective,
)
from tests.conftest import load_script
from tests.test_fewshot_finetune import fewshot_args

finetune = load_script("finetune")

# " a description" and " an entity" are several tokens each and share their first, " a"
OPTIONS = {"0": "a description", "1": "an entity"}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return tiny_llama(vocab_size=len(tokenizer)).eval()


def loop_scores(model, examples, options) -> torch.Tensor:
    """[M, C]: one forward pass per example and option, summing the option's token log-probs."""
    rows = []
    with torch.no_grad():
        for ex in examples:
            prompt = ex["input_ids"][: ex["position"] + 1]
            row = []
            for option in options:
                ids = torch.tensor([prompt + option])
                log_probs = model(input_ids=ids).logits[0].float().log_softmax(-1)
                row.append(sum(log_probs[len(prompt) - 1 + i, t] for i, t in enumerate(option)))
            rows.append(torch.stack(row))
    return torch.stack(rows)


def test_option_scores_equal_a_loop_of_full_forward_passes(model, tokenizer, sst2_dir):
    splits = load_task("sst-2", sst2_dir, k=8, seed=42)
    options = option_ids(OPTIONS, tokenizer)
    assert options[0][0] == options[1][0] and options[0] != options[1]
    assert min(len(o) for o in options) > 1
    examples = encode_examples(splits.train[6:11], splits.task, tokenizer, kind="causal",
                               label_words=OPTIONS, scoring="options")  # fmt: skip
    assert len({len(ex["input_ids"]) for ex in examples}) > 1  # padding is exercised

    batch = collate_options(examples, tokenizer.pad_token_id, options)
    assert batch["input_ids"].shape[0] == len(examples) * len(options)
    with torch.no_grad():
        out = options_objective(model, batch)
    expected = loop_scores(model, examples, options)
    torch.testing.assert_close(out.scores, expected, rtol=1e-5, atol=1e-5)
    labels = torch.tensor([ex["label"] for ex in examples])
    ce = F.cross_entropy(expected, labels, reduction="none")
    torch.testing.assert_close(out.per_example, ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ce.mean(), rtol=1e-5, atol=1e-5)
    # models without logits_to_keep: the same scores from the logits at every position
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full = option_log_probs(logits, batch["option_labels"]).view(len(examples), -1)
    torch.testing.assert_close(full, expected, rtol=1e-5, atol=1e-5)
    # the first tokens alone would score both classes alike
    assert not torch.allclose(out.scores[:, 0], out.scores[:, 1])


def test_single_token_options_are_label_word_log_probs(model, tokenizer, sst2_dir):
    """With one-token words, an option's score is the label word's log-softmax over the
    vocabulary: the label-word logit less the row's log-sum-exp, so the CE over the C options
    and the argmax equal the label-word objective's (the scores differ by a per-row constant)."""
    splits = load_task("sst-2", sst2_dir, k=8, seed=42)
    ids = label_word_ids(splits.task, tokenizer)
    assert option_ids(splits.task, tokenizer) == [[i] for i in ids]
    examples = encode_examples(splits.dev[:6], splits.task, tokenizer, kind="causal")
    with torch.no_grad():
        options = options_objective(model, collate_options(examples, 0, [[i] for i in ids]))
        words = label_words_objective(model, collate_prompts(examples, 0, ids))
        batch = collate_prompts(examples, 0)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    at = logits[torch.arange(len(examples)), batch["positions"]].float()
    torch.testing.assert_close(options.scores, at.log_softmax(-1)[:, ids], rtol=1e-5, atol=1e-5)
    shift = options.scores - words.scores
    torch.testing.assert_close(
        shift, -at.logsumexp(-1)[:, None].expand_as(shift), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(options.per_example, words.per_example, rtol=1e-5, atol=1e-5)
    assert torch.equal(options.scores.argmax(1), words.scores.argmax(1))


def test_scoring_parts_follow_the_prepared_task(tokenizer, sst2_dir):
    data = prepare_fewshot("sst-2", tokenizer, "causal", data_dir=sst2_dir, k=8, seed=42,
                           label_words=OPTIONS, scoring="options")  # fmt: skip
    objective, collate = scoring_parts(data)
    assert objective is OBJECTIVES["options"]
    assert data.label_word_ids == [] and data.option_ids == option_ids(OPTIONS, tokenizer)
    assert data.record["scoring"] == "options"
    batch = collate(data.train[:3], tokenizer.pad_token_id)
    assert batch["option_labels"].shape[0] == 6 and batch["weights"].tolist() == [1.0] * 3
    plain = prepare_fewshot("sst-2", tokenizer, "causal", data_dir=sst2_dir, k=8, seed=42)
    objective, collate = scoring_parts(plain)
    assert objective is label_words_objective and plain.record["scoring"] == "label_words"
    assert collate(plain.train[:3], 0)["label_word_ids"].tolist() == plain.label_word_ids


@pytest.mark.parametrize(
    ("words", "kind", "message"),
    [
        (OPTIONS, "masked", "causal LM"),
        ({"0": "great", "1": "great"}, "causal", "are the same tokens"),
    ],
    ids=["masked-lm", "identical-options"],
)
def test_options_bad_inputs(words, kind, message, tokenizer, sst2_dir):
    with pytest.raises(DataError, match=message):
        prepare_fewshot("sst-2", tokenizer, kind, data_dir=sst2_dir, k=8, seed=42,
                        label_words=words, scoring="options")  # fmt: skip


def test_multi_token_label_words_point_to_option_scoring(tokenizer):
    with pytest.raises(DataError) as error:
        label_word_ids({"0": "great", "1": "greatest"}, tokenizer)
    message = str(error.value)
    assert "'greatest' is 3 tokens" in message and "shares its first token with 'great'" in message
    assert "--scoring options" in message and message.count(". ") == 0


def test_finetune_with_option_scoring_trains(tiny_model_dir, sst2_dir, tmp_path):
    out = tmp_path / "run"
    words = "{'0': 'a description', '1': 'an entity'}"
    finetune.main(fewshot_args(tiny_model_dir, sst2_dir, out, "--scoring", "options",
                               "--label_words", words, "--max_steps", "2",
                               "--eval_points", "1"))  # fmt: skip
    result = json.loads((out / "result.json").read_text())
    assert result["data"]["scoring"] == "options"

    tokenizer = load_tokenizer(str(tiny_model_dir))
    splits = load_task("sst-2", sst2_dir, k=8, seed=42)
    options = option_ids(OPTIONS, tokenizer)
    encode = dict(task=splits.task, tokenizer=tokenizer, kind="causal", label_words=OPTIONS,
                  scoring="options")  # fmt: skip
    train = encode_examples(splits.train, **encode)
    dev = encode_examples(splits.dev, **encode)

    # step 1's loss is the CE over the pretrained model's option log-probabilities
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    plan = BatchPlan(16, 4, 2, 1, 0, 42)
    first = [train[i] for i in plan.global_indices(0)]
    expected = F.cross_entropy(
        loop_scores(base, first, options), torch.tensor([ex["label"] for ex in first])
    )
    losses = {r["step"]: r["train/loss"] for r in read_metrics(out) if "train/loss" in r}
    assert losses[1] == pytest.approx(float(expected), rel=1e-5)

    # the final dev metrics are what a loop over the final model finds
    final = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    scores = loop_scores(final, dev, options)
    labels = torch.tensor([ex["label"] for ex in dev])
    metrics = result["metrics"]["final"]
    assert metrics["accuracy"] == pytest.approx(float((scores.argmax(1) == labels).double().mean()))
    assert metrics["loss"] == pytest.approx(float(F.cross_entropy(scores, labels)), rel=1e-5)


def test_multitask_run_scores_each_tasks_options(tiny_model_dir, sst2_dir, tmp_path):
    out = tmp_path / "multi"
    args = fewshot_args(tiny_model_dir, sst2_dir, out, "--task", "sst-2+mmlu-topics-2",
                        "--scoring", "options", "--batch_size", "8", "--micro_batch_size", "4",
                        "--max_steps", "1", "--eval_points", "1")  # fmt: skip
    finetune.main(args)
    result = json.loads((out / "result.json").read_text())

    tokenizer = load_tokenizer(str(tiny_model_dir))
    tasks = {}
    for name in ("SST-2", "mmlu-topics-2"):
        splits = load_task(name, sst2_dir, k=8, seed=42)
        encode = dict(task=splits.task, tokenizer=tokenizer, kind="causal", scoring="options")
        tasks[name] = (
            option_ids(splits.task, tokenizer),
            encode_examples(splits.train, **encode),
            encode_examples(splits.dev, **encode),
        )
    train = [(ex, options) for options, examples, _ in tasks.values() for ex in examples]

    # step 1's loss: the mean of per-example CEs, each over its own task's options
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    plan = BatchPlan(len(train), 8, 4, 1, 0, 42)
    first = [train[i] for i in plan.global_indices(0)]
    assert len({str(options) for _, options in first}) == 2  # the batch mixes the tasks
    expected = torch.stack([
        F.cross_entropy(loop_scores(base, [ex], options), torch.tensor([ex["label"]]))
        for ex, options in first
    ]).mean()  # fmt: skip
    losses = {r["step"]: r["train/loss"] for r in read_metrics(out) if "train/loss" in r}
    assert losses[1] == pytest.approx(float(expected), rel=1e-5)

    final_model = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    for name, (options, _, dev) in tasks.items():
        scores = loop_scores(final_model, dev, options)
        labels = torch.tensor([ex["label"] for ex in dev])
        metrics = result["metrics"]["final"][name]
        assert metrics["loss"] == pytest.approx(float(F.cross_entropy(scores, labels)), rel=1e-5)
