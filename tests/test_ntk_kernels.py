"""eNTK engine: every formula against per-example gradients from a loop of backward passes.

The reference takes ∂f(x_i)[c]/∂θ one example and one output at a time with
``torch.autograd.grad`` (float64 models), stacks them into ``[N, C, P]`` and contracts; the
engine must match it to ~1e-8 relative for causal and masked LMs, tied and untied embeddings,
a linear head, LoRA, every parameter subset and every blocking.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from adaptlab.models.tiny import tiny_bert, tiny_llama
from adaptlab.ntk import (
    FORMULAS,
    KernelError,
    KernelFunction,
    asymmetric_pair,
    compute_kernel,
    formulas,
    grad_dim,
    projected_features,
    projected_kernel,
    select_parameters,
)

VOCAB, MASK_ID, PAD_ID = 512, 4, 0
LABEL_WORDS = [11, 23, 42]
TRANSFORMS = {
    "sgd": (lambda g: g, lambda g: g),
    "signgd": (torch.sign, torch.sign),
    "asymmetric_signgd": (torch.sign, lambda g: g),
}


def make_batch(lengths: list[int], seed: int, masked: bool = False, classes: int = 3) -> dict:
    """Right-padded batch; the read position is the mask (masked LM) or the last token."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    positions = torch.zeros(len(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(5, VOCAB, (n,), generator=gen)
        mask[i, :n] = 1
        positions[i] = n // 2 if masked else n - 1
        if masked:
            ids[i, positions[i]] = MASK_ID
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "positions": positions,
        "class_labels": torch.arange(len(lengths)) % classes,
        "label_word_ids": torch.tensor(LABEL_WORDS[:classes]),
    }


def rows_cols(masked: bool = False, classes: int = 3) -> tuple[list[dict], list[dict]]:
    rows = [make_batch([5, 9, 3], 0, masked, classes), make_batch([7, 4], 1, masked, classes)]
    cols = [make_batch([6, 2, 8], 2, masked, classes)]
    return rows, cols


def loop_jacobian(fn: KernelFunction, params: dict, batches: list[dict]) -> torch.Tensor:
    """``[N, C, P]``: one backward pass per example and output."""
    params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    out = []
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            one = {k: v if k == "label_word_ids" else v[i : i + 1] for k, v in batch.items()}
            scores = fn(params, one)[0]
            per_out = []
            for c in range(len(scores)):
                grads = torch.autograd.grad(
                    scores[c], list(params.values()), retain_graph=True, allow_unused=True
                )
                per_out.append(
                    torch.cat(
                        [
                            (torch.zeros_like(p) if g is None else g).flatten()
                            for g, p in zip(grads, params.values(), strict=True)
                        ]
                    )
                )
            out.append(torch.stack(per_out))
    return torch.stack(out)


def reference(fn, params, rows, cols, formula) -> torch.Tensor:
    t_row, t_col = TRANSFORMS[formula]
    j_rows, j_cols = loop_jacobian(fn, params, rows), loop_jacobian(fn, params, cols)
    return torch.einsum("icp,jdp->icjd", t_row(j_rows), t_col(j_cols))


def assert_close(kernel: torch.Tensor, ref: torch.Tensor, tol: float = 1e-8) -> None:
    assert kernel.shape == ref.shape and kernel.dtype == torch.float64
    scale = ref.abs().max()
    assert scale > 0
    assert float((kernel - ref).abs().max() / scale) < tol


def tied_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD_ID,
        tie_word_embeddings=True,
    )
    torch.manual_seed(1)
    return LlamaForCausalLM(config).double().eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    """GPT-2: ``Conv1D`` layers, position ids shared by the batch, tied decoder."""
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(2)
    return GPT2LMHeadModel(config).double().eval()


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {
        "llama": tiny_llama(vocab_size=VOCAB).double(),
        "llama_tied": tied_llama(),
        "bert": tiny_bert(vocab_size=VOCAB).double(),
        "gpt2": tiny_gpt2(),
    }


