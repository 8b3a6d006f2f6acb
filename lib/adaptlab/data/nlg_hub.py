"""Generation tasks from the Hugging Face hub: CNN/DailyMail, WebNLG 2017 and CoQA (spec §4).

Each task turns the rows of one hub dataset into :class:`GenerationExample` items: ``prompt``
(the source text), ``target`` (the text trained on) and ``references`` (every text a prediction
is scored against):

| task              | hub dataset (config)                    | source -> target               |
|-------------------|-----------------------------------------|--------------------------------|
| ``cnn-dailymail`` | ``cnn_dailymail`` (``3.0.0``)           | article -> highlights          |
| ``webnlg``        | ``web_nlg`` (``webnlg_challenge_2017``) | triples -> a lexicalisation    |
| ``coqa``          | ``stanfordnlp/coqa``                    | story + turns + question -> answer |

* CNN/DailyMail: the highlights' lines are joined by spaces (a prediction is one line).
* WebNLG: each triple ``"s | p | o"`` is written with spaces for the underscores of DBpedia
  names, and the triples are joined by ``" ; "``. Training has one example per lexicalisation
  (the same triples with each of their texts as target); dev and test have one example per
  triple set, scored against all its lexicalisations (multi-reference BLEU). The WebNLG release
  and preprocessing behind published numbers are not pinned: prefix-tuning users report BLEU
  gaps between releases (spec §5), so compare runs of this loader with each other, not with
  papers.
* CoQA: one example per turn; the source is the story, then the conversation so far
  (``Q: ...`` / ``A: ...`` lines with the free-form answers) and ``Q: {question}``, and the
  target is the turn's free-form answer, scored by ROUGE, BLEU and the SQuAD-style token F1.
  CoQA has no public test split: its validation stories are the test set, and dev stories are
  held out of the training split.

Splits: training is the whole training split (``shots`` and the k-shot modes do not apply);
dev is a sample of :data:`DEV_SIZE` examples drawn by ``default_rng(seed)`` (rows in their
order), so every evaluation during training stays affordable; test is the whole test split, or
a ``test_limit`` sample (:func:`adaptlab.data.splits.limit_test`).

The hub is probed first (:func:`adaptlab.network.hub_reachable`); without it a task stops with
one sentence naming its dataset id, before any model loads. ``datasets`` caches what it
downloads, so with ``HF_HUB_OFFLINE=1`` a cached copy is used.

Example (fake rows, no hub)::

    >>> webnlg_examples([{"modified_triple_sets": {"mtriple_set": [["A_b | p | C"]]},
    ...                   "lex": {"text": ["A b p C.", "C is p of A b."]}}], "dev")[0].prompt
    'A b | p | C'
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from adaptlab.data.errors import DataError
from adaptlab.data.splits import check_mode, check_seed, limit_test
from adaptlab.network import hub_offline, hub_reachable

logger = logging.getLogger(__name__)

DEV_SIZE = 500
"""Dev examples per evaluation: a seeded sample of the dev split (generation is slow)."""
HELD_OUT_ROWS = 50
"""Rows (CoQA stories) held out of training as the dev split where the hub has none."""
Row = Mapping[str, Any]


class GenerationExample(NamedTuple):
    """One source -> target example; ``references`` holds every acceptable target."""

    guid: str
    prompt: str
    target: str
    references: tuple[str, ...]


@dataclass(frozen=True)
class GenerationSplits:
    """Train, dev and test examples of a hub generation task, and their provenance."""

    train: list[GenerationExample]
    dev: list[GenerationExample]
    test: list[GenerationExample]
    provenance: dict[str, Any]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def cnn_dailymail_examples(rows: Iterable[Row], split: str) -> list[GenerationExample]:
    """Article -> highlights (joined into one line); ``guid`` is the row's ``id``."""
    examples = []
    for i, row in enumerate(rows):
        target = _one_line(row["highlights"])
        guid = f"cnn_dailymail-{split}-{row.get('id', i)}"
        examples.append(GenerationExample(guid, _one_line(row["article"]), target, (target,)))
    return examples


def linearise_triples(triples: Sequence[str]) -> str:
    """``["Aarhus_Airport | cityServed | Aarhus"]`` -> ``"Aarhus Airport | cityServed | Aarhus"``,
    triples joined by ``" ; "``."""
    parts = (" | ".join(p.strip().replace("_", " ") for p in t.split("|")) for t in triples)
    return " ; ".join(parts)


def webnlg_examples(rows: Iterable[Row], split: str) -> list[GenerationExample]:
    """Triples -> lexicalisation: one example per lexicalisation on ``train``, else one per
    triple set with all its lexicalisations as references; rows without text are skipped."""
    examples = []
    for i, row in enumerate(rows):
        triple_sets = row["modified_triple_sets"]["mtriple_set"]
        source = linearise_triples(triple_sets[0] if triple_sets else [])
        texts = tuple(_one_line(text) for text in row["lex"]["text"] if text.strip())
        if not source or not texts:
            continue
        guid = f"webnlg-{split}-{row.get('eid', i)}"
        if split == "train":
            examples += [
                GenerationExample(f"{guid}-{j}", source, text, (text,))
                for j, text in enumerate(texts)
            ]
        else:
            examples.append(GenerationExample(guid, source, texts[0], texts))
    return examples


def coqa_examples(rows: Iterable[Row], split: str) -> list[GenerationExample]:
    """One example per turn: story, the turns before it and the question -> the answer."""
    examples = []
    for i, row in enumerate(rows):
        story = _one_line(row["story"])
        answers = [_one_line(a) for a in row["answers"]["input_text"]]
        history: list[str] = []
        for turn, (question, answer) in enumerate(zip(row["questions"], answers, strict=True)):
            question = _one_line(question)
            source = "\n".join([story, *history, f"Q: {question}"])
            guid = f"coqa-{split}-{row.get('id', i)}-{turn}"
            examples.append(GenerationExample(guid, source, answer, (answer,)))
            history += [f"Q: {question}", f"A: {answer}"]
    return examples


