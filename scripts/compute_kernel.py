"""Compute the empirical NTK of a pretrained LM on a few-shot task and solve it (kernel.md).

Does prompt-based fine-tuning behave like kernel regression with the model's eNTK? For every
data seed this recipe computes K[i, c, j, c'] = <J_c(x_i), J_c'(x_j)> between the k-shot
training examples and the train, dev and test examples (f = the label-word logits, or
logit_1 - logit_0 with ``binary``), with the ``sgd``, ``signgd`` or ``asymmetric_signgd``
formula over all parameters or a subset (no embeddings, no head, biases, LoRA), then solves
it (lstsq, logistic, SVR/SVC, the asymmetric LS-SVM) over a grid of solver settings, keeps
the best dev setting per seed and reports test accuracy mean (std) over seeds. The test logits
of each seed's best setting per solver go to ``predictions/{solver}_seed{seed}.jsonl``, one
``{"index", "label", "logits", "prediction"}`` per test example in test-split order, named in
``sweep.json`` (``by_solver[solver].best[i].predictions``); binary kernels write ``[-f, f]``.

Kernels are saved in the upstream format (``{split}_kernels_{task}.pt`` holding
``(kernel [N, C, M, C] float64, targets)``; ``[2, N, C, M, C]`` for A-SignGD) next to a
manifest, so the kernels released with the paper re-solve with ``--load_kernels DIR`` and a
rerun reuses kernels computed with the same settings from the same inputs: the manifest records
the sha256 of the task's split files and of the model's weights, and a folder made from other
settings, other data (a label fixed in train.tsv) or other weights is an error unless
``overwrite_kernels``. ``--load_kernels`` needs no model; it refuses kernels whose manifest
names other split files than those this run reads (when ``task_dir`` holds them: the kernel
files' targets would be the old labels), or other weights than those of ``--model`` when that
names the model the kernels were computed with. Kernels released without a manifest are taken
as they are.

SIGTERM (SLURM pre-emption, ``scancel``) abandons the split in progress and exits with status
143; the splits already finished stay (the seed's manifest lists them, rewritten after each)
and a rerun with the same command computes the rest.

Launch:
    # the offline demo task (topic classification of embedded MMLU questions), SmolLM2-135M
    python scripts/compute_kernel.py --config scripts/configs/kernel_demo.yaml

    # RoBERTa-base on SST-2, 16-shot, five seeds, as in the paper (k-shot data from
    # scripts/prepare_fewshot.py); rows of the kernel split over 4 GPUs without duplicates
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml --num_processes 4 \\
        scripts/compute_kernel.py --config scripts/configs/kernel_paper.yaml \\
        --model roberta-base --task SST-2 --task_dir data

    # the A-SignGD kernel (Adam) with the asymmetric solver, binary mode
    python scripts/compute_kernel.py --config scripts/configs/kernel_paper.yaml \\
        --formula asymmetric_signgd --binary true --solvers '[asym]' --gamma '[0.1,1,10]'

    # a 7B model: the kernel of LoRA fine-tuning, or a random-projection kernel
    sbatch slurm/submit_kernel --config scripts/configs/kernel_lora_7b.yaml

    # re-solve saved (or released) kernels without a model
    python scripts/compute_kernel.py --task SST-2 --load_kernels kernels/SST-2/prompt-sgd \\
        --seeds '[42]' --solvers '[lstsq,logistic]'

Trade-offs: ``row_batch_size`` x ``col_batch_size`` x ``param_block_numel`` bound the memory of
per-example gradients (blocks are accumulated in float64, never the whole [N, P] matrix);
multi-class kernels cost (N C)^2 entries against N^2 in binary mode; A-SignGD doubles the
dev/test work (its flipped kernel); ``projection_dim`` trades exactness for memory at 7B scale
(E[K_proj] = K; the error falls as 1/sqrt(d)).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from adaptlab import ntk
from adaptlab.config import parse_config, to_dict
from adaptlab.data import DataError, load_task
from adaptlab.distributed import DistInfo, all_gather_object, dist_info, shutdown
from adaptlab.errors import report_user_errors
from adaptlab.io import read_json, sweep_temporaries, write_json, write_jsonl
from adaptlab.models import (
    ModelNotFoundError,
    check_weights,
    describe_model,
    load_model,
    load_tokenizer,
    model_skeleton,
    resolve_model,
)
from adaptlab.ntk.config import SPLITS, KernelConfig
from adaptlab.ntk.errors import KernelError
from adaptlab.rundir import Layout, RunLock, check_ours, lock_output
from adaptlab.signals import exit_on_sigterm
from adaptlab.telemetry import hardware, now, package_versions, peak_memory_mib
from adaptlab.training.fewshot import (
    FewShotData,
    fit_linear_head,
    head_features,
    model_kind,
    prepare_fewshot,
)
from adaptlab.training.metrics import prediction_records

MANIFEST = "manifest.json"
SWEEP, RESULT, PREDICTIONS = "sweep.json", "result.json", "predictions"
LAYOUT = Layout(
    "kernel",
    markers=(SWEEP, f"*-*/{MANIFEST}", "*-*/*_kernels_*.pt"),
    owned=(SWEEP, RESULT, PREDICTIONS, "*-*"),
)
"""What this recipe writes into ``output_dir``: one ``{K}-{seed}`` folder per seed, the sweep
and the best settings' test predictions."""
IDENTITY_FIELDS = (
    "model",
    "task",
    "shots",
    "kshot_mode",
    "template",
    "label_words",
    "test_limit",
    "head",
    "binary",
    "formula",
    "exclude_embeddings",
    "exclude_head",
    "only_biases",
    "lora",
    "lora_r",
    "lora_alpha",
    "target_modules",
    "lora_seed",
    "projection_dim",
    "projection_seed",
    "dtype",
    "adjust_for_init",
)
"""Settings that change a kernel's values: kernels on disk are reused only when all match."""
INPUTS = {
    "data": "the sha256 of the task's split files",
    "weights": "the sha256 of the model's weights",
}
"""The inputs in a kernel's identity besides the settings, as a message names them."""
# provenance keys that say where an input lies or what it is called (``model`` already holds
# the name), not what it holds: moving the data or the model does not change a kernel
_LOCATIONS = frozenset({"path", "data_dir", "adapter_path", "name"})


