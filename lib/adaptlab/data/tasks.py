"""The few-shot task registry: templates, label words, limits, metrics and file layouts.

``TASKS`` maps the name a user types to a :class:`Task`. The 14 tasks of spec ``kernel.md`` §3
(``SST-2`` ... ``ag_news``, plus ``mnli-mm``, MNLI's mismatched test set, and the GLUE
regression task ``STS-B``, LM-BFF's settings) carry upstream's template, label words
(``run_fewshot.sh``), label order (``processor.get_labels()``) and limits. The grafting repo
adds ``ag_news-graft`` (another file layout, template and words) and the out-of-distribution
evaluation sets ``imdb``, ``yelp_polarity``, ``amazon_polarity``, ``anli``, ``hans`` and the
MNLI genre splits (``telephone_telephone``, ...); their layouts are exactly what its processors
read, and their prompts are those of the in-distribution task they test (SST-2 for the
sentiment sets, MNLI for the NLI sets; HANS labels ``non-entailment`` / ``entailment`` get the
words No / Yes). The offline tasks, built in memory from embedded data
(:mod:`adaptlab.data.offline`), are ``mmlu-topics`` and ``mmlu-topics-2``
(:mod:`adaptlab.data.topics`; ``mmlu-topics-id`` and ``mmlu-topics-ood`` split its subjects for a
distribution-shift evaluation), ``bbc-news`` (:mod:`adaptlab.data.bbc`) and ``tweet-sentiment``
(:mod:`adaptlab.data.tweets`).

The templates are written for masked LMs. A causal LM sees only the text before the mask, so
the templates with the mask first (trec, ag_news-graft) or before the second sentence (NLI,
MRPC, QQP) need a ``template`` override for causal models, e.g.
``*cls**sent-_0*,*+sentl_1*?*mask*``; the sentiment, CoLA, subj, ag_news, bbc-news and topic
templates work for both.

Example::

    >>> task = get_task("sst-2")
    >>> task.name, task.labels, task.words
    ('SST-2', ('0', '1'), ('terrible', 'great'))
    >>> get_task("MNLI").max_seq_length
    256
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

from adaptlab.data import bbc, topics, tweets
from adaptlab.data.errors import DataError

Metric = Literal["acc", "f1", "mcc", "pearson", "spearman", "corr"]
REGRESSION_METRICS: tuple[Metric, ...] = ("pearson", "spearman", "corr")
"""GLUE's STS-B metrics: Pearson and Spearman correlation of predicted and gold scores, and
``corr``, their mean (LM-BFF's and the GLUE leaderboard's combined score)."""


@dataclass(frozen=True)
class FileLayout:
    """Where a task's examples sit in its files and how they are read (one upstream processor).

    Files are ``<stem>.tsv`` (tab-separated, no quoting, as ``csv.reader(delimiter="\\t",
    quotechar=None)``) or ``<stem>.csv`` (header-less, read with pandas as upstream).

    Attributes:
        format: ``tsv`` or ``csv``.
        header: the first line of every file is a header (skipped when reading, kept by the
            k-shot generator).
        text_columns: column of ``text_a`` (and of ``text_b`` for sentence pairs).
        label_column: column of the label (negative counts from the end).
        label_offset: added to integer labels when reading (amazon_polarity stores 1/2 for
            classes 0/1).
        skip_short_rows: skip rows lacking a column, as the QQP processor does.
        dev: file stem of the k-shot dev split.
        test: file stem of the k-shot test split.
        original_eval: stems of the original files that become the k-shot test split(s)
            (GLUE: the dev set(s), renamed ``dev`` -> ``test``; the others: ``test``).
        kshot_label_column: the label column upstream's generator buckets by, where it differs
            from the processor's (SST-2 and QQP: the last column).
    """

    format: Literal["tsv", "csv"]
    header: bool
    text_columns: tuple[int, ...]
    label_column: int
    label_offset: int = 0
    skip_short_rows: bool = False
    dev: str = "dev"
    test: str = "test"
    original_eval: tuple[str, ...] = ("dev",)
    kshot_label_column: int | None = None


@dataclass(frozen=True)
class Task:
    """One few-shot task: classification, or regression to a score (STS-B).

    Attributes:
        name: the registry key, e.g. ``"SST-2"``.
        labels: label strings in processor order; class index c is ``labels[c]``.
        label_words: label -> word; each ``" " + word`` must be one token of the model.
        template: LM-BFF template (see :mod:`adaptlab.data.templates`).
        max_seq_length: token limit of an encoded example.
        first_sent_limit: token limit of sentence 0 (None: none).
        other_sent_limit: token limit of the other sentences.
        truncate_head: cut over-long inputs at the head instead of the tail.
        metrics: metric names; classification: ``acc`` first, then ``f1`` / ``mcc``;
            regression: :data:`REGRESSION_METRICS`.
        data_name: folder name under ``<root>/<mode>/`` and ``original/`` (MNLI for mnli-mm).
        layout: how the files are read (offline tasks: how prepare_fewshot.py writes them).
        n_sentences: sentences per example (1, or 2 for pairs).
        offline: built in memory by :mod:`adaptlab.data.offline`, no files needed.
        source: the upstream repository the settings come from.
        regression: ``(low, high)``, the score range of a regression task, else None. Its
            label column holds a real score, kept for training and metrics; its two labels
            are only the bins LM-BFF's k-shot generator samples by (``labels[0]`` below the
            midpoint, ``labels[1]`` from it on: STS-B's ``score < 2.5``).
    """

    name: str
    labels: tuple[str, ...]
    label_words: dict[str, str]
    template: str
    max_seq_length: int = 128
    first_sent_limit: int | None = None
    other_sent_limit: int | None = None
    truncate_head: bool = False
    metrics: tuple[Metric, ...] = ("acc",)
    data_name: str = ""
    layout: FileLayout | None = None
    n_sentences: int = 1
    offline: bool = False
    source: str = "LM-Kernel-FT"
    regression: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not self.data_name:
            object.__setattr__(self, "data_name", self.name)
        if set(self.label_words) != set(self.labels):
            raise DataError(
                f"Task {self.name}: label_words keys {sorted(self.label_words)} differ from its "
                f"labels {list(self.labels)}; give one word per label."
            )

    def score_label(self, raw: Any, where: str) -> tuple[str, float]:
        """A regression task's score cell as ``(bin label, score)``.

        Raises:
            DataError: the cell is not a number (``where`` names the row and file).
        """
        assert self.regression is not None
        try:
            score = float(raw)
        except (TypeError, ValueError):
            score = math.nan
        if not math.isfinite(score):
            raise DataError(
                f"{where} has score {raw!r}; task {self.name} reads a number in its score "
                "column. Check the file layout."
            )
        low, high = self.regression
        return self.labels[int(score >= (low + high) / 2)], score

    @property
    def words(self) -> tuple[str, ...]:
        """Label words in label order."""
        return tuple(self.label_words[label] for label in self.labels)

    def with_overrides(
        self,
        *,
        template: str | None = None,
        label_words: dict[str, str] | None = None,
        max_length: int | None = None,
    ) -> Task:
        """A copy with another template, label words (label -> word) or length limit.

        Raises:
            DataError: ``label_words`` does not name exactly the task's labels.
        """
        changes: dict = {}
        if template is not None:
            changes["template"] = template
        if label_words is not None:
            words = {str(label): word for label, word in label_words.items()}
            if set(words) != set(self.labels):
                raise DataError(
                    f"label_words {words} must give one word for each label of {self.name}: "
                    f"{list(self.labels)}."
                )
            changes["label_words"] = {label: words[label] for label in self.labels}
        if max_length is not None:
            changes["max_seq_length"] = max_length
        return replace(self, **changes) if changes else self


def _words(labels: tuple[str, ...], words: tuple[str, ...]) -> dict[str, str]:
    return dict(zip(labels, words, strict=True))


# Templates of run_fewshot.sh (kernel repo) and run_experiment.sh (grafting repo).
SENTIMENT = "*cls**sent_0*_It_was*mask*.*sep+*"
THIS_IS = "*cls**sent_0*_This_is*mask*.*sep+*"
QUESTION = "*cls**mask*:*+sent_0**sep+*"
NLI = "*cls**sent-_0*?*mask*,*+sentl_1**sep+*"
PARAPHRASE = "*cls**sent_0**mask*,*+sentl_1**sep+*"
NEWS = "*cls**sent_0*_This_article_is_about*mask*_news.*sep+*"

BINARY = ("0", "1")
NLI3 = ("contradiction", "entailment", "neutral")
NLI2 = ("entailment", "not_entailment")
SENTIMENT_WORDS = ("terrible", "great")
NLI3_WORDS = ("No", "Yes", "Maybe")
NLI2_WORDS = ("Yes", "No")

# Layouts of the LM-BFF original data (processors of LM-Kernel-FT src/processors.py).
TEXT_CSV = FileLayout(
    "csv", header=False, text_columns=(1,), label_column=0, original_eval=("test",)
)
SST2_TSV = FileLayout("tsv", header=True, text_columns=(0,), label_column=1, kshot_label_column=-1)
COLA_TSV = FileLayout("tsv", header=False, text_columns=(3,), label_column=1)
MNLI_TSV = FileLayout(
    "tsv",
    header=True,
    text_columns=(8, 9),
    label_column=-1,
    dev="dev_matched",
    test="test_matched",
    original_eval=("dev_matched", "dev_mismatched"),
)
SNLI_TSV = FileLayout("tsv", header=True, text_columns=(7, 8), label_column=-1)
PAIR_TSV = FileLayout("tsv", header=True, text_columns=(1, 2), label_column=-1)  # QNLI, RTE
STSB_TSV = FileLayout("tsv", header=True, text_columns=(7, 8), label_column=-1)
MRPC_TSV = FileLayout("tsv", header=True, text_columns=(3, 4), label_column=0)
QQP_TSV = FileLayout(
    "tsv",
    header=True,
    text_columns=(3, 4),
    label_column=5,
    skip_short_rows=True,
    kshot_label_column=-1,
)
AG_NEWS_CSV = FileLayout(
    "csv", header=False, text_columns=(2,), label_column=0, original_eval=("test",)
)
# Grafting repo: header-less "text<TAB>label" files (imdb, yelp_polarity, ag_news), ANLI
# "premise<TAB>hypothesis<TAB>label", HANS with a header, MNLI genres in MNLI's columns.
TEXT_LABEL_TSV = FileLayout(
    "tsv", header=False, text_columns=(0,), label_column=1, original_eval=("test",)
)
ANLI_TSV = FileLayout("tsv", header=False, text_columns=(0, 1), label_column=2)
HANS_TSV = FileLayout("tsv", header=True, text_columns=(5, 6), label_column=0)
GENRE_TSV = FileLayout("tsv", header=True, text_columns=(8, 9), label_column=-1)
AMAZON_CSV = FileLayout(
    "csv", header=False, text_columns=(2,), label_column=0, label_offset=-1, original_eval=("test",)
)

MNLI_GENRES = (
    "telephone_telephone",
    "government_government",
    "telephone_letters",
    "telephone_facetoface",
    "telephone_government",
    "telephone_government_0.5",
    "telephone_government_0.9",
    "telephone_government_0.95",
    "telephone_government_0.99",
    "telephone_government_1.0",
)


def _text_task(name: str, labels: int, words: tuple[str, ...], template: str, **extra) -> Task:
    label_names = tuple(str(i) for i in range(labels))
    return Task(name, label_names, _words(label_names, words), template, layout=TEXT_CSV, **extra)


_LM_BFF: list[Task] = [
    Task("SST-2", BINARY, _words(BINARY, SENTIMENT_WORDS), SENTIMENT, layout=SST2_TSV),
    _text_task("sst-5", 5, ("terrible", "bad", "okay", "good", "great"), SENTIMENT),
    _text_task("mr", 2, SENTIMENT_WORDS, SENTIMENT, first_sent_limit=110, other_sent_limit=50),
    _text_task("cr", 2, SENTIMENT_WORDS, SENTIMENT, first_sent_limit=110, other_sent_limit=50),
    _text_task("mpqa", 2, SENTIMENT_WORDS, SENTIMENT, first_sent_limit=110),
    _text_task(
        "subj",
        2,
        ("subjective", "objective"),
        THIS_IS,
        first_sent_limit=110,
        other_sent_limit=50,
    ),
    _text_task(
        "trec",
        6,
        ("Description", "Entity", "Expression", "Human", "Location", "Number"),
        QUESTION,
        first_sent_limit=110,
    ),
    Task(
        "CoLA",
        BINARY,
        _words(BINARY, ("incorrect", "correct")),
        THIS_IS,
        metrics=("acc", "mcc"),
        layout=COLA_TSV,
    ),
    Task(
        "MNLI",
        NLI3,
        _words(NLI3, NLI3_WORDS),
        NLI,
        max_seq_length=256,
        first_sent_limit=240,
        layout=MNLI_TSV,
        n_sentences=2,
    ),
    Task(
        "mnli-mm",
        NLI3,
        _words(NLI3, NLI3_WORDS),
        NLI,
        max_seq_length=256,
        first_sent_limit=240,
        data_name="MNLI",
        layout=replace(MNLI_TSV, test="test_mismatched"),
        n_sentences=2,
    ),
    Task(
        "SNLI",
        NLI3,
        _words(NLI3, NLI3_WORDS),
        NLI,
        max_seq_length=256,
        layout=SNLI_TSV,
        n_sentences=2,
    ),
    Task("QNLI", NLI2, _words(NLI2, NLI2_WORDS), NLI, layout=PAIR_TSV, n_sentences=2),
    Task(
        "RTE",
        NLI2,
        _words(NLI2, NLI2_WORDS),
        NLI,
        max_seq_length=256,
        first_sent_limit=240,
        layout=PAIR_TSV,
        n_sentences=2,
    ),
    Task(
        "MRPC",
        BINARY,
        _words(BINARY, ("No", "Yes")),
        PARAPHRASE,
        metrics=("acc", "f1"),
        layout=MRPC_TSV,
        n_sentences=2,
    ),
    # LM-BFF's regression: bins No (score < 2.5) / Yes for sampling, the score for training
    Task(
        "STS-B",
        BINARY,
        _words(BINARY, ("No", "Yes")),
        PARAPHRASE,
        metrics=REGRESSION_METRICS,
        layout=STSB_TSV,
        n_sentences=2,
        regression=(0.0, 5.0),
    ),
    Task(
        "QQP",
        BINARY,
        _words(BINARY, ("No", "Yes")),
        PARAPHRASE,
        metrics=("acc", "f1"),
        layout=QQP_TSV,
        n_sentences=2,
    ),
    Task(
        "ag_news",
        ("1", "2", "3", "4"),
        _words(("1", "2", "3", "4"), ("world", "sports", "business", "tech")),
        NEWS,
        max_seq_length=256,
        first_sent_limit=240,
        layout=AG_NEWS_CSV,
    ),
]

_GRAFT = "Skill-Localization-by-grafting"
_GRAFTING: list[Task] = [
    Task(
        "ag_news-graft",
        ("0", "1", "2", "3"),
        _words(("0", "1", "2", "3"), ("World", "Sports", "Business", "Tech")),
        QUESTION,
        first_sent_limit=110,
        data_name="ag_news",
        layout=TEXT_LABEL_TSV,
        source=_GRAFT,
    ),
    *(
        Task(
            name,
            BINARY,
            _words(BINARY, SENTIMENT_WORDS),
            SENTIMENT,
            first_sent_limit=110,
            layout=TEXT_LABEL_TSV,
            source=_GRAFT,
        )
        for name in ("imdb", "yelp_polarity")
    ),
    Task(
        "amazon_polarity",
        BINARY,
        _words(BINARY, SENTIMENT_WORDS),
        SENTIMENT,
        first_sent_limit=110,
        layout=AMAZON_CSV,
        source=_GRAFT,
    ),
    Task(
        "anli",
        NLI3,
        _words(NLI3, NLI3_WORDS),
        NLI,
        max_seq_length=256,
        layout=ANLI_TSV,
        n_sentences=2,
        source=_GRAFT,
    ),
    Task(
        "hans",
        ("non-entailment", "entailment"),
        {"non-entailment": "No", "entailment": "Yes"},
        NLI,
        max_seq_length=256,
        layout=HANS_TSV,
        n_sentences=2,
        source=_GRAFT,
    ),
    *(
        Task(
            genre,
            NLI3,
            _words(NLI3, NLI3_WORDS),
            NLI,
            max_seq_length=256,
            first_sent_limit=110,
            layout=GENRE_TSV,
            n_sentences=2,
            source=_GRAFT,
        )
        for genre in MNLI_GENRES
    ),
]

# Built in memory from embedded data (adaptlab.data.offline); prepare_fewshot.py writes their
# k-shot splits in the LM-BFF CSV layout, so they carry that layout.
_OFFLINE: list[Task] = [
    *(
        Task(
            name,
            labels,
            {label: label for label in labels},
            topics.TEMPLATE,
            max_seq_length=topics.MAX_SEQ_LENGTH,
            first_sent_limit=topics.FIRST_SENT_LIMIT,
            layout=TEXT_CSV,
            offline=True,
            source="adaptlab",
        )
        for name, labels in topics.TOPIC_TASKS.items()
    ),
    Task(
        bbc.TASK_NAME,
        bbc.TOPICS,
        {topic: topic for topic in bbc.TOPICS},
        bbc.TEMPLATE,
        max_seq_length=bbc.MAX_SEQ_LENGTH,
        first_sent_limit=bbc.FIRST_SENT_LIMIT,
        layout=TEXT_CSV,
        offline=True,
        source="adaptlab",
    ),
    Task(
        tweets.TASK_NAME,
        tweets.LABELS,
        _words(tweets.LABELS, tweets.WORDS),
        tweets.TEMPLATE,
        max_seq_length=tweets.MAX_SEQ_LENGTH,
        first_sent_limit=tweets.FIRST_SENT_LIMIT,
        layout=TEXT_CSV,
        offline=True,
        source="adaptlab",
    ),
]

TASKS: dict[str, Task] = {task.name: task for task in (*_LM_BFF, *_GRAFTING, *_OFFLINE)}
# The 14 tasks of the kernel paper, in its order (the k-shot generator's default list).
PAPER_TASKS: tuple[str, ...] = (
    "SST-2",
    "sst-5",
    "mr",
    "cr",
    "mpqa",
    "subj",
    "trec",
    "ag_news",
    "MNLI",
    "SNLI",
    "QNLI",
    "RTE",
    "MRPC",
    "QQP",
)
_BY_LOWER = {name.lower(): task for name, task in TASKS.items()}


def get_task(name: str) -> Task:
    """The registered task called ``name`` (case-insensitive).

    Raises:
        DataError: no task of that name; the message lists the choices.
    """
    task = _BY_LOWER.get(str(name).lower())
    if task is None:
        raise DataError(f"Unknown task {name!r}; choose one of {', '.join(TASKS)}.")
    return task


def split_tasks(name: str) -> list[str]:
    """The registered names of the tasks of a multi-task run, ``"sst-2+MRPC"`` -> ``["SST-2",
    "MRPC"]`` (one name gives a list of one).

    A fine-tuning run on several tasks records ``task`` joined by ``+``; a later stage (a graft
    per task) reads the tasks back with this.

    Raises:
        DataError: an empty or unknown name, or a task named twice.
    """
    names = [get_task(part.strip()).name if part.strip() else "" for part in str(name).split("+")]
    if "" in names:
        raise DataError(f"Task list {name!r} has an empty name; join task names with '+'.")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(f"Task list {name!r} names {', '.join(twice)} twice; name each task once.")
    return names
