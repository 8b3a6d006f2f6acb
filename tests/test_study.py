"""scripts/study.py end to end on a tiny Llama and the synthetic SST-2 split: the numbers of
study.json equal those in each stage's own output files, and the stage cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import load_script

study = load_script("study")
FINETUNE = """\
optimizer: adamw
lr: 1.0e-2
schedule: constant
batch_size: 4
micro_batch_size: 4
max_steps: 4
eval_points: 2
checkpoints: 0
save_init: false
save_epochs: false
report_to: none
"""
GRAFT = """\
sparsity: 0.01
mask_steps: 2
batch_size: 4
learning_rate: 1.0e9
"""
EXTRACT = """\
points: [norm1]
batch_size: 8
"""
ANALYZE = """\
point: norm1
skip_layers: [0]           # the last token is the same word in every prompt
include_final: false
metrics:
  maxk: 20
  gride_range_max: 16
  id_scale: 4
  density_k: 4
  overlap_k: 5
  probe: false
"""
KERNEL = """\
row_batch_size: 3
col_batch_size: 5
dtype: float64
solvers: [lstsq, logistic]
regularization: [0.0, 0.01]
"""


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("presets")
    texts = {"finetune": FINETUNE, "graft": GRAFT, "kernel": KERNEL, "extract": EXTRACT}
    for name, text in {**texts, "analyze": ANALYZE}.items():
        (folder / f"{name}.yaml").write_text(text)
    return folder


@pytest.fixture(scope="module")
def data(sst2_dir, mmlu_file):
    return sst2_dir, mmlu_file


def study_args(model, data, presets, out, *extra):
    kshot, mmlu = data
    return [
        "--model", str(model), "--task", "sst-2", "--task_dir", str(kshot), "--shots", "8",
        "--seeds", "[42]", "--test_limit", "null", "--methods", "[lora,graft]",
        "--finetune_preset", str(presets / "finetune.yaml"),
        "--graft_preset", str(presets / "graft.yaml"),
        "--kernel_preset", str(presets / "kernel.yaml"),
        "--extract_preset", str(presets / "extract.yaml"),
        "--analyze_preset", str(presets / "analyze.yaml"), "--mmlu_path", str(mmlu),
        "--method_flags", '{"lora": ["--lr", "5e-3"]}', "--output_dir", str(out), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finished(tiny_model_dir, data, presets, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "study"
    study.main(study_args(tiny_model_dir, data, presets, out))
    return out


def read_jsonl(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return np.array([r["label"] for r in rows]), np.array([r["logits"] for r in rows])


def test_numbers_are_the_stages_own(finished):
    record = json.loads((finished / "study.json").read_text())
    assert list(record["methods"]) == ["full", "lora", "graft"]  # graft needs the full run
    for method in ("full", "lora"):
        result = json.loads((finished / f"stages/finetune/{method}/seed42/result.json").read_text())
        test = result["metrics"]["test_at_best"]
        got = record["methods"][method]
        for key in ("accuracy", "macro_f1", "ece"):
            assert got[key]["values"]["42"] == test[key]
        assert got["trainable_parameters"]["mean"] == result["method"]["trainable_parameters"]
        assert got["train_seconds"]["mean"] == result["timings"]["train_seconds"]
    graft = json.loads((finished / "stages/graft/graft/seed42/result.json").read_text())
    assert (
        record["methods"]["graft"]["accuracy"]["mean"]
        == graft["splits"]["grafted"]["test"]["accuracy"]
    )
    assert record["methods"]["graft"]["trainable_parameters"]["mean"] == graft["n_grafted"]
    sweep = json.loads((finished / "stages/kernel/sweep.json").read_text())
    for solver, entry in record["kernel"].items():
        best = sweep["by_solver"][solver]["best"][0]
        assert entry["accuracy"]["mean"] == best["test"]["accuracy"]
        # agreement with LoRA, recomputed from the two prediction files
        labels, kernel_logits = read_jsonl(finished / "stages/kernel" / best["predictions"])
        lora = json.loads((finished / "stages/finetune/lora/seed42/result.json").read_text())
        path = (
            finished
            / "stages/finetune/lora/seed42"
            / lora["metrics"]["test_at_best"]["predictions"]
        )
        lora_labels, lora_logits = read_jsonl(path)
        assert (labels == lora_labels).all()
        same = np.mean(kernel_logits.argmax(1) == lora_logits.argmax(1))
        assert entry["agreement"]["lora"]["identical"]["mean"] == pytest.approx(same)

    # the base task: MMLU accuracy of each run's extraction, and the analysis' layer metrics
    def mmlu(name):
        manifest = json.loads((finished / f"stages/extract/{name}/manifest.json").read_text())
        return manifest["accuracy"]["constrained_micro"]

    assert record["base_task"]["pretrained"] == mmlu("pretrained")
    for method in ("full", "lora", "graft"):
        got = record["methods"][method]
        assert got["base_accuracy"]["mean"] == mmlu(f"{method}-seed42")
        assert got["forgetting"]["mean"] == pytest.approx(
            mmlu("pretrained") - mmlu(f"{method}-seed42")
        )
    rows = json.loads((finished / "stages/analysis/metrics.json").read_text())
    lora_rows = {r["layer"]: r for r in rows if r["run"] == "lora-seed42"}
    layers = record["layers"]["lora"]
    assert set(layers["id"]) == {str(layer) for layer in lora_rows}
    for layer, row in lora_rows.items():
        assert layers["id"][str(layer)]["mean"] == row["id_gride"]
        assert layers["ari"][str(layer)]["mean"] == row["ari_subjects"]
        assert layers["overlap"][str(layer)]["mean"] == row["overlap_reference"]
    report = (finished / "report.md").read_text()
    assert "| lora |" in report and "Stage times" in report
    for figure in ("reliability", "spread", "layers_id", "layers_ari", "layers_overlap"):
        assert (finished / "figures" / f"{figure}.png").stat().st_size > 0


def test_rerun_skips_finished_stages_and_refuses_or_reruns_a_changed_one(
    finished, tiny_model_dir, data, presets, monkeypatch
):
    calls = []
    real = study.run_recipe
    monkeypatch.setattr(study, "run_recipe", lambda name, argv: calls.append((name, argv)))
    study.main(study_args(tiny_model_dir, data, presets, finished))
    assert calls == []  # everything cached
    changed = ["--method_flags", '{"lora": ["--lr", "2e-3"]}']
    with pytest.raises(SystemExit):
        study.main(study_args(tiny_model_dir, data, presets, finished, *changed))
    before = json.loads((finished / "study.json").read_text())
    monkeypatch.setattr(
        study, "run_recipe", lambda name, argv: (calls.append(name), real(name, argv))
    )
    study.main(
        study_args(tiny_model_dir, data, presets, finished, *changed, "--rerun_changed", "true")
    )
    # the LoRA run again, and what reads it: its MMLU extraction and the analysis
    assert calls == ["finetune", "extract_repr", "analyze_repr"]
    after = json.loads((finished / "study.json").read_text())
    assert after["methods"]["full"] == before["methods"]["full"]
    record = json.loads((finished / "records/finetune/lora/seed42.json").read_text())
    assert record["config"]["lr"] == 2e-3


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "[lora,lorax]"], "Unknown study method 'lorax'; choose from full, lora"),
        (["--method_flags", '{"inductor": ["--lr", "1"]}'], "names 'inductor', which is no study"),
        (["--task", "sts-b"], "task=sts-b is a regression task"),
        (
            ["--method_flags", '{"lora": ["--target_modules", "[w_nowhere]"]}'],
            "The study method lora cannot run on",
        ),
    ],
    ids=["unknown-method", "stray-flags", "regression-task", "unsupported-method"],
)
def test_bad_inputs_stop_before_any_stage(
    extra, message, tiny_model_dir, data, presets, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(study, "run_recipe", lambda name, argv: pytest.fail("a stage ran"))
    out = tmp_path / "study"
    with pytest.raises(SystemExit):
        study.main(study_args(tiny_model_dir, data, presets, out, *extra))
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_slurm_script_submits_the_stages_in_dependency_order(
    tiny_model_dir, data, presets, tmp_path
):
    """slurm/submit_study: a fine-tuning array, the kernel, the grafts after the fine-tuning
    and the report after all; a stage job runs the study on its one stage."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "calls.txt"
    (fake / "sbatch").write_text(
        f'#!/bin/sh\necho "sbatch $*" >> {calls}\necho $(wc -l < {calls})\n'
    )
    (fake / "srun").write_text(f'#!/bin/sh\necho "srun $*" >> {calls}\n')
    for tool in fake.iterdir():
        tool.chmod(0o755)
    preset = tmp_path / "study.yaml"
    args = study_args(tiny_model_dir, data, presets, tmp_path / "out")
    lines = [f"{args[i][2:]}: {args[i + 1]}" for i in range(0, len(args), 2)]
    preset.write_text("\n".join(lines) + "\n")
    env = {
        **os.environ,
        "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}",
        "ADAPTLAB_PYTHON": sys.executable,
        "SLURM_SUBMIT_DIR": str(ROOT),
    }
    script = str(ROOT / "slurm" / "submit_study")
    done = subprocess.run(["bash", script, str(preset)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    submitted = calls.read_text().splitlines()
    expected = [  # (array, dependency, phase) of each sbatch call, in order
        ("--array=0-1 ", None, "finetune/"),
        ("--array=0-0 ", None, "kernel"),
        ("--array=0-0 ", "--dependency=afterok:1 ", "graft/"),
        ("--array=0-3 ", "--dependency=afterok:1:3 ", "extract/"),  # pretrained + 3 runs
        ("--array=0-0 ", "--dependency=afterok:4 ", "analysis"),
        ("", "--dependency=afterok:1:2:3:4:5 ", "report"),
    ]
    assert len(submitted) == len(expected)
    for call, (array, dependency, phase) in zip(submitted, expected, strict=True):
        assert array in call and f"STUDY_PHASE={phase} " in call
        if dependency:
            assert dependency in call
        else:
            assert "--dependency" not in call
    calls.unlink()
    job = {**env, "STUDY_PHASE": "finetune/", "SLURM_ARRAY_TASK_ID": "1", "SLURM_JOB_ID": "7"}
    done = subprocess.run(["bash", script, str(preset)], env=job, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (line,) = calls.read_text().splitlines()
    assert line.endswith(f"scripts/study.py --config {preset} --only [finetune/lora/seed42]")
