"""scripts/finetune.py on tiny Llamas: batches, exact resume, AdaLoRA, IVON, QLoRA, checkpoints."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from adaptlab.assets import EmbeddedAssetError
from adaptlab.config import parse_config
from adaptlab.data import answer_letter_ids, load_mmlu, subset_by_subject
from adaptlab.demo import DemoConfig
from adaptlab.extract.config import ExtractConfig
from adaptlab.models import load_model
from adaptlab.models.tiny import save_tiny_llama, tiny_llama, tiny_tokenizer
from adaptlab.rundir import LOCK_FILE
from adaptlab.training.checkpoint import is_better, log_spaced_steps
from adaptlab.training.config import FinetuneConfig
from adaptlab.training.loop import (
    TRAIN_DATA,
    BatchPlan,
    eval_schedule,
    read_metrics,
    step_micro_batches,
)
from adaptlab.training.methods import METHODS
from adaptlab.training.objectives import IGNORE_INDEX, OBJECTIVES
from adaptlab.training.optim import TrainingError
from tests.conftest import ROOT, load_script, requires_ivon, shared_ivon_noise

finetune = load_script("finetune")
PROBE = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])


def args_for(model_dir, data, out, *extra: str) -> list[str]:
    return [
        "--model", str(model_dir), "--dataset_path", str(data), "--output_dir", str(out),
        "--batch_size", "4", "--micro_batch_size", "2", "--max_steps", "6",
        "--eval_samples_per_subject", "2", "--eval_points", "2", "--checkpoints", "3",
        "--save_state_every", "2", "--lr", "1e-2", "--lora_dropout", "0.2",
        "--report_to", "none", "--progress", "false", *extra,
    ]  # fmt: skip


def adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def train_losses(out) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(out) if "train/loss" in r}


def probe_logits(model) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=PROBE).logits
    model.train(was_training)
    return logits


@pytest.fixture(scope="module")
def reference(tiny_model_dir, mmlu_file, tmp_path_factory):
    """An uninterrupted LoRA run, with the in-memory logits at every weight save."""
    out = tmp_path_factory.mktemp("reference") / "run"
    logits: dict[str, torch.Tensor] = {}
    save = finetune.save_weights

    def recording_save(job, run, name):
        save(job, run, name)
        logits[name] = probe_logits(run.model)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finetune, "save_weights", recording_save)
        finetune.main(args_for(tiny_model_dir, mmlu_file, out))
    return out, logits


def test_schedules_are_counts_and_log_spaced():
    assert log_spaced_steps(1140, 10) == [1, 2, 4, 8, 17, 34, 68, 138, 279, 564]  # spec §10
    assert log_spaced_steps(6, 3) == [1, 2, 3]
    assert log_spaced_steps(1, 5) == log_spaced_steps(50, 0) == []
    assert eval_schedule(10, 3, at_start=True) == [0, 3, 7, 10]
    assert eval_schedule(4, 10) == [1, 2, 3, 4]
    plan = BatchPlan(10, batch_size=4, micro_batch_size=1, world=2, rank=0, seed=3)
    assert (plan.accumulation, plan.steps_per_epoch, plan.position(5)) == (2, 2, (2, 1))
    first, second = plan.global_indices(0), plan.global_indices(1)
    assert len(set(first) | set(second)) == 8  # one epoch never repeats an example
    ranks = [BatchPlan(10, 4, 1, 2, r, 3).local_micro_indices(0) for r in (0, 1)]
    assert sorted(int(i) for micro in ranks for rows in micro for i in rows) == sorted(first)
    assert list(plan.global_indices(2)) != list(first)  # epoch 1 is reshuffled


def test_best_ties_first_keeps_the_earlier_and_last_the_later_value():
    for metric, worse, better in (("accuracy", 0.4, 0.6), ("loss", 0.6, 0.4)):
        best = {"value": 0.5}
        assert is_better(metric, 0.5, None) and is_better(metric, 0.5, None, ties="last")
        assert not is_better(metric, 0.5, best) and is_better(metric, 0.5, best, ties="last")
        for ties in ("first", "last"):
            assert is_better(metric, better, best, ties) and not is_better(
                metric, worse, best, ties
            )


def test_fix_layers_is_upstreams_first_blocks_and_embeddings():
    cfg = FinetuneConfig(fix_layers=1)
    assert (cfg.fix_first_n_layers, cfg.fix_embeddings) == (1, True)
    assert FinetuneConfig(fix_layers=2, fix_first_n_layers=2).fix_first_n_layers == 2
    assert FinetuneConfig(**{**cfg.__dict__}).fix_first_n_layers == 1  # resolving is idempotent
    with pytest.raises(TrainingError, match="disagree"):
        FinetuneConfig(fix_layers=2, fix_first_n_layers=1)
    with pytest.raises(TrainingError, match="fix_layers=-2 must be 0 or more"):
        FinetuneConfig(fix_layers=-2)
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(TrainingError, match="l1_to_init"):
            FinetuneConfig(l1_to_init=bad)


def test_answer_only_batches_put_the_loss_on_the_answer_token(mmlu_file):
    tokenizer = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer))
    test = load_mmlu(mmlu_file).test
    examples = [test[0], test[1], test[2], test[-1]]  # 3 of one subject, 1 of another
    items = TRAIN_DATA["answer_only"].encode(examples, tokenizer, 512, True)
    plan = BatchPlan(4, batch_size=4, micro_batch_size=2, world=1, rank=0, seed=0)
    batches = step_micro_batches(
        items, plan, 0, TRAIN_DATA["answer_only"].collate, tokenizer.pad_token_id, "cpu"
    )
    letters = answer_letter_ids(tokenizer)
    for batch, rows in zip(batches, plan.local_micro_indices(0), strict=True):
        for labels, mask, i in zip(batch["labels"], batch["attention_mask"], rows, strict=True):
            answer = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
            assert answer == [int(mask.sum()) - 1]  # the last real token only
            assert int(labels[answer[0]]) == letters[examples[i].answer]
    total = sum(OBJECTIVES["answer_only"](model, b).loss / plan.accumulation for b in batches)

    weights = torch.tensor([4 / (2 * 3)] * 3 + [4 / (2 * 1)])  # w = N / (S n_subject)
    by_hand = []
    for item in items:  # each example alone, no padding
        ids = torch.tensor(item["input_ids"])
        logits = model(input_ids=ids[None]).logits[0]
        by_hand.append(-torch.log_softmax(logits[-2], -1)[ids[-1]])
    expected = (weights * torch.stack(by_hand)).sum() / weights.sum()
    assert [item["weight"] for item in items] == pytest.approx(weights.tolist())
    assert float(total.detach()) == pytest.approx(float(expected.detach()), abs=1e-5)


@pytest.mark.parametrize(
    "extra",
    [
        ["--optimizer", "adamw"],
        # θ_init of a resumed run is the original run's (the weights before the resume state)
        ["--optimizer", "adamw", "--l1_to_init", "0.1"],
        pytest.param(
            ["--optimizer", "ivon_opt", "--lr", "0.2", "--ivon_ess", "1e5"], marks=requires_ivon
        ),
        # the step counter (noise seed and debiasing) and the fp32 state come back exactly
        ["--optimizer", "ivon", "--lr", "0.2", "--ivon_ess", "1e5"],
    ],
    ids=["adamw", "adamw-l1_to_init", "ivon_opt", "ivon"],
)
def test_killed_and_resumed_run_equals_uninterrupted(
    extra, tiny_model_dir, mmlu_file, tmp_path, monkeypatch, capsys
):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    finetune.main(args_for(tiny_model_dir, mmlu_file, whole, *extra))
    step = finetune.train_step

    def killed_at_step_5(*args, **kwargs):
        if args[7] == 5:
            raise KeyboardInterrupt("killed")
        return step(*args, **kwargs)

    monkeypatch.setattr(finetune, "train_step", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(args_for(tiny_model_dir, mmlu_file, killed, *extra))
    state = json.loads((killed / "resume" / "trainer_state.json").read_text())
    assert state["step"] == 4 and not (killed / "result.json").exists()
    monkeypatch.setattr(finetune, "train_step", step)
    capsys.readouterr()

    finetune.main(args_for(tiny_model_dir, mmlu_file, killed, *extra))
    assert "resumed at step 4" in capsys.readouterr().out
    a, b = adapter(whole / "final"), adapter(killed / "final")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6), key
    # one record per step (the killed attempt's extra lines are gone), same values
    assert train_losses(killed) == pytest.approx(train_losses(whole), abs=1e-6)
    penalties = [r["train/l1_to_init"] for r in read_metrics(killed) if "train/l1_to_init" in r]
    if "--l1_to_init" in extra:  # 0 at θ_init, then growing as the adapter moves
        assert penalties[0] == 0 and len(penalties) == 6 and min(penalties[1:]) > 0
    else:
        assert penalties == []
    assert not (killed / "resume").exists()
    result = json.loads((killed / "result.json").read_text())
    assert [e["step"] for e in result["metrics"]["evals"]] == [0, 3, 6]


def test_saved_checkpoint_loads_with_peft_and_matches_the_live_model(reference, tiny_model_dir):
    out, live = reference
    folder = out / "checkpoints" / "step_2"
    assert json.loads((folder / "adaptlab_checkpoint.json").read_text())["step"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "epoch_1", "step_0", "step_1", "step_2", "step_3",
    ]  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        assert torch.allclose(
            peft_model(input_ids=PROBE).logits, live["checkpoints/step_2"], atol=1e-6
        )
        reloaded = load_model(str(folder))  # what scripts/extract_repr.py --model does
        assert torch.allclose(
            reloaded(input_ids=PROBE).logits, live["checkpoints/step_2"], atol=1e-6
        )
    assert not torch.allclose(live["checkpoints/step_2"], live["checkpoints/step_0"])


def test_adalora_reallocates_ranks(tiny_model_dir, mmlu_file, tmp_path):
    out = tmp_path / "adalora"
    finetune.main(
        args_for(
            tiny_model_dir, mmlu_file, out, "--method", "adalora", "--adalora_init_r", "4",
            "--adalora_target_r", "2", "--adalora_tinit", "1", "--adalora_tfinal", "1",
            "--adalora_delta_t", "1", "--max_steps", "5", "--eval_points", "0",
        )
    )  # fmt: skip
    before = json.loads((out / "checkpoints" / "step_0" / "adapter_config.json").read_text())
    after = json.loads((out / "final" / "adapter_config.json").read_text())
    assert before["rank_pattern"] is None
    ranks = {name: sum(keep) for name, keep in after["rank_pattern"].items()}
    assert len(ranks) == 2 * 7  # every projection of both blocks
    assert sum(ranks.values()) == 2 * len(ranks)  # the final budget: target_r per matrix
    assert len(set(ranks.values())) > 1  # reallocated, not shrunk uniformly
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "final"
    )
    loaded = {
        n.removeprefix("base_model.model.").removesuffix(".default"): p.shape[0]
        for n, p in model.named_parameters()
        if "lora_E" in n
    }
    assert loaded == ranks  # the adapter is saved and reloaded at its reallocated ranks


def test_adalora_regularizer_is_the_one_peft_adds_to_a_model_loss():
    cfg = FinetuneConfig(method="adalora", target_modules=["q_proj", "v_proj"])
    model = METHODS["adalora"].prepare(tiny_llama(), cfg, 10)
    ids = torch.arange(1, 9)[None]
    with_penalty = model(input_ids=ids, labels=ids).loss  # AdaLoraModel.forward adds it
    plain = model.base_model.model(input_ids=ids, labels=ids).loss
    penalty = METHODS["adalora"].regularizer(model)
    assert float(penalty) > 0
    assert float(with_penalty - plain) == pytest.approx(float(penalty), rel=1e-5)


@pytest.mark.parametrize("optimizer", [pytest.param("ivon_opt", marks=requires_ivon), "ivon"])
def test_ivon_trains_with_gradient_accumulation(optimizer, tiny_model_dir, mmlu_file, tmp_path):
    out = tmp_path / optimizer
    finetune.main(
        args_for(
            tiny_model_dir, mmlu_file, out, "--optimizer", optimizer, "--lr", "0.2",
            "--ivon_ess", "1e5", "--schedule", "constant", "--batch_size", "6",
            "--micro_batch_size", "3", "--train_samples_per_subject", "2", "--max_steps", "8",
            "--eval_points", "0", "--checkpoints", "0", "--lora_dropout", "0",
        )
    )  # fmt: skip
    result = json.loads((out / "result.json").read_text())
    assert result["schedule"]["accumulation"] == 2 and result["data"]["train"]["n"] == 6
    losses = list(train_losses(out).values())  # each step sees the whole training set
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 0.3
    assert sum(b < a for a, b in zip(losses, losses[1:], strict=False)) >= 6
    # h is logged every step; with beta2 = 0.99999 it has moved < 1% from hess_init = 1
    logged = [r for r in read_metrics(out) if "train/hess_mean" in r]
    assert len(logged) == 8
    for record in logged:
        assert record["train/hess_min"] <= record["train/hess_median"] <= record["train/hess_max"]
        assert record["train/hess_mean"] == pytest.approx(1.0, abs=1e-2)


@requires_ivon
def test_ivon_first_step_equals_ivon_opt_given_the_same_noise(tiny_model_dir, mmlu_file, tmp_path):
    """One step of two micro-batches (two posterior draws), with Price, decay and clipping."""
    adapters = {}
    for optimizer in ("ivon_opt", "ivon"):
        out = tmp_path / optimizer
        with pytest.MonkeyPatch.context() as patch:
            shared_ivon_noise(patch)
            finetune.main(
                args_for(
                    tiny_model_dir, mmlu_file, out, "--optimizer", optimizer, "--lr", "0.5",
                    "--ivon_ess", "100", "--ivon_hess_init", "0.5", "--weight_decay", "1e-3",
                    "--ivon_clip_radius", "0.01", "--max_steps", "1", "--eval_points", "0",
                    "--checkpoints", "0", "--lora_dropout", "0",
                )
            )  # fmt: skip
        adapters[optimizer] = adapter(out / "final")
    theirs, ours = adapters["ivon_opt"], adapters["ivon"]
    assert ours.keys() == theirs.keys()
    lora_b = [k for k in ours if "lora_B" in k]
    assert lora_b and all(float(ours[k].abs().max()) > 0 for k in lora_b)  # the step moved B
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], rtol=1e-6, atol=1e-6), key


@pytest.fixture(scope="module")
def tiny64_dir(tmp_path_factory):
    """bitsandbytes' CPU 4-bit kernels need hidden sizes that are multiples of 64."""
    path = tmp_path_factory.mktemp("tiny64")
    return save_tiny_llama(str(path), hidden_size=64, intermediate_size=128)


