"""Tests for adaptlab.models.loader, on tiny random models only (offline, a few seconds)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from adaptlab.assets import sha256_file
from adaptlab.models import (
    ModelNotFoundError,
    ModelRef,
    describe_model,
    load_model,
    load_tokenizer,
    loader,
    pick_attn_implementation,
    pick_dtype,
    refs,
    resolve_model,
)
from adaptlab.models.tiny import save_tiny_llama, tiny_bert, tiny_llama, tiny_tokenizer

TEXTS = ["Answer: A", "The following are multiple choice questions (with answers) about"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_llama(str(path))
    return path


@pytest.fixture(scope="module")
def adapter(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A LoRA adapter on the tiny Llama with non-zero B matrices, and its in-memory logits."""
    from peft import LoraConfig, get_peft_model

    base = load_model(tiny_dir)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    peft_model.eval()
    batch = _batch(tiny_dir)
    with torch.no_grad():
        logits = peft_model(**batch).logits
    path = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(path)
    return path, logits


def _batch(model_dir: Path) -> dict[str, torch.Tensor]:
    return dict(load_tokenizer(model_dir)(TEXTS, return_tensors="pt", padding=True))


def _reference_logits(batch: dict[str, torch.Tensor], **kwargs: int) -> torch.Tensor:
    model = tiny_llama(vocab_size=len(tiny_tokenizer()), **kwargs)
    with torch.no_grad():
        return model(**batch).logits


# --- resolution -------------------------------------------------------------------------------


def test_resolve_local_folder(tiny_dir: Path) -> None:
    ref = resolve_model(str(tiny_dir))
    assert ref == ModelRef(name=str(tiny_dir), path=str(tiny_dir.resolve()), source="local")
    assert not ref.is_adapter and ref.root is ref and ref.adapters == []


def test_resolve_embedded_without_materializing_is_instant() -> None:
    ref = resolve_model("embedded:smollm2-135m", materialize=False)
    assert (ref.source, ref.path) == ("embedded", None)
    assert resolve_model("embedded:minilm-l6", materialize=False).source == "embedded"


def test_the_default_model_is_described_as_what_it_is() -> None:
    """Manifests say the default is a 4-bit GGUF of the instruct model, not the base model."""
    from adaptlab.assets import ASSETS

    described = describe_model(resolve_model("embedded:smollm2-135m", materialize=False))
    text = described["description"]
    assert "SmolLM2-135M-Instruct" in text and "Q4_1" in text and "4-bit" in text
    assert "HuggingFaceTB/SmolLM2-135M" in text
    assert ASSETS["smollm2-135m"].member.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("embedded:gpt5", "valid names are embedded:smollm2-135m, embedded:minilm-l6"),
        ("./no/such/model", "neither a local folder nor a model name on the hub"),
        ("/no/such/model", "neither a local folder nor a model name on the hub"),
        ("org/name/extra", "neither a local folder nor a model name on the hub"),
        ("bad name!", "neither a local folder nor a model name on the hub"),
        ("", "empty model name"),
    ],
)
def test_bad_names_raise(name: str, message: str) -> None:
    with pytest.raises(ModelNotFoundError, match=message) as info:
        resolve_model(name, materialize=False)
    assert isinstance(info.value, ValueError)


def test_folder_without_config_and_plain_file_raise(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="neither config.json nor adapter_config.json"):
        resolve_model(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="is a file, not a model folder"):
        resolve_model(weights)


