"""Attention adapters on DeBERTa-v2/v3, whose disentangled attention bypasses transformers'
attention registry.

``DisentangledSelfAttention`` computes its logits itself: content-to-content q·k plus the
relative-position terms (c2p, p2c), all scaled by 1/√(d · (1 + #terms)), then a masked softmax.
:func:`patch_deberta` replaces the ``forward`` of each such module that carries adapters with
:func:`adapted_forward`, which computes the same logits (the relative terms through the module's
own ``disentangled_attention_bias``) and then runs the explicit path of
:mod:`adaptlab.adapters.attention`: the adapters' ``transform`` before the logits (kernel-wise
bandwidths scale q and k in the relative terms too), prefix keys with no relative term, the
inducer's w over the visible keys, ``head_output`` after. A module without adapters keeps the
model's own forward. With every adapter's output weights at zero the model is the pretrained one
(tested to 1e-6).
"""

from __future__ import annotations

import types

import torch
from torch import nn

from adaptlab.adapters.attention import Context, _eager_extended, attached
from adaptlab.extract.points import unwrap

_PATCHED = "_adaptlab_patched"


def is_deberta(model: nn.Module) -> bool:
    """Whether ``model`` is a DeBERTa-v2/v3 model (``model_type`` ``deberta-v2``)."""
    config = getattr(unwrap(model), "config", None)
    return getattr(config, "model_type", "") == "deberta-v2"


def _is_attention(module: nn.Module) -> bool:
    return type(module).__name__ == "DisentangledSelfAttention"


def patch_deberta(model: nn.Module) -> None:
    """Give each disentangled attention module of ``model`` :func:`adapted_forward` (idempotent)."""
    for module in unwrap(model).modules():
        if _is_attention(module) and not getattr(module, _PATCHED, False):
            module.forward = types.MethodType(adapted_forward, module)
            setattr(module, _PATCHED, True)


def _heads(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[B, T, H·d] -> [B, H, T, d]."""
    return x.unflatten(-1, (module.num_attention_heads, -1)).transpose(1, 2)


def adapted_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    output_attentions: bool = False,
    query_states: torch.Tensor | None = None,
    relative_pos: torch.Tensor | None = None,
    rel_embeddings: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``DisentangledSelfAttention.forward`` with the module's attention adapters applied.

    Returns:
        (context [B, T, H·d], attention probabilities [B, H, T, S'] or None).
    """
    adapters = attached(self)
    if not adapters:
        return type(self).forward(
            self, hidden_states, attention_mask, output_attentions, query_states, relative_pos,
            rel_embeddings,
        )  # fmt: skip
    source = hidden_states if query_states is None else query_states
    query = _heads(self, self.query_proj(source))
    key = _heads(self, self.key_proj(hidden_states))
    value = _heads(self, self.value_proj(hidden_states))
    scale_factor = 1 + ("c2p" in self.pos_att_type) + ("p2c" in self.pos_att_type)
    scaling = (query.shape[-1] * scale_factor) ** -0.5
    b, h, t, d = query.shape
    positions = torch.arange(1, t + 1, device=query.device)[None]
    ctx = Context(scaling, positions)
    for adapter in adapters:
        query, key, value = adapter.transform(query, key, value, ctx)
    bias = None
    if self.relative_attention:
        rel = self.disentangled_attention_bias(
            query.reshape(b * h, t, d), key.reshape(b * h, -1, d), relative_pos,
            self.pos_dropout(rel_embeddings), scale_factor,
        )  # fmt: skip
        bias = rel.view(b, h, t, -1)
    prefixes = [a.prefix(b, ctx) for a in adapters if a.n_prefix]
    inducers = [a for a in adapters if a.has_inducer]
    s0 = inducers[0].inducer_logit(query, ctx) if inducers else None
    mask = attention_mask.bool()
    if mask.dim() == 3:
        mask = mask[:, None]
    dropout = self.dropout.p if self.training else 0.0
    attn, w, probs = _eager_extended(
        query, key, value, mask, scaling, dropout, False, prefixes, s0, bias=bias
    )
    for adapter in adapters:
        attn = adapter.head_output(attn, w, query, ctx)
    context = attn.transpose(1, 2).flatten(2)
    return context, (probs if output_attentions else None)
