"""IVON's posterior after training: test-time MC averaging of logits, the saved Hessian (also
cut to AdaLoRA's final ranks), and the fp32 mean of bf16 weights."""

from __future__ import annotations

import json

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from adaptlab.models.tiny import tiny_llama
from adaptlab.training.errors import TrainingError
from adaptlab.training.ivon import IVON
from adaptlab.training.ivon_hessian import (
    HESSIAN_FILE,
    RESIZED_HESSIAN_FILE,
    load_hessian,
    read_hessian,
    save_run_hessian,
)
from adaptlab.training.ivon_predict import mc_averaged_logits
from adaptlab.training.optim import build_optimizer
from tests.conftest import load_script, requires_ivon

IDS = torch.tensor([[1, 5, 9, 200, 33, 7]])


def trained_ivon(model: nn.Module, name: str = "ivon") -> torch.optim.Optimizer:
    """An IVON over ``model`` after one step, with a posterior wide enough to see (σ ≈ 0.05)."""
    optimizer = build_optimizer(name, model, lr=0.05, ivon_ess=400, ivon_beta2=0.5, ivon_seed=3)
    with torch.enable_grad(), optimizer.sampled_params(train=True):
        model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


@torch.no_grad()
def test_mc_averaged_logits_equal_a_hand_loop_of_posterior_draws():
    model = tiny_llama()
    optimizer = trained_ivon(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = {
        k: v.clone() for k, v in optimizer.state[next(model.parameters())].items() if k != "samples"
    }
    rng = torch.get_rng_state()
    mean = model(input_ids=IDS).logits

    with mc_averaged_logits(model, optimizer, samples=3, seed=0):
        averaged = model(input_ids=IDS).logits
        again = model(input_ids=IDS).logits  # the same draws for every batch
    hand = []
    for draw in range(3):
        with optimizer.sampled_params(train=False, draw=draw):
            hand.append(model(input_ids=IDS).logits)
    torch.testing.assert_close(averaged, sum(hand) / 3, rtol=1e-6, atol=1e-6)
    assert torch.equal(averaged, again)
    assert (averaged - mean).abs().max() > 1e-3  # the draws moved the logits
    with mc_averaged_logits(model, optimizer, samples=0, seed=0):
        assert torch.equal(model(input_ids=IDS).logits, mean)
    # the weights, the training RNG stream and IVON's state are as they were
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    after = optimizer.state[next(model.parameters())]
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert "forward" not in model.__dict__  # the model's own forward again


@requires_ivon
@torch.no_grad()
def test_mc_averaged_logits_of_ivon_opt_are_seeded_and_leave_the_rng_alone():
    model = tiny_llama()
    optimizer = trained_ivon(model, "ivon_opt")
    rng = torch.get_rng_state()
    mean = model(input_ids=IDS).logits
    runs = []
    for _ in range(2):
        with mc_averaged_logits(model, optimizer, samples=2, seed=0):
            runs.append(model(input_ids=IDS).logits)
    assert torch.equal(runs[0], runs[1]) and (runs[0] - mean).abs().max() > 1e-3
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(model(input_ids=IDS).logits, mean)


def test_hessian_save_and_load_round_trip(tmp_path):
    model = tiny_llama()
    model.requires_grad_(False)
    model.lm_head.requires_grad_(True)
    model.model.norm.requires_grad_(True)
    optimizer = trained_ivon(model)
    assert save_run_hessian(tmp_path, model, optimizer) == [HESSIAN_FILE]
    tensors, metadata = read_hessian(tmp_path / HESSIAN_FILE)
    assert sorted(tensors) == ["lm_head.weight", "model.norm.weight"]
    assert metadata == {"ess": "400.0", "weight_decay": "0.0", "numel": str(512 * 32 + 32)}

    fresh_model = tiny_llama(seed=1)
    fresh_model.requires_grad_(False)
    fresh_model.lm_head.requires_grad_(True)
    fresh_model.model.norm.requires_grad_(True)
    fresh = build_optimizer("ivon", fresh_model, lr=0.05, ivon_ess=400)
    load_hessian(tmp_path / HESSIAN_FILE, fresh_model, fresh)
    for old, new in (
        (model.lm_head, fresh_model.lm_head),
        (model.model.norm, fresh_model.model.norm),
    ):
        h = optimizer.state[old.weight]["hess"]
        assert not torch.allclose(h, torch.ones_like(h))  # h moved from hess_init
        assert torch.equal(fresh.state[new.weight]["hess"], h)


def adalora_model(init_r: int = 4) -> nn.Module:
    config = AdaLoraConfig(
        init_r=init_r, target_r=2, target_modules=["q_proj", "v_proj"], total_step=10, lora_alpha=8
    )
    return get_peft_model(tiny_llama(), config)


def test_adalora_hessian_is_cut_to_the_final_rank_pattern_and_refused_elsewhere(tmp_path):
    model = adalora_model()
    optimizer = build_optimizer("ivon", model, lr=0.05, ivon_ess=400)
    generator = torch.Generator().manual_seed(0)
    for param in optimizer.param_groups[0]["params"]:  # distinct h entries to slice
        optimizer._param_state(param, optimizer.param_groups[0])["hess"].copy_(
            torch.rand(param.shape, generator=generator)
        )
    modules = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    pattern = {
        f"{m}.lora_E.default": (torch.rand(4, generator=generator) > 0.5).tolist() for m in modules
    }
    pattern[modules[0] + ".lora_E.default"] = [True, False, False, True]
    model.peft_config["default"].rank_pattern = pattern
    assert save_run_hessian(tmp_path, model, optimizer) == [HESSIAN_FILE, RESIZED_HESSIAN_FILE]

    whole, _ = read_hessian(tmp_path / HESSIAN_FILE)
    resized, metadata = read_hessian(tmp_path / RESIZED_HESSIAN_FILE)
    assert set(resized) == set(whole)
    assert int(metadata["numel"]) == sum(t.numel() for t in resized.values())
    for module in modules:
        keep = [i for i, k in enumerate(pattern[f"{module}.lora_E.default"]) if k]
        prefix = f"base_model.model.{module}"
        a, e, b = (f"{prefix}.{layer}.default" for layer in ("lora_A", "lora_E", "lora_B"))
        assert torch.equal(resized[a], torch.stack([whole[a][i] for i in keep]))
        assert torch.equal(resized[e], torch.stack([whole[e][i] for i in keep]))
        assert torch.equal(resized[b], torch.stack([whole[b][:, i] for i in keep], dim=1))
    assert resized[f"base_model.model.{modules[0]}.lora_A.default"].shape == (2, 32)

    fresh = adalora_model()  # ranks 4 everywhere: the resized file does not fit it
    with pytest.raises(TrainingError) as refused:
        load_hessian(
            tmp_path / RESIZED_HESSIAN_FILE,
            fresh,
            build_optimizer("ivon", fresh, lr=0.1, ivon_ess=9),
        )
    message = str(refused.value)
    assert (
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default has shape (2, 32) "
        "in the file but (4, 32) here" in message
    )
    torch.save({"h": torch.ones(2)}, tmp_path / "pickled.safetensors")
    with pytest.raises(TrainingError, match="is not a safetensors file"):
        read_hessian(tmp_path / "pickled.safetensors")


def test_hessian_file_is_written_atomically(tmp_path, monkeypatch):
    """A failed write leaves no file under the final name (the temporary name is renamed)."""
    import adaptlab.training.ivon_hessian as module

    model = nn.Linear(3, 2)
    optimizer = build_optimizer("ivon", model, lr=0.1, ivon_ess=10)

    def broken(tensors, path, metadata):
        path.write_text("partial")
        raise OSError("disk full")

    monkeypatch.setattr(module, "save_file", broken)
    with pytest.raises(OSError):
        save_run_hessian(tmp_path, model, optimizer)
    assert not (tmp_path / HESSIAN_FILE).exists()
    monkeypatch.undo()
    save_run_hessian(tmp_path, model, optimizer)
    with safe_open(str(tmp_path / HESSIAN_FILE), framework="pt") as handle:
        assert sorted(handle.keys()) == ["bias", "weight"]


def test_tiny_updates_accumulate_on_a_bf16_parameter_as_on_fp32():
    """Each step moves m by ~1e-3 of its value, under bf16's spacing at 1.0 (2^-7): the fp32
    master copy accumulates them, and the bf16 weight is its rounding."""
    weights = {
        dtype: nn.Parameter(torch.ones(8, dtype=dtype)) for dtype in (torch.float32, torch.bfloat16)
    }
    optimizers = {
        dtype: IVON([w], lr=1e-3, ess=1e4, weight_decay=0.0, seed=1) for dtype, w in weights.items()
    }
    for _ in range(25):
        for dtype, weight in weights.items():
            with optimizers[dtype].sampled_params(train=True):
                (torch.arange(1.0, 9.0) * weight.float()).sum().backward()
            optimizers[dtype].step()
    fp32, bf16 = weights[torch.float32], weights[torch.bfloat16]
    master = optimizers[torch.bfloat16].state[bf16]["master"]
    assert float((1 - fp32.detach()).min()) > 0.01  # every entry moved well past bf16's rounding
    torch.testing.assert_close(master, fp32.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(bf16.detach(), fp32.detach().to(torch.bfloat16))
    assert "master" not in optimizers[torch.float32].state[fp32]

    with torch.no_grad():  # a weight changed from outside (AdaLoRA masking a rank) is kept
        bf16[0] = 0.0
    with optimizers[torch.bfloat16].sampled_params(train=True):
        (0.0 * bf16.float()).sum().backward()
    optimizers[torch.bfloat16].step()
    assert abs(float(master[0])) < 1e-3 and abs(float(bf16[0])) < 1e-3


def test_finetune_averages_evaluations_and_hands_its_hessian_to_the_next_run(
    tiny_model_dir, mmlu_file, tmp_path, monkeypatch
):
    """ivon_ess 0 is the training-set size; every evaluation runs inside the averaging with
    ivon_infer_mc_samples; the Hessian file of one run starts the next one's h."""
    finetune = load_script("finetune")
    averaged = []

    def spy(model, optimizer, samples, seed):
        averaged.append(samples)
        return mc_averaged_logits(model, optimizer, samples, seed)

    monkeypatch.setattr(finetune, "mc_averaged_logits", spy)
    common = [
        "--model", str(tiny_model_dir), "--dataset_path", str(mmlu_file), "--batch_size", "4",
        "--micro_batch_size", "4", "--eval_samples_per_subject", "1", "--eval_points", "1",
        "--checkpoints", "0", "--report_to", "none", "--progress", "false", "--optimizer",
        "ivon", "--lr", "0.2", "--ivon_ess", "0", "--train_samples_per_subject", "2",
    ]  # fmt: skip
    first, second = tmp_path / "first", tmp_path / "second"
    finetune.main([*common, "--output_dir", str(first), "--max_steps", "2", "--ivon_beta2",
                   "0.5", "--ivon_infer_mc_samples", "2"])  # fmt: skip
    assert averaged and set(averaged) == {2}  # every evaluation of the run
    n_train = json.loads((first / "result.json").read_text())["data"]["train"]["n"]
    h1, metadata = read_hessian(first / HESSIAN_FILE)
    assert metadata["ess"] == repr(float(n_train))
    saved = load_file(first / "final" / "adapter_model.safetensors")
    assert len(h1) == len(saved) and all(".lora_" in name for name in h1)  # one per LoRA matrix
    assert max(float((h - 1).abs().max()) for h in h1.values()) > 0.05  # h learnt something

    finetune.main([*common, "--output_dir", str(second), "--max_steps", "1",
                   "--ivon_hessian_from", str(first / HESSIAN_FILE)])  # fmt: skip
    h2, _ = read_hessian(second / HESSIAN_FILE)
    for name, h in h1.items():  # β2 = 0.99999: one step keeps h where the file put it
        torch.testing.assert_close(h2[name], h, rtol=1e-3, atol=1e-3)
