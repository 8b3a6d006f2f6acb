"""Benchmark: what ViLoRA and IVON cost per step and in memory, against AdaLoRA + Adam and AdamW.

Issue 16's goals (reported, never asserted):

- per-step time of ViLoRA (AdaLoRA with IVON and a posterior criterion, ``SNR_mean_abs``) vs
  AdaLoRA + AdamW with PEFT's sensitivity allocator, on the same model and batches: goal
  ≤ 0.9× (the paper reports ≈ 10% faster: no per-step sensitivity EMA);
- IVON's ``step()`` vs AdamW's ``step()`` on the same parameters and gradients: goal ≤ 1.2×;
- optimiser-state memory of adaptlab's IVON vs ivon-opt (where installed) vs AdamW, and the
  rank allocator's state (sensitivity keeps three EMAs per adapter entry, ViLoRA one score).

A training step here is what ``adaptlab.training.loop.train_step`` does for one micro-batch:
forward and backward inside IVON's ``sampled_params(train=True)`` (a no-op context for AdamW),
the orthogonality regulariser in the loss, ``optimizer.step()``, the method's
``after_step(model, step, optimizer)`` (rank allocation) and ``zero_grad``. Every contender runs
the same batches from the same initial weights; steps fall in AdaLoRA's allocation phase
(tinit < t ≤ T − tfinal), masking every ``--delta_t`` steps. Each contender keeps the median
of its timed steps after ``--warmup``; ``overhead`` is the time after the backward pass
(step + allocation + zero_grad), the part in which the methods differ. The contenders run
interleaved, round by round, so a change of machine load hits them alike.

    python bench/vilora.py                       # embedded SmolLM2-135M, CPU
    python bench/vilora.py --quick               # a tiny random Llama, seconds
    python bench/vilora.py --device cuda --batch 16 --seq_len 256 --steps 40
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptlab.io import write_json
from adaptlab.telemetry import hardware, now, package_versions
from adaptlab.training.config import FinetuneConfig
from adaptlab.training.methods import METHODS, adalora_orth_regularizer
from adaptlab.training.optim import build_optimizer, unwrap_optimizer

RESULTS = Path(__file__).parent / "results"
CONTENDERS = {
    "adalora_adamw": ("adamw", "sensitivity", 2e-4),
    "adalora_ivon_sensitivity": ("ivon", "sensitivity", 0.4),
    "vilora": ("ivon", "SNR_mean_abs", 0.4),
}
"""name -> (optimizer, vilora_criterion, lr)."""


def load(args: argparse.Namespace) -> tuple[nn.Module, list[str]]:
    """The base model (fp32, on ``args.device``) and AdaLoRA's target modules."""
    if args.quick:
        from adaptlab.models.tiny import tiny_llama

        return tiny_llama(vocab_size=256), ["q_proj", "v_proj"]
    from adaptlab.models import load_model

    return load_model(args.model, dtype=torch.float32), ["q_proj", "k_proj", "v_proj", "o_proj"]


