"""Benchmark: extraction vs a bare forward and two peers, on the same batches, in one run.

Every contender computes the same numbers: the last-token output of each block's input norm
(point ``norm1``: ``input_layernorm`` for Llama) at every layer, for the same prompts in the
same length-sorted batches of the same model. Timed per round, in this order (rotated by one
place each round, so no contender always runs first or last):

- ``bare``: ``model(...)`` and nothing else, what a plain forward costs (the goal's reference);
- ``bare_head_at_last``: the same with ``logits_to_keep`` = the batch's last-token positions,
  so the vocabulary head runs at those positions only, as ``ours`` does (the overhead of
  hooks, files and merge alone is ``ours`` over this one);
- ``ours``: :func:`adaptlab.extract.runner.extract_chunks` (hooks, predictions, one chunk file
  per 64 prompts) then :func:`merge_chunks` (one file per layer), as ``extract_repr.py`` runs;
- ``hidden_states``: the upstream way, ``model(..., output_hidden_states=True)``, then block
  i's own input norm applied to the last-token row of ``hidden_states[i]`` (the residual
  stream entering block i; the norm works per token, so one row normed alone is the same
  row as in the full norm output), kept in memory;
- ``nnsight``: nnsight 0.8.1 tracing the same model, saving ``input_layernorm.output`` at the
  last tokens of each layer inside the trace, kept in memory (skipped, with the reason
  printed, when nnsight is not installed: ``pip install nnsight==0.8.1``).

The peers run ``model(...)`` as their users write it, so they compute the vocabulary head at
every position. Each contender's rows are checked against ours (they must match to 1e-5).
The fastest of ``--repeats`` rounds is each contender's estimate (the one least disturbed by
other load); ratios are over ``bare``'s fastest round. Goals: ours <= 1.05x bare and faster
than both peers. A JSON record goes to bench/results/.

    python bench/extract.py                        # embedded SmolLM2-135M, 32 MMLU prompts
    python bench/extract.py --model tiny --n 64    # a tiny random Llama, seconds
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import load_file

from adaptlab.data import answer_letter_ids, load_mmlu, subset_by_subject, tokenize_prompts
from adaptlab.distributed import DistInfo
from adaptlab.extract.points import hook_sites
from adaptlab.extract.runner import TokenSelection, extract_chunks, merge_chunks, pad_batch
from adaptlab.io import write_json
from adaptlab.models import load_model, load_tokenizer
from adaptlab.models.tiny import tiny_llama, tiny_tokenizer
from adaptlab.telemetry import hardware, now, package_versions, peak_memory_mib

RESULTS = Path(__file__).parent / "results"
NNSIGHT_VERSION = "0.8.1"
GOAL_OVER_BARE = 1.05


def prompts_and_model(args):
    if args.model == "tiny":
        tokenizer = tiny_tokenizer()
        model = tiny_llama(vocab_size=len(tokenizer), num_layers=4, hidden_size=64)
    else:
        tokenizer = load_tokenizer(args.model)
        model = load_model(args.model, device=args.device)
    splits = load_mmlu()
    rows = subset_by_subject(splits.test, max(1, args.n // len(splits.subjects)) + 1, seed=0)
    examples = [splits.test[i] for i in rows][: args.n]
    prompts = tokenize_prompts(examples, splits.dev, tokenizer, args.shots, 42, None)
    return model.eval(), tokenizer, [p.input_ids for p in prompts]


class Batches:
    """The batches extraction runs: length-sorted within each chunk, right padding."""

    def __init__(self, seqs, batch_size: int, chunk_size: int, pad_id: int, device):
        self.n = len(seqs)
        self.order: list[int] = []
        self.batches = []
        for c in range(0, len(seqs), chunk_size):
            rows = sorted(range(c, min(c + chunk_size, len(seqs))), key=lambda i: -len(seqs[i]))
            for b in range(0, len(rows), batch_size):
                batch = [seqs[i] for i in rows[b : b + batch_size]]
                ids, mask, pos = pad_batch(batch, pad_id, "right", device)
                where = TokenSelection.build([len(s) for s in batch], "right", device, True)
                self.batches.append((ids, mask, pos, where))
                self.order.extend(rows[b : b + batch_size])

    def in_row_order(self, per_batch: list[torch.Tensor]) -> torch.Tensor:
        """``[n, H]`` in dataset row order from rows collected batch by batch."""
        out = torch.empty(self.n, *per_batch[0].shape[1:], dtype=per_batch[0].dtype)
        out[torch.tensor(self.order)] = torch.cat(per_batch).cpu()
        return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def bare(model, data: Batches, head_at_last: bool = False) -> dict[int, torch.Tensor]:
    for ids, mask, pos, where in data.batches:
        extra = {"logits_to_keep": where.kept} if head_at_last else {}
        model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **extra)
    return {}


def ours(model, seqs, sites, args, pad_id, letter_ids, info, tmp: Path) -> dict[str, Path]:
    """Extraction and merge into ``tmp``; returns the merged files, read back untimed."""
    extract_chunks(
        model, seqs, sites, tmp / "parts", info, pad_id=pad_id, letter_ids=letter_ids,
        batch_size=args.batch_size, chunk_size=args.chunk_size, progress=False,
    )  # fmt: skip
    files = {s.key: tmp / f"{s.point}_l{s.layer}.safetensors" for s in sites}
    merge_chunks(tmp / "parts", len(seqs), args.chunk_size, list(files), files, False)
    return files


@torch.no_grad()
def hidden_states(model, norms: list[torch.nn.Module], data: Batches) -> dict[int, torch.Tensor]:
    rows: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(norms))}
    for ids, mask, pos, where in data.batches:
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
            output_hidden_states=True,
        )  # fmt: skip
        for i, norm in enumerate(norms):
            rows[i].append(norm(out.hidden_states[i][where.batch_rows, where.last]))
    return {i: data.in_row_order(r) for i, r in rows.items()}


def nnsight_peer(model, norm_names: list[str]) -> Callable | None:
    """The nnsight contender, or None (reason printed) when nnsight cannot be imported."""
    try:
        import nnsight
    except ImportError as err:
        print(f"nnsight peer skipped: {err}; pip install nnsight=={NNSIGHT_VERSION}")
        return None
    traced = nnsight.NNsight(model)

    def envoy(name: str):
        node = traced
        for part in name.split("."):
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        return node

    norms = [envoy(name) for name in norm_names]

    @torch.no_grad()
    def run(data: Batches) -> dict[int, torch.Tensor]:
        rows: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(norms))}
        for ids, mask, pos, where in data.batches:
            with traced.trace(input_ids=ids, attention_mask=mask, position_ids=pos,
                              use_cache=False):  # fmt: skip
                saved = nnsight.save([n.output[where.batch_rows, where.last] for n in norms])
            for i, row in enumerate(saved):
                rows[i].append(row)
        return {i: data.in_row_order(r) for i, r in rows.items()}

    return run


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def time_rounds(contenders: dict[str, Callable], data: Batches, repeats: int, device):
    """Seconds per contender per round, interleaved, order rotated by one place per round;
    and each contender's outputs from its last round."""
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    outputs: dict[str, dict] = {}
    order = list(contenders)
    for r in range(repeats):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            start = time.perf_counter()
            outputs[name] = contenders[name](data)
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in seconds.items()))
    return seconds, outputs


