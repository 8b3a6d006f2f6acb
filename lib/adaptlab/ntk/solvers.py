"""Kernel solvers: turn eNTK kernels into predictions, as upstream LM-Kernel-FT does.

A solver is fitted on the train-train kernel and predicts from the train-X kernel (X = dev or
test). Kernels use the upstream layout: ``[N, C, M, C]`` with N training rows and M columns of
the evaluated set, or ``[2, N, C, M, C]`` for A-SignGD (index 0 = K, index 1 = the flipped K').

Every solver sees one scalar regression problem over (example, logit) rows: the kernel is
reshaped row-major to ``[N·C, M·C]``, label ids become flattened one-hot vectors (row order
``(i, c)``) and f0 logits ``[N, C]`` become ``[N·C]``; the ``[M·C]`` predictions are reshaped
back to ``[M, C]``. There is no per-class block-diagonal shortcut. In binary mode (C = 1) the
targets are ±1 floats and the single logit p becomes the two logits ``[-p, p]``.

| solver | fit | prediction | f0 |
|---|---|---|---|
| ``lstsq`` | ``torch.linalg.lstsq(K_reg, Y - f0/s)`` | ``K_Xᵀ α + f0/s`` | used |
| ``logistic`` | ``LogisticRegressionCV`` on kernel rows | ``log p₁ - log p₀`` | ignored |
| ``svr`` | ``SVR(kernel="precomputed")`` on ``Y - f0/s`` | ``SVR.predict + f0/s`` | used |
| ``svc`` | ``SVC(kernel="precomputed")``, binary only | ``±1`` | rejected |
| ``asym`` | LS-SVM for A-SignGD, binary only | ``λω + (1-λ)ν + f0/s`` | used |

``K_reg = K + r·σ_max(K)·I`` with σ_max the largest singular value of the train-train kernel.
With stacked A-SignGD kernels the solvers other than ``asym`` use K alone, as upstream does.

Differences from upstream (``src/kernel_solvers.py``): all arithmetic is float64 (upstream
builds the ``asym`` matrix H in float32); ``kernel_lambda`` is declared (upstream reads it
without declaring it); the SVR debug print is gone; ``svc`` and ``asym`` refuse multi-class
kernels instead of silently classifying one-hot rows.

Quick start::

    >>> import torch
    >>> phi = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    >>> kernel = (phi @ phi.T).reshape(3, 1, 3, 1)  # binary mode: C = 1
    >>> targets = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    >>> result = solve("lstsq", kernel, targets, kernel, targets)
    >>> result.predictions, result.accuracy
    (tensor([1, 0, 1]), 1.0)
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegressionCV
from sklearn.svm import SVC, SVR

from adaptlab.ntk.errors import KernelError
from adaptlab.training.fewshot import logistic_regression_cv

SolverName = Literal["lstsq", "logistic", "svr", "svc", "asym"]
F0Use = Literal["used", "ignored", "rejected"]


@dataclass(frozen=True)
class SolverSettings:
    """Hyper-parameters of one kernel solve; upstream flag names in brackets."""

    solver: SolverName | None = None
    """Solver of a sweep point (``--kernel_solver``). ``None`` lets :func:`solve` decide; a set
    value must agree with the name :func:`solve` is given."""
    regularization: float = 0.0
    """r in ``K + r·σ_max(K)·I``, relative to the largest singular value of the train-train
    kernel (``--kernel_regularization``, default 0)."""
    f0_scaling: float = 0.0
    """s: fit on ``Y - f0/s`` and add ``f0/s`` back (``--f0_scaling``). Active only when s > 0
    and f0 logits are given; 0 (the default) turns the adjustment off. Upstream's default is 1
    but it passes f0 only with ``--adjust_for_init``; here passing f0 plays that role and
    s > 0 must be chosen explicitly. ``inf`` is accepted and equals off (f0/∞ = 0)."""
    gamma: float = 1.0
    """γ of the ``asym`` LS-SVM (``--kernel_gamma``, default 1)."""
    lam: float = 1.0
    """λ of the ``asym`` prediction ``λω + (1-λ)ν`` (upstream ``kernel_lambda``, undeclared
    there); 1 uses ω alone."""
    svr_c: float = 1.0
    """C of the ``svr`` solver (scikit-learn default, as upstream)."""
    svr_epsilon: float = 0.1
    """ε of the ``svr`` solver (scikit-learn default, as upstream)."""

    def __post_init__(self) -> None:
        if self.solver is not None and self.solver not in SOLVERS:
            raise KernelError(
                f"Unknown kernel solver {self.solver!r}; choose one of {sorted(SOLVERS)}."
            )
        for name in ("regularization", "gamma", "lam", "svr_c", "svr_epsilon"):
            if not math.isfinite(getattr(self, name)):
                raise KernelError(f"Solver setting {name} must be a finite number.")
        if self.regularization < 0:
            raise KernelError("regularization must be >= 0 (0 turns it off).")
        if not self.f0_scaling >= 0:
            raise KernelError("f0_scaling must be >= 0 (0 turns the f0 adjustment off).")
        if self.gamma <= 0:
            raise KernelError("gamma of the asym solver must be > 0.")
        if self.svr_c <= 0 or self.svr_epsilon < 0:
            raise KernelError("svr_c must be > 0 and svr_epsilon >= 0.")


@dataclass
class SolveResult:
    """Predictions of one solve on the evaluated set (M examples).

    Attributes:
        logits: ``[M, C]`` float64 predicted logits; ``[M, 2]`` as ``[-p, p]`` in binary mode.
        predictions: ``[M]`` long, argmax of ``logits`` (ties: the first class).
        labels: ``[M]`` long label ids of the evaluated set (binary: ±1 mapped to {0, 1}).
        loss: the solver loss: mean squared error over the ``M·C`` rows (``lstsq``, ``svr``,
            ``svc``, ``asym``) or cross-entropy of the predicted log-probabilities
            (``logistic``), as upstream logs ``eval_loss``.
        accuracy: fraction of ``predictions`` equal to ``labels``.
        metrics: solver extras, e.g. ``rank`` of the least-squares system.
    """

    logits: torch.Tensor
    predictions: torch.Tensor
    labels: torch.Tensor
    loss: float
    accuracy: float
    metrics: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """The scalar results as a JSON-ready dict: ``accuracy``, ``loss`` and the extras."""
        return {"accuracy": self.accuracy, "loss": self.loss, **self.metrics}


@dataclass(frozen=True)
class _Rows:
    """One side of the flattened problem: training rows against X columns."""

    kernel: torch.Tensor  # [N·C, X·C] float64 (K)
    flipped: torch.Tensor | None  # [N·C, X·C] float64 (K' of A-SignGD) or None
    targets: torch.Tensor  # [X·C] float64: flattened one-hot, or ±1 in binary mode
    shift: torch.Tensor | None  # [X·C] f0/s, None when the adjustment is off


class _Solver(abc.ABC):
    """What every solver has: its settings, how it uses f0, what kernels it needs, and the
    metrics of its last fit. Subclasses implement ``fit`` and ``predict``."""

    f0: F0Use = "used"
    needs_binary = False
    needs_flipped = False

    def __init__(self, settings: SolverSettings) -> None:
        self.settings = settings
        self.metrics: dict[str, float] = {}

    @abc.abstractmethod
    def fit(self, train: _Rows) -> None:
        """Fit on the training rows (train-train kernel and targets)."""

    @abc.abstractmethod
    def predict(self, rows: _Rows) -> tuple[torch.Tensor, float]:
        """``([X·C] scores, loss)`` for the columns of ``rows``."""


def _regularized(kernel: torch.Tensor, r: float) -> torch.Tensor:
    """``K + r·σ_max(K)·I`` for a square train-train kernel ``[N·C, N·C]``."""
    if not r:
        return kernel
    sigma_max = torch.linalg.svdvals(kernel).max()
    return kernel + r * sigma_max * torch.eye(kernel.shape[0], dtype=kernel.dtype)


def _fit_targets(rows: _Rows) -> torch.Tensor:
    return rows.targets if rows.shift is None else rows.targets - rows.shift


def _add_shift(preds: torch.Tensor, rows: _Rows) -> torch.Tensor:
    return preds if rows.shift is None else preds + rows.shift


def _squared_error(preds: torch.Tensor, targets: torch.Tensor) -> float:
    return ((preds - targets) ** 2).sum().item() / targets.numel()


def _to_01(targets: torch.Tensor) -> torch.Tensor:
    """⌊(t+1)/2⌋: ±1 targets to {0, 1}, flattened one-hot {0, 1} unchanged."""
    return torch.floor((targets + 1) / 2).long()


class LstsqSolver(_Solver):
    """Kernel regression: ``α = lstsq(K_reg, Y - f0/s)``, prediction ``K_Xᵀ α + f0/s``."""

    def fit(self, train: _Rows) -> None:
        kernel = _regularized(train.kernel, self.settings.regularization)
        # The CPU default driver (gelsy) is what upstream uses; it also reports the rank.
        result = torch.linalg.lstsq(kernel, _fit_targets(train).unsqueeze(1))
        self.alpha = result.solution.squeeze(1)
        self.metrics = {"rank": int(result.rank)}

    def predict(self, rows: _Rows) -> tuple[torch.Tensor, float]:
        preds = _add_shift(rows.kernel.T @ self.alpha, rows)
        return preds, _squared_error(preds, rows.targets)


def _logistic_cv(labels: torch.Tensor) -> LogisticRegressionCV:
    """Upstream's ``LogisticRegressionCV(max_iter=10000, random_state=0)``, defaults pinned
    (:func:`adaptlab.training.fewshot.logistic_regression_cv`).

    With fewer than 5 training rows of some label (k < 5 shots) upstream's call fails; here the
    folds drop to that count (at least 2).
    """
    smallest = int(torch.bincount(labels.flatten().long()).min()) if labels.numel() else 0
    if smallest < 2:
        raise KernelError(
            "The logistic solver cross-validates and needs at least 2 training rows of each "
            "label; use more shots or another solver (lstsq)."
        )
    return logistic_regression_cv(folds=min(5, smallest), max_iter=10000)


class LogisticSolver(_Solver):
    """Logistic regression on kernel rows as features, labels ⌊(t+1)/2⌋; f0 is ignored."""

    f0: F0Use = "ignored"

    def fit(self, train: _Rows) -> None:
        features = _regularized(train.kernel, self.settings.regularization)
        labels = _to_01(train.targets)
        self.model = _logistic_cv(labels).fit(features.numpy(), labels.numpy())

    def predict(self, rows: _Rows) -> tuple[torch.Tensor, float]:
        log_proba = torch.from_numpy(self.model.predict_log_proba(rows.kernel.T.numpy()))
        loss = F.cross_entropy(log_proba, _to_01(rows.targets)).item()
        return log_proba[:, 1] - log_proba[:, 0], loss


class SVRSolver(_Solver):
    """Support-vector regression on the precomputed kernel, fitted on ``Y - f0/s``."""

    def fit(self, train: _Rows) -> None:
        kernel = _regularized(train.kernel, self.settings.regularization)
        self.model = SVR(
            kernel="precomputed", C=self.settings.svr_c, epsilon=self.settings.svr_epsilon
        )
        self.model.fit(kernel.numpy(), _fit_targets(train).numpy())

    def predict(self, rows: _Rows) -> tuple[torch.Tensor, float]:
        preds = _add_shift(torch.from_numpy(self.model.predict(rows.kernel.T.numpy())), rows)
        return preds, _squared_error(preds, rows.targets)


class SVCSolver(_Solver):
    """Support-vector classification (binary mode), predictions ±1; f0 is refused."""

    f0: F0Use = "rejected"
    needs_binary = True

    def fit(self, train: _Rows) -> None:
        kernel = _regularized(train.kernel, self.settings.regularization)
        self.model = SVC(kernel="precomputed").fit(kernel.numpy(), _to_01(train.targets).numpy())

    def predict(self, rows: _Rows) -> tuple[torch.Tensor, float]:
        labels = torch.from_numpy(self.model.predict(rows.kernel.T.numpy()))
        preds = (2 * labels - 1).to(torch.float64)
        return preds, _squared_error(preds, rows.targets)


class AsymSolver(_Solver):
    """LS-SVM for the asymmetric A-SignGD kernel (binary mode, no bias).

    With ``Y = targets - f0/s`` and ``H_ij = Y_i K_ij Y_j`` (K regularised), solve
    ``[[I/γ, H], [Hᵀ, I/γ]] [α; β] = 1`` by least squares; predict
    ``λ ω(x) + (1-λ) ν(x) + f0/s`` with ``ω(x) = Σ_i α_i Y_i K(train_i, x)`` and
    ``ν(x) = Σ_i β_i Y_i K'(train_i, x)``.
    """

    needs_binary = True
    needs_flipped = True

    def fit(self, train: _Rows) -> None:
        kernel = _regularized(train.kernel, self.settings.regularization)
        y = _fit_targets(train)
        n = y.numel()
        h = y[:, None] * kernel * y[None, :]
        diagonal = torch.eye(n, dtype=kernel.dtype) / self.settings.gamma
        system = torch.cat([torch.cat([diagonal, h], 1), torch.cat([h.T, diagonal], 1)], 0)
        result = torch.linalg.lstsq(system, torch.ones(2 * n, 1, dtype=kernel.dtype))
        solution = result.solution.squeeze(1)
        self.alpha_y, self.beta_y = solution[:n] * y, solution[n:] * y
        self.metrics = {"rank": int(result.rank)}

    def predict(self, rows: _Rows) -> tuple[torch.Tensor, float]:
        lam = self.settings.lam
        omega = rows.kernel.T @ self.alpha_y
        nu = rows.flipped.T @ self.beta_y
        preds = _add_shift(lam * omega + (1 - lam) * nu, rows)
        return preds, _squared_error(preds, rows.targets)


SOLVERS: dict[str, type[_Solver]] = {
    "lstsq": LstsqSolver,
    "logistic": LogisticSolver,
    "svr": SVRSolver,
    "svc": SVCSolver,
    "asym": AsymSolver,
}


def flatten_kernel(kernel: torch.Tensor) -> torch.Tensor:
    """Reshape ``[N, C, M, C]`` row-major to ``[N·C, M·C]`` (row ``i·C + c``), float64 on CPU."""
    n, c, m, c2 = kernel.shape
    return kernel.reshape(n * c, m * c2).to("cpu", torch.float64)


def flatten_targets(targets: torch.Tensor, n_outputs: int) -> torch.Tensor:
    """Targets ``[N]`` to regression targets ``[N·C]`` float64 (row ``i·C + c``).

    Multi-class (C > 1): label ids become flattened one-hot vectors. Binary (C = 1): the ±1
    targets are kept.
    """
    if n_outputs == 1:
        return targets.to("cpu", torch.float64)
    return F.one_hot(targets.long().cpu(), n_outputs).reshape(-1).to(torch.float64)


def check_request(
    name: str,
    settings: SolverSettings,
    *,
    n_outputs: int,
    stacked: bool,
    with_f0: bool,
) -> None:
    """Check that solver ``name`` can run on this kind of kernel, before any work.

    Args:
        name: solver name, a key of :data:`SOLVERS`.
        settings: the hyper-parameters to use.
        n_outputs: C of the kernels (1 in binary mode).
        stacked: whether the kernels are A-SignGD stacks ``[2, N, C, M, C]``.
        with_f0: whether f0 logits are given.

    Raises:
        KernelError: an unknown solver, a solver that does not fit the kernels, or f0
            settings the solver cannot honour.
    """
    if name not in SOLVERS:
        raise KernelError(f"Unknown kernel solver {name!r}; choose one of {sorted(SOLVERS)}.")
    if settings.solver is not None and settings.solver != name:
        raise KernelError(
            f"The settings are for solver {settings.solver!r} but solver {name!r} was asked "
            "for; drop `solver` from the settings or make the two agree."
        )
    solver = SOLVERS[name]
    if solver.needs_flipped and not (stacked and n_outputs == 1):
        raise KernelError(
            f"Solver {name!r} needs binary A-SignGD kernels [2, N, 1, M, 1]; compute them with "
            "`--formula asymmetric_signgd --binary true`."
        )
    if solver.needs_binary and n_outputs != 1:
        raise KernelError(
            f"Solver {name!r} works in binary mode only (C = 1, got C = {n_outputs}); compute "
            "the kernels with `--binary true` or pick another solver."
        )
    active_f0 = with_f0 and settings.f0_scaling > 0
    if solver.f0 == "rejected" and active_f0:
        raise KernelError(
            f"Solver {name!r} cannot adjust for f0; set f0_scaling to 0 or pick another solver."
        )
    if solver.f0 == "used" and settings.f0_scaling > 0 and not with_f0:
        raise KernelError(
            f"f0_scaling = {settings.f0_scaling} needs the f0 logits of train and eval sets; "
            "pass them (save them with the kernels) or set f0_scaling to 0."
        )


def _shape(tensor: torch.Tensor | None) -> str:
    return "None" if tensor is None else str(list(tensor.shape))


def _split_stack(kernel: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[N, C, M, C]`` -> (K, None); ``[2, N, C, M, C]`` -> (K, K')."""
    if kernel.dim() == 5 and kernel.shape[0] == 2:
        return kernel[0], kernel[1]
    if kernel.dim() == 4:
        return kernel, None
    raise KernelError(
        f"The {what} kernel has shape {_shape(kernel)}; expected [N, C, M, C] or, for A-SignGD, "
        "[2, N, C, M, C]."
    )


