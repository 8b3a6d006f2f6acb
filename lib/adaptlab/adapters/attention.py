"""Attention with adapters, on every attention backend, through transformers' attention registry.

transformers 5 looks each model's attention function up by ``config._attn_implementation`` in
its ``AttentionInterface``. :func:`install` registers ``adaptlab_<backend>`` for the backend the
model was loaded with (``eager``, ``sdpa``, ``flex_attention``, ``flash_attention_2``) and points
the model's config at it. The function runs the backend unchanged for attention modules without
adapters; for a module with :class:`AttentionAdapter` children it computes, per head
(q: [B, H, T, d], k, v: [B, H_kv, S, d]):

1. ``transform``: each adapter may change q, k, v (kernel-wise bandwidths, Kernel-mix's ΔV).
2. attention, with the keys of ``prefix`` adapters prepended (visible to every query) and, for an
   inducer, the weight of a per-query extra logit s0_i [B, H, T]:
   w_i = exp(s0_i) / (exp(s0_i) + Σ_j exp(s_ij)) = σ(s0_i − LSE_j s_ij), the sum over the keys
   the mask allows (padding and future keys never enter w).
3. ``head_output``: each adapter may change the per-head output [B, H, T, d_v] given w.

How step 2 runs, by backend:

| backend       | no extra keys or logit | prefix keys or an inducer logit                    |
|---------------|------------------------|----------------------------------------------------|
| eager         | the model's own        | explicit logits; w from ``logsumexp`` of them       |
| sdpa          | the model's own        | SDPA, plus one SDPA call on widened heads for w     |
| flash, flex   | the model's own        | the SDPA path (fused kernels that take a mask)      |

The SDPA path never forms the logits: for w, queries get one extra coordinate s0_i / scale,
ordinary keys a 0 there, and one extra key (0, …, 0, 1) gets logit exactly s0_i; with values 0
(ordinary) and 1 (extra) one fused call returns w = σ(s0 − LSE) itself, exact even near 1, and
gradients flow through SDPA's own backward. Attn is the ordinary SDPA call (a single widened
call returning (1 − w)·Attn would lose Attn where w is close to 1). The cost is a second
attention pass of the same size.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PREFIX = "adaptlab_"
BACKENDS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")


@dataclass(frozen=True)
class Context:
    """What an adapter may need besides q, k, v.

    Attributes:
        scaling: the logit scale (1 / √d for these models).
        positions: 1-based positions of the queries, [B or 1, T].
    """

    scaling: float
    positions: torch.Tensor


class AttentionAdapter(nn.Module):
    """Base class of adapters that act inside attention; attach as a child of the attention
    module (:func:`attach`). Every hook defaults to "no change"."""

    n_prefix: int = 0
    has_inducer: bool = False

    def transform(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx: Context
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """New (q [B, H, T, d], k [B, H_kv, S, d], v [B, H_kv, S, d_v])."""
        return query, key, value

    def prefix(self, batch: int, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix keys and values, each [B, H_kv, n_prefix, d] (adapters with n_prefix > 0)."""
        raise TypeError(f"{type(self).__name__} sets n_prefix but defines no prefix().")

    def inducer_logit(self, query: torch.Tensor, ctx: Context) -> torch.Tensor:
        """s0 [B, H, T] from the (transformed) queries (adapters with has_inducer)."""
        raise TypeError(f"{type(self).__name__} sets has_inducer but defines no inducer_logit().")

    def head_output(
        self, attn: torch.Tensor, w: torch.Tensor | None, query: torch.Tensor, ctx: Context
    ) -> torch.Tensor:
        """New per-head output [B, H, T, d] from Attn [B, H, T, d_v] and w [B, H, T] (None
        without an inducer)."""
        return attn


def attached(module: nn.Module) -> list[AttentionAdapter]:
    """The adapters of an attention module, in the order they were attached."""
    return [m for m in module.children() if isinstance(m, AttentionAdapter)]


def attach(attention: nn.Module, name: str, adapter: AttentionAdapter) -> None:
    """Add ``adapter`` to ``attention`` as child ``adaptlab_<name>`` (its parameters are named
    ``…<attention path>.adaptlab_<name>.…``)."""
    attention.add_module(PREFIX + name, adapter)


# ---------------------------------------------------------------------------------------------
# The registered functions


def _base_function(backend: str, module: nn.Module) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if backend == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[backend]


