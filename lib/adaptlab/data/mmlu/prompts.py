"""Prompt text (spec §2 and §4), tokenisation, fingerprints and answer-letter ids (§6)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from adaptlab.data.errors import DataError
from adaptlab.data.mmlu.examples import LETTERS, MMLUExample, TokenizedPrompt, group_by_subject
from adaptlab.data.mmlu.shots import (
    ShotSelection,
    check_num_shots,
    select_shots,
    shared_text_fraction,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def header(subject: str) -> str:
    """First line of an evaluation prompt, followed by a blank line."""
    words = "".join(" " + word for word in subject.split("_"))
    return f"The following are multiple choice questions (with answers) about{words}.\n\n"


def question_block(ex: MMLUExample) -> str:
    """Question, the four stripped options and ``"Answer:"`` (no trailing space)."""
    options = [
        f"{letter}. {choice.strip()}" for letter, choice in zip(LETTERS, ex.choices, strict=True)
    ]
    return "\n".join([ex.question.strip(), *options]) + "\nAnswer:"


def format_shot(ex: MMLUExample) -> str:
    """A solved example: its block, a space, the gold letter and a blank line."""
    return f"{question_block(ex)} {ex.answer}\n\n"


def build_prompt(query: MMLUExample, shots: Sequence[MMLUExample]) -> str:
    """Evaluation prompt: header of the query's subject, the shots, then the query's block."""
    return header(query.subject) + "".join(map(format_shot, shots)) + question_block(query)


def build_train_text(ex: MMLUExample) -> tuple[str, str]:
    """Answer-only fine-tuning text, without header (spec §4).

    Returns:
        ``(prompt, target)``: the question block and ``" " + letter``; the loss is taken on the
        target tokens only.
    """
    return question_block(ex), f" {ex.answer}"


def build_prompts(
    examples: Sequence[MMLUExample],
    dev: Sequence[MMLUExample] | None,
    num_shots: int,
    seed: int,
    random_order: bool = True,
    selection: ShotSelection = "fixed",
) -> list[str]:
    """Evaluation prompt text of every example (see :func:`select_shots` for the shots).

    Raises:
        DataError: bad ``num_shots``, no ``dev`` for a few-shot prompt, or too few shots.
    """
    shots = _shots(examples, dev, num_shots, seed, random_order, selection)
    return [build_prompt(ex, s) for ex, s in zip(examples, shots, strict=True)]


def shared_prompt_text(
    examples: Sequence[MMLUExample],
    dev: Sequence[MMLUExample] | None,
    num_shots: int,
    seed: int,
    random_order: bool = True,
    selection: ShotSelection = "fixed",
) -> float:
    """Mean fraction of prompt text two queries of one subject share (header and shots).

    The confound of the few-shot landscape: with ``fixed`` shots every prompt of a subject
    repeats the same solved questions, so their representations can cluster by subject for
    that reason alone. See :func:`adaptlab.data.mmlu.shots.shared_text_fraction`.
    """
    shots = _shots(examples, dev, num_shots, seed, random_order, selection)
    return shared_text_fraction(
        [build_prompt(ex, s) for ex, s in zip(examples, shots, strict=True)],
        [ex.subject for ex in examples],
        [[format_shot(shot) for shot in s] for s in shots],
    )


def _shots(
    examples: Sequence[MMLUExample],
    dev: Sequence[MMLUExample] | None,
    num_shots: int,
    seed: int,
    random_order: bool,
    selection: ShotSelection,
) -> list[list[MMLUExample]]:
    """Every example's shots, after checking the shot settings."""
    check_num_shots(num_shots)
    if num_shots and dev is None:
        raise DataError(
            f"num_shots={num_shots} needs a shot pool but dev is None; load a source with a dev "
            "split or keep holdout_per_subject > 0."
        )
    if seed < 0:
        raise DataError(f"seed={seed} is negative; use a seed >= 0.")
    pools = group_by_subject(dev or [])
    return [select_shots(ex, pools, num_shots, seed, random_order, selection) for ex in examples]


