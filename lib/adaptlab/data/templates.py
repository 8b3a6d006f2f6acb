"""The LM-BFF prompt-template mini-language (spec ``kernel.md`` §2).

A template is split on ``*``; each part is one of:

=====================  ====================================================================
part                   tokens
=====================  ====================================================================
``cls``                the classification token (masked LMs: ``cls_token``, else ``bos_token``;
                       causal LMs: ``bos_token`` when the tokenizer has one, else nothing)
``mask``               ``mask_token`` (masked LMs); for causal LMs the prompt ends before it
``sep``, ``sep+``      ``sep_token`` (else ``eos_token``); ``sep+`` also starts a new segment
``sent_i``             sentence ``i`` (0 = ``text_a``, 1 = ``text_b``)
``+sent_i``            sentence ``i`` after a space
``sent-_i``            sentence ``i`` without its last character (e.g. a premise's final ``.``)
``sentl_i``            sentence ``i`` with its first character lower-cased (``+sentl_i``,
                       ``sentl-_i`` combine the flags); ``sentu_i`` / ``+sentu_i`` upper-case it
anything else          literal text, ``_`` standing for a space (``_It_was`` is ``" It was"``)
=====================  ====================================================================

``label_i`` / ``labelx_i`` (demonstration label words) are rejected: adaptlab builds no
demonstrations. Sentence tokens are cut to ``first_sent_limit`` (sentence 0) or
``other_sent_limit`` (others) tokens, as upstream does, before the length limit.

Length limit and the scored position:

* masked LMs (upstream semantics): the ids are cut to ``max_length`` at the tail, or at the head
  with ``truncate_head`` (``ids[-max_length:]``); the position is the first mask token. A mask
  that the cut removes is a :class:`DataError` (upstream: an assertion).
* causal LMs: the prompt is the template up to, not including, the mask; the position is its
  last token, whose next-token logits score the label words. A template with no sentence
  before the mask (trec's) or with a sentence after it (the NLI and paraphrase templates, whose
  second sentence the prompt would drop) is a :class:`DataError` that suggests a template with
  the mask at the end. When the prompt is too long,
  ``truncate_head`` cuts at the head as upstream does; otherwise the sentence parts are
  shortened (every sentence capped at the largest common length that fits, cutting at each
  sentence's end) so that the template text right before the mask always survives.

Each literal part is tokenised on its own, like upstream (where a one-character part is looked
up as a token: the same id for BPE and WordPiece vocabularies).

Example::

    >>> [p.kind for p in parse_template("*cls**sent_0*_It_was*mask*.*sep+*")]
    ['cls', 'sent', 'text', 'mask', 'text', 'sep']
    >>> parse_template("*cls**sent-_0*?*mask*,*+sentl_1**sep+*")[5]
    TemplatePart(kind='sent', text='', sent_id=1, space=True, case='lower', drop_last=False)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from adaptlab.data.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Kind = Literal["masked", "causal"]
PartKind = Literal["cls", "mask", "sep", "sent", "text"]

_SENTENCE = re.compile(r"^(\+?)sent([lu]?)(-?)_(\d+)$")
_DEMONSTRATION = re.compile(r"^label(x?)_\d+$")


@dataclass(frozen=True)
class TemplatePart:
    """One ``*``-separated part of a template.

    Attributes:
        kind: ``cls``, ``mask``, ``sep`` (also ``sep+``), ``sent`` or ``text``.
        text: the literal text of a ``text`` part, ``_`` already replaced by spaces.
        sent_id: which sentence a ``sent`` part takes.
        space: put a space before the sentence (``+sent_i``).
        case: lower- or upper-case the sentence's first character.
        drop_last: drop the sentence's last character (``sent-_i``).
    """

    kind: PartKind
    text: str = ""
    sent_id: int = 0
    space: bool = False
    case: Literal["lower", "upper"] | None = None
    drop_last: bool = False

    def render(self, sentences: Sequence[str]) -> str:
        """The text of a ``sent`` part for these sentences (before tokenisation)."""
        text = sentences[self.sent_id]
        if self.case == "lower":
            text = text[:1].lower() + text[1:]
        elif self.case == "upper":
            text = text[:1].upper() + text[1:]
        if self.drop_last:
            text = text[:-1]
        return " " + text if self.space else text


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the ``cls``, ``sep`` and ``mask`` parts stand for (``None``: none)."""

    cls: int | None
    sep: int | None
    mask: int | None


