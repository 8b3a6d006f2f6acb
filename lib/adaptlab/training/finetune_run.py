"""The stages of ``scripts/finetune.py`` before training: the run's job (config, data, method,
output folder) and its loaded state (model, optimiser, scheduler, resume point).

``setup`` checks everything it can before any weights are read (the config, the output folder,
the method against the model skeleton, the parallel strategy); ``load`` builds the model and
optimiser on the run's accelerator and restores a killed run. The script's training loop,
evaluation and final report use them::

    job = setup(cfg)
    run = load(job)
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from adaptlab.config import to_dict
from adaptlab.data import split_tasks
from adaptlab.distributed import DistInfo, load_from_rank0, main_then_share
from adaptlab.io import read_json, sweep_temporaries, write_json
from adaptlab.models import (
    check_load,
    check_weights,
    describe_model,
    load_model,
    load_tokenizer,
    model_skeleton,
    resolve_model,
)
from adaptlab.rundir import (
    LOCK_FILE,
    RunLock,
    check_ours,
    clear_owned,
    is_empty,
    lock_output,
)
from adaptlab.telemetry import now
from adaptlab.training import checkpoint as ckpt
from adaptlab.training.checkpoint import ResumeError, TrainerState
from adaptlab.training.config import OPERATIONAL_FIELDS, FinetuneConfig
from adaptlab.training.data import Data, mmlu_data, multi_task_data, task_data
from adaptlab.training.fewshot import (
    init_linear_head,
)
from adaptlab.training.generation import (
    GENERATION_TASKS,
    generation_data,
)
from adaptlab.training.ivon_hessian import load_hessian
from adaptlab.training.ivon_zero import ZeroIVON
from adaptlab.training.l1_to_init import L1ToInit
from adaptlab.training.loop import (
    BatchPlan,
    RunLogger,
    check_reporter,
)
from adaptlab.training.methods import Method, check_method, count_parameters
from adaptlab.training.objectives import attach_linear_head
from adaptlab.training.optim import build_optimizer
from adaptlab.training.parallel import (
    REPLICATED_TRAINABLE,
    Strategy,
    check_strategy,
    hidden_from_accelerate,
    requested_strategy,
    resolve_strategy,
    shard_fsdp,
    trainable_as_on_rank0,
)
from adaptlab.training.schedules import build_scheduler, resolve_warmup_steps
from adaptlab.training.zero import deepspeed_engine, fill_deepspeed_config, zero3_loading


@dataclass
class Job:
    """Everything validated before the model is loaded."""

    cfg: FinetuneConfig
    accelerator: Accelerator
    strategy: Strategy
    deepspeed_config: dict | None  # the DeepSpeed JSON with its "auto" entries filled
    out: Path
    run_id: str
    run_config: dict
    state: str  # "new", "resume" or "complete"
    resume_dir: Path | None
    method: Method
    model_ref: object
    tokenizer: object
    data: Data
    plan: BatchPlan
    total_steps: int
    started: float
    fsdp_from_rank0: bool = False  # FSDP: only rank 0 reads the weights (see load)
    replicate_trainable: bool = False  # FSDP shards only the frozen weights (IVON, AdaLoRA)
    lock: RunLock | None = None  # the output folder's lock (main process)


@dataclass
class Run:
    """The loaded model and optimiser, and where training stands."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    state: TrainerState
    logger: RunLogger
    n_trainable: int
    n_params: int
    penalty: L1ToInit | None = None  # λ·Σ|θ − θ_init| (l1_to_init > 0)
    bar: tqdm | None = None


