"""Extraction points: which module outputs are hooked, found by reference, not by name.

Upstream resolved modules by dotted names, which change under DDP (``module.``), FSDP
(``_fsdp_wrapped_module.``) and PEFT (``base_model.model.``). Here the decoder blocks are found
once on the unwrapped model and hooks hold the module objects themselves, which wrapping keeps.

| point        | module output hooked                               | file label        |
|--------------|----------------------------------------------------|-------------------|
| ``norm1``    | the input norm of block i (residual entering i)     | ``l{i}``          |
| ``norm2``    | the post-attention norm of block i                  | ``l{i}``          |
| ``block``    | block i itself (tuple outputs: element 0)           | ``l{i}``          |
| ``final_norm``| the final norm                                     | ``l{n_layers}``   |
| ``logits``   | the output head, ``[N, vocab]``                     | ``l{n_layers+1}`` |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from adaptlab.errors import UserError

# Attribute names of the same role across architectures (Llama/Mistral/Qwen/Gemma, GPT-2,
# GPT-NeoX, Falcon/Bloom, OPT). Adding an architecture is adding a name here.
_NORM1_NAMES = ("input_layernorm", "ln_1", "attention_norm", "self_attn_layer_norm")
_NORM2_NAMES = ("post_attention_layernorm", "ln_2", "ffn_norm", "final_layer_norm")
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm")


class PointError(UserError):
    """An extraction point that does not exist for this model."""


def _first_attr(module: nn.Module, names: tuple[str, ...], what: str) -> nn.Module:
    for name in names:
        sub = getattr(module, name, None)
        if isinstance(sub, nn.Module):
            return sub
    raise PointError(
        f"{type(module).__name__} has no {what} (looked for {', '.join(names)}); use the "
        "'block' point for this architecture."
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The plain HF model under PEFT/DDP wrappers in any nesting (same module objects, no copies).

    DDP around PEFT (``DDP(PeftModel(model))``) is how a LoRA run trains on several GPUs.
    """
    while True:
        if hasattr(model, "get_base_model"):
            inner = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):
            inner = model.module
        else:
            return model
        if inner is model:
            return model
        model = inner


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks: the ModuleList whose length is ``num_hidden_layers``."""
    model = unwrap(model)
    n_layers = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise PointError(f"Could not find the {n_layers} transformer blocks of {type(model).__name__}.")


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last block (``model.norm`` for Llama, ``ln_f`` for GPT-2)."""
    model = unwrap(model)
    owner = model.get_decoder() if hasattr(model, "get_decoder") else model
    return _first_attr(owner, _FINAL_NORM_NAMES, "final norm")


def output_head(model: nn.Module) -> nn.Module:
    head = unwrap(model).get_output_embeddings()
    if head is None:
        raise PointError(f"{type(unwrap(model)).__name__} has no output head; drop 'logits'.")
    return head


PER_LAYER_POINTS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "norm1": lambda block: _first_attr(block, _NORM1_NAMES, "input norm"),
    "norm2": lambda block: _first_attr(block, _NORM2_NAMES, "post-attention norm"),
    "block": lambda block: block,
}
FINAL_POINTS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "final_norm": final_norm,
    "logits": output_head,
}
POINTS = (*PER_LAYER_POINTS, *FINAL_POINTS)


@dataclass(frozen=True)
class HookSite:
    """One hooked module output.

    Attributes:
        point: point name (a key of :data:`POINTS`).
        layer: file label index (``l{layer}``).
        module: the module whose output is captured (held by reference).
    """

    point: str
    layer: int
    module: nn.Module

    @property
    def key(self) -> str:
        return f"{self.point}/l{self.layer}"


def check_points(points: list[str]) -> None:
    """Raise ``PointError`` for an unknown point name (cheap; call before loading a model)."""
    unknown = [p for p in points if p not in POINTS]
    if unknown:
        raise PointError(
            f"Unknown extraction point(s) {', '.join(unknown)}; choose from {', '.join(POINTS)}."
        )


def hook_sites(model: nn.Module, points: list[str], layer_interval: int = 1) -> list[HookSite]:
    """Resolve ``points`` to module references on ``model``.

    Per-layer points take blocks ``range(0, n_layers, layer_interval)``; ``final_norm`` is
    labelled ``l{n_layers}`` and ``logits`` ``l{n_layers+1}`` as in the upstream files.
    """
    check_points(points)
    layers = decoder_layers(model)
    n_layers = len(layers)
    sites = []
    for point in points:
        if point in PER_LAYER_POINTS:
            for i in range(0, n_layers, layer_interval):
                sites.append(HookSite(point, i, PER_LAYER_POINTS[point](layers[i])))
        else:
            label = n_layers if point == "final_norm" else n_layers + 1
            sites.append(HookSite(point, label, FINAL_POINTS[point](model)))
    return sites
