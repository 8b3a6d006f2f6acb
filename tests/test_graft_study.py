"""scripts/graft_study.py end to end on a tiny BERT and two synthetic binary tasks."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from adaptlab.graft import load_mask
from adaptlab.graft.analysis import mask_overlap
from tests.conftest import _WORDS, ROOT, load_script

study = load_script("graft_study")

FINETUNE = """\
method: full
fix_head: true
fix_embeddings: true
shots: 8
data_seed: 42
optimizer: sgd
lr: 0.5
schedule: constant
batch_size: 4
micro_batch_size: 4
max_steps: 8
eval_points: 2
checkpoints: 0
save_init: false
save_epochs: false
report_to: none
"""
GRAFT = """\
sparsity: 0.01
mask_steps: 5
batch_size: 4
learning_rate: 1.0e9
"""


def write_cr_kshot(root, k=8, seed=42, n_test=12):
    """A synthetic cr k-shot folder ``root/k-shot/cr/{k}-{seed}`` (headerless label,text CSV)
    whose label rides on other words than the SST-2 fixture's."""
    rng = random.Random(seed + 1)
    folder = root / "k-shot" / "cr" / f"{k}-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    for split, per_label in {"train": k, "dev": k, "test": n_test // 2}.items():
        with open(folder / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            for label, cue in ((0, "none"), (1, "all")):
                for _ in range(per_label):
                    words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 9))]
                    words.insert(rng.randint(0, len(words)), cue)
                    writer.writerow([label, " ".join(words)])
    return root


@pytest.fixture(scope="module")
def study_dir(tiny_bert_dir, sst2_dir, tmp_path_factory):
    write_cr_kshot(sst2_dir)
    presets = tmp_path_factory.mktemp("presets")
    (presets / "finetune.yaml").write_text(FINETUNE)
    (presets / "graft.yaml").write_text(GRAFT)
    out = tmp_path_factory.mktemp("study") / "study"
    argv = [
        "--model", str(tiny_bert_dir), "--task", "sst-2", "--task_dir", str(sst2_dir),
        "--finetune_preset", str(presets / "finetune.yaml"),
        "--graft_preset", str(presets / "graft.yaml"),
        "--sparsities", "[0.05,0.01]", "--ood_tasks", "[cr]", "--overlap_tasks", "[sst-2,cr]",
        "--continual_tasks", "[sst-2,cr]", "--output_dir", str(out),
    ]  # fmt: skip
    study.main(argv)
    return out, argv


def read(path):
    return json.loads(path.read_text())


def test_sweep_records_are_the_graft_runs_results(study_dir):
    out, _ = study_dir
    records = read(out / "sweep.json")
    plain = [(r["kind"], r["sparsity"]) for r in records if r["kind"] != "top_delta_matched"]
    assert plain == [
        ("learned", 0.01), ("top_delta", 0.01), ("learned", 0.05), ("top_delta", 0.05)
    ]  # fmt: skip
    learned = {r["sparsity"]: r for r in records if r["kind"] == "learned"}
    patches = {r["sparsity"]: r for r in records if r["kind"] == "top_delta"}
    matched = [r for r in records if r["kind"] == "top_delta_matched"]
    # the control: a top-|Δ| mask of exactly the learned mask's size, where the mask grew
    assert {r["sparsity"] for r in matched} == {
        s for s in learned if learned[s]["n_grafted"] != patches[s]["n_grafted"]
    }
    assert matched, "the tiny run's learned masks should grow past their patch"
    for r in matched:
        assert r["n_grafted"] == r["k"] == learned[r["sparsity"]]["n_grafted"]
    for r in records:
        result = read(out / r["run"] / "result.json")
        test = {m: result["splits"][m]["test"] for m in ("base", "finetuned", "grafted")}
        if r["kind"] == "top_delta_matched":
            assert result["config"]["mask_steps"] == 0 and result["n_grafted"] == r["n_grafted"]
            continue
        assert result["config"]["sparsity"] == r["sparsity"]
        assert result["config"]["mask_steps"] == (5 if r["kind"] == "learned" else 0)
        assert r["n_grafted"] == result["n_grafted"] == load_mask(out / r["run"] / "mask").n_grafted
        assert r["k"] == int(r["sparsity"] * result["n_eligible"])
        if r["kind"] == "top_delta":  # the patch alone: exactly k entries
            assert r["n_grafted"] == r["k"]
        assert r["fraction_eligible"] == result["n_grafted"] / result["n_eligible"]
        assert (r["accuracy"], r["ece"]) == (test["grafted"]["accuracy"], test["grafted"]["ece"])
        assert r["base"]["accuracy"] == test["base"]["accuracy"]
        assert r["finetuned"]["ece"] == test["finetuned"]["ece"]
        ood = {m: result["splits"][m]["ood:cr"] for m in ("base", "finetuned", "grafted")}
        assert r["ood"]["cr"]["grafted"]["accuracy"] == ood["grafted"]["accuracy"]
        assert r["ood"]["cr"]["base"]["ece"] == ood["base"]["ece"]
        gain = test["finetuned"]["accuracy"] - test["base"]["accuracy"]
        expected = (test["grafted"]["accuracy"] - test["base"]["accuracy"]) / gain if gain else None
        assert r["recovery"]["gain"] == pytest.approx(expected)
        assert r["recovery"]["relative"] == pytest.approx(
            test["grafted"]["accuracy"] / test["finetuned"]["accuracy"]
        )
    # the reference (middle) sparsity's learned graft is the study's result.json
    reference = out / "graft" / "SST-2" / "learned-0.05"
    assert read(out / "result.json") == read(reference / "result.json")
    for name in ("accuracy_vs_size.png", "reliability.png", "overlap.png"):
        assert (out / name).stat().st_size > 0