def output_state(
    cfg: FinetuneConfig, out: Path, run_id: str, run_config: dict
) -> tuple[str, Path | None]:
    """Whether this run is new, resumes (and from where) or is already complete.

    ``out`` is locked by this run. A ``run.json`` of another run that left nothing to resume or
    keep (it failed before its first checkpoint) does not block a new run.
    """
    if cfg.overwrite:
        check_ours(out, ckpt.LAYOUT)
    if cfg.resume_from:
        source = Path(cfg.resume_from)
        folder = source if (source / ckpt.STATE_FILE).is_file() else source / ckpt.STATE
        saved = ckpt.read_state(folder)
        if saved is None:
            raise ResumeError(
                f"--resume_from {source} holds no resume state ({ckpt.STATE}/{ckpt.STATE_FILE}); "
                "pass the folder of an unfinished run."
            )
        ckpt.check_same_run(saved.fingerprint, saved.config, run_id, run_config, source)
        if folder.parent.resolve() != out.resolve() and not is_empty(out) and not cfg.overwrite:
            raise ResumeError(
                f"--output_dir {out} is not empty; pick a new folder to continue {source} in, or "
                "pass --overwrite true."
            )
        return "resume", folder.parent
    if cfg.overwrite or is_empty(out):
        return "new", None
    if not (out / ckpt.RUN_FILE).is_file():
        raise ResumeError(
            f"--output_dir {out} holds files that are not a fine-tuning run; pick another "
            "folder (--overwrite removes only a fine-tuning run's own files)."
        )
    recorded = read_json(out / ckpt.RUN_FILE)
    if recorded.get("fingerprint") != run_id and not ckpt.has_results(out):
        return "new", None
    ckpt.check_same_run(recorded["fingerprint"], recorded["config"], run_id, run_config, out)
    if (out / ckpt.RESULT_FILE).is_file():
        return "complete", None
    if ckpt.read_state(out / ckpt.STATE) is not None:
        return "resume", out
    return "new", None


def setup(cfg: FinetuneConfig) -> Job:
    """Validate every input and prepare the data; nothing heavy, nothing written."""
    started = time.perf_counter()
    requested = requested_strategy(cfg.fsdp, cfg.deepspeed)
    with hidden_from_accelerate(requested):
        accelerator = Accelerator(
            cpu=cfg.cpu or not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision
        )
    out = Path(cfg.output_dir)
    # held until the process ends: a second run into this folder is refused, not mixed in
    lock = lock_output(
        out, "fine-tuning", accelerator.is_main_process, lambda e: gather_object([e])
    )
    strategy = resolve_strategy(requested, accelerator.num_processes)
    check_reporter(cfg.report_to)
    check_strategy(
        strategy,
        cfg.optimizer,
        cfg.method,
        cfg.from_linearhead,
        cfg.l1_to_init,
        cfg.ivon_mc_samples,
    )
    model_ref = resolve_model(cfg.model)
    # one process reads the weight headers (under FSDP only rank 0 may open the checkpoint)
    info = DistInfo(accelerator.process_index, accelerator.num_processes, accelerator.device)
    main_then_share(
        lambda: check_weights(model_ref, allow_pickle_weights=cfg.allow_pickle_weights), info
    )
    skeleton = model_skeleton(model_ref, trust_remote_code=cfg.trust_remote_code)
    tokenizer = load_tokenizer(model_ref, trust_remote_code=cfg.trust_remote_code)
    if cfg.task == "mmlu":
        data = mmlu_data(cfg, tokenizer)
    elif cfg.task in GENERATION_TASKS:
        data = generation_data(cfg, tokenizer, skeleton.config)
    elif len(split_tasks(cfg.task)) > 1:
        data = multi_task_data(cfg, tokenizer, skeleton.config)
    else:
        data = task_data(cfg, tokenizer, skeleton.config)
    plan = BatchPlan(
        len(data.train_items),
        cfg.batch_size,
        cfg.micro_batch_size,
        accelerator.num_processes,
        accelerator.process_index,
        cfg.seed,
    )
    total_steps = cfg.max_steps or cfg.epochs * plan.steps_per_epoch
    method = check_method(cfg, skeleton, total_steps)
    check_load(
        model_ref,
        skeleton,
        device=accelerator.device,
        dtype=cfg.dtype,
        attn_implementation=cfg.attn_implementation,
        quantization=method.quantization,
    )
    resolve_warmup_steps(total_steps, cfg.warmup_steps, cfg.warmup_ratio)
    deepspeed_config = None
    if strategy.zero_stage is not None:
        deepspeed_config = fill_deepspeed_config(
            strategy.deepspeed_config,
            micro_batch_size=cfg.micro_batch_size,
            accumulation=plan.accumulation,
            world=accelerator.num_processes,
            max_grad_norm=cfg.max_grad_norm,
            bf16=cfg.mixed_precision == "bf16",
            hidden_size=skeleton.config.hidden_size,
        )

    settings = {k: v for k, v in to_dict(cfg).items() if k not in OPERATIONAL_FIELDS}
    run_config = json.loads(json.dumps(settings, default=str))
    identity = {
        "config": run_config,
        "model": describe_model(model_ref),
        **data.identity,
        "processes": accelerator.num_processes,
        "strategy": strategy.name,
    }
    run_id = ckpt.fingerprint(identity)
    state, resume_dir = output_state(cfg, out, run_id, run_config)
    accelerator.wait_for_everyone()  # every process reads the folder before the main one writes
    return Job(
        cfg=cfg,
        accelerator=accelerator,
        strategy=strategy,
        deepspeed_config=deepspeed_config,
        out=out,
        run_id=run_id,
        run_config=run_config,
        state=state,
        resume_dir=resume_dir,
        method=method,
        model_ref=model_ref,
        tokenizer=tokenizer,
        data=data,
        plan=plan,
        total_steps=total_steps,
        started=started,
        fsdp_from_rank0=(
            strategy.name == "fsdp" and method.quantization is None and not model_ref.adapters
        ),
        replicate_trainable=(
            strategy.name == "fsdp" and bool({cfg.optimizer, cfg.method} & REPLICATED_TRAINABLE)
        ),
        lock=lock,
    )


