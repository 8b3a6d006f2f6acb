"""adaptlab's IVON as a DeepSpeed ZeRO-2/3 engine's optimiser equals one process of plain IVON.

tests/zero_ivon_worker.py runs two processes (gloo, CPU) of a tiny network under the engine
with :class:`~adaptlab.training.ivon_zero.ZeroIVON`, and on every rank a plain
:class:`~adaptlab.training.ivon.IVON` over a copy that sees the whole batch: the weights, the
Hessian gathered from the partitions and a prediction draw's outputs must agree after every
step, also after a rank mask written into the weights mid-run. The fine-tuning recipe under
ZeRO (LoRA, ViLoRA, kill and resume) is tested in tests/test_finetune_distributed.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, free_port


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_ivon_over_two_processes_equals_plain_ivon(stage, tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "report.json"
    launcher = ["torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    script = ROOT / "tests" / "zero_ivon_worker.py"
    cmd = [sys.executable, "-m", *launcher, str(script), str(stage), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["weights"] < 1e-6, report  # m, including the masked row and after it
    assert report["hess"] < 1e-6, report  # h, gathered whole from the partitions
    assert report["draw"] < 1e-6, report  # a prediction draw published through the engine
    assert report["mean_after_draw"] < 1e-6, report  # and the mean restored after it
    assert report["hess_loaded"] == 0.0, report  # whole h -> partitions -> whole h
