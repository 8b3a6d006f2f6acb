"""Training objectives: answer-only causal LM loss, label-word and option losses, linear head.

| objective      | scores                                         | loss                          |
|----------------|------------------------------------------------|-------------------------------|
| ``answer_only``| next-token logits on the answer tokens         | token CE, mean per example    |
| ``label_words``| LM logits of C label words at one position [B, C] | CE over the C label words  |
| ``options``    | Σ log p(option tokens), causal LMs [B, C]      | CE over the C options         |
| ``linear_head``| ``nn.Linear(H, C)`` at one token [B, C]        | CE over C classes             |

Every objective reduces a per-example loss ℓ_i with optional weights:
L = Σ_i w_i ℓ_i / Σ_i w_i (plain mean without weights; landscape.md §4 ``--weight_samples``).
The classification objectives take ``loss="mse"`` for the squared error to the one-hot
target, mean over the C scores (LM-Kernel-FT ``--l2_loss``, kernel.md §4).

The options objective scores each class by its whole option (``" " + word``, any number of
tokens) after the prompt, so options sharing a first token stay apart (graft.md §9, the GPT-2
TREC bug). Its batch (``adaptlab.training.fewshot.collate_options``) holds B x C rows, prompt
then option, so a step costs about C times the prompt's tokens of a label-word step: simple and
exact, where caching the prompt's keys and values once per example would save the repeats.

The linear head (the no-prompt setting) reads the token at ``batch["positions"]`` (the first
token for masked LMs, the last for causal LMs, see ``adaptlab.data.encode_examples``) and lives
on the model as ``linear_head`` (:func:`attach_linear_head`), so it trains, shards and resumes
with the rest of the trainable parameters.

Answer-only MMLU data (encoding, collation, packing) is :mod:`adaptlab.training.answer_only`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptlab.extract.points import unwrap
from adaptlab.training.answer_only import (
    IGNORE_INDEX,
)
from adaptlab.training.optim import TrainingError
from adaptlab.training.packing import packed_model_inputs

# ---------------------------------------------------------------------------------------------
# Losses


def weighted_mean(
    per_example: Tensor, weights: Tensor | None = None, weight_norm: float | Tensor | None = None
) -> Tensor:
    """Σ_i w_i ℓ_i / Σ_i w_i, or the plain mean without weights.

    Args:
        per_example: ``[B]`` losses ℓ_i.
        weights: ``[B]`` weights w_i, or ``None`` for w_i = 1.
        weight_norm: denominator to use instead of this batch's Σ w_i. When one optimiser step
            spans A micro-batches, pass Σ_step w / A: the mean of the micro-batch losses is then
            Σ_step w ℓ / Σ_step w (scale them with ``accumulation_loss_scale``).

    Returns:
        Scalar loss.
    """
    if weights is None:
        weights = torch.ones_like(per_example)
    elif weights.shape != per_example.shape:
        raise TrainingError(
            f"weights have shape {list(weights.shape)} but the batch has "
            f"{per_example.shape[0]} examples; pass one weight per example."
        )
    weights = weights.to(per_example)
    norm = weights.sum() if weight_norm is None else weight_norm
    return (weights * per_example).sum() / norm


def per_example_lm_loss(
    logits: Tensor,
    labels: Tensor,
    segment_ids: Tensor | None = None,
    n_examples: int = 0,
    positions: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Mean next-token cross-entropy over each example's label tokens.

    Position t's logits predict label t + 1, as in Hugging Face causal LMs; labels equal to
    -100 are ignored. Only label positions are upcast to float32. In a packed batch a label
    counts for the example of its position, and only when position t + 1 belongs to that
    example too.

    Args:
        logits: ``[R, T, V]`` LM logits, or ``[R, K, V]`` at ``positions`` only.
        labels: ``[R, T]`` token ids or -100.
        segment_ids: ``[R, T]`` example of every position of a packed batch (-1 on padding),
            or ``None``: row b is example b.
        n_examples: B, the examples of a packed batch.
        positions: ``[K]`` the positions ``logits`` holds (:func:`label_positions`), or
            ``None`` for all T.
        label_smoothing: ε of the token cross-entropy: the target is 1 − ε on the label token
            plus ε/V on every token of the vocabulary (``F.cross_entropy``'s definition).

    Returns:
        ``[B]`` float32 losses (B = R without ``segment_ids``).

    Raises:
        TrainingError: shapes that do not match, or an example without label tokens.
    """
    width = labels.shape[1] if positions is None else len(positions)
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != (labels.shape[0], width):
        raise TrainingError(
            f"logits {list(logits.shape)} and labels {list(labels.shape)} do not match; expected "
            "[B, T, V] and [B, T] (or [B, K, V] at K positions)."
        )
    if positions is None:
        positions = torch.arange(labels.shape[1] - 1, device=labels.device)
        logits = logits[:, :-1]
    targets = labels[:, positions + 1]
    mask = targets != IGNORE_INDEX
    if segment_ids is None:
        n_examples = labels.shape[0]
        owners = mask.nonzero()[:, 0]
    else:
        here = segment_ids[:, positions]
        mask &= segment_ids[:, positions + 1] == here
        owners = here[mask]
    counts = torch.bincount(owners, minlength=n_examples)
    if bool((counts == 0).any()):
        rows = (counts == 0).nonzero().flatten().tolist()
        what = "rows" if segment_ids is None else "examples"
        raise TrainingError(
            f"Batch {what} {rows} have no label token after the first position; every example "
            "needs at least one answer token (see answer_only_labels)."
        )
    token_loss = F.cross_entropy(
        logits[mask].float(), targets[mask], reduction="none", label_smoothing=label_smoothing
    )
    sums = torch.zeros(n_examples, dtype=token_loss.dtype, device=token_loss.device)
    return sums.index_add(0, owners, token_loss) / counts


