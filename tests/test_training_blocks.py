"""Fine-tuning building blocks checked against hand computations (adaptlab.training)."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from adaptlab.data import MMLUExample
from adaptlab.models.tiny import tiny_bert, tiny_llama, tiny_tokenizer
from adaptlab.training import (
    OBJECTIVES,
    LinearHead,
    SignSGD,
    TrainingError,
    accumulation_loss_scale,
    accuracy_report,
    answer_only_labels,
    attach_linear_head,
    build_optimizer,
    build_scheduler,
    causal_lm_loss,
    collate_answer_only,
    encode_answer_only,
    expected_calibration_error,
    find_linear_head,
    freeze,
    ivon_step_context,
    label_word_logits,
    label_word_loss,
    lr_factor,
    mask_positions,
    param_groups,
    reliability_bins,
    resolve_warmup_steps,
    train_mc_samples,
    uses_ivon,
)
from adaptlab.training.config import FinetuneConfig
from tests.conftest import requires_ivon

# tiny_llama (vocab 512, hidden 32, 4 heads, 2 kv heads of dim 8, MLP 64, 2 blocks), by hand:
EMBED = 512 * 32
BLOCK = (32 * 32 + 32 * 16 + 32 * 16 + 32 * 32) + 3 * (32 * 64) + 2 * 32  # attn, MLP, 2 norms
FINAL_NORM = 32
LM_HEAD = 512 * 32
TOTAL = EMBED + 2 * BLOCK + FINAL_NORM + LM_HEAD
BLOCK_BIASES = (32 + 16 + 16 + 32) + (64 + 64 + 32)  # q, k, v, o; gate, up, down


def llama_with_biases() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def mmlu_example(index: int, subject: str, answer: str = "B") -> MMLUExample:
    return MMLUExample(
        index, subject, "What is the value of x?", ("0", "1", "2", "all of the above"), answer
    )


# ---------------------------------------------------------------------------------------------
# Optimisers


def test_param_groups_put_exactly_biases_and_norm_weights_in_no_decay():
    model = llama_with_biases()
    expected_no_decay = {"model.norm.weight"}
    for i in range(2):
        expected_no_decay |= {f"model.layers.{i}.self_attn.{p}_proj.bias" for p in "qkvo"}
        expected_no_decay |= {f"model.layers.{i}.mlp.{p}_proj.bias" for p in ("gate", "up", "down")}
        expected_no_decay |= {
            f"model.layers.{i}.input_layernorm.weight",
            f"model.layers.{i}.post_attention_layernorm.weight",
        }
    groups = param_groups(model, weight_decay=0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert set(no_decay["param_names"]) == expected_no_decay
    assert set(decay["param_names"]) == {n for n, _ in model.named_parameters()} - expected_no_decay
    for group in groups:
        for name, param in zip(group["param_names"], group["params"], strict=True):
            assert param is model.get_parameter(name)


def test_param_groups_find_norms_by_type_not_name():
    class FancyRMSNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(4))

    class Scaled(nn.LayerNorm):  # a norm by inheritance, whatever its name
        pass

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.post = Scaled(4)
            self.scale_layer_norm_like = nn.Parameter(torch.ones(4))  # name says norm, is not
            self.mixer = FancyRMSNorm()
            self.ln = nn.LayerNorm(4)
            self.frozen = nn.Linear(4, 4)
            self.frozen.requires_grad_(False)

    net = Net()
    decay, no_decay = param_groups(net, weight_decay=0.01)
    assert set(decay["param_names"]) == {"proj.weight", "scale_layer_norm_like"}
    assert set(no_decay["param_names"]) == {
        "proj.bias",
        "post.weight",
        "post.bias",
        "mixer.gamma",
        "ln.weight",
        "ln.bias",
    }


def test_signsgd_step_equals_sign_update_with_decoupled_decay():
    p0 = torch.tensor([1.0, -2.0, 0.5, 3.0])
    g = torch.tensor([0.3, -0.001, 0.0, -5.0])
    param = nn.Parameter(p0.clone())
    opt = SignSGD([param], lr=0.1, weight_decay=0.01)
    param.grad = g.clone()
    opt.step()
    expected = p0 * (1 - 0.1 * 0.01) - 0.1 * torch.tensor([1.0, -1.0, 0.0, -1.0])
    torch.testing.assert_close(param.detach(), expected)


def test_signsgd_momentum_accumulates_signs():
    param = nn.Parameter(torch.zeros(2))
    opt = SignSGD([param], lr=0.5, momentum=0.9)
    param.grad = torch.tensor([2.0, -3.0])
    opt.step()  # buf = [1, -1]
    param.grad = torch.tensor([-1.0, -1.0])
    opt.step()  # buf = 0.9 [1, -1] + [-1, -1] = [-0.1, -1.9]
    expected = -0.5 * torch.tensor([1.0, -1.0]) - 0.5 * torch.tensor([-0.1, -1.9])
    torch.testing.assert_close(param.detach(), expected)


def test_build_optimizer_signgd_decays_weights_but_not_biases():
    layer = nn.Linear(2, 1)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    opt = build_optimizer("signgd", layer, lr=0.1, weight_decay=0.5)
    layer.weight.grad = torch.tensor([[1.0, -1.0]])
    layer.bias.grad = torch.tensor([1.0])
    opt.step()
    torch.testing.assert_close(layer.weight.detach(), w0 * 0.95 - 0.1 * torch.tensor([[1.0, -1.0]]))
    torch.testing.assert_close(layer.bias.detach(), b0 - 0.1)


def test_build_optimizer_types_and_errors():
    model = nn.Linear(2, 1)
    assert isinstance(build_optimizer("adamw", model, lr=1e-3), torch.optim.AdamW)
    assert isinstance(build_optimizer("sgd", model, lr=1e-3), torch.optim.SGD)
    with pytest.raises(TrainingError, match="adamw, sgd, signgd, ivon"):
        build_optimizer("adam", model, lr=1e-3)
    model.requires_grad_(False)
    with pytest.raises(TrainingError, match="no trainable parameter"):
        build_optimizer("adamw", model, lr=1e-3)


@requires_ivon
def test_build_ivon():
    from adaptlab.training.ivon_optim import CheckedIVON

    model = nn.Linear(2, 1)
    assert isinstance(build_optimizer("ivon_opt", model, lr=0.1, ivon_ess=10), CheckedIVON)
    with pytest.raises(TrainingError, match="ivon_ess"):
        build_optimizer("ivon_opt", model, lr=0.1)


def test_ivon_opt_without_the_package_says_it_is_a_gpl_test_dependency(monkeypatch):
    """ivon-opt is GPL-licensed and only a test dependency: its absence is one sentence saying
    so, and ``ivon`` (adaptlab's own) needs no package."""
    monkeypatch.setitem(sys.modules, "ivon", None)  # `import ivon` now fails
    with pytest.raises(TrainingError, match=r"GPL-3\.0-or-later and so only a test dependency"):
        build_optimizer("ivon_opt", nn.Linear(2, 1), lr=0.1, ivon_ess=10)
    with pytest.raises(TrainingError, match=r"use optimizer=ivon, adaptlab's own IVON"):
        FinetuneConfig(optimizer="ivon_opt")
    assert FinetuneConfig(optimizer="ivon").optimizer == "ivon"
    assert not uses_ivon(torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1))


