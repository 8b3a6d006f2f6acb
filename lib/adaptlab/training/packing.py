"""Sequence packing: several training examples in one row, none attending to another.

Padding a micro-batch to its longest example wastes compute on pad tokens (about half of it for
MMLU prompts at 8 per micro-batch). Packing lays the examples end to end in rows of at most
``max_len`` tokens instead; position ids restart at 0 for each example and attention never
crosses from one example into another, so every example gets the logits it gets alone (up to
float rounding), hence the same loss and the same gradients. How the model learns where the
examples end depends on its attention implementation:

- ``flash_attention_2`` / ``3``: the rows flattened into one ``[1, R * W]`` sequence and no
  mask; the position ids restarting at 0 mark the examples (transformers' varlen path, the
  convention of ``DataCollatorWithFlattening``).
- ``sdpa``, ``eager``: the ``[R, W]`` rows and a 4D block-diagonal causal mask
  ``[R, 1, W, W]`` (boolean for sdpa, additive for eager), which transformers uses as given.

A packed batch carries ``input_ids``, ``labels``, ``position_ids``, ``segment_ids`` (the index of
each token's example in the micro-batch, -1 on padding) and ``attention_mask`` (1 on real
tokens, as in a padded batch), all ``[R, W]``, plus what the objective reads (answer-only: the
examples' ``weights`` ``[B]``). The pad
tokens at the end of a row form one more block that attends only to itself, so no attention row
is empty (an all-masked row gives NaN, and NaN poisons the gradients through the backward pass).

    pack_rows([7, 5, 3], max_len=10)                 # [[0], [1, 2]]: rows of 7 and 5 + 3
    batch = pack_sequences(items, {"input_ids": pad_id, "labels": -100}, max_len=512)
    inputs, labels, segments = packed_model_inputs(model, batch)
    logits = model(**inputs).logits                  # then a loss per segment
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from adaptlab.extract.points import unwrap
from adaptlab.training.optim import TrainingError

VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")
"""Implementations that read packed sequences from the position ids (no mask)."""
MASKED_ATTENTION = ("sdpa", "eager")
"""Implementations that take a custom 4D mask as it is."""

_CAPACITY_STEPS = 8


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of at most ``capacity`` tokens: longest example first, into the first bin it fits.

    Args:
        lengths: ``[B]`` tokens of each example, none above ``capacity``.
        capacity: most tokens in one bin.

    Returns:
        Lists of example indices, one per bin, in the order the bins were opened.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def pack_rows(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Rows of examples of at most ``max_len`` tokens that hold the fewest padded slots R x W.

    First-fit decreasing runs with nine row capacities, evenly spaced from the longest example
    to ``max_len``; the packing with the fewest slots (then the narrowest rows) wins. The
    capacity of the longest example is among them, so a packed batch never holds more slots than
    the padded batch of the same examples: packing never costs memory.

    Args:
        lengths: ``[B]`` tokens of each example.
        max_len: most tokens in one row (``max_seq_len``).

    Returns:
        Lists of example indices, one per row.

    Raises:
        TrainingError: no examples, or one longer than ``max_len``.
    """
    if not lengths:
        raise TrainingError("pack_rows got no examples; batches need at least one.")
    longest = max(lengths)
    if longest > max_len:
        raise TrainingError(
            f"An example of {longest} tokens does not fit a packed row of max_len={max_len}; "
            "encode the examples with the run's max_seq_len."
        )
    best: tuple[tuple[int, int], list[list[int]]] | None = None
    spread = max_len - longest
    for capacity in sorted({longest + spread * k // _CAPACITY_STEPS for k in range(9)}):
        rows = first_fit_decreasing(lengths, capacity)
        width = max(sum(lengths[i] for i in row) for row in rows)
        cost = (len(rows) * width, width)
        if best is None or cost < best[0]:
            best = (cost, rows)
    return best[1]


def pack_sequences(
    examples: Sequence[Mapping[str, Sequence[int]]], pad_values: Mapping[str, int], max_len: int
) -> dict[str, Tensor]:
    """Lay B examples end to end in packed rows (see :func:`pack_rows`).

    Args:
        examples: ``[B]`` examples; each holds, under every key of ``pad_values``, a token-level
            list (``input_ids``, ``labels``, ...) of the example's length.
        pad_values: value written into the padding, per key.
        max_len: most tokens in one row.

    Returns:
        Each key of ``pad_values`` ``[R, W]`` long, plus ``position_ids`` ``[R, W]``
        (restarting at 0 for every example and for the padding), ``segment_ids`` ``[R, W]``
        (example index, -1 on padding) and ``attention_mask`` ``[R, W]`` (1 on real tokens).
    """
    keys = list(pad_values)
    lengths = [len(ex[keys[0]]) for ex in examples]
    rows = pack_rows(lengths, max_len)
    shape = (len(rows), max(sum(lengths[i] for i in row) for row in rows))
    packed = {key: torch.full(shape, pad, dtype=torch.long) for key, pad in pad_values.items()}
    segment_ids = torch.full(shape, -1, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            end = start + lengths[i]
            for key in keys:
                packed[key][r, start:end] = torch.tensor(examples[i][key])
            segment_ids[r, start:end] = i
            position_ids[r, start:end] = torch.arange(lengths[i])
            start = end
        position_ids[r, start:] = torch.arange(shape[1] - start)
    return {
        **packed,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "attention_mask": (segment_ids >= 0).long(),
    }


def block_causal_mask(segment_ids: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Causal attention within each segment only (padding, -1, is a segment of its own).

    Args:
        segment_ids: ``[R, W]`` segment of every token.
        dtype: ``None`` for a boolean mask (True = attend, what sdpa takes), else an additive
            mask of this dtype (0 or the dtype's minimum, what eager attention adds).

    Returns:
        ``[R, 1, W, W]`` mask, query along dim 2 and key along dim 3.
    """
    width = segment_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
    allowed = allowed[:, None]
    if dtype is None:
        return allowed
    blocked = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return blocked.masked_fill(~allowed, torch.finfo(dtype).min)


def packed_inputs(
    batch: Mapping[str, Any], attn_implementation: str, dtype: torch.dtype
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Model keyword arguments for a packed batch, and the labels and segments they align with.

    Args:
        batch: a packed batch (module docstring).
        attn_implementation: the model's ``config._attn_implementation``.
        dtype: the model's compute dtype (for eager's additive mask).

    Returns:
        ``(inputs, labels, segment_ids)``: ``inputs`` for ``model(**inputs)``; ``labels`` and
        ``segment_ids`` have the shape of the logits' first two dimensions (``[1, R * W]`` for
        flash attention, ``[R, W]`` otherwise).

    Raises:
        TrainingError: an attention implementation packing cannot drive.
    """
    # attention adapters route the model through "adaptlab_<backend>" (adaptlab.adapters)
    attn_implementation = attn_implementation.removeprefix("adaptlab_")
    ids, positions = batch["input_ids"], batch["position_ids"]
    labels, segments = batch["labels"], batch["segment_ids"]
    if attn_implementation in VARLEN_ATTENTION:
        flat = [t.reshape(1, -1) for t in (ids, positions, labels, segments)]
        return {"input_ids": flat[0], "position_ids": flat[1], "use_cache": False}, *flat[2:]
    if attn_implementation not in MASKED_ATTENTION:
        raise TrainingError(
            f"Packing cannot drive attn_implementation={attn_implementation!r}; use "
            f"{', '.join(MASKED_ATTENTION + VARLEN_ATTENTION)}, or packing=false."
        )
    mask = block_causal_mask(segments, None if attn_implementation == "sdpa" else dtype)
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    return {**inputs, "use_cache": False}, labels, segments


def packed_model_inputs(
    model: nn.Module, batch: Mapping[str, Any]
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """:func:`packed_inputs` for ``model`` (possibly PEFT/DDP-wrapped): ``model(**inputs)``."""
    base = unwrap(model)
    return packed_inputs(batch, base.config._attn_implementation, base.dtype)