def label_positions(labels: Tensor, segment_ids: Tensor | None = None) -> Tensor:
    """``[K]`` positions t whose logits some row needs: label t + 1 is not -100 (same example).

    Answer-only batches need the LM head at K <= B positions, not at all T: passed to the
    model as ``logits_to_keep``, this skips most of the head's compute and its ``[R, T, V]``
    logits.
    """
    needed = labels[:, 1:] != IGNORE_INDEX
    if segment_ids is not None:
        needed &= segment_ids[:, 1:] == segment_ids[:, :-1]
    return needed.any(dim=0).nonzero().flatten()


def causal_lm_loss(
    logits: Tensor,
    labels: Tensor,
    weights: Tensor | None = None,
    weight_norm: float | Tensor | None = None,
    return_per_example: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Answer-only loss: per-example mean token CE, then the weighted mean over the batch.

    Args:
        logits: ``[B, T, V]`` LM logits.
        labels: ``[B, T]`` token ids, -100 where no loss is taken.
        weights: ``[B]`` example weights, or ``None`` for the plain mean.
        weight_norm: see :func:`weighted_mean`.
        return_per_example: also return the ``[B]`` per-example losses.

    Returns:
        Scalar loss, or ``(loss, per_example)``.
    """
    per_example = per_example_lm_loss(logits, labels)
    loss = weighted_mean(per_example, weights, weight_norm)
    return (loss, per_example) if return_per_example else loss


def label_word_logits(logits: Tensor, positions: Tensor, label_word_ids: Tensor) -> Tensor:
    """LM logits of the label words at one position per example.

    Args:
        logits: ``[B, T, V]`` LM logits.
        positions: ``[B]`` position of the mask token (masked LMs) or of the last prompt token
            (causal LMs).
        label_word_ids: ``[C]`` vocabulary id of each class's label word, the same for every
            example, or ``[B, C]`` each example's own (a batch mixing tasks, multi-task runs).

    Returns:
        ``[B, C]`` logits.
    """
    if logits.dim() != 3 or positions.shape != logits.shape[:1]:
        raise TrainingError(
            f"logits {list(logits.shape)} and positions {list(positions.shape)} do not match; "
            "expected [B, T, V] and [B]."
        )
    rows = torch.arange(logits.shape[0], device=logits.device)
    at_positions = logits[rows, positions.to(logits.device)]
    ids = label_word_ids.to(logits.device)
    if ids.dim() == 1:
        return at_positions[:, ids]
    if ids.dim() != 2 or ids.shape[0] != logits.shape[0]:
        raise TrainingError(
            f"label_word_ids {list(ids.shape)} do not match logits {list(logits.shape)}; "
            "expected [C] (one task) or [B, C] (per example)."
        )
    return at_positions.gather(1, ids)


def label_word_loss(
    logits: Tensor,
    positions: Tensor,
    label_word_ids: Tensor,
    targets: Tensor,
    weights: Tensor | None = None,
    weight_norm: float | Tensor | None = None,
) -> Tensor:
    """Cross-entropy over the C label words (prompt-based fine-tuning, kernel.md §4).

    Args:
        logits: ``[B, T, V]`` LM logits.
        positions: ``[B]`` see :func:`label_word_logits`.
        label_word_ids: ``[C]`` label-word ids, or ``[B, C]`` per example.
        targets: ``[B]`` class indices in 0..C-1.
        weights: ``[B]`` example weights, or ``None``.
        weight_norm: see :func:`weighted_mean`.

    Returns:
        Scalar loss.
    """
    scores = label_word_logits(logits, positions, label_word_ids)
    per_example = F.cross_entropy(scores.float(), targets, reduction="none")
    return weighted_mean(per_example, weights, weight_norm)


def mask_positions(input_ids: Tensor, mask_token_id: int) -> Tensor:
    """``[B]`` position of the single mask token of each row of ``input_ids`` ``[B, T]``."""
    is_mask = input_ids == mask_token_id
    counts = is_mask.sum(dim=1)
    if bool((counts != 1).any()):
        rows = (counts != 1).nonzero().flatten().tolist()
        raise TrainingError(
            f"Batch rows {rows} do not contain exactly one mask token; the template must put "
            "one mask where the label word goes (and truncation must keep it)."
        )
    return is_mask.long().argmax(dim=1)


def last_token_positions(attention_mask: Tensor) -> Tensor:
    """``[B]`` position of the last attended token of each row (left or right padding)."""
    index = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * index).argmax(dim=1)


def first_token_positions(attention_mask: Tensor) -> Tensor:
    """``[B]`` position of the first attended token of each row (left or right padding)."""
    return attention_mask.long().argmax(dim=1)


class LinearHead(nn.Module):
    """``nn.Linear(hidden, n_classes)`` on the first token (``[CLS]``/``<s>``): no-prompt FT.

    Args:
        hidden_size: H, the model's hidden size.
        n_classes: C, or 1 for a regression head (STS-B: its one output is the score).
    """

    def __init__(self, hidden_size: int, n_classes: int) -> None:
        super().__init__()
        if hidden_size < 1 or n_classes < 1:
            raise TrainingError(
                f"LinearHead({hidden_size}, {n_classes}) needs a positive hidden size and at "
                "least 1 output."
            )
        self.linear = nn.Linear(hidden_size, n_classes)

    def forward(self, hidden_states: Tensor, positions: Tensor | None = None) -> Tensor:
        """Class logits ``[B, C]`` from ``hidden_states`` ``[B, T, H]``.

        Args:
            hidden_states: last-layer states.
            positions: ``[B]`` token to read per row; ``None`` reads position 0.
        """
        first = at_positions(hidden_states, positions)
        return self.linear(first.to(self.linear.weight.dtype))

    def every_token(self, hidden_states: Tensor) -> Tensor:
        """Class logits ``[B, T, C]`` at every token of ``hidden_states`` ``[B, T, H]``: what
        IVON's Monte Carlo averaging computes under each draw (the batch's positions are not
        known inside the model's forward), to be read at the positions afterwards."""
        return self.linear(hidden_states.to(self.linear.weight.dtype))


def at_positions(states: Tensor, positions: Tensor | None = None) -> Tensor:
    """``[B, ...]`` row b of ``states`` ``[B, T, ...]`` at token ``positions[b]`` (``None``: 0)."""
    if positions is None:
        return states[:, 0]
    rows = torch.arange(states.shape[0], device=states.device)
    return states[rows, positions.to(states.device)]


HEAD_ATTRIBUTE = "linear_head"
HEAD_LOGITS = "head_logits"
"""Model output field that IVON's Monte Carlo averaging (``ivon_predict.mc_averaged_logits``)
adds when a linear head is attached: the head's ``[B, T, C]`` logits at every token, averaged
over the posterior draws; :func:`linear_head_objective` reads its scores from it."""


def attach_linear_head(model: nn.Module, head: LinearHead) -> None:
    """Make ``head`` a trainable submodule of the model (under any PEFT/DDP wrapper).

    It is registered on the innermost HF model as ``linear_head``, so its parameters follow
    the model through the optimiser, FSDP sharding and resume states; the checkpoint code
    saves it beside the weights (``adaptlab.training.checkpoint.HEAD_FILE``).
    """
    base = unwrap(model)
    if hasattr(base, HEAD_ATTRIBUTE):
        raise TrainingError(f"The model already has a {HEAD_ATTRIBUTE!r} attribute.")
    head.requires_grad_(True)
    base.add_module(HEAD_ATTRIBUTE, head)


def find_linear_head(model: nn.Module) -> LinearHead | None:
    """The head attached by :func:`attach_linear_head`, or ``None``."""
    return getattr(unwrap(model), HEAD_ATTRIBUTE, None)


LOSSES = ("ce", "mse")


def class_loss(scores: Tensor, targets: Tensor, loss: str = "ce") -> Tensor:
    """``[B]`` per-example loss of class scores ``[B, C]`` against class indices ``[B]``.

    ``ce``: cross-entropy. ``mse``: mean over the C scores of (score - one_hot)^2, so the
    batch mean equals ``nn.MSELoss()(scores, one_hot)`` as upstream's ``--l2_loss``.
    """
    if loss == "ce":
        return F.cross_entropy(scores.float(), targets, reduction="none")
    if loss == "mse":
        target = F.one_hot(targets, scores.shape[-1]).to(torch.float32)
        return (scores.float() - target).pow(2).mean(dim=-1)
    raise TrainingError(f"Unknown classification loss {loss!r}; choose from {', '.join(LOSSES)}.")


# ---------------------------------------------------------------------------------------------
# Objectives by name


@dataclass(frozen=True)
class ObjectiveOutput:
    """What an objective returns for one batch.

    Attributes:
        loss: scalar training loss.
        per_example: ``[B]`` unweighted losses ℓ_i.
        scores: ``[B, C]`` class scores (label words, linear head), ``None`` for answer-only.
    """

    loss: Tensor
    per_example: Tensor
    scores: Tensor | None


def _require(batch: Mapping[str, Any], keys: tuple[str, ...], objective: str) -> None:
    missing = [key for key in keys if key not in batch]
    if missing:
        raise TrainingError(
            f"The {objective} objective needs batch keys {', '.join(missing)}; build batches "
            "with the matching collate function."
        )


def _forward(model: nn.Module, batch: Mapping[str, Any], **kwargs: Any) -> Any:
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), **kwargs)