def test_qlora_trains_a_4bit_model_on_cpu(tiny64_dir, mmlu_file, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    seen = []
    step = finetune.train_step

    def spy(model, *args, **kwargs):
        layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
        seen.append((type(layer).__name__, layer.weight.dtype))
        return step(model, *args, **kwargs)

    monkeypatch.setattr(finetune, "train_step", spy)
    finetune.main(
        args_for(
            tiny64_dir, mmlu_file, out, "--method", "qlora", "--max_steps", "2",
            "--eval_points", "1", "--eval_at_start", "false", "--checkpoints", "0",
        )
    )  # fmt: skip
    assert seen == [("Linear4bit", torch.uint8)] * 2
    init, final = adapter(out / "checkpoints" / "step_0"), adapter(out / "final")
    lora_b = [k for k in final if "lora_B" in k]
    assert lora_b and all(float(init[k].abs().max()) == 0 for k in lora_b)
    assert all(float(final[k].abs().max()) > 0 for k in lora_b)


@pytest.mark.parametrize(
    ("flags", "missing", "message"),
    [
        (["--method", "lorax"], None, "Unknown method 'lorax'; choose from full, lora"),
        (["--optimizer", "adam"], None, "Unknown optimizer 'adam'; choose from adamw"),
        (["--objective", "label_words"], None, "objective='label_words' does not apply to task"),
        (["--task", "sst-3"], None, "Unknown task"),
        (["--target_modules", "[q_proj,qkv_proj]"], None, "entry 'qkv_proj' matches no module"),
        (["--method", "qlora"], "bitsandbytes", "method=qlora needs the bitsandbytes package"),
        (["--report_to", "wandb"], "wandb", "report_to=wandb needs the wandb package"),
        (["--optimizer", "ivon_opt"], "ivon", "optimizer=ivon_opt needs the ivon-opt package"),
        (["--batch_size", "30"], None, "fewer than batch_size=30"),
    ],
    ids=["method", "optimizer", "objective", "task", "target", "qlora", "wandb", "ivon", "batch"],
)
def test_bad_input_fails_in_one_line_before_training(
    flags, missing, message, tiny_model_dir, mmlu_file, tmp_path, monkeypatch, capsys
):
    if missing:
        monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now fails
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(args_for(tiny_model_dir, mmlu_file, out, *flags))
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert exit_info.value.code == 2
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists()


def test_a_folder_of_another_config_is_refused(reference, tiny_model_dir, mmlu_file, capsys):
    out, _ = reference
    result = (out / "result.json").read_text()
    cases = [
        ([], "holds a run from a different config (changed: lr)"),
        (["--resume_from", str(out), "--output_dir", str(out / "x")], "holds no resume state"),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit):
            finetune.main(args_for(tiny_model_dir, mmlu_file, out, "--lr", "0.5", *flags))
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("error:") and message in error
    finetune.main(args_for(tiny_model_dir, mmlu_file, out))
    assert "already holds this run's results" in capsys.readouterr().out
    assert (out / "result.json").read_text() == result and not (out / "x").exists()


def test_resume_from_another_config_is_refused(tiny_model_dir, mmlu_file, tmp_path, capsys):
    source, target = tmp_path / "source", tmp_path / "target"
    step = finetune.train_step

    def killed_at_step_3(*args, **kwargs):
        if args[7] == 3:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finetune, "train_step", killed_at_step_3)
        with pytest.raises(KeyboardInterrupt):
            finetune.main(args_for(tiny_model_dir, mmlu_file, source, "--eval_points", "0"))
    capsys.readouterr()
    continued = ["--resume_from", str(source)]
    with pytest.raises(SystemExit):
        finetune.main(args_for(tiny_model_dir, mmlu_file, target, "--eval_points", "1", *continued))
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error:") and "changed: eval_points" in error
    assert not target.exists()
    finetune.main(args_for(tiny_model_dir, mmlu_file, target, "--eval_points", "0", *continued))
    assert "resumed at step 2" in capsys.readouterr().out
    assert (target / "result.json").is_file() and (source / "resume").is_dir()


