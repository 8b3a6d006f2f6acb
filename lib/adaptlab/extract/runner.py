"""Batched, sharded, resumable extraction of hooked representations.

The dataset is cut into chunks of ``chunk_size`` examples. Inside a chunk the examples are
sorted by length (less padding) and dealt round-robin to the ranks; each rank runs its share in
batches, keeps only the selected token row of every hooked output, and the rows are gathered
and written by rank 0 as one ``chunk_{c:06d}.safetensors`` holding every hooked tensor for that
chunk. A finished chunk is never recomputed, so a killed run started again with the same
arguments resumes where it stopped. :func:`merge_chunks` then streams the chunks into one file
per hooked output.

Every rank runs the same number of forward passes (short ranks repeat their shortest example,
marked invalid and dropped after the gather): FSDP's collectives need it, and no example is
dropped or duplicated whatever ``N mod world`` is.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from inspect import signature
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from adaptlab.distributed import DistInfo, all_gather_rows, barrier
from adaptlab.extract.points import HookSite, unwrap
from adaptlab.io import concat_to_safetensors, save_tensors


def select_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor, rule: str) -> torch.Tensor:
    """Pick one row per sequence from ``hidden [B, T, H]`` -> ``[B, H]``.

    ``last``: the last non-pad token (works for left and right padding). ``mean``: the mean over
    non-pad tokens.
    """
    if rule == "last":
        return hidden[
            torch.arange(hidden.shape[0], device=hidden.device), last_index(attention_mask)
        ]
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


def last_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last 1 in each row of ``attention_mask [B, T]`` -> ``[B]``."""
    length = attention_mask.shape[1]
    return length - 1 - attention_mask.flip(1).to(torch.int64).argmax(1)