def _skips_head(model: nn.Module) -> bool:
    """Whether the model computes logits at chosen positions only (``logits_to_keep``)."""
    return "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters


def answer_only_objective(
    model: nn.Module,
    batch: Mapping[str, Any],
    head: LinearHead | None = None,
    label_smoothing: float = 0.0,
) -> ObjectiveOutput:
    """Causal LM loss on the answer tokens (batch: ``input_ids``, ``labels``, opt. ``weights``),
    with label smoothing ε on every answer token when ``label_smoothing`` > 0.

    A packed batch (:func:`collate_packed_answer_only`, with ``segment_ids``) gives the same
    per-example losses. The LM head runs only where a label is (:func:`label_positions`) when
    the model takes ``logits_to_keep``.
    """
    _require(batch, ("input_ids", "labels"), "answer_only")
    if "segment_ids" in batch:
        _require(batch, ("position_ids", "weights"), "answer_only")
        inputs, labels, segments = packed_model_inputs(model, batch)
        n_examples = len(batch["weights"])
    else:
        inputs = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch.get("attention_mask"),
            "use_cache": False,
        }
        labels, segments, n_examples = batch["labels"], None, 0
    positions = label_positions(labels, segments) if _skips_head(model) else None
    keep = {} if positions is None else {"logits_to_keep": positions}
    logits = model(**inputs, **keep).logits
    per_example = per_example_lm_loss(
        logits, labels, segments, n_examples, positions, label_smoothing
    )
    loss = weighted_mean(per_example, batch.get("weights"), batch.get("weight_norm"))
    return ObjectiveOutput(loss, per_example, None)


