"""Fine-tune an LM on answer-only MMLU prompts (Doimo et al. 2024, landscape.md §4) or on a
few-shot task with the label-word loss (LM-BFF prompt-based fine-tuning, kernel.md §4, §10).

Methods: full fine-tuning, LoRA, DoRA, AdaLoRA, BitFit, QLoRA (PEFT adapters), Houlsby /
Pfeiffer / parallel bottleneck adapters (Llama, GPT-2 and BERT/RoBERTa); freezing of the head,
the embeddings or the first blocks on top. Optimisers AdamW / SGD / SignGD / IVON (``ivon``,
adaptlab's own; ``ivon_opt``, the GPL ivon-opt package kept for comparisons) with linear,
cosine-to-floor, constant or ViLoRA's clr schedules after warmup. The loss is taken on the
answer letter only (optionally weighted so every subject counts alike). During training the
model is evaluated at ``eval_points`` evenly spaced steps (accuracy micro/macro, constrained to
the four letters and over the full vocabulary, ECE, loss) and the best one is kept in ``best/``;
weights are saved at log-spaced steps (``checkpoints/step_{s}``, adapter-only for PEFT methods)
for the fine-tuning dynamics. A killed run started again with the same command resumes exactly.
SIGTERM (SLURM pre-emption, ``scancel``, a time limit) does not kill at once: every process
finishes the current optimiser step, the resume state is saved and the run exits with status
143, so SLURM sees an unfinished job (``sbatch --requeue`` restarts it, and it continues).

With ``--task SST-2`` (any few-shot task of ``adaptlab.data.TASKS``) the run trains on the k-shot
split (``shots`` per label, ``data_seed``) with cross-entropy over the label-word logits at the
mask (masked LMs) or the last prompt token (causal LMs), keeps the best dev-accuracy weights
and evaluates the test split at the end and at every new best (``metrics.test_at_best``, the
upstream protocol): the fine-tuning the eNTK of ``scripts/compute_kernel.py`` predicts.
Evaluations report accuracy, ``macro_f1``, the task's F1/MCC, ECE and loss; every test evaluation
also writes ``predictions/test_step_{step}.jsonl``, one ``{"index", "label", "logits",
"prediction"}`` per test example in test-set order (the logits accuracy and ECE were computed
from), which the test metrics name under ``predictions``.
``--extra_test_tasks [mnli-mm]`` scores other tasks' test splits the same way, with the run's
prompt (``metrics.extra_tests``, ``adaptlab.training.extra_tests``).
``--scoring options`` (causal LMs) scores each class by its whole option instead, the summed
log-probabilities of the tokens of ``" " + word`` after the prompt (C rows per example), so
label words may be several tokens and options sharing a first token stay apart (graft.md §9).
``--head linear`` is the no-prompt variant: a new linear head on the first token (masked LMs) or
the last (causal LMs), optionally started from logistic regression on the pretrained features
(``--from_linearhead true``) and saved beside the weights as ``linear_head.safetensors``;
``--l2_loss true`` trains either head on the squared error to the one-hot label.
``--task STS-B`` (regression) needs ``--head linear``: one output, the squared error to the
unscaled score, least squares for ``--from_linearhead``; it reports pearson, spearman and corr.
``--task a+b`` (few-shot tasks with the same number of labels) fine-tunes one model on all of
them at once, the multi-task run whose per-task grafts graft.md §8 compares: the training sets
are concatenated, every example keeps its own task's prompt and label words (a batch carries
``label_word_ids`` ``[B, C]``), and each task's dev and test splits are scored apart
(``metrics.final["SST-2"]``, ...); ``accuracy`` is the mean over tasks, the selection metric.

``--task bbc-headline`` (causal LMs) is a generation task: the title of a BBC story from its
body, trained on the title + EOS tokens after ``"Article: {body}\\nTitle:"`` (body cut to
``source_max_tokens``, title to ``target_max_tokens``); dev and test titles are generated
(greedy by default, or ``--decoding top_p``) and scored by ROUGE-1/2/L and BLEU, the best step
picked by ``best_metric`` (``rougeL``), every evaluation's predictions kept in ``predictions/``
(``adaptlab.training.generation``). The hub generation tasks of spec §4 work the same way on
whole training splits: ``cnn-dailymail``, ``webnlg`` (BLEU against all references) and ``coqa``
(also the answer ``token_f1``); ``--label_smoothing`` smooths the answer tokens' cross-entropy.

The fine-tuning stage of skill localization by grafting (Panigrahi et al. 2023, graft.md §2)
adds upstream's options: ``--fix_layers n`` (freeze the embeddings and blocks 0..n-1),
``--l1_to_init λ`` (the penalty λ·Σ|θ − θ_init| on the trainable weights, logged as
``train/l1_to_init``; its gradient joins the gradients once per step, so accumulation, data
parallelism and FSDP2 shards get the same update, at the cost of one more copy of the trainable
weights; not with IVON or DeepSpeed) and ``--best_ties last`` (upstream's ``>=``: of equally good
evaluations the later one is kept in ``best/``).

An IVON run writes its Hessian diagonal h to ``ivon_hessian.safetensors`` (AdaLoRA: also
``ivon_hessian_resized.safetensors``, cut to the final rank pattern), which ``--ivon_hessian_from``
loads into a later run; ``--ivon_infer_mc_samples S`` evaluates with the logits averaged over S
seeded posterior draws (0: at the mean): a prompt's LM logits, or under ``--head linear`` the
head's logits (STS-B: its predicted scores), each draw perturbing the adapter and the head.

Launch:
    # laptop / CPU: a short LoRA run of the embedded SmolLM2-135M (~3 minutes)
    python scripts/finetune.py --config scripts/configs/finetune_demo.yaml

    # one GPU: the landscape SFT recipe (LoRA r64 on all projections, cosine to 1%)
    accelerate launch --config_file accelerate_configs/single_gpu.yaml scripts/finetune.py \
        --config scripts/configs/finetune_landscape_lora.yaml --model meta-llama/Meta-Llama-3-8B

    # several GPUs, data parallel (batch_size stays the global batch)
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml scripts/finetune.py \
        --config scripts/configs/finetune_landscape_lora.yaml --output_dir results/sft/llama3-8b

    # QLoRA on a 7B model in one 24 GB GPU
    accelerate launch scripts/finetune.py --config scripts/configs/finetune_qlora_7b.yaml

    # weights, gradients and optimiser state sharded over 8 GPUs: FSDP2 full shard with
    # activation checkpointing, FSDP + QLoRA, or DeepSpeed ZeRO-2 / ZeRO-3
    accelerate launch --config_file accelerate_configs/fsdp_full_shard_ac.yaml scripts/finetune.py \
        --config scripts/configs/finetune_landscape_lora.yaml --model meta-llama/Meta-Llama-3-70B
    accelerate launch --config_file accelerate_configs/fsdp_qlora.yaml scripts/finetune.py \
        --config scripts/configs/finetune_qlora_7b.yaml --model meta-llama/Meta-Llama-3-70B
    accelerate launch --config_file accelerate_configs/zero3.yaml scripts/finetune.py \
        --config scripts/configs/finetune_landscape_lora.yaml --mixed_precision bf16

    # the same under torchrun (--fsdp true, or --deepspeed with the ZeRO JSON)
    torchrun --nproc_per_node 8 scripts/finetune.py --config ... --fsdp true
    torchrun --nproc_per_node 8 scripts/finetune.py --config ... \
        --deepspeed accelerate_configs/deepspeed_zero2.json

    # two nodes x 8 GPUs on SLURM (FSDP2; one launcher per node, ranks from SLURM)
    ACCEL_CONFIG=accelerate_configs/multi_node.yaml sbatch --nodes=2 --gpus-per-node=8 \
        slurm/submit_finetune --config scripts/configs/finetune_landscape_lora.yaml

    # two CPU processes (gloo), to check a distributed run without a GPU (add --fsdp true to
    # shard; DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 ... --deepspeed ... for ZeRO)
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml scripts/finetune.py \
        --config scripts/configs/finetune_demo.yaml --output_dir results/finetune/demo_2proc

    # prompt-based few-shot fine-tuning with SGD (kernel.md §10), offline task or a k-shot split
    python scripts/finetune.py --config scripts/configs/finetune_fewshot_sgd.yaml \
        --task mmlu-topics --data_seed 13
    python scripts/finetune.py --config scripts/configs/finetune_fewshot_sgd.yaml \
        --model roberta-base --task SST-2 --task_dir data --data_seed 42
    # no prompt: a [CLS] linear head started from logistic regression (the linear-head kernel)
    python scripts/finetune.py --config scripts/configs/finetune_fewshot_sgd.yaml \
        --model roberta-base --task SST-2 --task_dir data --head linear \
        --from_linearhead true
    # title generation (ROUGE / BLEU) on the embedded BBC News articles
    python scripts/finetune.py --config scripts/configs/finetune_headline_demo.yaml
    # bottleneck adapters only (base frozen; best/ is an adapter folder, load_model reads it)
    python scripts/finetune.py --config scripts/configs/finetune_fewshot_sgd.yaml \
        --model roberta-base --task SST-2 --task_dir data --method houlsby \
        --adapter_reduction_factor 16

    # kernel-view adapters (peft_methods.md §2-§4): offline demos on SmolLM2, then the recipes
    python scripts/finetune.py --config scripts/configs/finetune_inducer_demo.yaml
    python scripts/finetune.py --config scripts/configs/finetune_kernel_mix_demo.yaml
    python scripts/finetune.py --config scripts/configs/finetune_prefix_demo.yaml
    python scripts/prepare_fewshot.py --tasks [SST-2] --mode k-shot --k 500 --seeds [42]
    python scripts/finetune.py --config scripts/configs/finetune_nlu_inducer_lora.yaml
    # GPT-2 NLG recipes (finetune_nlg_*.yaml, hub datasets): WebNLG by default, or CoQA / CNN-DM
    python scripts/finetune.py --config scripts/configs/finetune_nlg_inducer.yaml
    python scripts/finetune.py --config scripts/configs/finetune_nlg_inducer.yaml --task coqa \
        --output_dir results/nlg/inducer/coqa

    # multi-task: one model on two binary tasks, evaluated per task (selection: mean accuracy)
    python scripts/finetune.py --config scripts/configs/finetune_fewshot_sgd.yaml \
        --task tweet-sentiment+mmlu-topics-2 --data_seed 13

    # grafting's fine-tuning stage: RoBERTa-base, SGD on the 12 encoder layers only
    python scripts/prepare_fewshot.py --tasks [SST-2] --mode k-shot --seeds [13]
    python scripts/finetune.py --config scripts/configs/finetune_graft_paper.yaml

    # the fine-tuned adapter feeds the extraction like any model
    python scripts/extract_repr.py --model results/finetune/demo/checkpoints/step_5 ...

On a GPU the weights load in bf16 with flash-attention 2 when it is installed (SDPA otherwise);
``batch_size`` is always the global batch, so a run gives the same steps on 1, 2 or 16
processes. FSDP2 and the DeepSpeed engine are set up by this script, not by accelerate
(``adaptlab.training.parallel``), so the two-process CPU tests run the cluster code.

Trade-offs: ``packing`` puts several examples in one row (positions restart, no attention
across examples, same per-example losses) and roughly halves padded token slots on short
MMLU prompts; it does nothing at ``micro_batch_size=1``. ``gradient_checkpointing`` saves
activation memory at ~30% more compute;
``micro_batch_size`` trades memory for speed at a fixed global batch; ``checkpoints`` and
``save_state_every`` trade disk (a full-model state is ~3x the weights) for lost work on a kill;
FSDP shards everything (1/N memory) for an all-gather per block; only rank 0 reads the whole
model into CPU memory and the other ranks receive their shards from it (QLoRA and adapter-folder
bases load on every rank); ZeRO-2 shards only the optimiser state and gradients (no extra
traffic), ZeRO-3 also the weights, loaded straight into partitions; every strategy resumes
exactly with the same number of processes (FSDP and ZeRO write one state shard per process);
IVON and AdaLoRA keep the adapter whole on every rank under FSDP (only the frozen base sharded,
the adapter and its optimiser state replicated); under ZeRO, IVON's posterior is partitioned
like the master weights (one posterior draw per step) and AdaLoRA runs when IVON trains it;
IVON needs lr O(0.1-1) and no gradient clipping.
"""