def sign_safe(params: dict) -> dict:
    """Drop attention biases that reach keys: softmax ignores them, so their gradients are
    rounding noise (~1e-17) whose signs no two computations share."""
    return {k: v for k, v in params.items() if "key.bias" not in k and "c_attn.bias" not in k}


@pytest.mark.parametrize("formula", list(FORMULAS))
@pytest.mark.parametrize("name", ["llama", "llama_tied", "bert", "gpt2"])
def test_formulas_match_loop_of_backward_passes(models, name, formula):
    model = models[name]
    masked = name == "bert"
    fn = KernelFunction(model, head="label_words", label_word_ids=LABEL_WORDS)
    params = select_parameters(model)
    if formula != "sgd":
        params = sign_safe(params)
    rows, cols = rows_cols(masked)
    kernel = compute_kernel(fn, params, rows, cols, formula)
    assert kernel.shape == (5, 3, 3, 3)
    assert_close(kernel, reference(fn, params, rows, cols, formula))


def test_tied_embedding_counted_once(models):
    model = models["llama_tied"]
    params = select_parameters(model)
    assert "model.embed_tokens.weight" in params and "lm_head.weight" not in params
    assert grad_dim(params) == sum(p.numel() for p in model.parameters())  # dedupes too
    assert grad_dim(params) < sum(
        p.numel() for _, p in model.named_parameters(remove_duplicate=False)
    )


@pytest.mark.parametrize(
    ("name", "subset"),
    [
        ("llama", {"exclude_embeddings": True}),
        ("llama", {"exclude_head": True}),
        ("llama_tied", {"exclude_embeddings": True}),
        ("bert", {"exclude_embeddings": True}),
        ("bert", {"exclude_head": True}),
        ("bert", {"only_biases": True}),
        ("bert", {"exclude_embeddings": True, "exclude_head": True}),
    ],
)
def test_parameter_subsets(models, name, subset):
    model = models[name]
    params = select_parameters(model, **subset)
    everything = select_parameters(model)
    for key in everything:
        kept = key in params
        if subset.get("exclude_embeddings"):
            assert kept != ("embed" in key) or ("head" in key and subset.get("exclude_head"))
        if subset.get("only_biases"):
            assert kept == ("bias" in key)
    fn = KernelFunction(model, head="label_words", label_word_ids=LABEL_WORDS)
    rows, cols = rows_cols(masked=name == "bert")
    for formula in ("sgd", "signgd"):
        used = params if formula == "sgd" else sign_safe(params)
        kernel = compute_kernel(fn, used, rows, cols, formula)
        assert_close(kernel, reference(fn, used, rows, cols, formula))


def test_subset_errors(models):
    with pytest.raises(KernelError, match="leaves no parameter"):
        select_parameters(models["llama"], only_biases=True)  # Llama has no biases
    with pytest.raises(KernelError, match="lora"):
        select_parameters(models["llama"], only_lora=True)


def test_partition_of_parameters_sums_to_full_kernel(models):
    model = models["bert"]
    fn = KernelFunction(model, head="label_words", label_word_ids=LABEL_WORDS)
    params = select_parameters(model)
    rows, cols = rows_cols(masked=True)
    full = compute_kernel(fn, params, rows, cols, "sgd")
    names = list(params)
    parts = [names[0::3], names[1::3], names[2::3]]
    total = sum(
        compute_kernel(fn, {k: params[k] for k in part}, rows, cols, "sgd") for part in parts
    )
    assert_close(total, full, 1e-12)


