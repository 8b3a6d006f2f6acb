"""The demo pipeline end to end on a tiny model: extraction, fine-tuning, analysis, report."""

from __future__ import annotations

import json

from tests.conftest import SUBJECTS, load_script, write_mmlu_jsonl

demo = load_script("demo")


def test_demo_pipeline_on_a_tiny_model(tiny_model_dir, sst2_dir, tmp_path):
    data = write_mmlu_jsonl(tmp_path / "mmlu.jsonl", per_subject=40, seed=2)
    presets = {
        "extract": f"dataset_path: {data}\npoints: [norm1, final_norm, logits]\nprogress: false\n",
        "analyze": (
            "metrics:\n  maxk: 20\n  gride_range_max: 16\n  id_scale: 4\n  density_k: 4\n"
            "  overlap_k: 5\n  probe: false\nprogress: false\n"
        ),
        "finetune": (
            f"dataset_path: {data}\nmethod: lora\ntarget_modules: [q_proj, v_proj]\nlora_r: 4\n"
            f"subjects: [{', '.join(SUBJECTS)}]\ntrain_split: test\n"
            "train_exclude_samples_per_subject: 20\ntrain_exclude_seed: 42\n"
            "train_samples_per_subject: 8\neval_samples_per_subject: 2\nbatch_size: 4\n"
            "micro_batch_size: 2\nepochs: 1\nlr: 0.01\neval_points: 1\ncheckpoints: 3\n"
            "max_seq_len: 256\nreport_to: none\nprogress: false\n"
        ),
        "kernel": (
            f"task: sst-2\ntask_dir: {sst2_dir}\nshots: 8\nseeds: [42]\nbinary: true\n"
            "lora: true\nlora_r: 4\ntarget_modules: [q_proj, v_proj]\nsolvers: [lstsq]\n"
            "progress: false\n"
        ),
        "fewshot": (
            f"task: sst-2\ntask_dir: {sst2_dir}\nshots: 8\nmethod: lora\nlora_r: 4\n"
            "target_modules: [q_proj, v_proj]\noptimizer: sgd\nlr: 0.1\nbatch_size: 4\n"
            "max_steps: 2\neval_points: 1\ncheckpoints: 0\nsave_init: false\n"
            "report_to: none\nprogress: false\n"
        ),
        "graft_finetune": (
            f"task: sst-2\ntask_dir: {sst2_dir}\nshots: 8\nmethod: full\nfix_head: true\n"
            "fix_embeddings: true\noptimizer: sgd\nlr: 0.5\nschedule: constant\nbatch_size: 4\n"
            "micro_batch_size: 4\nmax_steps: 4\neval_points: 1\ncheckpoints: 0\n"
            "save_init: false\nsave_epochs: false\nreport_to: none\n"
        ),
        "graft": "mask_steps: 2\nbatch_size: 4\nlearning_rate: 1.0e9\n",
    }
    presets["graft_study"] = (
        f"experiments: [sweep]\ntask: sst-2\nsparsities: [0.01, 0.1]\n"
        f"finetune_preset: {tmp_path / 'graft_finetune.yaml'}\n"
        f"graft_preset: {tmp_path / 'graft.yaml'}\n"
    )
    for name, text in presets.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    out = tmp_path / "demo"
    demo.main([
        "--model", str(tiny_model_dir), "--shots", "[0,1]",
        "--subjects", f"[{','.join(SUBJECTS)}]", "--samples_per_subject", "20",
        "--extract_preset", str(tmp_path / "extract.yaml"),
        "--analyze_preset", str(tmp_path / "analyze.yaml"),
        "--finetune_preset", str(tmp_path / "finetune.yaml"),
        "--kernel_preset", str(tmp_path / "kernel.yaml"),
        "--fewshot_preset", str(tmp_path / "fewshot.yaml"),
        "--graft_study_preset", str(tmp_path / "graft_study.yaml"),
        "--method_comparison", "[lora,inducer]", "--method_comparison_args", "[--quick]",
        "--output_dir", str(out),
    ])  # fmt: skip
    records = json.loads((out / "analysis" / "metrics.json").read_text())
    runs = {"0shot", "1shot", "1shot-random", "1shot-other_subject", "finetuned"}
    assert {r["run"] for r in records if r["kind"] == "run"} == runs
    steps = {r["run"] for r in records if r["kind"] == "checkpoint"}
    assert steps == {"step_1", "step_2", "step_3"}  # log-spaced over the 6 training steps
    assert all(0 <= r["overlap_reference"] <= 1 for r in records if r["kind"] == "checkpoint")
    report = (out / "report.md").read_text()
    for row in ("| 0shot | 0 | 60 ", "| 1shot | 1 | 60 ", "| finetuned | 0 | 60 "):
        assert row in report
    assert "Fine-tuned: lora on 24 held-out questions" in report
    shared = {
        name: json.loads((out / name / "manifest.json").read_text())["prompt"]
        for name in ("1shot", "1shot-random", "1shot-other_subject")
    }
    assert [p["shot_selection"] for p in shared.values()] == ["fixed", "random", "other_subject"]
    for name, prompt in shared.items():
        assert f"{name} shares {100 * prompt['shared_text_fraction']:.0f}% of its prompt" in report
    assert "![shot_controls](analysis/figures/shot_controls.png)" in report
    assert "![checkpoint_overlap](analysis/figures/checkpoint_overlap.png)" in report
    comparison = json.loads((out / "kernel_vs_ft" / "comparison.json").read_text())
    tuned = json.loads((out / "kernel_vs_ft" / "finetune" / "8-42" / "result.json").read_text())
    accuracy = tuned["metrics"]["test_at_best"]["accuracy"]
    assert comparison["seeds"] == [42] and comparison["finetune"]["mean"] == 100 * accuracy
    assert f"LoRA SGD fine-tuning reaches {100 * accuracy:.1f}% test accuracy" in report
    assert (out / "kernel_vs_ft" / "figures" / "kernel_vs_finetune.png").is_file()
    sweep = json.loads((out / "graft" / "sweep.json").read_text())
    assert [(r["kind"], r["sparsity"]) for r in sweep] == [
        ("learned", 0.01), ("top_delta", 0.01), ("learned", 0.1), ("top_delta", 0.1)
    ]  # fmt: skip
    assert "### Graft size sweep (SST-2, test split)" in report
    top = sweep[-1]
    assert (
        f"| top_delta | 0.1 | {top['n_grafted']:,} | {top['fraction_eligible']:.2e} "
        f"| {top['accuracy']:.3f} | {top['ece']:.3f} |"
    ) in report
    assert "![accuracy_vs_size](graft/accuracy_vs_size.png)" in report
    comparison = json.loads((out / "methods" / "method_comparison.json").read_text())
    assert {"lora", "inducer"} <= {row["name"] for row in comparison["rows"]}
    assert "Fine-tuning methods side by side" in report
    assert "| inducer |" in report
