"""Which parameters the kernel differentiates (kernel.md §5).

The gradient is taken with respect to a subset of the parameters; the others act as
constants. Subsets are name rules, as upstream:

| subset               | keeps a parameter when                                        |
|----------------------|---------------------------------------------------------------|
| (default)            | always: every parameter, a tied tensor counted once          |
| ``exclude_embeddings`` | its name has no ``embed``                                    |
| ``exclude_head``       | its name has no ``head``                                     |
| ``only_biases``        | its name has ``bias`` (BitFit kernel)                        |
| ``only_lora``          | its name has ``lora``, or it lies outside the backbone (heads) |

Example::

    params = select_parameters(model, only_lora=True)
    print(grad_dim(params))  # logged with the kernel
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor, nn

from adaptlab.extract.points import unwrap
from adaptlab.ntk.errors import KernelError
from adaptlab.ntk.function import HEAD_PREFIX

# (parameter name, whether it lies in the backbone) -> keep it
SubsetRule = Callable[[str, bool], bool]

PARAMETER_SUBSETS: dict[str, SubsetRule] = {
    "exclude_embeddings": lambda name, in_backbone: "embed" not in name,
    "exclude_head": lambda name, in_backbone: "head" not in name,
    "only_biases": lambda name, in_backbone: "bias" in name,
    "only_lora": lambda name, in_backbone: "lora" in name or not in_backbone,
}


def _backbone_ids(model: nn.Module) -> set[int]:
    """Identities of the tensors of the model body (``base_model``; all of them if unknown)."""
    body = getattr(unwrap(model), "base_model", model)
    return {id(p) for p in body.parameters()}


def select_parameters(
    model: nn.Module,
    *,
    exclude_embeddings: bool = False,
    exclude_head: bool = False,
    only_biases: bool = False,
    only_lora: bool = False,
    linear_head: nn.Module | None = None,
) -> dict[str, nn.Parameter]:
    """The parameters the kernel differentiates, by the rules of :data:`PARAMETER_SUBSETS`.

    Args:
        model: the model given to :class:`~adaptlab.ntk.function.KernelFunction`.
        exclude_embeddings: drop names containing ``embed``.
        exclude_head: drop names containing ``head``.
        only_biases: keep names containing ``bias``.
        only_lora: in the backbone keep names containing ``lora`` only.
        linear_head: the kernel's linear head; its parameters join as ``head.<name>``.

    Returns:
        Parameter name -> parameter, in ``named_parameters`` order; a tensor shared by
        several modules (tied decoder and word embedding) appears once, under its first name.

    Raises:
        KernelError: ``only_lora`` on a model without LoRA parameters, or rules that leave
            no parameter.
    """
    flags = {
        "exclude_embeddings": exclude_embeddings,
        "exclude_head": exclude_head,
        "only_biases": only_biases,
        "only_lora": only_lora,
    }
    rules = [PARAMETER_SUBSETS[name] for name, on in flags.items() if on]
    named = list(model.named_parameters())
    if only_lora and not any("lora" in name for name, _ in named):
        raise KernelError(
            "only_lora=True but no parameter name contains 'lora'; wrap the model with peft "
            "LoRA first or drop only_lora."
        )
    backbone = _backbone_ids(model)
    candidates = [(name, p, id(p) in backbone) for name, p in named]
    if linear_head is not None:
        seen = {id(p) for _, p in named}
        candidates += [
            (HEAD_PREFIX + name, p, False)
            for name, p in linear_head.named_parameters()
            if id(p) not in seen
        ]
    selected = {
        name: p for name, p, in_backbone in candidates if all(r(name, in_backbone) for r in rules)
    }
    if not selected:
        chosen = ", ".join(name for name, on in flags.items() if on)
        raise KernelError(
            f"The parameter subset ({chosen}) leaves no parameter of {type(model).__name__}; "
            "drop one of these options."
        )
    return selected


def grad_dim(params: Mapping[str, Tensor]) -> int:
    """Number of scalar parameters the kernel differentiates (upstream's ``grad_dim``)."""
    return sum(p.numel() for p in params.values())
