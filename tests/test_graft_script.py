"""scripts/graft.py end to end on a tiny BERT fine-tuned on a synthetic SST-2 split."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForMaskedLM

from adaptlab.graft import apply_graft, load_mask
from adaptlab.models.tiny import tiny_bert, tiny_tokenizer
from tests.conftest import load_script

finetune = load_script("finetune")
graft = load_script("graft")


@pytest.fixture(scope="module")
def ft_run(tiny_bert_dir, sst2_dir, tmp_path_factory):
    """A full SGD fine-tuning run of the encoder layers (head and embeddings frozen, as in the
    paper)."""
    out = tmp_path_factory.mktemp("graft_ft") / "run"
    finetune.main([
        "--model", str(tiny_bert_dir), "--task", "sst-2", "--task_dir", str(sst2_dir),
        "--shots", "8", "--data_seed", "42", "--output_dir", str(out), "--method", "full",
        "--optimizer", "sgd", "--lr", "0.5", "--schedule", "constant", "--batch_size", "4",
        "--micro_batch_size", "4", "--max_steps", "8", "--eval_points", "2",
        "--checkpoints", "0", "--save_init", "false", "--report_to", "none",
        "--progress", "false", "--fix_head", "true", "--fix_embeddings", "true",
    ])  # fmt: skip
    return out


def graft_args(ft_run, out, *extra):
    return [
        "--finetuned", str(ft_run), "--output_dir", str(out), "--sparsity", "0.01",
        "--mask_steps", "5", "--batch_size", "4", "--learning_rate", "1e9",
        "--progress", "false", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def graft_run(ft_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("graft") / "run"
    export = out.parent / "exported"
    graft.main(graft_args(ft_run, out, "--export_model", str(export)))
    return out, export


def test_graft_learns_a_mask_that_lowers_the_patch_loss(graft_run, ft_run):
    out, _ = graft_run
    result = json.loads((out / "result.json").read_text())
    ft = json.loads((ft_run / "result.json").read_text())
    # N_E is what the fine-tuning run trained (its selector), and k = ⌊s N_E⌋ exactly
    assert result["n_eligible"] == ft["method"]["trainable_parameters"]
    assert result["patch"]["k"] == int(0.01 * result["n_eligible"])
    history = result["history"]
    assert history[0]["step"] == 0 and history[0]["n_grafted"] == result["patch"]["k"]
    best = next(r for r in history if r["step"] == result["best_step"])
    assert result["best_step"] > 0
    assert best["train"]["loss"] < history[0]["train"]["loss"]
    assert result["n_grafted"] == best["n_grafted"]
    assert result["fraction_eligible"] == result["n_grafted"] / result["n_eligible"]
    assert result["fraction_all"] == result["n_grafted"] / result["n_params"]
    # θ_ft on E is the fine-tuned model (head/embeddings frozen): its test accuracy is the run's
    assert result["splits"]["finetuned"]["test"]["accuracy"] == pytest.approx(
        ft["metrics"]["test_at_best"]["accuracy"]
    )
    for model in ("base", "finetuned", "grafted"):
        assert set(result["splits"][model]) == {"train", "dev", "test"}
        assert 0.0 <= result["splits"][model]["test"]["ece"] <= 1.0
    assert (out / "reliability.png").stat().st_size > 0
    assert not (out / "resume").exists()


def test_saved_mask_export_and_eval_only_agree(graft_run, ft_run, tiny_bert_dir, tmp_path):
    out, export = graft_run
    result = json.loads((out / "result.json").read_text())
    mask = load_mask(out / "mask")
    assert mask.n_grafted == result["n_grafted"]
    assert mask.config["n_eligible"] == result["n_eligible"]
    ids = torch.randint(5, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    model = AutoModelForMaskedLM.from_pretrained(tiny_bert_dir).eval()
    apply_graft(model, out / "mask").merge()
    exported = AutoModelForMaskedLM.from_pretrained(export).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, exported(input_ids=ids).logits)
    again = tmp_path / "eval"
    graft.main(graft_args(ft_run, again, "--eval_only", "true", "--mask", str(out / "mask")))
    evaluated = json.loads((again / "result.json").read_text())
    assert evaluated["n_grafted"] == result["n_grafted"]
    assert evaluated["splits"]["grafted"] == result["splits"]["grafted"]


@pytest.mark.parametrize("save_scores", ["true", "false"])
def test_killed_graft_resumes_to_the_same_result(
    save_scores, ft_run, graft_run, tmp_path, monkeypatch
):
    whole, _ = graft_run
    out = tmp_path / "killed"
    flags = ["--export_model", str(tmp_path / "x"), "--save_scores", save_scores]
    real = graft.save_resume
    calls = []

    def dying(job, engine, history):
        real(job, engine, history)
        calls.append(1)
        if len(calls) == 3:  # after step 2
            raise KeyboardInterrupt

    monkeypatch.setattr(graft, "save_resume", dying)
    with pytest.raises(KeyboardInterrupt):
        graft.main(graft_args(ft_run, out, *flags))
    monkeypatch.setattr(graft, "save_resume", real)
    graft.main(graft_args(ft_run, out, *flags))
    a = json.loads((whole / "result.json").read_text())
    b = json.loads((out / "result.json").read_text())
    assert a["history"] == b["history"] and a["splits"] == b["splits"]
    ma, mb = load_mask(whole / "mask"), load_mask(out / "mask")
    assert bool(mb.scores) == (save_scores == "true")
    for name in ma.names:
        assert torch.equal(ma.index[name], mb.index[name])
        assert torch.equal(ma.delta[name], mb.delta[name])
        if mb.scores:
            assert torch.equal(ma.scores[name], mb.scores[name])
    assert not (out / "resume").exists()


def nan_copy(ft_run, tmp_path):
    folder = tmp_path / "nan_ft"
    shutil.copytree(ft_run, folder, ignore=shutil.ignore_patterns(".adaptlab.lock"))
    weights = load_file(folder / "best" / "model.safetensors")
    name = next(n for n in weights if "encoder.layer.0" in n and n.endswith("weight"))
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, folder / "best" / "model.safetensors")
    return folder


def other_model(tmp_path, **kwargs):
    folder = tmp_path / "other"
    tok = tiny_tokenizer()
    tiny_bert(vocab_size=len(tok), **kwargs).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


BAD = {
    "sparsity zero": (["--sparsity", "0"], "sparsity=0.0 is not in (0, 1]"),
    "sparsity above one": (["--sparsity", "1.5"], "sparsity=1.5 is not in (0, 1]"),
    "eval_only without mask": (["--eval_only", "true"], "--eval_only needs --mask"),
    "missing mask folder": (["--eval_only", "true", "--mask", "{tmp}/nowhere"], "holds no"),
    "another task": (["--eval_only", "true", "--mask", "{mask}", "--task", "trec"], "learned on"),
    "another architecture": (["--base_model", "{wide}"], "different architectures"),
    "another base model": (
        ["--eval_only", "true", "--mask", "{mask}", "--base_model", "{seed5}"],
        "differ from the base",
    ),
    "non-finite delta": (["--finetuned", "{nan}"], "NaN or inf"),
    "multi-token label word": (
        ["--label_words", '{"0": "terrible movie", "1": "great"}'],
        "token",
    ),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_graft_input_fails_in_one_line(
    case, ft_run, graft_run, tiny_bert_dir, tmp_path, capsys
):
    flags, message = BAD[case]
    paths = {
        "tmp": tmp_path,
        "mask": graft_run[0] / "mask",
        "bert": tiny_bert_dir,
        "wide": other_model(tmp_path, hidden_size=48, intermediate_size=96)
        if case == "another architecture"
        else "",
        "seed5": other_model(tmp_path, seed=5) if case == "another base model" else "",
        "nan": nan_copy(ft_run, tmp_path) if case == "non-finite delta" else "",
    }
    flags = [f.format(**paths) if "{" in f and not f.startswith('{"') else f for f in flags]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        graft.main(graft_args(ft_run, out, *flags))
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert exit_info.value.code == 2
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists()


def test_causal_lm_graft_loads_as_a_model_in_the_other_recipes(
    tiny_model_dir, sst2_dir, mmlu_file, tmp_path
):
    """A tiny Llama: label words at the last prompt token; the mask folder is a --model."""
    from adaptlab.models import describe_model, load_model

    run = tmp_path / "ft"
    finetune.main([
        "--model", str(tiny_model_dir), "--task", "sst-2", "--task_dir", str(sst2_dir),
        "--shots", "8", "--data_seed", "42", "--output_dir", str(run), "--method", "full",
        "--optimizer", "sgd", "--lr", "0.5", "--schedule", "constant", "--batch_size", "4",
        "--micro_batch_size", "4", "--max_steps", "4", "--eval_points", "1",
        "--checkpoints", "0", "--save_init", "false", "--report_to", "none",
        "--progress", "false", "--fix_embeddings", "true",
    ])  # fmt: skip
    out = tmp_path / "graft"
    graft.main(graft_args(run, out, "--mask_steps", "2"))
    result = json.loads((out / "result.json").read_text())
    assert result["n_grafted"] > 0
    ids = torch.randint(5, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    merged = load_model(str(out / "mask"))
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    apply_graft(reference, out / "mask").merge()
    with torch.no_grad():
        assert torch.equal(merged(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert describe_model(str(out / "mask"))["graft_path"] == str((out / "mask").resolve())

    extract = load_script("extract_repr")
    extract.main([
        "--model", str(out / "mask"), "--dataset_path", str(mmlu_file), "--num_shots", "0",
        "--output_dir", str(tmp_path / "extract"), "--progress", "false",
    ])  # fmt: skip
    manifest = json.loads((tmp_path / "extract" / "manifest.json").read_text())
    assert "graft_path" in json.dumps(manifest)
    kernel = load_script("compute_kernel")
    kernel.main([
        "--model", str(out / "mask"), "--task", "sst-2", "--task_dir", str(sst2_dir),
        "--shots", "8", "--seeds", "[42]", "--output_dir", str(tmp_path / "kernel"),
        "--dtype", "float64", "--solvers", "[lstsq]", "--progress", "false",
    ])  # fmt: skip
    assert (tmp_path / "kernel" / "8-42").is_dir()


@pytest.mark.multiprocess
def test_two_fsdp_processes_run_the_recipe_like_one(graft_run, ft_run, tmp_path):
    """accelerate launch with the FSDP config: each process holds half of θ_pre, θ_ft, b and S;
    the mask, the step history, the metrics and the exported model match the 1-process run."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT, free_port

    whole, whole_export = graft_run
    out, export = tmp_path / "two", tmp_path / "two_export"
    launcher = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "accelerate_configs" / "fsdp.yaml"), "--num_processes", "2",
        "--mixed_precision", "no", "--main_process_port", str(free_port()),
    ]  # fmt: skip
    args = graft_args(ft_run, out, "--export_model", str(export))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([*launcher, str(ROOT / "scripts" / "graft.py"), *args], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    one = json.loads((whole / "result.json").read_text())
    two = json.loads((out / "result.json").read_text())
    assert two["parallel"] == {"processes": 2, "fsdp": True}
    assert [r["n_grafted"] for r in two["history"]] == [r["n_grafted"] for r in one["history"]]
    for a, b in zip(one["history"][1:], two["history"][1:], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)
    for model in ("base", "finetuned", "grafted"):
        for split in ("train", "dev", "test"):
            assert (
                two["splits"][model][split]["accuracy"] == one["splits"][model][split]["accuracy"]
            )
    ma, mb = load_mask(whole / "mask"), load_mask(out / "mask")
    assert ma.config["base_model"]["hash"] == mb.config["base_model"]["hash"]
    for name in ma.names:
        for part in ("index", "base", "delta"):
            assert torch.equal(getattr(ma, part)[name], getattr(mb, part)[name]), (part, name)
        torch.testing.assert_close(ma.scores[name], mb.scores[name], rtol=1e-5, atol=1e-3)
    ids = torch.randint(5, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = (AutoModelForMaskedLM.from_pretrained(d).eval() for d in (whole_export, export))
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_lora_run_grafts_its_merged_delta(tiny_model_dir, sst2_dir, tmp_path):
    """E is the weights the adapter wraps; a graft of all of E with no mask steps is θ_ft."""
    run = tmp_path / "lora"
    finetune.main([
        "--model", str(tiny_model_dir), "--task", "sst-2", "--task_dir", str(sst2_dir),
        "--shots", "8", "--data_seed", "42", "--output_dir", str(run), "--method", "lora",
        "--target_modules", "[q_proj,v_proj]", "--lora_r", "4", "--lora_dropout", "0.0",
        "--optimizer", "sgd", "--lr", "2.0", "--schedule", "constant", "--batch_size", "4",
        "--micro_batch_size", "4", "--max_steps", "4", "--eval_points", "1",
        "--checkpoints", "0", "--save_init", "false", "--report_to", "none",
        "--progress", "false",
    ])  # fmt: skip
    out = tmp_path / "graft"
    graft.main(graft_args(run, out, "--sparsity", "1.0", "--mask_steps", "0"))
    result = json.loads((out / "result.json").read_text())
    mask = load_mask(out / "mask")
    assert mask.names and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in mask.names)
    assert len(mask.names) == 2 * 2  # two layers
    assert result["n_eligible"] == sum(torch.Size(s).numel() for s in mask.shapes.values())
    assert result["splits"]["grafted"] == result["splits"]["finetuned"]
    ft = json.loads((run / "result.json").read_text())
    assert result["splits"]["finetuned"]["test"]["accuracy"] == pytest.approx(
        ft["metrics"]["test_at_best"]["accuracy"]
    )


def test_host_resident_deltas_give_the_same_graft(graft_run, ft_run, tmp_path):
    out = tmp_path / "host"
    graft.main(graft_args(ft_run, out, "--deltas_on_device", "false"))
    a = json.loads((graft_run[0] / "result.json").read_text())
    b = json.loads((out / "result.json").read_text())
    assert a["history"] == b["history"] and a["splits"] == b["splits"]


def test_multitask_run_grafts_one_task_at_a_time(tiny_bert_dir, tmp_path, capsys):
    from tests.conftest import write_mrpc_kshot, write_sst2_kshot

    data = write_mrpc_kshot(write_sst2_kshot(tmp_path / "data", k=8, seed=42), k=8, seed=42)
    run = tmp_path / "mt"
    finetune.main([
        "--model", str(tiny_bert_dir), "--task", "sst-2+mrpc", "--task_dir", str(data),
        "--shots", "8", "--data_seed", "42", "--output_dir", str(run), "--method", "full",
        "--optimizer", "sgd", "--lr", "0.5", "--schedule", "constant", "--batch_size", "8",
        "--micro_batch_size", "8", "--max_steps", "2", "--eval_points", "1",
        "--checkpoints", "0", "--save_init", "false", "--report_to", "none",
        "--progress", "false",
    ])  # fmt: skip
    for task in ("sst-2", "mrpc"):
        graft.main(graft_args(run, tmp_path / task, "--task", task, "--mask_steps", "1"))
        result = json.loads((tmp_path / task / "result.json").read_text())
        assert result["data"]["task"] == task.upper()
        assert load_mask(tmp_path / task / "mask").config["data"]["task"] == task.upper()
    mrpc = json.loads((tmp_path / "mrpc" / "result.json").read_text())
    assert "f1" in mrpc["splits"]["grafted"]["test"] and mrpc["metric"] == "f1"
    for flags, message in (([], "pass --task with one of them"), (["--task", "cr"], "not one")):
        with pytest.raises(SystemExit):
            graft.main(graft_args(run, tmp_path / "bad", *flags))
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1 and message in errors[0], errors


def test_option_scored_run_grafts_with_full_options(tiny_model_dir, sst2_dir, tmp_path):
    """Options sharing their first token (upstream's TREC collision) score in full."""
    run = tmp_path / "ft"
    words = '{"0": "a description", "1": "an entity"}'
    finetune.main([
        "--model", str(tiny_model_dir), "--task", "sst-2", "--task_dir", str(sst2_dir),
        "--shots", "8", "--data_seed", "42", "--output_dir", str(run), "--method", "full",
        "--scoring", "options", "--label_words", words, "--optimizer", "sgd", "--lr", "0.5",
        "--schedule", "constant", "--batch_size", "4", "--micro_batch_size", "4",
        "--max_steps", "2", "--eval_points", "1", "--checkpoints", "0", "--save_init", "false",
        "--report_to", "none", "--progress", "false", "--fix_embeddings", "true",
    ])  # fmt: skip
    out = tmp_path / "graft"
    graft.main(graft_args(run, out, "--mask_steps", "1"))
    result = json.loads((out / "result.json").read_text())
    ft = json.loads((run / "result.json").read_text())
    assert result["data"]["scoring"] == "options"
    assert result["splits"]["finetuned"]["test"]["accuracy"] == pytest.approx(
        ft["metrics"]["test_at_best"]["accuracy"]
    )
    assert result["splits"]["finetuned"]["test"]["loss"] == pytest.approx(
        ft["metrics"]["test_at_best"]["loss"], rel=1e-5
    )
