"""The kernel-view adapters' fields of a fine-tuning config, and the adapter configs they build.

``FinetuneConfig`` inherits :class:`KernelViewSettings`, so every field is a CLI flag of
``scripts/finetune.py`` (``--prefix_length 10 --inducer_lora_q_r 24``) and a YAML key. Which
fields each method reads:

- ``prefix``: ``prefix_length``, ``prefix_reparam_dim``;
- ``mam``: the prefix fields and the parallel adapter's ``adapter_*`` fields;
- ``inducer``: ``prefix_length``, ``prefix_dim``, ``inducer_*``, ``lora_dropout`` (Q-LoRA), and
  with ``inducer_parallel_adapter`` the ``adapter_*`` fields;
- ``kernel_adapter``: ``kernel_*``;
- ``kernel_mix``: ``kmix_*``, ``lora_dropout``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from adaptlab.adapters.bottleneck import BottleneckConfig
from adaptlab.adapters.inducer import InducerConfig
from adaptlab.adapters.kernel import KernelAdapterConfig
from adaptlab.adapters.kernel_mix import KernelMixConfig
from adaptlab.adapters.prefix import PrefixConfig


@dataclass
class BottleneckSettings:
    """Settings of the bottleneck adapters (``houlsby``, ``pfeiffer``, ``parallel``, and the
    parallel adapter of ``mam`` and inducer-mam).

    Args:
        adapter_reduction_factor: width r = hidden size // factor.
        adapter_dim: the width r itself (None: from adapter_reduction_factor).
        adapter_activation: the non-linearity: ``relu``, ``gelu`` or ``tanh``.
        adapter_scaling: factor s on the parallel adapter's output (FFN(x) + s * A(x)).
        adapter_layer_norm: a trainable LayerNorm on each adapter's input ("layer norm before
            adapter"; the adapter still starts at 0).
        adapter_location: where the ``pfeiffer`` adapter goes: ``ffn`` (after the FFN, Pfeiffer
            et al.) or ``attention`` (after the attention output projection).
    """

    adapter_reduction_factor: float = 16.0
    adapter_dim: int | None = None
    adapter_activation: Literal["relu", "gelu", "tanh"] = "relu"
    adapter_scaling: float = 1.0
    adapter_layer_norm: bool = False
    adapter_location: Literal["ffn", "attention"] = "ffn"

    def bottleneck_checks(self) -> list[tuple[bool, str]]:
        """``(ok, message)`` for each setting (the config refuses the first one not ok)."""
        method = getattr(self, "method", "")
        return [
            (
                math.isfinite(self.adapter_reduction_factor) and self.adapter_reduction_factor > 0,
                f"adapter_reduction_factor={self.adapter_reduction_factor} must be a number > 0 "
                "(the adapter width is hidden size // factor).",
            ),
            (
                self.adapter_dim is None or self.adapter_dim >= 1,
                f"adapter_dim={self.adapter_dim} must be at least 1 (or omitted).",
            ),
            (
                self.adapter_location == "ffn" or method == "pfeiffer",
                f"adapter_location={self.adapter_location!r} applies to method=pfeiffer only; "
                f"drop it for method={method!r}.",
            ),
        ]


@dataclass
class KernelViewSettings:
    """Settings of the kernel-view adapters (peft_methods.md §2-§3; upstream names in brackets).

    Args:
        prefix_length: prefix-tuning and MAM: virtual tokens per layer (≥ 1); inducer: the key
            MLP's width [prefix_length] (≥ 2), 1 for the bare query, 0 for the bare query with
            the √position logit.
        prefix_dim: inducer: width r of the value MLP [prefix_dim].
        prefix_reparam_dim: prefix-tuning: width of Li & Liang's reparametrisation MLP per layer
            (0: the prefixes train directly).
        inducer_value_extension: add the inducer's value term after W_O (default) rather than
            per head before it.
        inducer_gating_ablation: rescale the pretrained attention by (1 - w), the true prefix
            form [prefix_gating_ablation].
        inducer_value_gating: add a key-based MLP gated by (1 - w) [value_gating]; needs the
            value extension.
        inducer_mh_adapter: the value MLP without w [MH_adapter].
        inducer_lora_q_r: rank of LoRA on the query projection (0: none) [lora="Q"].
        inducer_lora_q_alpha: that LoRA's α (scale α / r).
        inducer_parallel_adapter: add the parallel FFN adapter (inducer-mam), sized by the
            ``adapter_*`` fields.
        kernel_variant: kernel-wise adapter: ``bandwidth``, ``bitfit``, ``kerfit``,
            ``kerfit_sep`` or ``kerfit_X``.
        kernel_shared_bandwidth: one kernel vector for all heads [shared_bandwidth].
        kernel_q_only: adapt the queries only [kernel_Q_only].
        kernel_corresponding: keys use the queries' kernel parameters [corresponding_kernel].
        kmix_q_rank: Kernel-mix head-wise Q rank [lora_Q_rank].
        kmix_v_rank: Kernel-mix head-wise V (and O) rank [lora_V_rank].
        kmix_q_share_rank: Kernel-mix shared Q rank [lora_Q_share_rank].
        kmix_v_share_rank: Kernel-mix shared V (and O) rank [lora_V_share_rank].
        kmix_alpha: Kernel-mix α (scales shared updates by α / r only when α > 1.5).
    """

    prefix_length: int = 10
    prefix_dim: int = 15
    prefix_reparam_dim: int = 0
    inducer_value_extension: bool = True
    inducer_gating_ablation: bool = False
    inducer_value_gating: bool = False
    inducer_mh_adapter: bool = False
    inducer_lora_q_r: int = 0
    inducer_lora_q_alpha: float = 32.0
    inducer_parallel_adapter: bool = False
    kernel_variant: str = "bandwidth"
    kernel_shared_bandwidth: bool = False
    kernel_q_only: bool = False
    kernel_corresponding: bool = False
    kmix_q_rank: int = 3
    kmix_v_rank: int = 8
    kmix_q_share_rank: int = 12
    kmix_v_share_rank: int = 8
    kmix_alpha: float = 1.0


def bottleneck_settings(cfg, placement: str) -> BottleneckConfig:
    """The :class:`BottleneckConfig` of a config with :class:`BottleneckSettings` fields, for
    ``placement`` (the method's own, or ``parallel`` for MAM and inducer-mam, where
    ``adapter_location`` does not apply)."""
    return BottleneckConfig(
        placement=placement,
        reduction_factor=cfg.adapter_reduction_factor,
        dim=cfg.adapter_dim,
        activation=cfg.adapter_activation,
        scaling=cfg.adapter_scaling,
        layer_norm=cfg.adapter_layer_norm,
        location=cfg.adapter_location if placement == "pfeiffer" else "ffn",
    )


def prefix_settings(cfg) -> PrefixConfig:
    """The :class:`PrefixConfig` of a config with :class:`KernelViewSettings` fields."""
    return PrefixConfig(length=cfg.prefix_length, reparam_dim=cfg.prefix_reparam_dim)


def inducer_settings(cfg) -> InducerConfig:
    """The :class:`InducerConfig` of a config (Q-LoRA dropout: ``lora_dropout``)."""
    return InducerConfig(
        prefix_length=cfg.prefix_length,
        prefix_dim=cfg.prefix_dim,
        value_extension=cfg.inducer_value_extension,
        gating_ablation=cfg.inducer_gating_ablation,
        value_gating=cfg.inducer_value_gating,
        mh_adapter=cfg.inducer_mh_adapter,
        lora_q_r=cfg.inducer_lora_q_r,
        lora_q_alpha=cfg.inducer_lora_q_alpha,
        lora_q_dropout=cfg.lora_dropout,
    )


def kernel_settings(cfg) -> KernelAdapterConfig:
    """The :class:`KernelAdapterConfig` of a config."""
    return KernelAdapterConfig(
        variant=cfg.kernel_variant,
        shared_bandwidth=cfg.kernel_shared_bandwidth,
        q_only=cfg.kernel_q_only,
        corresponding=cfg.kernel_corresponding,
    )


def kernel_mix_settings(cfg) -> KernelMixConfig:
    """The :class:`KernelMixConfig` of a config (dropout: ``lora_dropout``)."""
    return KernelMixConfig(
        q_rank=cfg.kmix_q_rank,
        v_rank=cfg.kmix_v_rank,
        q_share_rank=cfg.kmix_q_share_rank,
        v_share_rank=cfg.kmix_v_share_rank,
        alpha=cfg.kmix_alpha,
        dropout=cfg.lora_dropout,
    )
