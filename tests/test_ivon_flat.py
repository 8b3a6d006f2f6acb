"""IVON's flat state buffers: the same numbers as the per-parameter path, bit for bit, and
per-parameter state that stays views of one buffer per key through loads and outside writes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adaptlab.training.ivon import IVON
from adaptlab.training.ivon_flat import CHUNK

SHAPES = [(4, 3), (CHUNK // 100 + 7, 100), (5,), (2, 4)]
"""Mixed shapes; the second spans two chunks of the flat update."""


def build(foreach: bool, hess_approx: str = "price") -> tuple[list[nn.Parameter], IVON]:
    """Two groups with their own settings (one clipping); the second holds a bf16 weight and a
    weight that gets no gradient."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(*shape)) for shape in SHAPES]
    params += [nn.Parameter(torch.randn(3, 2).bfloat16()), nn.Parameter(torch.randn(6))]
    groups = [
        {"params": params[:3]},
        {"params": params[3:], "lr": 0.05, "weight_decay": 0.1, "clip_radius": 0.02},
    ]
    optimizer = IVON(groups, lr=0.3, ess=20.0, hess_init=0.5, beta2=0.99, mc_samples=2,
                     hess_approx=hess_approx, seed=4, foreach=foreach)  # fmt: skip
    return params, optimizer


def micro_batch_loss(params: list[nn.Parameter], batch: int) -> torch.Tensor:
    """A loss whose gradient depends on the micro-batch and, nonlinearly, on the weights."""
    return sum(
        ((batch + 1) * p.float() ** 2).sum() + p.float().sin().sum() ** 3 / p.numel()
        for p in params[:-1]
    )


def train(params: list[nn.Parameter], optimizer: IVON, steps: int) -> None:
    """Steps of two micro-batches with two draws each (four samples); between steps the
    first entries of the bf16 and an fp32 weight are masked from outside, as AdaLoRA does."""
    for _ in range(steps):
        for batch in range(2):
            for _ in range(optimizer.mc_samples):
                with optimizer.sampled_params(train=True):
                    micro_batch_loss(params, batch).backward()
        optimizer.step()
        with torch.no_grad():
            params[4][0].zero_()
            params[0][1].zero_()


