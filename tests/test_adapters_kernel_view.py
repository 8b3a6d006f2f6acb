"""Kernel-view adapters (inducer, prefix, kernel-wise, Kernel-mix) against independent
computations, on tiny random Llama (grouped-query), GPT-2, BERT and RoBERTa models, with the
eager and the SDPA attention backends."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    DebertaV2Config,
    DebertaV2ForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForMaskedLM,
)

from adaptlab.adapters.attention import (
    AttentionAdapter,
    Context,
    _eager_extended,
    _sdpa_extended,
    allowed_keys,
)
from adaptlab.adapters.families import ArchitectureError, Geometry, family_of, geometry
from adaptlab.adapters.inducer import InducerConfig, InducerError, attach_inducer
from adaptlab.adapters.inducer import parameter_count as inducer_count
from adaptlab.adapters.kernel import (
    VARIANTS,
    KernelAdapterConfig,
    KernelAdapterError,
    attach_kernel_adapter,
)
from adaptlab.adapters.kernel import parameter_count as kernel_count
from adaptlab.adapters.kernel_mix import KernelMix, KernelMixConfig, attach_kernel_mix
from adaptlab.adapters.kernel_mix import parameter_count as kmix_count
from adaptlab.adapters.prefix import PrefixConfig, PrefixError, attach_prefix
from adaptlab.adapters.prefix import parameter_count as prefix_count

KINDS = ("llama", "gpt2", "bert", "roberta", "deberta")
BACKENDS = ("eager", "sdpa")


def build(kind: str, backend: str = "eager", seed: int = 0) -> nn.Module:
    """A 2-block random model of ``kind`` (hidden 32, 4 heads; Llama with 2 key/value heads)."""
    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             pad_token_id=0)  # fmt: skip
        model = LlamaForCausalLM(config)
    elif kind == "gpt2":
        config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                            bos_token_id=1, eos_token_id=2)  # fmt: skip
        model = GPT2LMHeadModel(config)
    elif kind == "bert":
        config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=64,
                            pad_token_id=0)  # fmt: skip
        model = BertForMaskedLM(config)
    elif kind == "deberta":
        config = DebertaV2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64, pad_token_id=0,
                                 relative_attention=True, pos_att_type=["p2c", "c2p"],
                                 position_buckets=8, max_relative_positions=16)  # fmt: skip
        model = DebertaV2ForMaskedLM(config)
        return model.eval()  # eager only: its attention bypasses the registry
    else:
        config = RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=64,
                               pad_token_id=1)  # fmt: skip
        model = RobertaForMaskedLM(config)
    model.set_attn_implementation(backend)
    return model.eval()


def batch() -> dict[str, torch.Tensor]:
    """Two sequences of 7 tokens; the second is padded after 5 (right padding)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 60, (2, 7), generator=generator)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model: nn.Module) -> torch.Tensor:
    """Logits at the real tokens, [n_tokens, vocab]."""
    inputs = batch()
    model.eval()  # adapters attached after build() start in train mode (dropout)
    with torch.no_grad():
        return model(**inputs).logits[inputs["attention_mask"].bool()]


INDUCERS = {
    "L3": InducerConfig(prefix_length=3, prefix_dim=5),
    "L1": InducerConfig(prefix_length=1, prefix_dim=5),
    "L0": InducerConfig(prefix_length=0, prefix_dim=5),
    "no-value-extension": InducerConfig(prefix_length=3, prefix_dim=5, value_extension=False),
    "value-gating": InducerConfig(prefix_length=3, prefix_dim=5, value_gating=True),
    "mh-adapter": InducerConfig(prefix_length=3, prefix_dim=5, mh_adapter=True),
    "lora-q": InducerConfig(prefix_length=2, prefix_dim=4, lora_q_r=3),
}


def _zero_outputs(modules: list[nn.Module]) -> None:
    with torch.no_grad():
        for module in modules:
            for param in module.output_parameters():
                param.zero_()


def _perturb(modules: list[nn.Module], seed: int = 5, scale: float = 0.3) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for param in module.parameters():
                param.add_(torch.randn_like(param) * scale)


