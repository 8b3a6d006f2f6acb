"""DoRA, BitFit and AdaLoRA as the method registry prepares them, checked by hand.

Each method's trained parameter set is checked by name, and one optimiser step of the
prepared model is recomputed independently: DoRA from its formula on plain weights (Liu et al.
2024, eq. 5, with the column norm treated as a constant as in its §4.3), BitFit's output-bias
gradient from softmax minus one-hot. AdaLoRA's adapter, saved after its ranks were
reallocated, reloads to the same logits.
"""

from __future__ import annotations

import json

import torch
from torch.func import functional_call
from torch.nn import functional as F

from adaptlab.models import load_model
from adaptlab.models.tiny import tiny_bert, tiny_llama, tiny_tokenizer
from adaptlab.training.config import FinetuneConfig
from adaptlab.training.methods import METHODS
from adaptlab.training.optim import build_optimizer

VOCAB = len(tiny_tokenizer())
TARGETS = ["q_proj", "v_proj"]


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of ``logits`` [B, T, V] on ``ids`` [B, T]."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def test_dora_trains_lora_and_magnitudes_and_a_step_follows_its_formula():
    torch.manual_seed(0)
    base = tiny_llama(vocab_size=VOCAB).double()
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = FinetuneConfig(method="dora", target_modules=TARGETS, lora_r=4, lora_alpha=8,
                         lora_dropout=0.0)  # fmt: skip
    model = METHODS["dora"].prepare(base, cfg, 1)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    layers = [f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in TARGETS]
    assert trained == {
        f"base_model.model.{layer}.{part}"
        for layer in layers
        for part in ("lora_A.default.weight", "lora_B.default.weight",
                     "lora_magnitude_vector.default.weight")
    }  # fmt: skip
    with torch.no_grad():  # PEFT starts B at 0; a random B makes every gradient non-trivial
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = torch.randint(0, VOCAB, (3, 10))

    # By hand: W' = m / ||W + s B A||_c (a constant) * (W + s B A), on the untouched weights.
    scaling = cfg.lora_alpha / cfg.lora_r
    leaves = {n: t.clone().requires_grad_(True) for n, t in start.items()}
    weights = dict(reference)
    for layer in layers:
        key = f"base_model.model.{layer}"
        a, b = leaves[f"{key}.lora_A.default.weight"], leaves[f"{key}.lora_B.default.weight"]
        m = leaves[f"{key}.lora_magnitude_vector.default.weight"]
        merged = reference[f"{layer}.weight"] + scaling * b @ a
        weights[f"{layer}.weight"] = (m / merged.norm(dim=1).detach())[:, None] * merged
    plain = tiny_llama(vocab_size=VOCAB).double()
    loss = lm_loss(functional_call(plain, weights, args=(), kwargs={"input_ids": ids}).logits, ids)
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))

    lr = 0.1
    optimizer = build_optimizer("sgd", model, lr=lr)
    model_loss = lm_loss(model(input_ids=ids).logits, ids)
    torch.testing.assert_close(model_loss, loss, rtol=1e-12, atol=1e-12)
    model_loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if param.requires_grad:
            expected = start[name] - lr * grads[name]
            torch.testing.assert_close(param.detach(), expected, rtol=1e-10, atol=1e-12)
            assert grads[name].abs().max() > 0, name


def test_bitfit_trains_biases_only_and_the_output_bias_moves_by_softmax_minus_one_hot():
    torch.manual_seed(1)
    model = tiny_bert(vocab_size=VOCAB).double()
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    model = METHODS["bitfit"].prepare(model, FinetuneConfig(method="bitfit"), 1)
    model.eval()  # no dropout: the step is deterministic
    names = {n for n, _ in model.named_parameters()}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n in names if n.endswith(".bias")} and trained
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(5, VOCAB, (2, 9))
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 6] = 17, 42

    lr = 0.5
    optimizer = build_optimizer("sgd", model, lr=lr)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    optimizer.step()
    # d(mean CE)/d(output bias) = mean over labelled tokens of softmax(logits) - one_hot(label)
    picked = out.logits.detach()[labels != -100]
    grad = (picked.softmax(-1) - F.one_hot(labels[labels != -100], VOCAB)).mean(0)
    bias = (
        "cls.predictions.bias"
        if "cls.predictions.bias" in names
        else "cls.predictions.decoder.bias"
    )
    torch.testing.assert_close(dict(model.named_parameters())[bias].detach(),
                               before[bias] - lr * grad, rtol=1e-10, atol=1e-12)  # fmt: skip
    change = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    for name, moved in change.items():
        if name not in trained:
            assert moved == 0, name
        elif name.endswith("attention.self.key.bias"):
            assert moved < 1e-12, name  # softmax ignores a shift shared by all keys
        else:
            assert moved > 1e-6, name


def test_adalora_adapter_reloads_with_its_reallocated_ranks_and_equal_logits(tmp_path):
    from accelerate import Accelerator

    from adaptlab.training.checkpoint import save_weights

    torch.manual_seed(2)
    base_dir = tmp_path / "base"
    tiny_llama(vocab_size=VOCAB).save_pretrained(base_dir)
    cfg = FinetuneConfig(method="adalora", target_modules=TARGETS, adalora_init_r=4,
                         adalora_target_r=2, adalora_tinit=1, adalora_tfinal=1,
                         adalora_delta_t=1, lora_dropout=0.0)  # fmt: skip
    method = METHODS["adalora"]
    model = method.prepare(load_model(base_dir), cfg, 6)
    optimizer = build_optimizer("sgd", model, lr=0.5)
    ids = torch.randint(0, VOCAB, (4, 12))
    for step in range(1, 7):
        lm_loss(model(input_ids=ids).logits, ids).backward()
        optimizer.step()
        method.after_step(model, step, optimizer)
        optimizer.zero_grad()
    with torch.no_grad():  # large singular values: the adapter moves the logits by O(1)
        for name, param in model.named_parameters():
            if "lora_E" in name:
                param.mul_(1e3)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        plain = load_model(base_dir)(input_ids=ids).logits
    save_weights(Accelerator(cpu=True), model, tmp_path / "adapter", adapter=True)

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    ranks = [sum(keep) for keep in config["rank_pattern"].values()]
    assert sum(ranks) == 2 * len(ranks) and len(set(ranks)) > 1  # reallocated, same budget
    config["base_model_name_or_path"] = str(base_dir)
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    reloaded = load_model(tmp_path / "adapter")
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    assert (expected - plain).abs().max() > 1e-2  # the check below can tell adapter from none
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
