"""Per-process training state of sharded runs: FSDP2 ``DTensor`` slices and ZeRO partitions,
and the share of the weights and optimiser state each rank holds (recorded in ``result.json``).

Each process writes its own slice of the trainable weights and of the optimiser state to
``shard_rank{r}.safetensors`` (``adaptlab.training.checkpoint.save_state``) and reads it back on
the same mesh: FSDP2 as ``param/{name}`` and ``optimizer/{index}/{key}`` tensors, ZeRO as its
flat fp32 partitions ``fp32/{i}`` and their optimiser state. Non-tensor state and the
optimiser's hyper-parameters travel as JSON in the safetensors metadata.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from adaptlab.distributed import local_parameter_fraction
from adaptlab.training.errors import ResumeError
from adaptlab.training.optim import unwrap_optimizer
from adaptlab.training.parallel import _trainable, is_deepspeed

# ---------------------------------------------------------------------------------------------
# What each rank holds


def param_fraction(model: nn.Module) -> float:
    """Fraction of all parameter entries stored on this rank (ZeRO-3 partitions included)."""
    if not is_deepspeed(model):
        return local_parameter_fraction(model)
    local = total = 0
    for param in model.module.parameters():
        total += getattr(param, "ds_numel", param.numel())
        local += param.ds_tensor.numel() if hasattr(param, "ds_tensor") else param.numel()
    return local / max(total, 1)


def zero_partitions(engine: nn.Module) -> list[torch.Tensor]:
    """The flat fp32 master-weight partitions this rank's ZeRO optimiser steps, per group."""
    zero = engine.optimizer
    groups = getattr(zero, "single_partition_of_fp32_groups", None)
    if groups is None:  # stage 3
        groups = zero.fp32_partitioned_groups_flat
    return list(groups)


def optimizer_state_fraction(model: nn.Module) -> float:
    """Fraction of the trainable parameters whose optimiser state lives on this rank.

    Data parallel: 1.0. FSDP: the local share of the ``DTensor`` states. ZeRO: the share of
    the flat fp32 partition the engine's optimiser steps.
    """
    trainable = model.module if is_deepspeed(model) else model
    total = sum(getattr(p, "ds_numel", p.numel()) for _, p in _trainable(trainable))
    if is_deepspeed(model):
        return sum(g.numel() for g in zero_partitions(model)) / max(total, 1)
    local = 0
    for _, param in _trainable(trainable):
        local += param.to_local().numel() if hasattr(param, "to_local") else param.numel()
    return local / max(total, 1)


# ---------------------------------------------------------------------------------------------
# Saving and loading the shards

_PARAM = "param/"
_OPTIM = "optimizer/"
_FP32 = "fp32/"


