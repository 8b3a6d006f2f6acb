"""Benchmark: adaptlab's eNTK engine vs the upstream way and a loop of backward passes.

One run times every method on the same random model (a ~4.5M-parameter RoBERTa masked LM with
its decoder tied to the word embedding, built from a config, prompt head: label-word logits at
the mask) and the same examples (N train rows x M test columns, variable lengths up to T
tokens, right padding):

- ``ours``: :func:`adaptlab.ntk.compute_kernel` (one forward and C backward passes per batch,
  per-example gradients materialised block by block);
- ``upstream_jvp`` (sgd only): what LM-Kernel-FT runs for ``sgd``: ``jacrev`` of the row
  batch, then every row of it pushed through the column batch by a ``jvp`` (``vmap`` over
  rows), no column Jacobian materialised. The headline comparison for ``sgd``;
- ``upstream_jacrev``: the Jacobian-contraction way (what upstream runs for ``signgd``):
  ``jacrev`` over all parameters of the whole batch output per row batch and per column
  batch, then a float64 ``einsum`` per tensor, summed;
- ``loop``: per-example gradients by one backward pass per example and class, held whole as
  ``[N, C, P]`` and ``[M, C, P]``, then one product.

Each method runs in a fresh process (ours: one per formula), so its peak memory is its own:
peak resident set size (``VmHWM``, reset after a one-example warm-up) minus the resident size
at that point. The other methods compute their gradients once per process and share them
across formulas; a formula's time is that shared time plus its own contraction, what a run
of that formula alone would take. With ``--rounds R`` every process runs R times, the methods
interleaved within each round, and each keeps its fastest round (the one least disturbed by
other load). All methods see the same batches (8 examples by default: upstream's ``jacrev``
memory grows with the square of the batch). The kernels are compared with ``ours``
(max |difference| / max |K|). Goals: sgd >= 3x faster than ``upstream_jvp`` with entries equal
to 1e-5; signgd and asymmetric_signgd not slower than ``upstream_jacrev``, with bounded peak
memory. A JSON record goes to bench/results/kernel_cpu.json.

    python bench/kernel.py                                  # CPU defaults (~15 minutes)
    python bench/kernel.py --formulas sgd --methods ours upstream_jvp --rounds 3   # headline
    python bench/kernel.py --n 16 --m 16 --tokens 32        # a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.func import jacrev, jvp, vmap
from transformers import RobertaConfig, RobertaForMaskedLM

from adaptlab.io import write_json
from adaptlab.ntk import KernelFunction, compute_kernel, grad_dim, select_parameters
from adaptlab.telemetry import hardware, now, package_versions

RESULTS = Path(__file__).parent / "results"
FORMULAS = ("sgd", "signgd", "asymmetric_signgd")
METHODS = ("ours", "upstream_jvp", "upstream_jacrev", "loop")
SGD_GOAL = 3.0  # ours at least this many times faster than upstream_jvp on sgd
TOLERANCE = 1e-5  # max |K - K_ours| / max |K_ours|
LABEL_WORDS = (11, 12)  # C = 2 classes
MASK_ID = 4


def build_model(args) -> RobertaForMaskedLM:
    """A random RoBERTa masked LM (float32, eval mode) of about 4.5M parameters by default."""
    config = RobertaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        intermediate_size=4 * args.hidden,
        max_position_embeddings=args.tokens + 4,
        pad_token_id=1,
        tie_word_embeddings=True,
    )
    # eager attention, as upstream's transformers had: vmap has no rule for SDPA's backward
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return RobertaForMaskedLM(config).eval()


def bench_parameters(model: RobertaForMaskedLM) -> dict:
    """All parameters but the attention key biases: softmax cancels them, so their gradient
    is zero up to rounding and its sign (in sign kernels) is noise no two methods share."""
    return {k: v for k, v in select_parameters(model).items() if "key.bias" not in k}


def make_batches(n: int, batch_size: int, tokens: int, vocab: int, seed: int) -> list[dict]:
    """Prompt batches: lengths in [tokens/2, tokens], one mask each, right padding."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(tokens // 2, tokens + 1, (n,), generator=gen)
    batches = []
    for start in range(0, n, batch_size):
        rows = lengths[start : start + batch_size]
        width = int(rows.max())
        ids = torch.ones(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        positions = torch.zeros(len(rows), dtype=torch.long)
        for i, length in enumerate(rows.tolist()):
            ids[i, :length] = torch.randint(5, vocab, (length,), generator=gen)
            positions[i] = length - 3
            ids[i, positions[i]] = MASK_ID
            mask[i, :length] = 1
        batches.append(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "positions": positions,
                "class_labels": torch.zeros(len(rows), dtype=torch.long),
                "label_word_ids": torch.tensor(LABEL_WORDS),
            }
        )
    return batches


