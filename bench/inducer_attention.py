"""Benchmark: what computing the inducer's w costs on each attention path, in one run.

w_i = σ(s0_i − LSE_j s_ij) needs the log-sum-exp of the ordinary attention logits, which fused
kernels do not hand back through their public API. The contenders, per attention call on the
same q, k, v, s0 (forward + backward, [B, H, T, d], causal, right padding):

- ``sdpa``: the model's own SDPA attention, no inducer (the floor);
- ``ours_sdpa``: :func:`adaptlab.adapters.attention._sdpa_extended`: SDPA for Attn, plus one
  SDPA call on widened heads whose output is w (no [T, S] matrix in memory);
- ``ours_eager``: :func:`adaptlab.adapters.attention._eager_extended`: explicit logits, w from
  ``logsumexp`` (what falling back to eager attention costs);
- ``flex_lse`` (``--device cuda`` only): PyTorch's compiled flex attention with
  ``return_lse=True``, w = σ(s0 − LSE) from the one call; PyTorch has no flex backward on CPU.

Each contender keeps its fastest of ``--repeats`` rounds (the order rotates). On CUDA the peak
memory of one call is ``torch.cuda.max_memory_allocated``; on a CPU memory is not measured.
Ratios are against ``sdpa``. Goal context (issue 15): inducer training ≥ 0.9× LoRA tokens/s; the
attention call is one part of a step, so a 2× attention cost is not a 2× step cost.

    python bench/inducer_attention.py --threads 1                 # CPU, ~1 min
    python bench/inducer_attention.py --device cuda --seq_len 2048 --batch 8
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from adaptlab.adapters.attention import _eager_extended, _sdpa_extended
from adaptlab.io import write_json
from adaptlab.telemetry import hardware, now, package_versions

RESULTS = Path(__file__).parent / "results"


def make_inputs(args, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b, h, t, d = args.batch, args.heads, args.seq_len, args.head_dim
    inputs = {
        name: torch.randn(b, h, t, d, generator=g).to(device).requires_grad_(True)
        for name in ("query", "key", "value")
    }
    inputs["s0"] = torch.randn(b, h, t, generator=g).to(device).requires_grad_(True)
    padding = torch.ones(b, t, dtype=torch.long)
    padding[-1, t - t // 4 :] = 0  # the last row padded for its last quarter
    inputs["padding"] = padding.to(device)
    return inputs


def contenders(args, device: torch.device) -> dict[str, Callable[[dict], torch.Tensor]]:
    scale = args.head_dim**-0.5

    def sdpa(x):
        mask = _causal_padding(x["padding"], args.seq_len)
        out = F.scaled_dot_product_attention(x["query"], x["key"], x["value"], attn_mask=mask)
        return out.sum()

    def ours(extended):
        def run(x):
            attn, w, _ = extended(x["query"], x["key"], x["value"], x["padding"], scale, 0.0,
                                  True, [], x["s0"])  # fmt: skip
            return attn.sum() + w.sum()

        return run

    found = {"sdpa": sdpa, "ours_sdpa": ours(_sdpa_extended), "ours_eager": ours(_eager_extended)}
    if device.type == "cuda":
        found["flex_lse"] = _flex_lse(args)
    return found


def _causal_padding(padding: torch.Tensor, t: int) -> torch.Tensor:
    causal = torch.ones(t, t, dtype=torch.bool, device=padding.device).tril()
    return causal[None, None] & padding.bool()[:, None, None, :]


def _flex_lse(args) -> Callable[[dict], torch.Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention)

    def run(x):
        padding = x["padding"].bool()

        def mask_mod(b, h, q, kv):
            return (kv <= q) & padding[b, kv]

        b, _, t, _ = x["query"].shape
        block = create_block_mask(mask_mod, b, None, t, t, device=x["query"].device)
        out, lse = compiled(x["query"], x["key"], x["value"], block_mask=block, return_lse=True)
        w = torch.sigmoid(x["s0"] - lse)
        return out.sum() + w.sum()

    return run


def time_once(fn, inputs, device) -> tuple[float, float | None]:
    for tensor in inputs.values():
        tensor.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn(inputs).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return time.perf_counter() - start, peak


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    device = torch.device(args.device)
    inputs = make_inputs(args, device)
    runs = contenders(args, device)
    for fn in runs.values():  # warm-up (and compilation)
        time_once(fn, inputs, device)
    best = {name: (float("inf"), None) for name in runs}
    names = list(runs)
    for round_ in range(args.repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            seconds, peak = time_once(runs[name], inputs, device)
            if seconds < best[name][0]:
                best[name] = (seconds, peak)
    floor = best["sdpa"][0]
    rows = {
        name: {"seconds": s, "x_sdpa": s / floor, "peak_mib": peak}
        for name, (s, peak) in best.items()
    }
    for name, row in rows.items():
        peak = "" if row["peak_mib"] is None else f"  peak {row['peak_mib']:.0f} MiB"
        print(f"{name:>11}: {row['seconds'] * 1e3:8.2f} ms  {row['x_sdpa']:.2f}x sdpa{peak}")
    record = {
        "benchmark": "inducer_attention",
        "when": now(),
        "hardware": hardware(),
        "versions": package_versions(),
        "settings": vars(args),
        "rows": rows,
    }
    output = Path(args.output or RESULTS / f"inducer_attention_{device.type}.json")
    write_json(output, record)
    print(f"wrote {output}")
    return record


if __name__ == "__main__":
    main()
