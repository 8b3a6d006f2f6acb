"""ZeroIVON inside a DeepSpeed engine against a plain one-process IVON, launched by
tests/test_ivon_zero.py:

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/zero_ivon_worker.py STAGE OUT.json

Every rank builds the same tiny two-layer network (parameter sizes that split unevenly over two
ranks, so ZeRO-2 pads its last partition and ZeRO-3 its chunks) and a plain IVON over a copy of
it that sees the whole batch in one process. Five steps of each run at one posterior draw per
step; the engine gets half of the batch on each rank. After step 2 a "rank mask" zeroes a row
of the first weight in both models (the ZeRO model's weights written as AdaLoRA writes them,
then ``pull_weight_changes``). Under ZeRO-3 every parameter persists (stays gathered between
steps), the case where a stale gathered copy would hide the published draw. At the end a whole
h is scattered into the partitions and gathered back (``ivon_hessian_from``). Rank 0 writes the
largest differences to OUT.json.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from adaptlab.training.ivon import IVON
from adaptlab.training.ivon_zero import ZeroIVON

SETTINGS = dict(lr=0.3, ess=50.0, hess_init=0.5, weight_decay=1e-3, beta2=0.9, seed=3)
STEPS, MASK_AFTER = 5, 2


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def whole(engine: nn.Module, stage: int) -> list[torch.Tensor]:
    """The engine's current weights, whole (ZeRO-3: gathered)."""
    params = list(engine.module.parameters())
    if stage != 3:
        return [p.detach().clone() for p in params]
    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().clone() for p in params]


def main(stage: int, out: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 5, generator=generator), torch.randn(4, 3, generator=generator)
    reference = network()
    ref_opt = IVON(reference.parameters(), **SETTINGS)
    model = copy.deepcopy(reference)
    optimizer = ZeroIVON(model.parameters(), **SETTINGS)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # IVON reads the gradient as it is (DeepSpeed clips at 1.0)
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 10**6},
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    optimizer.attach(engine)
    report = dict.fromkeys(["weights", "hess", "draw", "mean_after_draw", "hess_loaded"], 0.0)

    def diff(key: str, got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
        for g, e in zip(got, expected, strict=True):
            report[key] = max(report[key], float((g - e).abs().max()))

    for step in range(1, STEPS + 1):
        with ref_opt.sampled_params(train=True):
            loss_fn(reference, x, y).backward()
        ref_opt.step()
        with optimizer.sampled_params(train=True):
            engine.backward(loss_fn(engine, x[2 * rank : 2 * rank + 2], y[2 * rank : 2 * rank + 2]))
            engine.step()
        if step == MASK_AFTER:  # a rank mask written into the weights from outside
            with torch.no_grad():
                reference[0].weight[1].zero_()
                first = engine.module[0].weight
                if stage == 3:
                    with deepspeed.zero.GatheredParameters([first], modifier_rank=0):
                        first[1].zero_()
                else:
                    first[1].zero_()
            optimizer.pull_weight_changes()
        diff("weights", whole(engine, stage), [p.detach() for p in reference.parameters()])
        hessians = [h for _, h in optimizer.whole_hessians()]
        diff("hess", hessians, [ref_opt.state[p]["hess"] for p in reference.parameters()])
    with torch.no_grad():
        with ref_opt.sampled_params(train=False, draw=1):
            expected = reference(x)
        with optimizer.sampled_params(train=False, draw=1):
            got = engine(x)
        diff("draw", [got], [expected])
        diff("mean_after_draw", [engine(x)], [reference(x)])
    # ivon_hessian_from: whole tensors scattered into the partitions and gathered back
    doubled = {p: 2 * h for p, h in optimizer.whole_hessians()}
    optimizer.load_whole_hessians(doubled)
    diff("hess_loaded", [h for _, h in optimizer.whole_hessians()], list(doubled.values()))
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(report, handle)
    dist.barrier()  # no rank tears gloo down while another still talks
    dist.destroy_process_group()
    # DeepSpeed's CPU engine can leave a native thread joinable at interpreter exit, which
    # aborts the process now and then ("terminate called without an active exception")
    # after all the work is done: end without the interpreter's teardown.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
