"""Empirical neural tangent kernels of language-model heads (kernel.md §4-§8).

from adaptlab.ntk import KernelFunction, compute_kernel, select_parameters

fn = KernelFunction(model, head="label_words", label_word_ids=[17, 42])
params = select_parameters(model, exclude_embeddings=True)
K = compute_kernel(fn, params, train_batches, test_batches, "sgd")  # [N, 2, M, 2]

Solvers, the upstream ``.pt`` format and the sweep: ``adaptlab.ntk.solvers``,
``adaptlab.ntk.io``, ``adaptlab.ntk.sweep``; ``scripts/compute_kernel.py`` strings them together.
"""

from adaptlab.ntk.errors import KernelError
from adaptlab.ntk.formulas import FORMULAS, asymmetric_pair, compute_kernel, get_formula
from adaptlab.ntk.function import KernelFunction
from adaptlab.ntk.io import (
    KernelSet,
    kernel_path,
    load_kernel,
    load_logits,
    logits_path,
    save_kernel,
    save_logits,
)
from adaptlab.ntk.params import PARAMETER_SUBSETS, grad_dim, select_parameters
from adaptlab.ntk.projection import PROJECTIONS, projected_features, projected_kernel
from adaptlab.ntk.solvers import SOLVERS, SolveResult, SolverSettings, solve
from adaptlab.ntk.sweep import expand_grid, gather, run_sweep, write_sweep

__all__ = [
    "FORMULAS",
    "PARAMETER_SUBSETS",
    "PROJECTIONS",
    "SOLVERS",
    "KernelError",
    "KernelFunction",
    "KernelSet",
    "SolveResult",
    "SolverSettings",
    "asymmetric_pair",
    "compute_kernel",
    "expand_grid",
    "gather",
    "get_formula",
    "grad_dim",
    "kernel_path",
    "load_kernel",
    "load_logits",
    "logits_path",
    "projected_features",
    "projected_kernel",
    "run_sweep",
    "save_kernel",
    "save_logits",
    "select_parameters",
    "solve",
    "write_sweep",
]
