"""Real signals and real files: SIGTERM ends runs cleanly and resumably, a half-written metrics
line does not block a resume, and saved kernels are not reused for other data or weights."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from adaptlab.rundir import LOCK_FILE, RunLock
from adaptlab.signals import EXIT_STATUS, StopAtStep, exit_on_sigterm
from adaptlab.training.loop import METRICS_FILE, read_metrics
from adaptlab.training.optim import TrainingError
from tests.conftest import ROOT, free_port, load_script

finetune = load_script("finetune")
compute_kernel = load_script("compute_kernel")

# telemetry that depends on the machine's speed, not on the computation
TIMING = ("tokens_per_second", "peak_memory_mib", "mfu")


def finetune_args(model_dir, data, out, *extra: str) -> list[str]:
    return [
        "--model", str(model_dir), "--dataset_path", str(data), "--output_dir", str(out),
        "--batch_size", "4", "--micro_batch_size", "2", "--max_steps", "60",
        "--eval_samples_per_subject", "2", "--eval_points", "3", "--checkpoints", "0",
        "--lr", "1e-2", "--lora_dropout", "0.2", "--report_to", "none", "--progress", "false",
        *extra,
    ]  # fmt: skip


def computed_metrics(out) -> list[dict]:
    """metrics.jsonl without the timing telemetry, which differs between any two runs."""
    return [
        {k: v for k, v in record.items() if not k.endswith(TIMING)} for record in read_metrics(out)
    ]


def assert_same_adapter(a, b) -> None:
    first = load_file(a / "final" / "adapter_model.safetensors")
    second = load_file(b / "final" / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key  # bit for bit, not close


def train_steps_logged(out) -> int:
    path = out / METRICS_FILE
    if not path.is_file():
        return 0
    return sum('"train/loss"' in line for line in path.read_text().splitlines())


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, mmlu_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    finetune.main(finetune_args(tiny_model_dir, mmlu_file, out))
    return out


def test_sigterm_saves_the_resume_state_and_the_rerun_ends_bit_identical(
    uninterrupted, tiny_model_dir, mmlu_file, tmp_path, capsys
):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "scripts" / "finetune.py")]
    run = subprocess.Popen(
        [*cmd, *finetune_args(tiny_model_dir, mmlu_file, out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.time() + 120
    while train_steps_logged(out) < 3 and run.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert run.poll() is None, run.communicate()
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)

    assert run.returncode == EXIT_STATUS, err
    assert "Traceback" not in err
    state = json.loads((out / "resume" / "trainer_state.json").read_text())
    stopped_at = state["step"]
    assert 3 <= stopped_at < 60
    assert err.strip().splitlines()[-1] == (
        f"stopped by SIGTERM after step {stopped_at} of 60; the resume state is in "
        f"{out / 'resume'}: run the same command to continue."
    )
    assert not (out / LOCK_FILE).exists() and not (out / "result.json").exists()
    assert max(r["step"] for r in read_metrics(out)) == stopped_at

    capsys.readouterr()
    finetune.main(finetune_args(tiny_model_dir, mmlu_file, out))
    assert f"resumed at step {stopped_at}" in capsys.readouterr().out
    assert_same_adapter(uninterrupted, out)
    assert computed_metrics(out) == computed_metrics(uninterrupted)
    assert not (out / "resume").exists()


@pytest.mark.multiprocess
def test_two_processes_stop_at_the_same_step_when_one_gets_sigterm(
    tiny_model_dir, mmlu_file, tmp_path
):
    import psutil

    out = tmp_path / "two"
    args = finetune_args(tiny_model_dir, mmlu_file, out, "--max_steps", "300")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
        "--main_process_port", str(free_port()), str(ROOT / "scripts" / "finetune.py"), *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    deadline = time.time() + 240
    while train_steps_logged(out) < 3 and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert launcher.poll() is None, launcher.communicate()
    workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)]
    rank1 = next(p for p in workers if p.environ().get("RANK") == "1")
    rank1.send_signal(signal.SIGTERM)  # rank 0 never gets the signal: it must learn it
    _, err = launcher.communicate(timeout=240)

    # the launcher reports a worker that exited 143 as failed, which is what requeueing needs
    assert launcher.returncode != 0
    assert f"exitcode  : {EXIT_STATUS}" in err or f"exit code {EXIT_STATUS}" in err, err[-3000:]
    state = json.loads((out / "resume" / "trainer_state.json").read_text())
    assert 3 <= state["step"] < 300
    assert f"stopped by SIGTERM after step {state['step']} of 300;" in err
    assert {p.name for p in (out / "resume").glob("rng_rank*.pt")} == {
        "rng_rank0.pt",
        "rng_rank1.pt",
    }
    assert not (out / LOCK_FILE).exists() and not (out / "result.json").exists()


def test_a_half_written_metrics_line_does_not_block_the_resume(
    uninterrupted, tiny_model_dir, mmlu_file, tmp_path, monkeypatch, capsys, caplog
):
    out = tmp_path / "run"
    step = finetune.train_step

    def killed_at_step_25(*args, **kwargs):
        if args[7] == 25:
            raise KeyboardInterrupt("killed")
        return step(*args, **kwargs)

    monkeypatch.setattr(finetune, "train_step", killed_at_step_25)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(finetune_args(tiny_model_dir, mmlu_file, out, "--save_state_every", "10"))
    monkeypatch.setattr(finetune, "train_step", step)
    # what a kill in the middle of a write leaves: half a record, no newline
    with open(out / METRICS_FILE, "a") as handle:
        handle.write('{"step": 25, "train/lo')

    capsys.readouterr()
    finetune.main(finetune_args(tiny_model_dir, mmlu_file, out, "--save_state_every", "10"))
    assert "resumed at step 20" in capsys.readouterr().out
    assert "Dropped the half-written last line" in caplog.text
    assert_same_adapter(uninterrupted, out)
    assert computed_metrics(out) == computed_metrics(uninterrupted)
    assert (out / METRICS_FILE).read_text().endswith("\n")


def test_read_metrics_drops_only_a_partial_last_line(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a"')
    assert read_metrics(tmp_path) == [{"step": 1, "a": 1.0}]
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "a": 1.0}\n{"ste\n{"step": 3}\n')
    with pytest.raises(TrainingError, match="Line 2 of .* is not a JSON record"):
        read_metrics(tmp_path)


def test_stop_at_step_records_the_signal_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with StopAtStep() as stop:
        assert not stop.agreed()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # Python runs the handler between bytecodes of the main thread
        assert stop.requested and stop.agreed()
    assert signal.getsignal(signal.SIGTERM) is before


def test_exit_on_sigterm_exits_143_and_releases_the_lock(tmp_path, capfd):
    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGTERM)
    lock = RunLock(out, "kernel").acquire()
    (out / "kept.txt").write_text("finished work")
    with pytest.raises(SystemExit) as exit_info, exit_on_sigterm("the finished things"):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # interrupted by the signal
    assert exit_info.value.code == EXIT_STATUS == 143
    assert signal.getsignal(signal.SIGTERM) is before
    assert not (out / LOCK_FILE).exists() and lock._fd is None
    assert (out / "kept.txt").read_text() == "finished work"
    assert capfd.readouterr().err == (
        "stopped by SIGTERM; the finished things are kept: run the same command to continue.\n"
    )


def test_sigterm_ends_an_extraction_cleanly_and_it_resumes(tiny_model_dir, mmlu_file, tmp_path):
    out = tmp_path / "extract"
    args = [
        sys.executable, str(ROOT / "scripts" / "extract_repr.py"), "--model", str(tiny_model_dir),
        "--dataset_path", str(mmlu_file), "--output_dir", str(out), "--num_shots", "1",
        "--batch_size", "1", "--chunk_size", "2", "--points", "[norm1,final_norm]",
        "--progress", "false",
    ]  # fmt: skip
    run = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while (
        not list((out / ".parts").glob("chunk_*.safetensors"))
        and run.poll() is None
        and time.time() < deadline
    ):
        time.sleep(0.01)
    assert run.poll() is None, run.communicate()
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == EXIT_STATUS, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"stopped by SIGTERM; the finished chunks in {out / '.parts'} are kept: run the same "
        "command to continue."
    )
    kept = sorted((out / ".parts").glob("chunk_*.safetensors"))
    assert kept and not (out / "manifest.json").exists() and not (out / LOCK_FILE).exists()
    first = load_file(kept[0])  # chunk 0: rows 0 and 1
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n_examples"] > 2 * len(kept)  # the rerun did the rest
    for layer in manifest["layers"]:
        merged = load_file(out / layer["file"])["repr"]
        assert merged.shape[0] == manifest["n_examples"]
        assert torch.equal(merged[:2], first[f"{layer['point']}/{layer['label']}"])


# ---------------------------------------------------------------------------------------------
# Kernels are reused only for the same data and weights


def kernel_args(model_dir, data_dir, out, *extra: str) -> list[str]:
    return [
        "--model", str(model_dir), "--task", "sst-2", "--task_dir", str(data_dir),
        "--shots", "8", "--seeds", "[42]", "--output_dir", str(out), "--dtype", "float64",
        "--solvers", "[lstsq]", "--regularization", "[0.0]", "--progress", "false", *extra,
    ]  # fmt: skip


def flip_train_labels(data_dir) -> list[int]:
    """Swap labels 0 and 1 in the train split file; returns the new labels in file order."""
    path = data_dir / "k-shot" / "SST-2" / "8-42" / "train.tsv"
    header, *rows = path.read_text().splitlines()
    flipped = [row.rsplit("\t", 1) for row in rows]
    path.write_text("\n".join([header, *(f"{t}\t{1 - int(y)}" for t, y in flipped)]) + "\n")
    return [1 - int(y) for _, y in flipped]


def refused(argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        compute_kernel.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    return err


def test_kernels_are_not_reused_after_the_training_labels_flip(
    tiny_model_dir, sst2_dir, tmp_path, capsys
):
    data = tmp_path / "data"
    shutil.copytree(sst2_dir, data)
    out = tmp_path / "kernels"
    compute_kernel.main(kernel_args(tiny_model_dir, data, out))
    first = json.loads((out / "result.json").read_text())
    old_kernel, old_targets = torch.load(out / "8-42" / "train_kernels_SST-2.pt")
    saved = out / "second"
    shutil.copytree(out / "8-42", saved)

    flipped = flip_train_labels(data)
    assert flipped == [1 - y for y in old_targets.tolist()]
    err = refused(kernel_args(tiny_model_dir, data, out), capsys)
    assert "changed: data (the sha256 of the task's split files); pass overwrite" in err
    # re-solving the old kernels against the new files would train on the old labels
    err = refused(
        kernel_args(tiny_model_dir, data, tmp_path / "re", "--load_kernels", str(saved)), capsys
    )
    assert f"load_kernels={saved} holds kernels made from other inputs" in err

    compute_kernel.main(kernel_args(tiny_model_dir, data, out, "--overwrite_kernels", "true"))
    kernel, targets = torch.load(out / "8-42" / "train_kernels_SST-2.pt")
    assert targets.tolist() == flipped
    torch.testing.assert_close(kernel, old_kernel, rtol=1e-12, atol=0)  # f(x) ignores labels
    manifest = json.loads((out / "8-42" / "manifest.json").read_text())
    old_manifest = json.loads((saved / "manifest.json").read_text())
    sha = {m["identity"]["data"]["sha256"]["train.tsv"] for m in (manifest, old_manifest)}
    assert len(sha) == 2
    # flipped training labels flip every two-class least-squares prediction on test
    again = json.loads((out / "result.json").read_text())
    before = first["by_solver"]["lstsq"]["test_mean"]
    assert again["by_solver"]["lstsq"]["test_mean"] == pytest.approx(100 - before)


def test_kernels_are_not_reused_after_the_weights_change(
    tiny_model_dir, sst2_dir, tmp_path, capsys
):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    out = tmp_path / "kernels"
    compute_kernel.main(kernel_args(model, sst2_dir, out))
    old_kernel, _ = torch.load(out / "8-42" / "train_kernels_SST-2.pt")
    weights = model / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, weights, metadata={"format": "pt"})

    err = refused(kernel_args(model, sst2_dir, out), capsys)
    assert "changed: weights (the sha256 of the model's weights);" in err
    err = refused(kernel_args(model, sst2_dir, tmp_path / "re", "--load_kernels", str(out)), capsys)
    assert "holds kernels made from other inputs" in err
    compute_kernel.main(kernel_args(model, sst2_dir, out, "--overwrite_kernels", "true"))
    kernel, _ = torch.load(out / "8-42" / "train_kernels_SST-2.pt")
    assert not torch.allclose(kernel, old_kernel)
    # the re-solve of these kernels, naming the model they come from, is accepted
    compute_kernel.main(kernel_args(model, sst2_dir, tmp_path / "re", "--load_kernels", str(out)))
    assert (tmp_path / "re" / "result.json").is_file()


def test_sigterm_keeps_the_finished_kernel_splits_and_the_rerun_computes_the_rest(
    tiny_model_dir, sst2_dir, tmp_path, monkeypatch, capfd
):
    whole, out = tmp_path / "whole", tmp_path / "stopped"
    compute_kernel.main(kernel_args(tiny_model_dir, sst2_dir, whole))
    compute = compute_kernel.ntk.compute_kernel
    calls = []

    def terminated_on_the_dev_split(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # train is saved; SIGTERM arrives while dev is computed
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        return compute(*args, **kwargs)

    monkeypatch.setattr(compute_kernel.ntk, "compute_kernel", terminated_on_the_dev_split)
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        compute_kernel.main(kernel_args(tiny_model_dir, sst2_dir, out))
    assert exit_info.value.code == EXIT_STATUS
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"stopped by SIGTERM; the finished kernels in {out} are kept: run the same command to "
        "continue."
    )
    folder = out / "8-42"
    assert json.loads((folder / "manifest.json").read_text())["splits"] == ["train"]
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "train_kernels_SST-2.pt"]
    assert not (out / LOCK_FILE).exists()
    kept = (folder / "train_kernels_SST-2.pt").stat().st_mtime_ns

    monkeypatch.setattr(compute_kernel.ntk, "compute_kernel", compute)
    calls.clear()
    compute_kernel.main(kernel_args(tiny_model_dir, sst2_dir, out))
    assert (folder / "train_kernels_SST-2.pt").stat().st_mtime_ns == kept  # not recomputed
    assert json.loads((folder / "manifest.json").read_text())["splits"] == ["train", "dev", "test"]
    for split in ("train", "dev", "test"):
        expected = torch.load(whole / "8-42" / f"{split}_kernels_SST-2.pt")
        got = torch.load(folder / f"{split}_kernels_SST-2.pt")
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)), split
    assert (
        json.loads((out / "result.json").read_text())["summary"]
        == json.loads((whole / "result.json").read_text())["summary"]
    )