def prepare_output(job: Job) -> None:
    """Clear a new run's folder of an earlier run's files (only those) or copy the run to
    continue, sweep what killed writes left, then record this run."""
    if job.accelerator.is_main_process:
        if job.state == "new":
            clear_owned(job.out, ckpt.LAYOUT)
        elif job.resume_dir is not None and job.resume_dir.resolve() != job.out.resolve():
            clear_owned(job.out, ckpt.LAYOUT)
            shutil.copytree(
                job.resume_dir,
                job.out,
                dirs_exist_ok=True,
                ignore=lambda folder, names: [n for n in names if n == LOCK_FILE],
            )
        sweep_temporaries(job.out)
        record = {"fingerprint": job.run_id, "config": job.run_config, "started": now()}
        write_json(job.out / ckpt.RUN_FILE, record)
    job.accelerator.wait_for_everyone()


def load(job: Job) -> Run:
    """Load, wrap and shard the model, build the optimiser, prepare the folder, resume if asked."""
    cfg, acc, strategy = job.cfg, job.accelerator, job.strategy
    set_seed(cfg.seed)
    quantized = job.method.quantization is not None
    # FSDP: rank 0 reads the weights, the other ranks build the model on the meta device and
    # receive their shards (4-bit weights quantize while loading, so every rank loads those).
    from_rank0 = job.fsdp_from_rank0
    empty = from_rank0 and not acc.is_main_process
    # 4-bit weights are quantized while loading, which zero.Init cannot partition: ZeRO-3
    # partitions them (packed in the compute dtype) when the engine starts, as FSDP does.
    with zero3_loading(None if quantized else job.deepspeed_config):
        model = load_model(
            job.model_ref,
            dtype=cfg.dtype,
            # FSDP moves only this rank's shards to the device (4-bit weights quantize there)
            device="cpu" if strategy.name == "fsdp" and not quantized else acc.device,
            compute_device=acc.device,  # bf16 and flash-attention 2 on GPUs, also under FSDP
            attn_implementation=cfg.attn_implementation,
            quantization=job.method.quantization,
            trust_remote_code=cfg.trust_remote_code,
            allow_pickle_weights=cfg.allow_pickle_weights,
            shardable_4bit=strategy.name in ("fsdp", "zero3"),
            empty=empty,
        )
        # PEFT gathers partitioned base weights where an adapter's init reads them (DoRA)
        model = job.method.prepare(model, cfg, job.total_steps)
        if cfg.head == "linear":  # a resumed run gets its trained head from the resume state,
            # but l1_to_init needs the head it started from, so the fit is done again
            refit = job.state != "resume" or cfg.l1_to_init > 0
            head = init_linear_head(
                model,
                job.data.fewshot,
                job.tokenizer.pad_token_id,
                from_logistic=cfg.from_linearhead and refit and not empty,
                batch_size=cfg.eval_batch_size,
                progress=cfg.progress and acc.is_main_process,
            )
            attach_linear_head(model, head.to(next(model.parameters()).device))
    if from_rank0:
        trainable_as_on_rank0(model)
    n_trainable, n_params = count_parameters(model)
    if strategy.name == "fsdp":
        info = DistInfo(acc.process_index, acc.num_processes, acc.device)
        whole = model.state_dict() if from_rank0 and acc.is_main_process else {}
        model = shard_fsdp(
            model,
            info,
            mixed_precision=cfg.mixed_precision,
            replicate_trainable=job.replicate_trainable,
        )
        if from_rank0:
            load_from_rank0(model, whole)
            del whole
    optimizer = build_optimizer(
        cfg.optimizer,
        model,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        betas=cfg.betas,
        eps=cfg.eps,
        ivon_ess=cfg.ivon_ess or len(job.data.train_items),
        ivon_hess_init=cfg.ivon_hess_init,
        ivon_mc_samples=cfg.ivon_mc_samples,
        ivon_beta2=cfg.ivon_beta2,
        ivon_clip_radius=math.inf if cfg.ivon_clip_radius is None else cfg.ivon_clip_radius,
        ivon_hess_approx=cfg.ivon_hess_approx,
        ivon_sync=acc.num_processes > 1,
        ivon_seed=cfg.seed,  # ivon: the same posterior draws on every process
        ivon_zero=strategy.zero_stage is not None,  # ivon: steps the engine's partitions
    )
    scheduler = build_scheduler(
        cfg.schedule,
        optimizer,
        job.total_steps,
        cfg.warmup_steps,
        cfg.warmup_ratio,
        cfg.min_lr_ratio,
        clr=cfg.clr_shape(),
    )
    if strategy.zero_stage is not None:
        # AdaLoRA's penalty and rank masks read the adapter whole: ZeRO-3 keeps it gathered
        adalora = cfg.method == "adalora" and isinstance(optimizer, ZeroIVON)
        vilora = adalora and cfg.vilora_criterion != "sensitivity"
        engine = deepspeed_engine(model, optimizer, job.deepspeed_config, adalora)
        if isinstance(optimizer, ZeroIVON):  # h and the momentum on the engine's partitions
            optimizer.attach(engine)
            # AdaLoRA's sensitivity allocator reads each step's whole averaged gradient
            optimizer.keep_gradients = cfg.method == "adalora" and not vilora
    if cfg.ivon_hessian_from is not None:  # a resume then restores the run's own h
        load_hessian(Path(cfg.ivon_hessian_from), model, optimizer)
    if strategy.zero_stage is not None:
        model = engine
    elif strategy.name == "ddp":
        model, optimizer = acc.prepare(model, optimizer)
    prepare_output(job)
    # Every rank built the same model; from here the randomness of training (dropout masks,
    # ivon-opt's posterior draws) is each process's own: seed + rank (a resume restores it).
    set_seed(cfg.seed, device_specific=True)
    # θ_init is the weights as loaded and prepared, before a resume restores the trained ones,
    # so a resumed run pulls towards the same weights as the run it continues
    penalty = L1ToInit(model, cfg.l1_to_init) if cfg.l1_to_init > 0 else None

    resume_step = None
    if job.state == "resume":
        folder = job.out / ckpt.STATE
        state, method_state = ckpt.load_state(acc, model, optimizer, scheduler, folder)
        job.method.load_state(model, method_state)
        resume_step = state.step
    else:
        state = TrainerState(fingerprint=job.run_id, config=job.run_config)
    logger = RunLogger(
        job.out,
        cfg.report_to,
        acc.is_main_process,
        cfg.run_name or job.out.name,
        cfg.wandb_project,
        job.run_id[:16],
        to_dict(cfg),
        resume_step,
    )
    if acc.is_main_process:
        resumed = f", resumed at step {resume_step}" if resume_step is not None else ""
        print(
            f"{cfg.method} on {cfg.model}: {job.data.summary}, {job.total_steps} steps of "
            f"{cfg.batch_size} ({job.plan.accumulation} micro-batches per process), "
            f"{n_trainable:,} of {n_params:,} parameters train{resumed}."
        )
    return Run(model, optimizer, scheduler, state, logger, n_trainable, n_params, penalty)
