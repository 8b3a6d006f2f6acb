"""Training metrics reach TensorBoard and W&B as metrics.jsonl records them, read back with
each tool's own reader; a resumed run leaves one value per step in both."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from adaptlab.training.loop import RunLogger, read_metrics
from tests.conftest import load_script

finetune = load_script("finetune")


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def jsonl_scalars(out) -> dict[str, list[tuple[int, float]]]:
    table: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(out):
        for tag, value in record.items():
            if tag != "step":
                table.setdefault(tag, []).append((record["step"], value))
    return table


def test_tensorboard_events_hold_what_metrics_jsonl_holds(tiny_model_dir, mmlu_file, tmp_path):
    out = tmp_path / "run"
    finetune.main([
        "--model", str(tiny_model_dir), "--dataset_path", str(mmlu_file), "--output_dir", str(out),
        "--batch_size", "4", "--micro_batch_size", "2", "--max_steps", "4",
        "--eval_samples_per_subject", "2", "--eval_points", "2", "--checkpoints", "0",
        "--lr", "1e-2", "--report_to", "tensorboard", "--run_name", "tb", "--progress", "false",
    ])  # fmt: skip
    events = tensorboard_scalars(out / "tensorboard" / "tb")
    expected = jsonl_scalars(out)
    assert set(events) == set(expected) and "train/loss" in events and "eval/ece" in events
    for tag, points in expected.items():
        assert [s for s, _ in events[tag]] == [s for s, _ in points], tag
        assert [v for _, v in events[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


def test_a_resumed_run_purges_the_events_logged_after_its_resume_state(tmp_path):
    def logger(resume_step):
        return RunLogger(tmp_path, "tensorboard", True, "run", "p", "id", {}, resume_step)

    killed = logger(None)
    for step in (1, 2, 3, 4):
        killed.log(step, {"loss": 10.0 + step}, "train")
    killed.tensorboard.flush()  # on disk when the process dies; never closed
    resumed = logger(2)  # the last resume state was saved at step 2
    for step in (3, 4, 5):
        resumed.log(step, {"loss": 20.0 + step}, "train")
    resumed.close()
    want = [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0), (5, 25.0)]
    assert tensorboard_scalars(tmp_path / "tensorboard" / "run")["train/loss"] == want
    assert jsonl_scalars(tmp_path)["train/loss"] == want
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[2])["step"] == 3
