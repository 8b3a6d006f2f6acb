"""A graft mask saved like a PEFT adapter: ``graft_config.json`` + ``graft_mask.safetensors``.

The folder alone plus θ_pre rebuilds the grafted model, so it ships, loads and is applied
like an adapter (:mod:`adaptlab.graft.tuner`)::

    mask/
      graft_config.json        eligible names and shapes, N_E, k, sparsity, patch rule, β,
                               base and fine-tuned model names with content hashes, task
      graft_mask.safetensors   per eligible tensor NAME:
                                 index/NAME   int64 [n_i]   flat positions where γ_bin = 1
                                 delta/NAME   float64 [n_i] Δ = θ_ft − θ_pre there (exact:
                                              θ_pre + Δ rounds back to θ_ft's value)
                                 base/NAME    int64 [k_i]   flat positions of the base patch b
                                 scores/NAME  float32 shaped like the parameter: S (absent
                                              when the run passed --save_scores false)

The content hash of a model is SHA-256 over each eligible tensor's name, shape and a fixed
sample of its values as float32 (4,096 evenly spaced entries, the last one included): cheap for
a 7B model, any two different checkpoints differ in it, and a float32 base loaded in float64
keeps it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from adaptlab.graft.errors import GraftError
from adaptlab.io import save_tensors, write_json

CONFIG_FILE = "graft_config.json"
MASK_FILE = "graft_mask.safetensors"
FORMAT = "adaptlab.graft/1"


HASH_SAMPLE = 4096
"""Entries per tensor a content hash reads."""


def hash_positions(n: int) -> Tensor:
    """The flat positions a content hash samples from an ``n``-entry tensor: ``min(n, 4096)``
    evenly spaced ones, first and last included, in integer arithmetic (the same everywhere)."""
    m = min(n, HASH_SAMPLE)
    if m <= 1:
        return torch.zeros(m, dtype=torch.long)
    return torch.arange(m, dtype=torch.long) * (n - 1) // (m - 1)


def hash_update(digest: Any, name: str, shape: Sequence[int], sample: Tensor) -> None:
    """Feed one tensor's name, shape and sampled values (as float32) to ``digest``."""
    digest.update(f"{name}|{tuple(shape)}|".encode())
    digest.update(sample.float().contiguous().cpu().view(torch.uint8).numpy().tobytes())


def content_hash(tensors: Mapping[str, Tensor], names: Sequence[str]) -> str:
    """SHA-256 of the named tensors' names, shapes and a fixed sample of their values (float32)."""
    digest = hashlib.sha256()
    for name in names:
        t = tensors[name].detach()
        flat = t.reshape(-1)
        hash_update(digest, name, t.shape, flat[hash_positions(flat.numel()).to(flat.device)])
    return digest.hexdigest()


@dataclass
class GraftMask:
    """A loaded graft artefact.

    Attributes:
        config: the ``graft_config.json`` record.
        index: name -> ``[n_i]`` int64 flat positions of γ_bin = 1.
        delta: name -> ``[n_i]`` float64 Δ at those positions.
        base: name -> ``[k_i]`` int64 flat positions of the base patch.
        scores: name -> S (shaped like the parameter); empty when S was not saved.
    """

    config: dict[str, Any]
    index: dict[str, Tensor]
    delta: dict[str, Tensor]
    base: dict[str, Tensor]
    scores: dict[str, Tensor]

    @property
    def names(self) -> list[str]:
        return [entry["name"] for entry in self.config["eligible"]]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {entry["name"]: tuple(entry["shape"]) for entry in self.config["eligible"]}

    @property
    def n_grafted(self) -> int:
        return sum(int(t.numel()) for t in self.index.values())

    def dense(self, name: str, which: str = "index") -> Tensor:
        """The bool mask of ``which`` (``index``: γ_bin, ``base``: b) of one tensor."""
        shape = self.shapes[name]
        out = torch.zeros(shape, dtype=torch.bool)
        out.view(-1)[getattr(self, which)[name]] = True
        return out


