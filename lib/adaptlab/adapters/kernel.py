"""Kernel-wise adapters (Chen et al., NAACL Findings 2022): tune the attention kernel's bandwidth.

Attention is a kernel smoother with κ(q, k) = exp(q·k/√d); these adapters change κ through the
queries and keys only (after RoPE on Llama):

| ``variant``   | query (keys alike, with their own parameters)          | init          |
|---------------|--------------------------------------------------------|---------------|
| ``bandwidth`` | q ⊙ b_q                                                | b = 1         |
| ``bitfit``    | q + β_q                                                | β = 0         |
| ``kerfit``    | (q + β_q) ⊙ b_q                                        | β = 0, b = 1  |
| ``kerfit_sep``| (q + β_q) ⊙ b_q · s_{q,h}, s a per-head scalar          | s = 1         |
| ``kerfit_X``  | W_q((x + β_q) ⊙ b_q): on the hidden states x feeding Q | β = 0, b = 1  |

b and β are [heads, 1, d] per head (query heads for q, key/value heads for k) or [1, 1, d] with
``shared_bandwidth`` ([hidden] for ``kerfit_X``). ``q_only`` leaves the keys alone;
``corresponding`` makes the keys use the queries' parameters (one kernel for both sides; with
grouped-query attention only with ``shared_bandwidth``). Every variant starts exactly at the
pretrained model.

Quick start::

    attach_kernel_adapter(model, KernelAdapterConfig(variant="kerfit"))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from adaptlab.adapters.attention import AttentionAdapter, Context, attach, install
from adaptlab.adapters.families import (
    Geometry,
    add_to_projection,
    blocks,
    family_of,
    geometry,
    projection_weight,
)
from adaptlab.adapters.folder import AdapterKind, register_kind
from adaptlab.errors import UserError
from adaptlab.extract.points import unwrap

NAME = "kernel"
VARIANTS = ("bandwidth", "bitfit", "kerfit", "kerfit_sep", "kerfit_X")
_CONFIG_ATTRIBUTE = "_adaptlab_kernel"


class KernelAdapterError(UserError):
    """A kernel-wise adapter setting that cannot work."""


@dataclass(frozen=True)
class KernelAdapterConfig:
    """Attributes: see the module table (upstream flags: ``shared_bandwidth``,
    ``kernel_Q_only``, ``corresponding_kernel``)."""

    variant: str = "bandwidth"
    shared_bandwidth: bool = False
    q_only: bool = False
    corresponding: bool = False

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise KernelAdapterError(
                f"Unknown kernel adapter variant {self.variant!r}; choose from "
                f"{', '.join(VARIANTS)}."
            )
        if self.q_only and self.corresponding:
            raise KernelAdapterError(
                "kernel_q_only leaves the keys alone and kernel_corresponding ties them to the "
                "queries; set only one."
            )

    @property
    def scales(self) -> bool:
        return self.variant != "bitfit"

    @property
    def shifts(self) -> bool:
        return self.variant != "bandwidth"


class _Side(nn.Module):
    """β and b (and s) of one side: x -> ((x + β) ⊙ b) · s."""

    def __init__(self, shape: tuple[int, ...], config: KernelAdapterConfig, heads: int) -> None:
        super().__init__()
        if config.scales:
            self.bandwidth = nn.Parameter(torch.ones(shape))
        if config.shifts:
            self.shift = nn.Parameter(torch.zeros(shape))
        if config.variant == "kerfit_sep":
            self.head_scale = nn.Parameter(torch.ones(heads, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "shift"):
            x = x + self.shift
        if hasattr(self, "bandwidth"):
            x = x * self.bandwidth
        if hasattr(self, "head_scale"):
            x = x * self.head_scale
        return x


class KernelAdapter(AttentionAdapter):
    """Kernel parameters of one attention module: ``query`` and (unless ``q_only`` or
    ``corresponding``) ``key`` sides."""

    def __init__(self, geo: Geometry, config: KernelAdapterConfig) -> None:
        super().__init__()
        self.config = config
        if config.variant == "kerfit_X":
            shape_q = shape_k = (geo.hidden,)
        elif config.shared_bandwidth:
            shape_q = shape_k = (1, 1, geo.head_dim)
        else:
            shape_q, shape_k = (geo.heads, 1, geo.head_dim), (geo.kv_heads, 1, geo.head_dim)
        self.query = _Side(shape_q, config, geo.heads)
        if not (config.q_only or config.corresponding):
            self.key = _Side(shape_k, config, geo.kv_heads)

    def key_side(self) -> _Side | None:
        if self.config.q_only:
            return None
        return self.query if self.config.corresponding else self.key

    def transform(self, query, key, value, ctx: Context):
        if self.config.variant == "kerfit_X":
            return query, key, value
        side = self.key_side()
        return self.query(query), key if side is None else side(key), value


def _x_delta(side: _Side, weight_of):
    """ΔQ = W((x + β) ⊙ b) − W x = ((x + β) ⊙ b − x) Wᵀ (the projection is affine)."""

    def delta(x: torch.Tensor) -> torch.Tensor:
        return (side(x) - x) @ weight_of().T

    return delta


def attach_kernel_adapter(model: nn.Module, config: KernelAdapterConfig) -> list[KernelAdapter]:
    """Add kernel parameters to every attention module of ``model``; returns them in block order.

    Raises:
        KernelAdapterError: ``corresponding`` per head with grouped-query attention.
    """
    family = family_of(model, "Kernel-wise adapters")
    base = unwrap(model)
    if hasattr(base, _CONFIG_ATTRIBUTE):
        raise KernelAdapterError(f"{type(base).__name__} already has kernel adapters attached.")
    geo = geometry(base)
    check_geometry(geo, config)
    reference = next(base.parameters())
    modules = []
    for block in blocks(base):
        adapter = KernelAdapter(geo, config).to(device=reference.device, dtype=reference.dtype)
        attach(block.get_submodule(family.attention), NAME, adapter)
        if config.variant == "kerfit_X":
            add_to_projection(
                block, family, "q",
                _x_delta(adapter.query, lambda b=block: projection_weight(b, family, "q")),
            )  # fmt: skip
            side = adapter.key_side()
            if side is not None:
                add_to_projection(
                    block, family, "k",
                    _x_delta(side, lambda b=block: projection_weight(b, family, "k")),
                )  # fmt: skip
        modules.append(adapter)
    install(base)
    setattr(base, _CONFIG_ATTRIBUTE, config)
    return modules


def check_geometry(geo: Geometry, config: KernelAdapterConfig) -> None:
    """Refuse ``corresponding`` per-head kernels when query and key heads differ."""
    per_head = config.variant != "kerfit_X" and not config.shared_bandwidth
    if config.corresponding and per_head and geo.heads != geo.kv_heads:
        raise KernelAdapterError(
            f"kernel_corresponding ties per-head query and key kernels, but this model has "
            f"{geo.heads} query and {geo.kv_heads} key heads; add kernel_shared_bandwidth true."
        )


def kernel_adapter_config(model: nn.Module) -> KernelAdapterConfig | None:
    """The config of the kernel adapters attached to ``model``, or ``None``."""
    return getattr(unwrap(model), _CONFIG_ATTRIBUTE, None)


def parameter_count(geo: Geometry, layers: int, config: KernelAdapterConfig) -> int:
    """Closed-form number of trainable kernel-adapter parameters."""
    if config.variant == "kerfit_X":
        size_q = size_k = geo.hidden
    elif config.shared_bandwidth:
        size_q = size_k = geo.head_dim
    else:
        size_q, size_k = geo.heads * geo.head_dim, geo.kv_heads * geo.head_dim
    per_value = int(config.scales) + int(config.shifts)
    sep_q = geo.heads if config.variant == "kerfit_sep" else 0
    sep_k = geo.kv_heads if config.variant == "kerfit_sep" else 0
    per_layer = per_value * size_q + sep_q
    if not (config.q_only or config.corresponding):
        per_layer += per_value * size_k + sep_k
    return layers * per_layer


def _is_parameter(name: str) -> bool:
    return any(part in ("adaptlab_kernel",) for part in name.split("."))


register_kind(
    AdapterKind(
        name="kernel_adapter",
        from_dict=lambda data: KernelAdapterConfig(**data),
        to_dict=asdict,
        attach=attach_kernel_adapter,
        config_of=kernel_adapter_config,
        is_parameter=_is_parameter,
    )
)
