"""One on-disk format for adaptlab's own adapters: a PEFT-layout adapter folder.

A folder holds the adapters only, never the base model, in the two files a PEFT adapter has::

    adapter_config.json        {"peft_type": "ADAPTLAB", "adaptlab_format": 1,
                                "adaptlab_adapters": [{"method": "houlsby", "config": {...}}],
                                "base_model_name_or_path": "...",
                                "base_model_fingerprint": {"architecture": ..., "hidden_size": ...}}
    adapter_model.safetensors  every trainable tensor that is not the base model's, under its
                               state-dict name ([r, hidden] for a down-projection ...)

So the model names (:mod:`adaptlab.models.refs`) resolve it as an adapter on its recorded base,
and :func:`adaptlab.models.load_model` (hence ``scripts/extract_repr.py --model`` and
``scripts/compute_kernel.py --model``) loads that base and calls :func:`load_adapter_folder`
where a PEFT folder would go to ``PeftModel.from_pretrained``.

Each kind of adapter is an :class:`AdapterKind` in :data:`KINDS`, registered by the module that
implements it (``adaptlab.adapters.bottleneck`` registers ``houlsby``, ``pfeiffer`` and
``parallel``): adding a kind is adding an entry, and this module knows none of them.

Quick start::

    attach_bottleneck(model, BottleneckConfig(placement="houlsby", dim=4))
    # ... train ...
    adapters = {n: t for n, t in model.state_dict().items() if "bottleneck_" in n}
    save_adapter_folder("out/best", model, adapters, base_model="embedded:smollm2-135m")
    tuned = load_model("out/best")      # the base, with the trained adapters attached
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from adaptlab.adapters.errors import AdapterError
from adaptlab.extract.points import unwrap
from adaptlab.io import save_tensors, write_json

PEFT_TYPE = "ADAPTLAB"
FORMAT = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_CONFIG = "bottleneck_config.json"  # the whole-model layout written before this format
# What must agree between the base an adapter was trained on and the model it is loaded on.
FINGERPRINT_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


@dataclass(frozen=True)
class AdapterKind:
    """How one kind of adaptlab adapter is attached, described and saved.

    Attributes:
        name: the fine-tuning method name (``houlsby``), written as ``"method"`` in the folder.
        from_dict: the config object from its JSON dict.
        to_dict: the JSON dict of a config object.
        attach: ``(model, config)``: adds the adapter modules to a loaded base model, in place.
        config_of: the config of this kind attached to a model, or ``None``.
        is_parameter: whether a state-dict name belongs to this kind's adapters.
    """

    name: str
    from_dict: Callable[[dict], Any]
    to_dict: Callable[[Any], dict]
    attach: Callable[[nn.Module, Any], Any]
    config_of: Callable[[nn.Module], Any | None]
    is_parameter: Callable[[str], bool]


KINDS: dict[str, AdapterKind] = {}
"""Registered kinds by method name."""


def register_kind(kind: AdapterKind) -> AdapterKind:
    """Add ``kind`` to :data:`KINDS` and return it.

    Raises:
        ValueError: another kind already has this name.
    """
    if kind.name in KINDS and KINDS[kind.name] != kind:
        raise ValueError(f"An adapter kind named {kind.name!r} is already registered.")
    KINDS[kind.name] = kind
    return kind


def attached_kinds(model: nn.Module) -> list[tuple[AdapterKind, Any]]:
    """``[(kind, config)]`` of the adaptlab adapters attached to ``model``, in registry order."""
    found = []
    for kind in KINDS.values():
        config = kind.config_of(model)
        if config is not None:
            found.append((kind, config))
    return found


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """The architecture class and :data:`FINGERPRINT_KEYS` of ``model``'s config (those set)."""
    base = unwrap(model)
    config = base.config
    keys = {k: getattr(config, k) for k in FINGERPRINT_KEYS if getattr(config, k, None) is not None}
    return {"architecture": type(base).__name__, **keys}


# ---------------------------------------------------------------------------------------------
# Saving


