"""The grafting experiments of Panigrahi et al. 2023 (graft.md §8, §10) in one folder, made by
calling ``scripts/finetune.py`` and ``scripts/graft.py`` exactly as a user would (in this
process, through their ``main(argv)``):

1. ``sweep``: one fine-tuning run on ``task``, grafted at every sparsity as a learned mask
   (the graft preset's mask steps) and as the top-|Δ| patch alone (``--mask_steps 0``), and,
   the control, as the top-|Δ| mask of the learned mask's final size (``top_delta_matched``:
   learned masks grow past their patch, since there is no sparsity term). Test
   accuracy, ECE and recovery of each graft against its size, next to θ_pre and θ_ft:
   ``sweep.json``, ``accuracy_vs_size.png``; the learned graft at ``reference_sparsity`` is
   copied up as ``result.json`` / ``reliability.json`` / ``reliability.png``.
2. ``overlap``: one learned mask per task of ``overlap_tasks``, from one model fine-tuned on all
   of them at once (``--task a+b``, the paper's setting) or, where the fine-tuning recipe has
   no joint task (``multitask``), from one run per task; the asymmetric overlap
   |g_i ∩ g_j| / |g_j| of the masks read back from their folders: ``overlap.json`` (with the
   setting used) and ``overlap.png``.
3. ``continual``: fine-tune on A from θ_pre (θ_A), then on B starting from A's weights (θ_AB,
   ``--model`` A's best/ folder, same preset); learn g_A from (θ_pre, θ_A). θ_pre, θ_A, θ_AB,
   θ_AB with A's graft restored (θ_AB with g_A's positions set to θ_A's values) and A's graft
   alone (θ_pre + g_A ⊙ Δ_A) are each tested on A and on B: ``continual.json``, forgetting of
   A and what restoring costs on B. The paper gives no protocol for this experiment; this one
   is ours.

``summary.json`` and ``report.md`` hold the tables; ``notebook/plot_graft.py`` reads the folder
(``ADAPTLAB_GRAFT=<output_dir>``). Runs live in ``finetune/<name>/`` and
``graft/<run>/<kind>-<sparsity>/``; a study started again with the same command reuses every
finished run (each recipe skips a run it has finished) and resumes an unfinished one.

Launch:
    # laptop / CPU: the demo's sweep on the embedded SmolLM2-135M (a few minutes)
    python scripts/graft_study.py --config scripts/configs/graft_study_demo.yaml

    # the paper: RoBERTa-base, 16-shot LM-BFF tasks, SGD fine-tuning, all three experiments
    python scripts/prepare_fewshot.py --tasks '[SST-2,cr,mr,QNLI]' --mode k-shot --seeds '[13]'
    python scripts/graft_study.py --config scripts/configs/graft_study_paper.yaml

    # one experiment, other tasks
    python scripts/graft_study.py --config scripts/configs/graft_study_paper.yaml \
        --experiments '[continual]' --continual_tasks '[SST-2,MNLI]'

Trade-offs: every graft reloads θ_pre and θ_ft (a run is a recipe call, so each can be rerun
alone); the sweep's 2 x len(sparsities) grafts dominate its time. ``save_restored`` writes one
more model folder.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from adaptlab.config import parse_config, to_dict
from adaptlab.errors import UserError, report_user_errors
from adaptlab.graft import export_model, load_mask, merge_graft
from adaptlab.graft.analysis import mask_overlap, overlap_json, recovery
from adaptlab.graft.config import GraftConfig
from adaptlab.graft.continual import restore_graft, task_data, test_scores
from adaptlab.graft.sharded import safetensors_rows
from adaptlab.graft.source import resolve_finetuned, safetensors_files
from adaptlab.graft.study import EXPERIMENTS, GraftStudyConfig
from adaptlab.io import read_json, write_json
from adaptlab.models import load_model, load_tokenizer, resolve_model
from adaptlab.plotting.graft import plot_accuracy_vs_size, plot_overlap_heatmap
from adaptlab.plotting.report import write_graft_report
from adaptlab.recipes import load_recipe
from adaptlab.rundir import RunLock, lock_output
from adaptlab.telemetry import now
from adaptlab.training.config import FinetuneConfig
from adaptlab.training.fewshot import model_kind

SCRIPTS = Path(__file__).resolve().parent
COPIED = ("result.json", "reliability.json", "reliability.png")  # the reference graft's


def recipe(name: str):
    """``scripts/<name>.py`` as a module (loaded once; scripts are not a package)."""
    return load_recipe(SCRIPTS, name)


@dataclass
class Study:
    """The validated config, the locked study folder and what the presets resolve to."""

    cfg: GraftStudyConfig
    out: Path
    ood_tasks: list[str]  # the OOD test sets of grafts of cfg.task
    lock: RunLock | None


def joint_task(tasks: list[str]) -> str | None:
    """``a+b`` when the fine-tuning recipe accepts it as one (multi-task) task, else None."""
    name = "+".join(tasks)
    try:
        FinetuneConfig(task=name)
    except (UserError, ValueError):
        return None
    return name


def setup(cfg: GraftStudyConfig) -> Study:
    """Check the presets and the multi-task setting before anything runs; lock the folder."""
    out = Path(cfg.output_dir)
    graft_cfg = parse_config(GraftConfig, ["--config", cfg.graft_preset, "--finetuned", "-"])
    if graft_cfg.mask_steps < 1:
        raise UserError(
            f"graft_preset {cfg.graft_preset} has mask_steps={graft_cfg.mask_steps}: the sweep "
            "compares learned masks (mask_steps >= 1) with the top-|Δ| patch (mask_steps 0); "
            "use a preset that learns."
        )
    joint = "overlap" in cfg.experiments and cfg.multitask == "joint"
    if joint and joint_task(cfg.overlap_tasks) is None:
        raise UserError(
            f"multitask=joint, but scripts/finetune.py does not accept --task "
            f"{'+'.join(cfg.overlap_tasks)}; use multitask=separate (one run per task)."
        )
    lock = lock_output(out, "graft study")
    ood = graft_cfg.ood_tasks if cfg.ood_tasks is None else cfg.ood_tasks
    return Study(cfg, out, ood, lock)


def finetune(study: Study, task: str, name: str, model: str | None = None) -> Path:
    """A fine-tuning run ``finetune/<name>`` of the preset on ``task`` (reused when finished)."""
    cfg = study.cfg
    out = study.out / "finetune" / name
    args = ["--config", cfg.finetune_preset, "--task", task, "--output_dir", str(out),
            "--progress", str(cfg.progress).lower()]  # fmt: skip
    if model or cfg.model:
        args += ["--model", str(model or cfg.model)]
    if cfg.task_dir is not None:
        args += ["--task_dir", cfg.task_dir]
    print(f"\n== fine-tuning on {task} -> {out}", flush=True)
    recipe("finetune").main(args)
    return out


def graft(study: Study, run: Path, task: str, kind: str, sparsity: float,
          joint: bool = False, patch_sparsity: float | None = None) -> Path:  # fmt: skip
    """A graft ``graft/<run>/[<task>-]<kind>-<sparsity>`` of a fine-tuning run (reused).

    Every graft of ``task`` gets the study's OOD tasks, so the sweep, overlap and continual
    experiments share one graft per (run, kind, sparsity). ``joint``: the run was fine-tuned
    on several tasks; the mask is learned and evaluated on ``task``. ``patch_sparsity``: the
    sparsity actually passed (``top_delta_matched``: the learned mask's own size).
    """
    cfg = study.cfg
    name = f"{task + '-' if joint else ''}{kind}-{sparsity:g}"
    out = study.out / "graft" / run.name / name
    ood = study.ood_tasks if task == cfg.task else []
    args = ["--config", cfg.graft_preset, "--finetuned", str(run), "--output_dir", str(out),
            "--sparsity", repr(patch_sparsity or sparsity),
            "--ood_tasks", "[" + ",".join(ood) + "]",
            "--progress", str(cfg.progress).lower()]  # fmt: skip
    if kind in ("top_delta", "top_delta_matched"):
        args += ["--mask_steps", "0"]
    if joint:
        args += ["--task", task]
    print(f"\n== {kind} graft of {run.name} on {task}, sparsity {sparsity:g} -> {out}", flush=True)
    recipe("graft").main(args)
    return out


def scores(split: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in split.items() if k not in ("loss", "n")}


def nan_to_none(values: dict[str, float]) -> dict[str, float | None]:
    return {k: None if v != v else v for k, v in values.items()}


def sweep_record(study: Study, kind: str, sparsity: float, folder: Path) -> dict[str, Any]:
    """One row of ``sweep.json`` from a graft run's ``result.json`` (test split)."""
    result = read_json(folder / "result.json")
    splits, metric = result["splits"], result["metric"]
    test = {model: splits[model]["test"] for model in ("base", "finetuned", "grafted")}
    ood = {
        split.split(":", 1)[1]: {model: scores(splits[model][split]) for model in test}
        for split in splits["grafted"]
        if split.startswith("ood:")
    }
    return {
        "kind": kind,
        "sparsity": sparsity,
        "k": result["patch"]["k"],
        "n_grafted": result["n_grafted"],
        "fraction_eligible": result["fraction_eligible"],
        "fraction_all": result["fraction_all"],
        "metric": metric,
        "accuracy": test["grafted"]["accuracy"],
        "ece": test["grafted"]["ece"],
        **({metric: test["grafted"][metric]} if metric != "accuracy" else {}),
        "recovery": nan_to_none(
            recovery(test["grafted"][metric], test["base"][metric], test["finetuned"][metric])
        ),
        "base": scores(test["base"]),
        "finetuned": scores(test["finetuned"]),
        "ood": ood,
        "run": str(folder.relative_to(study.out)),
    }


def sweep(study: Study) -> dict[str, Any]:
    """Learned and top-|Δ| grafts of one run at every sparsity; the reference one copied up."""
    cfg = study.cfg
    run = finetune(study, cfg.task, cfg.task)
    records = []
    for sparsity in cfg.sparsities:
        for kind in ("learned", "top_delta"):
            folder = graft(study, run, cfg.task, kind, sparsity)
            records.append(sweep_record(study, kind, sparsity, folder))
        # the control: learned masks grow past their patch (no sparsity term), so the top-|Δ|
        # mask of the learned mask's final size is what "learning beats |Δ|" must beat
        learned, patch = records[-2], records[-1]
        if learned["n_grafted"] != patch["n_grafted"]:
            n_eligible = read_json(study.out / learned["run"] / "result.json")["n_eligible"]
            grown = (learned["n_grafted"] + 0.5) / n_eligible  # ⌊s·N_E⌋ = its size exactly
            folder = graft(study, run, cfg.task, "top_delta_matched", sparsity,
                           patch_sparsity=grown)  # fmt: skip
            records.append(sweep_record(study, "top_delta_matched", sparsity, folder))
    write_json(study.out / "sweep.json", records)
    reference = study.out / next(
        r["run"] for r in records
        if r["kind"] == "learned" and r["sparsity"] == cfg.reference_sparsity
    )  # fmt: skip
    for name in COPIED:
        shutil.copyfile(reference / name, study.out / name)
    first = records[0]
    plot_accuracy_vs_size(
        [r for r in records if r["fraction_eligible"] > 0],  # an empty graft is θ_pre
        study.out / "accuracy_vs_size.png",
        finetuned=first["finetuned"]["accuracy"],
        base=first["base"]["accuracy"],
        ylabel=f"{cfg.task} test accuracy",
    )
    return {"task": cfg.task, "run": str(run.relative_to(study.out)),
            "reference": str(reference.relative_to(study.out)), "records": records}  # fmt: skip


def overlap(study: Study) -> dict[str, Any]:
    """One learned mask per task (joint run or one run each) and their asymmetric overlap."""
    cfg = study.cfg
    tasks, s = cfg.overlap_tasks, cfg.reference_sparsity
    joint = joint_task(tasks) if cfg.multitask != "separate" else None
    if joint is not None:
        run = finetune(study, joint, joint)
        folders = {task: graft(study, run, task, "learned", s, joint=True) for task in tasks}
        runs = {task: run for task in tasks}
    else:
        runs = {task: finetune(study, task, task) for task in tasks}
        folders = {task: graft(study, runs[task], task, "learned", s) for task in tasks}
    masks = {task: load_mask(folder / "mask").index for task, folder in folders.items()}
    record = overlap_json(mask_overlap(masks))
    record.update(
        setting="multitask" if joint else "separate",
        sparsity=s,
        runs={task: str(run.relative_to(study.out)) for task, run in runs.items()},
        masks={task: str((f / "mask").relative_to(study.out)) for task, f in folders.items()},
        test={
            task: {
                model: scores(read_json(f / "result.json")["splits"][model]["test"])
                for model in ("base", "finetuned", "grafted")
            }
            for task, f in folders.items()
        },
    )
    write_json(study.out / "overlap.json", record)
    plot_overlap_heatmap(record, study.out / "overlap.png")
    return record


def continual(study: Study) -> dict[str, Any]:
    """Fine-tune A then B, learn g_A, test θ_pre, θ_A, θ_AB, θ_AB + g_A restored, g_A alone."""
    cfg = study.cfg
    a, b = cfg.continual_tasks
    run_a = finetune(study, a, a)
    weights_a = resolve_finetuned(run_a).weights
    run_ab = finetune(study, b, f"{a}-then-{b}", model=str(weights_a))
    graft_a = graft(study, run_a, a, "learned", cfg.reference_sparsity)
    source_ab, mask = resolve_finetuned(run_ab), load_mask(graft_a / "mask")
    base = resolve_model(resolve_finetuned(run_a).base_model)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    tokenizer = load_tokenizer(base)
    eval_batch = read_json(run_a / "result.json")["config"].get("eval_batch_size", 16)

    def load(ref) -> torch.nn.Module:
        return load_model(ref, dtype="float32", device=accelerator.device).eval()

    pre = load(base)
    kind = model_kind(pre.config)
    data = {a: task_data(resolve_finetuned(run_a).run_config, tokenizer, kind),
            b: task_data(source_ab.run_config, tokenizer, kind)}  # fmt: skip

    def test(model: torch.nn.Module) -> dict[str, dict[str, float]]:
        pad = tokenizer.pad_token_id
        return {t: test_scores(model, d, accelerator, eval_batch, pad) for t, d in data.items()}

    print(f"\n== continual {a} -> {b}: testing five models on both tasks", flush=True)
    models = {"pre": test(pre)}
    models["pre+g_A"] = test(merge_graft(pre, graft_a / "mask"))
    del pre
    models["A"] = test(load(resolve_model(str(weights_a))))
    restored = load(resolve_model(str(source_ab.weights)))
    models["AB"] = test(restored)
    read, params = safetensors_rows(safetensors_files(weights_a)), dict(restored.named_parameters())
    donor = {name: read(name).to(params[name].dtype) for name in mask.names}
    changed = restore_graft(restored, donor, mask)
    models["AB+g_A"] = test(restored)
    if cfg.save_restored:
        export_model(restored, study.out / "continual" / "restored", tokenizer,
                     meta={"theta_AB": str(source_ab.weights), "theta_A": str(weights_a),
                           "mask": str(graft_a / "mask")})  # fmt: skip
    acc = {name: {task: m[task]["accuracy"] for task in (a, b)} for name, m in models.items()}
    record = {
        "tasks": {"A": a, "B": b},
        "protocol": (
            "θ_A: fine-tuned on A from θ_pre; θ_AB: fine-tuned on B from θ_A's weights, same "
            "preset; g_A learned from (θ_pre, θ_A) at the reference sparsity; AB+g_A: θ_AB with "
            "g_A's positions set to θ_A's values; pre+g_A: θ_pre + g_A ⊙ Δ_A. The paper does "
            "not specify its continual-learning protocol."
        ),
        "sparsity": cfg.reference_sparsity,
        "n_grafted": mask.n_grafted,
        "n_restored_changed": changed,
        "models": models,
        "forgetting_A": acc["A"][a] - acc["AB"][a],
        "restored_gain_A": acc["AB+g_A"][a] - acc["AB"][a],
        "restored_cost_B": acc["AB"][b] - acc["AB+g_A"][b],
        "runs": {
            "A": str(run_a.relative_to(study.out)),
            "AB": str(run_ab.relative_to(study.out)),
            "graft_A": str(graft_a.relative_to(study.out)),
        },  # fmt: skip
        "restored_model": "continual/restored" if cfg.save_restored else None,
    }
    write_json(study.out / "continual.json", record)
    return record


EXPERIMENT_STEPS = {"sweep": sweep, "overlap": overlap, "continual": continual}


def report(study: Study, results: dict[str, Any]) -> Path:
    """``summary.json`` (config + every experiment's record) and ``report.md`` (tables, figures)."""
    summary = {"config": to_dict(study.cfg), "created": now(), **results}
    write_json(study.out / "summary.json", summary)
    figures = [study.out / f for f in ("accuracy_vs_size.png", "reliability.png", "overlap.png")]
    return write_graft_report(study.out / "report.md", summary, [f for f in figures if f.is_file()])


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(GraftStudyConfig, argv)
    with report_user_errors():
        study = setup(cfg)
        results = {name: EXPERIMENT_STEPS[name](study) for name in EXPERIMENTS
                   if name in cfg.experiments}  # fmt: skip
        print(f"\nreport -> {report(study, results)}")
    if study.lock is not None:
        study.lock.release()


if __name__ == "__main__":
    main()
