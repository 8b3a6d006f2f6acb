"""Few-shot tasks: loading k-shot splits, prompt encoding, batching and metrics.

The LM-BFF pipeline of spec ``kernel.md`` §1-§4 for masked and causal LMs::

    from adaptlab.data import load_task, encode_examples, label_word_ids, collate_prompts

    splits = load_task("SST-2", "data", k=16, seed=13)      # data/k-shot/SST-2/16-13/
    words = label_word_ids(splits.task, tokenizer)            # [C] ids of " terrible", " great"
    train = encode_examples(splits.train, splits.task, tokenizer, kind="masked")
    batch = collate_prompts(train[:8], tokenizer.pad_token_id, words)
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    scores = logits[torch.arange(8), batch["positions"]][:, batch["label_word_ids"]]   # [B, C]

``head="prompt"`` encodes the task's template; the scored position is the mask (masked LMs) or
the last prompt token (causal LMs, whose next-token logits score the label words).
``scoring="options"`` (causal LMs only) scores each class by its whole option, the tokens of
``" " + word`` (:func:`option_ids`, any number of tokens), appended after the prompt: label
words need not be single tokens, and options sharing a first token stay apart.
``head="linear"`` (the ``finetune`` setting of §4) encodes ``cls sent_0 sep [sent_1 sep]`` with
no sentence limits, as upstream does, scored at the first token (masked) or the last (causal).
See :mod:`adaptlab.data.templates` for the template language and the truncation rules.

``mode="full"`` reads a task's whole original data instead (``<data_dir>/<TASK>/``, the
original folder ``scripts/prepare_fewshot.py`` reads, e.g. GLUE): train is the training file,
dev and test are both the original evaluation file (GLUE's dev set, which the GLUE recipes
select on and report), k and seed unused.

Encoded examples can be cached as JSON (``cache_dir``). Unlike upstream's cache, whose name
omitted the template and label words and went stale silently (§11), the key is a sha256 over
everything the encoding depends on: template, label words, head, kind, tokenizer (name, class,
size, a hash of its vocabulary, special ids), length limits, ``truncate_head`` and the examples.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NotRequired, TypedDict

from tqdm.auto import tqdm

from adaptlab import assets
from adaptlab.data.errors import DataError
from adaptlab.data.offline import offline_splits
from adaptlab.data.splits import check_mode, check_test_limit, csv_label, limit_test, read_tsv
from adaptlab.data.tasks import FileLayout, Task, get_task
from adaptlab.data.templates import (
    Kind,
    TemplatePart,
    check_template,
    encode_parts,
    special_ids,
    tokenizer_name,
)
from adaptlab.io import atomic_open

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FULL = "full"
"""The data mode that reads a task's whole original data instead of a k-shot split."""

logger = logging.getLogger(__name__)

Head = Literal["prompt", "linear"]
Scoring = Literal["label_words", "options"]
SCORINGS = ("label_words", "options")
CACHE_VERSION = 1


@dataclass(frozen=True)
class FewShotExample:
    """One example of a few-shot task.

    Attributes:
        guid: ``<split>-<row>`` (row number in its file) or ``mmlu-<index>``.
        text_a: first sentence.
        text_b: second sentence of a pair task, else ``None``.
        label: the label string, one of ``task.labels`` (regression: the score's bin).
        score: the real-valued score of a regression task (STS-B), else None.
    """

    guid: str
    text_a: str
    text_b: str | None
    label: str
    score: float | None = None


@dataclass(frozen=True)
class TaskSplits:
    """A task's k-shot train / dev / test examples and where they came from.

    Attributes:
        task: the task.
        train: ``[k * C]`` training examples, grouped by label.
        dev: ``[k * C]`` (``10k * C`` in k-shot-10x) development examples.
        test: test examples (all, or a seeded sample of ``test_limit`` in file order).
        provenance: JSON-ready: ``task``, ``source`` (``files`` or ``offline``), ``data_dir``,
            ``k``, ``seed``, ``mode``, ``test_limit``, ``sha256`` (file name -> hash) and split
            sizes; offline tasks add the MMLU provenance and their subject groups.
    """

    task: Task
    train: list[FewShotExample]
    dev: list[FewShotExample]
    test: list[FewShotExample]
    provenance: dict


class PromptExample(TypedDict):
    """One encoded example: ``input_ids`` ``[T]``, the scored ``position``, the class index
    (and a regression task's ``score``)."""

    guid: str
    input_ids: list[int]
    position: int
    label: int
    score: NotRequired[float]