def write_adapter_files(
    folder: str | Path,
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    base_model: str,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write the two files of an adapter folder into the existing ``folder`` (each atomically).

    For a caller that already writes the whole folder under a temporary name (a checkpoint);
    otherwise use :func:`save_adapter_folder`.

    Raises:
        AdapterError: no adaptlab adapters are attached to ``model``.
    """
    kinds = attached_kinds(model)
    if not kinds:
        raise AdapterError(
            f"{type(unwrap(model)).__name__} has no adaptlab adapters attached, so there is no "
            "adapter folder to write; save the whole model with save_pretrained instead."
        )
    config = {
        "peft_type": PEFT_TYPE,
        "adaptlab_adapters": [
            {"method": kind.name, "config": kind.to_dict(cfg)} for kind, cfg in kinds
        ],
        "base_model_name_or_path": base_model,
        "base_model_fingerprint": base_fingerprint(model),
        "adaptlab_format": FORMAT,
    }
    everything = {**dict(tensors), **dict(extra_tensors or {})}
    folder = Path(folder)
    save_tensors(folder / WEIGHTS_FILE, {k: v.detach().cpu() for k, v in everything.items()})
    write_json(folder / CONFIG_FILE, config)


def save_adapter_folder(
    folder: str | Path,
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    base_model: str,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write ``model``'s adaptlab adapters as a PEFT-layout folder, atomically (see above).

    Args:
        folder: destination; replaced if it exists.
        model: the adapted model (plain or wrapped); its attached kinds and configs are recorded.
        tensors: ``{state-dict name: tensor}`` of the adapter entries.
        base_model: the name or path the base loads from (``base_model_name_or_path``).
        extra_tensors: other trained entries of the model (an unfrozen head...), saved beside
            the adapters so that a reload is exact.

    Raises:
        AdapterError: no adaptlab adapters are attached to ``model``.
    """
    from adaptlab.training.checkpoint import atomic_dir  # the training package imports this one

    with atomic_dir(folder) as tmp:
        write_adapter_files(tmp, model, tensors, base_model, extra_tensors)


# ---------------------------------------------------------------------------------------------
# Loading


def is_adaptlab_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder whose ``adapter_config.json`` says ``peft_type`` ADAPTLAB."""
    config = Path(path) / CONFIG_FILE
    try:
        return json.loads(config.read_text()).get("peft_type") == PEFT_TYPE
    except (OSError, ValueError, AttributeError):  # no file, not JSON, not an object
        return False


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of an adaptlab folder.

    Raises:
        AdapterError: the folder is not an adaptlab adapter folder, or a newer format.
    """
    if not is_adaptlab_folder(folder):
        raise AdapterError(
            f"{folder} is not an adaptlab adapter folder ({CONFIG_FILE} with peft_type "
            f"{PEFT_TYPE}); pass the best/ or final/ folder of an adaptlab adapter run."
        )
    config = json.loads((Path(folder) / CONFIG_FILE).read_text())
    if config.get("adaptlab_format", FORMAT) > FORMAT:
        raise AdapterError(
            f"{folder} was written by a newer adaptlab (format {config['adaptlab_format']}); "
            "upgrade adaptlab to load it."
        )
    return config


def check_base(folder: str | Path, model_config: Any) -> None:
    """Refuse a base model whose config differs from the one the adapters were trained on.

    Reads no weights, so it can run before any heavy work.

    Args:
        folder: an adaptlab adapter folder.
        model_config: the base's ``PretrainedConfig`` (a loaded model's or ``AutoConfig``'s).

    Raises:
        AdapterError: a fingerprint entry differs (the message names the recorded base).
    """
    config = read_adapter_config(folder)
    recorded = config.get("base_model_fingerprint", {})
    for key in FINGERPRINT_KEYS:
        if key in recorded and getattr(model_config, key, None) != recorded[key]:
            raise AdapterError(
                f"The adapters in {folder} were trained on {config['base_model_name_or_path']} "
                f"({key} {recorded[key]}, this model has {getattr(model_config, key, None)}); "
                "load them on that model."
            )


def _attach_recorded(folder: Path, model: nn.Module, config: dict[str, Any]) -> None:
    for entry in config["adaptlab_adapters"]:
        kind = KINDS.get(entry["method"])
        if kind is None:
            raise AdapterError(
                f"{folder} holds {entry['method']!r} adapters, which this adaptlab does not "
                f"know (it knows {', '.join(KINDS)}); upgrade adaptlab to load them."
            )
        try:
            settings = kind.from_dict(entry["config"])
        except TypeError as err:
            raise AdapterError(
                f"The {entry['method']} config in {folder / CONFIG_FILE} does not fit this "
                f"adaptlab ({err}); save the adapters again."
            ) from None
        kind.attach(model, settings)


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(folder / WEIGHTS_FILE))
    except (OSError, SafetensorError) as err:
        raise AdapterError(
            f"{folder / WEIGHTS_FILE} cannot be read ({err}); save the adapters again."
        ) from None


def load_adapter_folder(folder: str | Path, model: nn.Module) -> nn.Module:
    """Attach the adapters saved in ``folder`` to its base ``model`` and load their weights.

    The tensors are loaded strictly (every adapter entry present, no unknown name, equal
    shapes) and cast to the model's dtype and device.

    Args:
        folder: an adaptlab adapter folder.
        model: the base model the adapters were trained on (plain or wrapped), in place.

    Returns:
        ``model``, with the adapters attached.

    Raises:
        AdapterError: not an adaptlab folder, another base model, an unknown kind, or tensors
            that do not fit the adapted model.
    """
    folder = Path(folder)
    config = read_adapter_config(folder)
    base = unwrap(model)
    check_base(folder, base.config)
    saved = _read_tensors(folder)
    _attach_recorded(folder, model, config)
    own = base.state_dict(keep_vars=True)
    adapter_names = {n for n in own if any(k.is_parameter(n) for k, _ in attached_kinds(base))}
    missing = sorted(adapter_names - set(saved))
    unexpected = sorted(set(saved) - set(own))
    if missing or unexpected:
        what = f"no {missing[0]!r}" if missing else f"an unknown {unexpected[0]!r}"
        raise AdapterError(
            f"{folder / WEIGHTS_FILE} does not fit the adapted {type(base).__name__} ({what}); "
            "load it on the model it was trained on, or save the adapters again."
        )
    for name, tensor in saved.items():
        if tensor.shape != own[name].shape:
            raise AdapterError(
                f"{folder / WEIGHTS_FILE} holds {name!r} of shape {list(tensor.shape)} where the "
                f"model has {list(own[name].shape)}; load it on the model it was trained on."
            )
    with torch.no_grad():
        for name, tensor in saved.items():
            own[name].copy_(tensor)
    return model


def refuse_legacy(folder: str | Path) -> None:
    """Refuse a checkpoint in the whole-model bottleneck layout written before this format.

    Raises:
        AdapterError: ``folder`` holds ``bottleneck_config.json``.
    """
    if (Path(folder) / LEGACY_CONFIG).is_file():
        raise AdapterError(
            f"{folder} holds bottleneck adapters in the old layout (whole model + "
            f"{LEGACY_CONFIG}), which is no longer read; run its fine-tuning again to get an "
            "adapter folder."
        )
