"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) attached by hooks, checked by hand.

On Llama, GPT-2 and BERT, for every placement (Pfeiffer also in attention) with and without the
adapter's layer norm: at init the adapted model is the pretrained one to the bit; with random
adapter weights each hooked module's output is recomputed from plain matrix products; the
trainable count is the closed form; the new settings survive an adapter folder, and a folder
saved without them loads with the defaults; a ``--method houlsby`` few-shot run trains only the
adapters, saves them alone as an adapter folder, reloads from ``final/`` to the metrics it
logged, and resumes exactly after a kill.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from adaptlab.adapters import AdapterError, BottleneckConfig, attach_bottleneck
from adaptlab.data import encode_examples, label_word_ids, load_task
from adaptlab.models import load_model, load_tokenizer
from adaptlab.models.tiny import tiny_bert, tiny_llama
from adaptlab.training.checkpoint import trainable_tensors
from adaptlab.training.config import FinetuneConfig
from adaptlab.training.methods import METHODS, count_parameters
from adaptlab.training.optim import TrainingError
from tests.conftest import load_script
from tests.test_fewshot_finetune import fewshot_args, label_word_scores, whole_and_killed_runs

finetune = load_script("finetune")
PLACEMENTS = ["houlsby", "pfeiffer", "parallel"]
VARIANTS = {  # name: (BottleneckConfig fields, the blocks' adapter slots)
    "houlsby": ({"placement": "houlsby"}, {"attn", "ffn"}),
    "pfeiffer": ({"placement": "pfeiffer"}, {"ffn"}),
    "pfeiffer-attention": ({"placement": "pfeiffer", "location": "attention"}, {"attn"}),
    "parallel": ({"placement": "parallel"}, {"ffn"}),
}


def tiny_gpt2() -> torch.nn.Module:
    """A 2-block random GPT-2 (hidden 32, 4 heads), eval mode."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


MODELS = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}


def randomize(model: torch.nn.Module) -> None:
    """Non-zero adapter weights, so every adapter changes its module's output."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "bottleneck_" in name:
                param.normal_(std=0.3)