def label_words_objective(
    model: nn.Module, batch: Mapping[str, Any], head: LinearHead | None = None, loss: str = "ce"
) -> ObjectiveOutput:
    """Loss over label-word logits (batch: ``positions``, ``label_word_ids`` ``[C]`` or ``[B, C]``,
    ``class_labels``)."""
    _require(batch, ("input_ids", "positions", "label_word_ids", "class_labels"), "label_words")
    logits = _forward(model, batch).logits
    scores = label_word_logits(logits, batch["positions"], batch["label_word_ids"])
    per_example = class_loss(scores, batch["class_labels"], loss)
    total = weighted_mean(per_example, batch.get("weights"), batch.get("weight_norm"))
    return ObjectiveOutput(total, per_example, scores)


def option_log_probs(
    logits: Tensor, option_labels: Tensor, positions: Tensor | None = None
) -> Tensor:
    """Σ over each row's option tokens of log p(token | everything before it).

    Args:
        logits: ``[R, T, V]`` LM logits, or ``[R, K, V]`` at ``positions`` only.
        option_labels: ``[R, T]`` the option's token ids where they stand, -100 elsewhere.
        positions: ``[K]`` the positions ``logits`` holds (:func:`label_positions`), or
            ``None`` for all T.

    Returns:
        ``[R]`` float32 log-probabilities of the options.
    """
    if positions is None:
        positions = torch.arange(option_labels.shape[1] - 1, device=option_labels.device)
        logits = logits[:, :-1]
    targets = option_labels[:, positions + 1]
    mask = targets != IGNORE_INDEX
    rows = mask.nonzero()[:, 0]
    token_log_probs = -F.cross_entropy(logits[mask].float(), targets[mask], reduction="none")
    sums = torch.zeros(option_labels.shape[0], dtype=torch.float32, device=logits.device)
    return sums.index_add(0, rows, token_log_probs)


