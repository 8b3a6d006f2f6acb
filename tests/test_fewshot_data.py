"""Few-shot (LM-BFF) data: k-shot splits, templates, encoding, caching, tasks, metrics, recipe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from adaptlab.assets import EmbeddedAssetError, fetch
from adaptlab.data import (
    TASKS,
    DataError,
    FewShotExample,
    collate_prompts,
    encode_examples,
    generate_kshot,
    get_task,
    kshot_split,
    label_word_ids,
    load_task,
    parse_template,
    task_metrics,
)
from adaptlab.data.templates import SpecialIds, encode_parts
from adaptlab.models.tiny import tiny_tokenizer
from tests.conftest import load_script

TOK = tiny_tokenizer()
BOS, EOS, MASK = 1, 2, 4  # <s>, </s>, <mask> of the tiny tokenizer (cls/sep of masked LMs)


def enc(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False)


# --- a small original-data folder -----------------------------------------------------------


def write_original(root: Path) -> Path:
    """SST-2 (TSV with header), CoLA (TSV, no header), MNLI (two dev sets), sst-5 (CSV)."""
    rng = np.random.default_rng(0)
    words = ["good", "bad", "movie", "film", "great", "terrible", "It", "is", "Yes", "No"]

    def sentence(n: int = 5) -> str:
        return " ".join(rng.choice(words, n))

    def tsv(path: Path, header: str | None, rows: list[str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{line}\n" for line in ([header] if header else []) + rows))

    sst2_labels = lambda n: [int(x) for x in rng.integers(0, 2, n)]  # noqa: E731
    tsv(
        root / "SST-2" / "train.tsv",
        "sentence\tlabel",
        [f"{sentence()} {i}\t{y}" for i, y in enumerate(sst2_labels(60))],
    )
    tsv(
        root / "SST-2" / "dev.tsv",
        "sentence\tlabel",
        [f"{sentence()} d{i}\t{y}" for i, y in enumerate(sst2_labels(1100))],
    )
    cola = lambda n, tag: [  # noqa: E731
        f"src\t{y}\t{'' if y else '*'}\t{sentence()} {tag}{i}" for i, y in enumerate(sst2_labels(n))
    ]
    tsv(root / "CoLA" / "train.tsv", None, cola(50, "t"))
    tsv(root / "CoLA" / "dev.tsv", None, cola(1010, "d"))
    columns = "\t".join(f"c{i}" for i in range(8)) + "\tsentence1\tsentence2\tlabel1\tgold_label"
    nli = ("contradiction", "entailment", "neutral")
    mnli = lambda n, tag: [  # noqa: E731
        f"{tag}{i}\t" + "\t".join("x" * 7) + f"\t{sentence()}.\t{sentence()}\t{y}\t{y}"
        for i, y in enumerate(rng.choice(nli, n))
    ]
    tsv(root / "MNLI" / "train.tsv", columns, mnli(90, "t"))
    tsv(root / "MNLI" / "dev_matched.tsv", columns, mnli(1005, "m"))
    tsv(root / "MNLI" / "dev_mismatched.tsv", columns, mnli(12, "mm"))
    (root / "sst-5").mkdir()
    texts = lambda n: [f'{sentence()}, "quoted" {i}' for i in range(n)]  # noqa: E731
    pd.DataFrame({0: rng.integers(0, 5, 120), 1: texts(120)}).to_csv(
        root / "sst-5" / "train.csv", header=False, index=False
    )
    pd.DataFrame({0: rng.integers(0, 5, 1200), 1: texts(1200)}).to_csv(
        root / "sst-5" / "test.csv", header=False, index=False
    )
    return root


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    return write_original(tmp_path_factory.mktemp("original"))


# --- an independent re-implementation of spec §1 --------------------------------------------

GLUE_LABEL_COLUMN = {"SST-2": -1, "CoLA": 1, "MNLI": -1}


def reference_kshot(original: Path, task: str, k: int, seeds: list[int], mode: str) -> dict:
    """{seed: {file name: bytes}} following the spec's text (and upstream's list identity)."""
    dev_rate = 11 if "10x" in mode else 2
    out: dict[int, dict[str, bytes]] = {}
    if task in GLUE_LABEL_COLUMN:
        evals = ["dev_matched", "dev_mismatched"] if task == "MNLI" else ["dev"]
        files = {
            split: (original / task / f"{split}.tsv").read_text().splitlines(keepends=True)
            for split in ["train", *evals]
        }
        for seed in seeds:
            np.random.seed(seed)
            header, lines = (
                ([], files["train"]) if task == "CoLA" else (files["train"][:1], files["train"][1:])
            )
            np.random.shuffle(lines)
            result = {}
            for split in evals:
                test_header, test = (
                    ([], files[split]) if task == "CoLA" else (files[split][:1], files[split][1:])
                )
                if "1k-test" in mode and len(test) > 1000:
                    np.random.seed(42)
                    np.random.shuffle(test)
                    test = test[:1000]
                result[split.replace("dev", "test") + ".tsv"] = "".join(test_header + test)
            buckets: dict[str, list[str]] = {}
            for line in lines:
                buckets.setdefault(line.strip().split("\t")[GLUE_LABEL_COLUMN[task]], []).append(
                    line
                )
            result["train.tsv"] = "".join(header + [x for b in buckets.values() for x in b[:k]])
            dev = [x for b in buckets.values() for x in b[k : k * dev_rate]]
            result[("dev_matched" if task == "MNLI" else "dev") + ".tsv"] = "".join(header + dev)
            out[seed] = {name: text.encode() for name, text in result.items()}
        return out
    train = pd.read_csv(original / task / "train.csv", header=None)
    test = pd.read_csv(original / task / "test.csv", header=None)
    for seed in seeds:
        np.random.seed(seed)
        lines = train.values.tolist()
        np.random.shuffle(lines)
        buckets_csv: dict[int, list] = {}
        for line in lines:
            buckets_csv.setdefault(line[0], []).append(line)
        capped = test.sample(n=1000, random_state=42) if "1k-test" in mode else test
        out[seed] = {
            "test.csv": capped.to_csv(header=False, index=False).encode(),
            "train.csv": pd.DataFrame([x for b in buckets_csv.values() for x in b[:k]])
            .to_csv(header=False, index=False)
            .encode(),
            "dev.csv": pd.DataFrame([x for b in buckets_csv.values() for x in b[k : k * dev_rate]])
            .to_csv(header=False, index=False)
            .encode(),
        }
    return out


@pytest.mark.parametrize("mode", ["k-shot", "k-shot-10x", "k-shot-1k-test"])
@pytest.mark.parametrize("task", ["SST-2", "CoLA", "MNLI", "sst-5"])
def test_kshot_files_equal_the_spec(original, tmp_path, task, mode):
    k = 1 if mode == "k-shot-10x" else 3
    seeds = [100, 0, 13]
    folders = generate_kshot(get_task(task), original, tmp_path, k=k, seeds=seeds, mode=mode)
    expected = reference_kshot(original, task, k, seeds, mode)
    for seed, folder in zip(seeds, folders, strict=True):
        assert folder == tmp_path / mode / task / f"{k}-{seed}"
        written = {p.name: p.read_bytes() for p in folder.iterdir()}
        assert written == expected[seed]


def test_kshot_sizes_caps_and_seed_order(original, tmp_path):
    (folder,) = generate_kshot(
        get_task("MNLI"), original, tmp_path, k=4, seeds=[0], mode="k-shot-1k-test"
    )
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["dev_matched.tsv", "test_matched.tsv", "test_mismatched.tsv", "train.tsv"]
    count = lambda name: len((folder / name).read_text().splitlines()) - 1  # noqa: E731
    assert (count("train.tsv"), count("dev_matched.tsv")) == (12, 12)
    assert (count("test_matched.tsv"), count("test_mismatched.tsv")) == (1000, 12)
    # CoLA's header-less file is shuffled in place: seed 13 after seed 100 differs from seed 13
    # alone; the other tasks do not depend on the order.
    cola = get_task("CoLA")
    chained = generate_kshot(cola, original, tmp_path / "a", k=3, seeds=[100, 13])[1]
    alone = generate_kshot(cola, original, tmp_path / "b", k=3, seeds=[13])[0]
    assert (chained / "train.tsv").read_text() != (alone / "train.tsv").read_text()
    sst2 = get_task("SST-2")
    chained = generate_kshot(sst2, original, tmp_path / "c", k=3, seeds=[100, 13])[1]
    alone = generate_kshot(sst2, original, tmp_path / "d", k=3, seeds=[13])[0]
    assert (chained / "train.tsv").read_bytes() == (alone / "train.tsv").read_bytes()


def test_kshot_split_too_few_and_bad_inputs(original, tmp_path):
    with pytest.raises(DataError, match=r"Task SST-2: label '\d' has \d+ training example\(s\)"):
        generate_kshot(get_task("SST-2"), original, tmp_path, k=20, seeds=[13])
    assert not (tmp_path / "k-shot").exists()
    with pytest.raises(DataError, match="original file"):
        generate_kshot(get_task("QNLI"), original, tmp_path, k=2, seeds=[13])
    with pytest.raises(DataError, match="Unknown k-shot mode"):
        generate_kshot(get_task("SST-2"), original, tmp_path, k=2, mode="k-shot-5x")
    rows = [(str(i), str(i % 2)) for i in range(10)]
    train, dev = kshot_split(rows, lambda r: r[1], k=2, seed=0)
    np.random.seed(0)
    order = list(rows)
    np.random.shuffle(order)
    first = order[0][1]
    assert [r[1] for r in train] == [first] * 2 + [str(1 - int(first))] * 2
    assert not set(train) & set(dev) and len(dev) == 4


# --- templates -----------------------------------------------------------------------------

MASKED = SpecialIds(cls=BOS, sep=EOS, mask=MASK)
CAUSAL = SpecialIds(cls=BOS, sep=EOS, mask=None)
A, B = "Great movie.", "It is bad"


def encode(template: str, kind: str = "masked", **kwargs):
    specials = MASKED if kind == "masked" else CAUSAL
    position = "mask" if kind == "masked" else "last"
    options = {"max_length": 128, **kwargs}
    return encode_parts(
        parse_template(template), [A, B], enc, specials, kind=kind, position=position, **options
    )


def test_literal_token_ids_of_the_tiny_tokenizer():
    assert enc(" It was") == [225, 331, 225, 91, 69, 87]
    assert enc(".") == [18] and TOK.convert_tokens_to_ids("<mask>") == MASK


@pytest.mark.parametrize(
    ("part", "text"),
    [
        ("sent_0", A),
        ("+sent_0", " " + A),
        ("sent-_0", A[:-1]),
        ("sentl_0", "great movie."),
        ("+sentl_0", " great movie."),
        ("sentl-_0", "great movie"),
        ("sentu_1", B),
        ("+sentu_1", " " + B),
        ("sentl_1", "it is bad"),
        ("+sentl_1", " it is bad"),
        ("sentu_0", A),
        ("sent_1", B),
    ],
)
def test_sentence_variants(part, text):
    out = encode(f"*cls**{part}*_It_was*mask*.*sep+*")
    sentence = enc(text)
    assert out.input_ids == [BOS, *sentence, *enc(" It was"), MASK, *enc("."), EOS]
    assert out.position == 1 + len(sentence) + len(enc(" It was"))


def test_sep_plus_literal_underscores_and_trec():
    out = encode("*cls**sent-_0*?*mask*,*+sentl_1**sep+*")
    expected = [BOS, *enc("Great movie"), *enc("?"), MASK, *enc(","), *enc(" it is bad"), EOS]
    assert out.input_ids == expected and out.position == 1 + len(enc("Great movie")) + 1
    out = encode("*cls**mask*:*+sent_0**sep+*")
    assert out.input_ids == [BOS, MASK, *enc(":"), *enc(" " + A), EOS] and out.position == 1
    assert encode("*cls*_a_b*mask**sep*").input_ids == [BOS, *enc(" a b"), MASK, EOS]


def test_sentence_limits_tail_and_head_truncation():
    template = "*cls**sent_0**mask**+sent_1**sep+*"
    a, b = enc(A), enc(" " + B)
    out = encode(template, first_sent_limit=2, other_sent_limit=1)
    assert out.input_ids == [BOS, *a[:2], MASK, *b[:1], EOS] and out.position == 3
    full = [BOS, *a, MASK, *b, EOS]
    out = encode(template, max_length=len(a) + 3)
    assert out.input_ids == full[: len(a) + 3] and out.position == 1 + len(a)
    assert out.n_truncated == len(full) - len(a) - 3
    out = encode(template, max_length=6, truncate_head=True)
    assert out.input_ids == full[-6:] and out.position == 1 + len(a) - (len(full) - 6)
    with pytest.raises(DataError, match="mask token .* falls outside max_length=3"):
        encode(template, max_length=3)
    with pytest.raises(DataError, match="falls outside max_length=2 after cutting the head"):
        encode(template, max_length=2, truncate_head=True)


def test_causal_prompt_stops_before_the_mask_and_keeps_its_end():
    template = "*cls**sent_0*_It_was*mask*.*sep+*"
    out = encode(template, kind="causal")
    assert out.input_ids == [BOS, *enc(A), *enc(" It was")]
    assert out.position == len(out.input_ids) - 1
    # too long: the sentence is cut from its end, the text before the mask survives
    out = encode(template, kind="causal", max_length=len(enc(" It was")) + 3)
    assert out.input_ids == [BOS, *enc(A)[:2], *enc(" It was")]
    two = encode("*cls**sent_0**+sent_1*_so*mask*", kind="causal", max_length=1 + 2 * 2 + 2)
    assert two.input_ids == [BOS, *enc(A)[:2], *enc(" " + B)[:2], *enc(" so")]
    head = encode(template, kind="causal", max_length=5, truncate_head=True)
    assert head.input_ids == [BOS, *enc(A), *enc(" It was")][-5:] and head.position == 4


TREC_WORDS = dict(
    zip(get_task("trec").labels, ["good", "bad", "movie", "film", "Yes", "No"], strict=True)
)


def test_template_errors():
    task = get_task("SST-2")
    ex = [FewShotExample("t-0", A, None, "1")]
    with pytest.raises(DataError, match="has no \\*mask\\* part"):
        encode_examples(ex, task, TOK, kind="masked", template="*cls**sent_0*_It_was.*sep+*")
    with pytest.raises(DataError, match="mask at the end"):
        encode_examples(ex, get_task("trec"), TOK, kind="causal", label_words=TREC_WORDS)
    with pytest.raises(DataError, match="demonstration part \\*label_0\\*"):
        parse_template("*cls**sent_0**label_0**mask*")
    with pytest.raises(DataError, match="uses sentence\\(s\\) \\[1\\]"):
        encode_examples(ex, task, TOK, kind="masked", template="*cls**sent_1**mask*")


# --- label words, encoding, cache, collate --------------------------------------------------


def test_label_word_ids_and_errors():
    assert label_word_ids(get_task("SST-2"), TOK) == [enc(" terrible")[0], enc(" great")[0]]
    assert label_word_ids(["No", "Yes", "Maybe"], TOK) == [
        enc(" " + w)[0] for w in ("No", "Yes", "Maybe")
    ]
    name = type(TOK).__name__
    with pytest.raises(DataError, match=f"Label word 'history' is 3 tokens .* tokenizer {name}"):
        label_word_ids(["great", "history"], TOK)
    with pytest.raises(DataError, match="Label word 'math' is 3 tokens"):
        label_word_ids(get_task("mmlu-topics-2"), TOK)
    with pytest.raises(DataError, match="map two classes to one token"):
        label_word_ids({"0": "great", "1": "great"}, TOK)


def test_encode_examples_heads_kinds_and_labels():
    task = get_task("MNLI")
    ex = [FewShotExample("dev-1", "A movie.", "It is great", "neutral")]
    (masked,) = encode_examples(ex, task, TOK, kind="masked")
    prompt = [BOS, *enc("A movie"), *enc("?"), MASK, *enc(","), *enc(" it is great"), EOS]
    assert masked == {
        "guid": "dev-1",
        "input_ids": prompt,
        "position": prompt.index(MASK),
        "label": 2,
    }
    with pytest.raises(DataError, match=r"sentence\(s\) \[1\] after \*mask\*"):
        encode_examples(ex, task, TOK, kind="causal")  # the hypothesis would be dropped
    causal_template = "*cls**sent-_0*,*+sentl_1*?*mask*"
    (causal,) = encode_examples(ex, task, TOK, kind="causal", template=causal_template)
    expected = [BOS, *enc("A movie"), *enc(","), *enc(" it is great"), *enc("?")]
    assert causal["input_ids"] == expected and causal["position"] == len(expected) - 1
    linear = [BOS, *enc("A movie."), EOS, *enc("It is great"), EOS]
    (lin_m,) = encode_examples(ex, task, TOK, kind="masked", head="linear")
    (lin_c,) = encode_examples(ex, task, TOK, kind="causal", head="linear")
    assert lin_m["input_ids"] == lin_c["input_ids"] == linear
    assert (lin_m["position"], lin_c["position"]) == (0, len(linear) - 1)
    with pytest.raises(DataError, match="has label 'maybe'"):
        encode_examples([FewShotExample("x", "a", "b", "maybe")], task, TOK, kind="masked")


def test_cache_key_covers_template_and_label_words(tmp_path):
    task = get_task("SST-2")
    ex = [FewShotExample(f"t-{i}", f"movie {i}", None, str(i % 2)) for i in range(4)]
    first = encode_examples(ex, task, TOK, kind="masked", cache_dir=tmp_path)
    assert encode_examples(ex, task, TOK, kind="masked", cache_dir=tmp_path) == first
    assert len(list(tmp_path.iterdir())) == 1
    other = "*cls*_Review:*sent_0*_It_was*mask*.*sep+*"
    changed = encode_examples(ex, task, TOK, kind="masked", template=other, cache_dir=tmp_path)
    assert changed == encode_examples(ex, task, TOK, kind="masked", template=other)
    assert changed != first and len(list(tmp_path.iterdir())) == 2
    words = {"0": "bad", "1": "good"}
    encode_examples(ex, task, TOK, kind="masked", label_words=words, cache_dir=tmp_path)
    encode_examples(ex[:3], task, TOK, kind="masked", cache_dir=tmp_path)
    encode_examples(ex, task, TOK, kind="causal", cache_dir=tmp_path)
    files = sorted(tmp_path.iterdir())
    assert len(files) == 5 and all(f.name.startswith("prompts-SST-2-") for f in files)
    record = json.loads(files[0].read_text())
    assert {"template", "label_words", "tokenizer", "examples_sha256"} <= set(record["settings"])


def test_collate_prompts_pads_right():
    task = get_task("SST-2")
    ex = [FewShotExample("a", "good", None, "1"), FewShotExample("b", "a bad movie", None, "0")]
    items = encode_examples(ex, task, TOK, kind="masked")
    batch = collate_prompts(items, pad_token_id=0, label_word_ids=[7, 9])
    width = max(len(e["input_ids"]) for e in items)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, width)
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["attention_mask"].sum(1).tolist() == [len(e["input_ids"]) for e in items]
    assert batch["input_ids"][0, len(items[0]["input_ids"]) :].eq(0).all()
    assert batch["positions"].tolist() == [e["position"] for e in items]
    assert batch["class_labels"].tolist() == [1, 0]
    assert batch["label_word_ids"].tolist() == [7, 9]
    assert "label_word_ids" not in collate_prompts(items, 0)
    with pytest.raises(DataError, match="no examples"):
        collate_prompts([], 0)


# --- tasks, loading, metrics ----------------------------------------------------------------


def test_registry():
    paper = ["SST-2", "sst-5", "mr", "cr", "mpqa", "subj", "trec", "CoLA", "MNLI", "mnli-mm"]
    paper += ["SNLI", "QNLI", "RTE", "MRPC", "QQP", "ag_news", "ag_news-graft", "mmlu-topics"]
    assert set(paper) <= set(TASKS)
    assert get_task("mnli").labels == ("contradiction", "entailment", "neutral")
    assert get_task("QNLI").words == ("Yes", "No")
    assert (get_task("RTE").max_seq_length, get_task("RTE").first_sent_limit) == (256, 240)
    assert get_task("MRPC").metrics == ("acc", "f1") and get_task("CoLA").metrics == ("acc", "mcc")
    assert get_task("ag_news").labels == ("1", "2", "3", "4")
    assert get_task("ag_news-graft").template == "*cls**mask*:*+sent_0**sep+*"
    with pytest.raises(DataError, match="Unknown task 'nope'; choose one of SST-2, sst-5"):
        get_task("nope")


def test_load_task_from_root_or_folder(original, tmp_path):
    generate_kshot(get_task("MNLI"), original, tmp_path, k=2, seeds=[13], mode="k-shot")
    splits = load_task("mnli-mm", tmp_path, k=2, seed=13, test_limit=5)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (6, 6, 5)
    full = load_task("mnli-mm", tmp_path, k=2, seed=13).test
    keep = sorted(np.random.default_rng(0).choice(len(full), 5, replace=False))
    assert [ex.guid for ex in splits.test] == [full[i].guid for i in keep]
    assert splits.test[0].text_a.endswith(".")
    assert splits.provenance["data_dir"] == str(tmp_path / "k-shot" / "MNLI" / "2-13")
    assert set(splits.provenance["sha256"]) == {
        "train.tsv",
        "dev_matched.tsv",
        "test_mismatched.tsv",
    }
    direct = load_task("MNLI", tmp_path / "k-shot" / "MNLI" / "2-13", k=2, seed=13)
    assert direct.train == splits.train and len(direct.test) == 1005
    generate_kshot(get_task("sst-5"), original, tmp_path, k=2, seeds=[13])
    sst5 = load_task("sst-5", tmp_path, k=2, seed=13)
    assert sorted({ex.label for ex in sst5.train}) == ["0", "1", "2", "3", "4"]
    assert sst5.train[0].text_a.endswith(tuple("0123456789")) and '"quoted"' in sst5.train[0].text_a
    with pytest.raises(DataError, match="data_dir must be the k-shot root"):
        load_task("SST-2", tmp_path, k=2, seed=13)
    with pytest.raises(DataError, match="pass data_dir"):
        load_task("SST-2", None)


def test_task_metrics_match_hand_computed_values():
    preds, gold = [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]  # TP 2, TN 1, FP 1, FN 1
    assert task_metrics("SST-2", preds, gold) == {"acc": 0.6}
    mrpc = task_metrics(get_task("MRPC"), preds, gold)
    assert mrpc["acc"] == 0.6 and mrpc["f1"] == pytest.approx(2 / 3)
    mcc = (2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2)
    assert task_metrics("CoLA", preds, gold)["mcc"] == pytest.approx(mcc)
    with pytest.raises(DataError, match="2 predictions and 1 labels"):
        task_metrics("SST-2", [0, 1], [0])


# --- the offline task (embedded MMLU) --------------------------------------------------------


@pytest.fixture(scope="module")
def embedded_mmlu():
    try:
        fetch("mmlu")
    except EmbeddedAssetError as error:
        pytest.skip(f"embedded asset mmlu unavailable: {error}")


@pytest.mark.embedded
def test_offline_topics_task(embedded_mmlu):
    splits = load_task("mmlu-topics", k=8, seed=13)
    labels = ("math", "history", "law", "health")
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (32, 32, 400)
    for part in (splits.train, splits.dev):
        assert sorted(ex.label for ex in part) == sorted(labels * 8)
    assert sorted(ex.label for ex in splits.test) == sorted(labels * 100)
    guids = [{ex.guid for ex in part} for part in (splits.train, splits.dev, splits.test)]
    texts = [{ex.text_a for ex in part} for part in (splits.train, splits.dev, splits.test)]
    for sets in (guids, texts):
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert load_task("mmlu-topics", k=8, seed=13).train == splits.train
    other = load_task("mmlu-topics", k=8, seed=21)
    assert other.train != splits.train and other.test == splits.test
    binary = load_task("mmlu-topics-2", k=8, seed=0)
    assert {ex.guid for ex in binary.test} == {ex.guid for ex in splits.test[:200]}
    assert splits.provenance["source"] == "offline" and splits.provenance["test_per_class"] == 100
    ten_x = load_task("mmlu-topics-2", k=2, seed=13, mode="k-shot-10x")
    assert (len(ten_x.train), len(ten_x.dev)) == (4, 40)
    with pytest.raises(DataError, match="label 'history' has 828 training example"):
        load_task("mmlu-topics-2", k=450, seed=13)
    words = dict(zip(labels, ["good", "bad", "movie", "film"], strict=True))
    items = encode_examples(splits.test[:4], splits.task, TOK, kind="causal", label_words=words)
    about = enc(" This question is about")
    assert all(item["input_ids"][-len(about) :] == about for item in items)


@pytest.mark.embedded
def test_topic_words_are_smollm2_tokens(embedded_mmlu):
    from adaptlab.models import embedded_model_dir, load_tokenizer

    try:
        embedded_model_dir("smollm2-135m")
    except EmbeddedAssetError as error:
        pytest.skip(f"embedded asset smollm2-135m unavailable: {error}")
    tokenizer = load_tokenizer("embedded:smollm2-135m")
    task = get_task("mmlu-topics")
    assert label_word_ids(task, tokenizer) == [4119, 1463, 1525, 864]
    splits = load_task("mmlu-topics-2", k=2, seed=13)
    items = encode_examples(splits.train, splits.task, tokenizer, kind="causal")
    about = tokenizer.encode(" This question is about", add_special_tokens=False)
    assert all(len(item["input_ids"]) <= task.max_seq_length for item in items)
    assert all(item["input_ids"][-len(about) :] == about for item in items)


# --- the recipe ------------------------------------------------------------------------------


def test_prepare_script_end_to_end(original, tmp_path):
    prepare = load_script("prepare_fewshot")
    out = tmp_path / "data"
    prepare.main([
        "--original_dir", str(original), "--out_dir", str(out), "--tasks", "[SST-2,sst-5,CoLA]",
        "--k", "2", "--seeds", "[0,42]", "--mode", "k-shot-1k-test",
    ])  # fmt: skip
    for seed in (0, 42):
        expected = reference_kshot(original, "SST-2", 2, [0, 42], "k-shot-1k-test")[seed]
        folder = out / "k-shot-1k-test" / "SST-2" / f"2-{seed}"
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == expected
    splits = load_task("CoLA", out, k=2, seed=42, mode="k-shot-1k-test")
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (4, 4, 1000)
    record = json.loads((out / "k-shot-1k-test" / "prepare-k2.json").read_text())
    assert set(record["tasks"]) == {"SST-2", "sst-5", "CoLA"}
    assert set(record["tasks"]["CoLA"]["splits"]) == {"2-0", "2-42"}
    assert record["config"]["seeds"] == [0, 42]


def test_prepare_script_errors(original, tmp_path, capsys, monkeypatch):
    prepare = load_script("prepare_fewshot")
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(
            ["--original_dir", str(original), "--tasks", "[QNLI]", "--out_dir", str(tmp_path)]
        )
    assert exit_info.value.code == 2
    assert "original file(s)" in capsys.readouterr().err

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SystemExit):
        prepare.main(["--from_hub", "true", "--tasks", "[RTE]", "--original_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert "Could not download nyu-mll/glue/rte for task RTE" in err and err.count("\n") == 1
    with pytest.raises(SystemExit):
        prepare.main(["--from_hub", "true", "--tasks", "[mr]", "--original_dir", str(tmp_path)])
    assert "Task mr has no hub source" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prepare.main(["--seeds", "[1,1]"])
    assert "repeats a seed" in capsys.readouterr().err


def test_prepare_from_hub_writes_the_original_layout(tmp_path, monkeypatch):
    import datasets

    features = datasets.Features(
        {
            "sentence1": datasets.Value("string"),
            "sentence2": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["entailment", "not_entailment"]),
            "idx": datasets.Value("int32"),
        }
    )

    def fake_rte(path, config, split):
        assert (path, config) == ("nyu-mll/glue", "rte")
        n = 12 if split == "train" else 3
        rows = {
            "sentence1": [f"A\tpremise {i}." for i in range(n)],
            "sentence2": [f"Hypothesis\n{i}" for i in range(n)],
            "label": [i % 2 for i in range(n)],
            "idx": list(range(n)),
        }
        return datasets.Dataset.from_dict(rows, features=features)

    monkeypatch.setattr(datasets, "load_dataset", fake_rte)
    prepare = load_script("prepare_fewshot")
    prepare.main([
        "--from_hub", "true", "--tasks", "[RTE]", "--original_dir", str(tmp_path / "orig"),
        "--out_dir", str(tmp_path / "data"), "--k", "2", "--seeds", "[13]",
    ])  # fmt: skip
    lines = (tmp_path / "orig" / "RTE" / "train.tsv").read_text().splitlines()
    assert lines[0] == "index\tsentence1\tsentence2\tlabel"
    assert lines[2] == "1\tA premise 1.\tHypothesis 1\tnot_entailment"
    splits = load_task("RTE", tmp_path / "data", k=2, seed=13)
    assert sorted(ex.label for ex in splits.train) == ["entailment"] * 2 + ["not_entailment"] * 2
    assert len(splits.test) == 3 and splits.test[0].text_b == "Hypothesis 0"