def test_overlap_is_set_arithmetic_on_the_saved_masks(study_dir):
    out, _ = study_dir
    record = read(out / "overlap.json")
    assert record["setting"] == "multitask"  # one model fine-tuned on both tasks (the paper's)
    assert record["tasks"] == ["SST-2", "cr"]
    assert record["runs"]["SST-2"] == record["runs"]["cr"] == "finetune/SST-2+cr"
    run = read(out / record["runs"]["SST-2"] / "result.json")
    assert run["config"]["task"] == "SST-2+cr"
    sets = {}
    for task in record["tasks"]:
        mask = load_mask(out / record["masks"][task])
        sets[task] = {(n, int(i)) for n, idx in mask.index.items() for i in idx}
    for i, gi in enumerate(record["tasks"]):
        for j, gj in enumerate(record["tasks"]):
            expected = len(sets[gi] & sets[gj]) / len(sets[gj])
            assert record["overlap"][i][j] == pytest.approx(expected)
        assert record["sizes"][gi] == len(sets[gi])
    # one graft per task from the joint run, at the reference sparsity
    assert record["masks"] == {t: f"graft/SST-2+cr/{t}-learned-0.05/mask" for t in ("SST-2", "cr")}
    masks = {t: load_mask(out / record["masks"][t]).index for t in record["tasks"]}
    assert mask_overlap(masks)["overlap"] == record["overlap"]


def test_continual_restores_exactly_a_graft_of_theta_a(study_dir, tiny_bert_dir):
    out, _ = study_dir
    record = read(out / "continual.json")
    assert record["tasks"] == {"A": "SST-2", "B": "cr"}
    ab = read(out / "finetune" / "SST-2-then-cr" / "result.json")
    assert ab["config"]["model"] == str(out / "finetune" / "SST-2" / "best")
    theta_a = load_file(out / "finetune" / "SST-2" / "best" / "model.safetensors")
    theta_ab = load_file(out / "finetune" / "SST-2-then-cr" / "best" / "model.safetensors")
    restored = load_file(out / "continual" / "restored" / "model.safetensors")
    mask = load_mask(out / record["runs"]["graft_A"] / "mask")
    assert set(restored) == set(theta_ab)
    changed = 0
    for name, weights in restored.items():
        flat, ab_flat, a_flat = weights.view(-1), theta_ab[name].view(-1), theta_a[name].view(-1)
        index = mask.index.get(name, torch.empty(0, dtype=torch.long))
        at_mask = torch.zeros(flat.numel(), dtype=torch.bool)
        at_mask[index] = True
        assert torch.equal(flat[~at_mask], ab_flat[~at_mask]), name  # θ_AB off the mask
        assert torch.equal(flat[at_mask], a_flat[at_mask]), name  # θ_A on it
        differs = flat != ab_flat
        assert not (differs & ~at_mask).any()
        changed += int(differs.sum())
    assert changed == record["n_restored_changed"] > 0
    assert record["n_grafted"] == mask.n_grafted
    models = record["models"]
    # θ_A and g_A alone on A are what the fine-tuning and graft runs measured
    graft_a = read(out / record["runs"]["graft_A"] / "result.json")["splits"]
    assert models["A"]["SST-2"]["accuracy"] == pytest.approx(
        graft_a["finetuned"]["test"]["accuracy"]
    )
    assert models["pre+g_A"]["SST-2"]["accuracy"] == pytest.approx(
        graft_a["grafted"]["test"]["accuracy"]
    )
    assert models["pre"]["SST-2"]["accuracy"] == pytest.approx(graft_a["base"]["test"]["accuracy"])
    acc = {m: {t: v["accuracy"] for t, v in s.items()} for m, s in models.items()}
    assert record["forgetting_A"] == acc["A"]["SST-2"] - acc["AB"]["SST-2"]
    assert record["restored_cost_B"] == acc["AB"]["cr"] - acc["AB+g_A"]["cr"]
    report = (out / "report.md").read_text()
    assert "## Continual fine-tuning SST-2 → cr" in report
    assert f"| θ_AB | {acc['AB']['SST-2']:.3f} |" in report
    assert "## Mask overlap |g_i ∩ g_j| / |g_j| (multitask fine-tuning, sparsity 0.05)" in report
    assert "| learned | 0.01 |" in report and "| top_delta | 0.05 |" in report