def _fake_hub_cache(root: Path, repo_id: str, commit: str, filename: str = "config.json") -> None:
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / filename).write_text("{}")


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_id_offline_must_be_cached(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        resolve_model("adaptlab-tests/not-cached")
    _fake_hub_cache(hub_cache, "adaptlab-tests/cached", "0123abcd")
    ref = resolve_model("adaptlab-tests/cached")
    assert (ref.source, ref.path) == ("hub", "adaptlab-tests/cached")
    assert describe_model(ref)["revision"] == "0123abcd"


def test_hub_id_online_resolves_without_network(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(refs, "hub_reachable", lambda: True)
    ref = resolve_model("HuggingFaceTB/SmolLM2-135M")
    assert (ref.source, ref.adapter_path) == ("hub", None)
    assert describe_model(ref)["revision"] is None


def test_an_unreachable_hub_is_reported_at_once(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing listens on loopback port 9: the probe fails fast, and the name is reported."""
    import time

    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    started = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="'someone/model' is not in the local .* cannot"):
        resolve_model("someone/model")
    assert time.monotonic() - started < 10
    _fake_hub_cache(hub_cache, "someone/cached", "0123abcd")
    assert resolve_model("someone/cached").source == "hub"  # a cached model needs no hub


# --- dtype and attention ----------------------------------------------------------------------


def test_pick_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    assert pick_dtype() == torch.float32
    assert pick_dtype("auto", "cpu") == torch.float32
    assert pick_dtype("bf16") == pick_dtype("bfloat16") == pick_dtype("torch.bfloat16")
    assert pick_dtype("fp16") == pick_dtype(torch.float16) == torch.float16
    assert pick_dtype("FP32", "cuda") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert pick_dtype("auto", "cuda:0") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert pick_dtype("auto", "cuda") == torch.float32
    with pytest.raises(ValueError, match="Unknown dtype"):
        pick_dtype("int8")
    with pytest.raises(ValueError, match="Unsupported dtype"):
        pick_dtype(torch.int8)


def test_pick_attn_implementation(monkeypatch: pytest.MonkeyPatch) -> None:
    assert pick_attn_implementation() == "sdpa"
    assert pick_attn_implementation("auto", "cpu", "bf16") == "sdpa"
    assert pick_attn_implementation("eager") == "eager"
    assert pick_attn_implementation("SDPA") == "sdpa"
    with pytest.raises(ValueError, match="Unknown attention implementation"):
        pick_attn_implementation("flash")
    monkeypatch.setattr(loader, "_flash_attn_available", lambda: False)
    with pytest.raises(ValueError, match="needs the flash-attn package"):
        pick_attn_implementation("flash_attention_2", "cuda", "bf16")
    assert pick_attn_implementation("auto", "cuda", "bf16") == "sdpa"
    monkeypatch.setattr(loader, "_flash_attn_available", lambda: True)
    assert pick_attn_implementation("auto", "cuda", "bf16") == "flash_attention_2"
    assert pick_attn_implementation("auto", "cuda", "fp32") == "sdpa"
    assert pick_attn_implementation("auto", "cpu", "bf16") == "sdpa"
    assert pick_attn_implementation("flash_attention_2", "cuda:0", "fp16") == "flash_attention_2"
    with pytest.raises(ValueError, match="only on CUDA"):
        pick_attn_implementation("flash_attention_2", "cpu", "bf16")
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        pick_attn_implementation("flash_attention_2", "cuda", "fp32")


# --- loading ----------------------------------------------------------------------------------


def test_load_model_matches_in_memory_model(tiny_dir: Path) -> None:
    model = load_model(str(tiny_dir))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    batch = _batch(tiny_dir)
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.equal(logits, _reference_logits(batch))


def test_load_model_dtype_attn_and_kind(tiny_dir: Path, tmp_path: Path) -> None:
    model = load_model(resolve_model(tiny_dir), dtype="bf16", attn_implementation="eager")
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    assert type(load_model(tiny_dir, kind="encoder")).__name__ == "LlamaModel"

    tiny_bert(vocab_size=len(tiny_tokenizer())).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    assert type(load_model(tmp_path)).__name__ == "BertForMaskedLM"
    assert type(load_model(tmp_path, kind="encoder")).__name__ == "BertModel"

    with pytest.raises(ValueError, match="Unknown model kind"):
        load_model(tiny_dir, kind="seq2seq")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unknown quantization"):
        load_model(tiny_dir, quantization="2bit")  # type: ignore[arg-type]


def test_load_tokenizer(tiny_dir: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(tiny_dir)
    assert (tok.padding_side, tok.pad_token, tok.adaptlab_pad_from_eos) == ("right", "<pad>", False)
    assert load_tokenizer(tiny_dir, padding_side="left").padding_side == "left"
    with pytest.raises(ValueError, match="padding_side must be"):
        load_tokenizer(tiny_dir, padding_side="middle")  # type: ignore[arg-type]

    no_pad = tiny_tokenizer()
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    tok = load_tokenizer(tmp_path)
    assert tok.pad_token == tok.eos_token == "</s>"
    assert tok.adaptlab_pad_from_eos is True


def test_describe_local_model(tiny_dir: Path) -> None:
    info = describe_model(tiny_dir)
    digest = sha256_file(tiny_dir / "model.safetensors")
    assert info["source"] == "local"
    assert info["revision"] == digest
    assert info["weights_sha256"] == {"model.safetensors": digest}
    assert info["adapter_path"] is None
    json.dumps(info)


# --- adapters ---------------------------------------------------------------------------------


def test_adapter_folder_resolves_and_loads(
    adapter: tuple[Path, torch.Tensor], tiny_dir: Path
) -> None:
    from peft import PeftModel

    path, expected = adapter
    ref = resolve_model(path)
    assert ref.is_adapter and ref.adapter_path == str(path.resolve())
    assert ref.base == resolve_model(tiny_dir.resolve())
    assert ref.adapters == [str(path.resolve())]

    batch = _batch(tiny_dir)
    for model in (load_model(path), load_model(tiny_dir, adapter=str(path))):
        assert isinstance(model, PeftModel)
        assert not model.training
        with torch.no_grad():
            logits = model(**batch).logits
        assert torch.equal(logits, expected)
        assert not torch.equal(logits, _reference_logits(batch))

    assert load_tokenizer(path).pad_token == "<pad>"
    info = describe_model(path)
    assert info["adapter_path"] == str(path.resolve())
    assert info["revision"] == sha256_file(path / "adapter_model.safetensors")
    assert info["base"]["path"] == str(tiny_dir.resolve())


def test_adapter_errors(
    adapter: tuple[Path, torch.Tensor],
    tiny_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, _ = adapter
    with pytest.raises(ValueError, match="already an adapter or graft folder"):
        load_model(path, adapter=str(path))
    with pytest.raises(ModelNotFoundError, match="has no adapter_config.json"):
        load_model(tiny_dir, adapter=str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="neither a local folder nor a name on the hub"):
        load_model(tiny_dir, adapter="./missing-adapter")

    def write_adapter(folder: Path, base: str | None) -> Path:
        folder.mkdir()
        config = json.loads((path / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base
        (folder / "adapter_config.json").write_text(json.dumps(config))
        return folder

    on_embedded = write_adapter(tmp_path / "on_embedded", "embedded:smollm2-135m")
    ref = resolve_model(on_embedded, materialize=False)
    assert (ref.base.source, ref.base.name) == ("embedded", "embedded:smollm2-135m")
    assert describe_model(ref)["base"]["source"] == "embedded"

    beside = write_adapter(tmp_path / "beside", "../tiny")
    (tmp_path / "tiny").symlink_to(tiny_dir, target_is_directory=True)
    monkeypatch.chdir(path)  # "../tiny" does not exist from here, only beside the adapter
    assert resolve_model(beside).base.path == str(tiny_dir.resolve())

    with pytest.raises(ModelNotFoundError, match="does not name its base model"):
        resolve_model(write_adapter(tmp_path / "no_base", None))
    with pytest.raises(ModelNotFoundError, match="neither a local folder"):
        resolve_model(write_adapter(tmp_path / "lost_base", "/no/such/base"))
    loop = write_adapter(tmp_path / "loop", str(tmp_path / "loop"))
    with pytest.raises(ModelNotFoundError, match="loops"):
        resolve_model(loop)


# --- quantization -----------------------------------------------------------------------------


def test_quantization_needs_bitsandbytes(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match="needs the bitsandbytes package"):
        load_model(tiny_dir, quantization="4bit")


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_tiny_llama_on_cpu(
    quantization: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pytest.importorskip("bitsandbytes")
    # bitsandbytes' CPU 4-bit kernel packs weights in blocks of 64 input features, so the
    # tiny model's default hidden size of 32 is too small for it; 64 works.
    sizes = {"hidden_size": 64, "intermediate_size": 128}
    path = tmp_path_factory.mktemp("tiny_llama_64")
    save_tiny_llama(str(path), **sizes)
    model = load_model(path, quantization=quantization)  # type: ignore[arg-type]
    layer = type(model.model.layers[0].self_attn.q_proj).__name__
    assert layer == ("Linear4bit" if quantization == "4bit" else "Linear8bitLt")
    batch = _batch(path)
    with torch.no_grad():
        logits = model(**batch).logits.float()
    reference = _reference_logits(batch, **sizes)
    assert torch.isfinite(logits).all()
    cosine = torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0)
    assert cosine > 0.9


def test_model_skeleton_has_the_real_module_tree_and_no_weights(tiny_dir: Path) -> None:
    from adaptlab.models import model_skeleton

    skeleton = model_skeleton(tiny_dir)
    real = load_model(tiny_dir)
    assert [n for n, _ in skeleton.named_modules()] == [n for n, _ in real.named_modules()]
    assert all(p.is_meta for p in skeleton.parameters())
