"""slurm/: every script parses, finds python the documented way, and launches the right command.

No SLURM is needed: the scripts run under bash with ``srun`` and ``scontrol`` stand-ins on PATH,
from a spool copy as sbatch runs them, against a fake project whose pythons record their calls.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

SCRIPTS = sorted(p.name for p in (ROOT / "slurm").iterdir())


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_parses(name):
    result = subprocess.run(["bash", "-n", str(ROOT / "slurm" / name)], capture_output=True)
    assert result.returncode == 0, result.stderr.decode()


def fake_python(path: Path, has_adaptlab: bool = True) -> Path:
    """An executable ``path`` that answers env.sh's "is adaptlab installed" probe (any ``-c``
    call) as told, and otherwise appends its own path and arguments to $CALLS."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "-c" ]; then exit {0 if has_adaptlab else 1}; fi\n'
        'echo "$0 $*" >> "$CALLS"\n'
    )
    path.chmod(0o755)
    return path


@pytest.fixture
def tree(tmp_path) -> Path:
    """A project folder holding slurm/env.sh and .venv, plus a venv, a conda env, a custom
    python and a conda env without adaptlab beside it."""
    project = tmp_path / "project"
    (project / "slurm").mkdir(parents=True)
    shutil.copy(ROOT / "slurm" / "env.sh", project / "slurm" / "env.sh")
    fake_python(project / ".venv" / "bin" / "python")
    fake_python(tmp_path / "venv" / "bin" / "python")
    fake_python(tmp_path / "conda" / "bin" / "python")
    fake_python(tmp_path / "custom" / "python")
    fake_python(tmp_path / "bare" / "bin" / "python", has_adaptlab=False)
    return tmp_path


def clean_env(tmp_path: Path, **variables: str) -> dict[str, str]:
    """A job environment with only ``variables`` set (none inherited from the test runner)."""
    return {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **variables}


def discover(tree: Path, **variables: str) -> subprocess.CompletedProcess:
    """Source the project's env.sh as the submit scripts do; print PYTHON and PATH's python."""
    script = 'source slurm/env.sh; echo "$PYTHON"; command -v python'
    env = clean_env(tree, **{k: str(v) for k, v in variables.items()})
    return subprocess.run(
        ["bash", "-c", script], cwd=tree / "project", env=env, capture_output=True, text=True
    )


# case: (variables relative to the tree, which python is found)
CASES = {
    "ADAPTLAB_PYTHON first": (
        {"ADAPTLAB_PYTHON": "custom/python", "VIRTUAL_ENV": "venv", "CONDA_PREFIX": "conda"},
        "custom/python",
    ),
    "activated venv": ({"VIRTUAL_ENV": "venv", "CONDA_PREFIX": "conda"}, "venv/bin/python"),
    "activated conda env": ({"CONDA_PREFIX": "conda"}, "conda/bin/python"),
    "in-project .venv": ({}, "project/.venv/bin/python"),
    "conda env without adaptlab": ({"CONDA_PREFIX": "bare"}, "project/.venv/bin/python"),
}


@pytest.mark.parametrize("case", CASES)
def test_python_is_found_in_the_documented_order(tree, case):
    variables, expected = CASES[case]
    result = discover(tree, **{k: tree / v for k, v in variables.items()})
    assert result.returncode == 0, result.stderr
    python, on_path = result.stdout.splitlines()[-2:]
    assert python == str(tree / expected)
    assert on_path == python  # its folder comes first on PATH, as activating the env would do
    if case == "conda env without adaptlab":
        passed = f"passed over: {tree / 'bare/bin/python'} (CONDA_PREFIX: no adaptlab)"
        assert result.stdout.startswith(f"adaptlab: using {python} (.venv); {passed}\n")


def test_no_environment_is_one_clear_line(tree):
    shutil.rmtree(tree / "project" / ".venv")
    result = discover(tree, CONDA_PREFIX=tree / "bare")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no python environment with adaptlab")
    assert "ADAPTLAB_PYTHON=" in lines[0] and str(tree / "bare/bin/python") in lines[0]