@requires_ivon
def test_ivon_needs_one_device_and_dtype():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1).double())
    with pytest.raises(TrainingError, match="one device and dtype"):
        build_optimizer("ivon_opt", model, lr=0.1, ivon_ess=10)


def _regression(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=generator)
    y = (
        x @ torch.tensor([[1.0], [-2.0], [0.5]])
        + 0.3
        + 0.01 * torch.randn(n, 1, generator=generator)
    )
    return x, y


def _mse_grad(layer: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Closed-form gradient of mean((x w + b - y)^2) as IVON's flat [w, b] vector."""
    with torch.no_grad():
        residual = x @ layer.weight.T + layer.bias - y
        grad_w = 2 * residual.T @ x / len(x)
        grad_b = 2 * residual.sum(0) / len(x)
    return torch.cat([grad_w.flatten(), grad_b])


@requires_ivon
def test_ivon_accumulation_averages_separate_samples():
    # With a huge ess the posterior noise is ~1e-6, so each sample is the gradient at the mean.
    x, y = _regression()
    halves = [(x[:32], y[:32]), (x[32:], y[32:])]
    torch.manual_seed(0)
    layer = nn.Linear(3, 1)
    expected = (_mse_grad(layer, *halves[0]) + _mse_grad(layer, *halves[1])) / 2

    opt = build_optimizer("ivon_opt", layer, lr=0.1, ivon_ess=1e12)
    scale = accumulation_loss_scale(opt, 2)
    assert scale == 1.0  # IVON averages its samples itself
    for xb, yb in halves:
        with ivon_step_context(opt):
            (F.mse_loss(layer(xb), yb) * scale).backward()
    torch.testing.assert_close(opt.state["avg_grad"], expected, atol=1e-4, rtol=1e-4)

    # Upstream IVON reads the running sum p.grad: it averages g1 and g1 + g2 instead.
    torch.manual_seed(0)
    layer = nn.Linear(3, 1)
    import ivon

    raw = ivon.IVON(layer.parameters(), lr=0.1, ess=1e12)
    for xb, yb in halves:
        with raw.sampled_params(train=True):
            F.mse_loss(layer(xb), yb).backward()
    g1 = _mse_grad(layer, *halves[0])
    torch.testing.assert_close(
        raw.state["avg_grad"], g1 + (expected - g1 / 2), atol=1e-4, rtol=1e-4
    )


@requires_ivon
def test_ivon_trains_a_linear_regression_with_accumulation_two():
    x, y = _regression()
    torch.manual_seed(0)
    layer = nn.Linear(3, 1)
    opt = build_optimizer("ivon_opt", layer, lr=0.1, weight_decay=1e-4, ivon_ess=len(x))
    assert train_mc_samples(opt) == 1
    initial = F.mse_loss(layer(x), y).item()
    for _ in range(20):
        for xb, yb in ((x[:32], y[:32]), (x[32:], y[32:])):
            for _ in range(train_mc_samples(opt)):
                with ivon_step_context(opt):
                    F.mse_loss(layer(xb), yb).backward()
        opt.step()  # no avg_grad=None error: every micro-batch ran inside the context
        opt.zero_grad()
    assert F.mse_loss(layer(x), y).item() < 0.2 * initial


@requires_ivon
def test_ivon_step_without_sample_is_a_clear_error():
    """Raw IVON fails with ivon issue #6's TypeError; CheckedIVON names the fix instead."""
    import ivon

    x, y = _regression(8)
    layer = nn.Linear(3, 1)
    raw = ivon.IVON(layer.parameters(), lr=0.1, ess=8)
    F.mse_loss(layer(x), y).backward()
    with pytest.raises(TypeError, match="NoneType"):
        raw.step()
    checked = build_optimizer("ivon_opt", layer, lr=0.1, ivon_ess=8)
    F.mse_loss(layer(x), y).backward()
    with pytest.raises(TrainingError, match="ivon_step_context"):
        checked.step()


@requires_ivon
def test_ivon_context_unwraps_accelerate_style_wrapper():
    class Wrapped:  # accelerate's AcceleratedOptimizer keeps the optimiser as `.optimizer`
        def __init__(self, optimizer: torch.optim.Optimizer) -> None:
            self.optimizer = optimizer

    layer = nn.Linear(3, 1)
    before = layer.weight.detach().clone()
    opt = Wrapped(build_optimizer("ivon_opt", layer, lr=0.1, ivon_ess=4, ivon_mc_samples=3))
    assert train_mc_samples(opt) == 3
    with ivon_step_context(opt, train=False):
        assert not torch.equal(layer.weight.detach(), before)  # weights are a posterior draw
    torch.testing.assert_close(layer.weight.detach(), before)

    sgd = Wrapped(build_optimizer("sgd", layer, lr=0.1))
    with ivon_step_context(sgd):
        torch.testing.assert_close(layer.weight.detach(), before)
    assert accumulation_loss_scale(sgd, 4) == 0.25 and train_mc_samples(sgd) == 1


# ---------------------------------------------------------------------------------------------
# Schedules


def spec_cosine(x: int, w: int, total: int, f: float) -> float:
    """landscape.md §4, written out as in the spec (needs 0 < w < total)."""
    return min(
        f + (1 - f) * min(x, w) / w,
        f + 0.5 * (1 - f) * (1 + math.cos(math.pi * max(0, x - w) / (total - w))),
    )


def test_cosine_matches_spec_formula():
    for x in range(101):
        assert lr_factor("cosine", x, 100, 10, 0.01) == pytest.approx(spec_cosine(x, 10, 100, 0.01))
    assert lr_factor("cosine", 0, 100, 10, 0.01) == pytest.approx(0.01)  # warmup starts at f
    assert lr_factor("cosine", 5, 100, 10, 0.01) == pytest.approx(0.505)
    assert lr_factor("cosine", 55, 100, 10, 0.01) == pytest.approx(0.505)  # half-way cosine
    assert lr_factor("cosine", 100, 100, 10, 0.01) == pytest.approx(0.01)


def test_cosine_edge_cases_without_division_by_zero():
    # w = 0: the warmup term drops out, the cosine starts at 1.
    for x in (0, 3, 10):
        expected = 0.01 + 0.5 * 0.99 * (1 + math.cos(math.pi * x / 10))
        assert lr_factor("cosine", x, 10, 0, 0.01) == pytest.approx(expected)
    # T == w: all warmup, f + (1 - f) x / w.
    for x in (0, 2, 4):
        assert lr_factor("cosine", x, 5, 5, 0.1) == pytest.approx(0.1 + 0.9 * x / 5)
    # A ratio below half a step gives 0 warmup steps (no cap, no error).
    assert resolve_warmup_steps(10, warmup_ratio=0.04) == 0
    assert resolve_warmup_steps(100, warmup_ratio=0.05) == 5
    assert resolve_warmup_steps(10, warmup_steps=10) == 10


def test_linear_and_constant_by_hand():
    # T = 10, w = 2, f = 0.1: warmup from 0, then linear down to f.
    assert lr_factor("linear", 1, 10, 2, 0.1) == pytest.approx(0.5)
    assert lr_factor("linear", 6, 10, 2, 0.1) == pytest.approx(0.1 + 0.9 * 4 / 8)
    assert lr_factor("linear", 10, 10, 2, 0.1) == pytest.approx(0.1)
    assert lr_factor("constant", 1, 10, 4, 0.1) == pytest.approx(0.25)
    assert lr_factor("constant", 9, 10, 4, 0.1) == 1.0


@pytest.mark.parametrize(
    ("name", "hf"),
    [
        ("linear", get_linear_schedule_with_warmup),
        ("cosine", get_cosine_schedule_with_warmup),
        ("constant", get_constant_schedule_with_warmup),
    ],
)
@pytest.mark.parametrize("warmup", [0, 3])
def test_zero_floor_equals_hugging_face(name, hf, warmup):
    param = nn.Parameter(torch.zeros(1))
    kwargs = {"num_warmup_steps": warmup}
    if name != "constant":
        kwargs["num_training_steps"] = 12
    reference = hf(torch.optim.SGD([param], lr=1.0), **kwargs).lr_lambdas[0]
    for x in range(13):
        assert lr_factor(name, x, 12, warmup, 0.0) == pytest.approx(reference(x), abs=1e-12)


def test_lambda_lr_applies_the_factor_to_the_base_lr():
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.2)
    scheduler = build_scheduler("cosine", opt, total_steps=20, warmup_ratio=0.1, min_lr_ratio=0.01)
    for x in range(20):
        assert scheduler.get_last_lr()[0] == pytest.approx(0.2 * spec_cosine(x, 2, 20, 0.01))
        opt.step()
        scheduler.step()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"warmup_steps": 2, "warmup_ratio": 0.1}, "give one"),
        ({"warmup_steps": -1}, "warmup_steps=-1"),
        ({"warmup_steps": 11}, "warmup_steps=11"),
        ({"warmup_ratio": 1.5}, "warmup_ratio=1.5"),
        ({"min_lr_ratio": 2.0}, "min_lr_ratio=2.0"),
        ({"total_steps": 0}, "total_steps=0"),
        ({"name": "step"}, "linear, cosine, constant"),
    ],
)
def test_schedule_errors(kwargs, match):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    args = {"name": "cosine", "optimizer": opt, "total_steps": 10, **kwargs}
    with pytest.raises(TrainingError, match=match):
        build_scheduler(**args)


