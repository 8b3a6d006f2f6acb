"""The weight files a model load reads, checked without reading the weights.

Safetensors first (``model.safetensors``, its shard index, ``adapter_model.safetensors``), in
the order ``from_pretrained`` and PEFT look for them; pickle ``.bin`` files only when the user
allows them (:data:`ALLOW_PICKLE_FLAG`), opened with ``torch.load(weights_only=True)`` and
memory-mapped, never unpickled for real. ``adaptlab.models.check_weights`` runs these checks on
every local folder of a model before anything heavy starts.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Literal

import torch

from adaptlab.models.errors import ModelFileError

ALLOW_PICKLE_FLAG = "--allow_pickle_weights true"
"""The script option that lets pickle-based ``.bin`` weights load (see :func:`check_weights`)."""

_WEIGHT_FILES: dict[str, tuple[tuple[str, str | None], ...]] = {
    # (single file, index of shards) in the order from_pretrained (models) and PEFT (adapters)
    # look for them: what a load reads, and so what a manifest must hash
    "safetensors": (
        ("model.safetensors", "model.safetensors.index.json"),
        ("adapter_model.safetensors", None),
    ),
    "pickle": (
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
        ("adapter_model.bin", None),
    ),
}


def _checked_weight_files(folder: Path, allow_pickle_weights: bool) -> list[Path]:
    safe = _weight_files(folder, "safetensors")
    for path in safe:
        _check_safetensors(path)
    if safe:
        return safe
    pickled = _weight_files(folder, "pickle")
    if not pickled:
        raise ModelFileError(
            f"{folder} holds no model.safetensors, sharded safetensors index or "
            "adapter_model.safetensors; pass the folder save_pretrained wrote the weights to."
        )
    names = ", ".join(p.name for p in pickled[:3]) + (", ..." if len(pickled) > 3 else "")
    if not allow_pickle_weights:
        raise ModelFileError(
            f"{folder} holds its weights only as pickle files ({names}), which can run "
            "arbitrary code when loaded; convert them to safetensors (load and save_pretrained "
            f"where you trust them), or pass {ALLOW_PICKLE_FLAG} if you trust their source."
        )
    for path in pickled:
        _check_pickle(path)
    return pickled


def _weight_files(folder: Path, fmt: Literal["safetensors", "pickle"]) -> list[Path]:
    """The ``fmt`` weight files that a load of ``folder`` reads (empty when it has none)."""
    for single, index in _WEIGHT_FILES[fmt]:
        if (folder / single).is_file():
            return [folder / single]
        if index is not None and (folder / index).is_file():
            return _shards(folder / index)
    return []


def _shards(index: Path) -> list[Path]:
    """The shard files an index names, each checked to exist."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ModelFileError(
            f"{index} is not a readable shard index ({type(err).__name__}: {err}); restore it or "
            "save the model again with save_pretrained."
        ) from err
    missing = [name for name in names if not (index.parent / name).is_file()]
    if missing or not names:
        raise ModelFileError(
            f"{index} names {'no weight shards' if not names else 'weight shards'} that are not "
            f"in its folder ({', '.join(missing)}); finish the download or save the model again."
        )
    return [index.parent / name for name in names]


def _check_safetensors(path: Path) -> None:
    """Parse the header of a safetensors file; its tensors must fit in the file's size."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as error:
        raise ModelFileError(
            f"{path} is not a valid safetensors file ({error}); it is truncated or damaged: "
            "download or save the model again."
        ) from error


def _check_pickle(path: Path) -> None:
    """Open a pickle weight file as ``from_pretrained`` would, memory-mapped where possible."""
    try:
        # a zip-format file is only mapped, not read; the legacy format cannot be mapped
        torch.load(path, map_location="meta", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # a damaged pickle fails in the unpickler in many ways
        raise ModelFileError(
            f"torch refuses to load {path} with weights_only=True: it is damaged, or holds "
            "objects other than tensors that could run code when unpickled; re-save the model "
            "as safetensors (save_pretrained) where it was made."
        ) from error


def _all_weight_files(folder: Path) -> list[Path]:
    """What a load of ``folder`` reads: its safetensors weights, else its pickle weights."""
    return _weight_files(folder, "safetensors") or _weight_files(folder, "pickle")
