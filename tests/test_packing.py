"""Sequence packing: rows, masks, and per-example losses/gradients equal to padded training."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from peft import LoraConfig, get_peft_model

from adaptlab.data import load_mmlu
from adaptlab.extract.points import unwrap
from adaptlab.models.tiny import tiny_llama, tiny_tokenizer
from adaptlab.training.answer_only import (
    collate_answer_only,
    collate_packed_answer_only,
    encode_answer_only,
)
from adaptlab.training.loop import TRAIN_DATA
from adaptlab.training.objectives import OBJECTIVES
from adaptlab.training.optim import TrainingError
from adaptlab.training.packing import (
    block_causal_mask,
    first_fit_decreasing,
    pack_rows,
    pack_sequences,
    packed_inputs,
    packed_model_inputs,
)
from tests.test_finetune import args_for, finetune, train_losses

MAX_LEN = 160


def model_with(attn_implementation: str) -> torch.nn.Module:
    model = tiny_llama(vocab_size=len(tiny_tokenizer()), max_position_embeddings=MAX_LEN)
    model.config._attn_implementation = attn_implementation
    return model.train()  # no dropout in the tiny Llama: train mode is deterministic


@pytest.fixture(scope="module")
def items(mmlu_file):
    """Six weighted answer-only examples of 3 subjects, 33 to 63 tokens."""
    test = load_mmlu(mmlu_file).test
    examples = [test[i] for i in (0, 1, 2, 9, 10, 18)]
    return encode_answer_only(examples, tiny_tokenizer(), MAX_LEN, weighted=True)


def alone(model, item) -> torch.Tensor:
    """The answer-only loss of one example run alone, without padding or packing."""
    ids = torch.tensor(item["input_ids"])
    logits = model(input_ids=ids[None]).logits[0]
    return -torch.log_softmax(logits[-2], -1)[ids[-1]]


def test_rows_are_first_fit_decreasing_with_the_fewest_slots():
    assert first_fit_decreasing([7, 5, 3], 10) == [[0, 2], [1]]
    # capacity 10 gives 2 rows of 10 slots, capacity 8 gives 2 rows of 8: the latter wins
    assert pack_rows([7, 5, 3], max_len=10) == [[0], [1, 2]]
    assert pack_rows([6, 2, 2, 2, 4], max_len=8) == [[0, 1], [4, 2, 3]]  # 16 slots, not 30
    assert pack_rows([4, 4, 4, 4], max_len=8) == [[0], [1], [2], [3]]  # a tie: narrower rows
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 64) for _ in range(rng.randint(1, 12))]
        rows = pack_rows(lengths, 64)
        width = max(sum(lengths[i] for i in row) for row in rows)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert width <= 64
        assert len(rows) * width <= len(lengths) * max(lengths)  # never more than padding
    with pytest.raises(TrainingError, match="does not fit a packed row of max_len=8"):
        pack_rows([9, 2], 8)


def test_packed_batch_layout():
    examples = [
        {"input_ids": [5] * 7, "labels": [6] * 7},
        {"input_ids": [7] * 5, "labels": [8] * 5},
        {"input_ids": [9] * 3, "labels": [-100] * 3},
    ]
    batch = pack_sequences(examples, {"input_ids": 0, "labels": -100}, max_len=10)
    assert batch["input_ids"].tolist() == [[5] * 7 + [0], [7] * 5 + [9] * 3]
    assert batch["labels"].tolist() == [[6] * 7 + [-100], [8] * 5 + [-100] * 3]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 0], [0, 1, 2, 3, 4, 0, 1, 2]]
    assert batch["segment_ids"].tolist() == [[0] * 7 + [-1], [1] * 5 + [2] * 3]
    assert batch["attention_mask"].tolist() == [[1] * 7 + [0], [1] * 8]
    mask = block_causal_mask(batch["segment_ids"])[1, 0]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:5, :5] = torch.ones(5, 5, dtype=torch.bool).tril()
    expected[5:, 5:] = torch.ones(3, 3, dtype=torch.bool).tril()
    assert torch.equal(mask, expected)
    additive = block_causal_mask(batch["segment_ids"], torch.float32)[1, 0]
    assert torch.equal(additive == 0, expected)
    assert float(additive.min()) == torch.finfo(torch.float32).min
    with pytest.raises(TrainingError, match="cannot drive attn_implementation='flex_attention'"):
        packed_inputs(batch, "flex_attention", torch.float32)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_losses_and_gradients_equal_padded_ones(attn_implementation, items):
    model = model_with(attn_implementation)
    pad = tiny_tokenizer().pad_token_id
    padded = collate_answer_only(items, pad)
    packed = collate_packed_answer_only(items, pad, MAX_LEN)
    assert packed["input_ids"].numel() < 0.8 * padded["input_ids"].numel()  # it really packs
    assert packed["input_ids"].shape[0] < len(items)
    objective = OBJECTIVES["answer_only"]
    out_padded, out_packed = objective(model, padded), objective(model, packed)
    by_hand = torch.stack([alone(model, item) for item in items])
    torch.testing.assert_close(out_padded.per_example, by_hand, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_packed.per_example, by_hand, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_packed.loss, out_padded.loss, rtol=0, atol=1e-5)

    params = [p for p in model.parameters() if p.requires_grad]
    for i in range(len(items)):  # each example's gradient, and the batch loss's
        for a, b in zip(
            torch.autograd.grad(out_packed.per_example[i], params, retain_graph=True),
            torch.autograd.grad(out_padded.per_example[i], params, retain_graph=True),
            strict=True,
        ):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for a, b in zip(
        torch.autograd.grad(out_packed.loss, params),
        torch.autograd.grad(out_padded.loss, params),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_examples_in_one_row_never_attend_to_each_other(attn_implementation, items):
    model = model_with(attn_implementation).eval()
    pad = tiny_tokenizer().pad_token_id
    batch = collate_packed_answer_only(items, pad, MAX_LEN)
    segments = batch["segment_ids"]
    row = next(r for r in range(len(segments)) if len(set(segments[r].tolist()) - {-1}) > 1)
    first = int(segments[row, 0])  # the row's first example, the others follow it
    changed = {key: value.clone() for key, value in batch.items()}
    changed["input_ids"][segments == first] = (batch["input_ids"][segments == first] + 7) % 500
    with torch.no_grad():
        before = model(**packed_model_inputs(model, batch)[0]).logits
        after = model(**packed_model_inputs(model, changed)[0]).logits
    others = (segments != first) & (segments >= 0)
    torch.testing.assert_close(after[others], before[others], rtol=0, atol=1e-6)
    assert not torch.allclose(after[segments == first], before[segments == first], atol=1e-3)


class Wrapped(torch.nn.Module):
    """What DDP looks like from outside: the model under ``.module``."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        return self.module(**kwargs)


