"""adaptlab's adapter folders (peft_type ADAPTLAB): layout, exact reload, refusals.

A model with random bottleneck adapters is saved as a folder and reloaded through
``load_model`` on its recorded base; the logits equal the in-memory model's. A folder whose
tensors do not fit, or one loaded on another base, is one sentence.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from adaptlab.adapters import (
    AdapterError,
    BottleneckConfig,
    attach_bottleneck,
    is_adaptlab_folder,
    load_adapter_folder,
    save_adapter_folder,
)
from adaptlab.models import check_weights, load_model, resolve_model
from adaptlab.models.tiny import tiny_bert, tiny_llama

PLACEMENTS = ["houlsby", "pfeiffer", "parallel"]
MODELS = {"llama": tiny_llama, "bert": tiny_bert}


def adapted(family: str, placement: str, base_dir) -> torch.nn.Module:
    """The base saved to ``base_dir``, then random adapters attached (so they change outputs)."""
    torch.manual_seed(0)
    model = MODELS[family]().eval()
    model.save_pretrained(base_dir)
    attach_bottleneck(model, BottleneckConfig(placement=placement, dim=3, scaling=1.5))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "bottleneck_" in name:
                param.normal_(std=0.3)
    return model


def adapter_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t for n, t in model.state_dict().items() if "bottleneck_" in n}


def saved_folder(tmp_path, family="llama", placement="houlsby"):
    model = adapted(family, placement, tmp_path / "base")
    folder = tmp_path / "adapter"
    save_adapter_folder(folder, model, adapter_tensors(model), str(tmp_path / "base"))
    return model, folder


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("family", MODELS)
def test_round_trip_gives_the_in_memory_logits(family, placement, tmp_path):
    model, folder = saved_folder(tmp_path, family, placement)
    reloaded = load_model(folder)  # resolves the recorded base, attaches, loads
    ids = torch.randint(5, 200, (2, 9))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        base = load_model(tmp_path / "base")(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(base, expected)  # the adapters matter


def test_folder_layout(tmp_path):
    model, folder = saved_folder(tmp_path, placement="pfeiffer")
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors",
    ]  # fmt: skip
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADAPTLAB" and config["adaptlab_format"] == 1
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    assert config["adaptlab_adapters"] == [
        {"method": "pfeiffer", "config": {"placement": "pfeiffer", "reduction_factor": 16.0,
                                          "dim": 3, "activation": "relu", "scaling": 1.5,
                                          "layer_norm": False, "location": "ffn"}},
    ]  # fmt: skip
    assert config["base_model_fingerprint"] == {
        "architecture": "LlamaForCausalLM", "model_type": "llama", "hidden_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": model.config.vocab_size,
    }  # fmt: skip
    saved = load_file(folder / "adapter_model.safetensors")
    assert saved.keys() == adapter_tensors(model).keys()  # 2 blocks x (down, up) x (w, b)
    assert len(saved) == 8 and is_adaptlab_folder(folder)
    assert not is_adaptlab_folder(tmp_path / "base")
    ref = resolve_model(folder)
    assert ref.adapters == [str(folder)] and ref.root.path == str(tmp_path / "base")
    files = check_weights(ref)
    assert [p.name for p in files] == ["model.safetensors", "adapter_model.safetensors"]


def rewrite(folder, change) -> None:
    tensors = load_file(folder / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, folder / "adapter_model.safetensors")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.pop("model.layers.1.bottleneck_ffn.up.bias"),
         r"does not fit the adapted LlamaForCausalLM \(no 'model.layers.1.bottleneck_ffn.up"),
        (lambda t: t.update({"model.layers.2.bottleneck_ffn.up.bias": torch.zeros(32)}),
         r"\(an unknown 'model.layers.2.bottleneck_ffn.up.bias'\)"),
        (lambda t: t.update({"model.layers.0.bottleneck_ffn.up.bias": torch.zeros(31)}),
         r"holds 'model.layers.0.bottleneck_ffn.up.bias' of shape \[31\] where the model has"),
    ],
)  # fmt: skip
def test_tensors_that_do_not_fit_are_one_sentence(change, message, tmp_path):
    _, folder = saved_folder(tmp_path)
    rewrite(folder, change)
    with pytest.raises(AdapterError, match=message):
        load_model(folder)


def test_unknown_kind_and_plain_folder_are_one_sentence(tmp_path):
    _, folder = saved_folder(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["adaptlab_adapters"][0]["method"] = "inducer-v9"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=r"holds 'inducer-v9' adapters, which this adaptlab"):
        load_model(folder)
    with pytest.raises(AdapterError, match=r"is not an adaptlab adapter folder"):
        load_adapter_folder(tmp_path / "base", tiny_llama())


def test_another_base_is_refused_before_loading(tmp_path):
    _, folder = saved_folder(tmp_path)
    wide = tmp_path / "wide"
    tiny_llama(hidden_size=48).save_pretrained(wide)
    trained_on = rf"were trained on {tmp_path / 'base'} \(hidden_size 32, this model has 48\)"
    with pytest.raises(AdapterError, match=trained_on + r"; load them on that model\."):
        check_weights(wide, adapter=str(folder))  # what the scripts run before any loading
    with pytest.raises(AdapterError, match=trained_on):
        load_model(wide, adapter=str(folder))
    with pytest.raises(AdapterError, match=trained_on):
        load_adapter_folder(folder, tiny_llama(hidden_size=48))


def test_a_chain_with_a_peft_adapter_and_quantization_are_refused(tmp_path):
    _, folder = saved_folder(tmp_path)
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(folder)})
    )
    with pytest.raises(ValueError, match=r"cannot be stacked with other adapters \(2 in this"):
        load_model(lora)
    with pytest.raises(ValueError, match=r"load on full-precision weights; drop quantization"):
        load_model(folder, quantization="4bit")


def test_the_old_whole_model_layout_is_refused(tmp_path):
    old = tmp_path / "best"
    tiny_llama().save_pretrained(old)
    (old / "bottleneck_config.json").write_text("{}")
    with pytest.raises(AdapterError, match=r"old layout .* run its fine-tuning again"):
        resolve_model(old)


# ---------------------------------------------------------------------------------------------
# A houlsby run's best/ folder as --model of the extraction and kernel scripts


@pytest.fixture(scope="module")
def houlsby_best(tiny_model_dir, sst2_dir, tmp_path_factory):
    from tests.test_fewshot_finetune import fewshot_args, finetune

    out = tmp_path_factory.mktemp("houlsby") / "run"
    # ties=last: best/ holds the trained adapters, not step 0's (the same dev accuracy, A = 0)
    finetune.main(fewshot_args(tiny_model_dir, sst2_dir, out, "--method", "houlsby",
                               "--adapter_reduction_factor", "8", "--max_steps", "2",
                               "--best_ties", "last"))  # fmt: skip
    assert is_adaptlab_folder(out / "best")
    assert json.loads((out / "best" / "adaptlab_checkpoint.json").read_text())["step"] == 2
    return out / "best"


def test_extraction_of_a_houlsby_folder(houlsby_best, tiny_model_dir, mmlu_file, tmp_path):
    import shutil

    from tests.test_extract_script import args_for, arrays, extract_repr

    zero = tmp_path / "zero"  # the same adapters with up = 0: A(h) = 0, the base model exactly
    shutil.copytree(houlsby_best, zero)
    rewrite(zero, lambda t: t.update({n: torch.zeros_like(v) for n, v in t.items() if ".up." in n}))
    outputs = {}
    for name, model in (("base", tiny_model_dir), ("tuned", houlsby_best), ("zero", zero)):
        extract_repr.main(args_for(model, mmlu_file, tmp_path / "out" / name))
        outputs[name] = arrays(tmp_path / "out" / name)
    base, tuned = outputs["base"], outputs["tuned"]
    for file, value in base.items():
        assert torch.equal(outputs["zero"][file], value), file
    # block 0's input norm comes before any adapter; every later output passes one
    assert torch.equal(tuned["norm1/l0.safetensors"], base["norm1/l0.safetensors"])
    for file in ("block/l0.safetensors", "block/l1.safetensors", "logits/l3.safetensors"):
        assert (tuned[file] - base[file]).abs().max() > 1e-4, file
    manifest = json.loads((tmp_path / "out" / "tuned" / "manifest.json").read_text())
    assert manifest["model"]["adapter_path"] == str(houlsby_best)


def test_kernel_of_a_houlsby_folder(houlsby_best, tiny_model_dir, sst2_dir, tmp_path):
    from tests.test_compute_kernel import compute_kernel, kernel_args

    compute_kernel.main(kernel_args(houlsby_best, sst2_dir, tmp_path / "kernel"))
    folder = tmp_path / "kernel" / "8-42"
    kernel, _ = torch.load(folder / "train_kernels_SST-2.pt", weights_only=True)
    assert kernel.shape == (16, 2, 16, 2) and torch.isfinite(kernel).all()
    manifest = json.loads((folder / "manifest.json").read_text())
    base = sum(p.numel() for p in load_model(tiny_model_dir).parameters())
    hidden, r, blocks = 32, 32 // 8, 2
    adapters = blocks * 2 * (2 * hidden * r + r + hidden)  # houlsby: 2 adapters per block
    assert manifest["grad_dim"] == base + adapters  # the kernel's gradients include them
