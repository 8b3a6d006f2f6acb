"""The L1-to-init penalty (graft.md §2) against autograd of loss + λ·Σ|θ − θ_init|."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator

from adaptlab.data import load_mmlu
from adaptlab.models.tiny import tiny_llama, tiny_tokenizer
from adaptlab.training import build_optimizer, build_scheduler, freeze
from adaptlab.training.l1_to_init import L1ToInit
from adaptlab.training.loop import TRAIN_DATA, BatchPlan, step_micro_batches, train_step
from adaptlab.training.methods import METHODS
from adaptlab.training.objectives import OBJECTIVES

LAMBDA, LR, MAX_NORM = 0.05, 0.1, 0.5


def test_sgd_step_with_penalty_equals_autograd_and_a_manual_update(mmlu_file):
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=len(tokenizer))
    freeze(model, fix_embeddings=True)  # frozen weights feel no penalty
    penalty = L1ToInit(model, LAMBDA)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():  # mid-training weights: θ ≠ θ_init, so sign(θ − θ_init) ≠ 0
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn_like(param))
    reference = copy.deepcopy(model)

    items = TRAIN_DATA["answer_only"].encode(load_mmlu(mmlu_file).test[:8], tokenizer, 512, False)
    plan = BatchPlan(len(items), batch_size=4, micro_batch_size=1, world=1, rank=0, seed=0)
    assert plan.accumulation == 4
    batches = step_micro_batches(
        items, plan, 0, TRAIN_DATA["answer_only"].collate, tokenizer.pad_token_id, "cpu"
    )
    objective = OBJECTIVES["answer_only"]
    optimizer = build_optimizer("sgd", model, lr=LR)
    scheduler = build_scheduler("constant", optimizer, 1)
    result = train_step(
        model,
        optimizer,
        scheduler,
        batches,
        objective,
        Accelerator(cpu=True),
        METHODS["full"],
        1,
        MAX_NORM,
        penalty=penalty,
    )

    trainable = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    loss = sum(objective(reference, b).loss for b in batches) / len(batches)
    l1 = sum((p - init[n]).abs().sum() for n, p in trainable.items())
    (loss + LAMBDA * l1).backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainable.values()]))
    assert float(norm) > MAX_NORM  # the clip acts, so the penalty must come before it
    coef = MAX_NORM / (float(norm) + 1e-6)
    assert result.l1_to_init == pytest.approx(LAMBDA * float(l1.detach()), rel=1e-6)
    assert result.grad_norm == pytest.approx(float(norm), rel=1e-5)
    assert result.loss == pytest.approx(float(loss.detach()), rel=1e-6)
    after = dict(model.named_parameters())
    for name, param in reference.named_parameters():
        expected = param.detach() - LR * coef * param.grad if param.requires_grad else init[name]
        torch.testing.assert_close(after[name].detach(), expected, rtol=0, atol=1e-6)


def test_penalty_counts_trainable_weights_only_and_gives_unreached_ones_a_gradient():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[1].requires_grad_(False)
    penalty = L1ToInit(model, 2.0)
    with torch.no_grad():
        model[0].weight.add_(torch.tensor([[1.0, -1.0, 0.0], [0.5, 0.0, 0.0]]))
    value = penalty.apply(Accelerator(cpu=True))  # no backward ran: every grad is None
    assert value == pytest.approx(2.0 * 2.5)
    assert torch.equal(model[0].weight.grad, 2.0 * torch.tensor([[1.0, -1, 0], [1, 0, 0]]))
    assert torch.equal(model[0].bias.grad, torch.zeros(2))
    assert model[1].weight.grad is None