def _make_function(backend: str) -> Callable:
    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        adapters = attached(module)
        if not adapters:
            return _base_function(backend, module)(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                **kwargs,
            )  # fmt: skip
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        ctx = Context(scaling, _positions(query, key, kwargs.get("position_ids")))
        for adapter in adapters:
            query, key, value = adapter.transform(query, key, value, ctx)
        prefixes = [a.prefix(query.shape[0], ctx) for a in adapters if a.n_prefix]
        inducers = [a for a in adapters if a.has_inducer]
        weights = w = None
        if not prefixes and not inducers:
            out, weights = _base_function(backend, module)(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                **kwargs,
            )  # fmt: skip
            attn = out.transpose(1, 2)
        else:
            s0 = inducers[0].inducer_logit(query, ctx) if inducers else None
            causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
            extended = _eager_extended if backend == "eager" else _sdpa_extended
            attn, w, weights = extended(
                query, key, value, attention_mask, scaling, dropout if module.training else 0.0,
                causal, prefixes, s0,
            )  # fmt: skip
        for adapter in adapters:
            attn = adapter.head_output(attn, w, query, ctx)
        return attn.transpose(1, 2).contiguous(), weights

    attention.__name__ = f"adaptlab_{backend}"
    return attention


def _positions(query: torch.Tensor, key: torch.Tensor, position_ids) -> torch.Tensor:
    """1-based query positions [B or 1, T]: the model's ``position_ids`` + 1 when it passes them
    (Llama; packed rows restart at every example), else the last T of the S key positions."""
    t, s = query.shape[2], key.shape[2]
    if position_ids is not None and position_ids.shape[-1] == t:
        return position_ids.reshape(-1, t) + 1
    return (torch.arange(t, device=query.device) + s - t + 1)[None]