def _check_targets(targets: torch.Tensor, n_examples: int, n_outputs: int, what: str) -> None:
    if targets.dim() != 1 or targets.shape[0] != n_examples:
        raise KernelError(
            f"The {what} targets have shape {_shape(targets)} but the kernel has "
            f"{n_examples} {what} examples; pass one target per example, shape [{n_examples}]."
        )
    if n_outputs == 1:
        if not bool(((targets == 1) | (targets == -1)).all()):
            raise KernelError(
                f"The {what} targets of a binary kernel (C = 1) must be -1 or +1 floats; "
                "map labels {0, 1} with 2·label - 1."
            )
    elif targets.is_floating_point() or targets.dtype == torch.bool:
        raise KernelError(
            f"The {what} targets of a {n_outputs}-class kernel must be integer label ids, got "
            f"{targets.dtype}; pass a long tensor."
        )
    elif n_examples and not bool(((targets >= 0) & (targets < n_outputs)).all()):
        raise KernelError(
            f"The {what} targets must be label ids in [0, {n_outputs}) for a kernel with "
            f"C = {n_outputs}; check the label mapping."
        )


def _check_f0(f0: torch.Tensor | None, n_examples: int, n_outputs: int, what: str) -> None:
    if f0 is not None and tuple(f0.shape) != (n_examples, n_outputs):
        raise KernelError(
            f"The {what} f0 logits have shape {_shape(f0)} but the kernel needs "
            f"[{n_examples}, {n_outputs}]; pass the logits of the same examples and outputs."
        )