def test_adaptlab_python_that_does_not_exist_is_refused(tree):
    result = discover(tree, ADAPTLAB_PYTHON=tree / "missing" / "python", VIRTUAL_ENV=tree / "venv")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: ADAPTLAB_PYTHON={tree / 'missing/python'} is not an executable file; point it "
        "at the python of the environment that holds adaptlab."
    )


# script: (its arguments, the command the job's python runs)
LAUNCHES = {
    "submit_analysis": (["--runs", "[r]"], "scripts/analyze_repr.py --runs [r]"),
    "submit_extract": (
        ["--model", "m", "--num_shots", "5"],
        "-m accelerate.commands.launch --config_file accelerate_configs/single_gpu.yaml "
        "--num_processes 1 --main_process_port 29542 scripts/extract_repr.py --model m "
        "--num_shots 5",
    ),
    "submit_kernel": (
        ["--config", "c.yaml"],
        "-m accelerate.commands.launch --config_file accelerate_configs/single_gpu.yaml "
        "--num_processes 1 --main_process_port 29542 scripts/compute_kernel.py --config c.yaml",
    ),
    "submit_graft": (
        ["--finetuned", "runs/ft"],
        "-m accelerate.commands.launch --config_file accelerate_configs/single_gpu.yaml "
        "--num_processes 1 --main_process_port 29542 scripts/graft.py --finetuned runs/ft",
    ),
    "submit_finetune": (
        ["--config", "c.yaml", "--lr", "1e-4"],
        "-m accelerate.commands.launch --config_file accelerate_configs/single_gpu.yaml "
        "--num_machines 1 --num_processes 1 --machine_rank 0 --main_process_ip node7 "
        "--main_process_port 29542 scripts/finetune.py --config c.yaml --lr 1e-4",
    ),
}


@pytest.fixture
def fake_slurm(tree) -> Path:
    """A folder with ``srun`` (runs its command here) and ``scontrol`` (two node names)."""
    bin_dir = tree / "fake_slurm"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nexec "$@"\n')
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho node7\necho node8\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def submit(tree: Path, fake_slurm: Path, name: str, args: list[str], **variables: str):
    """Run slurm/``name`` as sbatch does: a copy in a spool folder, from the submit folder."""
    spool = tree / "spool"
    spool.mkdir(exist_ok=True)
    shutil.copy(ROOT / "slurm" / name, spool / name)
    env = clean_env(
        tree,
        PATH=f"{fake_slurm}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_ID="4042",
        SLURM_NODEID="0",
        CALLS=str(tree / "calls.txt"),
        **variables,
    )
    return subprocess.run(
        ["bash", str(spool / name), *args], env=env, capture_output=True, text=True
    )


@pytest.mark.parametrize("name", LAUNCHES)
def test_submit_scripts_launch_with_the_found_python(tree, fake_slurm, name):
    args, command = LAUNCHES[name]
    venv = str(tree / "venv")
    result = submit(
        tree, fake_slurm, name, args, SLURM_SUBMIT_DIR=str(tree / "project"), VIRTUAL_ENV=venv
    )
    assert result.returncode == 0, result.stderr
    calls = (tree / "calls.txt").read_text().splitlines()
    assert calls == [f"{tree / 'venv/bin/python'} {command}"]


def test_submitting_outside_the_project_needs_adaptlab_root(tree, fake_slurm):
    elsewhere = tree / "elsewhere"
    elsewhere.mkdir()
    result = submit(tree, fake_slurm, "submit_analysis", [], SLURM_SUBMIT_DIR=str(elsewhere))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {elsewhere} is not the adaptlab folder; submit from there or set ADAPTLAB_ROOT."
    )
    assert not (tree / "calls.txt").exists()
    result = submit(
        tree,
        fake_slurm,
        "submit_analysis",
        ["--runs", "[r]"],
        SLURM_SUBMIT_DIR=str(elsewhere),
        ADAPTLAB_ROOT=str(tree / "project"),
    )
    assert result.returncode == 0, result.stderr
    calls = (tree / "calls.txt").read_text().splitlines()
    assert calls == [f"{tree / 'project/.venv/bin/python'} scripts/analyze_repr.py --runs [r]"]