# ---------------------------------------------------------------------------------------------
# Answer-only objective


def test_answer_only_labels_checks_prefix_and_answer():
    assert answer_only_labels([1, 2], [1, 2, 7, 8]) == [-100, -100, 7, 8]
    with pytest.raises(TrainingError, match="example 3"):
        answer_only_labels([1, 2, 3], [1, 2, 4, 5], name="example 3")
    with pytest.raises(TrainingError, match="no answer token"):
        answer_only_labels([1, 2], [1, 2])


def test_encode_answer_only_puts_labels_on_the_answer_tokens_only():
    tok = tiny_tokenizer()
    examples = [mmlu_example(0, "anatomy", "B"), mmlu_example(1, "anatomy", "D")]
    examples.append(mmlu_example(2, "astronomy", "A"))
    encoded = encode_answer_only(examples, tok, max_seq_len=None, weighted=True)
    for ex, enc in zip(examples, encoded, strict=True):
        answer_ids = tok(" " + ex.answer, add_special_tokens=False)["input_ids"]
        kept = [label for label in enc["labels"] if label != -100]
        assert kept == answer_ids and enc["input_ids"][-len(kept) :] == answer_ids
        assert enc["input_ids"][0] == tok.bos_token_id and enc["input_ids"][-1] != tok.eos_token_id
        assert "The following" not in tok.decode(enc["input_ids"])  # no header in training
    assert [e["weight"] for e in encoded] == pytest.approx([0.75, 0.75, 1.5])  # N / (S n_s)

    full = len(encoded[0]["input_ids"])
    cut = encode_answer_only(examples[:1], tok, max_seq_len=full - 5)[0]
    assert cut["n_truncated"] == 5 and cut["input_ids"] == encoded[0]["input_ids"][5:]
    assert cut["labels"][-1] == encoded[0]["labels"][-1]
    with pytest.raises(TrainingError, match="max_seq_len=1"):
        encode_answer_only(examples, tok, max_seq_len=1)


