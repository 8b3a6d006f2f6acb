"""Benchmark: tokens/s of our LoRA fine-tuning steps vs HF Trainer + PEFT, in one run.

Three contenders train the same model with the same LoRA config on the same answer-only MMLU
batches (global batch, micro-batches and steps alike):

- ``peer``: ``transformers.Trainer`` on a ``peft.get_peft_model`` model, fed in order by HF's
  ``DataCollatorForSeq2Seq`` (right padding, labels -100 except the answer); no clipping,
  logging, evaluation or saving;
- ``ours``: the steps ``scripts/finetune.py`` runs (``BatchPlan`` -> ``step_micro_batches`` ->
  ``train_step`` with the run's accelerator, LoRA method, AdamW and cosine schedule);
- ``ours_packing``: the same with ``packing=true`` (``adaptlab.training.packing``).

They alternate step by step: at the end of each Trainer step a callback runs the same step of
both of ours (in alternating order), so all three see the same load on a shared machine. A
step's time runs from the end of the previous one to the device having finished it, batch
building included; the first ``--warmup`` steps are not timed. Tokens/s counts real tokens
(no padding). Goals: ours / peer >= 1.0, ours_packing / peer >= 1.5; on a GPU, MFU >= 40% for
LoRA on a 7B-class model (MFU = 6 N tokens/s / peak FLOP/s, N all parameters, as training logs
it). Peak memory is per contender and step on a GPU (both models stay resident;
``above_resident`` is what the contender's steps add); a CPU has only the process's peak RSS.
A JSON record goes to bench/results/finetune_<model>_<device>.json.

    python bench/finetune.py                                    # embedded SmolLM2-135M, CPU
    python bench/finetune.py --model tiny --steps 8             # a tiny random Llama, seconds
    python bench/finetune.py --device cuda --max_seq_len 512    # SmolLM2 on a GPU, bf16
    python bench/finetune.py --model llama-7b --device cuda --max_seq_len 512   # 7B class
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForSeq2Seq,
    LlamaConfig,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from adaptlab.data import load_mmlu, subset_by_subject
from adaptlab.io import write_json
from adaptlab.models import load_model, load_tokenizer
from adaptlab.models.loader import pick_attn_implementation, pick_dtype
from adaptlab.models.tiny import tiny_tokenizer
from adaptlab.telemetry import hardware, now, package_versions, peak_memory_mib
from adaptlab.training.config import FinetuneConfig
from adaptlab.training.loop import (
    TRAIN_DATA,
    BatchPlan,
    device_peak_flops,
    mfu,
    step_micro_batches,
    train_step,
)
from adaptlab.training.methods import METHODS, count_parameters
from adaptlab.training.objectives import OBJECTIVES
from adaptlab.training.optim import build_optimizer
from adaptlab.training.schedules import build_scheduler

RESULTS = Path(__file__).parent / "results"
EMBEDDED = "embedded:smollm2-135m"
CONTENDERS = ("peer", "ours", "ours_packing")
RANDOM_SHAPES = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4},
    "llama-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32},
}
"""Random-weight Llamas by name (throughput does not depend on the weights): 64-dim heads."""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Seconds and peak memory of every contender's steps."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, dict[int, float]] = {name: {} for name in CONTENDERS}
        self.peaks: dict[str, dict[int, tuple[float, float]]] = {name: {} for name in CONTENDERS}
        self.started = 0.0
        self.resident = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.resident = torch.cuda.memory_allocated(self.device)
        self.started = time.perf_counter()

    def stop(self, name: str, step: int) -> None:
        synchronize(self.device)
        self.seconds[name][step] = time.perf_counter() - self.started
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            self.peaks[name][step] = (peak / 2**20, (peak - self.resident) / 2**20)


class Interleave(TrainerCallback):
    """Times each Trainer step, then runs the same step of our contenders."""

    def __init__(self, watch: Stopwatch, run_ours) -> None:
        self.watch, self.run_ours = watch, run_ours

    def on_train_begin(self, args, state, control, **kwargs):
        self.watch.start()

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step - 1
        self.watch.stop("peer", step)
        self.run_ours(step)
        self.watch.start()


def build_tokenizer(model: str):
    """The model's tokenizer; random Llamas use the embedded SmolLM2's (the tiny one its own)."""
    if model == "tiny":
        return tiny_tokenizer()
    return load_tokenizer(EMBEDDED if model in RANDOM_SHAPES else model)


def build_model(args, tokenizer) -> torch.nn.Module:
    """The base model (eval mode); a random one for the names of ``RANDOM_SHAPES``."""
    if args.model not in RANDOM_SHAPES:
        return load_model(
            args.model, dtype=args.dtype, device=args.device, attn_implementation=args.attn
        )
    shape = RANDOM_SHAPES[args.model]
    dtype = pick_dtype(args.dtype, args.device)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_attention_heads=shape["hidden_size"] // 64,
        max_position_embeddings=max(args.max_seq_len, 512),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **shape,
    )
    attn = pick_attn_implementation(args.attn, args.device, dtype)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval()


def training_items(args, tokenizer) -> list:
    """Encoded answer-only MMLU training rows, enough for every step."""
    test = load_mmlu().test
    per_subject = math.ceil(args.steps * args.batch_size / 57) + 1
    examples = [test[i] for i in subset_by_subject(test, per_subject, seed=0)]
    return TRAIN_DATA["answer_only"].encode(examples, tokenizer, args.max_seq_len)


def peer_trainer(model, items, plan, tokenizer, args, workdir, callback) -> Trainer:
    """The Trainer on a PEFT model, fed the batches of ``plan`` in order."""
    rows = [
        {"input_ids": items[i]["input_ids"], "labels": items[i]["labels"]}
        for step in range(args.steps)
        for i in plan.global_indices(step)
    ]
    training_args = TrainingArguments(
        output_dir=workdir,
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.batch_size // args.micro_batch_size,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=args.device == "cpu",
        seed=args.seed,
    )
    return Trainer(
        model=model,
        args=training_args,
        train_dataset=rows,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[callback],
    )


def prepare_ours(base, cfg: FinetuneConfig, total_steps: int, device: str) -> dict:
    """Our LoRA model, optimiser and schedule, prepared as scripts/finetune.py prepares them."""
    accelerator = Accelerator(cpu=device == "cpu")
    method = METHODS[cfg.method]
    model = method.prepare(base, cfg, total_steps)
    optimizer = build_optimizer("adamw", model, lr=cfg.lr)
    scheduler = build_scheduler(cfg.schedule, optimizer, total_steps, 0, None, cfg.min_lr_ratio)
    model, optimizer = accelerator.prepare(model, optimizer)
    return {
        "accelerator": accelerator,
        "method": method,
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
    }


def our_step(ours: dict, items, plan, collate, pad_id: int, step: int) -> None:
    """Step ``step`` (0-based) as scripts/finetune.py takes it: build the batches, train."""
    acc = ours["accelerator"]
    batches = step_micro_batches(items, plan, step, collate, pad_id, acc.device)
    train_step(
        ours["model"],
        ours["optimizer"],
        ours["scheduler"],
        batches,
        OBJECTIVES["answer_only"],
        acc,
        ours["method"],
        step + 1,
    )


def real_tokens(items, plan, steps) -> int:
    """Tokens (no padding) of the batches of ``steps``."""
    return sum(len(items[i]["input_ids"]) for step in steps for i in plan.global_indices(step))


def token_slots(items, plan, steps, collate, pad_id) -> int:
    """Token slots (real and padding) the batches of ``steps`` hold."""
    return sum(
        int(batch["input_ids"].numel())
        for step in steps
        for batch in step_micro_batches(items, plan, step, collate, pad_id, torch.device("cpu"))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=EMBEDDED, help="tiny, llama-7b or a model name")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", help="auto: fp32 on CPU, bf16 on GPUs")
    parser.add_argument("--attn", default="auto", help="attention implementation")
    parser.add_argument("--steps", type=int, default=24, help="optimiser steps per contender")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left untimed")
    parser.add_argument("--batch_size", type=int, default=8, help="global batch")
    parser.add_argument("--micro_batch_size", type=int, default=None, help="default: batch")
    parser.add_argument("--max_seq_len", type=int, default=256)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--peak_flops", type=float, default=None, help="per device, for MFU")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    args.micro_batch_size = args.micro_batch_size or args.batch_size
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} leaves no timed step after --warmup {args.warmup}.")
    device = torch.device(args.device)

    tokenizer = build_tokenizer(args.model)
    items = training_items(args, tokenizer)
    cfg = FinetuneConfig(
        model=args.model,
        lora_r=args.lora_r,
        lora_alpha=2.0 * args.lora_r,
        lr=args.lr,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        max_seq_len=args.max_seq_len,
        seed=args.seed,
    )
    plan = BatchPlan(len(items), args.batch_size, args.micro_batch_size, 1, 0, args.seed)
    pad_id = tokenizer.pad_token_id
    collates = {
        "ours": TRAIN_DATA["answer_only"].collator(False, args.max_seq_len),
        "ours_packing": TRAIN_DATA["answer_only"].collator(True, args.max_seq_len),
    }
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    peer_model = get_peft_model(build_model(args, tokenizer), lora)
    ours = prepare_ours(build_model(args, tokenizer), cfg, 2 * args.steps, args.device)
    n_trainable, n_params = count_parameters(ours["model"])
    if count_parameters(peer_model) != (n_trainable, n_params):
        raise RuntimeError("The peer's and our LoRA models differ; the comparison is off.")

    watch = Stopwatch(device)

    def run_ours(step: int) -> None:
        order = ("ours", "ours_packing") if step % 2 == 0 else ("ours_packing", "ours")
        for name in order:
            watch.start()
            our_step(ours, items, plan, collates[name], pad_id, step)
            watch.stop(name, step)
        print(
            f"step {step + 1}/{args.steps}: "
            + ", ".join(f"{n} {watch.seconds[n][step]:.2f} s" for n in CONTENDERS)
        )

    with tempfile.TemporaryDirectory() as workdir:
        callback = Interleave(watch, run_ours)
        peer_trainer(peer_model, items, plan, tokenizer, args, workdir, callback).train()

    timed = range(args.warmup, args.steps)
    tokens = real_tokens(items, plan, timed)
    peak_flops = device_peak_flops(device, args.peak_flops)
    contenders = {}
    for name in CONTENDERS:
        seconds = sum(watch.seconds[name][s] for s in timed)
        peaks = [watch.peaks[name][s] for s in timed if s in watch.peaks[name]]
        contenders[name] = {
            "tokens_per_second": round(tokens / seconds, 1),
            "seconds": round(seconds, 3),
            "step_seconds": [round(watch.seconds[name][s], 3) for s in timed],
            "peak_memory_mib": round(max(p for p, _ in peaks), 1) if peaks else None,
            "peak_memory_above_resident_mib": round(max(a for _, a in peaks), 1) if peaks else None,
            "mfu": mfu(n_params, tokens / seconds, peak_flops),
        }

    def ratios(name: str) -> tuple[float, float]:
        total = contenders["peer"]["seconds"] / contenders[name]["seconds"]
        per_step = [watch.seconds["peer"][s] / watch.seconds[name][s] for s in timed]
        return round(total, 3), round(statistics.median(per_step), 3)

    (ours_total, ours_median), (packed_total, packed_median) = (
        ratios("ours"),
        ratios("ours_packing"),
    )
    record = {
        "benchmark": "finetune",
        "model": args.model,
        "method": "lora",
        "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout},
        "target_modules": list(cfg.target_modules),
        "dtype": str(pick_dtype(args.dtype, args.device)).removeprefix("torch."),
        "attn_implementation": ours["model"].config._attn_implementation,
        "batch_size": args.batch_size,
        "micro_batch_size": args.micro_batch_size,
        "max_seq_len": args.max_seq_len,
        "steps": args.steps,
        "timed_steps": len(timed),
        "timed_tokens": tokens,
        "real_tokens_per_step": round(real_tokens(items, plan, range(args.steps)) / args.steps, 1),
        "token_slots_per_step": {
            name: round(token_slots(items, plan, range(args.steps), c, pad_id) / args.steps, 1)
            for name, c in collates.items()
        },
        "parameters": {"total": n_params, "trainable": n_trainable},
        "contenders": contenders,
        "ratio_ours_over_peer": ours_total,
        "ratio_ours_packing_over_peer": packed_total,
        "median_step_ratio": {"ours": ours_median, "ours_packing": packed_median},
        "goals": {"ours_over_peer": ">= 1.0", "ours_packing_over_peer": ">= 1.5", "mfu": ">= 0.4"},
        "peak_flops": peak_flops,
        "process_peak_memory_mib": peak_memory_mib(device),
        "device": str(device),
        "hardware": hardware(),
        "versions": package_versions(),
        "created": now(),
    }
    stem = "smollm2" if args.model == EMBEDDED else args.model.replace("/", "_")
    name = f"finetune_{stem}_{device.type}.json"
    write_json(RESULTS / name, record)
    print(
        f"tok/s peer {contenders['peer']['tokens_per_second']}, ours "
        f"{contenders['ours']['tokens_per_second']} ({ours_total}x), ours+packing "
        f"{contenders['ours_packing']['tokens_per_second']} ({packed_total}x); -> {RESULTS / name}"
    )


if __name__ == "__main__":
    main()
