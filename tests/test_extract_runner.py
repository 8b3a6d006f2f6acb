"""Hooks, token selection, batching and chunk files, checked against independent computations."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from adaptlab.distributed import DistInfo
from adaptlab.extract.points import PointError, check_points, hook_sites
from adaptlab.extract.runner import (
    chunk_path,
    extract_chunks,
    merge_chunks,
    pad_batch,
    read_chunk_columns,
    select_tokens,
)
from adaptlab.io import concat_to_safetensors, save_tensors
from adaptlab.models.tiny import tiny_llama

SINGLE = DistInfo(rank=0, world=1, device=torch.device("cpu"))
POINTS = ["norm1", "norm2", "block", "final_norm", "logits"]


def random_sequences(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 17, (n,), generator=gen).tolist()
    return [torch.randint(5, vocab, (t,), generator=gen).tolist() for t in lengths]


def reference_rows(model, seq: list[int]) -> dict[str, torch.Tensor]:
    """Last-token rows computed without hooks: one unpadded forward with hidden states.

    HF returns ``hidden_states[i]`` = input of block i and ``hidden_states[n]`` = final norm
    output, so norm1 = block i's own input norm applied to ``hidden_states[i]``; block i's output
    is ``hidden_states[i+1]`` for i < n-1. norm2 (the post-attention norm) is not among the hidden
    states: it is recovered below from the block identity ``out = mid + mlp(norm2(mid))``.
    """
    ids = torch.tensor([seq])
    out = model(input_ids=ids, output_hidden_states=True)
    hs = out.hidden_states
    layers = model.model.layers
    n = len(layers)
    ref = {}
    for i, layer in enumerate(layers):
        ref[f"norm1/l{i}"] = layer.input_layernorm(hs[i])[0, -1]
        if i < n - 1:
            ref[f"block/l{i}"] = hs[i + 1][0, -1]
    ref[f"final_norm/l{n}"] = hs[n][0, -1]
    ref[f"logits/l{n + 1}"] = out.logits[0, -1]
    return ref


@torch.no_grad()
@pytest.mark.parametrize("side", ["right", "left"])
def test_hooks_equal_hidden_states_and_norms(tmp_path, side):
    model = tiny_llama(vocab_size=100, num_layers=3)
    seqs = random_sequences(11, 100)
    sites = hook_sites(model, POINTS)
    extract_chunks(
        model, seqs, sites, tmp_path, SINGLE, pad_id=0, letter_ids=[10, 11, 12, 13],
        padding_side=side, batch_size=4, chunk_size=5, progress=False,
    )  # fmt: skip
    n = len(seqs)
    cols = read_chunk_columns(tmp_path, n, 5, [s.key for s in sites] + ["index", "letter_logits"])
    assert cols["index"].tolist() == list(range(n))
    layers = model.model.layers
    for row, seq in enumerate(seqs):
        ref = reference_rows(model, seq)
        for key, value in ref.items():
            torch.testing.assert_close(cols[key][row], value, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cols["letter_logits"][row], ref["logits/l4"][10:14])
        for i, layer in enumerate(layers):  # norm2 via out = mid + mlp(norm2(mid))
            n2 = cols[f"norm2/l{i}"][row]
            mid = cols[f"block/l{i}"][row] - layer.mlp(n2)
            torch.testing.assert_close(
                layer.post_attention_layernorm(mid), n2, atol=1e-5, rtol=1e-4
            )


@torch.no_grad()
def test_mean_token_rule_matches_manual_mean():
    model = tiny_llama(vocab_size=100)
    seqs = random_sequences(4, 100, seed=1)
    ids, mask, pos = pad_batch(seqs, 0, "left", torch.device("cpu"))
    hidden = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    got = select_tokens(hidden.hidden_states[1], mask, "mean")
    for row, seq in enumerate(seqs):
        alone = model(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states[1]
        torch.testing.assert_close(got[row], alone[0].mean(0), atol=1e-5, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_size_one_and_eight_give_same_rows(tmp_path, side):
    model = tiny_llama(vocab_size=100)
    seqs = random_sequences(19, 100, seed=2)
    sites = hook_sites(model, ["norm1", "block", "logits"])
    keys = [s.key for s in sites]
    results = []
    for bs in (1, 8):
        parts = tmp_path / f"bs{bs}"
        extract_chunks(
            model, seqs, sites, parts, SINGLE, pad_id=0, letter_ids=[1, 2, 3, 4],
            padding_side=side, batch_size=bs, chunk_size=7, progress=False,
        )  # fmt: skip
        results.append(read_chunk_columns(parts, len(seqs), 7, keys))
    for key in keys:
        torch.testing.assert_close(results[0][key], results[1][key], atol=1e-5, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("side", ["right", "left"])
def test_vocabulary_head_runs_only_at_the_last_tokens(tmp_path, side):
    model = tiny_llama(vocab_size=100)
    seqs = random_sequences(9, 100, seed=4)
    head_rows = []
    handle = model.lm_head.register_forward_hook(
        lambda _m, _i, out: head_rows.append(out.shape[0] * out.shape[1])
    )
    sites = hook_sites(model, ["norm1", "logits"])
    extract_chunks(
        model, seqs, sites, tmp_path, SINGLE, pad_id=0, letter_ids=[1, 2, 3, 4],
        padding_side=side, batch_size=4, chunk_size=9, progress=False,
    )  # fmt: skip
    handle.remove()
    # B x (distinct last positions) rows per batch, not B x T
    assert max(head_rows) <= 4 * (4 if side == "right" else 1)
    cols = read_chunk_columns(tmp_path, 9, 9, ["logits/l3", "letter_logits", "pred_id"])
    for row, seq in enumerate(seqs):
        alone = model(input_ids=torch.tensor([seq])).logits[0, -1]
        torch.testing.assert_close(cols["logits/l3"][row], alone, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cols["letter_logits"][row], alone[1:5], atol=1e-5, rtol=1e-4)
    assert torch.equal(cols["pred_id"], cols["logits/l3"].argmax(1))


@torch.no_grad()
def test_mean_rule_keeps_the_head_at_every_position(tmp_path):
    model = tiny_llama(vocab_size=100)
    seqs = random_sequences(5, 100, seed=5)
    sites = hook_sites(model, ["logits"])
    extract_chunks(
        model, seqs, sites, tmp_path, SINGLE, pad_id=0, letter_ids=[1, 2, 3, 4],
        token_rule="mean", batch_size=4, chunk_size=5, progress=False,
    )  # fmt: skip
    cols = read_chunk_columns(tmp_path, 5, 5, ["logits/l3", "letter_logits"])
    for row, seq in enumerate(seqs):
        alone = model(input_ids=torch.tensor([seq])).logits[0]
        torch.testing.assert_close(cols["logits/l3"][row], alone.mean(0), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cols["letter_logits"][row], alone[-1, 1:5], atol=1e-5, rtol=1e-4)


def test_existing_chunks_are_skipped_and_merge_streams(tmp_path, capsys):
    model = tiny_llama(vocab_size=100)
    seqs = random_sequences(10, 100, seed=3)
    sites = hook_sites(model, ["norm1"], layer_interval=2)
    assert [s.layer for s in sites] == [0]
    kwargs = dict(pad_id=0, letter_ids=[1, 2, 3, 4], chunk_size=4, progress=False)
    first = extract_chunks(model, seqs, sites, tmp_path, SINGLE, **kwargs)
    assert (first.chunks_done, first.chunks_skipped) == (3, 0)
    before = load_file(chunk_path(tmp_path, 1))
    chunk_path(tmp_path, 2).unlink()
    again = extract_chunks(model, seqs, sites, tmp_path, SINGLE, **kwargs)
    assert (again.chunks_done, again.chunks_skipped) == (1, 2)
    assert torch.equal(load_file(chunk_path(tmp_path, 1))["norm1/l0"], before["norm1/l0"])
    out = tmp_path / "norm1_l0.safetensors"
    layout = merge_chunks(tmp_path, 10, 4, ["norm1/l0"], {"norm1/l0": out}, progress=True)
    assert layout["norm1/l0"]["shape"] == [10, 32]
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]
    assert bar.startswith("merge: 100%") and "1.28k/1.28k" in bar and "B/s" in bar  # 10x32x4 B
    merged = load_file(out)["repr"]
    expected = torch.cat([load_file(chunk_path(tmp_path, c))["norm1/l0"] for c in range(3)])
    assert torch.equal(merged, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_concat_to_safetensors_equals_torch_cat(tmp_path, dtype):
    parts = [torch.randn(n, 5, 3).to(dtype) for n in (4, 0, 7)]
    files = []
    for i, part in enumerate(parts):
        save_tensors(tmp_path / f"p{i}.safetensors", {"x": part})
        files.append((tmp_path / f"p{i}.safetensors", "x"))
    concat_to_safetensors(tmp_path / "all.safetensors", "repr", files, (11, 5, 3), dtype)
    assert torch.equal(load_file(tmp_path / "all.safetensors")["repr"], torch.cat(parts))


def test_unknown_point_is_a_clear_error():
    with pytest.raises(PointError, match="Unknown extraction point.*res2.*choose from"):
        check_points(["norm1", "res2"])