def test_a_finished_study_reuses_its_runs(study_dir, capsys):
    out, argv = study_dir
    before = {p: p.stat().st_mtime_ns for p in out.glob("graft/*/*/result.json")}
    study.main(argv)
    printed = capsys.readouterr().out
    # 4 sweep grafts and their matched controls, 2 overlap masks from the joint run, 1
    # continual g_A (the sweep's)
    matched = sum(r["kind"] == "top_delta_matched" for r in read(out / "sweep.json"))
    reused = printed.count("already holds this graft's results")
    assert reused == 7 + matched and len(before) == 6 + matched
    assert {p: p.stat().st_mtime_ns for p in out.glob("graft/*/*/result.json")} == before


BAD = {
    "unknown task": (["--task", "sst2"], "sst2"),
    "reference not swept": (["--reference_sparsity", "0.02"], "is not one of sparsities"),
    "one overlap task": (["--overlap_tasks", "[cr]"], "two or more different tasks"),
    "continual task twice": (["--continual_tasks", "[cr,cr]"], "two different tasks"),
    "graft preset that learns nothing": (["--graft_preset", "{no_steps}"], "mask_steps=0"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_study_input_fails_in_one_line(case, study_dir, tmp_path, capsys):
    _, argv = study_dir
    flags, message = BAD[case]
    (tmp_path / "no_steps.yaml").write_text("mask_steps: 0\n")
    flags = [f.format(no_steps=tmp_path / "no_steps.yaml") for f in flags]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        study.main([*argv[:-1], str(out), *flags])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert exit_info.value.code == 2
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists()


def test_plot_graft_notebook_reads_the_study_folder(study_dir, tmp_path):
    out, _ = study_dir
    env = {**os.environ, "MPLBACKEND": "Agg", "ADAPTLAB_GRAFT": str(out),
           "ADAPTLAB_FIGURES": str(tmp_path)}  # fmt: skip
    run = subprocess.run([sys.executable, str(ROOT / "notebook" / "plot_graft.py")],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    continual = read(out / "continual.json")
    ab = continual["models"]["AB"]
    assert f"AB       {ab['SST-2']['accuracy']:>12.4f} {ab['cr']['accuracy']:>12.4f}" in run.stdout
    for figure in ("accuracy_vs_size", "reliability", "overlap"):
        assert (tmp_path / f"{figure}.png").stat().st_size > 0


def test_separate_runs_overlap(study_dir, tmp_path):
    """multitask=separate: one run per task, one graft each (the sweep's folder names)."""
    _, argv = study_dir
    source = argv[argv.index("--output_dir") + 1]
    out = tmp_path / "separate"
    args = [a if a != source else str(out) for a in argv]
    study.main([*args, "--experiments", "[overlap]", "--multitask", "separate"])
    record = read(out / "overlap.json")
    assert record["setting"] == "separate"
    assert record["runs"] == {"SST-2": "finetune/SST-2", "cr": "finetune/cr"}
    assert record["masks"] == {t: f"graft/{t}/learned-0.05/mask" for t in ("SST-2", "cr")}
    masks = {t: load_mask(out / record["masks"][t]).index for t in record["tasks"]}
    assert mask_overlap(masks)["overlap"] == record["overlap"]