SIGNS = {"sgd": (False, False), "signgd": (True, True), "asymmetric_signgd": (True, False)}


class Timer:
    """Seconds spent per label; ``shared`` time counts for every formula."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, label: str, start: float) -> None:
        self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start


def _signed(jac: dict, sign: bool) -> dict:
    return {k: v.sign() for k, v in jac.items()} if sign else jac


def upstream_jacrev(fn, params, rows, cols, formulas, timer) -> dict:
    """Jacobians of each whole batch by ``jacrev``, float64 ``einsum`` per tensor (upstream).

    The Jacobians (outer per row batch, inner recomputed per column batch, as upstream) are
    computed once and shared by the formulas; each formula adds its own contraction time.
    """
    blocks = {f: [[] for _ in rows] for f in formulas}
    for r, batch_r in enumerate(rows):
        start = time.perf_counter()
        jac_r = jacrev(lambda p, b=batch_r: fn(p, b))(params)
        timer.add("shared", start)
        for batch_c in cols:
            start = time.perf_counter()
            jac_c = jacrev(lambda p, b=batch_c: fn(p, b))(params)
            timer.add("shared", start)
            for f in formulas:
                start = time.perf_counter()
                left, right = _signed(jac_r, SIGNS[f][0]), _signed(jac_c, SIGNS[f][1])
                block = sum(
                    torch.einsum(
                        "olw,ikw->olik",
                        left[k].flatten(2).to(torch.float64),
                        right[k].flatten(2).to(torch.float64),
                    )
                    for k in params
                )
                blocks[f][r].append(block)
                timer.add(f, start)
            del jac_c
    return {f: torch.cat([torch.cat(b, dim=2) for b in blocks[f]]) for f in formulas}


def upstream_jvp(fn, params, rows, cols, formulas, timer) -> dict:
    """Upstream's SGD path: ``jacrev`` of the row batch, each of its B·C rows pushed through
    the column batch by a ``jvp`` (``vmap(vmap(jvp))``); A-SignGD signs the row Jacobian."""
    blocks = {f: [[] for _ in rows] for f in formulas}
    for r, batch_r in enumerate(rows):
        start = time.perf_counter()
        jac_r = jacrev(lambda p, b=batch_r: fn(p, b))(params)
        timer.add("shared", start)
        for batch_c in cols:

            def ntk_slice(tangents, b=batch_c):
                return jvp(lambda p: fn(p, b), (params,), (tangents,))[1]

            for f in formulas:
                start = time.perf_counter()
                block = vmap(vmap(ntk_slice))(_signed(jac_r, SIGNS[f][0]))
                blocks[f][r].append(block.to(torch.float64))
                timer.add(f, start)
    return {f: torch.cat([torch.cat(b, dim=2) for b in blocks[f]]) for f in formulas}


def loop_gradients(fn, params, batches) -> torch.Tensor:
    """``[N, C, P]`` per-example gradients, one backward pass per example and class."""
    out = []
    names = list(params)
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            one = {k: v[i : i + 1] if k != "label_word_ids" else v for k, v in batch.items()}
            per_class = []
            with torch.enable_grad():
                scores = fn(params, one)[0]
                for c in range(len(scores)):
                    grads = torch.autograd.grad(
                        scores[c], [params[n] for n in names], retain_graph=c < len(scores) - 1
                    )
                    per_class.append(torch.cat([g.flatten() for g in grads]))
            out.append(torch.stack(per_class))
    return torch.stack(out)


def loop(fn, params, rows, cols, formulas, timer) -> dict:
    """Gradients from the loop held whole (shared), then one product per formula (float32:
    sign products are exact below 2^24 parameters, and float64 copies would double memory)."""
    start = time.perf_counter()
    g_r, g_c = loop_gradients(fn, params, rows), loop_gradients(fn, params, cols)
    timer.add("shared", start)
    out = {}
    for f in formulas:
        start = time.perf_counter()
        left = (g_r.sign() if SIGNS[f][0] else g_r).flatten(0, 1)
        right = (g_c.sign() if SIGNS[f][1] else g_c).flatten(0, 1)
        n, c, _ = g_r.shape
        out[f] = (left @ right.T).double().view(n, c, -1, c)
        timer.add(f, start)
    return out


def ours(fn, params, rows, cols, formulas, timer) -> dict:
    out = {}
    for f in formulas:
        start = time.perf_counter()
        out[f] = compute_kernel(fn, params, rows, cols, f)
        timer.add(f, start)
    return out


METHOD_FNS = {
    "ours": ours,
    "upstream_jacrev": upstream_jacrev,
    "upstream_jvp": upstream_jvp,
    "loop": loop,
}


def _rss_mib(field: str) -> float:
    line = next(
        x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field)
    )
    return int(line.split()[1]) / 1024


def probe(args) -> None:
    """Child process: one method (one formula for ours); prints JSON, saves the kernels."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    model = build_model(args)
    fn = KernelFunction(model, head="label_words", label_word_ids=LABEL_WORDS)
    params = bench_parameters(model)
    rows = make_batches(args.n, args.batch_size, args.tokens, args.vocab, seed=1)
    cols = make_batches(args.m, args.batch_size, args.tokens, args.vocab, seed=2)
    if args.train_train:
        cols = rows
    method = METHOD_FNS[args.probe]

    # warm-up on one example per side: thread pools, first-call overheads
    def first(batch: dict) -> list[dict]:
        return [{k: v if k == "label_word_ids" else v[:1] for k, v in batch.items()}]

    # as upstream (``torch.no_grad`` around the kernel), so no result keeps a graph alive
    with torch.no_grad():
        method(fn, params, first(rows[0]), first(cols[0]), args.probe_formulas, Timer())
        Path("/proc/self/clear_refs").write_text("5")
        before = _rss_mib("VmRSS")
        timer = Timer()
        kernels = method(fn, params, rows, cols, args.probe_formulas, timer)
    peak = _rss_mib("VmHWM") - before
    torch.save({f: k.detach() for f, k in kernels.items()}, args.out)
    shared = timer.seconds.get("shared", 0.0)
    seconds = {f: round(shared + timer.seconds[f], 3) for f in args.probe_formulas}
    record = {"seconds": seconds, "shared_seconds": round(shared, 3)}
    print(json.dumps(record | {"peak_extra_mib": round(peak, 1), "grad_dim": grad_dim(params)}))