def _ce(logits_row: torch.Tensor, target: int) -> float:
    """Cross-entropy of one logit vector, by hand."""
    return float(torch.logsumexp(logits_row.double(), 0) - logits_row.double()[target])


def test_causal_lm_loss_is_weighted_mean_of_per_example_token_means():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.full((2, 6), -100)
    labels[0, 4], labels[0, 5], labels[1, 5] = 3, 7, 9
    loss0 = (_ce(logits[0, 3], 3) + _ce(logits[0, 4], 7)) / 2  # position t predicts label t + 1
    loss1 = _ce(logits[1, 4], 9)
    assert causal_lm_loss(logits, labels).item() == pytest.approx((loss0 + loss1) / 2, rel=1e-5)

    weights = torch.tensor([0.5, 2.0])
    weighted, per_example = causal_lm_loss(logits, labels, weights, return_per_example=True)
    assert per_example.tolist() == pytest.approx([loss0, loss1], rel=1e-5)
    assert weighted.item() == pytest.approx((0.5 * loss0 + 2 * loss1) / 2.5, rel=1e-5)

    # Two micro-batches of one example: with weight_norm = Σw / 2 their mean is the full loss.
    parts = [
        causal_lm_loss(logits[i : i + 1], labels[i : i + 1], weights[i : i + 1], 1.25)
        for i in (0, 1)
    ]
    assert (sum(parts) / 2).item() == pytest.approx(weighted.item(), rel=1e-5)

    labels[1, 5] = -100
    with pytest.raises(TrainingError, match=r"rows \[1\]"):
        causal_lm_loss(logits, labels)