def tokenize_prompts(
    examples: Sequence[MMLUExample],
    dev: Sequence[MMLUExample] | None,
    tokenizer: PreTrainedTokenizerBase,
    num_shots: int,
    seed: int,
    max_seq_len: int | None,
    random_order: bool = True,
    batch_size: int = 256,
    selection: ShotSelection = "fixed",
) -> list[TokenizedPrompt]:
    """Build and tokenise the evaluation prompts, left-truncated to ``max_seq_len``.

    Each prompt is tokenised whole with ``add_special_tokens=True`` (BOS where the tokenizer
    adds one) and no truncation, then cut to its last ``max_seq_len`` tokens, so the question
    and ``"Answer:"`` always survive and the earliest shots go first.

    Args:
        examples: queries, ``[N]``.
        dev: shot pool (``MMLUSplits.dev``); may be ``None`` for 0 shots.
        tokenizer: a Hugging Face tokenizer.
        num_shots: shots per prompt, 0..5.
        seed: seed of the per-question shot order.
        max_seq_len: longest prompt kept, in tokens; ``None`` keeps every prompt whole.
        random_order: permute the shots per question (see :func:`select_shots`).
        batch_size: prompts per tokenizer call.
        selection: the shot rule (``fixed``, ``random``, ``other_subject``).

    Returns:
        ``[N]`` tokenised prompts in the order of ``examples``.

    Raises:
        DataError: bad shot settings, or ``max_seq_len`` shorter than the longest question block.
    """
    texts = build_prompts(examples, dev, num_shots, seed, random_order, selection)
    if max_seq_len is not None:
        if max_seq_len < 1:
            raise DataError(f"max_seq_len={max_seq_len} must be positive (or None for no limit).")
        blocks = [question_block(ex) for ex in examples]
        block_ids = tokenizer(blocks, add_special_tokens=False)["input_ids"] if blocks else []
        longest = max(map(len, block_ids), default=0)
        if longest > max_seq_len:
            raise DataError(
                f"max_seq_len={max_seq_len} cannot hold one question (the longest needs {longest} "
                "tokens); raise --max_seq_len."
            )
    prompts: list[TokenizedPrompt] = []
    starts = range(0, len(texts), batch_size)
    bar = tqdm(starts, desc="tokenising MMLU prompts", unit="batch", disable=len(starts) < 2)
    for start in bar:
        batch = tokenizer(texts[start : start + batch_size], add_special_tokens=True)["input_ids"]
        for ex, ids in zip(examples[start : start + batch_size], batch, strict=True):
            cut = 0 if max_seq_len is None else max(0, len(ids) - max_seq_len)
            prompts.append(TokenizedPrompt(ex.index, ex.subject, ex.answer, list(ids[cut:]), cut))
    n_cut = sum(p.n_truncated > 0 for p in prompts)
    if n_cut:
        logger.info(
            "Left-truncated %d of %d prompts to max_seq_len=%s.", n_cut, len(prompts), max_seq_len
        )
    return prompts


def dataset_fingerprint(
    examples: Sequence[MMLUExample],
    settings: Mapping[str, Any],
    dev: Sequence[MMLUExample] | None = None,
) -> str:
    """sha256 over every prompt's text, its query's index, subject and answer, and ``settings``.

    Two runs with equal fingerprints evaluate the same prompts; manifests store it and resumed
    runs compare it.

    Args:
        examples: queries.
        settings: must hold ``num_shots`` and ``seed`` (and may hold ``random_order``, default
            True, and ``shot_selection``, default ``fixed``) to rebuild the prompts; every entry
            (tokenizer, max_seq_len, ...) is hashed.
        dev: shot pool.

    Returns:
        Hex digest.

    Raises:
        DataError: ``settings`` lacks ``num_shots`` or ``seed``, or bad shot settings.
    """
    missing = [key for key in ("num_shots", "seed") if key not in settings]
    if missing:
        raise DataError(
            f"settings lacks {', '.join(missing)}; the fingerprint rebuilds the prompts from them."
        )
    texts = build_prompts(
        examples,
        dev,
        settings["num_shots"],
        settings["seed"],
        settings.get("random_order", True),
        settings.get("shot_selection", "fixed"),
    )
    digest = hashlib.sha256(json.dumps(dict(settings), sort_keys=True, default=str).encode())
    for ex, text in zip(examples, texts, strict=True):
        digest.update(json.dumps([ex.index, ex.subject, ex.answer, text]).encode() + b"\n")
    return digest.hexdigest()


def answer_letter_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Ids of the letter tokens a model emits after ``"Answer:"`` (``" A"`` for BPE tokenizers).

    For each letter X the id is the last token of ``"Answer: " + X``; the encoding must be the
    tokens of ``"Answer:"`` plus exactly one token, and the four ids must differ.

    Returns:
        ``{"A": id, "B": id, "C": id, "D": id}``.

    Raises:
        DataError: the tokenizer splits the letter or merges it with ``"Answer:"``.
    """
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    prefix = list(tokenizer("Answer:", add_special_tokens=False)["input_ids"])
    ids: dict[str, int] = {}
    for letter in LETTERS:
        full = list(tokenizer("Answer: " + letter, add_special_tokens=False)["input_ids"])
        if full[: len(prefix)] != prefix or len(full) != len(prefix) + 1:
            raise DataError(
                f"Tokenizer {name} encodes 'Answer: {letter}' as {full}, not the tokens of "
                f"'Answer:' {prefix} plus one letter token; constrained predictions need a "
                "tokenizer where the answer letter is a single token."
            )
        ids[letter] = full[-1]
    if len(set(ids.values())) != len(LETTERS):
        raise DataError(f"Tokenizer {name} maps two answer letters to one token id: {ids}.")
    return ids