def register() -> None:
    """Register the ``adaptlab_<backend>`` attention and mask functions (idempotent)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for backend in BACKENDS:
        name = f"adaptlab_{backend}"
        if name in ALL_ATTENTION_FUNCTIONS._global_mapping:
            continue
        ALL_ATTENTION_FUNCTIONS.register(name, _make_function(backend))
        mask_backend = "flash_attention_2" if backend.startswith("flash") else backend
        mask = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(mask_backend)
        if mask is not None:
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask)


def _configs(model: nn.Module) -> list:
    seen, configs = set(), []
    for module in model.modules():
        config = getattr(module, "config", None)
        if (
            config is not None
            and hasattr(config, "_attn_implementation")
            and id(config) not in seen
        ):
            seen.add(id(config))
            configs.append(config)
    return configs


def install(model: nn.Module) -> str:
    """Route ``model``'s attention through the adapter-aware path; returns the backend name.

    DeBERTa-v2/v3 computes its attention outside transformers' registry: its attention modules
    are patched instead (:mod:`adaptlab.adapters.deberta`)."""
    from adaptlab.adapters.deberta import is_deberta, patch_deberta

    if is_deberta(model):
        patch_deberta(model)
        return "adaptlab_deberta"
    return _install_registry(model)


def _install_registry(model: nn.Module) -> str:
    """Route ``model``'s attention through ``adaptlab_<its backend>``; returns that name.

    Idempotent.
    """
    register()
    name = ""
    for config in _configs(model):
        current = config._attn_implementation or "eager"
        if current.startswith("adaptlab_"):
            name = current
            continue
        if current not in BACKENDS:
            from adaptlab.adapters.families import ArchitectureError

            raise ArchitectureError(
                f"Attention backend {current!r} cannot carry attention adapters; load the model "
                "with attn_implementation eager, sdpa, flex_attention or flash_attention_2."
            )
        name = f"adaptlab_{current}"
        config._attn_implementation_internal = name
    return name


# ---------------------------------------------------------------------------------------------
# Attention with extra keys / an inducer logit


def allowed_keys(
    mask: torch.Tensor | None, batch: int, q_len: int, k_len: int, causal: bool, device
) -> torch.Tensor:
    """Which keys each query may see, bool [B or 1, 1, T, S], from a backend's mask.

    Args:
        mask: None (no padding), a padding mask [B, S] (1 = token), a bool mask
            [B, 1, T, S] (True = visible) or an additive float mask [B, 1, T, S].
        causal: whether the attention is causal (applied when the mask does not carry it:
            None or a padding mask). Queries are the last ``q_len`` of ``k_len`` positions.
    """
    if mask is not None and hasattr(mask, "mask_mod"):  # flex attention's BlockMask
        return _dense_block_mask(mask, batch, q_len, k_len, device)
    if mask is not None and mask.dim() == 4:
        if mask.dtype == torch.bool:
            return mask
        return mask > -1e3  # blocked: the dtype's minimum (or the old -10000 convention)
    if causal:
        offset = k_len - q_len
        rows = torch.arange(q_len, device=device)[:, None] + offset
        visible = torch.arange(k_len, device=device)[None, :] <= rows
    else:
        visible = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    visible = visible[None, None]
    if mask is not None:  # [B, S] padding
        visible = visible & mask.bool()[:, None, None, :]
    return visible


def _dense_block_mask(mask, batch: int, q_len: int, k_len: int, device) -> torch.Tensor:
    """The token-level bool [B, 1, T, S] of a flex ``BlockMask`` (its ``mask_mod`` on a grid)."""
    b = torch.arange(batch, device=device)[:, None, None, None]
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    q = torch.arange(q_len, device=device)[None, None, :, None]
    kv = torch.arange(k_len, device=device)[None, None, None, :]
    return mask.mask_mod(b, h, q, kv).expand(batch, 1, q_len, k_len)


def _repeat(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _with_prefixes(
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor,
    prefixes: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not prefixes:
        return key, value, visible
    pk = torch.cat([p[0] for p in prefixes], dim=2).to(key.dtype)
    pv = torch.cat([p[1] for p in prefixes], dim=2).to(value.dtype)
    shape = (*visible.shape[:-1], pk.shape[2])
    ones = torch.ones(shape, dtype=torch.bool, device=visible.device)
    return torch.cat([pk, key], 2), torch.cat([pv, value], 2), torch.cat([ones, visible], -1)


def _eager_extended(query, key, value, mask, scaling, dropout, causal, prefixes, s0, bias=None):
    """Explicit attention: returns (Attn [B, H, T, d_v], w [B, H, T] or None, probabilities).

    ``bias`` [B, H, T, S] is added to the ordinary logits (DeBERTa's relative-position terms;
    prefix keys get none)."""
    groups = query.shape[1] // key.shape[1]
    visible = allowed_keys(mask, query.shape[0], query.shape[2], key.shape[2], causal, query.device)
    key, value, visible = _with_prefixes(key, value, visible, prefixes)
    key, value = _repeat(key, groups), _repeat(value, groups)
    logits = torch.matmul(query, key.transpose(2, 3)) * scaling
    if bias is not None:
        n_prefix = logits.shape[-1] - bias.shape[-1]
        logits = logits + F.pad(bias.to(logits.dtype), (n_prefix, 0))
    logits = logits.float().masked_fill(~visible, torch.finfo(torch.float32).min)
    probs = torch.softmax(logits, dim=-1)
    w = None
    if s0 is not None:
        w = torch.sigmoid(s0.float() - torch.logsumexp(logits, dim=-1)).to(query.dtype)
    probs = probs.to(query.dtype)
    dropped = F.dropout(probs, p=dropout) if dropout > 0 else probs
    return torch.matmul(dropped, value), w, probs


def _sdpa_extended(query, key, value, mask, scaling, dropout, causal, prefixes, s0):
    """Attention through SDPA; returns (Attn [B, H, T, d_v], w [B, H, T] or None, None).

    Attn is the ordinary SDPA call (prefix keys prepended). w is a second SDPA call on widened
    heads (module docstring): queries [q, s0 / scale, 0…], keys [k, 0, 0…] and one extra key
    [0…, 1, 0…] whose logit is exactly s0; the values are 0 for the ordinary keys and 1 for the
    extra one, so the output is w. Both calls keep SDPA's fused kernels and memory; w is exact
    even where it is close to 1 (a single call that returned (1 − w)·Attn could not give Attn
    back there).
    """
    groups = query.shape[1] // key.shape[1]
    visible = allowed_keys(mask, query.shape[0], query.shape[2], key.shape[2], causal, query.device)
    key, value, visible = _with_prefixes(key, value, visible, prefixes)
    key, value = _repeat(key, groups), _repeat(value, groups)
    attn = F.scaled_dot_product_attention(
        query, key, value, attn_mask=visible, dropout_p=dropout, scale=scaling
    )
    if s0 is None:
        return attn, None, None
    b, h, _, d = query.shape
    pad = _WIDEN  # keeps head sizes multiples of 8 for the fused kernels
    q = torch.cat([query, (s0 / scaling).unsqueeze(-1).to(query.dtype)], dim=-1)
    q = F.pad(q, (0, pad - 1))
    k_extra = query.new_zeros(b, h, 1, d + pad)
    k_extra[..., d] = 1
    v_ord = value.new_zeros(b, h, key.shape[2], pad)
    v_extra = value.new_zeros(b, h, 1, pad)
    v_extra[..., 0] = 1
    ones = torch.ones((*visible.shape[:-1], 1), dtype=torch.bool, device=visible.device)
    out = F.scaled_dot_product_attention(
        q,
        torch.cat([k_extra, F.pad(key, (0, pad))], dim=2),
        torch.cat([v_extra, v_ord], dim=2),
        attn_mask=torch.cat([ones, visible], dim=-1),
        scale=scaling,
    )
    return attn, out[..., 0], None


_WIDEN = 8


__all__ = [
    "AttentionAdapter",
    "Context",
    "allowed_keys",
    "attach",
    "attached",
    "install",
    "register",
]