def prepare(args: argparse.Namespace, name: str, state: dict[str, torch.Tensor]) -> Any:
    """One contender: a fresh AdaLoRA model from the same weights, its optimiser."""
    optimizer_name, criterion, lr = CONTENDERS[name]
    base, targets = load(args)
    base.load_state_dict(state)
    total = args.warmup + args.steps + 2
    cfg = FinetuneConfig(
        method="adalora", optimizer=optimizer_name, vilora_criterion=criterion,
        target_modules=targets, lora_dropout=0.0, adalora_init_r=args.init_r,
        adalora_target_r=args.target_r, adalora_tinit=0, adalora_tfinal=1,
        adalora_delta_t=args.delta_t, adalora_orth_reg_weight=0.1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = METHODS["adalora"].prepare(base, cfg, total).to(args.device)
    optimizer = build_optimizer(optimizer_name, model, lr=lr, weight_decay=1e-8, ivon_ess=1e4)
    return model, optimizer


def train_step(model: nn.Module, optimizer: Any, batch: torch.Tensor, step: int) -> float:
    """One step; returns the seconds after the backward pass (step, allocation, zero_grad)."""
    inner = unwrap_optimizer(optimizer)
    sampling = getattr(inner, "sampled_params", None)
    with sampling(train=True) if sampling else contextlib.nullcontext():
        loss = model(input_ids=batch, labels=batch).loss
        extra = adalora_orth_regularizer(model)
        (loss if extra is None else loss + extra).backward()
    sync(batch.device)
    start = time.perf_counter()
    optimizer.step()
    METHODS["adalora"].after_step(model, step, optimizer)
    optimizer.zero_grad(set_to_none=True)
    sync(batch.device)
    return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def state_bytes(optimizer: Any) -> int:
    """Bytes of every tensor the optimiser keeps: per-parameter state and group buffers."""
    inner = unwrap_optimizer(optimizer)
    total = sum(
        v.numel() * v.element_size()
        for state in inner.state.values()
        if isinstance(state, dict)
        for v in state.values()
        if torch.is_tensor(v)
    )
    for group in inner.param_groups:
        total += sum(
            v.numel() * v.element_size()
            for k, v in group.items()
            if torch.is_tensor(v) and k != "params"
        )
    return total


def allocator_bytes(model: nn.Module) -> int:
    """Bytes of the rank allocator's per-entry state (EMAs or scores)."""
    from adaptlab.training.methods import _adalora_parts

    allocator = _adalora_parts(model)[0].rankallocator
    tensors = [
        t for key in ("ipt", "exp_avg_ipt", "exp_avg_unc", "scores")
        for t in getattr(allocator, key, {}).values()
    ]  # fmt: skip
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_steps(args: argparse.Namespace, model: nn.Module) -> dict[str, Any]:
    """IVON's and AdamW's ``step()`` alone on the same parameters and random gradients, taking
    turns step by step, so that a change of machine load hits them alike."""
    params = [p for p in model.parameters() if p.requires_grad]
    names = ["adamw", "ivon"] + (["ivon_opt"] if importlib.util.find_spec("ivon") else [])
    runs = {}
    for name in names:
        copies = [nn.Parameter(p.detach().clone()) for p in params]
        holder = nn.ParameterList(copies)
        optimizer = build_optimizer(name, holder, lr=0.1, weight_decay=1e-8, ivon_ess=1e4)
        generator = torch.Generator(device=args.device).manual_seed(0)
        runs[name] = (copies, optimizer, generator, [])
    for i in range(args.warmup + args.opt_steps):
        for copies, optimizer, generator, times in runs.values():
            sampling = getattr(unwrap_optimizer(optimizer), "sampled_params", None)
            with sampling(train=True) if sampling else contextlib.nullcontext():
                for p in copies:
                    p.grad = torch.randn(p.shape, generator=generator, device=args.device)
            sync(torch.device(args.device))
            start = time.perf_counter()
            optimizer.step()
            sync(torch.device(args.device))
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    rows: dict[str, Any] = {
        name: {"step_ms": 1e3 * statistics.median(times), "state_bytes": state_bytes(optimizer)}
        for name, (_, optimizer, _, times) in runs.items()
    }
    rows["numel"] = sum(p.numel() for p in params)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--init_r", type=int, default=12)
    parser.add_argument("--target_r", type=int, default=8)
    parser.add_argument("--delta_t", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--opt_steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    device = torch.device(args.device)
    base, _ = load(args)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    vocab = base.config.vocab_size
    del base
    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, vocab, (args.batch, args.seq_len), generator=generator).to(device)
        for _ in range(args.warmup + args.steps)
    ]
    runs = {name: prepare(args, name, state) for name in CONTENDERS}
    totals: dict[str, list[float]] = {name: [] for name in runs}
    overheads: dict[str, list[float]] = {name: [] for name in runs}
    for i, batch in enumerate(batches):
        for name, (model, optimizer) in runs.items():
            start = time.perf_counter()
            overhead = train_step(model, optimizer, batch, i + 1)
            if i >= args.warmup:
                totals[name].append(time.perf_counter() - start)
                overheads[name].append(overhead)
    rows = {
        name: {
            "step_ms": 1e3 * statistics.median(totals[name]),
            "overhead_ms": 1e3 * statistics.median(overheads[name]),
            "optimizer_state_bytes": state_bytes(runs[name][1]),
            "allocator_state_bytes": allocator_bytes(runs[name][0]),
        }
        for name in runs
    }
    reference = rows["adalora_adamw"]
    for row in rows.values():
        row["x_adalora_adamw_step"] = row["step_ms"] / reference["step_ms"]
        row["x_adalora_adamw_overhead"] = row["overhead_ms"] / reference["overhead_ms"]
    optim = optimizer_steps(args, runs["vilora"][0])
    ratios = {
        "vilora_step_vs_adalora_adamw": rows["vilora"]["x_adalora_adamw_step"],
        "ivon_step_vs_adamw_step": optim["ivon"]["step_ms"] / optim["adamw"]["step_ms"],
        "ivon_state_vs_adamw_state": optim["ivon"]["state_bytes"] / optim["adamw"]["state_bytes"],
    }
    if "ivon_opt" in optim:
        ratios["ivon_state_vs_ivon_opt_state"] = (
            optim["ivon"]["state_bytes"] / optim["ivon_opt"]["state_bytes"]
        )
        ratios["ivon_step_vs_ivon_opt_step"] = (
            optim["ivon"]["step_ms"] / optim["ivon_opt"]["step_ms"]
        )
    for name, row in rows.items():
        print(f"{name:>25}: step {row['step_ms']:8.1f} ms ({row['x_adalora_adamw_step']:.2f}x)  "
              f"after backward {row['overhead_ms']:7.2f} ms "
              f"({row['x_adalora_adamw_overhead']:.2f}x)  optimiser state "
              f"{row['optimizer_state_bytes'] / 2**20:.2f} MiB  allocator "
              f"{row['allocator_state_bytes'] / 2**20:.2f} MiB")  # fmt: skip
    for name in ("adamw", "ivon", "ivon_opt"):
        if name in optim:
            print(f"{name:>25}: step() {optim[name]['step_ms']:.3f} ms, state "
                  f"{optim[name]['state_bytes'] / 2**20:.2f} MiB")  # fmt: skip
    goals = {"vilora_step_vs_adalora_adamw": 0.9, "ivon_step_vs_adamw_step": 1.2}
    for key, value in ratios.items():
        goal = f" (goal <= {goals[key]})" if key in goals else ""
        print(f"{key}: {value:.2f}x{goal}")
    record = {
        "benchmark": "vilora",
        "when": now(),
        "hardware": hardware(),
        "versions": package_versions(),
        "settings": {**vars(args), "contenders": CONTENDERS},
        "model": "tiny random Llama" if args.quick else args.model,
        "training_steps": rows,
        "optimizer_steps": optim,
        "ratios": ratios,
        "goals": goals,
    }
    kind = "quick" if args.quick else "smollm2"
    output = Path(args.output or RESULTS / f"vilora_{kind}_{device.type}.json")
    write_json(output, record)
    print(f"wrote {output}")
    return record


if __name__ == "__main__":
    main()