def _shift(f0: torch.Tensor | None, settings: SolverSettings) -> torch.Tensor | None:
    if f0 is None or not settings.f0_scaling > 0:
        return None
    return f0.reshape(-1).to("cpu", torch.float64) / settings.f0_scaling


class FittedSolver:
    """A solver fitted on the train-train kernel; :meth:`predict` evaluates any train-X kernel.

    Build it with :func:`fit`. Fitting once and predicting dev and test from it gives the same
    numbers as two :func:`solve` calls, at half the cost.
    """

    def __init__(
        self,
        name: str,
        solver: _Solver,
        settings: SolverSettings,
        *,
        n_train: int,
        n_outputs: int,
        stacked: bool,
        with_f0: bool,
    ) -> None:
        self.name = name
        self.solver = solver
        self.settings = settings
        self.n_train = n_train
        self.n_outputs = n_outputs
        self.stacked = stacked
        self.with_f0 = with_f0

    def predict(
        self,
        eval_kernel: torch.Tensor,
        eval_targets: torch.Tensor,
        *,
        f0_eval: torch.Tensor | None = None,
    ) -> SolveResult:
        """Predict the evaluated set from its train-X kernel.

        Args:
            eval_kernel: ``[N, C, M, C]``, or ``[2, N, C, M, C]`` for A-SignGD: training rows
                against the M evaluated examples.
            eval_targets: ``[M]`` label ids (long), or ±1 floats in binary mode.
            f0_eval: ``[M, C]`` logits of the pre-trained model on the evaluated set; needed
                exactly when f0 logits were given to :func:`fit`.

        Returns:
            The logits, predictions, loss and accuracy on the evaluated set.

        Raises:
            KernelError: shapes that do not match the fitted kernel, or f0 on one side only.
        """
        kernel, flipped = _split_stack(eval_kernel, "eval")
        n, c, m, c2 = kernel.shape
        if (n, c, c2) != (self.n_train, self.n_outputs, self.n_outputs):
            raise KernelError(
                f"The eval kernel {_shape(eval_kernel)} does not match the train kernel "
                f"[{self.n_train}, {self.n_outputs}, {self.n_train}, {self.n_outputs}]; both "
                "need the same N training rows and C outputs."
            )
        if self.stacked != (flipped is not None):
            raise KernelError(
                f"The train kernel is {'' if self.stacked else 'not '}an A-SignGD stack but the "
                f"eval kernel {_shape(eval_kernel)} is{'' if flipped is not None else ' not'}; "
                "load both from the same kernel folder."
            )
        if self.with_f0 != (f0_eval is not None):
            raise KernelError(
                "f0 logits were given for only one of train and eval; pass both or neither."
            )
        _check_targets(eval_targets, m, c, "eval")
        _check_f0(f0_eval, m, c, "eval")
        rows = _Rows(
            kernel=flatten_kernel(kernel),
            flipped=None if flipped is None else flatten_kernel(flipped),
            targets=flatten_targets(eval_targets, c),
            shift=_shift(f0_eval, self.settings),
        )
        preds, loss = self.solver.predict(rows)
        if c == 1:
            logits = torch.stack([-preds, preds], dim=1)
            labels = _to_01(eval_targets.to("cpu", torch.float64))
        else:
            logits = preds.reshape(m, c)
            labels = eval_targets.long().cpu()
        predictions = logits.argmax(dim=1)
        accuracy = (predictions == labels).to(torch.float64).mean().item()
        return SolveResult(logits, predictions, labels, loss, accuracy, dict(self.solver.metrics))