def test_answer_only_objective_on_tiny_llama_matches_per_example_forward():
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    examples = [mmlu_example(0, "anatomy", "C"), mmlu_example(1, "virology", "A")]
    examples[1] = MMLUExample(
        1, "virology", "Which of the following is true?", ("a", "b", "c", "d"), "A"
    )
    encoded = encode_answer_only(examples, tok, max_seq_len=64)
    batch = collate_answer_only(encoded, tok.pad_token_id)
    out = OBJECTIVES["answer_only"](model, batch)
    expected = []
    with torch.no_grad():
        for enc in encoded:
            ids = torch.tensor([enc["input_ids"]])
            logits = model(input_ids=ids).logits[0]
            expected.append(_ce(logits[-2], enc["input_ids"][-1]))
    assert out.per_example.tolist() == pytest.approx(expected, rel=1e-4)
    assert out.loss.item() == pytest.approx(sum(expected) / 2, rel=1e-4)


def test_label_word_loss_equals_cross_entropy_by_hand():
    torch.manual_seed(1)
    logits = torch.randn(3, 5, 13)
    positions = torch.tensor([4, 2, 0])
    label_words = torch.tensor([7, 3])
    targets = torch.tensor([0, 1, 1])
    by_hand = [_ce(logits[i, positions[i], label_words], int(targets[i])) for i in range(3)]
    loss = label_word_loss(logits, positions, label_words, targets)
    assert loss.item() == pytest.approx(sum(by_hand) / 3, rel=1e-5)
    weights = torch.tensor([1.0, 2.0, 3.0])
    weighted = label_word_loss(logits, positions, label_words, targets, weights)
    expected = (by_hand[0] + 2 * by_hand[1] + 3 * by_hand[2]) / 6
    assert weighted.item() == pytest.approx(expected, rel=1e-5)


