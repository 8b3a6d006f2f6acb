"""bench/method_comparison.py --quick on a tiny random Llama: every row has its fields, and the
trainable counts are those of the same method prepared apart from the benchmark.

The timings and memory figures are recorded, never compared to a goal here.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from adaptlab.config import parse_config
from adaptlab.models.tiny import tiny_llama, tiny_tokenizer
from adaptlab.training.config import FinetuneConfig
from adaptlab.training.methods import METHODS, count_parameters
from tests.conftest import ROOT

METHOD_NAMES = ["lora", "kernel_mix"]


def load_bench():
    path = ROOT / "bench" / "method_comparison.py"
    spec = importlib.util.spec_from_file_location("bench_method_comparison", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_record(tmp_path_factory):
    bench = load_bench()
    out = tmp_path_factory.mktemp("method_comparison") / "record.json"
    bench.main(["--quick", "--methods", *METHOD_NAMES, "--output", str(out)])
    return bench, json.loads(out.read_text()), out


def test_record_has_every_field(quick_record):
    bench, record, out = quick_record
    for key in ("benchmark", "device", "memory_measure", "settings", "configs", "rows", "goals",
                "hardware", "versions", "created"):  # fmt: skip
        assert key in record
    assert record["settings"]["quick"] and record["settings"]["steps"] == 3
    rows = {row["name"]: row for row in record["rows"]}
    assert list(rows) == [bench.BASE, *METHOD_NAMES]
    assert not any("error" in row for row in rows.values())
    assert set(rows[bench.BASE]) >= {"test", "mmlu", "load_average"}
    for name in METHOD_NAMES:
        row = rows[name]
        for key in ("method", "flags", "trainable", "total", "percent_trainable", "test",
                    "tokens_per_second", "timed_steps", "timed_tokens", "memory", "mmlu",
                    "forgetting"):  # fmt: skip
            assert key in row, (name, key)
        assert row["timed_steps"] == 2  # 3 steps, the first untimed
        assert 0 <= row["test"]["accuracy"] <= 1 and row["test"]["n"] == 16
        assert row["mmlu"]["n"] == rows[bench.BASE]["mmlu"]["n"]  # the same questions for all
        change = row["mmlu"]["accuracy"] - rows[bench.BASE]["mmlu"]["accuracy"]
        assert row["forgetting"]["mmlu_accuracy_change"] == pytest.approx(change, abs=1e-4)
        assert set(row["memory"]) == {"peak_mib", "above_resident_mib", "measure"}
    assert "vs_lora" not in rows["lora"] and "vs_lora" in rows["kernel_mix"]
    assert set(record["goals"]["per_method"]) == {"kernel_mix"}
    table = out.with_suffix(".md").read_text()
    assert all(f"| {name} |" in table for name in METHOD_NAMES)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_trainable_counts_match_an_independent_preparation(quick_record, name):
    bench, record, _ = quick_record
    row = next(r for r in record["rows"] if r["name"] == name)
    args = bench.parse_args(["--quick"])
    vars(args).update(record["settings"])
    cfg = parse_config(FinetuneConfig, bench.recipe_argv(name, args, ROOT / "unused"))
    model = METHODS[cfg.method].prepare(tiny_llama(vocab_size=len(tiny_tokenizer())), cfg, 3)
    assert (row["trainable"], row["total"]) == count_parameters(model)