def fit(
    name: str,
    train_kernel: torch.Tensor,
    train_targets: torch.Tensor,
    settings: SolverSettings | None = None,
    *,
    f0_train: torch.Tensor | None = None,
) -> FittedSolver:
    """Fit solver ``name`` on the train-train kernel.

    Args:
        name: a key of :data:`SOLVERS`.
        train_kernel: ``[N, C, N, C]``, or ``[2, N, C, N, C]`` for A-SignGD.
        train_targets: ``[N]`` label ids (long), or ±1 floats in binary mode (C = 1).
        settings: hyper-parameters; defaults to :class:`SolverSettings()`.
        f0_train: ``[N, C]`` pre-trained logits on the training set, used when
            ``settings.f0_scaling > 0`` by the solvers that adjust for f0.

    Returns:
        The fitted solver.

    Raises:
        KernelError: an unknown solver, mismatched shapes or a solver that does not fit the
            kernels (see :func:`check_request`).
    """
    settings = settings or SolverSettings()
    kernel, _ = _split_stack(train_kernel, "train")
    n, c, n2, c2 = kernel.shape
    if n != n2 or c != c2 or n == 0:
        raise KernelError(
            f"The train kernel has shape {_shape(train_kernel)}; it must be a non-empty "
            "train-train kernel [N, C, N, C] (same N and C on both sides)."
        )
    stacked = kernel is not train_kernel
    check_request(name, settings, n_outputs=c, stacked=stacked, with_f0=f0_train is not None)
    _check_targets(train_targets, n, c, "train")
    _check_f0(f0_train, n, c, "train")
    rows = _Rows(
        kernel=flatten_kernel(kernel),
        flipped=None,
        targets=flatten_targets(train_targets, c),
        shift=_shift(f0_train, settings),
    )
    solver = SOLVERS[name](settings)
    solver.fit(rows)
    return FittedSolver(
        name,
        solver,
        settings,
        n_train=n,
        n_outputs=c,
        stacked=stacked,
        with_f0=f0_train is not None,
    )