def test_label_word_logits_per_example_ids_equal_a_loop():
    torch.manual_seed(2)
    logits = torch.randn(4, 6, 17)
    positions = torch.tensor([5, 1, 3, 0])
    per_example = torch.tensor([[7, 3], [2, 9], [7, 3], [16, 0]])  # rows of two "tasks"
    scores = label_word_logits(logits, positions, per_example)
    loop = torch.stack([logits[i, positions[i], per_example[i]] for i in range(4)])
    assert torch.equal(scores, loop)
    # [C] ids (one task) still mean the same words for every row
    shared = label_word_logits(logits, positions, torch.tensor([7, 3]))
    assert torch.equal(shared, label_word_logits(logits, positions, per_example[[0, 0, 0, 0]]))
    targets = torch.tensor([0, 1, 1, 0])
    by_hand = [_ce(loop[i], int(targets[i])) for i in range(4)]
    loss = label_word_loss(logits, positions, per_example, targets)
    assert loss.item() == pytest.approx(sum(by_hand) / 4, rel=1e-5)
    with pytest.raises(TrainingError, match=r"label_word_ids \[3, 2\] do not match"):
        label_word_logits(logits, positions, per_example[:3])


def test_label_words_and_linear_head_objectives_on_tiny_bert():
    tok = tiny_tokenizer(add_bos=False)
    model = tiny_bert(vocab_size=len(tok))
    texts = ["It is great <mask>", "bad movie <mask> film"]
    enc = tok(texts, padding=True, return_tensors="pt")
    positions = mask_positions(enc["input_ids"], tok.mask_token_id)
    label_words = torch.tensor(
        tok([" good", " bad"], add_special_tokens=False)["input_ids"]
    ).flatten()
    targets = torch.tensor([0, 1])
    batch = {**enc, "positions": positions, "label_word_ids": label_words, "class_labels": targets}
    out = OBJECTIVES["label_words"](model, batch)
    with torch.no_grad():
        logits = model(**enc).logits
    by_hand = [_ce(logits[i, positions[i], label_words], int(targets[i])) for i in range(2)]
    assert out.loss.item() == pytest.approx(sum(by_hand) / 2, rel=1e-5)
    assert out.scores.shape == (2, 2)

    # the squared error to one-hot (upstream --l2_loss) on the same scores
    out = OBJECTIVES["label_words"](model, batch, loss="mse")
    scores = torch.stack([logits[i, positions[i], label_words] for i in range(2)])
    expected = torch.nn.MSELoss()(scores, F.one_hot(targets, 2).float())
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)

    head = LinearHead(32, 2)
    no_positions = {k: v for k, v in batch.items() if k != "positions"}
    out = OBJECTIVES["linear_head"](model, no_positions, head)  # first token: [CLS]
    with torch.no_grad():
        hidden = model.bert(**enc).last_hidden_state
        scores = hidden[:, 0] @ head.linear.weight.T + head.linear.bias
    by_hand = [_ce(scores[i], int(targets[i])) for i in range(2)]
    assert out.loss.item() == pytest.approx(sum(by_hand) / 2, rel=1e-5)
    with pytest.raises(TrainingError, match="needs a head"):
        OBJECTIVES["linear_head"](model, batch)
    # attached to the model, the head is found, and it reads batch["positions"]
    attach_linear_head(model, head)
    assert find_linear_head(model) is head
    out = OBJECTIVES["linear_head"](model, batch)
    at_mask = hidden[torch.arange(2), positions] @ head.linear.weight.T + head.linear.bias
    assert torch.allclose(out.scores, at_mask, atol=1e-6)
    with pytest.raises(TrainingError, match="exactly one mask"):
        mask_positions(torch.tensor([[4, 4, 1]]), 4)