@pytest.mark.parametrize("formula", list(FORMULAS))
def test_blocking_gives_the_same_kernel(models, formula, monkeypatch):
    model = models["llama_tied"]
    fn = KernelFunction(model, head="label_words", label_word_ids=LABEL_WORDS)
    params = select_parameters(model)
    examples = [5, 9, 3, 7, 4, 6]
    one = [make_batch(examples, 0)]
    ref = compute_kernel(fn, params, one, one, formula)
    singles = [make_batch([n], 0) for n in examples]  # other tokens: only shapes compared
    assert compute_kernel(fn, params, singles, singles, formula).shape == ref.shape
    gen_rows = [make_batch(examples[:4], 0), make_batch(examples[4:], 1)]
    gen_cols = [make_batch(examples[:1], 0), make_batch(examples[1:], 1)]
    a = compute_kernel(fn, params, gen_rows, gen_cols, formula)
    for block in (100, 1000, 10**6):
        b = compute_kernel(fn, params, gen_rows, gen_cols, formula, param_block_numel=block)
        assert_close(b, a, 1e-12)
    # the same batches on both axes: symmetric formulas mirror the upper block triangle
    same = compute_kernel(fn, params, gen_rows, gen_rows, formula, param_block_numel=500)
    copies = [dict(b) for b in gen_rows]
    assert_close(same, compute_kernel(fn, params, gen_rows, copies, formula), 1e-12)
    # factors of one batch at a time (a tight memory budget): recomputed, same numbers
    monkeypatch.setattr(formulas, "_FACTOR_BUDGET", 1)
    assert_close(compute_kernel(fn, params, gen_rows, gen_cols, formula), a, 1e-12)
    assert_close(compute_kernel(fn, params, gen_rows, gen_rows, formula), same, 1e-12)


def test_gram_and_materialised_linear_layers_agree(models):
    model = models["llama"]
    fn = KernelFunction(model, head="label_words", label_word_ids=LABEL_WORDS)
    params = select_parameters(model)
    rows, cols = rows_cols()
    ref = reference(fn, params, rows, cols, "sgd")
    for gram in (True, False, None):
        assert_close(compute_kernel(fn, params, rows, cols, "sgd", gram=gram), ref)
    with torch.no_grad():  # as upstream calls it
        assert_close(compute_kernel(fn, params, rows, cols, "sgd"), ref)


class FunctionalHead(nn.Module):
    """A head that uses its layer's weights without calling the layer (no hook sees them)
    and a scale of its own (per-example rule of a generic module)."""

    def __init__(self, hidden: int, classes: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, classes)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.proj.weight, self.proj.bias) * self.scale


def mlp_head(hidden: int, classes: int) -> nn.Module:
    """Writes over a linear layer's output in place (ReLU): its captures must be copies."""
    return nn.Sequential(nn.Linear(hidden, 16), nn.ReLU(inplace=True), nn.Linear(16, classes))


@pytest.mark.parametrize("kind", ["linear", "functional", "in_place"])
def test_linear_head(models, kind):
    model = models["llama"]
    torch.manual_seed(3)
    heads = {"linear": nn.Linear, "functional": FunctionalHead, "in_place": mlp_head}
    head = heads[kind](32, 3).double()
    fn = KernelFunction(model, head="linear_head", linear_head=head)
    params = select_parameters(model, exclude_embeddings=True, linear_head=head)
    assert any(k.startswith("head.") for k in params)
    rows, cols = rows_cols()
    for formula in ("sgd", "asymmetric_signgd"):
        kernel = compute_kernel(fn, params, rows, cols, formula)
        assert_close(kernel, reference(fn, params, rows, cols, formula))


def test_lora_only_lora():
    base = tiny_llama(vocab_size=VOCAB).double()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    config.init_lora_weights = False  # random B too, so LoRA-A gradients are not all zero
    model = get_peft_model(base, config).eval()
    params = select_parameters(model, only_lora=True)
    assert params and all("lora" in k or "lm_head" in k for k in params)
    assert any("lm_head" in k for k in params)  # outside the backbone: kept, as upstream
    fn = KernelFunction(model, head="label_words", label_word_ids=LABEL_WORDS)
    rows, cols = rows_cols()
    for formula in FORMULAS:
        kernel = compute_kernel(fn, params, rows, cols, formula)
        assert_close(kernel, reference(fn, params, rows, cols, formula))


def test_asymmetric_pair(models):
    model = models["bert"]
    fn = KernelFunction(model, head="label_words", label_word_ids=LABEL_WORDS)
    params = sign_safe(select_parameters(model))
    rows, cols = rows_cols(masked=True)
    on_train = asymmetric_pair(fn, params, rows, rows)
    assert on_train.shape == (2, 5, 3, 5, 3)
    assert torch.equal(on_train[1], on_train[0].permute(2, 3, 0, 1))
    assert_close(on_train[0], reference(fn, params, rows, rows, "asymmetric_signgd"))
    pair = asymmetric_pair(fn, params, rows, cols)
    j_rows, j_cols = loop_jacobian(fn, params, rows), loop_jacobian(fn, params, cols)
    assert_close(pair[0], torch.einsum("icp,jdp->icjd", j_rows.sign(), j_cols))
    assert_close(pair[1], torch.einsum("icp,jdp->icjd", j_rows, j_cols.sign()))


