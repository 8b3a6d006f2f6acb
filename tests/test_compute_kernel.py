"""scripts/compute_kernel.py on tiny models: saved kernels, re-solving, processes, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from adaptlab.data import collate_prompts, encode_examples, label_word_ids, load_task
from adaptlab.models import load_tokenizer
from adaptlab.ntk import load_kernel
from adaptlab.ntk.compare import compare_kernel_finetune
from tests.conftest import ROOT, free_port, load_script

compute_kernel = load_script("compute_kernel")
finetune = load_script("finetune")


def kernel_args(model_dir, data_dir, out, *extra: str) -> list[str]:
    return [
        "--model", str(model_dir), "--task", "sst-2", "--task_dir", str(data_dir),
        "--shots", "8", "--seeds", "[42]", "--output_dir", str(out),
        "--row_batch_size", "3", "--col_batch_size", "5", "--dtype", "float64",
        "--solvers", "[lstsq,logistic]", "--regularization", "[0.0,0.01]",
        "--progress", "false", *extra,
    ]  # fmt: skip


def loop_jacobians(model_dir, data_dir, split: str, kind: str = "causal") -> torch.Tensor:
    """[M, C, P] per-example Jacobians of the label-word logits, one backward pass each."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    tokenizer = load_tokenizer(str(model_dir))
    splits = load_task("sst-2", data_dir, k=8, seed=42)
    ids = label_word_ids(splits.task, tokenizer)
    examples = encode_examples(getattr(splits, split), splits.task, tokenizer, kind=kind)
    params = [p for p in model.parameters()]
    rows = []
    for ex in examples:
        batch = collate_prompts([ex], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"]).logits[0, ex["position"], ids]
        per_class = []
        for c in range(len(ids)):
            grads = torch.autograd.grad(logits[c], params, retain_graph=True)
            per_class.append(torch.cat([g.flatten() for g in grads]))
        rows.append(torch.stack(per_class))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def kernel_run(tiny_model_dir, sst2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("kernel") / "run"
    compute_kernel.main(kernel_args(tiny_model_dir, sst2_dir, out))
    return out


def test_saved_kernels_equal_a_loop_of_backward_passes(kernel_run, tiny_model_dir, sst2_dir):
    folder = kernel_run / "8-42"
    train = loop_jacobians(tiny_model_dir, sst2_dir, "train")
    for split, n in (("train", 16), ("dev", 16), ("test", 12)):
        kernel, targets = torch.load(folder / f"{split}_kernels_SST-2.pt", weights_only=True)
        assert kernel.shape == (16, 2, n, 2) and kernel.dtype == torch.float64
        other = train if split == "train" else loop_jacobians(tiny_model_dir, sst2_dir, split)
        expected = torch.einsum("icp,jdp->icjd", train, other)
        torch.testing.assert_close(kernel, expected, rtol=1e-8, atol=1e-10)
        labels = load_task("sst-2", sst2_dir, k=8, seed=42)
        gold = [int(ex.label) for ex in getattr(labels, split)]
        assert targets.dtype == torch.long and targets.tolist() == gold
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["grad_dim"] == train.shape[-1]
    assert manifest["rows_per_rank"] == [[0, 16]]


def test_sweep_and_result_records(kernel_run):
    sweep = json.loads((kernel_run / "sweep.json").read_text())
    result = json.loads((kernel_run / "result.json").read_text())
    assert len(sweep["points"]) == 4 and len(sweep["trials"]) == 4  # 2 solvers x 2 ridges
    for name in ("lstsq", "logistic"):
        trials = [t for t in sweep["trials"] if t["settings"]["solver"] == name]
        best = max(trials, key=lambda t: t["dev"]["accuracy"])  # first of ties
        assert sweep["by_solver"][name]["test_mean"] == pytest.approx(
            100 * best["test"]["accuracy"]
        )
        assert result["by_solver"][name]["n_seeds"] == 1


def test_rerun_reuses_and_load_kernels_resolves(kernel_run, tiny_model_dir, sst2_dir, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in (kernel_run / "8-42").iterdir()}
    compute_kernel.main(kernel_args(tiny_model_dir, sst2_dir, kernel_run))
    after = {p.name: p.stat().st_mtime_ns for p in (kernel_run / "8-42").iterdir()}
    assert before == after  # nothing recomputed
    out = tmp_path / "resolved"
    compute_kernel.main(kernel_args("no/such/model", sst2_dir, out, "--load_kernels",
                                    str(kernel_run)))  # fmt: skip
    first = json.loads((kernel_run / "sweep.json").read_text())["trials"]
    again = json.loads((out / "sweep.json").read_text())["trials"]
    assert [t["test"]["accuracy"] for t in first] == [t["test"]["accuracy"] for t in again]


def test_binary_asymmetric_kernels_have_the_upstream_layout(tiny_model_dir, sst2_dir, tmp_path):
    out = tmp_path / "asym"
    compute_kernel.main(kernel_args(
        tiny_model_dir, sst2_dir, out, "--binary", "true", "--formula", "asymmetric_signgd",
        "--solvers", "[asym,lstsq]", "--gamma", "[1.0]", "--lam", "[0.5,1.0]",
    ))  # fmt: skip
    kernel, targets = load_kernel(out / "8-42" / "train_kernels_SST-2.pt")
    assert kernel.shape == (2, 16, 1, 16, 1)
    assert targets.dtype == torch.float64 and set(targets.tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(kernel[1], kernel[0].permute(2, 3, 0, 1))
    jac = loop_jacobians(tiny_model_dir, sst2_dir, "train")
    diff = jac[:, 1] - jac[:, 0]  # f = l1 - l0
    expected = torch.einsum("ip,jp->ij", diff.sign(), diff)
    # sign() of entries within rounding of 0 may differ between the two computations
    scale = float(expected.abs().max())
    torch.testing.assert_close(kernel[0, :, 0, :, 0], expected, rtol=1e-7, atol=1e-7 * scale)
    test_kernel, _ = load_kernel(out / "8-42" / "test_kernels_SST-2.pt")
    assert test_kernel.shape == (2, 16, 1, 12, 1)
    # one scalar f per example, written as the two logits [-f, f] its accuracy counts
    gold = [int(ex.label) for ex in load_task("sst-2", sst2_dir, k=8, seed=42).test]
    for logits in check_best_predictions(out, ("asym", "lstsq"), gold).values():
        np.testing.assert_array_equal(logits[:, 0], -logits[:, 1])


@pytest.mark.multiprocess
def test_two_processes_split_rows_and_equal_one(kernel_run, tiny_model_dir, sst2_dir, tmp_path):
    out = tmp_path / "two"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
        "--main_process_port", str(free_port()),
        str(ROOT / "scripts" / "compute_kernel.py"),
        *kernel_args(tiny_model_dir, sst2_dir, out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "8-42" / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["rows_per_rank"] == [[0, 8], [8, 16]]
    for split in ("train", "dev", "test"):
        one, _ = load_kernel(kernel_run / "8-42" / f"{split}_kernels_SST-2.pt")
        two, _ = load_kernel(out / "8-42" / f"{split}_kernels_SST-2.pt")
        torch.testing.assert_close(two, one, rtol=1e-10, atol=1e-12)


def test_comparison_with_fine_tuning(kernel_run, tiny_model_dir, sst2_dir, tmp_path):
    ft = tmp_path / "ft"
    finetune.main([
        "--model", str(tiny_model_dir), "--task", "sst-2", "--task_dir", str(sst2_dir),
        "--shots", "8", "--data_seed", "42", "--output_dir", str(ft), "--method", "full",
        "--optimizer", "sgd", "--lr", "0.1", "--batch_size", "4", "--max_steps", "2",
        "--eval_points", "1", "--checkpoints", "0", "--save_init", "false",
        "--report_to", "none", "--progress", "false",
    ])  # fmt: skip
    record = compare_kernel_finetune(kernel_run, {42: ft})
    tuned = json.loads((ft / "result.json").read_text())["metrics"]["test_at_best"]["accuracy"]
    sweep = json.loads((kernel_run / "sweep.json").read_text())
    assert record["finetune"]["seeds"]["42"] == pytest.approx(100 * tuned)
    assert record["kernel"]["lstsq"]["mean"] == pytest.approx(
        sweep["by_solver"]["lstsq"]["test_mean"]
    )
    path = tmp_path / "comparison.json"
    path.write_text(json.dumps(record))
    env = {**os.environ, "ADAPTLAB_COMPARISON": str(path), "MPLBACKEND": "Agg"}
    run = subprocess.run([sys.executable, str(ROOT / "notebook" / "plot_kernel.py")],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"fine-tuning: {100 * tuned:.1f} (0.0)" in run.stdout
    assert (tmp_path / "figures" / "kernel_vs_finetune.png").stat().st_size > 5_000


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--formula", "ntk"], "Unknown formula 'ntk'"),
        (["--solvers", "[asym]"], "need binary=true"),
        (["--binary", "true", "--solvers", "[asym]"], "needs the asymmetric_signgd formula"),
        (["--label_words", "{'0': terrible, '1': great good}"], "great good"),
        (["--task", "sst-3"], "Unknown task 'sst-3'"),
        (["--f0_scaling", "[10.0]"], "set adjust_for_init=true"),
    ],
    ids=["formula", "asym-binary", "asym-formula", "multi-token", "task", "f0"],
)
def test_bad_input_fails_in_one_line(flags, message, tiny_model_dir, sst2_dir, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        compute_kernel.main(kernel_args(tiny_model_dir, sst2_dir, out, *flags))
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert exit_info.value.code == 2
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists()


def test_masked_template_without_mask_and_bad_kernel_file(
    tiny_bert_dir, sst2_dir, kernel_run, tmp_path, capsys
):
    with pytest.raises(SystemExit):
        compute_kernel.main(kernel_args(tiny_bert_dir, sst2_dir, tmp_path / "a", "--template",
                                        "*cls**sent_0*_It_was.*sep+*"))  # fmt: skip
    assert "mask" in capsys.readouterr().err
    broken = tmp_path / "broken" / "8-42"
    broken.mkdir(parents=True)
    for path in (kernel_run / "8-42").glob("*.pt"):
        (broken / path.name).write_bytes(path.read_bytes())
    kernel, targets = torch.load(broken / "dev_kernels_SST-2.pt", weights_only=True)
    torch.save((kernel[:, :, :5], targets), broken / "dev_kernels_SST-2.pt")
    with pytest.raises(SystemExit):
        compute_kernel.main(kernel_args("none", sst2_dir, tmp_path / "b", "--load_kernels",
                                        str(broken.parent)))  # fmt: skip
    err = capsys.readouterr().err
    assert "error:" in err and "dev_kernels_SST-2.pt" in err


def test_projected_kernel_approaches_the_exact_one(kernel_run, tiny_model_dir, sst2_dir, tmp_path):
    exact, _ = load_kernel(kernel_run / "8-42" / "train_kernels_SST-2.pt")
    errors = []
    for dim in (32, 1024):
        out = tmp_path / f"d{dim}"
        compute_kernel.main(kernel_args(tiny_model_dir, sst2_dir, out, "--projection_dim",
                                        str(dim), "--solvers", "[lstsq]"))  # fmt: skip
        projected, _ = load_kernel(out / "8-42" / "train_kernels_SST-2.pt")
        assert projected.shape == exact.shape
        errors.append(float((projected - exact).norm() / exact.norm()))
    assert errors[1] < 0.5 * errors[0] and errors[1] < 0.3, errors  # error ~ 1/sqrt(d)


def check_best_predictions(run, solvers, gold) -> dict[str, np.ndarray]:
    """Each solver's best-dev test file: one record per test example in order, whose
    predictions give the test accuracy sweep.json reports. Returns the files' logits."""
    sweep = json.loads((run / "sweep.json").read_text())
    logits = {}
    for name in solvers:
        (best,) = sweep["by_solver"][name]["best"]  # one seed
        assert best["predictions"] == f"predictions/{name}_seed42.jsonl"
        records = [json.loads(line) for line in (run / best["predictions"]).open()]
        assert [r["index"] for r in records] == list(range(len(gold)))
        assert [r["label"] for r in records] == gold
        logits[name] = np.array([r["logits"] for r in records])
        predictions = np.array([r["prediction"] for r in records])
        assert logits[name].shape == (len(gold), 2)
        assert (logits[name].argmax(1) == predictions).all()
        accuracy = float((predictions == np.array(gold)).mean())
        assert best["test"]["accuracy"] == accuracy
        assert sweep["by_solver"][name]["test_mean"] == pytest.approx(100 * accuracy)
    return logits


def test_best_settings_write_their_test_predictions(kernel_run, sst2_dir):
    gold = [int(ex.label) for ex in load_task("sst-2", sst2_dir, k=8, seed=42).test]
    logits = check_best_predictions(kernel_run, ("lstsq", "logistic"), gold)
    # lstsq by hand on the saved kernels: α = (K + r σ_max I)⁺ Y, test logits K_testᵀ α
    sweep = json.loads((kernel_run / "sweep.json").read_text())
    ridge = sweep["by_solver"]["lstsq"]["best"][0]["settings"]["regularization"]
    train, targets = torch.load(kernel_run / "8-42" / "train_kernels_SST-2.pt", weights_only=True)
    test, _ = torch.load(kernel_run / "8-42" / "test_kernels_SST-2.pt", weights_only=True)
    k = train.reshape(32, 32).numpy()
    k_reg = k + ridge * np.linalg.svd(k, compute_uv=False)[0] * np.eye(32)
    alpha = np.linalg.lstsq(k_reg, np.eye(2)[targets.numpy()].reshape(-1), rcond=None)[0]
    expected = (test.reshape(32, 24).numpy().T @ alpha).reshape(12, 2)
    np.testing.assert_allclose(logits["lstsq"], expected, rtol=1e-6, atol=1e-8)
