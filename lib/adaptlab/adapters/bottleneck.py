"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021; He et al. 2022) as hooks.

An adapter is ``A(h) = up(act(down(h)))``, down: hidden -> r, up: r -> hidden, r the
bottleneck; with ``layer_norm`` it reads a LayerNorm of its input, ``up(act(down(LN(h))))``
("layer norm before adapter", peft_methods.md §2 and §4). It is attached with forward hooks on
the modules a transformer block already has, so the model code is untouched:

| placement   | where, per block                                  | output                 |
|-------------|---------------------------------------------------|------------------------|
| ``houlsby`` | after the attention output projection and the FFN | ``h + A(h)`` (each)    |
| ``pfeiffer``| after the FFN output (``location="attention"``:   | ``h + A(h)``           |
|             | after the attention output projection instead)    |                        |
| ``parallel``| beside the FFN, reading its input x               | ``FFN(x) + s * A(x)``  |

Pfeiffer et al. place the one adapter after the FFN; the kernel-adapters NLG baseline
(``pfeiffer-adapter``) puts it in self-attention, hence ``location``. The modules, for the
supported families (``adaptlab.adapters.families.FAMILIES``):

| family         | attention output           | FFN output       | FFN input (parallel)          |
|----------------|----------------------------|------------------|-------------------------------|
| Llama          | ``self_attn.o_proj``       | ``mlp``          | input of ``mlp``              |
| GPT-2          | ``attn.c_proj``            | ``mlp``          | input of ``mlp`` (after ln_2) |
| BERT / RoBERTa | ``attention.output.dense`` | ``output.dense`` | ``input_tensor`` of ``output``|

All hook points come before the residual add (in GPT-2 the attention one also before the
residual dropout, and ``mlp`` ends with its dropout; in BERT before dropout and LayerNorm), as
in Houlsby's figure 2. For BERT's parallel adapter ``s * A(x)`` is added to the residual input
of ``output`` (``LayerNorm(dropout(dense(i)) + x + s * A(x))``): the same sum, left out of the
FFN dropout.