def assert_identical(mine: list[nn.Parameter], fast: IVON, theirs: list[nn.Parameter],
                     slow: IVON) -> None:  # fmt: skip
    for p, q in zip(mine, theirs, strict=True):
        assert p.dtype == q.dtype and torch.equal(p, q)
        assert set(fast.state[p]) == set(slow.state[q])
        for key, value in fast.state[p].items():
            other = slow.state[q][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other


def shares_one_buffer(tensors: list[torch.Tensor]) -> bool:
    """Whether ``tensors`` are consecutive views of one contiguous 1-D buffer."""
    base = tensors[0]._base
    offsets = [t.storage_offset() for t in tensors]
    expected = [sum(t.numel() for t in tensors[:i]) for i in range(len(tensors))]
    return (
        base is not None
        and base.dim() == 1
        and base.numel() == sum(t.numel() for t in tensors)
        and all(t._base is base and t.is_contiguous() for t in tensors)
        and offsets == [base.storage_offset() + e for e in expected]
    )


@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
def test_flat_path_equals_the_per_parameter_path_bit_for_bit(hess_approx):
    """Four steps of gradient accumulation (two micro-batches of two draws), two groups, mixed
    shapes, a bf16 weight, a weight without gradient, outside masking, prediction draws."""
    (mine, fast), (theirs, slow) = build(True, hess_approx), build(False, hess_approx)
    assert [b.foreach for b in fast._buckets()] == [True, True, True]  # fp32, fp32, bf16
    for params, optimizer in ((mine, fast), (theirs, slow)):
        train(params, optimizer, 4)
    assert_identical(mine, fast, theirs, slow)
    for params, optimizer in ((mine, fast), (theirs, slow)):  # mid-step: the sums too
        with optimizer.sampled_params(train=True):
            micro_batch_loss(params, 0).backward()
    assert_identical(mine, fast, theirs, slow)
    predictions = []
    for params, optimizer in ((mine, fast), (theirs, slow)):
        with optimizer.sampled_params(train=False, draw=3):
            predictions.append(torch.cat([p.detach().float().flatten() for p in params]))
    assert torch.equal(*predictions)
    start = build(True)[0]
    moved = [(p - q).detach().abs().max() for p, q in zip(mine[:-1], start[:-1], strict=True)]
    assert min(moved) > 1e-4


def test_state_is_per_parameter_views_of_one_buffer_per_key_and_bucket():
    params, optimizer = build(True)
    train(params, optimizer, 1)
    with optimizer.sampled_params(train=True):
        micro_batch_loss(params, 0).backward()
    buckets = [params[:3], params[3:4] + params[5:], params[4:5]]  # by group, device, dtype
    for bucket in buckets:
        for key in ("hess", "momentum", "grad_sum", "nxg_sum"):
            views = [optimizer.state[p][key] for p in bucket]
            assert [v.shape for v in views] == [p.shape for p in bucket]
            assert all(v.dtype == torch.float32 for v in views)
            assert shares_one_buffer(views), (key, [p.shape for p in bucket])
    assert optimizer.state[params[4]]["master"]._base is not None  # the bf16 bucket's master
    optimizer.step()
    assert all(set(optimizer.state[p]) <= {"hess", "momentum", "master"} for p in params)


def test_loaded_state_goes_back_into_flat_buffers_and_resumes_exactly():
    params, optimizer = build(True)
    train(params, optimizer, 2)
    saved = copy.deepcopy(optimizer.state_dict())
    copies = [nn.Parameter(p.detach().clone()) for p in params]
    _, resumed = build(True)
    resumed.param_groups[0]["params"] = copies[:3]
    resumed.param_groups[1]["params"] = copies[3:]
    resumed.load_state_dict(saved)
    assert not shares_one_buffer([resumed.state[p]["hess"] for p in copies[:3]])  # copies
    train(params, optimizer, 2)
    train(copies, resumed, 2)
    assert_identical(params, optimizer, copies, resumed)
    assert shares_one_buffer([resumed.state[p]["hess"] for p in copies[:3]])


def test_state_replaced_from_outside_is_used_and_re_flattened():
    """A Hessian set by assignment (a loaded Hessian file, a test) counts from the next step."""
    (mine, fast), (theirs, slow) = build(True), build(False)
    for params, optimizer in ((mine, fast), (theirs, slow)):
        train(params, optimizer, 1)
        optimizer.state[params[1]]["hess"] = torch.full(params[1].shape, 3.0)
        optimizer.state[params[0]]["momentum"].fill_(0.25)  # in place: a view of the buffer
        train(params, optimizer, 2)
    assert_identical(mine, fast, theirs, slow)
    assert shares_one_buffer([fast.state[p]["hess"] for p in mine[:3]])


def test_an_outside_record_of_single_tensors_then_step_equals_the_per_parameter_path():
    """A caller (a ZeRO partition, say) records plain fp32 tensors one at a time with
    ``_record([p], [noise], False)`` before ``step()``, one of them twice."""
    results = []
    for foreach in (True, False):
        torch.manual_seed(0)
        tensors = [torch.randn(7, requires_grad=True), torch.randn(2, 3, requires_grad=True)]
        optimizer = IVON(tensors, lr=0.2, ess=10.0, hess_init=0.5, foreach=foreach)
        for step in range(3):
            for index, tensor in enumerate(tensors):
                optimizer._param_state(tensor, optimizer.param_groups[0])
                for sample in range(index + 1):
                    tensor.grad = torch.full_like(tensor, 0.1 * (step + sample + 1)) + tensor
                    noise = torch.full_like(tensor, 0.01 * (sample + 1))
                    optimizer._record([tensor], [noise], False)
            optimizer.step()
        results.append([(t.detach().clone(), optimizer.state[t]["hess"].clone()) for t in tensors])
    for (p, h), (q, k) in zip(*results, strict=True):
        assert torch.equal(p, q) and torch.equal(h, k)