@dataclass
class Job:
    """Everything checked before the model is loaded."""

    cfg: KernelConfig
    info: DistInfo
    out: Path
    data: dict[int, FewShotData]  # by data seed; empty when re-solving saved kernels
    todo: dict[int, list[str]]  # splits whose kernel must be computed, by seed
    identities: dict[int, dict]  # what makes each seed's kernels what they are, by seed
    model_ref: object | None
    tokenizer: object | None
    started: float
    lock: RunLock | None  # the output folder's lock (main process)


def seed_dir(root: Path, cfg: KernelConfig, seed: int) -> Path:
    """``{root}/{K}-{seed}``, upstream's folder name for one data split."""
    return root / f"{cfg.shots}-{seed}"


def contents(record: object) -> object:
    """A provenance record without where things lie: moved files are still the same inputs."""
    if isinstance(record, dict):
        return {k: contents(v) for k, v in record.items() if k not in _LOCATIONS}
    return record


def identity(cfg: KernelConfig, seed: int, data: dict, model: dict) -> dict:
    """The settings and inputs that make a seed's kernels what they are.

    Args:
        cfg: the run's config.
        seed: the data seed.
        data: the seed's ``FewShotData.record``; its provenance holds the split files' sha256
            (for the offline tasks, the MMLU file's).
        model: ``describe_model`` of the model; its revision is the weights' sha256 (for
            adapters, with the base model's).
    """
    settings = {key: getattr(cfg, key) for key in IDENTITY_FIELDS}
    inputs = {"data": contents(data["provenance"]), "weights": contents(model)}
    return json.loads(json.dumps({**settings, "seed": seed, **inputs}, default=str))


