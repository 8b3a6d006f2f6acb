"""The ViLoRA study's statistics against independent computations (the statistics module,
scipy, hand-counted sets), its report from synthetic run folders, and one real run through
``scripts/vilora_study.py`` on a tiny model."""

from __future__ import annotations

import json
import statistics

import pytest
import yaml
from scipy.stats import ttest_rel

from adaptlab.config import parse_config
from adaptlab.errors import UserError
from adaptlab.training.vilora_study import (
    STUDY_METHODS,
    StudyModel,
    ViLoRAStudyConfig,
    claim_verdict,
    jaccard,
    kept_triplets,
    mean_std,
    paired_difference,
    pattern_agreement,
    run_args,
)
from tests.conftest import load_script

study = load_script("vilora_study")


def test_mean_std_and_paired_difference_equal_statistics_and_scipy():
    values = [0.61, 0.7, 0.55, 0.68]
    stats = mean_std(values)
    assert stats["mean"] == pytest.approx(statistics.mean(values))
    assert stats["std"] == pytest.approx(statistics.stdev(values)) and stats["n"] == 4
    assert mean_std([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1}
    a = {1: 0.7, 2: 0.65, 3: 0.8, 4: 0.71}
    b = {1: 0.6, 2: 0.66, 3: 0.7, 5: 0.9}  # seed 4 / 5 unpaired: left out
    d = paired_difference(a, b)
    assert d["seeds"] == [1, 2, 3]
    assert d["mean"] == pytest.approx(statistics.mean([0.1, -0.01, 0.1]))
    assert d["p_value"] == pytest.approx(ttest_rel([0.7, 0.65, 0.8], [0.6, 0.66, 0.7]).pvalue)
    assert paired_difference({1: 0.5}, {1: 0.4}) is None
    assert paired_difference({1: 0.5, 2: 0.6}, {1: 0.4, 2: 0.5})["p_value"] is None  # equal


def test_rank_pattern_overlap_counts_kept_triplets():
    p = {"q.lora_E": [True, False, True], "v.lora_E": [False, False, True]}
    q = {"q.lora_E": [True, True, False], "v.lora_E": [False, False, True]}
    assert kept_triplets(p) == {("q.lora_E", 0), ("q.lora_E", 2), ("v.lora_E", 2)}
    assert jaccard(kept_triplets(p), kept_triplets(q)) == pytest.approx(2 / 4)
    assert jaccard(set(), set()) == 1.0
    agreement = pattern_agreement({"a": {1: p, 2: p}, "b": {1: q, 2: p}, "c": {3: q}})
    assert agreement == {"a|b": {"jaccard": pytest.approx(0.75), "n": 2}}


def test_claim_verdict_reads_the_paired_tests():
    same = {"mean": 0.002, "std": 0.01, "p_value": 0.7}
    worse = {"mean": -0.08, "std": 0.02, "p_value": 0.001}
    pairs = {"vilora_mean-vilora_SNR": same, "vilora_sigma-vilora_SNR": worse}
    assert claim_verdict(pairs).endswith("the claim holds here.")
    pairs["vilora_sigma-vilora_SNR"] = {**worse, "p_value": 0.2}
    assert claim_verdict(pairs).endswith("the claim does not hold here.")
    assert claim_verdict({}).startswith("not tested")


def test_run_args_put_the_method_after_the_preset():
    model = StudyModel("p.yaml", full_args=["--lr", 1e-4], lora_args=["--lr", "2e-3"],
                       ivon_args=["--lr", 1.0])  # fmt: skip
    args = run_args(model, "vilora_sigma", 7, "out", ["--max_steps", 3])
    assert args == ["--config", "p.yaml", *STUDY_METHODS["vilora_sigma"], "--lr", "1.0",
                    "--seed", "7", "--output_dir", "out", "--max_steps", "3"]  # fmt: skip
    assert run_args(model, "full", 1, "o", [])[6:8] == ["--lr", "0.0001"]


def test_bad_study_configs_are_refused():
    with pytest.raises(UserError, match="Unknown study method"):
        ViLoRAStudyConfig(models={"m": StudyModel("p.yaml")}, methods=["vilora_magic"])
    with pytest.raises(UserError, match="names no models"):
        ViLoRAStudyConfig()
    with pytest.raises(UserError, match="distinct seeds"):
        ViLoRAStudyConfig(models={"m": StudyModel("p.yaml")}, seeds=[1, 1])


def write_run(folder, accuracy: float, pattern=None) -> None:
    folder.mkdir(parents=True)
    result = {
        "metrics": {"test_final": {"accuracy": accuracy}},
        "timings": {"train_seconds": 1.0},
        "method": {"trainable_parameters": 10},
    }
    (folder / "result.json").write_text(json.dumps(result))
    if pattern is not None:
        (folder / "final").mkdir()
        (folder / "final" / "adapter_config.json").write_text(json.dumps({"rank_pattern": pattern}))


def test_summary_and_report_from_run_folders(tmp_path):
    cfg = ViLoRAStudyConfig(models={"enc": StudyModel(__file__)}, seeds=[1, 2, 3],
                            methods=["vilora_SNR", "vilora_mean", "vilora_sigma"],
                            output_dir=str(tmp_path))  # fmt: skip
    accuracy = {"vilora_SNR": [0.7, 0.72, 0.68], "vilora_mean": [0.71, 0.71, 0.69],
                "vilora_sigma": [0.6, 0.62, 0.61]}  # fmt: skip
    runs = study.plan(cfg)
    for _, method, seed, out in runs:
        write_run(out, accuracy[method][seed - 1], {"x.lora_E": [True, seed > 1]})
    summary = study.summarize(cfg, study.collect(runs), [])
    enc = summary["models"]["enc"]
    assert enc["methods"]["vilora_sigma"]["accuracy"]["mean"] == pytest.approx(0.61)
    d = enc["paired_differences"]["vilora_sigma-vilora_SNR"]
    assert d["p_value"] == pytest.approx(ttest_rel(accuracy["vilora_sigma"],
                                                   accuracy["vilora_SNR"]).pvalue)  # fmt: skip
    assert enc["rank_pattern_jaccard"]["vilora_SNR|vilora_mean"]["jaccard"] == 1.0
    assert enc["claim"].endswith("the claim holds here.")
    study.report(summary, tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    assert "| vilora_sigma | 0.610 ± 0.010 | 3 |" in text


def test_one_real_run_through_the_study(tiny_model_dir, sst2_dir, tmp_path):
    preset = tmp_path / "finetune.yaml"
    preset.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "task": "sst-2", "task_dir": str(sst2_dir), "shots": 8,
        "data_seed": 42, "target_modules": ["q_proj", "v_proj"], "adalora_init_r": 3,
        "adalora_target_r": 2, "adalora_tinit": 1, "adalora_tfinal": 1, "batch_size": 4,
        "micro_batch_size": 4, "max_steps": 4, "eval_points": 1, "eval_at_start": False,
        "checkpoints": 0, "save_init": False, "save_epochs": False, "report_to": "none",
    }))  # fmt: skip
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({
        "models": {"tiny": {"preset": str(preset), "ivon_args": ["--lr", 0.1]}},
        "methods": ["vilora_random"], "seeds": [5], "output_dir": str(tmp_path / "study"),
    }))  # fmt: skip
    study.main(["--config", str(config)])
    run = tmp_path / "study" / "runs" / "tiny" / "vilora_random" / "seed_5"
    result = json.loads((run / "result.json").read_text())
    assert result["config"]["seed"] == 5 and result["config"]["vilora_criterion"] == "random"
    pattern = json.loads((run / "final" / "adapter_config.json").read_text())["rank_pattern"]
    assert sum(map(sum, pattern.values())) == 2 * 4  # target_r x 4 matrices
    summary = json.loads((tmp_path / "study" / "summary.json").read_text())
    accuracy = summary["models"]["tiny"]["methods"]["vilora_random"]["per_seed"]
    assert accuracy == {"5": result["metrics"]["test_final"]["accuracy"]}
    with pytest.raises(SystemExit):  # a preset that does not exist: one sentence, exit 2
        study.main(["--config", str(config), "--models", '{"x": {"preset": "missing.yaml"}}'])
    assert parse_config(ViLoRAStudyConfig, ["--config", str(config)]).seeds == [5]


def test_controls_add_their_flags_after_the_models_learning_rate():
    model = StudyModel("p.yaml", lora_args=["--lr", "2e-3"], ivon_args=["--lr", 1.0],
                       controls={"vilora_SNR_b2": ["--method", "adalora", "--optimizer", "ivon",
                                                   "--ivon_beta2", 0.99],
                                 "probe": ["--method", "full", "--lr", 0.5]})  # fmt: skip
    assert model.runs(["lora"]) == ["lora", "vilora_SNR_b2", "probe"]
    assert model.flags("vilora_SNR_b2")[:2] == ["--lr", "1.0"]  # IVON's lr, then the control's
    assert model.flags("vilora_SNR_b2")[-2:] == ["--ivon_beta2", "0.99"]
    assert model.flags("probe") == ["--lr", "2e-3", "--method", "full", "--lr", "0.5"]
    with pytest.raises(UserError, match="reuse a method's name"):
        ViLoRAStudyConfig(models={"m": StudyModel("p.yaml", controls={"lora": []})})
