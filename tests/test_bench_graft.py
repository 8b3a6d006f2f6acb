"""bench/graft.py on a tiny model: the record's keys, and the same S update from every method.

The timings are not tested; what is tested is that the upstream-style re-implementation, the
host-resident mode and :func:`adaptlab.graft.learn.mask_step` compute the same update of S.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.conftest import ROOT

TINY = "--hidden 64 --layers 2 --vocab 128 --seq_len 8 --batch_size 2 --accumulation 3 --repeats 1"


def load_bench():
    path = ROOT / "bench" / "graft.py"
    spec = importlib.util.spec_from_file_location("bench_graft", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("dtype", "tolerance"), [("float64", 1e-12), ("float32", 1e-4)])
def test_graft_bench_methods_agree_and_record_is_complete(tmp_path, dtype, tolerance):
    bench = load_bench()
    out = tmp_path / "graft.json"
    bench.main([*TINY.split(), "--device", "cpu", "--dtype", dtype, "--out", str(out)])
    record = json.loads(out.read_text())

    assert record["benchmark"] == "graft"
    for key in ("config", "seconds", "fastest_seconds", "ratios", "same_update", "memory",
                "goals", "hardware", "versions", "created", "load_average"):  # fmt: skip
        assert key in record
    assert set(record["seconds"]) == set(bench.METHODS)
    assert set(record["ratios"]) == {
        "ours_over_finetune",
        "upstream_over_ours",
        "ours_host_over_ours",
        "upstream_over_ours_host",
    }
    assert set(record["graft_only"]["fastest_seconds"]) == set(bench.MASK_METHODS)
    assert set(record["goals"]) == {"ours_over_finetune", "upstream_over_ours", "memory_over_model"}
    assert record["memory"]["measure"].startswith("accounting")

    same = record["same_update"]
    assert same["update_size"] > 1e-4  # the step moved S measurably
    assert set(same["max_rel_diff"]) == set(bench.MASK_METHODS)
    for method, diff in same["max_rel_diff"].items():
        assert diff <= tolerance, method

    # the accounting: model + θ_pre + θ_ft + S + gradient (E each) + b (1 byte per entry)
    held = record["memory"]["held_bytes"]
    n_eligible, size = record["config"]["eligible"], 8 if dtype == "float64" else 4
    assert held["theta_pre"] == held["theta_ft"] == held["scores"] == n_eligible * size
    assert held["base"] == n_eligible