def _shard_file(rank: int) -> str:
    return f"shard_rank{rank}.safetensors"


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a ``DTensor`` (FSDP2 shard), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _optimizer_entries(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The optimiser state as ``optimizer/{index}/{key}`` tensors (this rank's slice of a
    ``DTensor``) and metadata: ``param_groups``, ``sharded`` and ``values`` (JSON)."""
    state = unwrap_optimizer(optimizer).state_dict()
    tensors, sharded, values = {}, [], {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            name = f"{_OPTIM}{index}/{key}"
            if not isinstance(value, torch.Tensor):
                values[name] = value
                continue
            if hasattr(value, "to_local"):
                sharded.append(name)
            tensors[name] = _local(value.detach()).cpu().clone()
    metadata = {
        "param_groups": json.dumps(state["param_groups"]),
        "sharded": json.dumps(sharded),
        "values": json.dumps(values),
    }
    return tensors, metadata


def sharded_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This rank's slices of the trainable parameters and of the optimiser state (FSDP2).

    Returns:
        Tensors named ``param/{name}`` and ``optimizer/{index}/{key}``, and safetensors
        metadata: ``param_groups`` (JSON), ``sharded`` (JSON list of the optimiser entries that
        are ``DTensor`` slices) and ``values`` (JSON of the non-tensor state entries).
    """
    tensors = {
        _PARAM + name: _local(param.detach()).cpu().clone()
        for name, param in model.named_parameters()
        if param.requires_grad
    }
    entries, metadata = _optimizer_entries(optimizer)
    return {**tensors, **entries}, {**metadata, "layout": "fsdp"}


def zero_state(engine: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This rank's ZeRO partition: its flat fp32 master weights (``fp32/{i}``) and the
    optimiser state over each (``optimizer/{i}/{key}``), with the optimiser's hyper-parameters
    (``param_groups``, JSON without the parameters) and non-tensor state (``values``).

    The state is read per partition rather than through ``state_dict()``: ZeRO-3 empties the
    optimiser's parameter lists between steps. The partition layout is a function of the
    model, the config and the world size, so the same launch restores it rank by rank.
    """
    inner = unwrap_optimizer(engine.optimizer)
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, Any] = {}
    for i, flat in enumerate(zero_partitions(engine)):
        tensors[f"{_FP32}{i}"] = flat.detach().cpu().clone()
        for key, value in inner.state.get(flat, {}).items():
            name = f"{_OPTIM}{i}/{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().cpu().clone()
            else:
                values[name] = value
    plain = (int, float, bool, str, type(None), list, tuple)
    groups = [
        {k: v for k, v in g.items() if k != "params" and isinstance(v, plain)}
        for g in inner.param_groups
    ]
    metadata = {
        "layout": "zero",
        "param_groups": json.dumps(groups),
        "values": json.dumps(values),
    }
    return tensors, metadata


def load_sharded_optimizer(
    optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], metadata: dict
) -> None:
    """Restore the optimiser state written by :func:`sharded_state` on the same mesh."""
    from torch.distributed.tensor import DTensor

    inner = unwrap_optimizer(optimizer)
    params = [p for group in inner.param_groups for p in group["params"]]
    sharded = set(json.loads(metadata["sharded"]))
    entries: dict[str, Any] = dict(json.loads(metadata["values"]))
    entries.update({k: v for k, v in tensors.items() if k.startswith(_OPTIM)})
    state: dict[int, dict[str, Any]] = {}
    for name, value in entries.items():
        index, key = name.removeprefix(_OPTIM).split("/", 1)
        param = params[int(index)]
        if name in sharded:
            value = DTensor.from_local(
                value.to(param.device),
                param.device_mesh,
                param.placements,
                run_check=False,
                shape=param.shape,
                stride=param.stride(),
            )
        state.setdefault(int(index), {})[key] = value
    inner.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})


def load_zero_state(
    engine: torch.nn.Module,
    tensors: Mapping[str, torch.Tensor],
    metadata: dict,
    trainable: Mapping[str, torch.Tensor],
) -> None:
    """Restore :func:`zero_state` and the (low-precision) trainable weights a ZeRO engine
    computes with from their whole values ``trainable`` (every process calls it)."""
    import deepspeed

    partitions = zero_partitions(engine)
    saved = sorted((k for k in tensors if k.startswith(_FP32)), key=lambda k: int(k[len(_FP32) :]))
    if len(saved) != len(partitions) or any(
        tensors[k].shape != p.shape for k, p in zip(saved, partitions, strict=False)
    ):
        raise ResumeError(
            "The saved ZeRO partitions do not match this engine's; resume with the same "
            "number of processes and DeepSpeed config."
        )
    inner = unwrap_optimizer(engine.optimizer)
    entries: dict[str, Any] = dict(json.loads(metadata["values"]))
    entries.update({k: v for k, v in tensors.items() if k.startswith(_OPTIM)})
    with torch.no_grad():
        for key, flat in zip(saved, partitions, strict=True):
            flat.copy_(tensors[key])
            inner.state.pop(flat, None)
        for name, value in entries.items():
            index, key = name.removeprefix(_OPTIM).split("/", 1)
            flat = partitions[int(index)]
            if isinstance(value, torch.Tensor):
                value = value.to(flat.device) if value.dim() else value
            inner.state.setdefault(flat, {})[key] = value
        hypers = json.loads(metadata["param_groups"])
        for group, hyper in zip(inner.param_groups, hypers, strict=True):
            for key, value in hyper.items():
                if isinstance(group.get(key), tuple):  # JSON turned tuples (betas) into lists
                    value = tuple(value)
                group[key] = value
        stage3 = engine.zero_optimization_partition_weights()
        for name, param in engine.module.named_parameters():
            if name not in trainable:
                continue
            value = trainable[name]
            if stage3:  # gather, let rank 0 write, re-partition
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if torch.distributed.get_rank() == 0:
                        param.copy_(value.to(param.dtype))
            else:
                param.copy_(value.to(param.dtype))
