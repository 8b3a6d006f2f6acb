"""Prefix-tuning (Li & Liang 2021) on the attention hooks, for every backend.

Each layer gets l virtual tokens per key/value head, P_k and P_v [H_kv, l, d], visible to every
query (padding and the causal mask do not apply to them):
  out_i = (1 − λ_i)·Attn(q_i; K, V) + λ_i·Attn(q_i; P_k, P_v),
  λ_i = Σ_p κ(q_i, P_k,p) / (Σ_p κ(q_i, P_k,p) + Σ_j κ(q_i, k_j)),
i.e. attention over [P_k; K] and [P_v; V] (:mod:`adaptlab.adapters.attention`). On Llama the
prefix keys carry no rotary embedding (as cached keys of PEFT's prefix tuning do not).

PEFT's own prefix tuning passes the prefixes as a key/value cache, which breaks with gradient
checkpointing and on RoBERTa sequence classification; this one is part of the attention call, so
neither matters. Prefixes are trained directly, or through Li & Liang's reparametrisation
(``reparam_dim`` > 0: P = MLP(E), E [l, hidden], MLP hidden -> reparam_dim -> 2·H_kv·d, tanh;
the MLP is part of the saved adapter).

Initialisation: N(0, ``init_std``²) (or the MLP's default init).

Quick start::

    attach_prefix(model, PrefixConfig(length=10))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from adaptlab.adapters.attention import AttentionAdapter, Context, attach, install
from adaptlab.adapters.families import Geometry, blocks, family_of, geometry
from adaptlab.adapters.folder import AdapterKind, register_kind
from adaptlab.errors import UserError
from adaptlab.extract.points import unwrap

NAME = "prefix"
_CONFIG_ATTRIBUTE = "_adaptlab_prefix"


class PrefixError(UserError):
    """A prefix-tuning setting that cannot work."""


@dataclass(frozen=True)
class PrefixConfig:
    """Attributes:
    length: l, virtual tokens per layer (≥ 1).
    reparam_dim: width of the reparametrisation MLP (0: train P directly).
    init_std: std of the direct prefixes' normal init.
    """

    length: int = 10
    reparam_dim: int = 0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.length < 1:
            raise PrefixError(f"prefix_length={self.length} must be at least 1 for prefix-tuning.")
        if self.reparam_dim < 0:
            raise PrefixError(f"prefix_reparam_dim={self.reparam_dim} must be ≥ 0 (0: direct).")


class Prefix(AttentionAdapter):
    """The prefixes of one attention module: ``prefix_key``, ``prefix_value`` [H_kv, l, d]
    (or ``embedding`` [l, hidden] and ``mlp`` with ``reparam_dim``)."""

    def __init__(self, geo: Geometry, config: PrefixConfig) -> None:
        super().__init__()
        self.n_prefix = config.length
        self.kv_heads, self.head_dim = geo.kv_heads, geo.head_dim
        shape = (geo.kv_heads, config.length, geo.head_dim)
        if config.reparam_dim:
            self.embedding = nn.Parameter(torch.randn(config.length, geo.hidden) * config.init_std)
            self.mlp = nn.Sequential(
                nn.Linear(geo.hidden, config.reparam_dim),
                nn.Tanh(),
                nn.Linear(config.reparam_dim, 2 * geo.kv_heads * geo.head_dim),
            )
        else:
            self.prefix_key = nn.Parameter(torch.randn(shape) * config.init_std)
            self.prefix_value = nn.Parameter(torch.randn(shape) * config.init_std)

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """P_k, P_v [H_kv, l, d]."""
        if hasattr(self, "mlp"):
            flat = self.mlp(self.embedding)  # [l, 2 * H_kv * d]
            kv = flat.view(self.n_prefix, 2, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
            return kv[0], kv[1]
        return self.prefix_key, self.prefix_value

    def prefix(self, batch: int, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
        pk, pv = self.keys_values()
        return pk.expand(batch, *pk.shape), pv.expand(batch, *pv.shape)


def attach_prefix(model: nn.Module, config: PrefixConfig) -> list[Prefix]:
    """Add prefixes to every attention module of ``model`` and route its attention through the
    adapter-aware function. Returns the prefix modules in block order."""
    family = family_of(model, "Prefix-tuning")
    base = unwrap(model)
    if hasattr(base, _CONFIG_ATTRIBUTE):
        raise PrefixError(f"{type(base).__name__} already has prefixes attached.")
    geo = geometry(base)
    reference = next(base.parameters())
    modules = []
    for block in blocks(base):
        prefix = Prefix(geo, config).to(device=reference.device, dtype=reference.dtype)
        attach(block.get_submodule(family.attention), NAME, prefix)
        modules.append(prefix)
    install(base)
    setattr(base, _CONFIG_ATTRIBUTE, config)
    return modules


def prefix_config(model: nn.Module) -> PrefixConfig | None:
    """The config of the prefixes attached to ``model``, or ``None``."""
    return getattr(unwrap(model), _CONFIG_ATTRIBUTE, None)


def parameter_count(geo: Geometry, layers: int, config: PrefixConfig) -> int:
    """Closed-form number of trainable prefix parameters."""
    if config.reparam_dim:
        width = 2 * geo.kv_heads * geo.head_dim
        per_layer = config.length * geo.hidden + (geo.hidden + 1) * config.reparam_dim
        return layers * (per_layer + (config.reparam_dim + 1) * width)
    return layers * 2 * geo.kv_heads * config.length * geo.head_dim


def _is_parameter(name: str) -> bool:
    return any(part in ("adaptlab_prefix",) for part in name.split("."))


register_kind(
    AdapterKind(
        name="prefix",
        from_dict=lambda data: PrefixConfig(**data),
        to_dict=asdict,
        attach=attach_prefix,
        config_of=prefix_config,
        is_parameter=_is_parameter,
    )
)