@pytest.mark.parametrize("packing", [False, True])
def test_lm_head_runs_only_where_a_label_is(packing, items):
    lora = LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.0)
    model = get_peft_model(model_with("sdpa"), lora)
    pad = tiny_tokenizer().pad_token_id
    batch = (
        collate_packed_answer_only(items, pad, MAX_LEN)
        if packing
        else collate_answer_only(items, pad)
    )
    shapes = []
    head = unwrap(model).lm_head
    hook = head.register_forward_hook(lambda module, args, out: shapes.append(args[0].shape))
    out = OBJECTIVES["answer_only"](Wrapped(model), batch)
    hook.remove()
    rows = batch["input_ids"].shape[0]
    assert len(shapes) == 1 and shapes[0][0] == rows and shapes[0][1] <= len(items)
    assert shapes[0][1] < batch["input_ids"].shape[1] / 4  # not every position
    with torch.no_grad():
        by_hand = torch.stack([alone(model, item) for item in items])
    torch.testing.assert_close(out.per_example.detach(), by_hand, rtol=0, atol=1e-5)


def test_flattened_layout_follows_the_varlen_position_id_convention(items):
    """What flash attention gets: one row, no mask, examples marked by position ids restarting.

    Flash attention needs a GPU; sdpa reads the same layout through transformers' packed-sequence
    detection, which checks the flattening and the position ids.
    """
    model = model_with("sdpa").eval()
    batch = collate_packed_answer_only(items, tiny_tokenizer().pad_token_id, MAX_LEN)
    inputs, labels, segments = packed_inputs(batch, "flash_attention_2", torch.float32)
    assert set(inputs) == {"input_ids", "position_ids", "use_cache"}
    assert inputs["input_ids"].shape == labels.shape == segments.shape
    assert inputs["input_ids"].shape[0] == 1
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        for i, item in enumerate(items):
            ids = torch.tensor(item["input_ids"])
            expected = model(input_ids=ids[None]).logits[0]
            torch.testing.assert_close(logits[segments[0] == i], expected, rtol=0, atol=1e-5)


def test_packed_finetune_run_equals_the_padded_run(tiny_model_dir, mmlu_file, tmp_path):
    calls = []
    data = TRAIN_DATA["answer_only"]

    def counted_pack(examples, pad_token_id, max_len):
        calls.append(len(examples))
        return data.pack(examples, pad_token_id, max_len)

    flags = ["--micro_batch_size", "4", "--lora_dropout", "0", "--checkpoints", "0"]
    finetune.main(args_for(tiny_model_dir, mmlu_file, tmp_path / "padded", *flags))
    assert calls == []
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(TRAIN_DATA, "answer_only", dataclasses.replace(data, pack=counted_pack))
        finetune.main(
            args_for(tiny_model_dir, mmlu_file, tmp_path / "packed", *flags, "--packing", "true")
        )
    assert calls == [4] * 6  # every step's one micro-batch was packed
    padded, packed = train_losses(tmp_path / "padded"), train_losses(tmp_path / "packed")
    assert list(packed) == list(range(1, 7))
    assert packed == pytest.approx(padded, abs=1e-5)
    assert padded[6] != pytest.approx(padded[1], abs=1e-3)  # it trained


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("length", [3, 0])  # 0: the √position logit reads position_ids
def test_packing_keeps_an_inducer_within_each_example(attn_implementation, length, items):
    """The inducer's w sums over the keys the block-causal mask allows, so a packed example's
    loss is its loss alone."""
    from adaptlab.adapters import InducerConfig, attach_inducer

    model = model_with(attn_implementation)
    torch.manual_seed(3)
    for inducer in attach_inducer(model, InducerConfig(prefix_length=length, prefix_dim=4)):
        with torch.no_grad():
            for param in inducer.parameters():
                param.add_(torch.randn_like(param) * 0.3)
    model.eval()
    pad = tiny_tokenizer().pad_token_id
    packed = collate_packed_answer_only(items, pad, MAX_LEN)
    out = OBJECTIVES["answer_only"](model, packed)
    by_hand = torch.stack([alone(model, item) for item in items])
    torch.testing.assert_close(out.per_example, by_hand, rtol=0, atol=1e-5)
