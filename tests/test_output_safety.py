"""Output folders on real files and processes: locks, safe overwrite, umask, swept temporaries."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from adaptlab.io import sweep_temporaries, write_json
from adaptlab.rundir import LOCK_FILE, Layout, OutputDirError, RunLock, clear_owned
from tests.conftest import ROOT, load_script

extract_repr = load_script("extract_repr")
finetune = load_script("finetune")
analyze_repr = load_script("analyze_repr")


def extract_args(model_dir, data, out, *extra: str) -> list[str]:
    return [
        "--model", str(model_dir), "--dataset_path", str(data), "--output_dir", str(out),
        "--num_shots", "1", "--batch_size", "3", "--chunk_size", "8",
        "--points", "[norm1,final_norm]", "--progress", "false", *extra,
    ]  # fmt: skip


def finetune_args(model_dir, data, out, *extra: str) -> list[str]:
    return [
        "--model", str(model_dir), "--dataset_path", str(data), "--output_dir", str(out),
        "--batch_size", "4", "--micro_batch_size", "2", "--max_steps", "4",
        "--eval_samples_per_subject", "2", "--eval_points", "1", "--checkpoints", "0",
        "--lr", "1e-2", "--report_to", "none", "--progress", "false", *extra,
    ]  # fmt: skip


def script(name: str, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / name), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )


def test_a_second_run_into_a_locked_folder_is_refused_and_the_first_finishes(
    tiny_model_dir, mmlu_file, tmp_path
):
    out = tmp_path / "ft"
    first = script(
        "finetune.py", *finetune_args(tiny_model_dir, mmlu_file, out, "--max_steps", "40")
    )
    deadline = time.time() + 120
    while not (out / LOCK_FILE).exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert (out / LOCK_FILE).exists(), first.communicate()
    holder = json.loads((out / LOCK_FILE).read_text())
    assert holder["pid"] == first.pid
    second = script("finetune.py", *finetune_args(tiny_model_dir, mmlu_file, out, "--seed", "1"))
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2
    assert err.strip().splitlines() == [
        next(line for line in err.splitlines() if line.startswith("error: "))
    ]
    assert f"in use by another fine-tuning run (pid {first.pid}" in err
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["seed"] == 42 and result["schedule"]["total_steps"] == 40
    assert not (out / LOCK_FILE).exists()  # released at the end: the folder is free again
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # one run's lines, not two interleaved


def test_lock_is_exclusive_across_processes_and_named(tmp_path):
    out = tmp_path / "busy"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from adaptlab.rundir import RunLock; "
            f"RunLock({str(out)!r}, 'demo').acquire(); print('locked', flush=True); "
            "sys.stdin.readline()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(OutputDirError, match=f"in use by another demo run \\(pid {holder.pid} "):
        RunLock(out, "demo").acquire()
    holder.communicate("\n", timeout=30)  # the holder exits: its lock goes with it
    lock = RunLock(out, "demo").acquire()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not out.exists()  # the lock created the folder and nothing was written into it


def test_overwrite_keeps_foreign_files_and_refuses_a_folder_that_is_not_a_run(
    tiny_model_dir, mmlu_file, tmp_path
):
    out = tmp_path / "x"
    extract_repr.main(extract_args(tiny_model_dir, mmlu_file, out))
    (out / "notes.txt").write_text("mine\n")
    (out / "plots").mkdir()
    (out / "plots" / "a.png").write_bytes(b"png")
    extract_repr.main(extract_args(tiny_model_dir, mmlu_file, out, "--num_shots", "0",
                                   "--overwrite", "true"))  # fmt: skip
    assert json.loads((out / "manifest.json").read_text())["prompt"]["num_shots"] == 0
    assert (out / "notes.txt").read_text() == "mine\n" and (out / "plots" / "a.png").is_file()
    # a folder with no extraction marker (say a repository) is never cleared
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "README.md").write_text("readme\n")
    (repo / "norm1").mkdir()  # a name extraction writes, but this folder is not an extraction
    with pytest.raises(SystemExit) as exit_info:
        extract_repr.main(extract_args(tiny_model_dir, mmlu_file, repo, "--overwrite", "true"))
    assert exit_info.value.code == 2
    assert sorted(p.name for p in repo.iterdir()) == [".git", "README.md", "norm1"]

    ft = tmp_path / "ft"
    finetune.main(finetune_args(tiny_model_dir, mmlu_file, ft, "--max_steps", "2"))
    (ft / "my_analysis.ipynb").write_text("{}")
    finetune.main(finetune_args(tiny_model_dir, mmlu_file, ft, "--max_steps", "3",
                                "--overwrite", "true"))  # fmt: skip
    assert json.loads((ft / "result.json").read_text())["schedule"]["total_steps"] == 3
    assert (ft / "my_analysis.ipynb").read_text() == "{}"


def test_clear_owned_removes_exactly_the_layout_entries(tmp_path):
    layout = Layout("demo", markers=("run.json",), owned=("run.json", "resume", "metrics.jsonl"))
    for name in ("run.json", "metrics.jsonl", "keep.txt", ".metrics.jsonl.k3x9.adaptlab-tmp"):
        (tmp_path / name).write_text("x")
    for name in ("resume", ".resume.adaptlab-tmp", "data"):
        (tmp_path / name).mkdir()
    removed = {p.name for p in clear_owned(tmp_path, layout)}
    assert removed == {
        "run.json", "metrics.jsonl", "resume", ".resume.adaptlab-tmp",
        ".metrics.jsonl.k3x9.adaptlab-tmp",
    }  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "keep.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_follow_the_umask(tiny_model_dir, mmlu_file, tmp_path, umask):
    out = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "extract_repr.py"),
         *extract_args(tiny_model_dir, mmlu_file, out)],
        preexec_fn=lambda: os.umask(umask), capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"manifest.json", "statistics.json", "l1.safetensors"}
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o666 & ~umask}
    dirs = [p for p in out.rglob("*") if p.is_dir()]
    assert {stat.S_IMODE(p.stat().st_mode) for p in dirs} == {0o777 & ~umask}


def test_temporaries_of_a_killed_write_are_swept_on_resume(
    tiny_model_dir, mmlu_file, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    real = extract_repr.extract_chunks

    def killed(*args, **kwargs):  # the run dies while two files are half written
        parts = args[3]
        (parts / ".chunk_000001.safetensors.a1b2c3.adaptlab-tmp").write_bytes(b"half")
        (out / ".statistics.json.d4e5f6.adaptlab-tmp").write_text("{")
        raise KeyboardInterrupt

    monkeypatch.setattr(extract_repr, "extract_chunks", killed)
    with pytest.raises(KeyboardInterrupt):
        extract_repr.main(extract_args(tiny_model_dir, mmlu_file, out))
    monkeypatch.setattr(extract_repr, "extract_chunks", real)
    extract_repr.main(extract_args(tiny_model_dir, mmlu_file, out))
    assert not [p for p in out.rglob("*") if p.name.endswith(".adaptlab-tmp")]
    assert (out / "manifest.json").is_file()


def test_sweep_keeps_a_folder_moved_aside_whose_new_version_is_missing(tmp_path):
    (tmp_path / ".best.adaptlab-old").mkdir()  # a kill between the two renames of a swap
    (tmp_path / "final").mkdir()
    (tmp_path / ".final.adaptlab-old").mkdir()  # the swap finished: the old copy is stale
    (tmp_path / "final" / ".model.safetensors.x.adaptlab-tmp").write_bytes(b"")
    removed = {p.name for p in sweep_temporaries(tmp_path)}
    assert removed == {".final.adaptlab-old", ".model.safetensors.x.adaptlab-tmp"}
    assert (tmp_path / ".best.adaptlab-old").is_dir()


def test_a_manifest_pointing_outside_its_run_is_refused(tiny_model_dir, mmlu_file, tmp_path):
    run = tmp_path / "runs" / "1shot"
    extract_repr.main(extract_args(tiny_model_dir, mmlu_file, run))
    manifest = json.loads((run / "manifest.json").read_text())
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes((run / manifest["layers"][0]["file"]).read_bytes())
    manifest["layers"][0]["file"] = "../../secret.safetensors"
    write_json(run / "manifest.json", manifest)
    with pytest.raises(SystemExit) as exit_info:
        analyze_repr.main(["--runs", f"[{run}]", "--output_dir", str(tmp_path / "a"),
                           "--progress", "false"])  # fmt: skip
    assert exit_info.value.code == 2
    assert not (tmp_path / "a").exists()


def test_a_run_that_failed_before_its_first_chunk_does_not_block_the_corrected_rerun(
    tiny_model_dir, mmlu_file, tmp_path, monkeypatch
):
    out = tmp_path / "run"

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory in the first forward pass")

    monkeypatch.setattr(extract_repr, "extract_chunks", out_of_memory)
    with pytest.raises(RuntimeError):
        extract_repr.main(extract_args(tiny_model_dir, mmlu_file, out, "--batch_size", "64"))
    assert (out / ".parts" / "run.json").is_file()
    monkeypatch.undo()
    extract_repr.main(extract_args(tiny_model_dir, mmlu_file, out, "--num_shots", "0"))
    manifest = json.loads((out / "manifest.json").read_text())
    rows = load_file(out / "norm1" / "l1.safetensors")["repr"]
    assert manifest["prompt"]["num_shots"] == 0 and rows.shape[0] == manifest["n_examples"]
    assert torch.isfinite(rows).all()