def save_mask(
    folder: str | Path,
    config: Mapping[str, Any],
    masks: Mapping[str, Tensor],
    deltas: Mapping[str, Tensor],
    base: Mapping[str, Tensor],
    scores: Mapping[str, Tensor],
) -> None:
    """Write ``folder/graft_config.json`` and ``folder/graft_mask.safetensors`` atomically
    (each file under a temporary name, then renamed; the config last, so a folder with a config
    always has its tensors).

    Args:
        folder: the mask folder (created).
        config: the record (``eligible`` with names and shapes, counts, models, task...).
        masks: name -> bool γ_bin.
        deltas: name -> Δ (any float dtype; stored in float64 at the mask's positions).
        base: name -> bool b.
        scores: name -> S.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    for name, mask in masks.items():
        flat = mask.reshape(-1).nonzero().squeeze(1).cpu()
        tensors[f"index/{name}"] = flat
        tensors[f"delta/{name}"] = (
            deltas[name].reshape(-1)[flat.to(deltas[name].device)].double().cpu()
        )
        tensors[f"base/{name}"] = base[name].reshape(-1).nonzero().squeeze(1).cpu()
        tensors[f"scores/{name}"] = scores[name].detach().cpu()
    write_mask(folder, config, tensors)


def write_mask(folder: str | Path, config: Mapping[str, Any], tensors: Mapping[str, Tensor]):
    """Write the mask file (``index/``, ``delta/``, ``base/``, ``scores/`` entries) and then the
    config, each atomically, into ``folder`` (created)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / MASK_FILE, dict(tensors), metadata={"format": FORMAT})
    write_json(folder / CONFIG_FILE, {"format": FORMAT, **config})


def is_mask_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a graft config."""
    return (Path(path) / CONFIG_FILE).is_file()


def read_config(folder: str | Path) -> dict[str, Any]:
    """The ``graft_config.json`` of a mask folder.

    Raises:
        GraftError: no config, or not a graft config.
    """
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise GraftError(
            f"{folder} holds no {CONFIG_FILE}; pass the mask/ folder scripts/graft.py wrote."
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GraftError(f"{path} is not readable JSON ({error}); learn the mask again.") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise GraftError(f"{path} is not a graft mask config ({FORMAT}); learn the mask again.")
    return config


def load_mask(folder: str | Path) -> GraftMask:
    """Read a mask folder, checking the tensors against the config.

    Raises:
        GraftError: a missing, corrupt or inconsistent mask file.
    """
    folder = Path(folder)
    config = read_config(folder)
    path = folder / MASK_FILE
    if not path.is_file():
        raise GraftError(f"{folder} has {CONFIG_FILE} but no {MASK_FILE}; learn the mask again.")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise GraftError(f"{path} is damaged ({error}); learn the mask again.") from None
    parts: dict[str, dict[str, Tensor]] = {"index": {}, "delta": {}, "base": {}, "scores": {}}
    stored = [p for p in parts if p != "scores" or config.get("scores_saved", True)]
    for entry in config["eligible"]:
        name, shape = entry["name"], tuple(entry["shape"])
        numel = int(torch.Size(shape).numel())
        for part in stored:
            key = f"{part}/{name}"
            if key not in tensors:
                raise GraftError(f"{path} lacks {key!r}; the mask file is incomplete.")
            parts[part][name] = tensors[key]
        index, delta = parts["index"][name], parts["delta"][name]
        bad = (
            index.shape != delta.shape
            or (name in parts["scores"] and tuple(parts["scores"][name].shape) != shape)
            or any(
                t.numel() and (t.min() < 0 or t.max() >= numel)
                for t in (index, parts["base"][name])
            )
            or not torch.isfinite(delta).all()
        )
        if bad:
            raise GraftError(f"{path} is inconsistent for {name!r}; learn the mask again.")
    return GraftMask(config, **parts)
