"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) attached by hooks, checked by hand.

At init the adapted model is the pretrained one to the bit; with random adapter weights each
hooked module's output is recomputed from plain matrix products; the trainable count is the
closed form; a ``--method houlsby`` few-shot run trains only the adapters, saves them alone as an
adapter folder, reloads from ``final/`` to the metrics it logged, and resumes exactly after a
kill.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from adaptlab.adapters import AdapterError, BottleneckConfig, attach_bottleneck
from adaptlab.data import encode_examples, label_word_ids, load_task
from adaptlab.models import load_model, load_tokenizer
from adaptlab.models.tiny import tiny_bert, tiny_llama
from adaptlab.training.checkpoint import trainable_tensors
from adaptlab.training.config import FinetuneConfig
from adaptlab.training.methods import METHODS, count_parameters
from adaptlab.training.optim import TrainingError
from tests.conftest import load_script
from tests.test_fewshot_finetune import fewshot_args, label_word_scores

finetune = load_script("finetune")
PLACEMENTS = ["houlsby", "pfeiffer", "parallel"]
MODELS = {"llama": tiny_llama, "bert": tiny_bert}


def randomize(model: torch.nn.Module) -> None:
    """Non-zero adapter weights, so every adapter changes its module's output."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "bottleneck_" in name:
                param.normal_(std=0.3)


def adapter(h: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """up(relu(down(h))) from the adapter's matrices."""
    z = torch.relu(h @ module.down.weight.T + module.down.bias)
    return z @ module.up.weight.T + module.up.bias


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("family", MODELS)
def test_adapted_model_starts_at_the_pretrained_one(family, placement):
    model = MODELS[family]()
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        attach_bottleneck(model, BottleneckConfig(placement=placement, reduction_factor=8))
        after = model(input_ids=ids).logits
        assert torch.equal(after, before)
        randomize(model)  # and the hooks are live
        assert not torch.allclose(model(input_ids=ids).logits, before)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_llama_hooked_modules_match_a_hand_computation(placement):
    model = tiny_llama().double()
    attach_bottleneck(model, BottleneckConfig(placement=placement, dim=5, scaling=2.5))
    randomize(model)
    block = model.model.layers[1]
    torch.manual_seed(2)
    x = torch.randn(3, 4, 32, dtype=torch.float64)
    attn, mlp = block.self_attn.o_proj, block.mlp
    with torch.no_grad():
        o = x @ attn.weight.T
        gate = x @ mlp.gate_proj.weight.T
        ffn = (F.silu(gate) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
        if placement == "houlsby":
            expected_attn = o + adapter(o, block.bottleneck_attn)
        else:
            expected_attn = o
            assert not hasattr(block, "bottleneck_attn")
        if placement == "parallel":
            expected_ffn = ffn + 2.5 * adapter(x, block.bottleneck_ffn)
        else:
            expected_ffn = ffn + adapter(ffn, block.bottleneck_ffn)
        torch.testing.assert_close(attn(x), expected_attn, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mlp(x), expected_ffn, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_bert_hooked_modules_match_a_hand_computation(placement):
    model = tiny_bert().double()
    attach_bottleneck(model, BottleneckConfig(placement=placement, dim=5, scaling=2.5))
    randomize(model)
    block = model.bert.encoder.layer[0]
    torch.manual_seed(2)
    x = torch.randn(3, 4, 32, dtype=torch.float64)  # the FFN input (attention output)
    inter = torch.randn(3, 4, 64, dtype=torch.float64)  # the FFN's intermediate activation
    attn, out = block.attention.output.dense, block.output
    with torch.no_grad():
        o = x @ attn.weight.T + attn.bias
        ffn = inter @ out.dense.weight.T + out.dense.bias
        expected_attn = o + adapter(o, block.bottleneck_attn) if placement == "houlsby" else o
        if placement == "parallel":
            total = ffn + 2.5 * adapter(x, block.bottleneck_ffn) + x
        else:
            total = ffn + adapter(ffn, block.bottleneck_ffn) + x
        norm = out.LayerNorm
        expected = F.layer_norm(total, (32,), norm.weight, norm.bias, norm.eps)
        torch.testing.assert_close(attn(x), expected_attn, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out(inter, x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("family", MODELS)
def test_only_the_adapters_train_and_their_count_is_the_closed_form(family, placement):
    cfg = FinetuneConfig(method=placement, adapter_reduction_factor=6)
    model = METHODS[placement].prepare(MODELS[family](), cfg, 1)
    hidden, r, blocks = 32, 32 // 6, 2
    per_block = (2 if placement == "houlsby" else 1) * (2 * hidden * r + r + hidden)
    trainable, _ = count_parameters(model)
    assert trainable == blocks * per_block
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".bottleneck_" in n for n in names)
    assert set(trainable_tensors(model)) == names  # what resume/ saves


def test_unsupported_architecture_and_bad_widths_fail_in_one_sentence():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(AdapterError, match=r"support Llama and BERT/RoBERTa models only"):
        attach_bottleneck(gpt2, BottleneckConfig())
    with pytest.raises(AdapterError, match=r"leaves a bottleneck of 0 for hidden size 32"):
        attach_bottleneck(tiny_llama(), BottleneckConfig(reduction_factor=64))
    with pytest.raises(AdapterError, match=r"adapter_reduction_factor=0.0 must be a number > 0"):
        BottleneckConfig(reduction_factor=0.0)
    with pytest.raises(TrainingError, match=r"adapter_reduction_factor=-2.0 must be a number > 0"):
        FinetuneConfig(method="houlsby", adapter_reduction_factor=-2.0)
    with pytest.raises(TrainingError, match=r"adapter_dim=0 must be at least 1"):
        FinetuneConfig(method="houlsby", adapter_dim=0)


def test_houlsby_run_on_gpt2_fails_before_loading(tmp_path, sst2_dir, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from adaptlab.models.tiny import tiny_tokenizer

    folder = tmp_path / "gpt2"
    tok = tiny_tokenizer()
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok))
    GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    with pytest.raises(SystemExit):
        finetune.main(fewshot_args(folder, sst2_dir, tmp_path / "run", "--method", "houlsby"))
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "support Llama and BERT/RoBERTa models only" in message
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


def test_killed_pfeiffer_run_resumes_exactly(
    tiny_bert_dir, sst2_dir, tmp_path, monkeypatch, capsys
):
    from safetensors.torch import load_file

    extra = ("--method", "pfeiffer", "--max_steps", "4", "--save_state_every", "1")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    finetune.main(fewshot_args(tiny_bert_dir, sst2_dir, whole, *extra))
    step = finetune.train_step

    def killed_at_step_3(*args, **kwargs):
        if args[7] == 3:
            raise KeyboardInterrupt("killed")
        return step(*args, **kwargs)

    monkeypatch.setattr(finetune, "train_step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(fewshot_args(tiny_bert_dir, sst2_dir, killed, *extra))
    monkeypatch.setattr(finetune, "train_step", step)
    capsys.readouterr()
    finetune.main(fewshot_args(tiny_bert_dir, sst2_dir, killed, *extra))
    assert "resumed at step 2" in capsys.readouterr().out
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
