"""Apply a saved graft to a model, like a PEFT adapter: merge, unmerge, export.

    graft = apply_graft(model, "results/graft/sst2/mask")   # checks names, shapes, base hash
    graft.merge()       # θ ← θ_pre + γ_bin ⊙ Δ (bit-exact θ_ft values at the mask)
    graft.unmerge()     # θ ← θ_pre, exactly (the overwritten values are kept)
    graft.merge(scale=0.5)   # a fractional graft θ_pre + 0.5·γ_bin ⊙ Δ

``merge_graft(model, folder)`` applies and merges in one call (what the extraction, analysis and
kernel scripts do with a mask folder); :func:`export_model` writes the merged model as a plain
Hugging Face folder that ``AutoModel.from_pretrained`` loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adaptlab.graft.artefact import GraftMask, content_hash, load_mask
from adaptlab.graft.errors import GraftError


class Graft:
    """A loaded mask attached to a model; it changes the model only between merge and unmerge."""

    def __init__(self, model: nn.Module, mask: GraftMask) -> None:
        self.model = model
        self.mask = mask
        self._saved: dict[str, Tensor] | None = None
        params = dict(model.named_parameters())
        self._params = {name: params[name] for name in mask.names}

    @property
    def merged(self) -> bool:
        return self._saved is not None

    @torch.no_grad()
    def merge(self, scale: float = 1.0) -> None:
        """θ ← θ_pre + scale·Δ at the mask's positions (scale 1: θ_ft's values exactly)."""
        if self.merged:
            raise GraftError("The graft is already merged; unmerge() it first.")
        if not 0.0 <= scale <= 1.0:
            raise GraftError(
                f"scale={scale} is outside [0, 1]; a graft is θ_pre + γ⊙Δ, γ in [0, 1]."
            )
        saved = {}
        for name, p in self._params.items():
            flat = p.data.view(-1)
            index = self.mask.index[name].to(p.device)
            saved[name] = flat[index].clone()
            delta = self.mask.delta[name].to(p.device)
            flat[index] = (saved[name].double() + scale * delta).to(p.dtype)
        self._saved = saved

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put back the values the merge overwrote (θ_pre exactly)."""
        if self._saved is None:
            raise GraftError("The graft is not merged; nothing to unmerge.")
        for name, p in self._params.items():
            p.data.view(-1)[self.mask.index[name].to(p.device)] = self._saved[name]
        self._saved = None


def check_mask_fits(model: nn.Module, mask: GraftMask, *, check_hash: bool = True) -> None:
    """The mask's eligible tensors exist in ``model`` with the same shapes and, with
    ``check_hash``, the model is the base the mask was learned on.

    Raises:
        GraftError: a missing name, another shape, or another base model (hash mismatch).
    """
    params = dict(model.named_parameters())
    for name, shape in mask.shapes.items():
        if name not in params:
            raise GraftError(
                f"The model has no parameter {name!r} that the graft mask changes; the mask "
                f"was learned on {mask.config['base_model']['name']}: load that model."
            )
        if tuple(params[name].shape) != shape:
            raise GraftError(
                f"Parameter {name!r} is {tuple(params[name].shape)} in the model but {shape} in "
                "the graft mask; the mask belongs to another architecture."
            )
    if check_hash:
        found = content_hash(params, mask.names)
        dtype = str(params[mask.names[0]].dtype).removeprefix("torch.")
        learned_in = mask.config.get("dtype", dtype)
        if found != mask.config["base_model"]["hash"] and learned_in != dtype:
            raise GraftError(
                f"The graft mask was learned on {learned_in} weights but the model is loaded in "
                f"{dtype}; load the base model in {learned_in} (--dtype {learned_in})."
            )
        if found != mask.config["base_model"]["hash"]:
            raise GraftError(
                f"The model's weights differ from the base the graft mask was learned on "
                f"({mask.config['base_model']['name']}, content hash "
                f"{mask.config['base_model']['hash'][:12]}…, this model {found[:12]}…); load "
                "that base model."
            )


def apply_graft(model: nn.Module, folder: str | Path, *, check_hash: bool = True) -> Graft:
    """Load the mask in ``folder`` and attach it to ``model`` (not merged yet).

    Raises:
        GraftError: a missing or corrupt mask, or a mask of another model.
    """
    mask = load_mask(folder)
    check_mask_fits(model, mask, check_hash=check_hash)
    return Graft(model, mask)


def merge_graft(model: nn.Module, folder: str | Path, *, check_hash: bool = True) -> nn.Module:
    """``model`` with the graft in ``folder`` merged into its weights (in place)."""
    apply_graft(model, folder, check_hash=check_hash).merge()
    return model


def export_model(
    model: nn.Module,
    folder: str | Path,
    tokenizer: Any = None,
    meta: dict | None = None,
    state_dict: dict | None = None,
) -> None:
    """Write ``model`` (e.g. with a merged graft) as a Hugging Face folder, atomically.

    ``state_dict``: the gathered weights of a sharded model (the model gives the config).
    """
    from adaptlab.io import write_json
    from adaptlab.training.checkpoint import atomic_dir

    with atomic_dir(folder) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if meta is not None:
            write_json(Path(tmp) / "adaptlab_graft.json", meta)
