"""One study across adaptation methods: accuracy, calibration, size and cost of each method on
one model and task, and how far the eNTK of the pretrained model predicts them.

Every number comes from an existing recipe run exactly as a user would run it (this script
calls their ``main(argv)``): ``scripts/finetune.py`` once per method and seed (full
fine-tuning, LoRA, AdaLoRA, ViLoRA, inducer-tuning, Kernel-mix), ``scripts/graft.py`` on each
full fine-tuning run, ``scripts/compute_kernel.py`` once for all seeds, and on the base task
``scripts/extract_repr.py`` (MMLU, 0-shot) of the pretrained model and of every run, then
``scripts/analyze_repr.py`` over those extractions. Each stage's folder is
``stages/<recipe>/<method>/seed<s>`` (the kernel: ``stages/kernel``; ``stages/extract/<run>``,
``stages/analysis``); a record holds the
hash of the config that made it (``records/<stage>.json``), so a rerun after a crash or with one
more method or seed runs only what is missing, and a stage whose config changed stops the study
before anything runs (``--rerun_changed true`` reruns it). ``study.json`` holds every number
(mean ± std over the seeds, and each seed's value as the recipe reported it), ``report.md`` the
tables and the stage times, ``figures/`` a reliability curve per method, each seed's numbers,
and MMLU's intrinsic dimension, ARI with the subjects and overlap with the pretrained model
against depth, a line per method.

Launch:
    # laptop / CPU: the embedded SmolLM2-135M on the offline tweet-sentiment task
    python scripts/study.py --config scripts/configs/study_demo.yaml

    # fewer methods or seeds, on top of the preset
    python scripts/study.py --config scripts/configs/study_demo.yaml \
        --methods '[lora,graft]' --seeds '[13]'

    # a cluster: the stages as jobs of SLURM arrays meeting at files, then the report
    python scripts/study.py --config scripts/configs/study_paper.yaml --list_stages true
    bash slurm/submit_study scripts/configs/study_paper.yaml
"""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

from adaptlab.config import parse_config, to_dict
from adaptlab.errors import UserError, report_user_errors
from adaptlab.recipes import run_recipe as run_in_process
from adaptlab.rundir import lock_output
from adaptlab.study import StudyConfig, plan
from adaptlab.study.preflight import check_stages, check_task
from adaptlab.study.stages import check_cache, is_cached, read_stages, run_stages
from adaptlab.study.summary import summarise, write_outputs

SCRIPTS = Path(__file__).resolve().parent


def run_recipe(name: str, argv: list[str]) -> None:
    """Run ``scripts/<name>.py`` in this process, as ``python scripts/<name>.py ARGV`` would."""
    run_in_process(SCRIPTS, name, argv)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(StudyConfig, argv)
    with report_user_errors():
        out = Path(cfg.output_dir)
        check_task(cfg.task)
        stages = plan(cfg, out)  # every recipe parses its flags: a bad one stops here
        if cfg.list_stages:
            print("\n".join(stage.name for stage in stages))
            return
        check_stages(stages, cfg.model)
        chosen = [
            s for s in stages if cfg.only is None or any(fnmatch(s.name, p) for p in cfg.only)
        ]
        if not chosen:
            raise UserError(f"only={cfg.only} matches no stage; see --list_stages true.")
        names = [stage.name for stage in stages]
        rerun = check_cache(chosen, read_stages(out, names), cfg.rerun_changed)
        lock = None if cfg.only else lock_output(out, "study")  # array jobs share the folder
        run_stages(chosen, out, run_recipe, rerun)
        recorded = read_stages(out, names)
        missing = [stage.name for stage in stages if not is_cached(stage, recorded)]
        if missing:
            print(f"{len(missing)} stages still to run (e.g. {missing[0]}); the report waits.")
            return
        record = summarise(stages, recorded, to_dict(cfg))
        write_outputs(record, out)
        if lock is not None:
            lock.release()
    print(f"study of {len(record['methods'])} methods -> {out / 'report.md'}")


if __name__ == "__main__":
    main()
