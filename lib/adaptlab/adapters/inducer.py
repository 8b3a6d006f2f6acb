"""Inducer-tuning (Chen et al., EMNLP 2022): one inducer per query, placed near it.

Per head h and query q_i ∈ R^d (after RoPE on Llama), with s_ij the model's own logits:

- inducer logit s0_i: ⟨q_i, q_i + M_k(q_i)⟩/√d if ``prefix_length`` L ≥ 2 (M_k: per-head MLP
  d -> L -> d, tanh); ⟨q_i, q_i⟩/√d if L = 1; that × √i (1-based position) if L = 0.
- weight w_i = softmax([s0_i, s_i1 … s_in])[0] over the keys the mask allows (no padding).
- value extension (default): W_O·Attn(q; K, V) + Σ_h w_{h,i}·B_h tanh(A_h q_{h,i} + a_h) + b,
  A_h: r x d, r = ``prefix_dim``, added after W_O.
- no value extension: per head Attn + w·M_v(q) before W_O (M_v: d -> r -> d, tanh).

The pretrained attention is not rescaled by (1 − w) unless ``gating_ablation`` (the true prefix
form (1 − w)·Attn + w·P_v). ``value_gating`` adds a key-based MLP read through the model's own
attention and gated by (1 − w): per head (1 − w_i)·Σ_j p_ij M_g(k_j) (needs the value
extension). ``mh_adapter`` adds the value MLP with no w at all (a multi-head adapter on q).
``lora_q_r`` > 0 adds LoRA on the query projection (the inducer-lora configuration).

w comes from :mod:`adaptlab.adapters.attention` on every backend (σ(s0 − LSE), never the eager
fallback). Upstream's NLU code adds the padding mask after computing w, so padded keys entered
w's denominator; here they do not.

Initialisation: truncated normal (std 0.01, cut at ±2 std) on every weight, zero biases, as
upstream; :meth:`Inducer.output_parameters` are the weights that, at zero, make the model
exactly the pretrained one (not with ``gating_ablation``, which rescales Attn by 1 − w).

Quick start::

    config = InducerConfig(prefix_length=10, prefix_dim=15)
    attach_inducer(model, config)       # trains the parameters under "adaptlab_inducer"
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from adaptlab.adapters.attention import AttentionAdapter, Context, attach, install
from adaptlab.adapters.families import (
    Family,
    Geometry,
    add_after_output,
    add_to_projection,
    blocks,
    family_of,
    geometry,
)
from adaptlab.adapters.folder import AdapterKind, register_kind
from adaptlab.adapters.query_lora import QueryLoRA
from adaptlab.errors import UserError
from adaptlab.extract.points import unwrap

NAME = "inducer"
_CONFIG_ATTRIBUTE = "_adaptlab_inducer"


class InducerError(UserError):
    """An inducer setting that cannot work."""


@dataclass(frozen=True)
class InducerConfig:
    """Inducer-tuning settings (upstream names in brackets).

    Attributes:
        prefix_length: L [prefix_length]: ≥ 2 the key MLP's width; 1 the bare query; 0 the
            bare query with the √position logit.
        prefix_dim: r [prefix_dim], the value MLP's width.
        value_extension: add the value term after W_O (default) rather than per head before it.
        gating_ablation: rescale the pretrained attention by (1 − w) [prefix_gating_ablation].
        value_gating: add the (1 − w)-gated key-based MLP [value_gating].
        mh_adapter: the value MLP without w [MH_adapter].
        lora_q_r: rank of LoRA on the query projection (0: none) [lora="Q"].
        lora_q_alpha: its α (scale α / r).
        lora_q_dropout: dropout on its input.
    """

    prefix_length: int = 10
    prefix_dim: int = 15
    value_extension: bool = True
    gating_ablation: bool = False
    value_gating: bool = False
    mh_adapter: bool = False
    lora_q_r: int = 0
    lora_q_alpha: float = 32.0
    lora_q_dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.prefix_length < 0:
            raise InducerError(
                f"prefix_length={self.prefix_length} must be ≥ 0 for the inducer (0: √position "
                "logit, 1: the bare query, ≥ 2: the key MLP's width)."
            )
        if self.prefix_dim < 1:
            raise InducerError(f"prefix_dim={self.prefix_dim} must be at least 1 (the value MLP).")
        if self.lora_q_r < 0:
            raise InducerError(f"inducer_lora_q_r={self.lora_q_r} must be ≥ 0 (0: no Q-LoRA).")
        if self.value_gating and not self.value_extension:
            raise InducerError(
                "value_gating needs the value extension; set inducer_value_extension true or "
                "drop inducer_value_gating."
            )
        if self.mh_adapter and (self.gating_ablation or self.value_gating):
            raise InducerError(
                "mh_adapter has no inducer weight w, so it cannot be combined with "
                "gating_ablation or value_gating; drop one of them."
            )


def _trunc(*shape: int) -> nn.Parameter:
    weight = torch.empty(*shape)
    nn.init.trunc_normal_(weight, std=0.01, a=-0.02, b=0.02)
    return nn.Parameter(weight)


def _zeros(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape))


def _head_mlp(x: torch.Tensor, down, down_bias, up=None, up_bias=None) -> torch.Tensor:
    """Per-head MLP: x [B, H, T, d] -> tanh(x A_hᵀ + a_h) [B, H, T, r] (-> ·B_hᵀ + b_h [.., d])."""
    hidden = torch.tanh(torch.einsum("bhtd,hrd->bhtr", x, down) + down_bias[:, None, :])
    if up is None:
        return hidden
    return torch.einsum("bhtr,hdr->bhtd", hidden, up) + up_bias[:, None, :]


class Inducer(AttentionAdapter):
    """The inducer of one attention module.

    Parameters (H heads of d, H_kv key heads, r = prefix_dim, L = prefix_length, hidden):
        key_down [H, L, d], key_down_bias [H, L], key_up [H, d, L], key_up_bias [H, d] (L ≥ 2);
        value_down [H, r, d], value_down_bias [H, r];
        value extension: value_up (Linear H·r -> hidden, with bias);
        otherwise: value_up_heads [H, d, r], value_up_heads_bias [H, d];
        value_gating: gate_down [H_kv, r, d], gate_down_bias [H_kv, r], gate_up [H_kv, d, r],
        gate_up_bias [H_kv, d].
    """

    def __init__(self, geo: Geometry, config: InducerConfig) -> None:
        super().__init__()
        self.config = config
        self.has_inducer = not config.mh_adapter
        h, d, r, length = geo.heads, geo.head_dim, config.prefix_dim, config.prefix_length
        if length >= 2 and self.has_inducer:
            self.key_down, self.key_down_bias = _trunc(h, length, d), _zeros(h, length)
            self.key_up, self.key_up_bias = _trunc(h, d, length), _zeros(h, d)
        self.value_down, self.value_down_bias = _trunc(h, r, d), _zeros(h, r)
        if config.value_extension or config.mh_adapter:
            self.value_up = nn.Linear(h * r, geo.hidden)
            nn.init.trunc_normal_(self.value_up.weight, std=0.01, a=-0.02, b=0.02)
            nn.init.zeros_(self.value_up.bias)
        else:
            self.value_up_heads, self.value_up_heads_bias = _trunc(h, d, r), _zeros(h, d)
        if config.value_gating:
            self.gate_down, self.gate_down_bias = (
                _trunc(geo.kv_heads, r, d),
                _zeros(geo.kv_heads, r),
            )
            self.gate_up, self.gate_up_bias = _trunc(geo.kv_heads, d, r), _zeros(geo.kv_heads, d)
        self._pending: torch.Tensor | None = None

    def output_parameters(self) -> list[nn.Parameter]:
        """The weights that, at zero, leave the model's outputs unchanged (see the module doc)."""
        if hasattr(self, "value_up"):
            params = [self.value_up.weight, self.value_up.bias]
        else:
            params = [self.value_up_heads, self.value_up_heads_bias]
        if self.config.value_gating:
            params += [self.gate_up, self.gate_up_bias]
        return params

    # -- attention hooks ------------------------------------------------------------------------

    def transform(self, query, key, value, ctx: Context):
        if not self.config.value_gating:
            return query, key, value
        gate = _head_mlp(key, self.gate_down, self.gate_down_bias, self.gate_up, self.gate_up_bias)
        return query, key, torch.cat([value, gate.to(value.dtype)], dim=-1)

    def inducer_logit(self, query: torch.Tensor, ctx: Context) -> torch.Tensor:
        if self.config.prefix_length >= 2:
            mk = _head_mlp(query, self.key_down, self.key_down_bias, self.key_up, self.key_up_bias)
            return (query * (query + mk)).sum(-1) * ctx.scaling
        s0 = query.pow(2).sum(-1) * ctx.scaling
        if self.config.prefix_length == 0:
            s0 = s0 * ctx.positions.to(s0.dtype).sqrt()[:, None, :]  # [B or 1, 1, T]
        return s0

    def head_output(self, attn, w, query, ctx: Context):
        d = query.shape[-1]
        if self.config.value_gating:
            attn = attn[..., :d] + (1 - w).unsqueeze(-1) * attn[..., d:]
        if self.config.gating_ablation:
            attn = (1 - w).unsqueeze(-1) * attn
        hidden = _head_mlp(query, self.value_down, self.value_down_bias)  # [B, H, T, r]
        weight = torch.ones_like(hidden[..., 0]) if w is None else w.to(hidden.dtype)
        if hasattr(self, "value_up"):
            gated = (weight.unsqueeze(-1) * hidden).transpose(1, 2).flatten(2)  # [B, T, H·r]
            self._pending = self.value_up(gated)
            return attn
        value = torch.einsum("bhtr,hdr->bhtd", hidden, self.value_up_heads)
        value = value + self.value_up_heads_bias[:, None, :]
        return attn + weight.unsqueeze(-1) * value.to(attn.dtype)

    def take_pending(self) -> torch.Tensor:
        """The value-extension term [B, T, hidden] of the current forward (added after W_O)."""
        term, self._pending = self._pending, None
        if term is None:
            raise RuntimeError("The inducer's value term was not computed in this forward.")
        return term


