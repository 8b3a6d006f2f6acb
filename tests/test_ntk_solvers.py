"""Kernel solvers, kernel files and the solver sweep against independent computations.

Least squares and A-SignGD against numpy solves written out by hand, the scikit-learn solvers
against scikit-learn called directly on the same matrices, the file format against plain
``torch.save``/``torch.load``, and the gather against numpy on hand values.

LAPACK least squares (MKL) is reproducible only to rounding from call to call, so repeated
least-squares solves are compared to 1e-12, not bit for bit.
"""

from __future__ import annotations

import doctest
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegressionCV
from sklearn.svm import SVC, SVR

from adaptlab.errors import UserError
from adaptlab.io import read_json
from adaptlab.ntk import solvers
from adaptlab.ntk.errors import KernelError
from adaptlab.ntk.io import (
    KernelSet,
    kernel_path,
    load_kernel,
    load_logits,
    logits_path,
    save_kernel,
)
from adaptlab.ntk.solvers import SolverSettings, flatten_kernel, flatten_targets, solve
from adaptlab.ntk.sweep import expand_grid, gather, run_sweep, write_sweep


def _kernels(seed: int, n: int, m: int, c: int, p: int = 64):
    """Train-train ``[N, C, N, C]`` and train-eval ``[N, C, M, C]`` of a random feature map."""
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn((n + m) * c, p, generator=g, dtype=torch.float64)
    full = phi[: n * c] @ phi.T
    return full[:, : n * c].reshape(n, c, n, c), full[:, n * c :].reshape(n, c, m, c)