@dataclass(frozen=True)
class Encoding:
    """A tokenised prompt.

    Attributes:
        input_ids: ``[T]`` token ids, ``T <= max_length``.
        position: index in ``input_ids`` whose LM logits score the label words.
        n_truncated: tokens removed to fit ``max_length`` (sentence limits not counted).
    """

    input_ids: list[int]
    position: int
    n_truncated: int


def parse_template(template: str) -> list[TemplatePart]:
    """Parse a template string into its parts (empty parts, from ``**``, are dropped).

    Raises:
        DataError: a demonstration part (``label_i``, ``labelx_i``).
    """
    parts: list[TemplatePart] = []
    for raw in template.split("*"):
        if not raw:
            continue
        if raw == "cls":
            parts.append(TemplatePart("cls"))
        elif raw == "mask":
            parts.append(TemplatePart("mask"))
        elif raw in ("sep", "sep+"):
            parts.append(TemplatePart("sep"))
        elif _DEMONSTRATION.match(raw):
            raise DataError(
                f"Template {template!r} has the demonstration part *{raw}*; adaptlab builds no "
                "demonstrations, so remove it (keep cls, mask, sep, sent_i parts and text)."
            )
        elif match := _SENTENCE.match(raw):
            plus, case, minus, index = match.groups()
            parts.append(
                TemplatePart(
                    "sent",
                    sent_id=int(index),
                    space=bool(plus),
                    case={"l": "lower", "u": "upper"}.get(case),
                    drop_last=bool(minus),
                )
            )
        else:
            parts.append(TemplatePart("text", text=raw.replace("_", " ")))
    return parts


def check_template(template: str, kind: Kind, n_sentences: int | None = None) -> list[TemplatePart]:
    """Parse a template and check it can be used with this kind of model.

    Args:
        template: the template string.
        kind: ``masked`` (needs a mask) or ``causal`` (needs a sentence part before the mask).
        n_sentences: sentences per example of the task (1 or 2), to check ``sent_i`` indices.

    Returns:
        The parsed parts.

    Raises:
        DataError: no mask, a sentence index the task does not have, or (causal) a mask with
            no sentence before it.
    """
    parts = parse_template(template)
    kinds = [part.kind for part in parts]
    if "mask" not in kinds:
        raise DataError(
            f"Template {template!r} has no *mask* part; add one where the label word goes, "
            "e.g. '*cls**sent_0*_It_was*mask*.*sep+*'."
        )
    if n_sentences is not None:
        bad = sorted({p.sent_id for p in parts if p.kind == "sent" and p.sent_id >= n_sentences})
        if bad:
            raise DataError(
                f"Template {template!r} uses sentence(s) {bad} but the task has {n_sentences} "
                f"sentence(s) per example (sent_0{' and sent_1' if n_sentences > 1 else ''})."
            )
    if kind == "causal" and "sent" not in kinds[: kinds.index("mask")]:
        raise DataError(
            f"Template {template!r} puts *mask* before any sentence, but a causal LM predicts the "
            "label word after the prompt; use a template with the mask at the end, e.g. "
            "'*cls**sent_0*_The_answer_is*mask*'."
        )
    after = [p.sent_id for p in parts[kinds.index("mask") :] if p.kind == "sent"]
    if kind == "causal" and after:
        raise DataError(
            f"Template {template!r} puts sentence(s) {after} after *mask*, which a causal LM's "
            "prompt (the text before the mask) would drop; put every sentence before the mask, "
            "e.g. '*cls**sent-_0*,*+sentl_1*?*mask*'."
        )
    return parts


def special_ids(tokenizer: PreTrainedTokenizerBase, kind: Kind) -> SpecialIds:
    """The ids of ``cls``, ``sep`` and ``mask`` for this tokenizer and kind of model.

    Masked LMs use ``cls_token``/``sep_token`` and fall back to ``bos_token``/``eos_token``
    (RoBERTa's ``<s>``/``</s>`` are both); all three must exist. Causal LMs use the BOS token
    for ``cls`` and the sep (else eos) token for ``sep`` when the tokenizer has them, and never
    a mask.

    Raises:
        DataError: a masked-LM tokenizer without a cls/bos, sep/eos or mask token.
    """

    def token_id(*names: str) -> int | None:
        for name in names:
            if getattr(tokenizer, name, None) is not None:
                return int(tokenizer.convert_tokens_to_ids(getattr(tokenizer, name)))
        return None

    if kind == "causal":
        return SpecialIds(token_id("bos_token"), token_id("sep_token", "eos_token"), None)
    ids = SpecialIds(
        token_id("cls_token", "bos_token"),
        token_id("sep_token", "eos_token"),
        token_id("mask_token"),
    )
    missing = [name for name in ("cls", "sep", "mask") if getattr(ids, name) is None]
    if missing:
        raise DataError(
            f"Tokenizer {tokenizer_name(tokenizer)} has no {'/'.join(missing)} token, which a "
            "masked-LM prompt needs; use the tokenizer of a masked LM (RoBERTa, BERT) or "
            "kind='causal'."
        )
    return ids


def tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's ``name_or_path``, or its class name when it has none."""
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def encode_parts(
    parts: Sequence[TemplatePart],
    sentences: Sequence[str],
    encode: Callable[[str], list[int]],
    specials: SpecialIds,
    *,
    kind: Kind,
    max_length: int,
    first_sent_limit: int | None = None,
    other_sent_limit: int | None = None,
    truncate_head: bool = False,
    position: Literal["mask", "first", "last"] = "mask",
) -> Encoding:
    """Tokenise one example with a parsed template.

    Args:
        parts: parsed template (see :func:`check_template`).
        sentences: the example's sentences (``text_a``, and ``text_b`` for pairs).
        encode: text -> token ids without special tokens.
        specials: ids of cls / sep / mask (:func:`special_ids`).
        kind: ``masked`` or ``causal`` (see the module docstring).
        max_length: most tokens kept.
        first_sent_limit: most tokens of sentence 0 (None: no limit).
        other_sent_limit: most tokens of the other sentences.
        truncate_head: cut over-long inputs at the head instead of the tail (masked) or
            instead of shortening the sentences (causal).
        position: which token is scored: the first ``mask`` (masked prompts), the ``first``
            token (CLS linear head) or the ``last`` token (causal LMs).

    Returns:
        The ids and the scored position.

    Raises:
        DataError: the cut removes the mask, or the template text alone exceeds
            ``max_length`` (causal).
    """
    if kind == "causal":
        kinds = [part.kind for part in parts]
        if "mask" in kinds:
            parts = parts[: kinds.index("mask")]
    segments: list[tuple[bool, list[int]]] = []  # (is a sentence, ids)
    mask_at: int | None = None
    length = 0
    for part in parts:
        if part.kind == "sent":
            ids = encode(part.render(sentences))
            limit = first_sent_limit if part.sent_id == 0 else other_sent_limit
            if limit is not None:
                ids = ids[:limit]
        elif part.kind == "text":
            ids = encode(part.text)
        else:
            token = getattr(specials, part.kind)
            ids = [] if token is None else [token]
            if part.kind == "mask" and mask_at is None:
                mask_at = length
        segments.append((part.kind == "sent", ids))
        length += len(ids)

    if kind == "causal" and length > max_length and not truncate_head:
        segments = _shorten_sentences(segments, max_length)
    input_ids = [token for _, ids in segments for token in ids]
    n_cut = max(0, len(input_ids) - max_length)
    head_cut = n_cut if truncate_head else 0
    input_ids = input_ids[head_cut:][:max_length]
    if not input_ids:
        raise DataError("The prompt is empty; the template and the example give no tokens.")
    if position == "first":
        return Encoding(input_ids, 0, n_cut)
    if position == "last":
        return Encoding(input_ids, len(input_ids) - 1, n_cut)
    if mask_at is None:
        raise DataError("The template has no *mask* part; a masked-LM prompt needs one.")
    at = mask_at - head_cut
    if not 0 <= at < len(input_ids):
        raise DataError(
            f"The mask token (at {mask_at} of {len(input_ids) + n_cut} tokens) falls outside "
            f"max_length={max_length} after cutting the {'head' if truncate_head else 'tail'}; "
            "raise max_length, lower first_sent_limit/other_sent_limit, or toggle truncate_head."
        )
    return Encoding(input_ids, at, n_cut)


def _shorten_sentences(
    segments: list[tuple[bool, list[int]]], max_length: int
) -> list[tuple[bool, list[int]]]:
    """Cap every sentence at the largest common length for which the prompt fits."""
    fixed = sum(len(ids) for is_sent, ids in segments if not is_sent)
    lengths = [len(ids) for is_sent, ids in segments if is_sent]
    budget = max_length - fixed
    if budget <= 0 or not lengths:
        raise DataError(
            f"The template's own tokens ({fixed}) leave no room for the sentences within "
            f"max_length={max_length}; raise max_length or shorten the template."
        )
    low, high = 0, max(lengths)  # fits with no sentence tokens; does not fit uncut
    while high - low > 1:
        middle = (low + high) // 2
        if sum(min(n, middle) for n in lengths) <= budget:
            low = middle
        else:
            high = middle
    cap = low
    return [(is_sent, ids[:cap] if is_sent else ids) for is_sent, ids in segments]
