"""Shared test setup: the Triton interpreter on CPU, the `cuda` marker, and the one tolerance table."""
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout: train.py, bench/, the configs/ link

# Kernels must run as Triton code on CPU tensors in CI: the interpreter has to be chosen before
# triton is first imported, so set it here, at collection time, when no GPU is present.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One tolerance table for every kernel test: fp32 kernel vs fp32 reference.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.float64: dict(atol=1e-10, rtol=1e-8),
}
# Low precision is judged by the 2x-eager rule: |kernel - ref32| <= 2 * |eager_lowp - ref32| + LOWP_ATOL.
LOWP_ATOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def assert_lowp_close(kernel_out, eager_out, ref32, dtype, name=""):
    """The kernel's error against fp32 is at most twice eager PyTorch's in the same dtype (+ atol)."""
    kernel_err = (kernel_out.float() - ref32.float()).abs().max().item()
    eager_err = (eager_out.float() - ref32.float()).abs().max().item()
    bound = 2 * eager_err + LOWP_ATOL[dtype] * max(1.0, ref32.float().abs().max().item())
    assert kernel_err <= bound, f"{name}: kernel error {kernel_err:.3e} > 2x eager error bound {bound:.3e}"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: end-to-end runs of a minute or more")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def planted(n=997, k=6, d=13, seed=0, spread=10.0, dtype=None):
    """Gaussian blobs around ``k`` random centres: (x (n, d), true labels (n,), centres (k, d)), numpy."""
    import numpy as np

    g = np.random.default_rng(seed)
    centers = g.normal(size=(k, d)) * spread
    truth = g.integers(0, k, size=n)
    x = (centers[truth] + g.normal(size=(n, d))).astype(dtype or np.float32)
    return x, truth, centers


def spy_launches(monkeypatch, module: str, launcher: str) -> list:
    """Record the first argument's shape at every call of ``module.launcher`` (a Triton launcher) that launched a
    kernel, as the module's ``LAUNCH_COUNTS`` counts them, so a test can prove the kernel path ran, not the
    reference. Returns the (growing) list of shapes."""
    import sys

    import kclip.kernels  # noqa: F401  binds the public functions before the op modules are read
    mod = sys.modules[module]
    calls, real = [], getattr(mod, launcher)

    def spy(x, *args):
        before = sum(mod.LAUNCH_COUNTS.values())
        out = real(x, *args)
        if sum(mod.LAUNCH_COUNTS.values()) > before:  # the one launch counter decides; the call gives the shape
            calls.append(tuple(x.shape))
        return out

    monkeypatch.setattr(mod, launcher, spy)
    return calls