class Capture:
    """Forward hooks that keep the selected token row of each hooked module output.

    Used as a context manager; hooks are removed on exit. ``rows[key]`` collects ``[B, H]``
    tensors per batch, in call order. Call :meth:`set_batch` before each forward pass: the rows
    to keep are worked out there once, so each hook is one indexing op (no per-hook index
    arithmetic, no device sync).
    """

    def __init__(self, sites: Sequence[HookSite], rule: str, dtype: torch.dtype | None = None):
        self.sites = list(sites)
        self.rule = rule
        self.dtype = dtype
        self.attention_mask: torch.Tensor | None = None
        self.rows: dict[str, list[torch.Tensor]] = {s.key: [] for s in self.sites}
        self._handles: list = []
        self._batch_rows: torch.Tensor | None = None
        self._position: dict[int, torch.Tensor] = {}  # output length -> [B] positions

    def set_batch(self, attention_mask: torch.Tensor, selection: TokenSelection) -> None:
        """The batch about to run: its ``[B, T]`` mask and where its last tokens are."""
        self.attention_mask = attention_mask
        self._batch_rows = selection.batch_rows
        # outputs over all T positions, and the head's output over the kept positions only
        self._position = {attention_mask.shape[1]: selection.last}
        if selection.kept is not None:
            self._position[len(selection.kept)] = selection.slot

    def select(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, T, H] -> [B, H]`` by the token rule, for the batch given to :meth:`set_batch`."""
        if self.rule == "last":
            return hidden[self._batch_rows, self._position[hidden.shape[1]]]
        return select_tokens(hidden, self.attention_mask, self.rule)

    def _hook(self, key: str):
        def hook(_module: nn.Module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            selected = self.select(hidden).detach()
            self.rows[key].append(selected if self.dtype is None else selected.to(self.dtype))

        return hook

    def __enter__(self) -> Capture:
        self._handles = [s.module.register_forward_hook(self._hook(s.key)) for s in self.sites]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def take(self) -> dict[str, torch.Tensor]:
        """Concatenate and clear what was captured since the last call: ``{key: [n, H]}``."""
        out = {k: torch.cat(v) for k, v in self.rows.items() if v}
        self.rows = {s.key: [] for s in self.sites}
        return out


@dataclass(frozen=True)
class TokenSelection:
    """Where the last real token of each padded sequence is, worked out on the host.

    Attributes:
        batch_rows: ``[B]`` ``0..B-1``.
        last: ``[B]`` position of each sequence's last real token in the padded ``[B, T]``.
        kept: ``[k]`` the distinct positions of ``last``, sorted: what the vocabulary head
            needs to be computed at (``logits_to_keep``); None to compute it everywhere.
        slot: ``[B]`` index of each sequence's last token in ``kept``.
    """

    batch_rows: torch.Tensor
    last: torch.Tensor
    kept: torch.Tensor | None
    slot: torch.Tensor

    @classmethod
    def build(
        cls, lengths: Sequence[int], side: str, device: torch.device, keep_head: bool
    ) -> TokenSelection:
        """From the unpadded lengths of a batch padded on ``side`` (no device sync)."""
        width = max(lengths)
        last = [width - 1 if side == "left" else n - 1 for n in lengths]
        kept = sorted(set(last))

        def put(values) -> torch.Tensor:
            return torch.tensor(list(values), dtype=torch.long).to(device)

        if not keep_head:
            return cls(put(range(len(lengths))), put(last), None, put(last))
        return cls(
            put(range(len(lengths))), put(last), put(kept), put([kept.index(p) for p in last])
        )


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, side: str, device: torch.device):
    """Pad token id lists into ``input_ids, attention_mask, position_ids``, each ``[B, T]``.

    Position ids count real tokens only, so a left-padded sequence sees the same positions as
    when it runs alone (needed by absolute position embeddings, harmless for RoPE).
    """
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    return ids.to(device), mask.to(device), positions.to(device)


@dataclass
class ExtractionStats:
    """Throughput counters of one run (this process's view of the whole job)."""

    examples: int = 0
    tokens: int = 0
    forward_seconds: float = 0.0
    wall_seconds: float = 0.0
    chunks_done: int = 0
    chunks_skipped: int = 0
    examples_per_rank: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        wall = max(self.wall_seconds, 1e-9)
        return {
            "examples": self.examples,
            "tokens": self.tokens,
            "wall_seconds": round(self.wall_seconds, 3),
            "forward_seconds": round(self.forward_seconds, 3),
            "examples_per_second": round(self.examples / wall, 3),
            "tokens_per_second": round(self.tokens / wall, 1),
            "chunks_done": self.chunks_done,
            "chunks_skipped": self.chunks_skipped,
            "examples_per_rank": self.examples_per_rank,
        }


def _chunk_rows(chunk: int, chunk_size: int, n_total: int) -> range:
    return range(chunk * chunk_size, min((chunk + 1) * chunk_size, n_total))


def chunk_path(parts_dir: Path, chunk: int) -> Path:
    return parts_dir / f"chunk_{chunk:06d}.safetensors"


def _deal(order: list[int], info: DistInfo) -> tuple[list[int], list[bool]]:
    """This rank's positions (round-robin over ``order``), padded to ``ceil(len/world)``."""
    mine = order[info.rank :: info.world]
    slots = math.ceil(len(order) / info.world)
    filler = mine[-1] if mine else order[-1]
    valid = [True] * len(mine) + [False] * (slots - len(mine))
    return mine + [filler] * (slots - len(mine)), valid


@torch.no_grad()
def extract_chunks(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    sites: Sequence[HookSite],
    parts_dir: Path,
    info: DistInfo,
    *,
    pad_id: int,
    letter_ids: Sequence[int],
    token_rule: str = "last",
    padding_side: str = "right",
    batch_size: int = 8,
    chunk_size: int = 256,
    store_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> ExtractionStats:
    """Run the model over ``sequences`` and write one chunk file per ``chunk_size`` examples.

    Args:
        model: the (possibly FSDP-sharded or PEFT-wrapped) model, in eval mode, on its device.
        sequences: token ids per example, in dataset row order.
        sites: hooked outputs (see :func:`adaptlab.extract.points.hook_sites`).
        parts_dir: folder of chunk files; existing chunk files are skipped (resume).
        info: rank/world/device of this process.
        pad_id: token id used for padding (masked out).
        letter_ids: ids of the answer letters, for the constrained prediction ``[4]``.
        token_rule: ``last`` or ``mean``.
        padding_side: ``left`` or ``right``; results do not depend on it.
        batch_size: examples per forward pass per process.
        chunk_size: examples per chunk file (the resume granularity).
        store_dtype: dtype of stored rows; None keeps the module output dtype.
        progress: show a progress bar on rank 0.

    Returns:
        Counters; ``examples_per_rank`` says how many real examples each rank ran.

    Each chunk file holds ``{point}/l{i}: [n_c, H]``, ``index: [n_c]`` (row numbers),
    ``pred_id: [n_c]`` (argmax over the vocabulary at the last token) and
    ``letter_logits: [n_c, 4]`` (logits of ``letter_ids`` at the last token).
    """
    parts_dir.mkdir(parents=True, exist_ok=True)
    n_total = len(sequences)
    n_chunks = math.ceil(n_total / chunk_size)
    done = {c for c in range(n_chunks) if chunk_path(parts_dir, c).exists()}
    barrier(info)  # every rank has listed the finished chunks before rank 0 writes new ones
    stats = ExtractionStats(examples_per_rank=[0] * info.world)
    letter_index = torch.as_tensor(list(letter_ids), device=info.device)
    # causal LMs must not build a KV cache here; encoders take no such argument
    forward_kwargs = {"use_cache": False} if unwrap(model).can_generate() else {}
    head_at_last = _head_at_last_token(model, sites, token_rule)
    bar = tqdm(total=n_total, unit="ex", desc="extract", dynamic_ncols=True,
               disable=not (progress and info.is_main))  # fmt: skip
    finished = sum(len(_chunk_rows(c, chunk_size, n_total)) for c in done)
    bar.update(finished)
    seen_tokens = 0
    start = time.perf_counter()
    with Capture(sites, token_rule, store_dtype) as capture:
        for chunk in range(n_chunks):
            if chunk in done:
                stats.chunks_skipped += 1
                continue
            rows = _chunk_rows(chunk, chunk_size, n_total)
            order = sorted(rows, key=lambda i: -len(sequences[i]))
            mine, valid = _deal(order, info)
            pred_ids, letter_logits = [], []
            for b in range(0, len(mine), batch_size):
                batch = mine[b : b + batch_size]
                seqs = [sequences[i] for i in batch]
                ids, mask, positions = pad_batch(seqs, pad_id, padding_side, info.device)
                selection = TokenSelection.build(
                    [len(q) for q in seqs], padding_side, info.device, head_at_last
                )
                capture.set_batch(mask, selection)
                if head_at_last:
                    forward_kwargs["logits_to_keep"] = selection.kept
                t0 = time.perf_counter()
                output = model(
                    input_ids=ids, attention_mask=mask, position_ids=positions, **forward_kwargs
                )
                stats.forward_seconds += time.perf_counter() - t0
                logits = getattr(output, "logits", None)
                if logits is None:  # an encoder without an LM head: representations only
                    pred_ids.append(torch.full((len(batch),), -1, device=info.device))
                    letter_logits.append(
                        torch.full((len(batch), len(letter_ids)), torch.nan, device=info.device)
                    )
                else:
                    last = logits[selection.batch_rows, selection.slot]
                    pred_ids.append(last.argmax(-1))
                    letter_logits.append(last[:, letter_index].float())
                if info.is_main:  # rank 0's share times world: an estimate until the gather
                    real = [i for i, ok in zip(batch, valid[b:], strict=False) if ok]
                    seen_tokens += sum(len(sequences[i]) for i in real) * info.world
                    bar.update(min(len(real) * info.world, finished + len(rows) - bar.n))
                    rate = seen_tokens / max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix(tok_s=f"{rate:.0f}")
            local = capture.take()
            local["index"] = torch.tensor(
                [i if ok else -1 for i, ok in zip(mine, valid, strict=True)], device=info.device
            )
            local["pred_id"] = torch.cat(pred_ids)
            local["letter_logits"] = torch.cat(letter_logits)
            gathered = {k: all_gather_rows(v, info) for k, v in local.items()}
            for r, n in enumerate((gathered["index"] >= 0).sum(1).tolist()):
                stats.examples_per_rank[r] += n
            if info.is_main:
                _write_chunk(chunk_path(parts_dir, chunk), gathered)
            stats.chunks_done += 1
            stats.examples += len(rows)
            stats.tokens += sum(len(sequences[i]) for i in rows)
            finished += len(rows)
            seen_tokens = stats.tokens
            bar.n = finished
            bar.refresh()
    barrier(info)
    bar.close()
    stats.wall_seconds = time.perf_counter() - start
    return stats


def _head_at_last_token(model: nn.Module, sites: Sequence[HookSite], token_rule: str) -> bool:
    """Whether the forward can compute the vocabulary head at the last tokens only.

    Only the last token's logits are used (predictions, and the ``logits`` point under the
    ``last`` rule), but a plain forward projects every position onto the vocabulary: for
    SmolLM2-135M that is a fifth of the forward's multiply-adds. transformers models take
    ``logits_to_keep`` (positions shared by the batch) for this.
    """
    base = unwrap(model)
    if not base.can_generate() or "logits_to_keep" not in signature(base.forward).parameters:
        return False
    head = base.get_output_embeddings()
    return token_rule == "last" or not any(s.module is head for s in sites)


def _write_chunk(path: Path, gathered: dict[str, torch.Tensor]) -> None:
    """Flatten ``[world, slots, ...]`` rank stacks, drop padding, restore row order, save."""
    index = gathered["index"].reshape(-1)
    keep = torch.nonzero(index >= 0).squeeze(1)
    order = keep[torch.argsort(index[keep])]
    tensors = {k: v.reshape(-1, *v.shape[2:])[order].cpu() for k, v in gathered.items()}
    save_tensors(path, tensors)


MERGE_THREADS = 8
"""Output files :func:`merge_chunks` writes at once."""


def merge_chunks(
    parts_dir: Path,
    n_examples: int,
    chunk_size: int,
    keys: Sequence[str],
    files: dict[str, Path],
    progress: bool = True,
) -> dict[str, dict]:
    """Concatenate chunk files into one ``repr`` tensor file per key; returns shapes/dtypes.

    Args:
        parts_dir: folder of ``chunk_*.safetensors``.
        n_examples: expected total rows (checked).
        chunk_size: rows per chunk, as used when extracting.
        keys: hooked tensor names (``{point}/l{i}``) to merge.
        files: output path per key.
        progress: show a progress bar of the bytes written (with MB/s).
    """
    n_chunks = math.ceil(n_examples / chunk_size)
    chunks = [chunk_path(parts_dir, c) for c in range(n_chunks)]
    missing = [p.name for p in chunks if not p.exists()]
    if missing:
        raise RuntimeError(f"Cannot merge: {len(missing)} chunk file(s) missing in {parts_dir}.")
    with safe_open(str(chunks[0]), framework="pt") as f:
        first = {k: f.get_slice(k) for k in keys}
        meta = {k: (first[k].get_shape()[1:], first[k].get_dtype()) for k in keys}
    dtypes = {
        "F32": torch.float32,
        "BF16": torch.bfloat16,
        "F16": torch.float16,
        "F64": torch.float64,
    }
    shapes = {key: (n_examples, *meta[key][0]) for key in keys}
    sizes = {key: math.prod(shapes[key]) * dtypes[meta[key][1]].itemsize for key in keys}
    bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="merge",
               dynamic_ncols=True, disable=not progress)  # fmt: skip
    # Each output file is synced to disk before it takes its final name; writing them from a
    # few threads lets those syncs overlap instead of queueing one behind another.
    with ThreadPoolExecutor(max_workers=min(MERGE_THREADS, len(keys))) as pool:
        jobs = {
            key: pool.submit(
                concat_to_safetensors,
                files[key],
                "repr",
                [(p, key) for p in chunks],
                shapes[key],
                dtypes[meta[key][1]],
            )
            for key in keys
        }
        for key, job in jobs.items():
            job.result()
            bar.update(sizes[key])
    bar.close()
    return {
        key: {"shape": list(shapes[key]), "dtype": str(dtypes[meta[key][1]]).replace("torch.", "")}
        for key in keys
    }


def read_chunk_columns(parts_dir: Path, n_examples: int, chunk_size: int, keys: Sequence[str]):
    """Concatenate small per-example columns (``index``, ``pred_id``, ...) of all chunks."""
    n_chunks = math.ceil(n_examples / chunk_size)
    columns: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    for c in range(n_chunks):
        with safe_open(str(chunk_path(parts_dir, c)), framework="pt") as f:
            for k in keys:
                columns[k].append(f.get_tensor(k))
    return {k: torch.cat(v) for k, v in columns.items()}
