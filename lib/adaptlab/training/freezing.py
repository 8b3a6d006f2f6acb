"""Which parameters train: embeddings, the first blocks, the head, or only biases (BitFit).

Parameters are grouped by module reference, so wrapper prefixes (PEFT, DDP) and naming
schemes do not matter:

| role         | parameters                                                                    |
|--------------|-------------------------------------------------------------------------------|
| ``embeddings``| the module owning ``get_input_embeddings()`` when it holds no block (BERT's   |
|              | ``embeddings``: word, position, type, LayerNorm), plus every ``nn.Embedding``  |
|              | outside the blocks (Llama ``embed_tokens``; GPT-2 ``wte``, ``wpe``)             |
| ``layers``   | block i = element i of the ModuleList of ``num_hidden_layers`` blocks          |
| ``head``     | everything else: final norm, ``get_output_embeddings()``, pooler, MLM transform |

A weight tied between input and output embeddings counts as an embedding (as upstream's
name rules saw it), so ``fix_head`` alone leaves it trainable. Upstream flags map as:
``--fix_layers n`` = ``fix_first_n_layers=n, fix_embeddings=True`` (LM-BFF trainer),
``train_bias_only`` = ``biases_only=True``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from adaptlab.extract.points import decoder_layers, unwrap
from adaptlab.training.optim import TrainingError


@dataclass(frozen=True)
class ParameterRoles:
    """The parameters of a model by role, each parameter in exactly one role.

    Attributes:
        embeddings: input-side embedding parameters.
        layers: one list per transformer block, in order.
        head: every other parameter of the model.
    """

    embeddings: list[nn.Parameter]
    layers: list[list[nn.Parameter]]
    head: list[nn.Parameter]


def _parent_of(root: nn.Module, child: nn.Module) -> nn.Module | None:
    for module in root.modules():
        if any(sub is child for sub in module.children()):
            return module
    return None


def parameter_roles(model: nn.Module) -> ParameterRoles:
    """Split the parameters of ``model`` (plain or wrapped) into embeddings, blocks and head.

    Raises:
        TrainingError: the model has no input embeddings.
        PointError: the transformer blocks cannot be found.
    """
    base = unwrap(model)
    blocks = decoder_layers(base)
    inputs = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    if inputs is None:
        raise TrainingError(
            f"{type(base).__name__} has no input embeddings (get_input_embeddings); freeze its "
            "parameters by hand."
        )
    in_blocks = {id(p) for p in blocks.parameters()}
    block_modules = {id(m) for m in blocks.modules()}
    owners: list[nn.Module] = [inputs]
    parent = _parent_of(base, inputs)
    if parent is not None and not any(id(m) in block_modules for m in parent.modules()):
        owners.append(parent)
    owners += [
        m for m in base.modules() if isinstance(m, nn.Embedding) and id(m) not in block_modules
    ]
    seen = set(in_blocks)
    embeddings: list[nn.Parameter] = []
    for owner in owners:
        for param in owner.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                embeddings.append(param)
    head: list[nn.Parameter] = []
    for param in base.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            head.append(param)
    layers = [list(block.parameters()) for block in blocks]
    return ParameterRoles(embeddings, layers, head)


def _count(params: list[nn.Parameter]) -> int:
    # ZeRO-3 partitioned parameters are empty locally; ds_numel is their full size.
    return sum(getattr(p, "ds_numel", p.numel()) for p in params)


def freeze(
    model: nn.Module,
    *,
    fix_head: bool = False,
    fix_embeddings: bool = False,
    fix_first_n_layers: int = 0,
    biases_only: bool = False,
) -> dict[str, int]:
    """Turn off ``requires_grad`` for the chosen parameter roles.

    Freezing only ever switches gradients off, so a PEFT model keeps its base weights frozen
    and a flag applies on top of the method's own choice.

    Args:
        model: the model (plain or PEFT/DDP-wrapped).
        fix_head: freeze the head role (final norm, output layer, pooler, MLM transform).
        fix_embeddings: freeze the embeddings role.
        fix_first_n_layers: freeze blocks 0..n-1.
        biases_only: freeze every parameter not registered as ``bias`` (BitFit).

    Returns:
        ``{"trainable", "frozen", "total"}`` parameter counts (shared parameters once).

    Raises:
        TrainingError: ``fix_first_n_layers`` outside 0..num_hidden_layers, or nothing left to
            train.
    """
    roles = parameter_roles(model)
    if not 0 <= fix_first_n_layers <= len(roles.layers):
        raise TrainingError(
            f"fix_first_n_layers={fix_first_n_layers} is outside 0..{len(roles.layers)} (the "
            "model's number of blocks)."
        )
    to_freeze: list[nn.Parameter] = []
    if fix_head:
        to_freeze += roles.head
    if fix_embeddings:
        to_freeze += roles.embeddings
    for block in roles.layers[:fix_first_n_layers]:
        to_freeze += block
    if biases_only:
        biases = {
            id(p)
            for module in model.modules()
            for name, p in module.named_parameters(recurse=False)
            if name == "bias"
        }
        to_freeze += [p for p in model.parameters() if id(p) not in biases]
    frozen = {id(p) for p in to_freeze}
    params = list(model.parameters())
    trainable = _count([p for p in params if p.requires_grad and id(p) not in frozen])
    total = _count(params)
    if trainable == 0:
        raise TrainingError(
            f"The freezing flags leave no trainable parameter in {type(unwrap(model)).__name__}; "
            "drop a flag (biases_only needs a model with biases)."
        )
    for param in to_freeze:
        param.requires_grad_(False)
    return {"trainable": trainable, "frozen": total - trainable, "total": total}