# ---------------------------------------------------------------------------------------------
# Loading


def load_task(
    name: str,
    data_dir: str | Path | None = None,
    k: int = 16,
    seed: int = 42,
    mode: str = "k-shot",
    test_limit: int | None = None,
) -> TaskSplits:
    """Load the k-shot train / dev / test examples of a task.

    Args:
        name: a key of :data:`adaptlab.data.TASKS` (case-insensitive).
        data_dir: the k-shot root holding ``<mode>/<TASK>/<K>-<SEED>/`` (as written by
            ``scripts/prepare_fewshot.py``), or that ``<K>-<SEED>`` folder itself. Ignored by
            the offline tasks (``mmlu-topics``, ``bbc-news``, ``tweet-sentiment``), which are
            built in memory.
        k: training examples per label.
        seed: data seed.
        mode: ``k-shot``, ``k-shot-10x``, ``k-shot-1k-test`` or ``full`` (the whole original
            data in ``data_dir/<TASK>/``; see the module docstring).
        test_limit: keep ``test_limit`` test examples drawn without replacement by
            ``numpy.random.default_rng(0)``, in file order (a plain head would keep one label
            of a file sorted by label); None: all.

    Returns:
        The splits and their provenance.

    Raises:
        DataError: unknown task or mode, no data folder, a missing or malformed file, an
            unknown label, or (offline) too few questions for k.
    """
    task = get_task(name)
    if mode != FULL:
        check_mode(mode)
    if k < 1:
        raise DataError(f"k={k} must be at least 1 (training examples per label).")
    check_test_limit(test_limit)
    provenance: dict[str, Any] = {"task": task.name, "k": k, "seed": seed, "mode": mode}
    if task.offline and mode == FULL:
        raise DataError(
            f"Task {task.name} is built in memory and has no original files for mode={FULL}; "
            "use a k-shot mode."
        )
    if task.offline:
        train, dev, test, offline = offline_splits(task, k, seed, mode)
        splits = [
            [FewShotExample(r.guid, r.text, None, r.label) for r in rows]
            for rows in (train, dev, test)
        ]
        provenance.update(offline)
    else:
        assert task.layout is not None
        if mode == FULL:
            folder, stems = _original_files(task, data_dir)
        else:
            folder = _setting_dir(task, data_dir, k, seed, mode)
            stems = ("train", task.layout.dev, task.layout.test)
        splits, hashes = [], {}
        for split, stem in zip(("train", "dev", "test"), stems, strict=True):
            path = folder / f"{stem}.{task.layout.format}"
            splits.append(read_examples(path, task, split))
            hashes[path.name] = assets.sha256_file(path)
        provenance.update(source="files", data_dir=str(folder), sha256=hashes)
    train, dev, test = splits
    test = limit_test(test, test_limit)
    provenance.update(test_limit=test_limit, n_train=len(train), n_dev=len(dev), n_test=len(test))
    return TaskSplits(task, train, dev, test, provenance)


def _original_files(task: Task, data_dir: str | Path | None) -> tuple[Path, tuple[str, ...]]:
    """``mode="full"``: the task's original folder and the file stems of train, dev and test."""
    assert task.layout is not None
    # the original evaluation file that the k-shot generator renames to the test split
    renamed = {stem.replace("dev", "test", 1): stem for stem in task.layout.original_eval}
    evaluation = renamed.get(task.layout.test)
    folder = Path(data_dir or ".").expanduser() / task.data_name
    train_file = folder / f"train.{task.layout.format}"
    if data_dir is None or evaluation is None or not train_file.is_file():
        raise DataError(
            f"Task {task.name} with mode={FULL} reads the original files {train_file.name} and "
            f"{evaluation or task.layout.test}.{task.layout.format} from <data_dir>/"
            f"{task.data_name}/; pass data_dir, the original data root of "
            "scripts/prepare_fewshot.py (its --original_dir)."
        )
    return folder, ("train", evaluation, evaluation)


def _setting_dir(task: Task, data_dir: str | Path | None, k: int, seed: int, mode: str) -> Path:
    setting = f"{mode}/{task.data_name}/{k}-{seed}"
    if data_dir is None:
        raise DataError(
            f"Task {task.name} reads k-shot files; pass data_dir, the folder holding {setting}/ "
            "(write it with scripts/prepare_fewshot.py)."
        )
    root = Path(data_dir).expanduser()
    assert task.layout is not None
    train_file = f"train.{task.layout.format}"
    if (root / setting / train_file).is_file():
        return root / setting
    if (root / train_file).is_file():
        return root
    raise DataError(
        f"Neither {root / setting} nor {root} holds {train_file}; data_dir must be the k-shot "
        f"root (holding {setting}/) or that {k}-{seed} folder itself (write it with "
        "scripts/prepare_fewshot.py)."
    )