def changed_keys(saved: dict, current: dict) -> str:
    """The keys whose values differ, inputs named in words: ``formula, data (the sha256...)``."""
    keys = sorted(k for k in current if saved.get(k) != current[k])
    return ", ".join(f"{k} ({INPUTS[k]})" if k in INPUTS else k for k in keys)


def splits_to_compute(cfg: KernelConfig, folder: Path, current: dict) -> list[str]:
    """The splits of one seed without a reusable kernel on disk (``current``: its identity)."""
    if cfg.overwrite_kernels or not (folder / MANIFEST).is_file():
        return list(SPLITS)
    manifest = read_json(folder / MANIFEST)
    saved = manifest.get("identity") or {}
    if saved != current:
        raise KernelError(
            f"{folder} holds kernels computed from other settings or inputs, changed: "
            f"{changed_keys(saved, current)}; pass overwrite_kernels=true to recompute them or "
            "pick another output_dir."
        )
    listed = manifest.get("splits", [])
    done = [s for s in listed if ntk.kernel_path(folder, s, cfg.task).is_file()]
    return [s for s in SPLITS if s not in done]


def check_loaded(cfg: KernelConfig, source: Path) -> None:
    """Refuse saved kernels made from other split files or weights than this run names.

    Only what is at hand is compared: the split files when ``task_dir`` (or the offline task)
    provides them, the weights when ``model`` is the (local or hub) model named in the
    manifest. Folders without a manifest (released kernels) are taken as they are.

    Raises:
        KernelError: a seed's manifest records other split files or weights.
    """
    for seed in cfg.seeds:
        folder = kernel_folder(source, cfg, seed)
        if not (folder / MANIFEST).is_file():
            continue
        saved = read_json(folder / MANIFEST).get("identity") or {}
        current = {}
        with contextlib.suppress(DataError):  # no data here: the kernels' targets stand
            splits = load_task(
                cfg.task,
                cfg.task_dir,
                k=cfg.shots,
                seed=seed,
                mode=cfg.kshot_mode,
                test_limit=cfg.test_limit,
            )
            current["data"] = contents(splits.provenance)
        if saved.get("model") == cfg.model:
            with contextlib.suppress(ModelNotFoundError):
                ref = resolve_model(cfg.model, materialize=False)
                described = describe_model(ref)
                # embedded weights are pinned by their hash; a hub model not cached here has
                # no revision to compare
                if ref.source != "embedded" and described["revision"] is not None:
                    current["weights"] = contents(described)
        current = json.loads(json.dumps(current, default=str))
        if any(saved.get(k) != v for k, v in current.items()):
            raise KernelError(
                f"load_kernels={folder} holds kernels made from other inputs than this run's, "
                f"changed: {changed_keys(saved, current)}; their targets or values do not "
                "belong to this run: recompute them (drop load_kernels) or point task_dir and "
                "model at the inputs they were made from."
            )


def setup(cfg: KernelConfig) -> Job:
    """Check the data, label words and the output folder; load nothing heavy."""
    started = time.perf_counter()
    info = dist_info(cpu=cfg.cpu)
    out = Path(cfg.output_dir)
    # held until the process ends: a second run into this folder is refused, not mixed in
    lock = lock_output(out, "kernel", info.rank == 0, lambda e: all_gather_object(e, info))
    check_ours(out, LAYOUT)  # results go next to kernels, never into another's folder
    if cfg.load_kernels:
        source = Path(cfg.load_kernels)
        if not source.is_dir():
            raise KernelError(f"load_kernels={source} is not a folder of saved kernels.")
        check_loaded(cfg, source)
        return Job(cfg, info, out, {}, {}, {}, None, None, started, lock)
    model_ref = resolve_model(cfg.model)
    check_weights(model_ref, allow_pickle_weights=cfg.allow_pickle_weights)
    model = describe_model(model_ref)  # the weights' sha256, computed once and cached
    skeleton = model_skeleton(model_ref, trust_remote_code=cfg.trust_remote_code)
    kind = model_kind(skeleton.config)
    tokenizer = load_tokenizer(model_ref, trust_remote_code=cfg.trust_remote_code)
    data, todo, identities = {}, {}, {}
    for seed in cfg.seeds:
        data[seed] = prepare_fewshot(
            cfg.task,
            tokenizer,
            kind,
            data_dir=cfg.task_dir,
            k=cfg.shots,
            seed=seed,
            mode=cfg.kshot_mode,
            template=cfg.template,
            label_words=cfg.label_words,
            test_limit=cfg.test_limit,
            head=cfg.head,
        )
        identities[seed] = identity(cfg, seed, data[seed].record, model)
        todo[seed] = splits_to_compute(cfg, seed_dir(out, cfg, seed), identities[seed])
    return Job(cfg, info, out, data, todo, identities, model_ref, tokenizer, started, lock)