from __future__ import annotations

import functools
import sys
import time

from accelerate.utils import gather_object
from tqdm.auto import tqdm

from adaptlab.config import parse_config, to_dict
from adaptlab.distributed import DistInfo, shutdown
from adaptlab.errors import report_user_errors
from adaptlab.io import sweep_temporaries, write_json
from adaptlab.models import (
    describe_model,
)
from adaptlab.signals import EXIT_STATUS, StopAtStep
from adaptlab.telemetry import hardware, now, package_versions, peak_memory_mib
from adaptlab.training import checkpoint as ckpt
from adaptlab.training.config import FinetuneConfig
from adaptlab.training.extra_tests import extra_test_metrics, extra_test_summary
from adaptlab.training.finetune_run import (
    Job,
    Run,
    load,
    setup,
)
from adaptlab.training.generation import (
    keep_predictions,
)
from adaptlab.training.ivon_hessian import save_run_hessian
from adaptlab.training.ivon_predict import mc_averaged_logits
from adaptlab.training.loop import (
    StepResult,
    device_peak_flops,
    eval_schedule,
    mfu,
    step_micro_batches,
    train_step,
)
from adaptlab.training.optim import hess_summary, uses_ivon
from adaptlab.training.sharded_state import optimizer_state_fraction, param_fraction
from adaptlab.training.zero import zero_train_step