Initialisation: Houlsby's truncated normal (std 0.01, cut at ±2 std) on the down-projection,
zero biases, and a zero up-projection, so ``A(h) = 0`` (with or without the LayerNorm, which
starts as PyTorch's, weight 1 and bias 0) and the adapted model starts exactly at the pretrained
one (Houlsby's near-identity init made exact; the gradient still reaches the up-projection at
once, and the down-projection and the LayerNorm from the first step on, as for LoRA's B = 0).

Quick start::

    model = tiny_llama()
    config = BottleneckConfig(placement="houlsby", reduction_factor=8)
    attach_bottleneck(model, config)   # 2 adapters per block, hidden 32 -> r 4
    # train the parameters under "bottleneck_"; save_adapter_folder / load_model keep them

The kinds ``houlsby``, ``pfeiffer`` and ``parallel`` are registered in
:data:`adaptlab.adapters.folder.KINDS` (one per placement, sharing this implementation), so a
run's checkpoints are PEFT-layout adapter folders (see :mod:`adaptlab.adapters.folder`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from adaptlab.adapters.errors import AdapterError
from adaptlab.adapters.families import FAMILIES, Family
from adaptlab.adapters.folder import AdapterKind, register_kind
from adaptlab.extract.points import PointError, decoder_layers, unwrap

Placement = Literal["houlsby", "pfeiffer", "parallel"]
PLACEMENTS: tuple[str, ...] = ("houlsby", "pfeiffer", "parallel")
LOCATIONS: tuple[str, ...] = ("ffn", "attention")
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
SUPPORTED = "Llama, GPT-2 and BERT/RoBERTa"
PREFIX = "bottleneck_"  # block attributes (and so parameter names) of the adapters
_CONFIG_ATTRIBUTE = "_adaptlab_bottleneck"  # on the model root, read when saving


@dataclass(frozen=True)
class BottleneckConfig:
    """What adapters to attach.

    Attributes:
        placement: ``houlsby``, ``pfeiffer`` or ``parallel`` (see the module docstring).
        reduction_factor: r = hidden // reduction_factor (ignored when ``dim`` is set).
        dim: the bottleneck width r itself (None: from ``reduction_factor``).
        activation: ``relu``, ``gelu`` or ``tanh``.
        scaling: s, the factor on a parallel adapter's output (ignored otherwise).
        layer_norm: a trainable LayerNorm on each adapter's input, inside the adapter.
        location: where a ``pfeiffer`` adapter goes: ``ffn`` (after the FFN, Pfeiffer et al.)
            or ``attention`` (after the attention output projection); ``ffn`` for the others.
    """

    placement: str = "houlsby"
    reduction_factor: float = 16.0
    dim: int | None = None
    activation: str = "relu"
    scaling: float = 1.0
    layer_norm: bool = False
    location: str = "ffn"

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise AdapterError(
                f"Unknown adapter placement {self.placement!r}; choose from "
                f"{', '.join(PLACEMENTS)}."
            )
        if self.activation not in ACTIVATIONS:
            raise AdapterError(
                f"Unknown adapter activation {self.activation!r}; choose from "
                f"{', '.join(ACTIVATIONS)}."
            )
        if not (math.isfinite(self.reduction_factor) and self.reduction_factor > 0):
            raise AdapterError(
                f"adapter_reduction_factor={self.reduction_factor} must be a number > 0 "
                "(r = hidden size // factor)."
            )
        if self.dim is not None and self.dim <= 0:
            raise AdapterError(f"adapter_dim={self.dim} must be at least 1 (or omitted).")
        if self.location not in LOCATIONS:
            raise AdapterError(
                f"Unknown adapter location {self.location!r}; choose from {', '.join(LOCATIONS)}."
            )
        if self.location != "ffn" and self.placement != "pfeiffer":
            raise AdapterError(
                f"adapter_location={self.location!r} applies to pfeiffer adapters only; drop it "
                f"for {self.placement}."
            )

    def width(self, hidden: int) -> int:
        """The bottleneck r for hidden size ``hidden``.

        Raises:
            AdapterError: the factor leaves no unit (r would be 0).
        """
        r = self.dim if self.dim is not None else int(hidden // self.reduction_factor)
        if r < 1:
            raise AdapterError(
                f"adapter_reduction_factor={self.reduction_factor} leaves a bottleneck of 0 for "
                f"hidden size {hidden}; use a factor of at most {hidden}."
            )
        return r


class BottleneckAdapter(nn.Module):
    """``A(h) = up(act(down(h)))``: [..., hidden] -> [..., hidden] through [..., r].

    Args:
        hidden: the model width.
        r: the bottleneck width.
        activation: a key of :data:`ACTIVATIONS`.
        layer_norm: ``A(h) = up(act(down(LN(h))))``, LN a new ``nn.LayerNorm(hidden)``.
    """

    def __init__(
        self, hidden: int, r: int, activation: str = "relu", layer_norm: bool = False
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden) if layer_norm else None
        self.down = nn.Linear(hidden, r)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(r, hidden)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Houlsby init on ``down``, zeros on ``up`` and the biases (so ``A(h) = 0``)."""
        nn.init.trunc_normal_(self.down.weight, std=0.01, a=-0.02, b=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            hidden = self.norm(hidden)
        return self.up(self.act(self.down(hidden)))


# ---------------------------------------------------------------------------------------------
# Where the adapters go


def _family(block: nn.Module) -> Family | None:
    # Only the two modules the adapters hook are required (DeBERTa's blocks pass as BERT's).
    def has(path: str) -> bool:
        try:
            block.get_submodule(path)
        except AttributeError:
            return False
        return True

    return next((f for f in FAMILIES.values() if has(f.output) and has(f.ffn)), None)


def check_architecture(model: nn.Module) -> str:
    """The block family of ``model`` (``llama``, ``gpt2`` or ``bert``); works on a meta skeleton.

    Raises:
        AdapterError: any other architecture.
    """
    base = unwrap(model)
    try:
        blocks = decoder_layers(base)
    except (PointError, AttributeError):  # no block list or no config: not supported
        blocks = None
    family = _family(blocks[0]) if blocks is not None and len(blocks) else None
    if family is None:
        raise AdapterError(
            f"Bottleneck adapters support {SUPPORTED} models only, and "
            f"{type(base).__name__} is none of them; pick another method (e.g. lora)."
        )
    return family.name


def _sequential_hook(adapter: BottleneckAdapter):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + adapter(output)

    return hook


def _parallel_hook(adapter: BottleneckAdapter, scaling: float):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + scaling * adapter(args[0])

    return hook


def _parallel_residual_hook(adapter: BottleneckAdapter, scaling: float):
    # BertOutput(intermediate, input_tensor): the FFN input is its residual input.
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if len(args) >= 2:
            x = args[1]
            return (args[0], x + scaling * adapter(x), *args[2:]), kwargs
        x = kwargs["input_tensor"]
        return args, {**kwargs, "input_tensor": x + scaling * adapter(x)}

    return hook


def attach_bottleneck(model: nn.Module, config: BottleneckConfig) -> list[BottleneckAdapter]:
    """Add adapters to every block of ``model`` (in place) and register their hooks.

    Each adapter becomes a submodule of its block (``bottleneck_attn``, ``bottleneck_ffn``), so
    its parameters are named with the block's, train with it and are frozen by
    ``fix_first_n_layers`` like it. New adapters have ``requires_grad=True`` and the model's
    dtype and device.

    Args:
        model: a Llama, GPT-2 or BERT/RoBERTa model (plain or wrapped).
        config: what to attach.

    Returns:
        The adapters, in block order.

    Raises:
        AdapterError: an unsupported architecture, a bottleneck of 0, adapters already there.
    """
    family = FAMILIES[check_architecture(model)]
    base = unwrap(model)
    if hasattr(base, _CONFIG_ATTRIBUTE):
        raise AdapterError(f"{type(base).__name__} already has bottleneck adapters attached.")
    hidden = base.config.hidden_size
    r = config.width(hidden)
    reference = next(base.parameters())
    if config.placement == "houlsby":
        slots = ["attn", "ffn"]
    else:
        slots = ["attn"] if config.location == "attention" else ["ffn"]
    adapters = []
    for block in decoder_layers(base):
        for slot in slots:
            adapter = BottleneckAdapter(hidden, r, config.activation, config.layer_norm)
            adapter.to(device=reference.device, dtype=reference.dtype)
            block.add_module(PREFIX + slot, adapter)
            adapters.append(adapter)
            if config.placement == "parallel" and family.name == "bert":
                block.output.register_forward_pre_hook(
                    _parallel_residual_hook(adapter, config.scaling), with_kwargs=True
                )
            elif config.placement == "parallel":
                hook = _parallel_hook(adapter, config.scaling)
                block.get_submodule(family.ffn).register_forward_hook(hook)
            else:
                target = block.get_submodule(family.output if slot == "attn" else family.ffn)
                target.register_forward_hook(_sequential_hook(adapter))
    setattr(base, _CONFIG_ATTRIBUTE, config)
    return adapters


def bottleneck_config(model: nn.Module) -> BottleneckConfig | None:
    """The config of the adapters attached to ``model``, or ``None``."""
    return getattr(unwrap(model), _CONFIG_ATTRIBUTE, None)


def is_adapter_parameter(name: str) -> bool:
    """Whether the parameter (or state-dict entry) ``name`` belongs to a bottleneck adapter."""
    return any(part.startswith(PREFIX) for part in name.split("."))


# ---------------------------------------------------------------------------------------------
# Saving: one adapter kind per placement (the name a run's --method gives)


def _kind(placement: str) -> AdapterKind:
    def from_dict(data: dict) -> BottleneckConfig:
        config = BottleneckConfig(**data)
        if config.placement != placement:
            raise AdapterError(
                f"A {placement} adapter entry holds placement {config.placement!r}; save the "
                "adapters again."
            )
        return config

    def config_of(model: nn.Module) -> BottleneckConfig | None:
        config = bottleneck_config(model)
        return config if config is not None and config.placement == placement else None

    return AdapterKind(
        name=placement,
        from_dict=from_dict,
        to_dict=asdict,
        attach=attach_bottleneck,
        config_of=config_of,
        is_parameter=is_adapter_parameter,
    )


for _placement in PLACEMENTS:
    register_kind(_kind(_placement))