def load(job: Job) -> torch.nn.Module:
    """The pretrained model in eval mode, with LoRA adapters when the kernel is LoRA's."""
    cfg = job.cfg
    set_seed(cfg.lora_seed)  # as scripts/finetune.py: the same LoRA initialisation
    model = load_model(
        job.model_ref,
        dtype=cfg.dtype,
        device=job.info.device,
        # not eager: its softmax runs in float32 even for float64 weights
        attn_implementation="auto",
        trust_remote_code=cfg.trust_remote_code,
        allow_pickle_weights=cfg.allow_pickle_weights,
    )
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=cfg.target_modules
        )
        model = get_peft_model(model, lora)
    return model.eval()


def kernel_function(job: Job, model: torch.nn.Module, data: FewShotData) -> ntk.KernelFunction:
    """f(x) of this seed: label-word logits, or a linear head fitted on this seed's train set."""
    cfg = job.cfg
    if cfg.head == "prompt":
        return ntk.KernelFunction(
            model, head="label_words", label_word_ids=data.label_word_ids, binary=cfg.binary
        )
    pad = job.tokenizer.pad_token_id
    features = head_features(model, data.train, pad, cfg.col_batch_size, cfg.progress)
    head = fit_linear_head(features, [ex["label"] for ex in data.train], len(data.task.labels))
    head = head.to(device=job.info.device, dtype=next(model.parameters()).dtype)
    return ntk.KernelFunction(model, head="linear_head", linear_head=head, binary=cfg.binary)


def batches(examples: list, size: int, job: Job, data: FewShotData) -> list[dict]:
    """Right-padded batches of ``size`` examples on the device, in order."""
    from adaptlab.data import collate_prompts

    out = []
    for start in range(0, len(examples), size):
        batch = collate_prompts(
            examples[start : start + size], job.tokenizer.pad_token_id, data.label_word_ids
        )
        out.append({key: value.to(job.info.device) for key, value in batch.items()})
    return out


def targets(data: FewShotData, examples: list, binary: bool) -> torch.Tensor:
    """Label ids ``[M]`` (long), or ``2 label - 1`` in {-1, +1} (float64) in binary mode."""
    labels = torch.tensor([ex["label"] for ex in examples], dtype=torch.long)
    return (2 * labels - 1).double() if binary else labels


def gather_rows(local: torch.Tensor, info: DistInfo, axis: int) -> torch.Tensor:
    """Concatenate every rank's rows along ``axis`` (ranks hold different numbers of rows)."""
    if info.world == 1:
        return local
    parts = all_gather_object(local.cpu(), info)
    return torch.cat(parts, dim=axis)


