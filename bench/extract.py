"""Benchmark: extraction vs a bare forward pass over the same batches, in one run.

The ratio (extraction wall time / bare forward wall time) measures what hooks, token
selection, gathering and the chunk files cost on top of the forward passes (goal: <= 1.05).
Both sides run the same batches of the same prompts on the same model; they alternate over
``--repeats`` rounds and the fastest round of each is compared (the minimum is the estimate
least disturbed by other load on the machine). A JSON record goes to bench/results/.

    python bench/extract.py                          # embedded SmolLM2-135M, MMLU 0-shot
    python bench/extract.py --model tiny --n 256     # a tiny random Llama, seconds
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from adaptlab.data import answer_letter_ids, load_mmlu, subset_by_subject, tokenize_prompts
from adaptlab.distributed import DistInfo
from adaptlab.extract.points import hook_sites
from adaptlab.extract.runner import extract_chunks, merge_chunks, pad_batch
from adaptlab.io import write_json
from adaptlab.models import load_model, load_tokenizer
from adaptlab.models.tiny import tiny_llama, tiny_tokenizer
from adaptlab.telemetry import hardware, now, package_versions, peak_memory_mib

RESULTS = Path(__file__).parent / "results"


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


@torch.no_grad()
def bare_forward(model, seqs, batch_size, chunk_size, pad_id, device) -> float:
    """The same batches extraction runs (length-sorted within each chunk), no hooks."""
    start = time.perf_counter()
    for c in range(0, len(seqs), chunk_size):
        rows = sorted(range(c, min(c + chunk_size, len(seqs))), key=lambda i: -len(seqs[i]))
        for b in range(0, len(rows), batch_size):
            ids, mask, pos = pad_batch(
                [seqs[i] for i in rows[b : b + batch_size]], pad_id, "right", device
            )
            model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def extraction(model, seqs, sites, batch_size, chunk_size, pad_id, letter_ids, info) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        extract_chunks(
            model, seqs, sites, Path(tmp) / "parts", info, pad_id=pad_id, letter_ids=letter_ids,
            batch_size=batch_size, chunk_size=chunk_size, progress=False,
        )  # fmt: skip
        files = {s.key: Path(tmp) / f"{s.point}_l{s.layer}.safetensors" for s in sites}
        merge_chunks(Path(tmp) / "parts", len(seqs), chunk_size, list(files), files, False)
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m", help="'tiny' or a model")
    parser.add_argument("--n", type=int, default=64, help="prompts")
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--chunk_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    model, tokenizer, seqs = prompts_and_model(args)
    model.to(device)
    info = DistInfo(0, 1, device)
    sites = hook_sites(model, ["norm1", "final_norm", "logits"])
    letters = answer_letter_ids(tokenizer)
    letter_ids = [letters[x] for x in "ABCD"]
    pad = tokenizer.pad_token_id
    bare_forward(model, seqs[: args.batch_size], args.batch_size, args.chunk_size, pad, device)
    bare, ours = [], []
    for _ in range(args.repeats):
        bare.append(bare_forward(model, seqs, args.batch_size, args.chunk_size, pad, device))
        ours.append(
            extraction(model, seqs, sites, args.batch_size, args.chunk_size, pad, letter_ids, info)
        )
    ratio = min(ours) / min(bare)
    tokens = sum(map(len, seqs))
    record = {
        "benchmark": "extract",
        "model": args.model,
        "n_prompts": len(seqs),
        "tokens": tokens,
        "shots": args.shots,
        "batch_size": args.batch_size,
        "hooked_outputs": len(sites),
        "bare_forward_seconds": bare,
        "extraction_seconds": ours,
        "ratio_extraction_over_forward": round(ratio, 4),
        "goal": "<= 1.05",
        "extraction_tokens_per_second": round(tokens / min(ours), 1),
        "peak_memory_mib": peak_memory_mib(device),
        "device": str(device),
        "hardware": hardware(),
        "versions": package_versions(),
        "created": now(),
    }
    name = f"extract_{'tiny' if args.model == 'tiny' else 'smollm2'}_{device.type}.json"
    write_json(RESULTS / name, record)
    print(
        f"extraction / bare forward = {ratio:.3f} (goal <= 1.05); "
        f"{record['extraction_tokens_per_second']} tok/s; peak {record['peak_memory_mib']} MiB; "
        f"-> {RESULTS / name}"
    )


if __name__ == "__main__":
    main()
