"""Kernel files in the upstream LM-Kernel-FT format, so released kernels load unchanged.

- ``{split}_kernels_{task}.pt``: ``torch.save((kernel, targets))``; kernel ``[N, C, M, C]``
  float64, or ``[2, N, C, M, C]`` for A-SignGD (index 0 = K, 1 = flipped K'); targets ``[M]``.
- ``{split}_logits_{task}.pt``: ``torch.save((f0, targets))``; f0 ``[M, C]`` pre-trained
  logits (upstream ``--adjust_for_init``); targets ``[M]``.

N counts the training examples (kernel rows) and M the examples of ``split`` (columns). The
targets are those of ``split``, the column side, as upstream stores the labels of the inner
(evaluated) set: label ids (long), or ±1 floats in binary mode (C = 1).

Files are read with ``torch.load(..., weights_only=True)``: a file holding anything but tensors
and plain containers is refused rather than unpickled. Floating kernels and logits in another
precision (float32, bfloat16) are accepted and returned as float64, the precision the solvers
work in; the values are unchanged by the upcast.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaptlab.io import atomic_open
from adaptlab.ntk.errors import KernelError
from adaptlab.ntk.solvers import FittedSolver, SolveResult, SolverSettings, fit

SPLITS = ("train", "dev", "test")


def kernel_path(folder: str | Path, split: str, task: str) -> Path:
    """``folder/{split}_kernels_{task}.pt``: the train-``split`` kernel of ``task``."""
    return Path(folder) / f"{split}_kernels_{task}.pt"


def logits_path(folder: str | Path, split: str, task: str) -> Path:
    """``folder/{split}_logits_{task}.pt``: the f0 logits of ``task`` on ``split``."""
    return Path(folder) / f"{split}_logits_{task}.pt"


def _shape(tensor: torch.Tensor) -> str:
    return str(list(tensor.shape))


def _check_kernel(kernel: torch.Tensor, targets: torch.Tensor, where: str) -> None:
    stacked = kernel.dim() == 5 and kernel.shape[0] == 2
    if not (kernel.dim() == 4 or stacked):
        raise KernelError(
            f"{where}: the kernel has shape {_shape(kernel)}; expected [N, C, M, C] or, for "
            "A-SignGD, [2, N, C, M, C]."
        )
    if not kernel.is_floating_point():
        raise KernelError(f"{where}: the kernel has dtype {kernel.dtype}; expected float64.")
    n, c, m, c2 = kernel.shape[-4:]
    if c != c2:
        raise KernelError(
            f"{where}: the kernel {_shape(kernel)} has {c} row outputs but {c2} column outputs; "
            "both sides need the same C."
        )
    if targets.dim() != 1 or targets.shape[0] != m:
        raise KernelError(
            f"{where}: the targets have shape {_shape(targets)} but the kernel {_shape(kernel)} "
            f"has {m} columns; the file needs one target per column, shape [{m}]."
        )


def _expect(where: str, what: str, actual: int, expected: int | None, shape: str) -> None:
    if expected is not None and actual != expected:
        raise KernelError(
            f"{where}: {what} is {actual} in shape {shape} but {expected} was expected; the "
            "file belongs to another task, seed or mode: recompute it or point at the right "
            "folder."
        )


def _load_pair(path: Path, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not path.is_file():
        raise KernelError(f"{path}: no such {what} file; compute it first or fix the folder.")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise KernelError(
            f"{path}: not a {what} file of tensors (refused to unpickle other objects: "
            f"{str(err).splitlines()[0]}); recompute it."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise KernelError(f"{path}: unreadable {what} file ({err}); recompute it.") from None
    if not (
        isinstance(loaded, tuple | list)
        and len(loaded) == 2
        and all(isinstance(t, torch.Tensor) for t in loaded)
    ):
        raise KernelError(
            f"{path}: expected a ({what}, targets) pair of tensors, got {type(loaded).__name__}; "
            "recompute it."
        )
    return loaded[0], loaded[1]


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float64)


def save_kernel(path: str | Path, kernel: torch.Tensor, targets: torch.Tensor) -> None:
    """Write ``(kernel, targets)`` with ``torch.save``, atomically (temporary name, rename).

    Args:
        path: output file, normally :func:`kernel_path`.
        kernel: ``[N, C, M, C]`` float64, or ``[2, N, C, M, C]`` for A-SignGD.
        targets: ``[M]`` targets of the column side: label ids, or ±1 floats in binary mode.

    Raises:
        KernelError: a kernel or targets of the wrong shape.
    """
    _check_kernel(kernel, targets, str(path))
    with atomic_open(path, "wb") as handle:
        torch.save((kernel.detach().cpu(), targets.detach().cpu()), handle)


def load_kernel(
    path: str | Path,
    *,
    n_train: int | None = None,
    n_eval: int | None = None,
    n_outputs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a kernel file, checking its structure and, when given, its sizes.

    Args:
        path: a ``{split}_kernels_{task}.pt`` file.
        n_train: expected N (kernel rows).
        n_eval: expected M (kernel columns and targets).
        n_outputs: expected C (1 in binary mode).

    Returns:
        ``(kernel, targets)``: kernel ``[N, C, M, C]`` or ``[2, N, C, M, C]`` as float64,
        targets ``[M]`` as stored.

    Raises:
        KernelError: a missing or unreadable file, a file holding other objects than tensors,
            or shapes that do not match each other or the expected sizes.
    """
    path = Path(path)
    kernel, targets = _load_pair(path, "kernel")
    _check_kernel(kernel, targets, str(path))
    n, c, m, _ = kernel.shape[-4:]
    _expect(str(path), "N (training rows)", n, n_train, _shape(kernel))
    _expect(str(path), "M (evaluated examples)", m, n_eval, _shape(kernel))
    _expect(str(path), "C (outputs)", c, n_outputs, _shape(kernel))
    return _upcast(kernel), targets