def save_weights(job: Job, run: Run, name: str) -> None:
    """Write the weights to ``{out}/{name}`` (HF/PEFT format) and record the checkpoint."""
    step = run.state.step
    last_eval = (
        run.state.evals[-1] if run.state.evals and run.state.evals[-1]["step"] == step else None
    )
    meta = {
        "step": step,
        "epoch": step / job.plan.steps_per_epoch,
        "fingerprint": job.run_id,
        "method": job.cfg.method,
        "base_model": job.cfg.model,
        "eval": last_eval,
    }
    ckpt.save_weights(
        job.accelerator,
        run.model,
        job.out / name,
        adapter=job.method.adapter,
        tokenizer=job.tokenizer,
        meta=meta,
    )
    if name.startswith(ckpt.CHECKPOINTS) and name not in run.state.checkpoints:
        run.state.checkpoints.append(name)


def log_metrics(job: Job, run: Run, metrics: dict, prefix: str) -> None:
    """Log evaluation metrics; a multi-task run's per-task ones under ``{prefix}/{task}``."""
    run.logger.log(run.state.step, metrics, prefix)
    for task in job.data.tasks:
        run.logger.log(run.state.step, metrics[task], f"{prefix}/{task}")


def scores(job: Job, run: Run, split: str) -> dict:
    """Metrics of the evaluation (``dev``), ``test`` or an extra task's test split at the current
    step. Per-example predictions go to ``predictions/{split}_step_{step}.jsonl``: a generation
    task's generated texts of every split, a few-shot classification task's test logits
    (``{"index", "label", "logits", "prediction"}`` per test example, in test-set order); a
    test split's metrics then name that file under ``predictions``."""
    evaluate = {"dev": job.data.evaluate, "test": job.data.test, **job.data.extra_tests}[split]
    cfg = job.cfg  # IVON: logits averaged over ivon_infer_mc_samples draws (0: the mean)
    # a few-shot task's test splits keep their per-example logits (generation: every split)
    keep = {"keep": True} if split != "dev" and job.data.fewshot is not None else {}
    with mc_averaged_logits(run.model, run.optimizer, cfg.ivon_infer_mc_samples, cfg.seed):
        metrics = evaluate(run.model, job.accelerator, **keep)
    name = f"{ckpt.PREDICTIONS}/{split}_step_{run.state.step}.jsonl"
    named = split != "dev" and "predictions" in metrics
    metrics = keep_predictions(metrics, job.out / name, job.accelerator.is_main_process)
    return {**metrics, "predictions": name} if named else metrics


