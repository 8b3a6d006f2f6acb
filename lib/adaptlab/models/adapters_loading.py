"""Adapters on top of a loaded base model: PEFT's folders and adaptlab's own.

An adapter folder is told apart by its ``adapter_config.json``: ``peft_type`` ``ADAPTLAB``
(:mod:`adaptlab.adapters.folder`: bottleneck adapters and the other hand-written kinds) loads
with :func:`adaptlab.adapters.folder.load_adapter_folder`, anything else with
``PeftModel.from_pretrained``. A chain of PEFT adapters is applied from the base up, each
earlier one merged before the next; an adaptlab folder attaches modules instead of wrapping
the model, so it must be the only adapter of a load.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch import nn

from adaptlab.adapters.folder import check_base, is_adaptlab_folder, load_adapter_folder
from adaptlab.models.errors import ModelNotFoundError
from adaptlab.models.refs import GRAFT_CONFIG, _hub_cached_file, _hub_offline, _is_hub_id

_ADALORA_PATTERN_WARNING = (
    r"The following rank_pattern keys did not match any targeted module and were ignored: "
    r"\[('[^']*\.lora_E', )*'[^']*\.lora_E'\]"
)
"""PEFT's warning, when loading an AdaLoRA folder, that every rank_pattern key (all ending in
``.lora_E``) matched no module. It is a false alarm: PEFT checks every tuner's ``rank_pattern``
as LoRA's {module name: rank}, but AdaLoRA's maps the ``lora_E`` parameter path to the kept
triplets and is applied after injection, when the state dict loads
(``AdaLoraModel.resize_modules_by_rank_pattern``, which needs exactly these keys)."""


def check_adapter(adapter: str) -> str:
    """The adapter (or graft mask) folder as an absolute path, or the hub id.

    Raises:
        ModelNotFoundError: a folder without ``adapter_config.json``, a name that is neither a
            folder nor a hub id, or a hub id not cached while the hub is offline.
    """
    folder = Path(adapter).expanduser()
    if folder.exists():
        if (folder / GRAFT_CONFIG).is_file():  # a graft mask: merged into the model by load_model
            return str(folder.resolve())
        if not (folder / "adapter_config.json").is_file():
            raise ModelNotFoundError(
                f"Adapter folder {adapter!r} has no adapter_config.json; pass the folder a PEFT "
                "model was saved to."
            )
        return str(folder.resolve())
    if not _is_hub_id(adapter):
        raise ModelNotFoundError(
            f"Adapter {adapter!r} is neither a local folder nor a name on the hub; pass the "
            "folder a PEFT model was saved to."
        )
    if _hub_offline() and _hub_cached_file(adapter, "adapter_config.json") is None:
        raise ModelNotFoundError(
            f"Adapter {adapter!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 "
            "forbids downloading it; download it where the hub is reachable, or pass a folder."
        )
    return adapter


def check_chain(adapters: list[str], base_config: Any, quantization: str | None = None) -> None:
    """Refuse, before any weights load, a chain of adapters that cannot be applied.

    Args:
        adapters: adapter folders or hub ids, from the one nearest the base up.
        base_config: the base model's ``PretrainedConfig``.
        quantization: the load's quantization (``None``, ``"4bit"``, ``"8bit"``).

    Raises:
        ValueError: an adaptlab folder together with other adapters, or with quantization.
        AdapterError: an adaptlab folder trained on another base model.
    """
    own = [path for path in adapters if is_adaptlab_folder(path)]
    if own and len(adapters) > 1:
        raise ValueError(
            f"{own[0]} holds adaptlab adapters, which cannot be stacked with other adapters "
            f"({len(adapters)} in this load); load it alone on its base model."
        )
    if own and quantization is not None:
        raise ValueError(
            f"{own[0]} holds adaptlab adapters, which load on full-precision weights; drop "
            f"quantization={quantization!r}."
        )
    for path in own:
        check_base(path, base_config)


def apply_adapters(model: nn.Module, adapters: list[str]) -> nn.Module:
    """``model`` with the adapters applied (checked by :func:`check_chain`).

    Returns:
        A ``peft.PeftModel`` for PEFT adapters; ``model`` itself, with modules attached, for an
        adaptlab folder.
    """
    if len(adapters) == 1 and is_adaptlab_folder(adapters[0]):
        return load_adapter_folder(adapters[0], model)
    from peft import PeftModel

    for path in adapters:
        if isinstance(model, PeftModel):
            model = model.merge_and_unload()
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=_ADALORA_PATTERN_WARNING, category=RuntimeWarning
            )
            model = PeftModel.from_pretrained(model, path, is_trainable=False)
    return model
