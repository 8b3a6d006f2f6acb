"""Write LM-BFF k-shot splits: k train + k dev examples per label for each task and seed.

Reads the original data (``<original_dir>/<TASK>/``: GLUE-style ``train.tsv`` + ``dev.tsv``,
MNLI ``dev_matched.tsv`` / ``dev_mismatched.tsv``, other tasks header-less ``train.csv`` +
``test.csv``, as in the LM-BFF data tarball) and writes, exactly as upstream's
``tools/generate_k_shot_data.py`` does (same shuffles, same bytes)::

    <out_dir>/<mode>/<TASK>/<K>-<SEED>/{train,dev,test}.{tsv|csv}

plus a JSON record ``<out_dir>/<mode>/prepare-k<K>.json`` (config, input and output sha256,
package versions). With ``--from_hub true`` the tasks are first downloaded with ``datasets`` and
converted to the original layout (GLUE, SNLI, trec, ag_news and the OOD sentiment sets; the
LM-BFF-only sets sst-5, mr, cr, mpqa, subj need the tarball).

Launch:
    # the kernel paper's splits (16-shot, 1k-test cap, upstream's seeds in upstream's order)
    python scripts/prepare_fewshot.py --config scripts/configs/prepare_fewshot.yaml

    # a few tasks, other shots and seeds (seed 0 is the grafting repo's)
    python scripts/prepare_fewshot.py --original_dir data/original --out_dir data \
        --mode k-shot --k 64 --seeds [13,21,42,87,100] --tasks [SST-2,MNLI,trec]

    # from the hub (needs a network)
    python scripts/prepare_fewshot.py --from_hub true --tasks [SST-2,RTE] --seeds [0]

    # the offline tasks, from the embedded data (no original_dir): label,text CSV files
    python scripts/prepare_fewshot.py --tasks [tweet-sentiment,bbc-news] --k 16 --seeds [13,21]

Trade-offs: upstream's CoLA splits depend on the seed order (its file is shuffled in place
from seed to seed), so the default seeds keep upstream's order 100, 13, 21, 42, 87; a label
with too few examples stops the run unless ``--allow_short true`` (upstream wrote short,
unbalanced splits silently). The offline tasks (``mmlu-topics``, ``bbc-news``,
``tweet-sentiment``) need no files: adaptlab builds them in memory, and their files here are the
same splits for other code; the record names the embedded data and its cleaning instead of
original files.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from adaptlab import assets
from adaptlab.config import parse_config, to_dict
from adaptlab.data import (
    PrepareConfig,
    Task,
    generate_kshot,
    get_task,
    read_original,
    write_offline_kshot,
)
from adaptlab.data.hub import download_original, hub_source
from adaptlab.data.kshot import original_files
from adaptlab.errors import report_user_errors
from adaptlab.io import write_json
from adaptlab.rundir import check_writable
from adaptlab.telemetry import now, package_versions


def setup(cfg: PrepareConfig) -> dict[str, Task]:
    """Resolve the tasks (one per data folder) and fetch them from the hub when asked."""
    check_writable(cfg.out_dir, "--out_dir")
    tasks: dict[str, Task] = {}
    for name in cfg.tasks:
        task = get_task(name)
        tasks.setdefault(task.data_name + "." + task.layout.format, task)
    if cfg.from_hub:
        from_files = [task for task in tasks.values() if not task.offline]
        for task in from_files:
            hub_source(task)  # every task has a source: fail before the first download
        for task in from_files:
            download_original(task, cfg.original_dir)
    return tasks


def prepare(cfg: PrepareConfig, tasks: dict[str, Task]) -> dict:
    """Check that every original file exists, then read and write the tasks one by one."""
    for task in tasks.values():
        if not task.offline:
            original_files(task, cfg.original_dir)
    record = {}
    for task in tasks.values():
        started = time.perf_counter()
        folders, source = _write_offline(cfg, task) if task.offline else _write(cfg, task)
        record[task.name] = {
            "original": source,
            "splits": {folder.name: _hashes(folder) for folder in folders},
            "seconds": round(time.perf_counter() - started, 3),
        }
        print(f"{task.name}: {len(folders)} split(s) -> {folders[0].parent}")
    return record


def _write(cfg: PrepareConfig, task: Task) -> tuple[list[Path], dict]:
    """A task with original files: its k-shot folders and the hashes of the files read."""
    original = read_original(task, cfg.original_dir)
    folders = generate_kshot(
        task,
        cfg.original_dir,
        cfg.out_dir,
        k=cfg.k,
        seeds=cfg.seeds,
        mode=cfg.mode,
        allow_short=cfg.allow_short,
        original=original,
    )
    return folders, {str(path): assets.sha256_file(path) for path in original.files}


def _write_offline(cfg: PrepareConfig, task: Task) -> tuple[list[Path], dict]:
    """An offline task: its k-shot folders and the provenance of its embedded data."""
    return write_offline_kshot(
        task, cfg.out_dir, k=cfg.k, seeds=cfg.seeds, mode=cfg.mode, allow_short=cfg.allow_short
    )


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: assets.sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(PrepareConfig, argv)
    with report_user_errors():
        tasks = setup(cfg)
        record = prepare(cfg, tasks)
    record_path = Path(cfg.out_dir) / cfg.mode / f"prepare-k{cfg.k}.json"
    write_json(
        record_path,
        {"config": to_dict(cfg), "tasks": record, "versions": package_versions(), "created": now()},
    )


if __name__ == "__main__":
    sys.exit(main())