def evaluate_and_keep(job: Job, run: Run) -> None:
    """Evaluate at the current step, log it and keep the weights when they are the best."""
    cfg, state = job.cfg, run.state
    started = time.perf_counter()
    metrics = scores(job, run, "dev")
    state.evals.append({"step": state.step, **metrics})
    log_metrics(job, run, metrics, "eval")
    value = metrics[cfg.best_metric]
    if ckpt.is_better(cfg.best_metric, value, state.best, ties=cfg.best_ties):
        state.best = {"step": state.step, "metric": cfg.best_metric, "value": value}
        if job.data.test is not None:  # the upstream protocol: test the best-dev weights
            state.best["test"] = scores(job, run, "test")
            log_metrics(job, run, state.best["test"], "test")
            if job.data.extra_tests:  # e.g. MNLI mismatched, by the same weights
                state.best["extra_tests"] = {t: scores(job, run, t) for t in job.data.extra_tests}
                for task, metrics in state.best["extra_tests"].items():
                    run.logger.log(state.step, metrics, f"test/{task}")
        save_weights(job, run, ckpt.BEST)
    state.eval_seconds += time.perf_counter() - started


def log_step(job: Job, run: Run, result: StepResult, seconds: float) -> None:
    """Progress bar and logged training metrics of the step just taken."""
    acc, step = job.accelerator, run.state.step
    tokens_per_second = result.tokens / max(seconds, 1e-9)
    run.bar.update(1)
    run.bar.set_postfix(
        loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}", tok_s=f"{tokens_per_second:.0f}"
    )
    if step % job.cfg.log_every and step != job.total_steps:
        return
    peak_flops = device_peak_flops(acc.device, job.cfg.peak_flops)
    metrics = {
        "loss": result.loss,
        "lr": result.lr,
        "grad_norm": result.grad_norm,
        "l1_to_init": result.l1_to_init,
        "tokens_per_second": tokens_per_second,
        "peak_memory_mib": peak_memory_mib(acc.device),
        "mfu": mfu(run.n_params, tokens_per_second, peak_flops, acc.num_processes),
        "epoch": step / job.plan.steps_per_epoch,
        **hess_summary(run.optimizer),  # IVON: h's mean, std, min, median, max
    }
    run.logger.log(step, metrics, "train")