def save_logits(path: str | Path, logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Write the f0 logits ``(logits [M, C], targets [M])`` with ``torch.save``, atomically.

    Raises:
        KernelError: logits that are not ``[M, C]`` floats or targets that are not ``[M]``.
    """
    _check_logits(logits, targets, str(path))
    with atomic_open(path, "wb") as handle:
        torch.save((logits.detach().cpu(), targets.detach().cpu()), handle)


def _check_logits(logits: torch.Tensor, targets: torch.Tensor, where: str) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise KernelError(
            f"{where}: the f0 logits have shape {_shape(logits)} and dtype {logits.dtype}; "
            "expected floats [M, C]."
        )
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise KernelError(
            f"{where}: the targets have shape {_shape(targets)} but the logits "
            f"{_shape(logits)} cover {logits.shape[0]} examples; expected [{logits.shape[0]}]."
        )


def load_logits(
    path: str | Path, *, n_examples: int | None = None, n_outputs: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read an f0 logits file.

    Args:
        path: a ``{split}_logits_{task}.pt`` file.
        n_examples: expected M.
        n_outputs: expected C.

    Returns:
        ``(logits, targets)``: logits ``[M, C]`` as float64, targets ``[M]`` as stored.

    Raises:
        KernelError: a missing or unreadable file, other objects than tensors, or bad shapes.
    """
    path = Path(path)
    logits, targets = _load_pair(path, "logits")
    _check_logits(logits, targets, str(path))
    _expect(str(path), "M (examples)", logits.shape[0], n_examples, _shape(logits))
    _expect(str(path), "C (outputs)", logits.shape[1], n_outputs, _shape(logits))
    return _upcast(logits), targets


@dataclass
class KernelSet:
    """The kernels of one task and data seed: train-train plus train-X for the other splits.

    Attributes:
        kernels: split -> ``[N, C, M, C]`` (or ``[2, N, C, M, C]``); ``"train"`` is required.
        targets: split -> ``[M]`` targets of that split.
        logits: split -> f0 logits ``[M, C]``; empty when none were saved.
    """

    kernels: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]
    logits: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        folder: str | Path,
        task: str,
        splits: Sequence[str] = SPLITS,
        *,
        logits: bool | None = None,
    ) -> KernelSet:
        """Load the kernel files of ``task`` from ``folder`` (what ``--load_kernels`` reads).

        Args:
            folder: the folder holding ``{split}_kernels_{task}.pt``.
            task: task name in the file names.
            splits: the splits to load; ``"train"`` is always loaded.
            logits: load the f0 logits files too: True requires them, False skips them,
                None loads them when all are present.

        Raises:
            KernelError: missing files or kernels that do not fit together.
        """
        splits = ["train", *(s for s in splits if s != "train")]
        kernels, targets = {}, {}
        for split in splits:
            expected_n = kernels["train"].shape[-4] if kernels else None
            expected_c = kernels["train"].shape[-3] if kernels else None
            kernels[split], targets[split] = load_kernel(
                kernel_path(folder, split, task), n_train=expected_n, n_outputs=expected_c
            )
        if len({k.dim() for k in kernels.values()}) > 1:
            raise KernelError(
                f"{folder}: some kernels of {task} are A-SignGD stacks and some are not; "
                "recompute them with one formula."
            )
        if logits is None:
            logits = all(logits_path(folder, s, task).is_file() for s in splits)
        f0 = {}
        if logits:
            for split in splits:
                f0[split], _ = load_logits(
                    logits_path(folder, split, task),
                    n_examples=targets[split].shape[0],
                    n_outputs=kernels["train"].shape[-3],
                )
        return cls(kernels, targets, f0)

    def save(self, folder: str | Path, task: str) -> None:
        """Write every kernel (and f0 logits file) in the upstream format."""
        for split, kernel in self.kernels.items():
            save_kernel(kernel_path(folder, split, task), kernel, self.targets[split])
        for split, f0 in self.logits.items():
            save_logits(logits_path(folder, split, task), f0, self.targets[split])

    @property
    def n_outputs(self) -> int:
        """C of the kernels (1 in binary mode)."""
        return int(self.kernels["train"].shape[-3])

    @property
    def stacked(self) -> bool:
        """Whether the kernels are A-SignGD stacks ``[2, N, C, M, C]``."""
        return self.kernels["train"].dim() == 5

    def fit(self, name: str, settings: SolverSettings | None = None) -> FittedSolver:
        """Fit solver ``name`` on the train-train kernel (with f0 when logits are loaded)."""
        return fit(
            name,
            self.kernels["train"],
            self.targets["train"],
            settings,
            f0_train=self.logits.get("train"),
        )

    def solve(
        self,
        name: str,
        settings: SolverSettings | None = None,
        splits: Sequence[str] = ("dev", "test"),
    ) -> dict[str, SolveResult]:
        """Fit once on train-train, then predict each split in ``splits``."""
        missing = [s for s in splits if s not in self.kernels]
        if missing:
            raise KernelError(
                f"No kernels for split(s) {missing}; load them (have {sorted(self.kernels)})."
            )
        fitted = self.fit(name, settings)
        return {
            split: fitted.predict(
                self.kernels[split], self.targets[split], f0_eval=self.logits.get(split)
            )
            for split in splits
        }