# ---------------------------------------------------------------------------------------------
# Metrics


def test_accuracy_report_micro_and_macro():
    report = accuracy_report(
        ["A", "B", "C", "D", "A"], ["A", "B", "D", "D", "B"], ["x", "x", "x", "y", "y"]
    )
    assert report["micro"] == pytest.approx(3 / 5)
    assert report["subjects"] == pytest.approx({"x": 2 / 3, "y": 1 / 2})
    assert report["macro"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert accuracy_report([1, 0], [1, 1])["macro"] == 0.5
    with pytest.raises(TrainingError, match="one entry per example"):
        accuracy_report([1], [1, 0])


def test_ece_by_hand():
    # confidence (max prob), correct?: 0.9 yes, 0.78 no, 0.65 yes, 0.58 no, 0.55 yes
    probs = [[0.9, 0.1], [0.78, 0.22], [0.35, 0.65], [0.42, 0.58], [0.55, 0.45]]
    labels = [0, 1, 1, 0, 0]
    # 5 bins: (0.4, 0.6] has 0.58, 0.55 (acc 1/2); (0.6, 0.8] 0.78, 0.65 (acc 1/2); (0.8, 1] 0.9.
    expected = 2 / 5 * abs(0.5 - 0.565) + 2 / 5 * abs(0.5 - 0.715) + 1 / 5 * abs(1 - 0.9)
    assert expected == pytest.approx(0.132)
    assert expected_calibration_error(probs, labels, n_bins=5) == pytest.approx(expected)
    assert expected_calibration_error(
        torch.tensor(probs), torch.tensor(labels), 5
    ) == pytest.approx(expected)
    bins = reliability_bins(probs, labels, n_bins=5)
    assert bins.count.tolist() == [0, 0, 2, 2, 1]
    assert bins.confidence[2:].tolist() == pytest.approx([0.565, 0.715, 0.9])
    assert bins.accuracy[2:].tolist() == pytest.approx([0.5, 0.5, 1.0])
    # Right-closed bins: confidence 0.75 with 4 bins falls in (0.5, 0.75].
    assert reliability_bins([[0.75, 0.25]], [0], n_bins=4).count.tolist() == [0, 0, 1, 0]


# ---------------------------------------------------------------------------------------------
# Freezing


@pytest.mark.parametrize(
    ("flags", "frozen"),
    [
        ({}, 0),
        ({"fix_embeddings": True}, EMBED),
        ({"fix_head": True}, FINAL_NORM + LM_HEAD),
        ({"fix_first_n_layers": 1}, BLOCK),
        ({"fix_first_n_layers": 2, "fix_embeddings": True}, 2 * BLOCK + EMBED),
    ],
)
def test_freeze_counts_on_tiny_llama(flags, frozen):
    model = tiny_llama()
    counts = freeze(model, **flags)
    assert counts == {"trainable": TOTAL - frozen, "frozen": frozen, "total": TOTAL}
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == frozen


def test_freeze_first_layer_and_head_by_reference():
    model = tiny_llama()
    freeze(model, fix_head=True, fix_first_n_layers=1)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"lm_head.weight", "model.norm.weight"} | {
        f"model.layers.0.{n}" for n, _ in model.model.layers[0].named_parameters()
    }