@pytest.mark.embedded
def test_demo_preset_trains_on_rows_outside_the_demo_analysis(tmp_path):
    preset = ROOT / "scripts" / "configs" / "finetune_demo.yaml"
    cfg = parse_config(
        FinetuneConfig, ["--config", str(preset), "--output_dir", str(tmp_path / "d")]
    )
    try:
        job = finetune.setup(cfg)
    except EmbeddedAssetError as error:
        pytest.skip(f"embedded assets unavailable: {error}")
    demo = parse_config(DemoConfig, ["--config", str(ROOT / "scripts" / "configs" / "demo.yaml")])
    extraction = parse_config(ExtractConfig, ["--config", demo.extract_preset])
    assert cfg.subjects == demo.subjects
    assert cfg.shot_pool_size == extraction.shot_pool_size == 20  # the same questions are left
    test = load_mmlu(holdout_per_subject=extraction.shot_pool_size).test
    analysed = {
        test[i].index for i in subset_by_subject(test, demo.samples_per_subject, 42, demo.subjects)
    }
    train, evals = set(job.data.record["train"]["rows"]), set(job.data.record["eval"]["rows"])
    assert len(analysed) == 240 and len(train) == 64 and len(evals) == 16
    assert not train & analysed and not train & evals
    per_subject = {s: sum(test[i].subject == s for i in train) for s in cfg.subjects}
    assert per_subject == dict.fromkeys(cfg.subjects, 16)
    assert job.total_steps == 16 and [p.name for p in (tmp_path / "d").iterdir()] == [LOCK_FILE]
    job.lock.release()  # setup wrote nothing but the lock: the folder it created goes with it
    assert not (tmp_path / "d").exists()