def compute_seed(job: Job, model: torch.nn.Module, seed: int) -> dict:
    """Kernels (and f0 logits) of one seed's splits; returns the seed's manifest."""
    cfg, info, data = job.cfg, job.info, job.data[seed]
    folder = seed_dir(job.out, cfg, seed)
    fn = kernel_function(job, model, data)
    params = ntk.select_parameters(
        model,
        exclude_embeddings=cfg.exclude_embeddings,
        exclude_head=cfg.exclude_head,
        only_biases=cfg.only_biases,
        only_lora=cfg.lora,
        linear_head=getattr(fn, "linear_head", None),
    )
    # rows (training examples) are split into contiguous shards, one per process, no padding
    n = len(data.train)
    lo, hi = n * info.rank // info.world, n * (info.rank + 1) // info.world
    rows = batches(data.train[lo:hi], cfg.row_batch_size, job, data)
    shards = all_gather_object([lo, hi], info)  # the proof that rows were split, not repeated
    splits = {"train": data.train, "dev": data.dev, "test": data.test}
    # the manifest is rewritten after every split and lists the finished ones: a kill keeps
    # them, and files an earlier run with other settings left are never taken for ours
    previous = read_json(folder / MANIFEST) if len(job.todo[seed]) < len(SPLITS) else {}
    timings = dict(previous.get("seconds", {}))
    manifest = {}
    for split in job.todo[seed]:
        started = time.perf_counter()
        cols = batches(splits[split], cfg.col_batch_size, job, data)
        desc = f"seed {seed} {split}"
        if cfg.projection_dim is not None:
            phi_rows = ntk.projected_features(
                fn, params, rows, cfg.projection_dim, seed=cfg.projection_seed
            )
            phi_cols = ntk.projected_features(
                fn, params, cols, cfg.projection_dim, seed=cfg.projection_seed
            )
            local = ntk.projected_kernel(phi_rows, phi_cols)
        elif cfg.formula == "asymmetric_signgd":
            local = ntk.asymmetric_pair(
                fn,
                params,
                rows,
                cols,
                param_block_numel=cfg.param_block_numel,
                progress=cfg.progress and info.rank == 0,
                desc=desc,
            )
        else:
            local = ntk.compute_kernel(
                fn,
                params,
                rows,
                cols,
                cfg.formula,
                param_block_numel=cfg.param_block_numel,
                progress=cfg.progress and info.rank == 0,
                desc=desc,
            )
        kernel = gather_rows(local, info, axis=1 if local.dim() == 5 else 0)
        if info.rank == 0:
            ntk.save_kernel(
                ntk.kernel_path(folder, split, cfg.task),
                kernel,
                targets(data, splits[split], cfg.binary),
            )
            if cfg.adjust_for_init:
                with torch.no_grad():
                    f0 = torch.cat([fn(dict(params), b).double().cpu() for b in cols])
                ntk.save_logits(
                    ntk.logits_path(folder, split, cfg.task),
                    f0,
                    targets(data, splits[split], cfg.binary),
                )
        timings[split] = round(time.perf_counter() - started, 3)
        manifest = {
            "format": "adaptlab.kernel/1",
            "identity": job.identities[seed],
            "splits": [s for s in SPLITS if s in timings or s not in job.todo[seed]],
            "model": describe_model(job.model_ref),
            "data": data.record,
            "grad_dim": ntk.grad_dim(params),
            "processes": info.world,
            "rows_per_rank": shards,
            "seconds": timings,
            "peak_memory_mib": peak_memory_mib(info.device),
            "created": now(),
        }
        if info.rank == 0:
            write_json(folder / MANIFEST, manifest)
    return manifest


def compute(job: Job) -> dict[int, dict]:
    """Every seed's kernels that are not on disk yet."""
    manifests = {}
    if not any(job.todo.values()):
        return manifests
    model = load(job)
    for seed in tqdm(job.cfg.seeds, desc="seeds", disable=not job.cfg.progress or job.info.rank):
        if job.todo[seed]:
            manifests[seed] = compute_seed(job, model, seed)
    return manifests


def kernel_folder(source: Path, cfg: KernelConfig, seed: int) -> Path:
    """A seed's kernel folder: ``{source}/{K}-{seed}``, or ``source`` itself for one seed."""
    folder = seed_dir(source, cfg, seed)
    if folder.is_dir() or len(cfg.seeds) > 1:
        return folder
    return source


def kernel_task_name(folder: Path, task: str) -> str:
    """The task name in the file names: ours, or upstream's lower-case one."""
    for name in (task, task.lower()):
        if ntk.kernel_path(folder, "train", name).is_file():
            return name
    raise KernelError(
        f"{folder} holds no {ntk.kernel_path(folder, 'train', task).name}; point load_kernels "
        "at a folder of saved kernels (one {K}-{seed} folder per seed) or drop it to compute."
    )