def adapter(h: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """up(relu(down(h))) from the adapter's matrices, h layer-normed first if it has a norm."""
    if module.norm is not None:
        mean = h.mean(-1, keepdim=True)
        var = ((h - mean) ** 2).mean(-1, keepdim=True)
        h = (h - mean) / torch.sqrt(var + module.norm.eps) * module.norm.weight + module.norm.bias
    z = torch.relu(h @ module.down.weight.T + module.down.bias)
    return z @ module.up.weight.T + module.up.bias


def attach_variant(model, variant: str, layer_norm: bool, **fields) -> None:
    config, _ = VARIANTS[variant]
    attach_bottleneck(model, BottleneckConfig(**config, layer_norm=layer_norm, **fields))


def expected_outputs(block, variant, o, ffn, x):
    """Attention output and FFN output of ``block`` by hand (scaling 2.5); its slots checked."""
    slots = {slot for slot in ("attn", "ffn") if hasattr(block, f"bottleneck_{slot}")}
    assert slots == VARIANTS[variant][1]
    expected_attn = o + adapter(o, block.bottleneck_attn) if "attn" in slots else o
    if variant == "parallel":
        expected_ffn = ffn + 2.5 * adapter(x, block.bottleneck_ffn)
    else:
        expected_ffn = ffn + adapter(ffn, block.bottleneck_ffn) if "ffn" in slots else ffn
    return expected_attn, expected_ffn


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", MODELS)
def test_adapted_model_starts_at_the_pretrained_one(family, variant, layer_norm):
    model = MODELS[family]()
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        attach_variant(model, variant, layer_norm, reduction_factor=8)
        after = model(input_ids=ids).logits
        assert torch.equal(after, before)
        randomize(model)  # and the hooks are live
        assert not torch.allclose(model(input_ids=ids).logits, before)


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_llama_hooked_modules_match_a_hand_computation(variant, layer_norm):
    model = tiny_llama().double()
    attach_variant(model, variant, layer_norm, dim=5, scaling=2.5)
    randomize(model)
    block = model.model.layers[1]
    torch.manual_seed(2)
    x = torch.randn(3, 4, 32, dtype=torch.float64)
    attn, mlp = block.self_attn.o_proj, block.mlp
    with torch.no_grad():
        o = x @ attn.weight.T
        gate = x @ mlp.gate_proj.weight.T
        ffn = (F.silu(gate) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
        expected_attn, expected_ffn = expected_outputs(block, variant, o, ffn, x)
        torch.testing.assert_close(attn(x), expected_attn, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mlp(x), expected_ffn, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpt2_hooked_modules_match_a_hand_computation(variant, layer_norm):
    """GPT-2's Conv1D computes x W + b (W: [in, out]); ``mlp`` is c_proj(gelu_tanh(c_fc(x)))."""
    model = tiny_gpt2().double()
    attach_variant(model, variant, layer_norm, dim=5, scaling=2.5)
    randomize(model)
    block = model.transformer.h[1]
    torch.manual_seed(2)
    x = torch.randn(3, 4, 32, dtype=torch.float64)  # attention heads' output, and the FFN input
    attn, mlp = block.attn.c_proj, block.mlp
    with torch.no_grad():
        o = x @ attn.weight + attn.bias
        inner = F.gelu(x @ mlp.c_fc.weight + mlp.c_fc.bias, approximate="tanh")
        ffn = inner @ mlp.c_proj.weight + mlp.c_proj.bias
        expected_attn, expected_ffn = expected_outputs(block, variant, o, ffn, x)
        torch.testing.assert_close(attn(x), expected_attn, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mlp(x), expected_ffn, rtol=1e-12, atol=1e-12)


def test_gpt2_block_adds_the_attention_adapter_before_the_residual():
    """A whole GPT-2 block with the NLG baseline's adapter (pfeiffer in attention, layer norm):
    h + a + FFN(ln_2(h + a)), a = c_proj(heads) + A(c_proj(heads)), the FFN left alone."""
    model = tiny_gpt2().double()
    attach_variant(model, "pfeiffer-attention", True, dim=5)
    randomize(model)
    block = model.transformer.h[0]
    seen = []
    block.attn.c_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    torch.manual_seed(3)
    h = torch.randn(2, 6, 32, dtype=torch.float64)
    with torch.no_grad():
        out = block(h)
        out = out[0] if isinstance(out, tuple) else out
        c_proj, mlp, ln_2 = block.attn.c_proj, block.mlp, block.ln_2
        o = seen[0] @ c_proj.weight + c_proj.bias
        a = o + adapter(o, block.bottleneck_attn)
        mid = h + a
        x = F.layer_norm(mid, (32,), ln_2.weight, ln_2.bias, ln_2.eps)
        inner = F.gelu(x @ mlp.c_fc.weight + mlp.c_fc.bias, approximate="tanh")
        expected = mid + inner @ mlp.c_proj.weight + mlp.c_proj.bias
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_bert_hooked_modules_match_a_hand_computation(variant, layer_norm):
    model = tiny_bert().double()
    attach_variant(model, variant, layer_norm, dim=5, scaling=2.5)
    randomize(model)
    block = model.bert.encoder.layer[0]
    torch.manual_seed(2)
    x = torch.randn(3, 4, 32, dtype=torch.float64)  # the FFN input (attention output)
    inter = torch.randn(3, 4, 64, dtype=torch.float64)  # the FFN's intermediate activation
    attn, out = block.attention.output.dense, block.output
    with torch.no_grad():
        o = x @ attn.weight.T + attn.bias
        ffn = inter @ out.dense.weight.T + out.dense.bias
        expected_attn, expected_ffn = expected_outputs(block, variant, o, ffn, x)
        norm = out.LayerNorm
        expected = F.layer_norm(expected_ffn + x, (32,), norm.weight, norm.bias, norm.eps)
        torch.testing.assert_close(attn(x), expected_attn, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out(inter, x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", MODELS)
def test_only_the_adapters_train_and_their_count_is_the_closed_form(family, variant, layer_norm):
    config, slots = VARIANTS[variant]
    cfg = FinetuneConfig(
        method=config["placement"],
        adapter_reduction_factor=6,
        adapter_location=config.get("location", "ffn"),
        adapter_layer_norm=layer_norm,
    )
    model = METHODS[cfg.method].prepare(MODELS[family](), cfg, 1)
    hidden, r, blocks = 32, 32 // 6, 2
    per_adapter = 2 * hidden * r + r + hidden + (2 * hidden if layer_norm else 0)
    trainable, _ = count_parameters(model)
    assert trainable == blocks * len(slots) * per_adapter
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".bottleneck_" in n for n in names)
    assert set(trainable_tensors(model)) == names  # what resume/ saves


def test_layer_norm_and_location_round_trip_and_old_folders_load(tmp_path):
    from adaptlab.adapters import bottleneck_config, load_adapter_folder, save_adapter_folder

    model = tiny_gpt2()
    attach_variant(model, "pfeiffer-attention", True, dim=3)
    randomize(model)
    adapters = {n: t for n, t in model.state_dict().items() if "bottleneck_" in n}
    assert any(n.endswith("bottleneck_attn.norm.weight") for n in adapters)
    save_adapter_folder(tmp_path / "new", model, adapters, base_model="embedded:unused")
    [entry] = json.loads((tmp_path / "new" / "adapter_config.json").read_text())[
        "adaptlab_adapters"
    ]
    assert entry["config"]["layer_norm"] is True and entry["config"]["location"] == "attention"
    reloaded = load_adapter_folder(tmp_path / "new", tiny_gpt2())
    assert bottleneck_config(reloaded) == bottleneck_config(model)
    ids = torch.randint(3, 200, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)

    # a folder written before layer_norm and location existed: the defaults
    old = tiny_llama()
    attach_bottleneck(old, BottleneckConfig(placement="pfeiffer", dim=2))
    adapters = {n: t for n, t in old.state_dict().items() if "bottleneck_" in n}
    save_adapter_folder(tmp_path / "old", old, adapters, base_model="embedded:unused")
    path = tmp_path / "old" / "adapter_config.json"
    data = json.loads(path.read_text())
    for key in ("layer_norm", "location"):
        del data["adaptlab_adapters"][0]["config"][key]
    path.write_text(json.dumps(data))
    loaded = bottleneck_config(load_adapter_folder(tmp_path / "old", tiny_llama()))
    assert loaded == BottleneckConfig(placement="pfeiffer", dim=2)
    assert (loaded.layer_norm, loaded.location) == (False, "ffn")


def tiny_opt(vocab_size: int = 64) -> torch.nn.Module:
    """A 1-block OPT: a block layout (``self_attn.out_proj``, ``fc1``/``fc2``) of none of the
    supported families."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                       num_attention_heads=2, word_embed_proj_dim=32)  # fmt: skip
    return OPTForCausalLM(config)


def test_unsupported_architecture_and_bad_settings_fail_in_one_sentence():
    with pytest.raises(AdapterError, match=r"support Llama, GPT-2 and BERT/RoBERTa models only"):
        attach_bottleneck(tiny_opt(), BottleneckConfig())
    with pytest.raises(AdapterError, match=r"leaves a bottleneck of 0 for hidden size 32"):
        attach_bottleneck(tiny_llama(), BottleneckConfig(reduction_factor=64))
    with pytest.raises(AdapterError, match=r"adapter_reduction_factor=0.0 must be a number > 0"):
        BottleneckConfig(reduction_factor=0.0)
    with pytest.raises(TrainingError, match=r"adapter_reduction_factor=-2.0 must be a number > 0"):
        FinetuneConfig(method="houlsby", adapter_reduction_factor=-2.0)
    with pytest.raises(TrainingError, match=r"adapter_dim=0 must be at least 1"):
        FinetuneConfig(method="houlsby", adapter_dim=0)
    with pytest.raises(AdapterError, match=r"adapter_location='attention' applies to pfeiffer"):
        BottleneckConfig(placement="parallel", location="attention")
    with pytest.raises(AdapterError, match=r"Unknown adapter location 'mlp'; choose from ffn"):
        BottleneckConfig(placement="pfeiffer", location="mlp")
    with pytest.raises(TrainingError, match=r"applies to method=pfeiffer only; drop it for met"):
        FinetuneConfig(method="mam", adapter_location="attention")


def test_houlsby_run_on_opt_fails_before_loading(tmp_path, sst2_dir, capsys):
    from adaptlab.models.tiny import tiny_tokenizer

    folder = tmp_path / "opt"
    tok = tiny_tokenizer()
    tiny_opt(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    with pytest.raises(SystemExit):
        finetune.main(fewshot_args(folder, sst2_dir, tmp_path / "run", "--method", "houlsby"))
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "support Llama, GPT-2 and BERT/RoBERTa models only" in message
    assert not (tmp_path / "run" / "final").exists()


def test_houlsby_fewshot_run_trains_adapters_and_final_reloads(tiny_model_dir, sst2_dir, tmp_path):
    out = tmp_path / "run"
    finetune.main(fewshot_args(tiny_model_dir, sst2_dir, out, "--method", "houlsby",
                               "--adapter_reduction_factor", "8"))  # fmt: skip
    result = json.loads((out / "result.json").read_text())
    final = out / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADAPTLAB"
    [entry] = config["adaptlab_adapters"]
    assert entry["method"] == "houlsby" and entry["config"]["reduction_factor"] == 8
    saved = safe_open(final / "adapter_model.safetensors", "pt").keys()
    assert saved and all(".bottleneck_" in key for key in saved)  # the adapters only
    assert not (final / "model.safetensors").exists()

    tuned = load_model(final)  # the base, with the trained adapters attached
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for name, value in base.state_dict().items():
        assert torch.equal(tuned.state_dict()[name], value), name  # the base stayed frozen
    ups = [p for n, p in tuned.named_parameters() if n.endswith("bottleneck_ffn.up.weight")]
    assert len(ups) == 2 and all(p.abs().max() > 0 for p in ups)  # the adapters trained

    tokenizer = load_tokenizer(str(tiny_model_dir))
    splits = load_task("sst-2", sst2_dir, k=8, seed=42)
    ids = label_word_ids(splits.task, tokenizer)
    for split, examples in (("final", splits.dev), ("test_final", splits.test)):
        encoded = encode_examples(examples, task=splits.task, tokenizer=tokenizer, kind="causal")
        logits = label_word_scores(tuned, encoded, tokenizer, ids)
        labels = torch.tensor([ex["label"] for ex in encoded])
        metrics = result["metrics"][split]
        assert metrics["loss"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)
        accuracy = float((logits.argmax(1) == labels).double().mean())
        assert metrics["accuracy"] == pytest.approx(accuracy)


def test_gpt2_pfeiffer_attention_run_trains_adapters_and_final_reloads(sst2_dir, tmp_path):
    """The NLG baseline's adapter (in attention, layer norm before) through finetune on GPT-2."""
    from adaptlab.models.tiny import tiny_tokenizer

    folder, out = tmp_path / "gpt2", tmp_path / "run"
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4,
                               n_positions=256)).save_pretrained(folder)  # fmt: skip
    tok.save_pretrained(folder)
    finetune.main(fewshot_args(folder, sst2_dir, out, "--method", "pfeiffer",
                               "--adapter_location", "attention", "--adapter_layer_norm", "true",
                               "--adapter_dim", "4"))  # fmt: skip
    result = json.loads((out / "result.json").read_text())
    [entry] = json.loads((out / "final" / "adapter_config.json").read_text())["adaptlab_adapters"]
    assert entry["config"]["location"] == "attention" and entry["config"]["layer_norm"]
    saved = safe_open(out / "final" / "adapter_model.safetensors", "pt").keys()
    assert len(saved) == 2 * 6  # 2 blocks x (norm, down, up) x (weight, bias), in attention
    assert all(".bottleneck_attn." in key for key in saved)

    tuned = load_model(out / "final")
    ups = [p for n, p in tuned.named_parameters() if n.endswith("bottleneck_attn.up.weight")]
    assert len(ups) == 2 and all(p.abs().max() > 0 for p in ups)  # the adapters trained
    tokenizer = load_tokenizer(str(folder))
    splits = load_task("sst-2", sst2_dir, k=8, seed=42)
    ids = label_word_ids(splits.task, tokenizer)
    encoded = encode_examples(splits.test, task=splits.task, tokenizer=tokenizer, kind="causal")
    logits = label_word_scores(tuned, encoded, tokenizer, ids)
    labels = torch.tensor([ex["label"] for ex in encoded])
    loss = float(F.cross_entropy(logits, labels))
    assert result["metrics"]["test_final"]["loss"] == pytest.approx(loss, rel=1e-5)


def test_killed_pfeiffer_run_resumes_exactly(
    tiny_bert_dir, sst2_dir, tmp_path, monkeypatch, capsys
):
    from safetensors.torch import load_file

    extra = ("--method", "pfeiffer", "--max_steps", "4", "--save_state_every", "1")
    whole, killed = whole_and_killed_runs(tiny_bert_dir, sst2_dir, tmp_path, extra, monkeypatch,
                                          capsys)  # fmt: skip
    a = load_file(whole / "final" / "adapter_model.safetensors")
    b = load_file(killed / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 2 * 4  # 2 blocks x (down, up) x (weight, bias)
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=0, atol=1e-6)


def test_grafting_refuses_a_bottleneck_folder(tmp_path):
    from adaptlab.adapters import save_adapter_folder
    from adaptlab.graft.errors import GraftError
    from adaptlab.graft.source import resolve_finetuned

    model = tiny_llama()
    attach_bottleneck(model, BottleneckConfig(placement="pfeiffer", dim=2))
    adapters = {n: p for n, p in model.state_dict().items() if "bottleneck_" in n}
    save_adapter_folder(tmp_path / "adapter", model, adapters, base_model="embedded:unused")
    with pytest.raises(GraftError, match=r"holds adaptlab adapters \(e.g. bottleneck\)"):
        resolve_finetuned(tmp_path / "adapter")
