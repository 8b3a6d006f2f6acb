"""The eligible parameters E of a graft: the ones the fine-tuning run trained (graft.md §3).

Grafting and fine-tuning share one selector, :func:`adaptlab.training.freezing.freeze`, with the
flags the fine-tuning run used (``fix_head``, ``fix_embeddings``, ``fix_first_n_layers``,
``biases_only``), so E is exactly the set the optimiser updated. With the paper's settings on
RoBERTa-base (head and embeddings frozen) E is the 12 encoder layers: N_E = 85,054,464.

A PEFT adapter changes only the weights it wraps: for LoRA-family adapters E is the base weight
of every adapted module (where the merged delta lives), plus the modules the adapter saves whole
(``modules_to_save``).

Example::

    selection = Selection(fix_head=True, fix_embeddings=True)
    names = eligible_names(model, selection)   # ['roberta.encoder.layer.0.attention...', ...]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from adaptlab.graft.errors import GraftError
from adaptlab.training.freezing import freeze


@dataclass(frozen=True)
class Selection:
    """Which parameters a fine-tuning run trained (the flags of ``scripts/finetune.py``).

    Attributes:
        fix_head: the head (final norm, output layer, pooler, MLM transform) stayed frozen.
        fix_embeddings: the input embeddings stayed frozen.
        fix_first_n_layers: blocks 0..n-1 stayed frozen.
        biases_only: only biases trained (BitFit).
    """

    fix_head: bool = False
    fix_embeddings: bool = False
    fix_first_n_layers: int = 0
    biases_only: bool = False

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> Selection:
        """The selection of a ``finetune.py`` run from its recorded config.

        ``fix_layers n`` (upstream's flag) means ``fix_first_n_layers=n, fix_embeddings=True``;
        the ``bitfit`` method means biases only.
        """
        fix_layers = config.get("fix_layers")
        return cls(
            fix_head=bool(config.get("fix_head", False)),
            fix_embeddings=bool(config.get("fix_embeddings", False)) or bool(fix_layers),
            fix_first_n_layers=int(fix_layers or config.get("fix_first_n_layers", 0) or 0),
            biases_only=config.get("method") == "bitfit",
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def eligible_names(model: nn.Module, selection: Selection) -> list[str]:
    """Names of the eligible parameters of ``model``, in ``named_parameters`` order.

    The model's ``requires_grad`` flags are restored afterwards. Shared (tied) parameters appear
    once, under their first name.

    Raises:
        GraftError: the selection leaves no parameter.
    """
    params = dict(model.named_parameters())
    saved = {name: p.requires_grad for name, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
        try:
            freeze(model, **selection.as_dict())
        except ValueError as error:  # TrainingError is a UserError: say it as a graft error
            raise GraftError(f"The fine-tuning selection {selection} is invalid: {error}") from None
        names = [name for name, p in params.items() if p.requires_grad]
    finally:
        for name, p in params.items():
            p.requires_grad_(saved[name])
    if not names:
        raise GraftError(
            f"The selection {selection} leaves no eligible parameter; graft the parameters the "
            "fine-tuning run trained."
        )
    return names


def count(model: nn.Module, names: list[str]) -> int:
    """Number of entries N of the named parameters (``named_parameters`` dedupes tied ones)."""
    params = dict(model.named_parameters())
    return sum(params[name].numel() for name in names)


def n_parameters(model: nn.Module) -> int:
    """All parameters of the model, tied ones once."""
    return sum(p.numel() for p in model.parameters())


def check_same_shapes(pre: torch.nn.Module, ft: torch.nn.Module, pre_name: str, ft_name: str):
    """θ_pre and θ_ft are one architecture: the same parameter names and shapes (meta models).

    Raises:
        GraftError: naming the first parameter that differs.
    """
    a = {n: tuple(p.shape) for n, p in pre.named_parameters()}
    b = {n: tuple(p.shape) for n, p in ft.named_parameters()}
    for name in sorted(set(a) | set(b)):
        if a.get(name) != b.get(name):
            raise GraftError(
                f"θ_pre ({pre_name}) and θ_ft ({ft_name}) are different architectures: "
                f"{name!r} is {a.get(name, 'absent')} in one and {b.get(name, 'absent')} in the "
                "other; graft a model onto its own base."
            )
