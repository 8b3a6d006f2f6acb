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


def wandb_records(path) -> list[bytes]:
    """The records of a ``.wandb`` file: a 7-byte header (``:W&B``, magic 0xBEE1, version),
    then LevelDB log records (7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST) in
    32 KiB blocks. W&B ships no Python reader of it any more; the records are its protobufs."""
    import struct

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # the rest of a block is padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            out.append(pending)
    return out


def wandb_history(out) -> dict[str, list[tuple[int, float]]]:
    """The history rows of the offline W&B run under ``out``, decoded with W&B's protobufs."""
    from wandb.proto import wandb_internal_pb2

    (path,) = out.glob("wandb/offline-run-*/run-*.wandb")
    table: dict[str, list[tuple[int, float]]] = {}
    for data in wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") != "history":
            continue
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
               for item in record.history.item}  # fmt: skip
        for tag, value in row.items():
            if not tag.startswith("_"):
                table.setdefault(tag, []).append((row["_step"], value))
    return table


def test_wandb_offline_run_holds_what_metrics_jsonl_holds(
    tiny_model_dir, mmlu_file, tmp_path, monkeypatch
):
    pytest.importorskip("wandb", reason="W&B is an optional extra (pip install 'adaptlab[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    out = tmp_path / "run"
    finetune.main([
        "--model", str(tiny_model_dir), "--dataset_path", str(mmlu_file), "--output_dir", str(out),
        "--batch_size", "4", "--micro_batch_size", "2", "--max_steps", "3",
        "--eval_samples_per_subject", "2", "--eval_points", "1", "--checkpoints", "0",
        "--lr", "1e-2", "--report_to", "wandb", "--progress", "false",
    ])  # fmt: skip
    history, expected = wandb_history(out), jsonl_scalars(out)
    assert set(history) == set(expected) and "train/loss" in history
    for tag, points in expected.items():
        assert [s for s, _ in history[tag]] == [s for s, _ in points], tag
        assert [v for _, v in history[tag]] == pytest.approx([v for _, v in points]), tag
