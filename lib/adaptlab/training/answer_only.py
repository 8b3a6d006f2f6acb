"""Answer-only MMLU data (landscape.md §4): the prompt is the question block without header, the
target is ``" " + letter``, labels are the input ids with the prompt positions set to -100, no
EOS::

    examples = encode_answer_only(splits.test, tokenizer, max_seq_len=512, weighted=True)
    batch = collate_answer_only(examples[:4], tokenizer.pad_token_id)
    # or packed into rows of <= 512 tokens, same per-example losses (adaptlab.training.packing)
    batch = collate_packed_answer_only(examples[:4], tokenizer.pad_token_id, max_len=512)
    out = OBJECTIVES["answer_only"](model, batch)
    out.loss.backward()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import torch
from transformers import PreTrainedTokenizerBase

from adaptlab.data import MMLUExample, build_train_text, sample_weights
from adaptlab.training.optim import TrainingError
from adaptlab.training.packing import pack_sequences

IGNORE_INDEX = -100


class AnswerOnlyExample(TypedDict):
    """One tokenised answer-only training example.

    Keys:
        index: ``MMLUExample.index``.
        subject: subject of the question.
        input_ids: ``[seq_len]`` prompt then answer tokens.
        labels: ``[seq_len]`` -100 on the prompt, the answer ids after it.
        weight: loss weight (``sample_weights`` when weighted, else 1.0).
        n_truncated: prompt tokens cut from the left to fit ``max_seq_len``.
    """

    index: int
    subject: str
    input_ids: list[int]
    labels: list[int]
    weight: float
    n_truncated: int


def answer_only_labels(
    prompt_ids: Sequence[int], full_ids: Sequence[int], name: str = "the example"
) -> list[int]:
    """Labels that put the loss on the tokens after the prompt only.

    Args:
        prompt_ids: tokenisation of the prompt, ``[P]``.
        full_ids: tokenisation of prompt + target, ``[L]``.
        name: how to name the example in errors.

    Returns:
        ``[L]`` labels: ``full_ids`` with the first P positions set to -100.

    Raises:
        TrainingError: the prompt's tokens are not a prefix of the full text's (the target
            merged with the end of the prompt), or no token follows the prompt.
    """
    n_prompt = len(prompt_ids)
    if list(full_ids[:n_prompt]) != list(prompt_ids):
        raise TrainingError(
            f"The prompt tokens of {name} are not a prefix of its prompt + answer tokens, so the "
            "answer merged with the prompt's last token; use a tokenizer that keeps ' A' separate "
            "from 'Answer:'."
        )
    if len(full_ids) <= n_prompt:
        raise TrainingError(f"{name} has no answer token after its prompt; check its answer.")
    return [IGNORE_INDEX] * n_prompt + list(full_ids[n_prompt:])


def _leading_special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the tokenizer puts before a text (BOS), without trailing ones (EOS)."""
    probe = "Answer:"
    bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start]
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    raise TrainingError(
        f"Tokenizer {name} changes the text's tokens when it adds special tokens, so answer-only "
        "labels cannot be placed; use the model's own tokenizer."
    )


def encode_answer_only(
    examples: Sequence[MMLUExample],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int | None,
    weighted: bool = False,
) -> list[AnswerOnlyExample]:
    """Tokenise MMLU training examples for answer-only fine-tuning.

    Prompt and prompt + answer are tokenised without special tokens, then the tokenizer's
    leading specials (BOS) are prepended; no EOS is added. Sequences longer than ``max_seq_len``
    lose prompt tokens from the left (BOS first, as evaluation prompts do), never answer tokens.

    Args:
        examples: training questions, ``[N]``.
        tokenizer: the model's tokenizer.
        max_seq_len: longest sequence kept, in tokens; ``None`` for no limit.
        weighted: attach w_i = N / (S · n_subject) (``adaptlab.data.sample_weights``).

    Returns:
        ``[N]`` examples in input order.

    Raises:
        TrainingError: a prompt whose tokens are not a prefix of prompt + answer, or a
            ``max_seq_len`` that cannot hold an answer and one prompt token.
    """
    if max_seq_len is not None and max_seq_len < 2:
        raise TrainingError(
            f"max_seq_len={max_seq_len} cannot hold a prompt token and an answer; use at least 2."
        )
    if not examples:
        return []
    leading = _leading_special_ids(tokenizer)
    texts = [build_train_text(ex) for ex in examples]
    prompt_ids = tokenizer([p for p, _ in texts], add_special_tokens=False)["input_ids"]
    full_ids = tokenizer([p + t for p, t in texts], add_special_tokens=False)["input_ids"]
    weights = sample_weights([ex.subject for ex in examples]) if weighted else None
    encoded: list[AnswerOnlyExample] = []
    for i, ex in enumerate(examples):
        name = f"MMLU example {ex.index} ({ex.subject})"
        ids = leading + list(full_ids[i])
        labels = answer_only_labels(leading + list(prompt_ids[i]), ids, name)
        n_answer = len(ids) - len(leading) - len(prompt_ids[i])
        if max_seq_len is not None and n_answer >= max_seq_len:
            raise TrainingError(
                f"max_seq_len={max_seq_len} cannot hold the {n_answer} answer tokens of {name} "
                "and a prompt token; raise max_seq_len."
            )
        cut = 0 if max_seq_len is None else max(0, len(ids) - max_seq_len)
        encoded.append(
            AnswerOnlyExample(
                index=ex.index,
                subject=ex.subject,
                input_ids=ids[cut:],
                labels=labels[cut:],
                weight=1.0 if weights is None else float(weights[i]),
                n_truncated=cut,
            )
        )
    return encoded


def collate_answer_only(examples: Sequence[AnswerOnlyExample], pad_token_id: int) -> dict:
    """Right-pad answer-only examples into a batch.

    Args:
        examples: ``[B]`` examples from :func:`encode_answer_only`.
        pad_token_id: id written into padding positions (their labels are -100).

    Returns:
        ``input_ids`` ``[B, T]`` long, ``attention_mask`` ``[B, T]`` long, ``labels`` ``[B, T]``
        long, ``weights`` ``[B]`` float32.
    """
    if not examples:
        raise TrainingError("collate_answer_only got no examples; batches need at least one.")
    length = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[row, :n] = torch.tensor(ex["input_ids"])
        labels[row, :n] = torch.tensor(ex["labels"])
        attention_mask[row, :n] = 1
    weights = torch.tensor([ex["weight"] for ex in examples], dtype=torch.float32)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "weights": weights,
    }


def collate_packed_answer_only(
    examples: Sequence[AnswerOnlyExample], pad_token_id: int, max_len: int
) -> dict:
    """Pack answer-only examples into rows of at most ``max_len`` tokens (no cross-attention).

    See :mod:`adaptlab.training.packing`; :func:`answer_only_objective` takes the result as it
    takes a padded batch and gives the same per-example losses.

    Args:
        examples: ``[B]`` examples from :func:`encode_answer_only`.
        pad_token_id: id written into padding positions (their labels are -100).
        max_len: most tokens in one row (the run's ``max_seq_len``).

    Returns:
        ``input_ids``, ``labels``, ``position_ids``, ``segment_ids``, ``attention_mask``
        ``[R, W]`` long and ``weights`` ``[B]`` float32 (in the order of ``examples``).
    """
    if not examples:
        raise TrainingError("collate_packed_answer_only got no examples; batches need one.")
    batch = pack_sequences(examples, {"input_ids": pad_token_id, "labels": IGNORE_INDEX}, max_len)
    batch["weights"] = torch.tensor([ex["weight"] for ex in examples], dtype=torch.float32)
    return batch