def options_objective(
    model: nn.Module, batch: Mapping[str, Any], head: LinearHead | None = None, loss: str = "ce"
) -> ObjectiveOutput:
    """Loss over the C options' log-probabilities, causal LMs (batch: ``input_ids`` and
    ``option_labels`` ``[B * C, T]``, row b * C + c = example b's prompt then option c;
    ``class_labels`` ``[B]``; see ``adaptlab.training.fewshot.collate_options``).

    The class scores ``[B, C]`` are log p(option c | prompt b), the sum over the option's
    tokens; with single-token options they are the label-word logits less the row's log-sum-exp
    over the vocabulary, so the cross-entropy and the argmax equal the label-word objective's.
    The LM head runs only at the positions before option tokens when the model takes
    ``logits_to_keep``.
    """
    _require(batch, ("input_ids", "option_labels", "class_labels"), "options")
    labels = batch["option_labels"]
    n_examples = batch["class_labels"].shape[0]
    if labels.shape[0] % max(n_examples, 1):
        raise TrainingError(
            f"option_labels has {labels.shape[0]} rows for {n_examples} examples; build batches "
            "with collate_options (C rows per example)."
        )
    positions = label_positions(labels) if _skips_head(model) else None
    keep = {} if positions is None else {"logits_to_keep": positions}
    logits = _forward(model, batch, use_cache=False, **keep).logits
    scores = option_log_probs(logits, labels, positions).view(n_examples, -1)
    per_example = class_loss(scores, batch["class_labels"], loss)
    total = weighted_mean(per_example, batch.get("weights"), batch.get("weight_norm"))
    return ObjectiveOutput(total, per_example, scores)


def linear_head_objective(
    model: nn.Module, batch: Mapping[str, Any], head: LinearHead | None = None, loss: str = "ce"
) -> ObjectiveOutput:
    """Loss of a :class:`LinearHead` on the last hidden states (batch: ``class_labels``).

    The head is ``head`` or the one attached to the model; it reads ``batch["positions"]``,
    else the first attended token. A one-output head is a regression head (STS-B): its loss is
    always the squared error of its output to ``batch["target_scores"]``, the unscaled score
    (0-5 for STS-B, as GLUE's regression heads), whatever ``loss`` says. Inside IVON's Monte
    Carlo averaging the scores are the head's logits (regression: predicted scores) averaged
    over the posterior draws (:data:`HEAD_LOGITS`), and the loss is taken on that average.
    """
    head = head if head is not None else find_linear_head(model)
    if head is None:
        raise TrainingError(
            "The linear_head objective needs a head; pass LinearHead(hidden_size, n_classes) "
            "or attach one with attach_linear_head(model, head)."
        )
    _require(batch, ("input_ids", "class_labels"), "linear_head")
    output = _forward(model, batch, output_hidden_states=True)
    positions = batch.get("positions")
    if positions is None and batch.get("attention_mask") is not None:
        positions = first_token_positions(batch["attention_mask"])
    averaged = getattr(output, HEAD_LOGITS, None)  # set by IVON's MC averaging only
    if averaged is None:
        scores = head(output.hidden_states[-1], positions)
    else:
        scores = at_positions(averaged, positions)
    if scores.shape[-1] == 1:
        _require(batch, ("target_scores",), "linear_head (regression)")
        per_example = (scores[:, 0].float() - batch["target_scores"].float()).pow(2)
    else:
        per_example = class_loss(scores, batch["class_labels"], loss)
    total = weighted_mean(per_example, batch.get("weights"), batch.get("weight_norm"))
    return ObjectiveOutput(total, per_example, scores)


Objective = Callable[..., ObjectiveOutput]  # (model, batch, head=None[, loss]) -> output

OBJECTIVES: dict[str, Objective] = {
    "answer_only": answer_only_objective,
    "label_words": label_words_objective,
    "options": options_objective,
    "linear_head": linear_head_objective,
}


def get_objective(name: str) -> Objective:
    """The objective called ``name``; raises :class:`TrainingError` listing the choices."""
    if name not in OBJECTIVES:
        raise TrainingError(f"Unknown objective {name!r}; choose from {', '.join(OBJECTIVES)}.")
    return OBJECTIVES[name]
