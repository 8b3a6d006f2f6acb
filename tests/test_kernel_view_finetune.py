"""The kernel-view methods through scripts/finetune.py: they train only their adapters, save
PEFT-layout adaptlab folders that load_model reloads to the run's own metrics, resume exactly
after a kill, and run with gradient checkpointing on the SDPA backend."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from adaptlab.data import encode_examples, label_word_ids, load_task
from adaptlab.models import load_model, load_tokenizer
from tests.conftest import load_script
from tests.test_fewshot_finetune import fewshot_args, label_word_scores, whole_and_killed_runs

finetune = load_script("finetune")


def _flags(text: str) -> tuple[str, ...]:
    return tuple(text.split())


RUNS = {  # method: (extra flags, adapter kinds saved, a parameter-name part every entry has)
    "prefix": (("--prefix_length", "3"), ["prefix"], "adaptlab_prefix"),
    "mam": (
        ("--prefix_length", "2", "--adapter_dim", "4", "--adapter_scaling", "4"),
        ["prefix", "parallel"],
        None,
    ),
    "inducer": (("--prefix_length", "3", "--prefix_dim", "4"), ["inducer"], "adaptlab_inducer"),
    "inducer-mam": (
        _flags(
            "--prefix_length 2 --prefix_dim 3 --inducer_lora_q_r 2 "
            "--inducer_parallel_adapter true --adapter_dim 4"
        ),
        ["inducer", "parallel"],
        None,
    ),  # fmt: skip
    "kernel_adapter": (("--kernel_variant", "kerfit"), ["kernel_adapter"], "adaptlab_kernel"),
    "kernel_mix": (
        _flags("--kmix_q_rank 2 --kmix_v_rank 2 --kmix_q_share_rank 2 --kmix_v_share_rank 2"),
        ["kernel_mix"],
        "adaptlab_kernel_mix",
    ),  # fmt: skip
}


def _method_args(name: str) -> tuple[str, ...]:
    extra, _, _ = RUNS[name]
    return ("--method", name.replace("inducer-mam", "inducer"), "--optimizer", "adamw",
            "--lr", "0.01", "--best_ties", "last", *extra)  # fmt: skip


@pytest.mark.parametrize("name", list(RUNS))
def test_run_trains_only_its_adapters_and_reloads_to_its_metrics(
    name, tiny_model_dir, sst2_dir, tmp_path
):
    out = tmp_path / "run"
    finetune.main(fewshot_args(tiny_model_dir, sst2_dir, out, *_method_args(name)))
    result = json.loads((out / "result.json").read_text())
    final = out / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    _, kinds, part = RUNS[name]
    assert config["peft_type"] == "ADAPTLAB"
    assert sorted(entry["method"] for entry in config["adaptlab_adapters"]) == sorted(kinds)
    saved = list(safe_open(final / "adapter_model.safetensors", "pt").keys())
    assert saved and not (final / "model.safetensors").exists()
    if part is not None:
        assert all(part in key for key in saved)

    tuned = load_model(final)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for key, value in base.state_dict().items():
        assert torch.equal(tuned.state_dict()[key], value), key  # the base stayed frozen
    trained = load_file(final / "adapter_model.safetensors")
    fresh = {k: v for k, v in trained.items() if not torch.equal(v, torch.zeros_like(v))}
    assert fresh  # something moved away from zero

    tokenizer = load_tokenizer(str(tiny_model_dir))
    splits = load_task("sst-2", sst2_dir, k=8, seed=42)
    ids = label_word_ids(splits.task, tokenizer)
    encoded = encode_examples(splits.test, task=splits.task, tokenizer=tokenizer, kind="causal")
    logits = label_word_scores(tuned, encoded, tokenizer, ids)
    labels = torch.tensor([ex["label"] for ex in encoded])
    metrics = result["metrics"]["test_final"]
    assert metrics["loss"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)


def test_killed_inducer_run_resumes_exactly(tiny_bert_dir, sst2_dir, tmp_path, monkeypatch, capsys):
    extra = (*_method_args("inducer"), "--max_steps", "4", "--save_state_every", "1",
             "--inducer_lora_q_r", "2")  # fmt: skip
    whole, killed = whole_and_killed_runs(tiny_bert_dir, sst2_dir, tmp_path, extra, monkeypatch,
                                          capsys)  # fmt: skip
    a = load_file(whole / "final" / "adapter_model.safetensors")
    b = load_file(killed / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=0, atol=1e-6)


def test_checkpointed_sdpa_run_equals_the_plain_eager_run(tiny_model_dir, sst2_dir, tmp_path):
    runs = {}
    for label, flags in (
        ("eager", ("--attn_implementation", "eager")),
        ("sdpa-ckpt", ("--attn_implementation", "sdpa", "--gradient_checkpointing", "true")),
    ):
        out = tmp_path / label
        finetune.main(fewshot_args(tiny_model_dir, sst2_dir, out, *_method_args("inducer"),
                                   "--lora_dropout", "0", *flags))  # fmt: skip
        runs[label] = load_file(out / "final" / "adapter_model.safetensors")
    for key, value in runs["eager"].items():
        torch.testing.assert_close(runs["sdpa-ckpt"][key], value, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def inducer_best(tiny_model_dir, sst2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("inducer") / "run"
    finetune.main(fewshot_args(tiny_model_dir, sst2_dir, out, *_method_args("inducer"),
                               "--max_steps", "2"))  # fmt: skip
    return out / "best"


def test_landscape_and_kernel_of_an_inducer_folder(
    inducer_best, tiny_model_dir, mmlu_file, sst2_dir, tmp_path
):
    """extract_repr.py and compute_kernel.py take the inducer's folder as --model."""
    from adaptlab.adapters.families import geometry
    from adaptlab.adapters.inducer import InducerConfig, parameter_count
    from tests.test_compute_kernel import compute_kernel, kernel_args
    from tests.test_extract_script import args_for, arrays, extract_repr

    outputs = {}
    for name, model in (("base", tiny_model_dir), ("tuned", inducer_best)):
        extract_repr.main(args_for(model, mmlu_file, tmp_path / "out" / name))
        outputs[name] = arrays(tmp_path / "out" / name)
    # block 0's input norm comes before any attention; block 0's output passes the inducer
    base, tuned = outputs["base"], outputs["tuned"]
    assert torch.equal(tuned["norm1/l0.safetensors"], base["norm1/l0.safetensors"])
    assert (tuned["block/l0.safetensors"] - base["block/l0.safetensors"]).abs().max() > 0

    compute_kernel.main(kernel_args(inducer_best, sst2_dir, tmp_path / "kernel"))
    folder = tmp_path / "kernel" / "8-42"
    kernel, _ = torch.load(folder / "train_kernels_SST-2.pt", weights_only=True)
    assert torch.isfinite(kernel).all()
    manifest = json.loads((folder / "manifest.json").read_text())
    model = load_model(tiny_model_dir)
    inducer = parameter_count(geometry(model), 2, InducerConfig(prefix_length=3, prefix_dim=4))
    assert manifest["grad_dim"] == sum(p.numel() for p in model.parameters()) + inducer