def save_due(job: Job, run: Run, checkpoint_steps: set[int]) -> bool:
    """Log-spaced and end-of-epoch checkpoints, then the resume state when one is due.

    Returns:
        Whether the resume state was written.
    """
    cfg, step, per_epoch = job.cfg, run.state.step, job.plan.steps_per_epoch
    names = []
    if step in checkpoint_steps:
        names.append(f"{ckpt.CHECKPOINTS}/step_{step}")
    if cfg.save_epochs and step % per_epoch == 0:
        names.append(f"{ckpt.CHECKPOINTS}/epoch_{step // per_epoch}")
    for name in names:
        save_weights(job, run, name)
    periodic = cfg.save_state_every is not None and step % cfg.save_state_every == 0
    if (names or periodic) and step < job.total_steps:  # the end has final/
        save_resume_state(job, run)
        return True
    return False


def save_resume_state(job: Job, run: Run) -> None:
    """Write ``{out}/resume`` for an exact continuation from the current step, atomically."""
    model, folder = run.model, job.out / ckpt.STATE
    extra = job.method.state(model)
    ckpt.save_state(job.accelerator, model, run.optimizer, run.scheduler, extra, run.state, folder)


def train(job: Job, run: Run, stop: StopAtStep) -> bool:
    """The optimiser steps, with evaluations, checkpoints and resume states in between.

    Returns:
        True when every step ran; False when SIGTERM (``stop``) ended the run after a step,
        with its resume state saved.
    """
    cfg, acc, state = job.cfg, job.accelerator, run.state
    eval_steps = set(eval_schedule(job.total_steps, cfg.eval_points, cfg.eval_at_start))
    checkpoint_steps = set(ckpt.log_spaced_steps(job.total_steps, cfg.checkpoints))
    objective = job.data.objective
    if job.strategy.zero_stage is not None:
        step_fn = zero_train_step  # l1_to_init was refused for it in setup
    else:
        step_fn = functools.partial(train_step, penalty=run.penalty)
    if state.step == 0:
        if cfg.save_init:
            save_weights(job, run, f"{ckpt.CHECKPOINTS}/step_0")
        if 0 in eval_steps:
            evaluate_and_keep(job, run)
    run.bar = tqdm(
        total=job.total_steps,
        initial=state.step,
        desc=f"{cfg.method} fine-tuning",
        unit="step",
        disable=not (cfg.progress and acc.is_main_process),
    )
    for step in range(state.step + 1, job.total_steps + 1):
        batches = step_micro_batches(
            job.data.train_items,
            job.plan,
            step - 1,
            job.data.collate,
            job.tokenizer.pad_token_id,
            acc.device,
        )
        started = time.perf_counter()
        result = step_fn(
            run.model,
            run.optimizer,
            run.scheduler,
            batches,
            objective,
            acc,
            job.method,
            step,
            cfg.max_grad_norm,
        )
        seconds = time.perf_counter() - started
        state.step, state.tokens = step, state.tokens + result.tokens
        state.train_seconds += seconds
        state.epoch, state.batch_in_epoch = job.plan.position(step)
        log_step(job, run, result, seconds)
        if step in eval_steps:
            evaluate_and_keep(job, run)
        saved = save_due(job, run, checkpoint_steps)
        if step < job.total_steps and stop.agreed(acc.device):  # every rank stops here
            if not saved:
                save_resume_state(job, run)
            run.bar.close()
            return False
    run.bar.close()
    return True