def read_examples(path: Path, task: Task, split: str) -> list[FewShotExample]:
    """Read one split file as the task's upstream processor does.

    Raises:
        DataError: a missing file, a row without the needed columns (unless the processor
            skips such rows, as QQP's does) or a label the task does not have.
    """
    layout = task.layout
    assert layout is not None
    if not path.is_file():
        raise DataError(
            f"Task {task.name}: {path} does not exist; regenerate the split with "
            "scripts/prepare_fewshot.py."
        )
    rows = _read_rows(path, layout)
    examples = []
    for number, row in enumerate(rows):
        if layout.header and number == 0:
            continue
        try:
            texts = [row[column] for column in layout.text_columns]
            raw = row[layout.label_column]
        except IndexError:
            if layout.skip_short_rows:
                continue
            raise DataError(
                f"Row {number + 1} of {path} has {len(row)} column(s); task {task.name} reads "
                f"columns {[*layout.text_columns, layout.label_column]}. Check the file layout."
            ) from None
        label = str(raw) if layout.format == "tsv" else csv_label(raw, layout.label_offset)
        score = None
        if task.regression is not None:
            label, score = task.score_label(raw, f"Row {number + 1} of {path}")
        if label not in task.labels:
            raise DataError(
                f"Row {number + 1} of {path} has label {label!r}; task {task.name} has labels "
                f"{list(task.labels)}. Check the file layout."
            )
        text_a, text_b = (_text(t) for t in texts) if len(texts) == 2 else (_text(texts[0]), None)
        examples.append(FewShotExample(f"{split}-{number}", text_a, text_b, label, score))
    return examples


def _read_rows(path: Path, layout: FileLayout) -> list[list[Any]]:
    if layout.format == "tsv":
        return read_tsv(path)
    import pandas as pd

    try:
        return pd.read_csv(path, header=None).values.tolist()
    except pd.errors.EmptyDataError:
        return []