def _attach_variant(model: nn.Module, method: str, variant: str) -> list[nn.Module]:
    if method == "inducer":
        modules = attach_inducer(model, INDUCERS[variant])
        if INDUCERS[variant].lora_q_r:
            modules += [m for m in model.modules() if type(m).__name__ == "QueryLoRA"]
        return modules
    if method == "kernel":
        shared = variant != "kerfit_X"  # per-head kernels are fine on GQA too; vary the shapes
        return attach_kernel_adapter(model, KernelAdapterConfig(variant, shared_bandwidth=shared))
    return attach_kernel_mix(model, KernelMixConfig())


METHOD_VARIANTS = (
    [("inducer", v) for v in INDUCERS] + [("kernel", v) for v in VARIANTS] + [("kmix", "QVO")]
)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method,variant", METHOD_VARIANTS)
def test_zero_output_weights_give_the_pretrained_model_on_every_backend(kind, method, variant):
    """Prefix-tuning is not here: its prefixes take attention mass from the real keys at any
    value, so no setting of its weights is the pretrained model (its own test below checks it
    against explicit concatenated-key attention instead)."""
    for backend in BACKENDS:
        model = build(kind, backend)
        reference = logits(model)
        modules = _attach_variant(model, method, variant)
        if method == "kernel":  # kernel adapters start at the identity: perturb, then restore
            assert torch.allclose(logits(model), reference, atol=1e-6)
            continue
        _perturb(modules)
        assert not torch.allclose(logits(model), reference, atol=1e-4)  # the adapter acts
        _zero_outputs(modules)
        assert torch.allclose(logits(model), reference, atol=1e-6), (kind, backend)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "deberta"])  # DeBERTa: one path
@pytest.mark.parametrize("method,variant", METHOD_VARIANTS + [("prefix", "l4"), ("gating", "")])
def test_sdpa_path_equals_eager_path_with_padding(kind, method, variant):
    outputs = {}
    for backend in BACKENDS:
        model = build(kind, backend)
        torch.manual_seed(1)
        if method == "prefix":
            modules = attach_prefix(model, PrefixConfig(length=4))
        elif method == "gating":
            modules = attach_inducer(model, InducerConfig(3, 5, gating_ablation=True))
        else:
            modules = _attach_variant(model, method, variant)
        _perturb(modules)
        outputs[backend] = logits(model)
    assert torch.allclose(outputs["eager"], outputs["sdpa"], atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "bert", "deberta"])
def test_gradients_agree_across_backends_and_with_checkpointing(kind):
    grads = []
    for backend, checkpointing in (("eager", False), ("sdpa", False), ("sdpa", True)):
        model = build(kind, backend)
        for param in model.parameters():
            param.requires_grad_(False)
        torch.manual_seed(1)
        modules = attach_inducer(model, InducerConfig(prefix_length=3, prefix_dim=5))
        _perturb(modules, scale=0.1)
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model.train()
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        inputs = batch()
        out = model(**inputs).logits[inputs["attention_mask"].bool()]
        out.pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for m in modules for p in m.parameters()]))
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert torch.allclose(grads[1], grads[2], atol=1e-7)


# ---------------------------------------------------------------------------------------------
# The attention computation itself, against explicit float64 loops


def _random_attention(seed: int = 0, causal: bool = True):
    g = torch.Generator().manual_seed(seed)
    b, h, hkv, t, d = 2, 4, 2, 5, 8
    q = torch.randn(b, h, t, d, generator=g)
    k = torch.randn(b, hkv, t, d, generator=g)
    v = torch.randn(b, hkv, t, d, generator=g)
    padding = torch.ones(b, t, dtype=torch.long)
    padding[1, :2] = 0  # left padding in the second row
    s0 = torch.randn(b, h, t, generator=g)
    return q, k, v, padding, s0, causal