def finalize(job: Job, run: Run) -> dict:
    """Save the final weights, write result.json and drop the resume state."""
    cfg, acc, state = job.cfg, job.accelerator, run.state
    save_weights(job, run, ckpt.FINAL)
    test = scores(job, run, "test") if job.data.test is not None else None
    extra = {task: scores(job, run, task) for task in job.data.extra_tests}
    parallel = {  # what each rank held: the proof that sharding happened
        "strategy": job.strategy.name,
        "processes": acc.num_processes,
        "weights_read_by": "rank 0" if job.fsdp_from_rank0 else "every rank",
        "trainable_replicated": job.strategy.name == "ddp" or job.replicate_trainable,
        "param_fraction_per_rank": gather_object([param_fraction(run.model)]),
        "optimizer_state_fraction_per_rank": gather_object([optimizer_state_fraction(run.model)]),
        "activation_checkpointing": any(
            getattr(module, "gradient_checkpointing", False) for module in run.model.modules()
        ),
    }
    if uses_ivon(run.optimizer):  # h for a later run's ivon_hessian_from (ZeRO: gathered)
        save_run_hessian(job.out, acc.unwrap_model(run.model), run.optimizer, acc.is_main_process)
    result = {}
    if acc.is_main_process:
        total_seconds = time.perf_counter() - job.started
        result = {
            "format": "adaptlab.finetune/1",
            "fingerprint": job.run_id,
            "config": to_dict(cfg),
            "model": describe_model(job.model_ref),
            "data": job.data.record,
            "method": {
                "name": cfg.method,
                "adapter_checkpoints": job.method.adapter,
                "trainable_parameters": run.n_trainable,
                "total_parameters": run.n_params,
            },
            "schedule": {
                "total_steps": job.total_steps,
                "steps_per_epoch": job.plan.steps_per_epoch,
                "accumulation": job.plan.accumulation,
                "processes": acc.num_processes,
            },
            "parallel": parallel,
            "metrics": {
                "final": state.evals[-1] if state.evals else None,
                "best": state.best,
                "evals": state.evals,
                **(
                    {"test_final": test, "test_at_best": (state.best or {}).get("test")}
                    if test is not None
                    else {}
                ),
                **extra_test_metrics(extra, state.best),
            },
            "checkpoints": [*state.checkpoints, ckpt.FINAL] + ([ckpt.BEST] if state.best else []),
            "timings": {
                "train_seconds": round(state.train_seconds, 3),
                "eval_seconds": round(state.eval_seconds, 3),
                "total_seconds_this_session": round(total_seconds, 3),
                "tokens": state.tokens,
                "tokens_per_second": round(state.tokens / max(state.train_seconds, 1e-9), 1),
                "peak_memory_mib": peak_memory_mib(acc.device),
                "mfu": mfu(
                    run.n_params,
                    state.tokens / max(state.train_seconds, 1e-9),
                    device_peak_flops(acc.device, cfg.peak_flops),
                    acc.num_processes,
                ),
            },
            "versions": package_versions(),
            "hardware": hardware(),
            "created": now(),
        }
        write_json(job.out / ckpt.RESULT_FILE, result)
        ckpt.remove(job.out / ckpt.STATE)
        sweep_temporaries(job.out)
    run.logger.close()
    acc.wait_for_everyone()
    return result