def write_predictions(out: Path, solver: str, result: ntk.SolveResult, best: dict) -> str:
    """Write the test predictions of one seed's best-dev setting of ``solver`` to
    ``predictions/{solver}_seed{seed}.jsonl``: one ``{"index", "label", "logits", "prediction"}``
    per test example in test-split order. A binary kernel's scalar f is written as the logits
    ``[-f, f]`` that its accuracy counts (label ``-1`` -> class 0, ``+1`` -> 1; f = 0 -> 0).

    Returns:
        The file's path relative to ``out`` (what ``sweep.json`` records).
    """
    path = f"{PREDICTIONS}/{solver}_seed{best['seed']}.jsonl"
    records = prediction_records(result.logits, result.labels.tolist())
    hits = sum(r["prediction"] == r["label"] for r in records)
    if hits / len(records) != best["test"]["accuracy"]:  # a guard on the bookkeeping above
        raise KernelError(f"The kept test logits of {path} do not give the sweep's accuracy.")
    write_jsonl(out / path, records)
    return path


def solve(job: Job, manifests: dict[int, dict]) -> dict:
    """Sweep the solver grid on every seed's kernels; write sweep.json and result.json."""
    cfg = job.cfg
    source = Path(cfg.load_kernels) if cfg.load_kernels else job.out
    kernels = {}
    for seed in cfg.seeds:
        folder = kernel_folder(source, cfg, seed)
        kernels[seed] = ntk.KernelSet.load(
            folder, kernel_task_name(folder, cfg.task), logits=cfg.adjust_for_init or None
        )
    tested = {}  # (seed, grid point) -> its test SolveResult, for the best ones' predictions

    def keep_test(seed: int, point: int, results: dict[str, ntk.SolveResult]) -> None:
        tested[seed, point] = results["test"]

    sweep = ntk.run_sweep(kernels, cfg.grid, progress=cfg.progress, on_solve=keep_test)
    job.out.mkdir(parents=True, exist_ok=True)
    by_solver = {}
    for name in cfg.solvers:
        gathered = ntk.gather([t for t in sweep["trials"] if t["settings"]["solver"] == name])
        best = []
        for b in gathered["best"]:  # per seed: the best dev setting, its test file beside it
            path = write_predictions(job.out, name, tested[b["seed"], b["point"]], b)
            best.append(
                {k: b[k] for k in ("seed", "settings", "dev", "test")} | {"predictions": path}
            )
        by_solver[name] = gathered["summary"] | {"best": best}
    sweep["by_solver"] = by_solver
    ntk.write_sweep(job.out / SWEEP, sweep)
    result = {
        "format": "adaptlab.kernel_result/1",
        "config": to_dict(cfg),
        "kernels": str(source),
        "summary": sweep["summary"],
        "by_solver": {
            name: {k: v for k, v in s.items() if k != "best"} for name, s in by_solver.items()
        },
        "seeds": {str(s): m for s, m in manifests.items()},
        "timings": {
            "total_seconds": round(time.perf_counter() - job.started, 3),
            "sweep_seconds": round(sweep["seconds"], 3),
        },
        "versions": package_versions(),
        "hardware": hardware(),
        "created": now(),
    }
    sweep_temporaries(job.out)
    write_json(job.out / RESULT, result)
    return result


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(KernelConfig, argv)
    with report_user_errors(), exit_on_sigterm(f"the finished kernels in {cfg.output_dir}"):
        job = setup(cfg)
        manifests = compute(job)
        if job.info.rank == 0:
            result = solve(job, manifests)
            for name, summary in result["by_solver"].items():
                print(
                    f"{cfg.task} {cfg.shots}-shot, {cfg.formula} kernel, {name}: test accuracy "
                    f"{summary['test_mean']:.1f} ({summary['test_std']:.1f}) over "
                    f"{summary['n_seeds']} seed(s) -> {job.out / RESULT}"
                )
        if job.lock is not None:
            job.lock.release()
    shutdown(job.info)


if __name__ == "__main__":
    sys.exit(main())
