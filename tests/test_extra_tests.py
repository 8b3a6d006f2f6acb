"""Extra test tasks scored at the end of a few-shot run (``extra_test_tasks``, e.g. MNLI-mm)."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForMaskedLM

from adaptlab.data import encode_examples, get_task, label_word_ids, load_task
from adaptlab.models import load_tokenizer
from adaptlab.training.loop import read_metrics
from tests.conftest import load_script, write_sst2_kshot
from tests.test_fewshot_finetune import fewshot_args, whole_and_killed_runs

finetune = load_script("finetune")


def write_cr_test(root, k: int = 8, seed: int = 42, n_test: int = 10):
    """A synthetic ``cr`` k-shot folder (header-less ``label,text`` CSV, SST-2's labels 0/1) whose
    test sentences differ from SST-2's: the extra task of an SST-2 run."""
    rng = random.Random(7)
    folder = root / "k-shot" / "cr" / f"{k}-{seed}"
    folder.mkdir(parents=True)
    for split, n in (("train", k), ("dev", k), ("test", n_test // 2)):
        rows = [
            f'{label},"{" ".join(rng.choice(["the", "camera", mood, "is"]) for _ in range(5))}"'
            for label, mood in ((0, "bad"), (1, "good"))
            for _ in range(n)
        ]
        (folder / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def data_dir(tmp_path):
    return write_cr_test(write_sst2_kshot(tmp_path / "data", k=8, seed=42))


def cr_test_scores(folder, data_dir, head: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``[M, C]`` scores of the cr test split by the model saved in ``folder``, its examples
    encoded with SST-2's prompt and words, one at a time; and the ``[M]`` labels."""
    from adaptlab.training.checkpoint import load_linear_head

    tokenizer = load_tokenizer(str(folder))
    splits = load_task("cr", data_dir, k=8, seed=42)
    sst2 = get_task("SST-2")
    examples = encode_examples(splits.test, sst2, tokenizer, kind="masked", head=head)
    model = AutoModelForMaskedLM.from_pretrained(folder).eval()
    ids = label_word_ids(sst2, tokenizer)
    rows = []
    with torch.no_grad():
        for ex in examples:
            out = model(input_ids=torch.tensor([ex["input_ids"]]), output_hidden_states=True)
            if head == "linear":
                hidden = out.hidden_states[-1][0, ex["position"]].double()
                rows.append(load_linear_head(folder).double()(hidden[None, None], None)[0])
            else:
                rows.append(out.logits[0, ex["position"], ids].double())
    return torch.stack(rows), torch.tensor([ex["label"] for ex in examples])


@pytest.mark.parametrize("head", ["prompt", "linear"])
def test_extra_task_scores_equal_a_hand_evaluation(head, tiny_bert_dir, data_dir):
    out = data_dir.parent / "run"
    finetune.main(fewshot_args(tiny_bert_dir, data_dir, out, "--extra_test_tasks", "[CR]",
                               "--head", head, "--optimizer", "adamw", "--lr", "1e-3",
                               "--max_steps", "8", "--eval_points", "4",
                               "--eval_at_start", "false"))  # fmt: skip
    result = json.loads((out / "result.json").read_text())
    extra = result["metrics"]["extra_tests"]
    assert list(extra) == ["cr"] and result["config"]["extra_test_tasks"] == ["cr"]
    assert result["data"]["extra_tests"]["cr"]["n_test"] == 10
    assert extra["cr"]["final"].keys() == result["metrics"]["test_final"].keys()
    for name, folder in (("final", out / "final"), ("at_best", out / "best")):
        scores, labels = cr_test_scores(folder, data_dir, head)
        metrics = extra["cr"][name]
        assert metrics["n"] == 10
        assert metrics["accuracy"] == pytest.approx(
            float((scores.argmax(1) == labels).double().mean())
        )
        assert metrics["loss"] == pytest.approx(float(F.cross_entropy(scores, labels)), rel=1e-4)
        # the extra task's per-example test logits sit beside the run's own
        step = 8 if name == "final" else result["metrics"]["best"]["step"]
        assert metrics["predictions"] == f"predictions/cr_step_{step}.jsonl"
        records = [json.loads(line) for line in (out / metrics["predictions"]).open()]
        assert [r["label"] for r in records] == labels.tolist()
        logits = torch.tensor([r["logits"] for r in records], dtype=torch.float64)
        torch.testing.assert_close(logits, scores.double(), rtol=1e-4, atol=1e-5)
    # the best dev step is not the last one, so best/ and final/ are other weights
    assert 0 < result["metrics"]["best"]["step"] < 8
    assert extra["cr"]["at_best"]["loss"] != extra["cr"]["final"]["loss"]
    # the extra task is not the run's own test split (other sentences, other scores)
    assert extra["cr"]["final"]["loss"] != result["metrics"]["test_final"]["loss"]


def test_summary_line_names_the_extra_task(tiny_bert_dir, data_dir, capsys):
    out = data_dir.parent / "run"
    finetune.main(fewshot_args(tiny_bert_dir, data_dir, out, "--extra_test_tasks", "[cr]",
                               "--max_steps", "1", "--eval_points", "1"))  # fmt: skip
    printed = capsys.readouterr().out
    metrics = json.loads((out / "result.json").read_text())["metrics"]
    extra = metrics["extra_tests"]["cr"]
    assert "+ 10 cr test" in printed  # the data summary
    # logged at every new best, as the run's own test split; the last one is the best's
    logged = [(r["step"], r["test/cr/accuracy"]) for r in read_metrics(out) if "test/cr/n" in r]
    assert logged[-1] == (metrics["best"]["step"], extra["at_best"]["accuracy"])
    assert (
        f"cr test accuracy {extra['final']['accuracy']:.3f} (final) "
        f"{extra['at_best']['accuracy']:.3f} (at the best dev step)" in printed
    )


def test_resumed_run_scores_the_extra_task_alike(
    tiny_bert_dir, data_dir, tmp_path, monkeypatch, capsys
):
    extra = ("--extra_test_tasks", "[cr]", "--save_state_every", "1")
    whole, killed = whole_and_killed_runs(tiny_bert_dir, data_dir, tmp_path, extra, monkeypatch,
                                          capsys)  # fmt: skip
    a = json.loads((whole / "result.json").read_text())["metrics"]["extra_tests"]["cr"]
    b = json.loads((killed / "result.json").read_text())["metrics"]["extra_tests"]["cr"]
    for name in ("final", "at_best"):
        assert b[name]["accuracy"] == a[name]["accuracy"]
        assert b[name]["loss"] == pytest.approx(a[name]["loss"], rel=1e-5)
    # a complete run is not scored again
    before = (whole / "result.json").read_text()
    finetune.main(fewshot_args(tiny_bert_dir, data_dir, whole, *extra))
    assert "nothing to do" in capsys.readouterr().out
    assert (whole / "result.json").read_text() == before


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--extra_test_tasks", "[nope]"], "extra_test_tasks: Unknown task 'nope'"),
        (["--extra_test_tasks", "[QNLI]"], "has labels ['entailment', 'not_entailment']"),
        (["--extra_test_tasks", "[MRPC]"], "and 2 sentence(s)"),
        (["--extra_test_tasks", "[mmlu]"], "'mmlu', which is not a few-shot classification"),
        (["--extra_test_tasks", "[bbc-headline]"], "not a few-shot classification task"),
        (["--extra_test_tasks", "[cr, CR]"], "names cr twice"),
        (["--task", "mmlu", "--extra_test_tasks", "[cr]"], "not task='mmlu'"),
        (["--task", "sst-2+cr", "--extra_test_tasks", "[mr]"], "a single-task run"),
    ],
    ids=["unknown", "labels", "sentences", "mmlu", "generation", "twice", "mmlu-run", "multi"],
)
def test_bad_extra_tasks_fail_in_one_line(flags, message, tiny_bert_dir, data_dir, capsys):
    out = data_dir.parent / "run"
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(fewshot_args(tiny_bert_dir, data_dir, out, *flags))
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert exit_info.value.code == 2
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists()


def test_mnli_preset_scores_mismatched_on_the_full_data(tiny_bert_dir, tmp_path):
    """glue_mnli.yaml asks for mnli-mm; in full mode its test split is MNLI/dev_mismatched.tsv,
    scored by the linear head of the MNLI run."""
    from adaptlab.training.checkpoint import load_linear_head
    from tests.test_vilora_glue_presets import build, task_file, write_original

    assert build(task_file("MNLI"), "budget_r2.yaml").extra_test_tasks == ["mnli-mm"]
    root = write_original(tmp_path / "original")
    out = tmp_path / "run"
    finetune.main([
        "--model", str(tiny_bert_dir), "--task", "MNLI", "--task_dir", str(root),
        "--kshot_mode", "full", "--head", "linear", "--extra_test_tasks", "[mnli-mm]",
        "--method", "full", "--optimizer", "sgd", "--lr", "0.1", "--batch_size", "1",
        "--max_steps", "1", "--eval_points", "1", "--checkpoints", "0", "--save_init", "false",
        "--report_to", "none", "--progress", "false", "--output_dir", str(out),
    ])  # fmt: skip
    result = json.loads((out / "result.json").read_text())
    assert list(result["data"]["extra_tests"]["mnli-mm"]["sha256"]) == [
        "train.tsv",
        "dev_mismatched.tsv",
    ]
    mismatched = result["metrics"]["extra_tests"]["mnli-mm"]
    # one contradiction example (class 0), scored by hand with the saved model and head
    tokenizer = load_tokenizer(str(out / "final"))
    splits = load_task("mnli-mm", root, mode="full")
    (example,) = encode_examples(splits.test, get_task("MNLI"), tokenizer, kind="masked",
                                 head="linear")  # fmt: skip
    model = AutoModelForMaskedLM.from_pretrained(out / "final").eval()
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([example["input_ids"]]), output_hidden_states=True)
        scores = load_linear_head(out / "final")(hidden.hidden_states[-1][:, :1], None)[0]
    assert example["label"] == 0
    assert mismatched["final"]["accuracy"] == float(scores.argmax() == 0)
    loss = F.cross_entropy(scores[None], torch.tensor([0]))
    assert mismatched["final"]["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert mismatched["final"]["n"] == mismatched["at_best"]["n"] == 1
