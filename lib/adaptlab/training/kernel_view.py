"""The kernel-view fine-tuning methods: ``prefix``, ``mam``, ``inducer``, ``kernel_adapter``,
``kernel_mix`` (``adaptlab.adapters``; peft_methods.md §1-§3).

| method           | trains (per attention module unless said)                                 |
|------------------|---------------------------------------------------------------------------|
| ``prefix``       | l prefix keys and values (or their reparametrisation MLP)                  |
| ``mam``          | prefixes + a parallel FFN adapter per block (He et al. 2022)               |
| ``inducer``      | the inducer's key and value MLPs (+ Q-LoRA, + the parallel FFN adapter)    |
| ``kernel_adapter``| query/key bandwidths and shifts                                           |
| ``kernel_mix``   | head-wise and shared low-rank updates of Q, V and O                        |

All base weights are frozen (the freezing flags then apply on top, as for every method); the
adapters run inside attention through ``adaptlab.adapters.attention`` on the backend the model
was loaded with, with or without gradient checkpointing. Checkpoints hold only the adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from adaptlab.adapters.bottleneck import BottleneckConfig, attach_bottleneck, check_architecture
from adaptlab.adapters.errors import AdapterError
from adaptlab.adapters.families import family_of, geometry
from adaptlab.adapters.inducer import attach_inducer
from adaptlab.adapters.kernel import attach_kernel_adapter, check_geometry
from adaptlab.adapters.kernel_mix import attach_kernel_mix
from adaptlab.adapters.prefix import attach_prefix
from adaptlab.adapters.settings import (
    bottleneck_settings,
    inducer_settings,
    kernel_mix_settings,
    kernel_settings,
    prefix_settings,
)

TITLES = {
    "prefix": "Prefix-tuning",
    "mam": "MAM (prefix + parallel adapter)",
    "inducer": "Inducer-tuning",
    "kernel_adapter": "Kernel-wise adapters",
    "kernel_mix": "Kernel-mix",
}


def _parallel_config(cfg: Any) -> BottleneckConfig:
    return bottleneck_settings(cfg, "parallel")


def _with_parallel(name: str, cfg: Any) -> bool:
    return name == "mam" or (name == "inducer" and cfg.inducer_parallel_adapter)


def attach(name: str, model: nn.Module, cfg: Any) -> None:
    """Attach method ``name``'s adapters, configured by ``cfg``, to ``model`` (in place)."""
    if name in ("prefix", "mam"):
        attach_prefix(model, prefix_settings(cfg))
    elif name == "inducer":
        attach_inducer(model, inducer_settings(cfg))
    elif name == "kernel_adapter":
        attach_kernel_adapter(model, kernel_settings(cfg))
    elif name == "kernel_mix":
        attach_kernel_mix(model, kernel_mix_settings(cfg))
    else:
        raise KeyError(name)
    if _with_parallel(name, cfg):
        attach_bottleneck(model, _parallel_config(cfg))


def check(name: str, cfg: Any, skeleton: nn.Module) -> None:
    """Every setting and the architecture, before the weights load (one sentence each)."""
    settings = {
        "prefix": prefix_settings,
        "mam": prefix_settings,
        "inducer": inducer_settings,
        "kernel_adapter": kernel_settings,
        "kernel_mix": kernel_mix_settings,
    }[name](cfg)
    family_of(skeleton, TITLES[name])
    adds_keys = name in ("prefix", "mam") or (name == "inducer" and not cfg.inducer_mh_adapter)
    if adds_keys and cfg.packing and str(cfg.attn_implementation).startswith("flash"):
        raise AdapterError(
            f"{TITLES[name]} cannot run on packed flash-attention batches (its extra keys need a "
            "mask per sequence); use packing=false or attn_implementation=sdpa."
        )
    if name == "kernel_adapter":
        check_geometry(geometry(skeleton), settings)
    if _with_parallel(name, cfg):
        check_architecture(skeleton)
        _parallel_config(cfg).width(geometry(skeleton).hidden)


def preparer(name: str, finish: Callable[[nn.Module, Any], nn.Module]) -> Callable:
    """``(model, cfg, total_steps) -> model`` for method ``name``; ``finish`` applies gradient
    checkpointing and the freezing flags."""

    def prepare(model: nn.Module, cfg: Any, total_steps: int) -> nn.Module:
        for param in model.parameters():
            param.requires_grad_(False)
        attach(name, model, cfg)  # the new adapter parameters train
        return finish(model, cfg)

    return prepare


def checker(name: str) -> Callable[[Any, nn.Module], None]:
    """``(cfg, skeleton) -> None`` for method ``name``."""
    return lambda cfg, skeleton: check(name, cfg, skeleton)
