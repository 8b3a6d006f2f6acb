"""Skill localization by grafting (Panigrahi et al. 2023, graft.md): learn a sparse mask γ that
grafts the fine-tuned weights onto the pretrained model, θ = θ_pre + γ ⊙ (θ_ft − θ_pre).

The eligible parameters E are the ones the fine-tuning run trained (its own freezing flags,
read from the run). The base patch b holds exactly k = ⌊s·N_E⌋ entries of largest |Δ| (ties by
position), nothing (``--base_patch zero``) or an earlier mask; the scores S ~ U[0, 1) then take
``mask_steps`` plain gradient steps (graft.md §5: A batches averaged, step η, no optimiser),
and the binary mask with the best train + dev score is kept (later ties win). Base, fine-tuned
and grafted models are evaluated on train, dev and test (accuracy, F1 where the task's metric
is F1, ECE) and on ``ood_tasks``; ``reliability.png`` draws their reliability diagrams.

Outputs in ``--output_dir``: ``mask/`` (``graft_config.json`` + ``graft_mask.safetensors``: the
mask, the scores and Δ at the mask, so the folder plus θ_pre rebuilds the grafted model, like
a PEFT adapter; ``adaptlab.graft.apply_graft`` loads it and the extraction, analysis and kernel
scripts take it as ``--model``), ``result.json``, ``reliability.json`` / ``.png``. A killed
run started again with the same command resumes after the last finished mask step.

Launch:
    # laptop / CPU: fine-tune the embedded SmolLM2-135M on 8 tweets (a few minutes), then graft
    # it at sparsity 1e-4 (about a minute and a half on 2 cores)
    python scripts/finetune.py --config scripts/configs/finetune_graft_demo.yaml
    python scripts/graft.py --config scripts/configs/graft_demo.yaml

    # the paper: RoBERTa-base, SST-2 16-shot, SGD fine-tuning, then the graft
    python scripts/finetune.py --config scripts/configs/finetune_graft_paper.yaml \
        --output_dir results/ft/sst2-16-13
    python scripts/graft.py --config scripts/configs/graft_paper.yaml \
        --finetuned results/ft/sst2-16-13 --output_dir results/graft/sst2-16-13

    # evaluate a saved mask only, and export the grafted model as a Hugging Face folder
    python scripts/graft.py --finetuned results/ft/sst2-16-13 --eval_only true \
        --mask results/graft/sst2-16-13/mask --export_model results/grafted/sst2

    # one GPU (deltas on the device): a 7B few-shot LoRA run, Δ its merged delta layer by
    # layer; or 4 GPUs with θ_pre, θ_ft, b and S sharded by FSDP2
    accelerate launch --config_file accelerate_configs/single_gpu.yaml scripts/graft.py \
        --finetuned results/ft/llama3-8b-sst2-lora --sparsity 1e-5
    sbatch --gpus-per-node=4 slurm/submit_graft --finetuned results/ft/llama3-8b-sst2-full

Trade-offs: ``deltas_on_device`` keeps θ_pre, θ_ft, b and S next to the model (fast; with E
eligible entries of a float32 model of size M: M + 4.25E in all, θ_pre, θ_ft, S and the
gradient E each and b a quarter); off, they stay in host memory and
each interpolation copies them tensor by tensor (the upstream behaviour: slow, but the
accelerator holds only the model and its gradient). ``accumulation`` x ``batch_size`` bounds
the examples one mask step reads; few-shot training sets are smaller, so a step is one epoch.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from adaptlab.config import parse_config, to_dict
from adaptlab.distributed import (
    DistInfo,
    all_gather_object,
    fsdp_requested,
    main_then_share,
    shutdown,
)
from adaptlab.errors import report_user_errors
from adaptlab.graft import (
    GraftError,
    GraftTensors,
    MaskHistory,
    MaskSettings,
    Selection,
    collect,
    export_model,
    learn_mask,
    load_mask,
    patch_size,
)
from adaptlab.graft.analysis import reliability_curves, strip_logits
from adaptlab.graft.artefact import read_config
from adaptlab.graft.config import PATCH_RULES, GraftConfig
from adaptlab.graft.eligible import check_same_shapes
from adaptlab.graft.learn import binary_masks, prepare_model
from adaptlab.graft.mask import binary
from adaptlab.graft.sharded import (
    all_sum,
    check_finite,
    collect_sharded,
    content_hash_sharded,
    gather_mask,
    gather_scores,
    init_scores_sharded,
    own_rows,
    save_parts,
    top_delta_patch_sharded,
)
from adaptlab.graft.source import (
    FinetunedSource,
    data_config,
    finetuned_tensors,
    resolve_finetuned,
    selection_of,
)
from adaptlab.graft.tuner import check_mask_fits
from adaptlab.io import read_json, save_tensors, sweep_temporaries, write_json
from adaptlab.models import (
    check_weights,
    describe_model,
    load_model,
    load_tokenizer,
    model_skeleton,
    resolve_model,
)
from adaptlab.rundir import Layout, RunLock, check_ours, clear_owned, is_empty, lock_output
from adaptlab.telemetry import hardware, now, package_versions, peak_memory_mib
from adaptlab.training.checkpoint import fingerprint
from adaptlab.training.fewshot import (
    FewShotData,
    evaluate_classification,
    model_kind,
    prepare_fewshot,
    scoring_parts,
)
from adaptlab.training.parallel import full_state_dict, shard_fsdp

RUN_FILE = "graft_run.json"
MASK_DIR = "mask"
RESUME_DIR = "resume"
LAYOUT = Layout(
    "grafting",
    markers=(RUN_FILE,),
    owned=(RUN_FILE, MASK_DIR, RESUME_DIR, "result.json", "reliability.json", "reliability.png"),
)
OPERATIONAL = frozenset(
    {"output_dir", "overwrite", "progress", "eval_batch_size", "export_model", "cpu", "dtype"}
)


@dataclass
class Job:
    """Everything validated before the models are loaded."""

    cfg: GraftConfig
    accelerator: Accelerator
    info: DistInfo
    fsdp: bool
    out: Path
    source: FinetunedSource | None
    base_ref: Any
    tokenizer: Any
    data: FewShotData
    ood: dict[str, list]
    data_config: dict[str, Any]
    selection: Selection | None
    mask_config: dict[str, Any] | None  # the --mask (eval_only) or --base_patch DIR config
    run_id: str
    state: str  # "new", "resume" or "complete"
    lock: RunLock | None
    started: float


def output_state(cfg: GraftConfig, out: Path, run_id: str) -> str:
    """``new``, ``resume`` or ``complete`` for this run in ``out`` (locked by it)."""
    if cfg.overwrite:
        check_ours(out, LAYOUT)
        clear_owned(out, LAYOUT)
        return "new"
    if is_empty(out):
        return "new"
    if not (out / RUN_FILE).is_file():
        raise GraftError(
            f"--output_dir {out} holds files that are not a graft run; pick another folder."
        )
    if read_json(out / RUN_FILE).get("fingerprint") != run_id:
        raise GraftError(
            f"--output_dir {out} holds a graft run with other settings; pick another folder or "
            "pass --overwrite true."
        )
    return "complete" if (out / "result.json").is_file() else "resume"


def setup(cfg: GraftConfig) -> Job:
    """Validate every input and prepare the data; nothing heavy, nothing written."""
    started = time.perf_counter()
    accelerator = Accelerator(cpu=cfg.cpu or not torch.cuda.is_available())
    info = DistInfo(accelerator.process_index, accelerator.num_processes, accelerator.device)
    use_fsdp = (fsdp_requested() if cfg.fsdp is None else cfg.fsdp) and info.world > 1
    out = Path(cfg.output_dir)
    lock = lock_output(out, "grafting", info.is_main, lambda e: all_gather_object(e, info))
    if info.world > 1 and not use_fsdp:
        raise GraftError(
            f"{info.world} processes graft only with FSDP2 (each holds a shard of θ_pre, θ_ft, "
            "b and S); launch with accelerate_configs/fsdp.yaml or pass --fsdp true."
        )
    source = resolve_finetuned(cfg.finetuned) if cfg.finetuned else None
    mask_config = None
    if cfg.eval_only:
        mask_config = read_config(cfg.mask)
    elif cfg.base_patch not in PATCH_RULES:
        mask_config = read_config(cfg.base_patch)
    base_name = cfg.base_model or (source.base_model if source else None)
    base_name = base_name or (mask_config or {}).get("base_model", {}).get("name")
    if base_name is None:
        raise GraftError(
            f"{cfg.finetuned} does not record its base model; pass --base_model (θ_pre)."
        )
    base_ref = resolve_model(base_name)
    check_weights(base_ref, allow_pickle_weights=cfg.allow_pickle_weights)
    if source is not None and source.kind == "model":
        check_weights(resolve_model(str(source.weights)))
    skeleton = model_skeleton(base_ref, trust_remote_code=cfg.trust_remote_code)
    if source is not None and source.kind == "model":
        check_same_shapes(skeleton, model_skeleton(resolve_model(str(source.weights))), base_name,
                          str(cfg.finetuned))  # fmt: skip
    tokenizer = load_tokenizer(base_ref, trust_remote_code=cfg.trust_remote_code)
    data_cfg = data_config(cfg, source.run_config if source else None, mask_config)
    if mask_config is not None and mask_config.get("data", {}).get("task") not in (
        None,
        data_cfg["task"],
    ):
        raise GraftError(
            f"The mask {cfg.mask or cfg.base_patch} was learned on task "
            f"{mask_config['data']['task']!r}, not {data_cfg['task']!r}; pass that task's mask."
        )
    kind = model_kind(skeleton.config)
    fewshot = dict(tokenizer=tokenizer, kind=kind, template=data_cfg["template"],
                   label_words=data_cfg["label_words"], scoring=data_cfg["scoring"])  # fmt: skip
    data = prepare_fewshot(
        data_cfg["task"],
        data_dir=data_cfg["task_dir"],
        k=data_cfg["shots"],
        seed=data_cfg["seed"],
        mode=data_cfg["kshot_mode"],
        test_limit=data_cfg["test_limit"],
        **fewshot,
    )
    ood = {}
    for name in cfg.ood_tasks:
        shifted = prepare_fewshot(name, data_dir=data_cfg["task_dir"], k=data_cfg["shots"],
                                  seed=data_cfg["seed"], test_limit=data_cfg["test_limit"],
                                  **fewshot)  # fmt: skip
        if list(shifted.task.labels) != list(data.task.labels):
            raise GraftError(
                f"OOD task {name!r} has labels {list(shifted.task.labels)}, not those of "
                f"{data.task.name!r} ({list(data.task.labels)}); pick a task with the same labels."
            )
        ood[shifted.task.name] = shifted.test
    selection = selection_of(cfg, source)
    settings = {k: v for k, v in to_dict(cfg).items() if k not in OPERATIONAL}
    identity = {"config": settings, "data": data.record, "base": describe_model(base_ref)}
    run_id = fingerprint(json.loads(json.dumps(identity, default=str)))
    # one process reads (and with --overwrite clears) the folder; every process learns the state
    state = main_then_share(lambda: output_state(cfg, out, run_id), info)
    state = all_gather_object(state, info)[0]
    return Job(cfg, accelerator, info, use_fsdp, out, source, base_ref, tokenizer, data, ood,
               data_cfg, selection, mask_config, run_id, state, lock, started)  # fmt: skip


@dataclass
class Engine:
    """The loaded θ_pre model and the graft tensors of E (this rank's shards under FSDP)."""

    model: torch.nn.Module
    tensors: GraftTensors
    n_params: int
    patch_rule: str
    k: int
    hashes: tuple[str, str]  # content hashes of θ_pre and θ_ft on E


def load(job: Job) -> Engine:
    """θ_pre on the device (sharded under FSDP), θ_ft of E, the base patch and the initial S."""
    cfg, device = job.cfg, job.accelerator.device
    model = load_model(job.base_ref, dtype=cfg.dtype, device=device,
                       trust_remote_code=cfg.trust_remote_code,
                       allow_pickle_weights=cfg.allow_pickle_weights).eval()  # fmt: skip
    n_params = sum(p.numel() for p in model.parameters())
    saved = load_mask(cfg.mask) if cfg.eval_only else None
    start = load_mask(cfg.base_patch) if cfg.base_patch not in PATCH_RULES else None
    for mask in (saved, start):
        if mask is not None:
            check_mask_fits(model, mask)  # the base it was learned on (content hash)
    names, finetuned = finetuned_tensors(job.source, job.selection, model, saved)
    if saved is not None and sorted(saved.names) != sorted(names):
        raise GraftError(
            f"The mask {cfg.mask} covers other parameters than {cfg.finetuned} trained; pass "
            "the mask learned from this fine-tuning run."
        )
    if job.fsdp:  # every eligible tensor is then a dim-0 shard: θ_pre, θ_ft, b, S alike
        model = shard_fsdp(model, job.info)
        tensors = collect_sharded(model, names, finetuned, on_device=cfg.deltas_on_device)
    elif callable(finetuned):
        tensors = collect(model, names, {n: finetuned(n) for n in names},
                          on_device=cfg.deltas_on_device)  # fmt: skip
    else:
        tensors = collect(model, names, finetuned, on_device=cfg.deltas_on_device)
    del finetuned
    check_finite(tensors)
    k, rule = 0, "mask" if (saved or start) else cfg.base_patch
    if rule == "highest_movement":
        k = patch_size(cfg.sparsity, tensors.n_eligible)
        if k == 0 and job.info.is_main:
            warnings.warn(
                f"sparsity={cfg.sparsity} of N_E={tensors.n_eligible} is an empty patch (k = 0); "
                "the mask is learned from nothing.",
                stacklevel=1,
            )
        tensors.base = top_delta_patch_sharded(tensors, k)
    dense = saved or start
    if dense is not None:  # a saved mask as the patch (eval_only: with S far below β)
        tensors.base = [
            own_rows(dense.dense(n), p).to(b.device)
            for n, p, b in zip(names, tensors.params, tensors.base, strict=True)
        ]
        k = dense.n_grafted
    tensors.scores = init_scores_sharded(tensors, torch.Generator().manual_seed(cfg.mask_seed))
    prepare_model(model, tensors)
    hashes = (content_hash_sharded(tensors, tensors.pre), content_hash_sharded(tensors, tensors.ft))
    if job.info.is_main:
        print(
            f"grafting {job.data.task.name}: N_E = {tensors.n_eligible:,} eligible of "
            f"{n_params:,} parameters ({len(names)} tensors), patch {rule} with k = {k:,}"
            + (f", sharded over {job.info.world} processes." if job.fsdp else ".")
        )
    return Engine(model, tensors, n_params, rule, k, hashes)


def split_examples(job: Job) -> dict[str, list]:
    """The evaluated sets: the training examples a mask step reads, dev, test and OOD tests."""
    n_train = job.cfg.accumulation * job.cfg.batch_size
    sets = {"train": job.data.train[:n_train], "dev": job.data.dev, "test": job.data.test}
    return {**sets, **{f"ood:{name}": ex for name, ex in job.ood.items()}}


def scorer(job: Job, splits: tuple[str, ...]):
    """``model -> {split: metrics}`` (accuracy, F1 where the task has it, ECE, loss, logits)."""
    sets = split_examples(job)
    pad = job.tokenizer.pad_token_id

    def score(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
        return {
            split: evaluate_classification(
                model, sets[split], job.data, job.accelerator, job.cfg.eval_batch_size, pad
            )  # fmt: skip
            for split in splits
        }

    return score


def batches_of(job: Job):
    """``step -> up to A batches`` of the training set, reshuffled every step (seeded)."""
    train, cfg, device = job.data.train, job.cfg, job.accelerator.device
    pad, collate = job.tokenizer.pad_token_id, scoring_parts(job.data)[1]

    def batches(step: int) -> list[dict[str, torch.Tensor]]:
        order = np.random.default_rng([cfg.mask_seed, step]).permutation(len(train))
        chunks = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        out = []
        for chunk in chunks[: cfg.accumulation]:
            batch = collate([train[i] for i in chunk], pad)
            out.append({key: value.to(device) for key, value in batch.items()})
        return out

    return batches


def loss_of(job: Job):
    """The task loss of a batch: CE over the label-word logits or the full options' scores."""
    objective = scoring_parts(job.data)[0]
    return lambda model, batch: objective(model, batch).loss


def metric_of(job: Job) -> str:
    return "f1" if "f1" in job.data.task.metrics else "accuracy"


def mask_record(job: Job, engine: Engine, history: MaskHistory | None) -> dict[str, Any]:
    """``graft_config.json``: what the mask is, what it was learned on and how."""
    t = engine.tensors
    return {
        "eligible": [
            {"name": n, "shape": list(p.shape)} for n, p in zip(t.names, t.params, strict=True)
        ],
        "n_eligible": t.n_eligible,
        "n_params": engine.n_params,
        "k": engine.k,
        "sparsity": job.cfg.sparsity,
        "patch": engine.patch_rule if engine.patch_rule != "mask" else str(job.cfg.base_patch),
        "sigmoid_bias": job.cfg.sigmoid_bias,
        "learning_rate": job.cfg.learning_rate,
        "mask_steps": job.cfg.mask_steps,
        "best_step": history.best_step if history else None,
        "selection": job.selection.as_dict() if job.selection else "adapter",
        "dtype": str(t.pre[0].dtype).removeprefix("torch."),
        "scores_saved": job.cfg.save_scores,
        "base_model": {
            "name": job.base_ref.name,
            "hash": engine.hashes[0],
        },
        "finetuned_model": {
            "name": str(job.cfg.finetuned),
            "hash": engine.hashes[1],
        },
        "data": job.data_config,
        "created": now(),
    }


def save_best(job: Job, engine: Engine, history: MaskHistory) -> None:
    """Write the best mask found so far to ``{out}/mask`` (every process takes part: the mask's
    positions, Δ there and S are gathered to the main process, which writes them)."""
    t = engine.tensors
    best = [s.to(c.device) for s, c in zip(history.best_scores, t.scores, strict=True)]
    masks = [binary(b, s, job.cfg.sigmoid_bias) for b, s in zip(t.base, best, strict=True)]
    parts = gather_mask(t, masks, best, with_scores=job.cfg.save_scores)
    if not job.cfg.save_scores:  # the best S stays in the resume state until the run ends
        whole = gather_scores(t, best)
        if job.info.is_main:
            (job.out / RESUME_DIR).mkdir(parents=True, exist_ok=True)
            save_tensors(job.out / RESUME_DIR / "best_scores.safetensors",
                         dict(zip(t.names, whole, strict=True)))  # fmt: skip
    if job.info.is_main:
        save_parts(job.out / MASK_DIR, mask_record(job, engine, history), parts)


def save_resume(job: Job, engine: Engine, history: MaskHistory) -> None:
    """The current S (whole) and the history, so a killed run continues after the last step."""
    t = engine.tensors
    scores = gather_scores(t, t.scores)
    if not job.info.is_main:
        return
    folder = job.out / RESUME_DIR
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / "scores.safetensors", dict(zip(t.names, scores, strict=True)))
    write_json(folder / "history.json", {"records": history.records, "best_step":
               history.best_step, "best_value": history.best_value})  # fmt: skip


def resumed_history(job: Job, engine: Engine) -> MaskHistory | None:
    """The history and S of an unfinished run in ``out`` (None for a new run)."""
    folder = job.out / RESUME_DIR
    if job.state != "resume" or not (folder / "history.json").is_file():
        return None
    from safetensors.torch import load_file

    saved = read_json(folder / "history.json")
    whole = load_file(str(folder / "scores.safetensors"))
    best = load_mask(job.out / MASK_DIR).scores or load_file(
        str(folder / "best_scores.safetensors")
    )
    t = engine.tensors
    t.scores = [
        own_rows(whole[n], p).to(s.device, s.dtype)
        for n, p, s in zip(t.names, t.params, t.scores, strict=True)
    ]
    best_scores = [own_rows(best[n], p).cpu() for n, p in zip(t.names, t.params, strict=True)]
    history = MaskHistory(saved["records"], saved["best_step"], saved["best_value"], best_scores)
    if job.info.is_main:
        print(f"resuming after mask step {history.records[-1]['step']}")
    return history


def learn(job: Job, engine: Engine) -> MaskHistory:
    """The mask steps (or the saved mask with ``eval_only``), saving the best as it goes."""
    cfg = job.cfg
    settings = MaskSettings(cfg.learning_rate, cfg.sigmoid_bias, cfg.mask_steps, metric_of(job))
    if cfg.eval_only:
        settings = MaskSettings(cfg.learning_rate, cfg.sigmoid_bias, 0, metric_of(job))
    plain = scorer(job, ("train", "dev"))

    def score(model):
        return strip_logits(plain(model))

    def on_step(step: int, history: MaskHistory, improved: bool) -> None:
        if improved and not cfg.eval_only:
            save_best(job, engine, history)
        if not cfg.eval_only:
            save_resume(job, engine, history)

    history = resumed_history(job, engine)
    return learn_mask(engine.model, engine.tensors, settings, batches_of(job), loss_of(job), score,
                      history=history, on_step=on_step, progress=cfg.progress)  # fmt: skip


def evaluate_models(job: Job, engine: Engine, history: MaskHistory) -> dict[str, dict]:
    """Base (θ_pre), fine-tuned (θ_ft on E) and grafted (best γ_bin) on every split."""
    t, beta = engine.tensors, job.cfg.sigmoid_bias
    score = scorer(job, tuple(split_examples(job)))
    results = {"base": score(engine.model)}
    t.set_fractional([1.0] * len(t))
    results["finetuned"] = score(engine.model)
    t.scores = [s.to(c.device) for s, c in zip(history.best_scores, t.scores, strict=True)]
    t.set_binary(binary_masks(t, beta))
    results["grafted"] = score(engine.model)
    t.reset()
    return results


def export_grafted(job: Job, engine: Engine, masks: list[torch.Tensor]) -> None:
    """θ_pre + γ_bin ⊙ Δ as a Hugging Face folder (a sharded model is gathered first)."""
    t = engine.tensors
    t.set_binary(masks)
    state = (
        full_state_dict(job.accelerator, engine.model, trainable_only=False) if job.fsdp else None
    )
    if job.info.is_main:
        meta = {"mask": str(job.out / MASK_DIR), "base_model": job.base_ref.name}
        export_model(engine.model, job.cfg.export_model, job.tokenizer, meta=meta, state_dict=state)
    t.reset()


def finalize(job: Job, engine: Engine, history: MaskHistory) -> dict[str, Any]:
    """Evaluate the three models, export the grafted one, write the result and the figures."""
    from adaptlab.plotting.graft import plot_reliability

    cfg, t = job.cfg, engine.tensors
    results = evaluate_models(job, engine, history)
    masks = binary_masks(t, cfg.sigmoid_bias)  # the best scores are in place after evaluation
    n_grafted = int(all_sum(float(sum(int(m.sum()) for m in masks)), t))
    if cfg.export_model:
        export_grafted(job, engine, masks)
    result: dict[str, Any] = {}
    if job.info.is_main:
        labels = [int(ex["label"]) for ex in job.data.test]
        curves = reliability_curves({m: r["test"]["logits"] for m, r in results.items()}, labels)
        write_json(job.out / "reliability.json", curves)
        plot_reliability(
            {name: (c["probs"], c["labels"]) for name, c in curves.items()},
            job.out / "reliability.png",
        )
        result = {
            "format": "adaptlab.graft_result/1",
            "fingerprint": job.run_id,
            "config": to_dict(cfg),
            "data": job.data.record,
            "base_model": describe_model(job.base_ref),
            "finetuned": str(cfg.finetuned),
            "patch": {"rule": engine.patch_rule, "k": engine.k},
            "n_grafted": n_grafted,
            "fraction_eligible": n_grafted / t.n_eligible,
            "fraction_all": n_grafted / engine.n_params,
            "n_eligible": t.n_eligible,
            "n_params": engine.n_params,
            "metric": metric_of(job),
            "splits": {model: strip_logits(m) for model, m in results.items()},
            "history": history.records,
            "best_step": history.best_step,
            "parallel": {"processes": job.info.world, "fsdp": job.fsdp},
            "timings": {
                "total_seconds": round(time.perf_counter() - job.started, 3),
                "peak_memory_mib": peak_memory_mib(job.accelerator.device),
            },
            "versions": package_versions(),
            "hardware": hardware(),
            "created": now(),
        }
        write_json(job.out / "result.json", result)
        if (job.out / RESUME_DIR).is_dir():
            shutil.rmtree(job.out / RESUME_DIR)
        sweep_temporaries(job.out)
    return result


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(GraftConfig, argv)
    with report_user_errors():
        job = setup(cfg)
        if job.state == "complete":
            if job.info.is_main:
                print(f"{job.out} already holds this graft's results; nothing to do.")
            shutdown(job.info)
            return
        engine = load(job)  # the last checks (content hashes, finite Δ) need the weights
        if job.info.is_main:
            write_json(job.out / RUN_FILE, {"fingerprint": job.run_id, "config": to_dict(cfg)})
        history = learn(job, engine)
        result = finalize(job, engine, history)
    if job.info.is_main:
        test = {m: result["splits"][m]["test"][result["metric"]] for m in result["splits"]}
        print(
            f"graft of {result['n_grafted']:,} entries ({result['fraction_eligible']:.2e} of "
            f"N_E) -> {job.out}: test {result['metric']} base {test['base']:.3f}, fine-tuned "
            f"{test['finetuned']:.3f}, grafted {test['grafted']:.3f}"
        )
    if job.lock is not None:
        job.lock.release()
    shutdown(job.info)


if __name__ == "__main__":
    sys.exit(main())