def check_peers(outputs: dict[str, dict], sites) -> dict[str, float]:
    """Assert each peer's rows equal ours (merged files); returns the max |difference|."""
    ours_rows = [load_file(outputs["ours"][s.key])["repr"] for s in sites]
    max_diff = {}
    for name in ("hidden_states", "nnsight"):
        if name in outputs:
            for i, mine in enumerate(ours_rows):
                torch.testing.assert_close(outputs[name][i], mine, atol=1e-5, rtol=1e-5)
            diffs = [(outputs[name][i] - mine).abs().max() for i, mine in enumerate(ours_rows)]
            max_diff[name] = float(max(diffs))
    return max_diff


def make_record(args, model, seqs, sites, data: Batches, seconds, max_diff, nnsight_ran: bool):
    """The JSON record: config, per-round seconds, ratios, goals, hardware, versions."""
    device = torch.device(args.device)
    best = {k: min(v) for k, v in seconds.items()}
    ratio = {k: round(v / best["bare"], 4) for k, v in best.items()}
    peers = [k for k in ("hidden_states", "nnsight") if k in best]
    cfg = model.config
    tokens = sum(map(len, seqs))
    return {
        "benchmark": "extract",
        "config": {
            "model": args.model,
            "weights": "random (tiny Llama)" if args.model == "tiny" else "pretrained",
            "shape": {
                "layers": cfg.num_hidden_layers,
                "hidden": cfg.hidden_size,
                "heads": cfg.num_attention_heads,
                "kv_heads": cfg.num_key_value_heads,
                "intermediate": cfg.intermediate_size,
                "vocab": cfg.vocab_size,
            },
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "attn_implementation": getattr(cfg, "_attn_implementation", None),
            "n_prompts": len(seqs),
            "shots": args.shots,
            "tokens": tokens,
            "token_slots": sum(int(ids.numel()) for ids, *_ in data.batches),
            "batch_size": args.batch_size,
            "chunk_size": args.chunk_size,
            "points": "norm1 (input_layernorm output) at the last token, every layer",
            "hooked_outputs": len(sites),
            "rounds": args.repeats,
            "timing": "contenders interleaved, order rotated each round; fastest round each",
            "device": str(device),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
            "torch_threads": torch.get_num_threads(),
        },
        "contenders": {
            name: {
                "seconds": [round(x, 3) for x in seconds[name]],
                "best_seconds": round(best[name], 3),
                "ratio_to_bare": ratio[name],
            }
            for name in seconds
        },
        "ratio_ours_over_bare_head_at_last": round(best["ours"] / best["bare_head_at_last"], 4),
        "max_abs_diff_vs_ours": max_diff,
        "notes": {
            "ours": "hooks + predictions + chunk file + merge into one file per layer; the "
            "vocabulary head runs at the last tokens only (logits_to_keep)",
            "peers": "model(...) as their users call it: vocabulary head at every position; "
            "rows kept in memory, no files",
            "nnsight": f"nnsight {installed('nnsight')}" if nnsight_ran else "not installed",
        },
        "goals": {
            "ours_over_bare": {
                "goal": f"<= {GOAL_OVER_BARE}",
                "measured": ratio["ours"],
                "met": ratio["ours"] <= GOAL_OVER_BARE,
            },
            "ours_faster_than_peers": {
                "goal": "ours < each peer",
                "peers": peers,
                "met": all(best["ours"] < best[p] for p in peers) and len(peers) == 2,
            },
        },
        "extraction_tokens_per_second": round(tokens / best["ours"], 1),
        "peak_memory_mib": peak_memory_mib(device),
        "hardware": hardware(),
        "versions": package_versions() | {"nnsight": installed("nnsight")},
        "created": now(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m", help="'tiny' or a model")
    parser.add_argument("--n", type=int, default=32, help="prompts")
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--chunk_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per contender")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    model, tokenizer, seqs = prompts_and_model(args)
    model.to(device)
    info = DistInfo(0, 1, device)
    sites = hook_sites(model, ["norm1"])
    names = {m: n for n, m in model.named_modules()}
    letters = answer_letter_ids(tokenizer)
    letter_ids = [letters[x] for x in "ABCD"]
    pad = tokenizer.pad_token_id
    data = Batches(seqs, args.batch_size, args.chunk_size, pad, device)
    warm = Batches(seqs[: args.batch_size], args.batch_size, args.chunk_size, pad, device)
    with tempfile.TemporaryDirectory() as tmp:
        run_dirs = (Path(tmp) / f"run{i}" for i in itertools.count())
        contenders: dict[str, Callable] = {
            "bare": lambda d: bare(model, d),
            "bare_head_at_last": lambda d: bare(model, d, head_at_last=True),
            "ours": lambda d: ours(
                model, seqs[: d.n], sites, args, pad, letter_ids, info, next(run_dirs)
            ),
            "hidden_states": lambda d: hidden_states(model, [s.module for s in sites], d),
        }
        peer = nnsight_peer(model, [names[s.module] for s in sites])
        if peer is not None:
            contenders["nnsight"] = peer
        for run in contenders.values():  # warm-up: thread pools, first calls, nnsight setup
            run(warm)
        seconds, outputs = time_rounds(contenders, data, args.repeats, device)
        max_diff = check_peers(outputs, sites)

    record = make_record(args, model, seqs, sites, data, seconds, max_diff, peer is not None)
    ratio = {k: v["ratio_to_bare"] for k, v in record["contenders"].items()}
    name = f"extract_{'tiny' if args.model == 'tiny' else 'smollm2'}_{device.type}.json"
    write_json(RESULTS / name, record)
    print(
        f"best of {args.repeats} rounds, x bare forward: "
        + ", ".join(f"{k} {v:.3f}" for k, v in ratio.items())
        + f"; ours over bare_head_at_last {record['ratio_ours_over_bare_head_at_last']:.3f}"
        + f"; goals met: {[k for k, g in record['goals'].items() if g['met']]} -> {RESULTS / name}"
    )


if __name__ == "__main__":
    main()
