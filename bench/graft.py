"""Benchmark: one grafting mask step vs one fine-tuning step and vs the upstream way, in one run.

Every contender takes the same A batches (``--accumulation``) of the same model, with the
eligible set E = the transformer blocks (head and embeddings frozen, as in the paper):

- ``ours``: :func:`adaptlab.graft.learn.mask_step` with θ_pre, θ_ft, b and S on the model's
  device (``collect(..., on_device=True)``): set θ(γ), A backward passes, the S update, reset;
- ``ours_host``: the same with ``collect(..., on_device=False)``: the copies in host memory,
  moved to the device tensor by tensor (pinned on CUDA); the middle point;
- ``upstream``: graft.md §5 as the upstream code runs it (§7): θ_pre, θ_ft, Δ, b and S in host
  memory; γ computed on the host, and θ_pre, θ_ft and γ moved to the device to compute
  θ_pre + γ ⊙ (θ_ft − θ_pre) there, tensor by tensor; after every backward pass each gradient
  is copied back to the host, multiplied by Δ and added (times η) to G; the S update on the
  host. Written here from the spec, not taken from upstream's code;
- ``finetune``: one fine-tuning step of the same model on the same batches: forward and
  backward per batch (loss / A, gradients accumulated) and one SGD step over E.

The contenders take turns within each of ``--repeats`` rounds (the order rotates), and each
keeps its fastest round, the one least disturbed by other load. Before the timed rounds every
mask method takes one step from the same S, and its new S is compared with ``ours``
(max |S − S_ours| / max |S_ours − S_0|): the three must compute the same update. After the
full steps, the mask methods are timed once more with a loss of one entry per eligible tensor
(``graft_only``: no model compute, but dense gradients), which isolates what the graft adds to
the forward and backward passes, the part where the methods differ.

Goals: ours / finetune <= 1.5 (time), upstream / ours >= 3, the mask step's peak memory
<= 3x the model's size. On CUDA the peak is ``torch.cuda.max_memory_allocated`` during the
step; on a CPU it is an accounting (model + θ_pre + θ_ft + b + S + the gradient), not a measured
peak. The engine holds M + 4.25E float32 numbers (M the model's parameters, E the eligible
ones), so the memory goal needs E <= 0.47M; with the blocks eligible (most of the model) it is
not met. On a CPU the upstream way moves nothing (host and device are one memory), so there it
differs from ours only in its per-batch Δ products and its unfused interpolation; the
host-vs-device cost it pays shows on a GPU.
A JSON record goes to bench/results/graft_<device>.json (graft_smollm2_<device>.json with the
embedded SmolLM2).

    python bench/graft.py --threads 1                        # random 4-layer Llama, CPU, ~1.5 min
    python bench/graft.py --model embedded:smollm2-135m --batch_size 2 --seq_len 32 \
        --accumulation 2 --repeats 3 --threads 1            # the embedded SmolLM2, CPU, ~1 min
    python bench/graft.py --device cuda --accumulation 16    # on a GPU
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptlab.graft import GraftTensors, MaskSettings, Selection, collect, eligible_names
from adaptlab.graft.learn import mask_step, prepare_model
from adaptlab.graft.mask import init_scores
from adaptlab.graft.patch import patch_size, top_delta_patch
from adaptlab.io import write_json
from adaptlab.models import load_model
from adaptlab.models.tiny import tiny_llama
from adaptlab.telemetry import hardware, now, package_versions, peak_memory_mib

RESULTS = Path(__file__).parent / "results"
EMBEDDED = "embedded:smollm2-135m"
METHODS = ("ours", "ours_host", "upstream", "finetune")
MASK_METHODS = ("ours", "ours_host", "upstream")
LABEL_WORDS = (11, 12, 13, 14)  # C = 4 classes: CE over these logits at the last position
FINETUNE_GOAL = 1.5  # ours at most this many times a fine-tuning step
UPSTREAM_GOAL = 3.0  # ours at least this many times faster than upstream
MEMORY_GOAL = 3.0  # the mask step's peak at most this many times the model's size

CONTENDERS = {
    "ours": "mask_step, θ_pre, θ_ft, b and S on the model's device",
    "ours_host": "mask_step, θ_pre, θ_ft, b and S in host memory, moved per tensor (pinned on "
    "CUDA; on a CPU the same path as ours)",
    "upstream": "graft.md §5 the upstream way (§7), re-implemented here from the spec: host "
    "copies moved to the device per interpolation, gradients copied back per batch, ⊙ Δ and "
    "the S update on the host",
    "finetune": "forward and backward of the A batches (accumulated) and one SGD step over E",
}
Batch = Mapping[str, Tensor]
LossFn = Callable[[nn.Module, Batch], Tensor]


def build_model(args, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The pretrained model θ_pre (eval mode): a random Llama, or a model by name."""
    if args.model != "random":
        return load_model(args.model, dtype=dtype, device=device).eval()
    heads = max(1, args.hidden // 64)
    model = tiny_llama(
        vocab_size=args.vocab,
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_heads=heads,
        num_kv_heads=heads,
        intermediate_size=4 * args.hidden,
        max_position_embeddings=max(args.seq_len, 512),
    )
    return model.to(device=device, dtype=dtype).eval()


def finetuned_state(model: nn.Module, names: Sequence[str], scale: float) -> dict[str, Tensor]:
    """A synthetic θ_ft = θ_pre + scale·N(0, 1) on the eligible tensors (the times do not
    depend on the values)."""
    gen = torch.Generator().manual_seed(1)
    params = dict(model.named_parameters())
    return {
        name: params[name].detach()
        + scale * torch.randn(params[name].shape, generator=gen).to(params[name])
        for name in names
    }


def make_batches(args, vocab: int, device: torch.device) -> list[dict[str, Tensor]]:
    """A batches: random token ids ``[batch_size, seq_len]``, class targets ``[batch_size]``."""
    gen = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(args.accumulation):
        ids = torch.randint(20, vocab, (args.batch_size, args.seq_len), generator=gen)
        targets = torch.randint(0, len(LABEL_WORDS), (args.batch_size,), generator=gen)
        batches.append({"input_ids": ids.to(device), "targets": targets.to(device)})
    return batches


def label_word_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Mean CE over the label-word logits at the last position."""
    logits = model(input_ids=batch["input_ids"], logits_to_keep=1).logits[:, -1]
    words = torch.tensor(LABEL_WORDS, device=logits.device)
    scores = logits[:, words]  # in float32 at least (bfloat16 models)
    return F.cross_entropy(
        scores.to(torch.promote_types(scores.dtype, torch.float32)), batch["targets"]
    )


def graft_tensors(model, names, finetuned, sparsity, *, on_device: bool) -> GraftTensors:
    """θ_pre, θ_ft, the top-|Δ| base patch and seeded S ~ U[0, 1) (the same S everywhere)."""
    tensors = collect(model, names, finetuned, on_device=on_device)
    k = patch_size(sparsity, tensors.n_eligible)
    tensors.base = top_delta_patch([tensors.delta(i) for i in range(len(tensors))], k)
    tensors.base = [b.to(t.device) for b, t in zip(tensors.base, tensors.pre, strict=True)]
    store = tensors.pre[0].device
    dtype = tensors.scores[0].dtype
    gen = torch.Generator().manual_seed(3)
    tensors.scores = init_scores([p.shape for p in tensors.params], gen, dtype, store)
    return tensors


class UpstreamGraft:
    """graft.md §5 the upstream way (§7): θ_pre, θ_ft, Δ, b and S in host memory; every
    interpolation moves each tensor to the device; gradients come back to the host per batch.

    Takes its θ_pre, θ_ft, b and S from ``tensors`` (copied to the host once), so it starts
    where ``ours`` starts.
    """

    def __init__(self, tensors: GraftTensors) -> None:
        host = torch.device("cpu")
        self.params = tensors.params
        self.device = tensors.device
        self.scores = [s.to(host, copy=True) for s in tensors.scores]
        dtype = self.scores[0].dtype
        self.pre = [t.to(host, copy=True) for t in tensors.pre]
        self.ft = [t.to(host, copy=True) for t in tensors.ft]
        self.delta = [f.to(dtype) - p.to(dtype) for p, f in zip(self.pre, self.ft, strict=True)]
        self.base = [b.to(host, dtype=dtype) for b in tensors.base]  # float masks, as upstream

    @torch.no_grad()
    def interpolate(self, gamma: Sequence[Tensor]) -> None:
        """θ ← θ_pre + γ ⊙ (θ_ft − θ_pre), each tensor moved to the device and computed there."""
        for p, pre, ft, g in zip(self.params, self.pre, self.ft, gamma, strict=True):
            pre, ft, g = pre.to(self.device), ft.to(self.device), g.to(self.device)
            p.data.copy_(pre + g * (ft - pre))

    @torch.no_grad()
    def reset(self) -> None:
        for p, pre in zip(self.params, self.pre, strict=True):
            p.data.copy_(pre.to(self.device))

    def step(self, model: nn.Module, batches: Sequence[Batch], loss: LossFn, settings) -> None:
        """One mask step: §5 steps 1–4 in order."""
        sigma = [torch.sigmoid(s - settings.beta) for s in self.scores]
        self.interpolate([b + (1 - 2 * b) * s for b, s in zip(self.base, sigma, strict=True)])
        total = [torch.zeros_like(s) for s in self.scores]
        for batch in batches:
            loss(model, batch).backward()
            with torch.no_grad():
                for g, p, delta in zip(total, self.params, self.delta, strict=True):
                    if p.grad is not None:
                        g.add_(settings.lr * (p.grad.cpu().to(g.dtype) * delta))
                    p.grad = None
        self.reset()
        n = len(batches)
        with torch.no_grad():
            for s, b, g, sig in zip(self.scores, self.base, total, sigma, strict=True):
                s.sub_((1 - 2 * b) * (g / n) * sig * (1 - sig))


def finetune_step(model: nn.Module, optimizer, batches: Sequence[Batch], loss: LossFn) -> None:
    """Forward and backward of every batch (gradients accumulated), one optimiser step."""
    for batch in batches:
        (loss(model, batch) / len(batches)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_bytes(tensors: Sequence[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_accounting(model: nn.Module, tensors: GraftTensors) -> dict[str, int]:
    """Bytes the mask step holds: the model, θ_pre, θ_ft, b, S and the gradient ⊙ Δ (in S's
    dtype); activations and per-tensor temporaries are not counted."""
    return {
        "model": tensor_bytes(list(model.parameters())),
        "theta_pre": tensor_bytes(tensors.pre),
        "theta_ft": tensor_bytes(tensors.ft),
        "base": tensor_bytes(tensors.base),
        "scores": tensor_bytes(tensors.scores),
        "gradient": tensor_bytes(tensors.scores),
    }


def max_abs_diff(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """max |a − b| over aligned lists of tensors (compared on the host)."""
    return max(float((x.cpu() - y.cpu()).abs().max()) for x, y in zip(a, b, strict=True))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="random", help=f"random (a Llama) or {EMBEDDED}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float64"))
    parser.add_argument("--hidden", type=int, default=384, help="random Llama: hidden size")
    parser.add_argument("--layers", type=int, default=4, help="random Llama: blocks")
    parser.add_argument("--vocab", type=int, default=2048, help="random Llama: vocabulary")
    parser.add_argument("--batch_size", type=int, default=8, help="examples per batch")
    parser.add_argument("--accumulation", type=int, default=4, help="A: batches per step")
    parser.add_argument("--seq_len", type=int, default=64, help="tokens per example")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; fastest kept")
    parser.add_argument("--sparsity", type=float, default=1e-4, help="base patch: s")
    parser.add_argument("--delta_scale", type=float, default=1e-3, help="synthetic |Δ| scale")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", type=Path, default=None, help="record path")
    return parser.parse_args(argv)


class Contenders:
    """The model, the batches and the state of every contender, all starting from θ_pre and
    the same S."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.device = torch.device(args.device)
        self.model = build_model(args, self.device, getattr(torch, args.dtype))
        self.names = eligible_names(self.model, Selection(fix_head=True, fix_embeddings=True))
        finetuned = finetuned_state(self.model, self.names, args.delta_scale)
        self.batches = make_batches(args, self.model.config.vocab_size, self.device)
        self.settings = MaskSettings()
        self.graft = {
            "ours": graft_tensors(self.model, self.names, finetuned, args.sparsity, on_device=True),
            "ours_host": graft_tensors(
                self.model, self.names, finetuned, args.sparsity, on_device=False
            ),
        }
        self.upstream = UpstreamGraft(self.graft["ours"])
        prepare_model(self.model, self.graft["ours"])
        self.optimizer = torch.optim.SGD(self.graft["ours"].params, lr=1e-4)

    def scores(self, method: str) -> list[Tensor]:
        return self.upstream.scores if method == "upstream" else self.graft[method].scores

    def graft_only_loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """One entry of every eligible tensor, summed: no model compute, yet every backward
        pass still fills a dense gradient per tensor, so a step with this loss times only what
        the graft adds (interpolation, products with Δ, the S update, the reset)."""
        return sum(p.reshape(-1)[0] for p in self.graft["ours"].params)

    def run(self, method: str, graft_only: bool = False) -> None:
        """One step of ``method`` (the mask methods leave θ at θ_pre, fine-tuning does not:
        :meth:`restore`)."""
        loss = self.graft_only_loss if graft_only else label_word_loss
        if method == "upstream":
            self.upstream.step(self.model, self.batches, loss, self.settings)
        elif method == "finetune":
            finetune_step(self.model, self.optimizer, self.batches, loss)
        else:
            mask_step(self.model, self.graft[method], self.batches, loss, self.settings)

    def restore(self) -> None:
        """θ ← θ_pre (untimed, after a fine-tuning step), so every step starts there."""
        self.graft["ours"].reset()


def check_same_update(contenders: Contenders) -> dict:
    """One untimed step of every contender (the warm-up), all from the same S_0; the new S of
    each mask method against ours: max |S − S_ours| / max |S_ours − S_0|."""
    start = [s.detach().cpu().clone() for s in contenders.scores("ours")]
    for method in METHODS:
        contenders.run(method)
        contenders.restore()
    ours = contenders.scores("ours")
    update = max_abs_diff(ours, start)
    return {
        "update_size": update,
        "max_rel_diff": {
            m: max_abs_diff(contenders.scores(m), ours) / update for m in MASK_METHODS
        },
    }


def time_steps(
    contenders: Contenders, repeats: int, methods: Sequence[str] = METHODS, graft_only=False
) -> tuple[dict, dict]:
    """Seconds per round of every contender (turns in rotating order) and, on CUDA, the peak
    memory each step reached."""
    device = contenders.device
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    peaks: dict[str, int] = {}
    for r in range(repeats):
        for j in range(len(methods)):
            method = methods[(r + j) % len(methods)]
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            began = time.perf_counter()
            contenders.run(method, graft_only)
            synchronize(device)
            seconds[method].append(time.perf_counter() - began)
            contenders.restore()
            if device.type == "cuda":
                peaks[method] = max(peaks.get(method, 0), torch.cuda.max_memory_allocated(device))
        print(f"{'graft only ' if graft_only else ''}round {r + 1}/{repeats}: "
              + ", ".join(f"{m} {seconds[m][-1]:.3f} s" for m in methods), flush=True)  # fmt: skip
    return seconds, peaks


def memory_record(contenders: Contenders, peaks: dict[str, int]) -> dict:
    """The mask step's memory over the model's size: measured on CUDA, accounted on a CPU."""
    held = memory_accounting(contenders.model, contenders.graft["ours"])
    model_bytes = held["model"]
    if contenders.device.type == "cuda":
        record = {
            "measure": "torch.cuda.max_memory_allocated during the step (the host copies of "
            "ours_host and upstream are not counted; ours' device copies are resident in all)",
            "peak_bytes": peaks,
            "peak_over_model": {m: round(b / model_bytes, 3) for m, b in peaks.items()},
        }
        ratio = peaks["ours"] / model_bytes
    else:
        record = {
            "measure": "accounting, not a measured peak: bytes of the model and of the tensors "
            "the graft holds (θ_pre, θ_ft, b, S, the gradient); activations and per-tensor "
            "temporaries are not counted",
            "held_bytes": held,
            "process_peak_rss_mib": peak_memory_mib(contenders.device),
        }
        ratio = sum(held.values()) / model_bytes
    return record | {
        "model_bytes": model_bytes,
        "ours_over_model": round(ratio, 3),
        "formula": "M + 4.25E for float32: θ_pre, θ_ft, S and the gradient E each, b E/4",
    }


def goals(ratios: dict[str, float], memory_ratio: float) -> dict:
    measured = {
        "ours_over_finetune": (ratios["ours_over_finetune"], f"<= {FINETUNE_GOAL:g}"),
        "upstream_over_ours": (ratios["upstream_over_ours"], f">= {UPSTREAM_GOAL:g}"),
        "memory_over_model": (memory_ratio, f"<= {MEMORY_GOAL:g}"),
    }
    met = {
        "ours_over_finetune": ratios["ours_over_finetune"] <= FINETUNE_GOAL,
        "upstream_over_ours": ratios["upstream_over_ours"] >= UPSTREAM_GOAL,
        "memory_over_model": memory_ratio <= MEMORY_GOAL,
    }
    return {k: {"goal": g, "value": round(v, 3), "met": met[k]} for k, (v, g) in measured.items()}


def build_record(
    args, contenders: Contenders, check: dict, seconds: dict, graft_only: dict, memory: dict
) -> dict:
    fastest = {m: min(s) for m, s in seconds.items()}
    only = {m: min(s) for m, s in graft_only.items()}
    ratios = {
        "ours_over_finetune": fastest["ours"] / fastest["finetune"],
        "upstream_over_ours": fastest["upstream"] / fastest["ours"],
        "ours_host_over_ours": fastest["ours_host"] / fastest["ours"],
        "upstream_over_ours_host": fastest["upstream"] / fastest["ours_host"],
    }
    n_params = sum(p.numel() for p in contenders.model.parameters())
    n_eligible = contenders.graft["ours"].n_eligible
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    return {
        "benchmark": "graft",
        "device": str(contenders.device),
        "config": config
        | {
            "parameters": n_params,
            "eligible": n_eligible,
            "eligible_fraction": round(n_eligible / n_params, 4),
            "eligible_tensors": len(contenders.names),
            "selection": "head and embeddings frozen (the transformer blocks)",
            "patch_entries": patch_size(args.sparsity, n_eligible),
            "label_words": list(LABEL_WORDS),
            "loss": "mean CE over the label-word logits at the last position",
            "mask_settings": {"lr": contenders.settings.lr, "beta": contenders.settings.beta},
            "finetune_optimizer": "SGD (no momentum), lr 1e-4, over the eligible parameters",
        },
        "contenders": CONTENDERS,
        "timing_note": "the contenders take turns within each round (rotating order); each "
        "keeps its fastest round; one untimed step of each first",
        "seconds": {m: [round(x, 4) for x in s] for m, s in seconds.items()},
        "fastest_seconds": {m: round(x, 4) for m, x in fastest.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "graft_only": {
            "note": "each mask method with a loss of one entry per eligible tensor (no model "
            "compute, dense gradients): the part of the step where the methods differ",
            "seconds": {m: [round(x, 4) for x in s] for m, s in graft_only.items()},
            "fastest_seconds": {m: round(x, 4) for m, x in only.items()},
            "upstream_over_ours": round(only["upstream"] / only["ours"], 3),
            "ours_host_over_ours": round(only["ours_host"] / only["ours"], 3),
            "upstream_over_ours_host": round(only["upstream"] / only["ours_host"], 3),
        },
        "seconds_beyond_finetune": {
            m: round(fastest[m] - fastest["finetune"], 4) for m in MASK_METHODS
        },
        "beyond_finetune_note": "fastest step minus the fastest fine-tuning step: roughly what "
        "the graft adds to the forward and backward passes (interpolation, products with Δ, the "
        "S update, the reset); a difference of two noisy minima",
        "same_update": check
        | {
            "note": "one step of each from the same S_0: max |S − S_ours| / update_size, "
            "update_size = max |S_ours − S_0|"
        },  # fmt: skip
        "memory": memory,
        "goals": goals(ratios, memory["ours_over_model"]),
        "hardware": hardware(),
        "versions": package_versions(),
        "created": now(),
    }


def report(record: dict, out: Path) -> None:
    for key, value in record["ratios"].items():
        print(f"{key:>24}: {value}x")
    for key in ("upstream_over_ours", "ours_host_over_ours", "upstream_over_ours_host"):
        print(f"{'graft only ' + key:>35}: {record['graft_only'][key]}x")
    diffs = record["same_update"]["max_rel_diff"]
    print(f"{'same update':>24}: " + ", ".join(f"{m} {d:.1e}" for m, d in diffs.items()))
    memory = record["memory"]
    print(f"{'memory / model':>24}: {memory['ours_over_model']} ({memory['measure'][:40]}...)")
    for key, g in record["goals"].items():
        print(f"{key:>24}: {g['value']} (goal {g['goal']}): {'met' if g['met'] else 'not met'}")
    print(f"-> {out}")


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    contenders = Contenders(args)
    check = check_same_update(contenders)
    seconds, peaks = time_steps(contenders, args.repeats)
    graft_only, _ = time_steps(contenders, args.repeats, MASK_METHODS, graft_only=True)
    memory = memory_record(contenders, peaks)
    record = build_record(args, contenders, check, seconds, graft_only, memory)
    record["load_average"] = {"before": load_before, "after": os.getloadavg()}
    stem = "graft_smollm2" if args.model == EMBEDDED else "graft"
    out = args.out or RESULTS / f"{stem}_{contenders.device.type}.json"
    write_json(out, record)
    report(record, out)
    return record


if __name__ == "__main__":
    main()