def stopped(job: Job, run: Run) -> None:
    """End a run that SIGTERM stopped: say where it stands, free the folder, exit 143."""
    acc = job.accelerator
    run.logger.close()
    if acc.is_main_process:
        print(
            f"stopped by SIGTERM after step {run.state.step} of {job.total_steps}; the resume "
            f"state is in {job.out / ckpt.STATE}: run the same command to continue.",
            file=sys.stderr,
        )
    if job.lock is not None:
        job.lock.release()
    shutdown(DistInfo(acc.process_index, acc.num_processes, acc.device))
    raise SystemExit(EXIT_STATUS)  # non-zero, as SLURM and job scripts expect of a killed run


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(FinetuneConfig, argv)
    with report_user_errors():
        job = setup(cfg)
        acc = job.accelerator
        if job.state == "complete":
            if acc.is_main_process:
                print(f"{job.out} already holds this run's results; nothing to do.")
            shutdown(DistInfo(acc.process_index, acc.num_processes, acc.device))
            return
        run = load(job)
    with StopAtStep() as stop:  # SIGTERM: finish the step, save the resume state, exit 143
        if not train(job, run, stop):
            stopped(job, run)
        result = finalize(job, run)
    if acc.is_main_process:
        final = result["metrics"]["final"] or {}
        if cfg.task == "mmlu":
            score = f"constrained accuracy {final.get('constrained_micro', float('nan')):.3f}"
        else:
            best = result["metrics"]["test_at_best"] or {}
            mean = " (mean over tasks)" if job.data.tasks else ""
            # few-shot tasks report accuracy; generation tasks and STS-B their selection metric
            key = "accuracy" if "accuracy" in final else cfg.best_metric
            score = (
                f"dev {key}{mean} {final.get(key, float('nan')):.3f}, test {key} "
                f"at the best dev step {best.get(key, float('nan')):.3f}"
            ) + extra_test_summary(result["metrics"], key)
        print(f"{cfg.method}: {job.total_steps} steps -> {job.out}  {score}")
    if job.lock is not None:
        job.lock.release()
    shutdown(DistInfo(acc.process_index, acc.num_processes, acc.device))  # see its docstring
    acc.end_training()  # the trackers


if __name__ == "__main__":
    sys.exit(main())