# ---------------------------------------------------------------------------------------------
# Attaching


def check(model: nn.Module, config: InducerConfig) -> Family:
    """The family of ``model`` if the inducer can attach to it (works on a meta skeleton)."""
    return family_of(model, "Inducer-tuning")


def attach_inducer(model: nn.Module, config: InducerConfig) -> list[Inducer]:
    """Add an inducer (and Q-LoRA when ``lora_q_r`` > 0) to every attention module of ``model``.

    New parameters have ``requires_grad=True`` and the model's dtype and device; the model's
    attention is routed through the adapter-aware function (:func:`attention.install`).

    Returns:
        The inducers, in block order.
    """
    family = check(model, config)
    base = unwrap(model)
    if hasattr(base, _CONFIG_ATTRIBUTE):
        raise InducerError(f"{type(base).__name__} already has inducers attached.")
    geo = geometry(base)
    reference = next(base.parameters())
    inducers = []
    for block in blocks(base):
        attention = block.get_submodule(family.attention)
        inducer = Inducer(geo, config).to(device=reference.device, dtype=reference.dtype)
        attach(attention, NAME, inducer)
        if hasattr(inducer, "value_up"):
            add_after_output(block, family, inducer.take_pending)
        if config.lora_q_r:
            lora = QueryLoRA(geo.hidden, geo.heads * geo.head_dim, config.lora_q_r,
                             config.lora_q_alpha, config.lora_q_dropout)  # fmt: skip
            lora.to(device=reference.device, dtype=reference.dtype)
            attention.add_module("adaptlab_query_lora", lora)
            add_to_projection(block, family, "q", lora)
        inducers.append(inducer)
    install(base)
    setattr(base, _CONFIG_ATTRIBUTE, config)
    return inducers


