"""Where the attention parts of each supported architecture live, and how to add to them.

The kernel-view adapters (inducer, prefix, kernel-wise, Kernel-mix) change attention at four
points: the query, key and value projections (``q``, ``k``, ``v``: [B, T, heads * d_h]), the
attention function itself (transformers' ``AttentionInterface``, see
:mod:`adaptlab.adapters.attention`) and the output projection W_O (``o``). The module paths,
relative to a transformer block:

| family | attention module   | q / k / v                            | o                          |
|--------|--------------------|--------------------------------------|----------------------------|
| llama  | ``self_attn``      | ``self_attn.{q,k,v}_proj``           | ``self_attn.o_proj``       |
| bert   | ``attention.self`` | ``attention.self.{query,key,value}`` | ``attention.output.dense`` |
| gpt2   | ``attn``           | ``attn.c_attn`` (fused, thirds)      | ``attn.c_proj``            |

The bottleneck adapters (:mod:`adaptlab.adapters.bottleneck`) also use the feed-forward block,
``ffn``: ``mlp`` (Llama, GPT-2; its input is the FFN input) and BERT's ``output.dense`` (the FFN
input is then the residual input of ``output``).

RoBERTa uses the BERT modules. DeBERTa-v2/v3 (``attention.self.{query,key,value}_proj``,
``attention.output.dense``) computes its disentangled attention itself, outside the attention
interface; :mod:`adaptlab.adapters.deberta` patches its attention modules instead.

Quick start::

    family = family_of(model)                     # "llama", "bert" or "gpt2"
    add_to_projection(block, family, "q", fn)     # q_proj(x) + fn(x) in every forward
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adaptlab.errors import UserError
from adaptlab.extract.points import PointError, decoder_layers, unwrap

SUPPORTED = "Llama (SmolLM2), GPT-2, BERT (MiniLM), RoBERTa and DeBERTa-v2/v3"


class ArchitectureError(UserError):
    """A model the attention-level adapters cannot work with."""


@dataclass(frozen=True)
class Family:
    """The attention modules of one architecture (paths relative to a block).

    Attributes:
        name: ``llama``, ``bert`` or ``gpt2``.
        attention: the module the attention function receives (it owns the adapters).
        projections: ``{"q"|"k"|"v": (path, index)}``; ``index`` is the third of a fused
            projection's output (None: the whole output).
        output: the output projection W_O.
        ffn: the feed-forward module whose output the bottleneck adapters change.
    """

    name: str
    attention: str
    projections: dict[str, tuple[str, int | None]]
    output: str
    ffn: str


FAMILIES: dict[str, Family] = {
    "llama": Family(
        "llama",
        "self_attn",
        {
            "q": ("self_attn.q_proj", None),
            "k": ("self_attn.k_proj", None),
            "v": ("self_attn.v_proj", None),
        },
        "self_attn.o_proj",
        "mlp",
    ),
    "bert": Family(
        "bert",
        "attention.self",
        {
            "q": ("attention.self.query", None),
            "k": ("attention.self.key", None),
            "v": ("attention.self.value", None),
        },
        "attention.output.dense",
        "output.dense",
    ),
    "gpt2": Family(
        "gpt2",
        "attn",
        {"q": ("attn.c_attn", 0), "k": ("attn.c_attn", 1), "v": ("attn.c_attn", 2)},
        "attn.c_proj",
        "mlp",
    ),
    "deberta": Family(  # DeBERTa-v2/v3: its attention is patched (adaptlab.adapters.deberta)
        "deberta",
        "attention.self",
        {
            "q": ("attention.self.query_proj", None),
            "k": ("attention.self.key_proj", None),
            "v": ("attention.self.value_proj", None),
        },
        "attention.output.dense",
        "output.dense",
    ),
}


def _has(block: nn.Module, path: str) -> bool:
    try:
        block.get_submodule(path)
    except AttributeError:
        return False
    return True


def family_of(model: nn.Module, method: str = "this method") -> Family:
    """The :class:`Family` of ``model`` (plain, PEFT- or DDP-wrapped, or a meta skeleton).

    Raises:
        ArchitectureError: another architecture, in one sentence naming ``method``.
    """
    base = unwrap(model)
    try:
        blocks = decoder_layers(base)
    except (PointError, AttributeError):
        blocks = None
    model_type = getattr(getattr(base, "config", None), "model_type", "")
    if model_type == "deberta":  # DeBERTa v1: another attention module, not patched
        blocks = None
    if blocks is not None and len(blocks):
        for family in FAMILIES.values():
            paths = [family.attention, family.output] + [p for p, _ in family.projections.values()]
            if all(_has(blocks[0], path) for path in paths):
                return family
    raise ArchitectureError(
        f"{method} supports {SUPPORTED} models, not {type(base).__name__}; pick another "
        "method (e.g. lora or houlsby)."
    )


@dataclass(frozen=True)
class Geometry:
    """Attention sizes: ``heads`` query heads, ``kv_heads`` key/value heads of ``head_dim``."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int


def geometry(model: nn.Module) -> Geometry:
    """The :class:`Geometry` of ``model`` from its config."""
    config = unwrap(model).config
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return Geometry(hidden, heads, kv_heads, head_dim)


def blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of ``model``."""
    return decoder_layers(unwrap(model))


def projection_weight(block: nn.Module, family: Family, which: str) -> torch.Tensor:
    """W of projection ``which`` as [out, in] (a Conv1D's [in, 3 * out] third transposed)."""
    path, index = family.projections[which]
    module = block.get_submodule(path)
    if index is None:
        return module.weight
    width = module.weight.shape[1] // 3
    return module.weight[:, index * width : (index + 1) * width].T


Delta = Callable[[torch.Tensor], torch.Tensor]
_DELTAS = "_adaptlab_deltas"


def add_to_projection(block: nn.Module, family: Family, which: str, delta: Delta) -> None:
    """Make projection ``which`` (``q``, ``k`` or ``v``) of ``block`` return ``proj(x) + delta(x)``.

    Args:
        block: a transformer block of ``family``.
        family: its family.
        which: ``q``, ``k`` or ``v``.
        delta: x [B, T, hidden] -> [B, T, width of that projection].

    One forward hook per projection module sums every delta registered on it (a fused GPT-2
    ``c_attn`` gets each delta padded into its third).
    """
    path, index = family.projections[which]
    module = block.get_submodule(path)
    deltas = getattr(module, _DELTAS, None)
    if deltas is None:
        deltas = []
        object.__setattr__(module, _DELTAS, deltas)  # a plain list, not a submodule
        module.register_forward_hook(_projection_hook(deltas))
    deltas.append((index, delta))


def _projection_hook(deltas: list[tuple[int | None, Delta]]):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        for index, delta in deltas:
            d = delta(x)
            if index is not None:
                width = output.shape[-1] // 3
                d = F.pad(d, (index * width, (2 - index) * width))
            output = output + d
        return output

    return hook


def add_to_output(block: nn.Module, family: Family, delta: Delta) -> None:
    """Make W_O of ``block`` return ``W_O(a) + delta(a)``, a = concatenated head outputs
    [B, T, heads * d_h]."""
    module = block.get_submodule(family.output)

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + delta(args[0])

    module.register_forward_hook(hook)


def add_after_output(block: nn.Module, family: Family, term: Callable[[], torch.Tensor]) -> None:
    """Make W_O of ``block`` return ``W_O(a) + term()`` (a term computed earlier in the same
    forward, e.g. by the attention function)."""
    module = block.get_submodule(family.output)

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + term()

    module.register_forward_hook(hook)