def _loop_reference(q, k, v, padding, s0, causal, prefix=None):
    """w and Attn by explicit sums over the visible keys (float64)."""
    b, h, t, d = q.shape
    groups = h // k.shape[1]
    scale = d**-0.5
    w = torch.zeros(b, h, t, dtype=torch.float64)
    attn = torch.zeros(b, h, t, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kv = hi // groups
            for i in range(t):
                keys, values = [], []
                if prefix is not None:
                    keys += list(prefix[0][kv].double())
                    values += list(prefix[1][kv].double())
                for j in range(t):
                    if padding[bi, j] and (not causal or j <= i):
                        keys.append(k[bi, kv, j].double())
                        values.append(v[bi, kv, j].double())
                if not keys:
                    continue
                logits = torch.stack([q[bi, hi, i].double() @ key * scale for key in keys])
                probs = torch.softmax(logits, 0)
                attn[bi, hi, i] = sum(p * val for p, val in zip(probs, values, strict=True))
                everything = torch.cat([s0[bi, hi, i].double().view(1), logits])
                w[bi, hi, i] = torch.softmax(everything, 0)[0]
    return w, attn


@pytest.mark.parametrize("extended", [_eager_extended, _sdpa_extended])
@pytest.mark.parametrize("causal", [True, False])
def test_inducer_weight_is_the_softmax_over_s0_and_the_visible_logits(extended, causal):
    q, k, v, padding, s0, _ = _random_attention(causal=causal)
    w_ref, attn_ref = _loop_reference(q, k, v, padding, s0, causal)
    attn, w, _ = extended(q, k, v, padding, q.shape[-1] ** -0.5, 0.0, causal, [], s0)
    seen = padding.bool()[:, None, :].expand(-1, q.shape[1], -1)  # rows with a visible key
    if causal:
        seen = seen.clone()  # a left-padded row sees nothing before its first token
    assert torch.allclose(w[seen].double(), w_ref[seen], atol=1e-6)
    assert torch.allclose(attn[seen].double(), attn_ref[seen], atol=1e-5)


@pytest.mark.parametrize("extended", [_eager_extended, _sdpa_extended])
def test_prefix_attention_equals_explicit_concatenated_keys_and_values(extended):
    q, k, v, padding, _, causal = _random_attention(seed=3)
    g = torch.Generator().manual_seed(9)
    pk, pv = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    _, attn_ref = _loop_reference(q, k, v, padding, torch.zeros(2, 4, 5), causal, (pk, pv))
    prefixes = [(pk.expand(2, -1, -1, -1), pv.expand(2, -1, -1, -1))]
    attn, w, _ = extended(q, k, v, padding, 8**-0.5, 0.0, causal, prefixes, None)
    assert w is None
    assert torch.allclose(attn.double(), attn_ref, atol=1e-5)  # every row sees the prefixes


def test_allowed_keys_reads_every_mask_format():
    padding = torch.tensor([[0, 1, 1]])
    causal = allowed_keys(padding, 1, 3, 3, True, "cpu")
    expected = torch.tensor([[False, False, False], [False, True, False], [False, True, True]])
    assert torch.equal(causal[0, 0], expected)
    additive = torch.where(causal, 0.0, torch.finfo(torch.float32).min)
    assert torch.equal(allowed_keys(additive, 1, 3, 3, True, "cpu"), causal)
    assert allowed_keys(None, 1, 2, 3, False, "cpu").all()
    cached = allowed_keys(None, 1, 1, 3, True, "cpu")  # one new query after 2 cached keys
    assert cached.all()


def test_inducer_logit_forms_match_the_spec():
    geo = Geometry(hidden=8, heads=2, kv_heads=2, head_dim=4)
    q = torch.randn(1, 2, 3, 4)
    ctx = Context(scaling=0.5, positions=torch.tensor([[1, 2, 3]]))
    from adaptlab.adapters.inducer import Inducer

    bare = Inducer(geo, InducerConfig(prefix_length=1, prefix_dim=2)).inducer_logit(q, ctx)
    assert torch.allclose(bare, (q * q).sum(-1) * 0.5)
    adaptive = Inducer(geo, InducerConfig(prefix_length=0, prefix_dim=2)).inducer_logit(q, ctx)
    assert torch.allclose(adaptive, (q * q).sum(-1) * 0.5 * torch.tensor([1, 2, 3]).sqrt())
    mlp = Inducer(geo, InducerConfig(prefix_length=3, prefix_dim=2))
    s0 = mlp.inducer_logit(q, ctx)
    for h in range(2):  # q·(q + up(tanh(down q + a)) + b) / 2, head by head
        hidden = torch.tanh(q[0, h] @ mlp.key_down[h].T + mlp.key_down_bias[h])
        key = q[0, h] + hidden @ mlp.key_up[h].T + mlp.key_up_bias[h]
        assert torch.allclose(s0[0, h], (q[0, h] * key).sum(-1) * 0.5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Kernel-mix and kernel-wise adapters against hand-built per-head computations


def test_kernel_mix_updates_equal_a_per_head_computation():
    geo = Geometry(hidden=12, heads=3, kv_heads=3, head_dim=4)
    mix = KernelMix(geo, KernelMixConfig(q_rank=2, v_rank=3, q_share_rank=4, v_share_rank=2))
    _perturb([mix], scale=0.5)
    mix.eval()
    x = torch.randn(2, 5, 12)
    expected_q = []
    for h in range(3):
        a_h = mix.q_A.weight[h * 2 : (h + 1) * 2]  # the rows of head h
        low = x @ a_h.T + mix.q_A.bias[h * 2 : (h + 1) * 2]
        expected_q.append(low @ mix.q_B[h].T + mix.q_B_bias[h])
    shared = mix.q_share.B(mix.q_share.A(x))
    assert torch.allclose(mix.delta_q(x), torch.cat(expected_q, -1) + shared, atol=1e-6)

    key, value = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    ctx = Context(1.0, torch.arange(1, 6)[None])
    _, _, new_value = mix.transform(key, key, value, ctx)
    for h in range(3):
        low = key[:, h] @ mix.v_A[h].T + mix.v_A_bias[h]
        assert torch.allclose(new_value[:, h], value[:, h] + low @ mix.v_B[h].T + mix.v_B_bias[h],
                              atol=1e-6)  # fmt: skip

    a = torch.randn(2, 5, 12)
    per_head = [a[..., h * 4 : (h + 1) * 4] @ mix.o_A[h].T + mix.o_A_bias[h] for h in range(3)]
    expected_o = mix.o_B(torch.cat(per_head, -1)) + mix.o_share.B(mix.o_share.A(a))
    assert torch.allclose(mix.delta_o(a), expected_o, atol=1e-6)


def test_kernel_mix_shared_scale_follows_the_alpha_rule():
    assert KernelMixConfig(alpha=1.0).share_scale(8) == 1.0
    assert KernelMixConfig(alpha=1.5).share_scale(8) == 1.0
    assert KernelMixConfig(alpha=16.0).share_scale(8) == 2.0


@pytest.mark.parametrize("variant", VARIANTS)
def test_kernel_adapter_query_equals_the_hand_formula(variant):
    model = build("gpt2")
    (adapter, _) = attach_kernel_adapter(model, KernelAdapterConfig(variant))
    _perturb([adapter], scale=0.5)
    captured = {}
    attention = model.transformer.h[0].attn

    def capture(module, args, output):
        captured["qkv"] = output.detach()

    x = torch.randn(1, 3, 32)
    handle = attention.c_attn.register_forward_hook(capture)
    base_qkv = x @ attention.c_attn.weight + attention.c_attn.bias
    if variant == "kerfit_X":
        attention.c_attn(x)  # the delta hook runs first, then the capture
        side = adapter.query
        q_hand = ((x + side.shift) * side.bandwidth) @ attention.c_attn.weight[:, :32]
        q_hand = q_hand + attention.c_attn.bias[:32]
        assert torch.allclose(captured["qkv"][..., :32], q_hand, atol=1e-5)
    else:
        q = base_qkv[..., :32].view(1, 3, 4, 8).transpose(1, 2)
        new_q, _, _ = adapter.transform(q, q, q, Context(1.0, torch.arange(1, 4)[None]))
        side = adapter.query
        hand = q
        if hasattr(side, "shift"):
            hand = hand + side.shift
        if hasattr(side, "bandwidth"):
            hand = hand * side.bandwidth
        if variant == "kerfit_sep":
            hand = hand * side.head_scale
        assert torch.allclose(new_q, hand, atol=1e-6)
    handle.remove()


# ---------------------------------------------------------------------------------------------
# Parameter counts (GPT-2 small, the spec's NLG configurations) and bad inputs


def _gpt2_small() -> nn.Module:
    with torch.device("meta"):
        return GPT2LMHeadModel(GPT2Config())


def _trainable(modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def test_parameter_counts_match_the_closed_forms_for_gpt2_small():
    geo, layers = Geometry(768, 12, 12, 64), 12
    model = _gpt2_small()
    assert geometry(model) == geo
    no_lora = InducerConfig(prefix_length=10, prefix_dim=15)
    modules = attach_inducer(model, no_lora)
    # by hand, per layer: value MLP 12·(15·64 + 15) + key MLP 12·(10·64 + 10) + 12·(64·10 + 64)
    # + value extension 12·15·768 + 768
    per_layer = (
        12 * (15 * 64 + 15) + 12 * (10 * 64 + 10) + 12 * (64 * 10 + 64) + 12 * 15 * 768 + 768
    )
    assert _trainable(modules) == inducer_count(geo, layers, no_lora) == 12 * per_layer == 2_003_472

    with_lora = InducerConfig(prefix_length=5, prefix_dim=12, lora_q_r=24)
    model = _gpt2_small()
    attach_inducer(model, with_lora)
    adapters = [
        m for n, m in model.named_modules() if n.endswith(("adaptlab_inducer", "query_lora"))
    ]
    assert _trainable(adapters) == inducer_count(geo, layers, with_lora)
    lora_part = 12 * 24 * (768 + 768)  # A: 24 x 768, B: 768 x 24, per layer
    assert inducer_count(geo, layers, with_lora) - inducer_count(
        geo, layers, InducerConfig(prefix_length=5, prefix_dim=12)) == lora_part  # fmt: skip

    mix = KernelMixConfig()
    model = _gpt2_small()
    assert _trainable(attach_kernel_mix(model, mix)) == kmix_count(geo, layers, mix)
    for prefix in (PrefixConfig(length=10), PrefixConfig(length=10, reparam_dim=64)):
        model = _gpt2_small()
        assert _trainable(attach_prefix(model, prefix)) == prefix_count(geo, layers, prefix)
    assert prefix_count(geo, layers, PrefixConfig(length=10)) == 12 * 2 * 10 * 768
    for variant in VARIANTS:
        config = KernelAdapterConfig(variant)
        model = _gpt2_small()
        assert _trainable(attach_kernel_adapter(model, config)) == kernel_count(geo, layers, config)


def test_bad_settings_say_what_to_do():
    with pytest.raises(PrefixError, match="prefix_length=0"):
        PrefixConfig(length=0)
    with pytest.raises(InducerError, match="prefix_length=-1"):
        InducerConfig(prefix_length=-1)
    with pytest.raises(InducerError, match="prefix_dim=0"):
        InducerConfig(prefix_dim=0)
    with pytest.raises(InducerError, match="value extension"):
        InducerConfig(value_extension=False, value_gating=True)
    with pytest.raises(InducerError, match="mh_adapter"):
        InducerConfig(mh_adapter=True, gating_ablation=True)
    with pytest.raises(KernelAdapterError, match="Unknown kernel"):
        KernelAdapterConfig("gaussian")
    with pytest.raises(KernelAdapterError, match="shared_bandwidth"):
        attach_kernel_adapter(build("llama"), KernelAdapterConfig(corresponding=True))
    with pytest.raises(Exception, match="≥ 0"):
        KernelMixConfig(q_rank=-1)
    from transformers import OPTConfig, OPTForCausalLM

    opt = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=4, ffn_dim=64,
                                   word_embed_proj_dim=32))  # fmt: skip
    with pytest.raises(ArchitectureError, match="OPTForCausalLM; pick another method"):
        family_of(opt, "Inducer-tuning")


def test_adapters_are_found_only_on_attention_modules():
    model = build("bert")
    attach_inducer(model, InducerConfig(prefix_length=2, prefix_dim=3))
    attention = model.bert.encoder.layer[0].attention.self
    assert any(isinstance(m, AttentionAdapter) for m in attention.children())
    assert model.config._attn_implementation == "adaptlab_eager"


@pytest.mark.parametrize("kind", ["llama", "bert"])  # transformers offers flex for these
@pytest.mark.parametrize("method", ["inducer", "prefix", "kmix"])
def test_flex_attention_backend_equals_eager(kind, method):
    """With flex attention the adapters that add keys read its BlockMask's mask_mod (forward
    only: PyTorch has no flex backward on CPU)."""
    outputs = {}
    for backend in ("eager", "flex_attention"):
        model = build(kind, backend)
        torch.manual_seed(1)
        if method == "prefix":
            modules = attach_prefix(model, PrefixConfig(length=3))
        else:
            modules = _attach_variant(model, method, "L3" if method == "inducer" else "QVO")
        _perturb(modules)
        outputs[backend] = logits(model)
    assert torch.allclose(outputs["eager"], outputs["flex_attention"], atol=1e-5)


def test_deberta_inducer_finetune_reloads_to_its_metrics(sst2_dir, tmp_path):
    """DeBERTa-v2's patched attention through the whole recipe: train, save, reload."""
    import json

    from adaptlab.models import load_model
    from adaptlab.models.tiny import tiny_tokenizer
    from tests.conftest import load_script
    from tests.test_fewshot_finetune import fewshot_args

    folder = tmp_path / "deberta"
    tokenizer = tiny_tokenizer()
    model = build("deberta")
    model.config.vocab_size = len(tokenizer)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "run"
    load_script("finetune").main(fewshot_args(folder, sst2_dir, out, "--method", "inducer",
                                              "--prefix_length", "3", "--prefix_dim", "4",
                                              "--optimizer", "adamw", "--lr", "0.01",
                                              "--best_ties", "last"))  # fmt: skip
    result = json.loads((out / "result.json").read_text())
    tuned = load_model(out / "final")
    assert type(tuned).__name__ == "DebertaV2ForMaskedLM"
    assert any(n.endswith("adaptlab_inducer.value_up.weight") for n, _ in tuned.named_parameters())
    from adaptlab.data import encode_examples, label_word_ids, load_task
    from tests.test_fewshot_finetune import label_word_scores

    splits = load_task("sst-2", sst2_dir, k=8, seed=42)
    encoded = encode_examples(splits.test, task=splits.task, tokenizer=tokenizer, kind="masked")
    scores = label_word_scores(tuned, encoded, tokenizer, label_word_ids(splits.task, tokenizer))
    labels = torch.tensor([ex["label"] for ex in encoded])
    loss = float(torch.nn.functional.cross_entropy(scores, labels))
    assert result["metrics"]["test_final"]["loss"] == pytest.approx(loss, rel=1e-5)


def test_flash_attention_masks_take_the_sdpa_path_for_extra_keys():
    """flash-attention 2 hands the attention function a [B, S] padding mask (or None); the
    prefix/inducer path reads it as causal + padding and runs SDPA, so the result equals the
    eager path's with its 4-D additive mask. (flash-attn itself is not installed here: the
    path with extra keys never calls it.)"""
    from adaptlab.adapters.attention import _make_function
    from adaptlab.adapters.inducer import Inducer

    geo = Geometry(hidden=16, heads=2, kv_heads=2, head_dim=8)
    module = nn.Module()
    module.is_causal, module.training = True, False
    torch.manual_seed(0)
    module.add_module(
        "adaptlab_inducer", Inducer(geo, InducerConfig(prefix_length=2, prefix_dim=3))
    )
    q, k, v, padding, _, _ = _random_attention()
    q, k, v = q[:, :2], k[:, :2], v[:, :2]
    flash = _make_function("flash_attention_2")
    eager = _make_function("eager")
    additive = torch.where(allowed_keys(padding, 2, 5, 5, True, "cpu"), 0.0, -1e4)  # old style
    out_flash, _ = flash(module, q, k, v, padding, scaling=8**-0.5)
    pending_flash = module.adaptlab_inducer.take_pending()
    out_eager, _ = eager(module, q, k, v, additive, scaling=8**-0.5)
    pending_eager = module.adaptlab_inducer.take_pending()
    rows = padding.bool()  # rows with a visible key
    assert torch.allclose(out_flash[rows], out_eager[rows], atol=1e-5)
    assert torch.allclose(pending_flash[rows], pending_eager[rows], atol=1e-5)


@pytest.mark.parametrize("method", ["inducer", "prefix", "kmix"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_generation_equals_uncached(method, backend):
    """Decoding with the key/value cache (one query per step, cached keys) gives the tokens a
    full forward per step gives: the adapters see cached keys and positions as they should."""
    model = build("llama", backend)
    torch.manual_seed(1)
    if method == "prefix":
        modules = attach_prefix(model, PrefixConfig(length=3))
    else:
        modules = _attach_variant(model, method, "L0" if method == "inducer" else "QVO")
    _perturb(modules)
    model.eval()
    prompt = batch()["input_ids"][:1, :4]
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kwargs)
        uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