def test_binary_mode_is_the_difference_of_two_logits(models):
    # BERT: Llama's RMSNorm runs in float32 even in a float64 model, so the gradient of
    # logit₁ - logit₀ and the difference of the two gradients differ at ~1e-7 there
    model = models["bert"]
    params = select_parameters(model)
    rows, cols = rows_cols(masked=True, classes=2)
    two = KernelFunction(model, head="label_words", label_word_ids=LABEL_WORDS[:2])
    binary = KernelFunction(model, head="label_words", label_word_ids=LABEL_WORDS[:2], binary=True)
    assert binary.n_outputs == 1 and two.n_outputs == 2
    full = compute_kernel(fn=two, params=params, rows=rows, cols=cols, formula="sgd")
    diff = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    expected = torch.einsum("c,icjd,d->ij", diff, full, diff)
    kernel = compute_kernel(binary, params, rows, cols, "sgd")
    assert kernel.shape == (5, 1, 3, 1)
    assert_close(kernel[:, 0, :, 0], expected, 1e-12)
    with pytest.raises(KernelError, match="2 classes"):
        KernelFunction(model, head="label_words", label_word_ids=LABEL_WORDS, binary=True)


def test_errors_name_the_choices(models):
    model = models["llama"]
    fn = KernelFunction(model, head="label_words", label_word_ids=LABEL_WORDS)
    rows, cols = rows_cols()
    with pytest.raises(KernelError, match="sgd, signgd, asymmetric_signgd"):
        compute_kernel(fn, select_parameters(model), rows, cols, "adam")
    with pytest.raises(KernelError, match="label_words or linear_head"):
        KernelFunction(model, head="cls")
    with pytest.raises(KernelError, match="linear_head="):
        KernelFunction(model, head="linear_head")
    batch = make_batch([5, 9, 3], 0)  # a multi-task batch: label words per example, [B, C]
    batch["label_word_ids"] = batch["label_word_ids"].repeat(3, 1)
    with pytest.raises(KernelError, match=r"\[3, 3\] are per example .* compute it per task"):
        KernelFunction(model, head="label_words")(select_parameters(model), batch)


def test_projected_kernel_converges_to_the_exact_kernel(models):
    model = models["llama"]
    fn = KernelFunction(model, head="label_words", label_word_ids=LABEL_WORDS)
    params = {k: v for k, v in select_parameters(model).items() if "q_proj" in k}
    params["lm_head.weight"] = model.lm_head.weight  # rows touched: the label words only
    batches = [make_batch([5, 9, 3, 7], 0)]
    exact = compute_kernel(fn, params, batches, batches, "sgd")

    def error(kernel: torch.Tensor) -> float:
        return float((kernel - exact).norm() / exact.norm())

    def kernel_at(dim: int, seed: int) -> torch.Tensor:
        phi = projected_features(fn, params, batches, dim, seed=seed)
        assert phi.shape == (4, 3, dim)
        return projected_kernel(phi, phi)

    small = [error(kernel_at(64, s)) for s in range(3)]
    large = [error(kernel_at(4096, s)) for s in range(3)]
    assert sum(large) < 0.5 * sum(small)
    # unbiased: the mean over seeds beats a single draw
    draws = [kernel_at(256, s) for s in range(8)]
    single = sum(error(k) for k in draws) / len(draws)
    assert error(torch.stack(draws).mean(0)) < 0.7 * single
    # the same seed gives the same features; Rademacher entries work too
    assert torch.equal(kernel_at(64, 5), kernel_at(64, 5))
    phi = projected_features(fn, params, batches, 4096, distribution="rademacher")
    assert error(projected_kernel(phi, phi)) < sum(small) / 3