def _text(value: Any) -> str:
    """A text cell; a missing one (pandas NaN) is the empty string, as upstream."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


# ---------------------------------------------------------------------------------------------
# Label words and encoding


def label_word_ids(
    task_or_words: Task | Mapping[str, str] | Sequence[str], tokenizer: PreTrainedTokenizerBase
) -> list[int]:
    """Vocabulary ids of the label words: the single token of ``" " + word`` for each.

    Args:
        task_or_words: a task (its words in ``task.labels`` order), a label -> word mapping
            (taken in its own order) or the words in class order.
        tokenizer: the model's tokenizer.

    Returns:
        ``[C]`` token ids.

    Raises:
        DataError: a word that is not one token (the message names its tokens and the
            tokenizer), or two classes with the same token.
    """
    words = _words(task_or_words)
    options = _word_tokens(words, tokenizer)
    for word, tokens in zip(words, options, strict=True):
        if len(tokens) == 1:
            continue
        first = [
            w for w, t in zip(words, options, strict=True) if w != word and t[:1] == tokens[:1]
        ]
        pieces = tokenizer.convert_ids_to_tokens(tokens)
        shared = (
            f" and shares its first token with {first[0]!r}, so first-token scoring would merge "
            "their classes"
            if first
            else ""
        )
        raise DataError(
            f"Label word {word!r} is {len(tokens)} tokens {pieces} of tokenizer "
            f"{tokenizer_name(tokenizer)}, not one (' ' + word must be a single token){shared}; "
            "pick another word with label_words, or use --scoring options, which scores full "
            "options (causal LMs)."
        )
    ids = [tokens[0] for tokens in options]
    if len(set(ids)) != len(ids):
        shared = {w: i for w, i in zip(words, ids, strict=True) if ids.count(i) > 1}
        raise DataError(
            f"Label words {shared} map two classes to one token of tokenizer "
            f"{tokenizer_name(tokenizer)}; give every class its own word."
        )
    return ids


def option_ids(
    task_or_words: Task | Mapping[str, str] | Sequence[str], tokenizer: PreTrainedTokenizerBase
) -> list[list[int]]:
    """Token ids of each class's option, ``" " + word``, for ``scoring="options"``.

    The option is tokenised alone, as it is appended after the prompt's tokens (the prompt of
    a causal LM ends before the mask, so the option's leading space starts a new token, as a
    label word's does).

    Args:
        task_or_words: as for :func:`label_word_ids`.
        tokenizer: the model's tokenizer.

    Returns:
        ``[C]`` lists of token ids, one or more each.

    Raises:
        DataError: a word with no tokens, or two classes with the same token sequence.
    """
    words = _words(task_or_words)
    options = _word_tokens(words, tokenizer)
    for word, tokens in zip(words, options, strict=True):
        if not tokens:
            raise DataError(f"Label word {word!r} has no tokens; give every class a word.")
    for i, j in itertools.combinations(range(len(words)), 2):
        if options[i] == options[j]:
            raise DataError(
                f"Label words {words[i]!r} and {words[j]!r} are the same tokens "
                f"{tokenizer.convert_ids_to_tokens(options[i])} of tokenizer "
                f"{tokenizer_name(tokenizer)}, so their classes cannot be told apart; give "
                "every class its own word."
            )
    return options


def check_scoring(scoring: str, kind: str) -> None:
    """Raise :class:`DataError` unless ``scoring`` is known and fits the model ``kind``."""
    if scoring not in SCORINGS:
        raise DataError(f"scoring={scoring!r}: choose 'label_words' or 'options'.")
    if scoring == "options" and kind != "causal":
        raise DataError(
            "scoring=options scores a causal LM's continuation of the prompt, but this is a "
            f"{kind} LM; use scoring=label_words with it."
        )


def _words(task_or_words: Task | Mapping[str, str] | Sequence[str]) -> list[str]:
    if isinstance(task_or_words, Task):
        return list(task_or_words.words)
    if isinstance(task_or_words, Mapping):
        return list(task_or_words.values())
    return list(task_or_words)


def _word_tokens(words: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    return [[int(t) for t in tokenizer.encode(" " + w, add_special_tokens=False)] for w in words]


def encode_examples(
    examples: Sequence[FewShotExample],
    task: Task,
    tokenizer: PreTrainedTokenizerBase,
    *,
    kind: Kind,
    head: Head = "prompt",
    template: str | None = None,
    label_words: dict[str, str] | None = None,
    max_length: int | None = None,
    cache_dir: str | Path | None = None,
    scoring: Scoring = "label_words",
) -> list[PromptExample]:
    """Tokenise examples with the task's prompt (or as plain sentences for a linear head).

    Args:
        examples: ``[N]`` examples of ``task``.
        task: the task (template, words, limits, labels).
        tokenizer: the model's tokenizer.
        kind: ``masked`` (RoBERTa/BERT) or ``causal`` (Llama, GPT-2, ...).
        head: ``prompt`` (template) or ``linear`` (``cls sent_0 sep [sent_1 sep]``).
        template: template overriding the task's.
        label_words: label -> word overriding the task's (checked to be single tokens).
        max_length: token limit overriding ``task.max_seq_length``.
        cache_dir: when given, read / write the encoded list as JSON here.
        scoring: how classes are scored, which decides the check of the label words:
            ``label_words`` (single distinct tokens, :func:`label_word_ids`) or ``options``
            (causal LMs; distinct token sequences, :func:`option_ids`). The encoding is the same.

    Returns:
        ``[N]`` encoded examples, in input order; ``label`` indexes ``task.labels``.

    Raises:
        DataError: bad kind, head or scoring, a template without mask (masked) or with the mask
            before the sentence (causal), label words that do not fit the scoring, an unknown
            label, or a mask that ``max_length`` cuts off.
    """
    if kind not in ("masked", "causal"):
        raise DataError(f"kind={kind!r}: choose 'masked' or 'causal'.")
    if head not in ("prompt", "linear"):
        raise DataError(f"head={head!r}: choose 'prompt' or 'linear'.")
    spec = task.with_overrides(template=template, label_words=label_words, max_length=max_length)
    if spec.max_seq_length < 1:
        raise DataError(f"max_length={spec.max_seq_length} must be positive.")
    specials = special_ids(tokenizer, kind)
    if head == "prompt":
        check_scoring(scoring, kind)
        parts = check_template(spec.template, kind, spec.n_sentences)
        (option_ids if scoring == "options" else label_word_ids)(spec, tokenizer)
        limits = (spec.first_sent_limit, spec.other_sent_limit)
        position = "mask" if kind == "masked" else "last"
    else:
        parts = _linear_parts(spec.n_sentences)
        limits = (None, None)
        position = "first" if kind == "masked" else "last"

    cache_path = None
    if cache_dir is not None:
        settings = _cache_settings(spec, tokenizer, kind, head, limits, examples)
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        cache_path = Path(cache_dir).expanduser() / f"prompts-{_safe(spec.name)}-{key}.json"
        cached = _read_cache(cache_path, key)
        if cached is not None:
            return cached

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    encoded: list[PromptExample] = []
    n_cut = 0
    bar = tqdm(examples, desc=f"encoding {spec.name}", unit="ex", disable=len(examples) < 2000)
    for ex in bar:
        if ex.label not in spec.labels:
            raise DataError(
                f"Example {ex.guid} has label {ex.label!r}; task {spec.name} has labels "
                f"{list(spec.labels)}."
            )
        if spec.n_sentences == 2 and ex.text_b is None:
            raise DataError(f"Example {ex.guid} lacks text_b; task {spec.name} takes pairs.")
        sentences = [ex.text_a] if ex.text_b is None else [ex.text_a, ex.text_b]
        try:
            out = encode_parts(
                parts,
                sentences,
                encode,
                specials,
                kind=kind,
                max_length=spec.max_seq_length,
                first_sent_limit=limits[0],
                other_sent_limit=limits[1],
                truncate_head=spec.truncate_head,
                position=position,
            )
        except DataError as err:
            raise DataError(f"Example {ex.guid} of task {spec.name}: {err}") from None
        n_cut += out.n_truncated > 0
        item = PromptExample(
            guid=ex.guid,
            input_ids=out.input_ids,
            position=out.position,
            label=spec.labels.index(ex.label),
        )
        if ex.score is not None:
            item["score"] = ex.score
        encoded.append(item)
    if n_cut:
        logger.info(
            "Truncated %d of %d %s examples to max_length=%d.",
            n_cut,
            len(encoded),
            spec.name,
            spec.max_seq_length,
        )
    if cache_path is not None:
        with atomic_open(cache_path) as handle:
            json.dump({"key": key, "settings": settings, "examples": encoded}, handle)
    return encoded


def _linear_parts(n_sentences: int) -> list[TemplatePart]:
    parts = [TemplatePart("cls")]
    for index in range(n_sentences):
        parts += [TemplatePart("sent", sent_id=index), TemplatePart("sep")]
    return parts


def _cache_settings(
    task: Task,
    tokenizer: PreTrainedTokenizerBase,
    kind: Kind,
    head: Head,
    limits: tuple[int | None, int | None],
    examples: Sequence[FewShotExample],
) -> dict[str, Any]:
    """Everything an encoding depends on (the cache key is its sha256)."""
    vocab = sorted(tokenizer.get_vocab().items())
    examples_hash = hashlib.sha256()
    for ex in examples:
        # without a score, an example hashes as before the field existed (caches stay valid)
        fields = {k: v for k, v in asdict(ex).items() if k != "score" or v is not None}
        examples_hash.update(json.dumps(fields, sort_keys=True).encode() + b"\n")
    return {
        "version": CACHE_VERSION,
        "task": task.name,
        "labels": list(task.labels),
        "head": head,
        "kind": kind,
        "template": task.template if head == "prompt" else None,
        "label_words": task.label_words if head == "prompt" else None,
        "max_length": task.max_seq_length,
        "first_sent_limit": limits[0],
        "other_sent_limit": limits[1],
        "truncate_head": task.truncate_head,
        "tokenizer": {
            "name": tokenizer_name(tokenizer),
            "class": type(tokenizer).__name__,
            "vocab_size": len(tokenizer),
            "vocab_sha256": hashlib.sha256(json.dumps(vocab).encode()).hexdigest(),
            "special_ids": asdict(special_ids(tokenizer, kind)),
        },
        "examples_sha256": examples_hash.hexdigest(),
        "n_examples": len(examples),
    }


def _read_cache(path: Path, key: str) -> list[PromptExample] | None:
    if not path.is_file():
        return None
    try:
        with open(path) as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        logger.warning("Ignoring unreadable prompt cache %s (%s); re-encoding.", path, err)
        return None
    if data.get("key") != key:
        logger.warning("Prompt cache %s holds another key; re-encoding.", path)
        return None
    logger.info("Loaded %d encoded examples from %s.", len(data["examples"]), path)
    return [PromptExample(**ex) for ex in data["examples"]]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