def _labels(seed: int, n: int, c: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.arange(n) % c if c > 1 else 2.0 * (torch.randperm(n, generator=g) % 2) - 1


def _np(kernel: torch.Tensor) -> np.ndarray:
    n, c, m, _ = kernel.shape
    return kernel.reshape(n * c, m * c).numpy()


def _one_hot(labels: torch.Tensor, c: int) -> np.ndarray:
    return np.eye(c)[labels.numpy()].reshape(-1)


def test_doctest():
    assert doctest.testmod(solvers).failed == 0


def test_kernel_error_is_a_user_error():
    assert issubclass(KernelError, UserError)


# ---------------------------------------------------------------- least squares


def test_lstsq_recovers_the_kernel_regression_solution():
    k_train, k_eval = _kernels(0, n=6, m=4, c=3)
    y_train, y_eval = _labels(0, 6, 3), torch.tensor([2, 0, 1, 1])
    result = solve("lstsq", k_train, y_train, k_eval, y_eval)

    alpha = np.linalg.solve(_np(k_train), _one_hot(y_train, 3))
    expected = (_np(k_eval).T @ alpha).reshape(4, 3)
    np.testing.assert_allclose(result.logits.numpy(), expected, rtol=0, atol=1e-8)
    assert torch.equal(result.predictions, torch.from_numpy(expected.argmax(1)))
    expected_loss = ((expected.reshape(-1) - _one_hot(y_eval, 3)) ** 2).sum() / 12
    assert result.loss == pytest.approx(expected_loss, rel=1e-10)
    assert result.accuracy == pytest.approx((expected.argmax(1) == y_eval.numpy()).mean())
    assert result.metrics["rank"] == 18

    # The train-train kernel interpolates its own targets.
    on_train = solve("lstsq", k_train, y_train, k_train, y_train)
    np.testing.assert_allclose(
        on_train.logits.numpy().reshape(-1), _one_hot(y_train, 3), rtol=0, atol=1e-8
    )
    assert on_train.accuracy == 1.0 and on_train.loss < 1e-16


def test_lstsq_regularization_is_relative_to_the_largest_singular_value():
    k_train, k_eval = _kernels(1, n=5, m=3, c=2)
    y_train, y_eval = _labels(1, 5, 2), torch.tensor([1, 0, 1])
    settings = SolverSettings(regularization=0.1)
    result = solve("lstsq", k_train, y_train, k_eval, y_eval, settings)

    k = _np(k_train)
    sigma_max = np.linalg.svd(k, compute_uv=False).max()
    alpha = np.linalg.solve(k + 0.1 * sigma_max * np.eye(10), _one_hot(y_train, 2))
    expected = (_np(k_eval).T @ alpha).reshape(3, 2)
    np.testing.assert_allclose(result.logits.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_lstsq_f0_adjustment_by_hand():
    k_train, k_eval = _kernels(2, n=5, m=3, c=2)
    y_train, y_eval = _labels(2, 5, 2), torch.tensor([0, 1, 1])
    g = torch.Generator().manual_seed(2)
    f0_train = torch.randn(5, 2, generator=g, dtype=torch.float64)
    f0_eval = torch.randn(3, 2, generator=g, dtype=torch.float64)
    settings = SolverSettings(f0_scaling=4.0)
    result = solve(
        "lstsq", k_train, y_train, k_eval, y_eval, settings, f0_train=f0_train, f0_eval=f0_eval
    )

    alpha = np.linalg.solve(_np(k_train), _one_hot(y_train, 2) - f0_train.numpy().reshape(-1) / 4)
    expected = _np(k_eval).T @ alpha + f0_eval.numpy().reshape(-1) / 4
    np.testing.assert_allclose(result.logits.numpy().reshape(-1), expected, rtol=0, atol=1e-8)
    expected_loss = ((expected - _one_hot(y_eval, 2)) ** 2).mean()
    assert result.loss == pytest.approx(expected_loss, rel=1e-10)

    # s = 0 turns the adjustment off even with f0 given.
    off = solve("lstsq", k_train, y_train, k_eval, y_eval, f0_train=f0_train, f0_eval=f0_eval)
    plain = solve("lstsq", k_train, y_train, k_eval, y_eval)
    torch.testing.assert_close(off.logits, plain.logits, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- flattening and binary mode


def test_multiclass_flattening_order_is_example_then_class():
    kernel = torch.arange(8, dtype=torch.float64).reshape(2, 2, 1, 2)
    assert flatten_kernel(kernel).tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert flatten_targets(torch.tensor([2, 0]), 3).tolist() == [0, 0, 1, 1, 0, 0]

    # With an identity kernel, lstsq returns the targets themselves: row (i, c) must land in
    # logits[i, c].
    identity = torch.eye(6, dtype=torch.float64).reshape(2, 3, 2, 3)
    labels = torch.tensor([2, 0])
    result = solve("lstsq", identity, labels, identity, labels)
    assert result.logits.tolist() == [[0, 0, 1], [1, 0, 0]]
    assert result.predictions.tolist() == [2, 0]


def test_binary_mode_maps_logit_and_labels():
    identity = torch.eye(4, dtype=torch.float64).reshape(4, 1, 4, 1)
    targets = torch.tensor([1.0, -1.0, -1.0, 1.0])
    result = solve("lstsq", identity, targets, identity, targets)
    assert result.logits.tolist() == [[-1, 1], [1, -1], [1, -1], [-1, 1]]
    assert result.labels.tolist() == [1, 0, 0, 1]
    assert result.predictions.tolist() == [1, 0, 0, 1]
    assert result.predictions.dtype == torch.long
    with pytest.raises(KernelError, match="-1 or \\+1"):
        solve("lstsq", identity, targets.clamp(min=0), identity, targets)


# ---------------------------------------------------------------- scikit-learn solvers


def test_logistic_equals_scikit_learn_called_directly():
    k_train, k_eval = _kernels(3, n=20, m=7, c=1, p=8)
    y_train, y_eval = _labels(3, 20, 1), _labels(4, 7, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = solve("logistic", k_train, y_train, k_eval, y_eval)
        model = LogisticRegressionCV(max_iter=10000, random_state=0)
        model.fit(_np(k_train), ((y_train.numpy() + 1) / 2).astype(int))
    log_proba = model.predict_log_proba(_np(k_eval).T)
    p = log_proba[:, 1] - log_proba[:, 0]
    np.testing.assert_array_equal(result.logits.numpy(), np.stack([-p, p], 1))
    labels = ((y_eval.numpy() + 1) / 2).astype(int)
    assert result.loss == pytest.approx(-log_proba[np.arange(7), labels].mean(), rel=1e-12)
    assert result.accuracy == pytest.approx((model.predict(_np(k_eval).T) == labels).mean())


def test_logistic_with_fewer_than_five_rows_per_label_uses_that_many_folds():
    k_train, k_eval = _kernels(7, n=8, m=5, c=1, p=8)
    y_train = torch.tensor([1.0, -1.0] * 4, dtype=torch.float64)
    y_eval = _labels(8, 5, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = solve("logistic", k_train, y_train, k_eval, y_eval)
        model = LogisticRegressionCV(max_iter=10000, random_state=0, cv=4)
        model.fit(_np(k_train), ((y_train.numpy() + 1) / 2).astype(int))
    log_proba = model.predict_log_proba(_np(k_eval).T)
    np.testing.assert_array_equal(result.logits.numpy()[:, 1], log_proba[:, 1] - log_proba[:, 0])
    with pytest.raises(KernelError, match="at least 2 training rows of each label"):
        solve("logistic", k_train[:3, :, :3], y_train[:3], k_train[:3, :, :3], y_train[:3])


def test_logistic_multiclass_fits_flattened_one_hot_rows():
    k_train, k_eval = _kernels(5, n=12, m=4, c=3, p=16)
    y_train, y_eval = _labels(5, 12, 3), torch.tensor([0, 1, 2, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = solve("logistic", k_train, y_train, k_eval, y_eval)
        model = LogisticRegressionCV(max_iter=10000, random_state=0)
        model.fit(_np(k_train), _one_hot(y_train, 3).astype(int))
    log_proba = model.predict_log_proba(_np(k_eval).T)
    expected = (log_proba[:, 1] - log_proba[:, 0]).reshape(4, 3)
    np.testing.assert_array_equal(result.logits.numpy(), expected)


def test_svr_equals_scikit_learn_with_f0():
    k_train, k_eval = _kernels(6, n=8, m=5, c=2, p=16)
    y_train, y_eval = _labels(6, 8, 2), torch.tensor([0, 1, 1, 0, 1])
    g = torch.Generator().manual_seed(6)
    f0_train = torch.randn(8, 2, generator=g, dtype=torch.float64)
    f0_eval = torch.randn(5, 2, generator=g, dtype=torch.float64)
    settings = SolverSettings(f0_scaling=2.0)
    result = solve(
        "svr", k_train, y_train, k_eval, y_eval, settings, f0_train=f0_train, f0_eval=f0_eval
    )
    model = SVR(kernel="precomputed", C=1.0, epsilon=0.1)
    model.fit(_np(k_train), _one_hot(y_train, 2) - f0_train.numpy().reshape(-1) / 2)
    expected = model.predict(_np(k_eval).T) + f0_eval.numpy().reshape(-1) / 2
    np.testing.assert_array_equal(result.logits.numpy().reshape(-1), expected)
    assert result.loss == pytest.approx(((expected - _one_hot(y_eval, 2)) ** 2).mean())


def test_svc_equals_scikit_learn_and_refuses_multiclass_and_f0():
    k_train, k_eval = _kernels(7, n=10, m=6, c=1, p=8)
    y_train, y_eval = _labels(7, 10, 1), _labels(8, 6, 1)
    result = solve("svc", k_train, y_train, k_eval, y_eval)
    labels = SVC(kernel="precomputed").fit(_np(k_train), (y_train.numpy() > 0).astype(int))
    p = 2.0 * labels.predict(_np(k_eval).T) - 1
    np.testing.assert_array_equal(result.logits.numpy(), np.stack([-p, p], 1))
    assert result.loss == pytest.approx(((p - y_eval.numpy()) ** 2).mean())

    k3, e3 = _kernels(7, n=4, m=2, c=3)
    with pytest.raises(KernelError, match="binary mode only"):
        solve("svc", k3, _labels(7, 4, 3), e3, torch.tensor([0, 1]))
    f0 = torch.zeros(10, 1, dtype=torch.float64)
    with pytest.raises(KernelError, match="cannot adjust for f0"):
        solve(
            "svc",
            k_train,
            y_train,
            k_eval,
            y_eval,
            SolverSettings(f0_scaling=1.0),
            f0_train=f0,
            f0_eval=torch.zeros(6, 1, dtype=torch.float64),
        )


# ---------------------------------------------------------------- A-SignGD LS-SVM


def _asym_kernels(seed: int, n: int, m: int, p: int = 32):
    """Stacked (K, K') with K = <sign J_train, J> and K' = <J_train, sign J>, binary mode."""
    g = torch.Generator().manual_seed(seed)
    jac = torch.randn(n + m, p, generator=g, dtype=torch.float64)
    k = jac[:n].sign() @ jac.T  # [N, N+M]
    k_flipped = jac[:n] @ jac.sign().T
    stack = torch.stack([k, k_flipped]).reshape(2, n, 1, n + m, 1)
    return stack[:, :, :, :n], stack[:, :, :, n:]


def test_asym_matches_a_direct_solve_of_the_block_system():
    n, m = 6, 4
    k_train, k_eval = _asym_kernels(9, n, m)
    # The train-train flipped kernel is K permuted, as upstream stores it.
    assert torch.equal(k_train[1], k_train[0].permute(2, 3, 0, 1))
    y_train, y_eval = _labels(9, n, 1), _labels(10, m, 1)
    g = torch.Generator().manual_seed(9)
    f0_train = torch.randn(n, 1, generator=g, dtype=torch.float64)
    f0_eval = torch.randn(m, 1, generator=g, dtype=torch.float64)
    settings = SolverSettings(regularization=0.05, f0_scaling=4.0, gamma=0.5, lam=0.3)
    result = solve(
        "asym", k_train, y_train, k_eval, y_eval, settings, f0_train=f0_train, f0_eval=f0_eval
    )

    k = k_train[0].reshape(n, n).numpy()
    k = k + 0.05 * np.linalg.svd(k, compute_uv=False).max() * np.eye(n)
    y = y_train.numpy() - f0_train.numpy()[:, 0] / 4
    h = np.array([[y[i] * k[i, j] * y[j] for j in range(n)] for i in range(n)])
    a = np.block([[np.eye(n) / 0.5, h], [h.T, np.eye(n) / 0.5]])
    alpha_beta = np.linalg.solve(a, np.ones(2 * n))
    alpha, beta = alpha_beta[:n], alpha_beta[n:]
    k_x, k_x_flipped = k_eval[0].reshape(n, m).numpy(), k_eval[1].reshape(n, m).numpy()
    omega = np.array([sum(alpha[i] * y[i] * k_x[i, j] for i in range(n)) for j in range(m)])
    nu = np.array([sum(beta[i] * y[i] * k_x_flipped[i, j] for i in range(n)) for j in range(m)])
    p = 0.3 * omega + 0.7 * nu + f0_eval.numpy()[:, 0] / 4
    np.testing.assert_allclose(result.logits.numpy(), np.stack([-p, p], 1), rtol=0, atol=1e-8)
    assert result.loss == pytest.approx(((p - y_eval.numpy()) ** 2).mean(), rel=1e-8)


def test_asym_needs_binary_asignd_stacks():
    k_train, k_eval = _kernels(11, n=4, m=2, c=1)
    with pytest.raises(KernelError, match="--formula asymmetric_signgd --binary true"):
        solve("asym", k_train, _labels(11, 4, 1), k_eval, _labels(12, 2, 1))
    k3, e3 = _kernels(11, n=4, m=2, c=2)
    stacked, stacked_eval = torch.stack([k3, k3]), torch.stack([e3, e3])
    with pytest.raises(KernelError, match="asymmetric_signgd"):
        solve("asym", stacked, _labels(11, 4, 2), stacked_eval, torch.tensor([0, 1]))
    # Other solvers read K (index 0) of a stack, as upstream does.
    k_train, k_eval = _asym_kernels(12, 5, 3)
    y_train, y_eval = _labels(12, 5, 1), _labels(13, 3, 1)
    from_stack = solve("lstsq", k_train, y_train, k_eval, y_eval)
    plain = solve("lstsq", k_train[0], y_train, k_eval[0], y_eval)
    torch.testing.assert_close(from_stack.logits, plain.logits, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- input checks


def test_bad_requests_name_the_shapes_and_the_choices():
    k_train, k_eval = _kernels(14, n=4, m=3, c=2)
    y_train, y_eval = _labels(14, 4, 2), torch.tensor([0, 1, 1])
    with pytest.raises(KernelError, match="choose one of \\['asym', 'logistic', 'lstsq'"):
        solve("ridge", k_train, y_train, k_eval, y_eval)
    other_train, _ = _kernels(14, n=5, m=3, c=2)
    with pytest.raises(KernelError, match=r"\[4, 2, 3, 2\].*\[5, 2, 5, 2\]"):
        solve("lstsq", other_train, _labels(14, 5, 2), k_eval, y_eval)
    _, other_c = _kernels(14, n=4, m=3, c=3)
    with pytest.raises(KernelError, match=r"\[4, 3, 3, 3\].*\[4, 2, 4, 2\]"):
        solve("lstsq", k_train, y_train, other_c, y_eval)
    with pytest.raises(KernelError, match=r"shape \[5\].*4 train examples"):
        solve("lstsq", k_train, torch.tensor([0, 1, 0, 1, 0]), k_eval, y_eval)
    with pytest.raises(KernelError, match=r"shape \[2\].*3 eval examples"):
        solve("lstsq", k_train, y_train, k_eval, y_eval[:2])
    with pytest.raises(KernelError, match=r"f0 logits have shape \[4, 3\].*\[4, 2\]"):
        solve(
            "lstsq",
            k_train,
            y_train,
            k_eval,
            y_eval,
            f0_train=torch.zeros(4, 3),
            f0_eval=torch.zeros(3, 2),
        )
    with pytest.raises(KernelError, match="only one of train and eval"):
        solve("lstsq", k_train, y_train, k_eval, y_eval, f0_train=torch.zeros(4, 2))
    with pytest.raises(KernelError, match="needs the f0 logits"):
        solve("lstsq", k_train, y_train, k_eval, y_eval, SolverSettings(f0_scaling=1.0))
    with pytest.raises(KernelError, match="label ids in \\[0, 2\\)"):
        solve("lstsq", k_train, torch.tensor([0, 1, 2, 0]), k_eval, y_eval)
    with pytest.raises(KernelError, match="regularization must be >= 0"):
        SolverSettings(regularization=-1.0)


# ---------------------------------------------------------------- kernel files


@pytest.mark.parametrize(
    ("shape", "targets"),
    [
        ((4, 3, 5, 3), torch.tensor([0, 2, 1, 1, 0])),
        ((2, 4, 1, 5, 1), torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0])),
        ((4, 1, 5, 1), torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0])),
    ],
)
def test_kernel_file_round_trip_in_the_upstream_format(tmp_path, shape, targets):
    kernel = torch.randn(shape, dtype=torch.float64)
    path = kernel_path(tmp_path, "dev", "sst-2")
    assert path.name == "dev_kernels_sst-2.pt"
    save_kernel(path, kernel, targets)
    raw = torch.load(path, weights_only=True)  # what upstream reads
    assert isinstance(raw, tuple) and len(raw) == 2
    assert torch.equal(raw[0], kernel) and torch.equal(raw[1], targets)
    loaded, loaded_targets = load_kernel(path, n_train=4, n_eval=5, n_outputs=shape[-1])
    assert loaded.dtype == torch.float64 and torch.equal(loaded, kernel)
    assert loaded_targets.dtype == targets.dtype and torch.equal(loaded_targets, targets)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


def test_float32_kernel_is_upcast(tmp_path):
    kernel = torch.randn(3, 1, 2, 1)
    torch.save((kernel, torch.tensor([1.0, -1.0])), tmp_path / "k.pt")
    loaded, _ = load_kernel(tmp_path / "k.pt")
    assert loaded.dtype == torch.float64 and torch.equal(loaded, kernel.double())


def test_bad_kernel_files_are_refused(tmp_path):
    path = tmp_path / "test_kernels_sst-2.pt"
    torch.save((torch.zeros(4, 2, 5, 2, dtype=torch.float64), torch.zeros(3).long()), path)
    with pytest.raises(KernelError, match=r"test_kernels_sst-2.pt.*\[3\].*\[4, 2, 5, 2\]"):
        load_kernel(path)
    torch.save((torch.zeros(4, 2, 5, 2, dtype=torch.float64), torch.zeros(5).long()), path)
    with pytest.raises(KernelError, match=r"N \(training rows\) is 4 .* but 6 was expected"):
        load_kernel(path, n_train=6)
    torch.save({"kernel": Fraction(1, 3)}, path)
    with pytest.raises(KernelError, match="refused to unpickle"):
        load_kernel(path)
    torch.save({"kernel": torch.zeros(2)}, path)
    with pytest.raises(KernelError, match="pair of tensors"):
        load_kernel(path)
    with pytest.raises(KernelError, match="no such kernel file"):
        load_kernel(tmp_path / "missing.pt")
    with pytest.raises(KernelError, match="one target per column"):
        save_kernel(path, torch.zeros(2, 1, 3, 1, dtype=torch.float64), torch.zeros(2))


def test_logits_round_trip_and_kernel_set(tmp_path):
    task = "sst-2"
    k_train, k_eval = _kernels(15, n=6, m=4, c=1)
    k_dev, k_test = k_eval[:, :, :2], k_eval[:, :, 2:]
    y = {"train": _labels(15, 6, 1), "dev": _labels(16, 2, 1), "test": _labels(17, 2, 1)}
    kernels = {"train": k_train, "dev": k_dev, "test": k_test}
    f0 = {s: torch.randn(len(t), 1) for s, t in y.items()}
    KernelSet(kernels, y, f0).save(tmp_path, task)
    assert logits_path(tmp_path, "dev", task).name == "dev_logits_sst-2.pt"
    logits, targets = load_logits(logits_path(tmp_path, "dev", task), n_examples=2, n_outputs=1)
    assert logits.dtype == torch.float64 and torch.equal(logits, f0["dev"].double())
    assert torch.equal(targets, y["dev"])

    loaded = KernelSet.load(tmp_path, task)
    assert loaded.n_outputs == 1 and not loaded.stacked and set(loaded.logits) == set(y)
    settings = SolverSettings(f0_scaling=10.0)
    results = loaded.solve("lstsq", settings)
    direct = solve(
        "lstsq",
        k_train,
        y["train"],
        k_test,
        y["test"],
        settings,
        f0_train=f0["train"].double(),
        f0_eval=f0["test"].double(),
    )
    torch.testing.assert_close(results["test"].logits, direct.logits, rtol=1e-12, atol=1e-12)
    assert KernelSet.load(tmp_path, task, logits=False).logits == {}


# ---------------------------------------------------------------- sweep


def test_expand_grid_order_and_errors():
    points = expand_grid({"solver": ["lstsq", "svr"], "regularization": [0.0, 0.1], "lam": 0.5})
    assert [(p.solver, p.regularization, p.lam) for p in points] == [
        ("lstsq", 0.0, 0.5),
        ("lstsq", 0.1, 0.5),
        ("svr", 0.0, 0.5),
        ("svr", 0.1, 0.5),
    ]
    with pytest.raises(KernelError, match="Unknown sweep key"):
        expand_grid({"kernel_regularization": [0.0]})
    with pytest.raises(KernelError, match="no values"):
        expand_grid({"gamma": []})


def test_gather_picks_best_dev_per_seed_first_on_ties():
    dev = {13: [0.5, 0.7, 0.7], 21: [0.8, 0.2, 0.1], 42: [0.3, 0.3, 0.9]}
    test = {13: [0.1, 0.6, 0.9], 21: [0.75, 0.0, 0.0], 42: [0.2, 0.2, 0.5]}
    trials = [
        {"seed": s, "point": i, "settings": {}, "dev": {"accuracy": d}, "test": {"accuracy": t}}
        for s in dev
        for i, (d, t) in enumerate(zip(dev[s], test[s], strict=True))
    ]
    record = gather(trials)
    assert [b["point"] for b in record["best"]] == [1, 0, 2]
    chosen = np.array([0.6, 0.75, 0.5])
    assert record["summary"]["test_mean"] == pytest.approx(chosen.mean() * 100)
    assert record["summary"]["test_std"] == pytest.approx(np.std(chosen) * 100)
    assert record["summary"]["n_seeds"] == 3


def test_run_sweep_resolves_every_point_and_writes_json(tmp_path):
    by_seed = {}
    for seed in (13, 21):
        k_train, k_eval = _kernels(seed, n=6, m=6, c=2, p=8)
        y_eval = _labels(seed + 1, 6, 2)
        by_seed[seed] = KernelSet(
            {"train": k_train, "dev": k_eval[:, :, :3], "test": k_eval[:, :, 3:]},
            {"train": _labels(seed, 6, 2), "dev": y_eval[:3], "test": y_eval[3:]},
        )
    grid = {"regularization": [0.0, 0.1, 1.0]}
    record = run_sweep(by_seed, grid, ["lstsq"], progress=False)
    assert len(record["points"]) == 3 and len(record["trials"]) == 6
    for best in record["best"]:
        kernels = by_seed[best["seed"]]
        devs = [
            kernels.solve("lstsq", SolverSettings(regularization=r))["dev"].accuracy
            for r in grid["regularization"]
        ]
        assert best["point"] == int(np.argmax(devs))
        assert best["settings"]["regularization"] == grid["regularization"][best["point"]]
    write_sweep(tmp_path / "sweep.json", record)
    assert read_json(tmp_path / "sweep.json")["summary"] == record["summary"]

    with pytest.raises(KernelError, match="binary mode only"):
        run_sweep(by_seed, {}, ["svc"], progress=False)