@dataclass(frozen=True)
class HubGenerationSource:
    """Where a task's rows come from and how they become examples.

    Attributes:
        path: dataset id on the hub.
        config: dataset config name, if any.
        splits: ``train`` / ``dev`` / ``test`` -> hub split name; no ``dev``: dev rows are held
            out of the training split (whole rows, so CoQA keeps a story's turns together).
        parse: (rows, split) -> examples.
    """

    path: str
    config: str | None
    splits: dict[str, str]
    parse: Callable[[Iterable[Row], str], list[GenerationExample]]

    @property
    def name(self) -> str:
        return self.path + (f" ({self.config})" if self.config else "")


HUB_GENERATION: dict[str, HubGenerationSource] = {
    "cnn-dailymail": HubGenerationSource(
        "cnn_dailymail",
        "3.0.0",
        {"train": "train", "dev": "validation", "test": "test"},
        cnn_dailymail_examples,
    ),
    "webnlg": HubGenerationSource(
        "web_nlg",
        "webnlg_challenge_2017",
        {"train": "train", "dev": "dev", "test": "test"},
        webnlg_examples,
    ),
    "coqa": HubGenerationSource(
        "stanfordnlp/coqa", None, {"train": "train", "test": "validation"}, coqa_examples
    ),
}


def _seeded_sample(items: list[Any], size: int, seed: int) -> tuple[list[Any], list[Any]]:
    """``(sample, rest)``: ``size`` items drawn by ``default_rng(seed)``, both in order."""
    if size >= len(items):
        return items, []
    keep = set(np.random.default_rng(seed).choice(len(items), size, replace=False).tolist())
    return [x for i, x in enumerate(items) if i in keep], [
        x for i, x in enumerate(items) if i not in keep
    ]


def read_hub_rows(task: str, source: HubGenerationSource) -> dict[str, list[Row]]:
    """The hub splits of ``source`` as lists of rows, by hub split name.

    Raises:
        DataError: the hub cannot be reached (and no offline cache is allowed), or loading
            failed.
    """
    if not hub_offline() and not hub_reachable():
        raise DataError(
            f"Task {task} needs the dataset {source.name} from the Hugging Face hub, which "
            "cannot be reached from this machine; run once where it can (datasets caches it), "
            "then set HF_HUB_OFFLINE=1."
        )
    import datasets

    try:
        return {
            split: datasets.load_dataset(source.path, source.config, split=split).to_list()
            for split in dict.fromkeys(source.splits.values())
        }
    except Exception as err:  # network, cache and unknown-dataset failures all mean "not usable"
        if hub_offline():
            raise DataError(
                f"Task {task} needs the dataset {source.name}, which is not in the local cache, "
                "and HF_HUB_OFFLINE=1 forbids downloading it; run once where the hub is reachable."
            ) from None
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise DataError(
            f"Task {task} could not load the dataset {source.name} from the Hugging Face hub "
            f"({reason}); check the network and the dataset id."
        ) from None


def load_hub_generation(
    task: str, k: int = 16, seed: int = 42, mode: str = "k-shot", test_limit: int | None = None
) -> GenerationSplits:
    """A hub generation task's whole training split, a dev sample and the test split.

    Args:
        task: a key of :data:`HUB_GENERATION`.
        k: not used (the whole training split is trained on); kept for the task registry's
            signature.
        seed: seeds the dev sample (and CoQA's held-out dev stories).
        mode: must be ``k-shot`` (k-shot sampling does not apply).
        test_limit: keep a seeded sample of this many test examples.

    Raises:
        DataError: an unknown task, another mode, a bad seed or test_limit, or no hub.
    """
    if task not in HUB_GENERATION:
        raise DataError(
            f"Unknown hub generation task {task!r}; choose from {', '.join(HUB_GENERATION)}."
        )
    check_mode(mode)
    check_seed(seed)
    if mode != "k-shot":
        raise DataError(
            f"kshot_mode={mode!r} does not apply to {task}, which trains on its whole training "
            "split; use kshot_mode=k-shot."
        )
    source = HUB_GENERATION[task]
    rows = read_hub_rows(task, source)
    train_rows = rows[source.splits["train"]]
    if "dev" in source.splits:
        dev_rows = rows[source.splits["dev"]]
        dev_source = f"sample of split {source.splits['dev']!r}"
    else:
        dev_rows, train_rows = _seeded_sample(train_rows, HELD_OUT_ROWS, seed)
        dev_source = f"{len(dev_rows)} rows held out of split {source.splits['train']!r}"
    train = source.parse(train_rows, "train")
    dev, _ = _seeded_sample(source.parse(dev_rows, "dev"), DEV_SIZE, seed)
    test = limit_test(source.parse(rows[source.splits["test"]], "test"), test_limit)
    for name, part in (("train", train), ("dev", dev), ("test", test)):
        if not part:
            raise DataError(f"Task {task} has no {name} examples in {source.name}; check its copy.")
    provenance = {
        "source": "hub",
        "dataset": source.name,
        "splits": source.splits,
        "dev": dev_source,
        "seed": seed,
        "test_limit": test_limit,
        "n_train": len(train),
        "n_dev": len(dev),
        "n_test": len(test),
    }
    logger.info("%s: %d train / %d dev / %d test examples.", task, len(train), len(dev), len(test))
    return GenerationSplits(train, dev, test, provenance)