def inducer_config(model: nn.Module) -> InducerConfig | None:
    """The config of the inducers attached to ``model``, or ``None``."""
    return getattr(unwrap(model), _CONFIG_ATTRIBUTE, None)


def parameter_count(geo: Geometry, layers: int, config: InducerConfig) -> int:
    """Closed-form number of trainable inducer parameters (for the tests and the docs)."""
    h, d, r, length = geo.heads, geo.head_dim, config.prefix_dim, config.prefix_length
    per_layer = h * (r * d + r)  # value_down + bias
    if length >= 2 and not config.mh_adapter:
        per_layer += h * (length * d + length) + h * (d * length + d)
    if config.value_extension or config.mh_adapter:
        per_layer += h * r * geo.hidden + geo.hidden
    else:
        per_layer += h * (d * r + d)
    if config.value_gating:
        per_layer += geo.kv_heads * (r * d + r + d * r + d)
    if config.lora_q_r:
        per_layer += config.lora_q_r * (geo.hidden + h * d)
    return layers * per_layer


def _is_parameter(name: str) -> bool:
    return any(part in ("adaptlab_inducer", "adaptlab_query_lora") for part in name.split("."))


register_kind(
    AdapterKind(
        name="inducer",
        from_dict=lambda data: InducerConfig(**data),
        to_dict=asdict,
        attach=attach_inducer,
        config_of=inducer_config,
        is_parameter=_is_parameter,
    )
)