def solve(
    name: str,
    train_kernel: torch.Tensor,
    train_targets: torch.Tensor,
    eval_kernel: torch.Tensor,
    eval_targets: torch.Tensor,
    settings: SolverSettings | None = None,
    *,
    f0_train: torch.Tensor | None = None,
    f0_eval: torch.Tensor | None = None,
) -> SolveResult:
    """Fit solver ``name`` on the train-train kernel and predict the evaluated set.

    Args:
        name: a key of :data:`SOLVERS`: ``lstsq``, ``logistic``, ``svr``, ``svc``, ``asym``.
        train_kernel: ``[N, C, N, C]``, or ``[2, N, C, N, C]`` for A-SignGD.
        train_targets: ``[N]`` label ids (long), or ±1 floats in binary mode (C = 1).
        eval_kernel: ``[N, C, M, C]``, or ``[2, N, C, M, C]``: training rows × eval columns.
        eval_targets: ``[M]``, same convention as ``train_targets``.
        settings: hyper-parameters; defaults to :class:`SolverSettings()`.
        f0_train: ``[N, C]`` pre-trained logits on the training set (both or neither).
        f0_eval: ``[M, C]`` pre-trained logits on the evaluated set.

    Returns:
        Logits ``[M, C]`` (``[M, 2]`` in binary mode), predictions, loss and accuracy.

    Raises:
        KernelError: an unknown solver, mismatched shapes, or a solver that does not fit the
            kernels.
    """
    fitted = fit(name, train_kernel, train_targets, settings, f0_train=f0_train)
    return fitted.predict(eval_kernel, eval_targets, f0_eval=f0_eval)