def test_freeze_biases_only_and_errors():
    model = llama_with_biases()
    assert freeze(model, biases_only=True)["trainable"] == 2 * BLOCK_BIASES
    assert all(n.endswith(".bias") for n, p in model.named_parameters() if p.requires_grad)

    plain = tiny_llama()
    with pytest.raises(TrainingError, match="no trainable parameter"):
        freeze(plain, biases_only=True)
    assert all(p.requires_grad for p in plain.parameters())  # nothing changed on error
    with pytest.raises(TrainingError, match="outside 0..2"):
        freeze(plain, fix_first_n_layers=3)


def test_graft_paper_freezing_trains_roberta_base_encoder_layers_only():
    from transformers import RobertaConfig, RobertaForMaskedLM

    config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1)
    with torch.device("meta"):  # roberta-base's shapes, no memory
        model = RobertaForMaskedLM(config)
    counts = freeze(model, fix_head=True, fix_embeddings=True)
    assert counts["trainable"] == 85_054_464  # graft.md §2: the 12 encoder layers
    assert {n.split(".layer.")[0] for n, p in model.named_parameters() if p.requires_grad} == {
        "roberta.encoder"
    }


def test_freeze_tied_bert_head_keeps_word_embeddings():
    model = tiny_bert()
    embeddings = 512 * 32 + 512 * 32 + 2 * 32 + 2 * 32  # word, position, type, LayerNorm
    head = 512 + (32 * 32 + 32) + 2 * 32  # decoder bias, transform dense, transform LayerNorm
    total = sum(p.numel() for p in model.parameters())
    assert freeze(tiny_bert(), fix_embeddings=True)["frozen"] == embeddings
    assert freeze(model, fix_head=True)["frozen"] == head
    assert model.cls.predictions.decoder.weight.requires_grad  # tied to the word embeddings
    assert model.get_input_embeddings().weight is model.cls.predictions.decoder.weight
    assert total == sum(p.numel() for p in model.parameters())
