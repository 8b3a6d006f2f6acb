"""Kernel-mix (Chen et al., NAACL Findings 2022): head-wise low-rank updates of Q, V and O.

Upstream ``lora="QVO"``, ``lora_head=true``, ``lora_head_base="XKA"``: each head gets its own
low-rank update, with the input basis chosen per target, plus full-width shared updates:

| target | head-wise update (per head h)                    | shared update            |
|--------|--------------------------------------------------|--------------------------|
| Q      | ΔQ_h = B_h A_h x (x: the hidden state), rank r_Q | B A x, rank r_Q,share    |
| V      | ΔV_h = B_h A_h k_h (that head's key), rank r_V   | B A x, rank r_V,share    |
| O      | ΔO = B·concat_h(A_h a_h) (a_h: head output), r_V | B A a, rank r_V,share    |

Defaults r_Q 3, r_V 8, r_Q,share 12, r_V,share 8. Every A and B has a bias (upstream: biases
on); weights start truncated-normal (std 0.01, Houlsby's init), biases zero; dropout (0.1) on
the inputs of A. Head-wise updates have scale 1; shared ones α / r, and only when α > 1.5
(upstream's rule; Kernel-mix leaves α = 1, so every scale is 1). On Llama k_h is the key after
RoPE (the key the attention function sees) and V's key-based update belongs to key/value heads.

Quick start::

    attach_kernel_mix(model, KernelMixConfig())
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from adaptlab.adapters.attention import AttentionAdapter, Context, attach, install
from adaptlab.adapters.families import (
    Geometry,
    add_to_output,
    add_to_projection,
    blocks,
    family_of,
    geometry,
)
from adaptlab.adapters.folder import AdapterKind, register_kind
from adaptlab.errors import UserError
from adaptlab.extract.points import unwrap

NAME = "kernel_mix"
_CONFIG_ATTRIBUTE = "_adaptlab_kernel_mix"


class KernelMixError(UserError):
    """A Kernel-mix setting that cannot work."""


@dataclass(frozen=True)
class KernelMixConfig:
    """Ranks (upstream ``lora_Q_rank``, ``lora_V_rank``, ``lora_Q_share_rank``,
    ``lora_V_share_rank``; O reuses the V ranks), α, dropout. A rank of 0 drops that term."""

    q_rank: int = 3
    v_rank: int = 8
    q_share_rank: int = 12
    v_share_rank: int = 8
    alpha: float = 1.0
    dropout: float = 0.1

    def __post_init__(self) -> None:
        ranks = {
            "kmix_q_rank": self.q_rank,
            "kmix_v_rank": self.v_rank,
            "kmix_q_share_rank": self.q_share_rank,
            "kmix_v_share_rank": self.v_share_rank,
        }
        for name, rank in ranks.items():
            if rank < 0:
                raise KernelMixError(f"{name}={rank} must be ≥ 0 (0 drops that update).")
        if not any(ranks.values()):
            raise KernelMixError("Every Kernel-mix rank is 0, so nothing would train; set one ≥ 1.")

    def share_scale(self, rank: int) -> float:
        """α / r for a shared update when α > 1.5, else 1."""
        return self.alpha / rank if self.alpha > 1.5 else 1.0


def _houlsby(module: nn.Linear) -> nn.Linear:
    nn.init.trunc_normal_(module.weight, std=0.01, a=-0.02, b=0.02)
    nn.init.zeros_(module.bias)
    return module


def _trunc(*shape: int) -> nn.Parameter:
    weight = torch.empty(*shape)
    nn.init.trunc_normal_(weight, std=0.01, a=-0.02, b=0.02)
    return nn.Parameter(weight)


class _Shared(nn.Module):
    """x [.., n_in] -> scale · B(A(dropout(x))) [.., n_out]."""

    def __init__(self, n_in: int, n_out: int, rank: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.A, self.B = _houlsby(nn.Linear(n_in, rank)), _houlsby(nn.Linear(rank, n_out))
        self.dropout, self.scale = nn.Dropout(dropout), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(self.dropout(x))) * self.scale


class KernelMix(AttentionAdapter):
    """The Kernel-mix updates of one attention module.

    Parameters (H heads of d, H_kv key/value heads, hidden):
        q_A (Linear hidden -> H·r_Q), q_B [H, d, r_Q], q_B_bias [H, d];
        v_A [H_kv, r_V, d], v_A_bias [H_kv, r_V], v_B [H_kv, d, r_V], v_B_bias [H_kv, d];
        o_A [H, r_V, d], o_A_bias [H, r_V], o_B (Linear H·r_V -> hidden);
        q_share, v_share, o_share: :class:`_Shared` (A, B Linears).
    """

    def __init__(self, geo: Geometry, config: KernelMixConfig) -> None:
        super().__init__()
        self.config, self.geo = config, geo
        h, hkv, d, hidden = geo.heads, geo.kv_heads, geo.head_dim, geo.hidden
        rq, rv = config.q_rank, config.v_rank
        self.dropout = nn.Dropout(config.dropout)
        if rq:
            self.q_A = _houlsby(nn.Linear(hidden, h * rq))
            self.q_B, self.q_B_bias = _trunc(h, d, rq), nn.Parameter(torch.zeros(h, d))
        if rv:
            self.v_A, self.v_A_bias = _trunc(hkv, rv, d), nn.Parameter(torch.zeros(hkv, rv))
            self.v_B, self.v_B_bias = _trunc(hkv, d, rv), nn.Parameter(torch.zeros(hkv, d))
            self.o_A, self.o_A_bias = _trunc(h, rv, d), nn.Parameter(torch.zeros(h, rv))
            self.o_B = _houlsby(nn.Linear(h * rv, hidden))
        drop = config.dropout
        if config.q_share_rank:
            r = config.q_share_rank
            self.q_share = _Shared(hidden, h * d, r, config.share_scale(r), drop)
        if config.v_share_rank:
            r = config.v_share_rank
            self.v_share = _Shared(hidden, hkv * d, r, config.share_scale(r), drop)
            self.o_share = _Shared(h * d, hidden, r, config.share_scale(r), drop)

    def output_parameters(self) -> list[nn.Parameter]:
        """Every B (weights and biases): at zero all updates are zero."""
        params = []
        for name in ("q_B", "q_B_bias", "v_B", "v_B_bias"):
            if hasattr(self, name):
                params.append(getattr(self, name))
        for name in ("o_B",):
            if hasattr(self, name):
                params += [self.o_B.weight, self.o_B.bias]
        for name in ("q_share", "v_share", "o_share"):
            if hasattr(self, name):
                shared = getattr(self, name)
                params += [shared.B.weight, shared.B.bias]
        return params

    def delta_q(self, x: torch.Tensor) -> torch.Tensor:
        """ΔQ [B, T, H·d] from the hidden state x [B, T, hidden]."""
        h, rq = self.geo.heads, self.config.q_rank
        out = 0
        if rq:
            low = self.q_A(self.dropout(x)).unflatten(-1, (h, rq))  # [B, T, H, r]
            out = (torch.einsum("bthr,hdr->bthd", low, self.q_B) + self.q_B_bias).flatten(2)
        if hasattr(self, "q_share"):
            out = out + self.q_share(x)
        return out

    def delta_v_shared(self, x: torch.Tensor) -> torch.Tensor:
        """The shared ΔV [B, T, H_kv·d] from x."""
        return self.v_share(x)

    def delta_o(self, a: torch.Tensor) -> torch.Tensor:
        """ΔO [B, T, hidden] from the concatenated head outputs a [B, T, H·d]."""
        out = 0
        if self.config.v_rank:
            heads = self.dropout(a).unflatten(-1, (self.geo.heads, self.geo.head_dim))
            low = torch.einsum("bthd,hrd->bthr", heads, self.o_A) + self.o_A_bias
            out = self.o_B(low.flatten(2))
        if hasattr(self, "o_share"):
            out = out + self.o_share(a)
        return out

    def transform(self, query, key, value, ctx: Context):
        if not self.config.v_rank:
            return query, key, value
        low = torch.einsum("bhsd,hrd->bhsr", self.dropout(key), self.v_A)
        low = low + self.v_A_bias[:, None, :]
        delta = torch.einsum("bhsr,hdr->bhsd", low, self.v_B) + self.v_B_bias[:, None, :]
        return query, key, value + delta.to(value.dtype)


def attach_kernel_mix(model: nn.Module, config: KernelMixConfig) -> list[KernelMix]:
    """Add Kernel-mix to every attention module of ``model``; returns the modules in block order."""
    family = family_of(model, "Kernel-mix")
    base = unwrap(model)
    if hasattr(base, _CONFIG_ATTRIBUTE):
        raise KernelMixError(f"{type(base).__name__} already has Kernel-mix attached.")
    geo = geometry(base)
    reference = next(base.parameters())
    modules = []
    for block in blocks(base):
        mix = KernelMix(geo, config).to(device=reference.device, dtype=reference.dtype)
        attach(block.get_submodule(family.attention), NAME, mix)
        if config.q_rank or config.q_share_rank:
            add_to_projection(block, family, "q", mix.delta_q)
        if config.v_share_rank:
            add_to_projection(block, family, "v", mix.delta_v_shared)
        if config.v_rank or config.v_share_rank:
            add_to_output(block, family, mix.delta_o)
        modules.append(mix)
    install(base)
    setattr(base, _CONFIG_ATTRIBUTE, config)
    return modules


def kernel_mix_config(model: nn.Module) -> KernelMixConfig | None:
    """The config of the Kernel-mix attached to ``model``, or ``None``."""
    return getattr(unwrap(model), _CONFIG_ATTRIBUTE, None)


def parameter_count(geo: Geometry, layers: int, config: KernelMixConfig) -> int:
    """Closed-form number of trainable Kernel-mix parameters."""
    h, hkv, d, hidden = geo.heads, geo.kv_heads, geo.head_dim, geo.hidden
    rq, rv, rqs, rvs = config.q_rank, config.v_rank, config.q_share_rank, config.v_share_rank
    per_layer = 0
    if rq:
        per_layer += (hidden + 1) * h * rq + h * (d * rq + d)
    if rv:
        per_layer += hkv * (rv * d + rv) + hkv * (d * rv + d)  # V from keys
        per_layer += h * (rv * d + rv) + (h * rv + 1) * hidden  # O from head outputs
    if rqs:
        per_layer += (hidden + 1) * rqs + (rqs + 1) * h * d
    if rvs:
        per_layer += (hidden + 1) * rvs + (rvs + 1) * hkv * d  # shared V
        per_layer += (h * d + 1) * rvs + (rvs + 1) * hidden  # shared O
    return layers * per_layer


def _is_parameter(name: str) -> bool:
    return any(part in ("adaptlab_kernel_mix",) for part in name.split("."))


register_kind(
    AdapterKind(
        name="kernel_mix",
        from_dict=lambda data: KernelMixConfig(**data),
        to_dict=asdict,
        attach=attach_kernel_mix,
        config_of=kernel_mix_config,
        is_parameter=_is_parameter,
    )
)