def run_probe(args, method: str, formulas: list[str], out: Path) -> dict:
    cmd = [sys.executable, __file__, "--probe", method, "--probe_formulas", *formulas,
           "--out", str(out), "--n", str(args.n), "--m", str(args.m),
           "--tokens", str(args.tokens), "--batch_size", str(args.batch_size),
           "--vocab", str(args.vocab), "--hidden", str(args.hidden),
           "--layers", str(args.layers), "--threads", str(args.threads)]  # fmt: skip
    if args.train_train:
        cmd.append("--train_train")
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        return {"error": lines[-1][:300] + (" (out of memory?)" if result.returncode < 0 else "")}
    return json.loads(result.stdout.strip().splitlines()[-1])


def goals(ratios: dict, diffs: dict) -> dict:
    """Each goal with what was measured; ``met`` is None when this run did not measure it."""
    jvp, jacrev = ratios.get("upstream_jvp/sgd"), ratios.get("upstream_jacrev/sgd")
    signs = [ratios.get(f"upstream_jacrev/{f}") for f in FORMULAS[1:]]
    signs = [r for r in signs if r is not None]
    return {
        "sgd_vs_upstream_jvp": {
            "goal": f">= {SGD_GOAL:g}x faster than upstream_jvp (upstream's sgd path), "
            f"entries equal to {TOLERANCE:g} (max |difference| / max |K|)",
            "time_ratio": jvp["time_ratio"] if jvp else None,
            "max_rel_diff": diffs.get("upstream_jvp/sgd"),
            "met": None if jvp is None else bool(
                jvp["time_ratio"] >= SGD_GOAL and diffs["upstream_jvp/sgd"] <= TOLERANCE
            ),
        },
        "sgd_vs_upstream_jacrev": {
            "goal": f">= {SGD_GOAL:g}x faster than upstream_jacrev",
            "time_ratio": jacrev["time_ratio"] if jacrev else None,
            "met": None if jacrev is None else jacrev["time_ratio"] >= SGD_GOAL,
        },
        "sign_formulas": {
            "goal": "not slower than upstream_jacrev, peak memory <= upstream's (ours holds "
            "<= 2^28 factor numbers + 2^27 gradient-block numbers by default)",
            "met": None if not signs else all(
                r["time_ratio"] >= 1 and r["memory_ratio"] >= 1 for r in signs
            ),
        },
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=64, help="row (train) examples")
    parser.add_argument("--m", type=int, default=64, help="column (test) examples")
    parser.add_argument("--tokens", type=int, default=64, help="longest example, in tokens")
    parser.add_argument("--batch_size", type=int, default=8, help="row and column batches")
    parser.add_argument("--vocab", type=int, default=5000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--train_train", action="store_true", help="columns = rows")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--formulas", nargs="*", default=list(FORMULAS), choices=FORMULAS)
    parser.add_argument("--rounds", type=int, default=1, help="runs per method; fastest kept")
    parser.add_argument("--probe", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--probe_formulas", nargs="*", choices=FORMULAS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(args)
        return
    hidden = ("probe", "probe_formulas", "out")
    record = {
        "benchmark": "kernel",
        "device": "cpu",
        "config": {k: v for k, v in vars(args).items() if k not in hidden}
        | {"grad_dim": grad_dim(bench_parameters(build_model(args))),
           "parameters": "all but attention key biases (zero gradient up to rounding)",
           "model": "RobertaForMaskedLM, decoder tied to the word embedding, eager attention",
           "classes": len(LABEL_WORDS), "head": "label-word logits at the mask",
           "rows_vs_columns": "train x train" if args.train_train else "N train x M test"},
        "memory_measure": "peak RSS (VmHWM, reset before the method) minus RSS then, "
        "one process per run",
        "timing_note": "upstream_jacrev, upstream_jvp and loop compute their gradients once "
        "per run and share them across formulas: a formula's seconds are the shared seconds "
        "plus its own contraction (what a run of that formula alone costs); ours runs each "
        "formula in its own process; with rounds > 1 the processes are interleaved per round "
        "and each key keeps its fastest round (and that round's memory)",
        "runs": {},
        "seconds": {},
        "peak_extra_mib": {},
        "max_rel_diff_vs_ours": {},
    }  # fmt: skip
    jobs = [("ours", [f]) for f in args.formulas if "ours" in args.methods]
    for method in args.methods:
        if method == "upstream_jvp" and "sgd" in args.formulas:
            jobs.append((method, ["sgd"]))
        elif method not in ("ours", "upstream_jvp"):
            jobs.append((method, list(args.formulas)))
    kernels: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for method, formulas in jobs:
                out = Path(tmp) / f"{method}_{'_'.join(formulas)}.pt"
                res = run_probe(args, method, formulas, out)
                record["runs"].setdefault(f"{method}/{'+'.join(formulas)}", []).append(res)
                print(f"{r + 1}: {method:>16} {'+'.join(formulas):>32}: {res}", flush=True)
                if "error" in res:
                    continue
                for f, k in torch.load(out).items():
                    kernels.setdefault(f, {})[method] = k
                    key = f"{method}/{f}"
                    if res["seconds"][f] < record["seconds"].get(key, float("inf")):
                        record["seconds"][key] = res["seconds"][f]
                        record["peak_extra_mib"][key] = res["peak_extra_mib"]
    for f, by_method in kernels.items():
        if "ours" in by_method:
            ref = by_method["ours"]
            for method, k in by_method.items():
                diff = float((k - ref).abs().max() / ref.abs().max())
                record["max_rel_diff_vs_ours"][f"{method}/{f}"] = diff
    sec, peak = record["seconds"], record["peak_extra_mib"]
    ratios = {}
    for key in sec:
        method, _, f = key.partition("/")
        if method != "ours" and f"ours/{f}" in sec:
            ratios[key] = {
                "time_ratio": round(sec[key] / sec[f"ours/{f}"], 2),
                "memory_ratio": round(peak[key] / peak[f"ours/{f}"], 2),
            }
    record["ratios"] = ratios
    record["goals"] = goals(ratios, record["max_rel_diff_vs_ours"])
    for key, r in ratios.items():
        print(f"{key:>32}: {r['time_ratio']}x the time, {r['memory_ratio']}x the memory of ours")
    for key, d in record["max_rel_diff_vs_ours"].items():
        print(f"{key:>32}: max rel diff {d:.1e}")
    for key, g in record["goals"].items():
        print(f"{key:>32}: {g['goal']}: {'not measured' if g['met'] is None else g['met']}")
    record |= {"hardware": hardware(), "versions": package_versions(), "created": now()}
    name = RESULTS / "kernel_cpu.json"
    write_json(name, record)
    print(f"-> {name}")


if __name__ == "__main__":
    main()
