"""IVON's Hessian diagonal h saved at the end of a run and loaded to start another one.

``ivon_hessian.safetensors`` holds h of every trainable parameter under the parameter's name
(fp32, the shape of the parameter) and the metadata ``ess``, ``weight_decay`` and ``numel``
(entries in all) as strings; for AdaLoRA, ``ivon_hessian_resized.safetensors`` holds h sliced to
the final rank pattern as PEFT slices the adapter it saves (``lora_A`` and ``lora_E`` rows,
``lora_B`` columns where the pattern is True), so it matches an adapter reloaded at those ranks::

    save_hessian(out / HESSIAN_FILE, hessian_tensors(model, optimizer), ess, weight_decay)
    load_hessian(path, model, optimizer)   # before the first step; shapes must match

Files are safetensors only (never pickles) and are written to a temporary name, then renamed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from adaptlab.training.errors import TrainingError
from adaptlab.training.ivon import IVON
from adaptlab.training.ivon_zero import ZeroIVON
from adaptlab.training.optim import unwrap_optimizer

HESSIAN_FILE = "ivon_hessian.safetensors"
RESIZED_HESSIAN_FILE = "ivon_hessian_resized.safetensors"


def _named_trainable(model: nn.Module) -> dict[nn.Parameter, str]:
    """Each trainable parameter and its name (the first, for a tied one)."""
    names: dict[nn.Parameter, str] = {}
    for name, param in model.named_parameters():
        if param.requires_grad and param not in names:
            names[param] = name
    return names


def _ivon_hessians(optimizer: torch.optim.Optimizer) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """``(parameter, h)`` for every parameter IVON updates; h is a view of the live state."""
    inner = unwrap_optimizer(optimizer)
    if isinstance(inner, ZeroIVON) and inner.attached:  # partitioned: gathered whole
        return inner.whole_hessians()
    pairs = []
    for group in inner.param_groups:
        if isinstance(inner, IVON):
            for param in group["params"]:
                pairs.append((param, inner._param_state(param, group)["hess"]))
            continue
        offset = 0  # ivon-opt: one flat buffer per group, the parameters in group order
        for param in group["params"]:
            pairs.append((param, group["hess"][offset : offset + param.numel()].view(param.shape)))
            offset += param.numel()
    return pairs


def hessian_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """h of every trainable parameter of ``model`` by its name (fp32 copies on the CPU).

    Args:
        model: the trained model, unwrapped (names as ``model.named_parameters()``).
        optimizer: adaptlab's IVON or ivon-opt's, plain or wrapped.
    """
    names = _named_trainable(model)
    return {
        names[param]: hess.detach().float().cpu().clone()
        for param, hess in _ivon_hessians(optimizer)
        if param in names
    }


def resize_by_rank_pattern(
    tensors: Mapping[str, torch.Tensor],
    rank_pattern: Mapping[str, Sequence[bool]],
    adapter_name: str = "default",
) -> dict[str, torch.Tensor]:
    """``tensors`` with each AdaLoRA triplet cut to the ranks its pattern keeps.

    The semantics of PEFT's ``AdaLoraModel.resize_state_dict_by_rank_pattern``: a pattern key
    names a ``lora_E`` (with or without ``.{adapter_name}``); the module's ``lora_E`` and
    ``lora_A`` keep the rows and ``lora_B`` the columns where the pattern is True.

    Args:
        tensors: by full parameter name (``base_model.model.<module>.lora_A.<adapter>``).
        rank_pattern: ``peft_config[adapter_name].rank_pattern``, one bool per initial rank.
        adapter_name: the AdaLoRA adapter.

    Returns:
        A new dict; names outside the pattern are kept as they are.
    """
    resized = dict(tensors)
    for name, keep in rank_pattern.items():
        parts = name.split(".")
        prefix = ".".join(parts[:-2] if adapter_name in parts else parts[:-1])
        mask = torch.as_tensor(list(keep), dtype=torch.bool)
        for layer in ("lora_E", "lora_A", "lora_B"):
            key = f"base_model.model.{prefix}.{layer}.{adapter_name}"
            if key not in resized:
                raise TrainingError(
                    f"The rank pattern names {name!r}, but no {key!r} was saved; save the "
                    "Hessian of the AdaLoRA model the pattern belongs to."
                )
            resized[key] = resized[key][:, mask] if layer == "lora_B" else resized[key][mask]
    return resized


def save_hessian(
    path: Path, tensors: Mapping[str, torch.Tensor], ess: float, weight_decay: float
) -> None:
    """Write ``tensors`` and the metadata ``ess``, ``weight_decay``, ``numel`` atomically.

    Args:
        path: the ``.safetensors`` file; a temporary file beside it is renamed to it.
        tensors: h by parameter name.
        ess: IVON's effective sample size λ of the run.
        weight_decay: IVON's prior precision δ of the run.
    """
    metadata = {
        "ess": repr(float(ess)),
        "weight_decay": repr(float(weight_decay)),
        "numel": str(sum(t.numel() for t in tensors.values())),
    }
    contiguous = {name: t.contiguous() for name, t in tensors.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(contiguous, tmp, metadata=metadata)
    os.replace(tmp, path)


def save_run_hessian(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, write: bool = True
) -> list[str]:
    """Write :data:`HESSIAN_FILE` into ``folder``, and for an AdaLoRA model whose final rank
    pattern is set also :data:`RESIZED_HESSIAN_FILE`; ess and weight decay are IVON's own.

    Every process calls it (under ZeRO h is gathered from the partitions); one writes.

    Args:
        folder: the run folder.
        model: the trained model, unwrapped (a PEFT AdaLoRA model for the resized file).
        optimizer: adaptlab's IVON or ivon-opt's.
        write: whether this process writes the files (the main process).

    Returns:
        The names of the files written (none where ``write`` is False).
    """
    group = unwrap_optimizer(optimizer).param_groups[0]
    tensors = hessian_tensors(model, optimizer)
    if not write:
        return []
    save_hessian(folder / HESSIAN_FILE, tensors, group["ess"], group["weight_decay"])
    written = [HESSIAN_FILE]
    for adapter, config in (getattr(model, "peft_config", None) or {}).items():
        pattern = getattr(config, "rank_pattern", None)
        if str(getattr(config, "peft_type", "")).endswith("ADALORA") and pattern:
            resized = resize_by_rank_pattern(tensors, pattern, adapter)
            path = folder / RESIZED_HESSIAN_FILE
            save_hessian(path, resized, group["ess"], group["weight_decay"])
            written.append(RESIZED_HESSIAN_FILE)
    return written


def read_hessian(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a Hessian file.

    Raises:
        TrainingError: the file is missing or not a safetensors file.
    """
    if not Path(path).is_file():
        raise TrainingError(f"ivon_hessian_from={path} is not a file; pass an {HESSIAN_FILE}.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for a bad header
        raise TrainingError(
            f"ivon_hessian_from={path} is not a safetensors file ({error}); pass an "
            f"{HESSIAN_FILE} written by an IVON run."
        ) from error
    return tensors, metadata


@torch.no_grad()
def load_hessian(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Start IVON's h from a saved file, by parameter name (``ess`` and ``weight_decay`` stay
    this run's settings).

    Args:
        path: an ``ivon_hessian[_resized].safetensors``.
        model: the model about to be trained, unwrapped.
        optimizer: a freshly built IVON over its trainable parameters.

    Raises:
        TrainingError: a trainable parameter missing from the file, a tensor of the file that
            is no trainable parameter, or the first parameter whose shape differs (both shapes
            named), before anything is changed.
    """
    tensors, _ = read_hessian(path)
    names = _named_trainable(model)
    pairs = [(names[param], hess) for param, hess in _ivon_hessians(optimizer) if param in names]
    for name, hess in pairs:
        if name not in tensors:
            raise TrainingError(
                f"ivon_hessian_from={path} has no Hessian for the trainable parameter {name}; "
                "load a file saved by a run with the same method and trainable parameters."
            )
        if tuple(tensors[name].shape) != tuple(hess.shape):
            raise TrainingError(
                f"ivon_hessian_from={path} does not match this run: {name} has shape "
                f"{tuple(tensors[name].shape)} in the file but {tuple(hess.shape)} here (for "
                "AdaLoRA, load the file whose rank pattern this adapter has)."
            )
    extra = sorted(set(tensors) - {name for name, _ in pairs})
    if extra:
        raise TrainingError(
            f"ivon_hessian_from={path} holds {extra[0]}, which is no trainable parameter of "
            "this run; load a file saved by a run with the same trainable parameters."
        )
    inner = unwrap_optimizer(optimizer)
    if isinstance(inner, ZeroIVON) and inner.attached:  # h lives in the engine's partitions
        inner.load_whole_hessians({param: tensors[name] for param, name in names.items()})
        return
    for name, hess in pairs:
        hess.copy_(tensors[name].to(hess.device, hess.dtype))
