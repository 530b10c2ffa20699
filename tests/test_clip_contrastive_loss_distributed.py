"""clip_contrastive_loss across 2 CPU processes (gloo), Triton interpreter in the children.

Each rank holds half of one global batch; the loss must equal the single-process full-batch loss, the
local gradients must equal the matching slices of the full-batch gradients, and the logit-scale
gradient must equal the full-batch one on every rank. The plain-PyTorch distributed path (used on CPU
without the interpreter) is checked the same way in the same processes. Steady-state steps (a local
batch size the group has already agreed on) issue only the loss's own all-gathers and read nothing
back to the host; ranks with different sizes get a clear error.
"""
import contextlib
import functools
from importlib import import_module

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from _dist import run_ranks
from conftest import TOL

# Host reads: each is a device sync on CUDA. None may run in a steady-state distributed step.
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")


def _full_batch(n, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=gen), dim=1)  # (N, D)
    txt = F.normalize(img + 0.7 * torch.randn(n, d, generator=gen), dim=1)  # (N, D)
    return img, txt, torch.tensor(23.0)


def _grads(fn, img, txt, s, **kw):
    img = img.detach().clone().requires_grad_()
    txt = txt.detach().clone().requires_grad_()
    s = s.detach().clone().requires_grad_()
    loss = fn(img, txt, s, **kw)
    (2.5 * loss).backward()
    return loss.detach(), img.grad, txt.grad, s.grad


@contextlib.contextmanager
def _count_all_gathers(counts: list):
    """Count torch.distributed.all_gather calls (the loss modules look it up at call time)."""
    real = dist.all_gather

    def counting(*a, **kw):
        counts.append(1)
        return real(*a, **kw)

    dist.all_gather = counting
    try:
        yield
    finally:
        dist.all_gather = real


@contextlib.contextmanager
def _count_mm(flops: list):
    """Record the FLOPs of every torch.mm call (the cuBLAS GEMMs of the resident and chunked strategies)."""
    real = torch.mm

    def counting(a, b, *args, **kw):
        flops.append(2 * a.shape[0] * a.shape[1] * b.shape[1])
        return real(a, b, *args, **kw)

    torch.mm = counting
    try:
        yield
    finally:
        torch.mm = real


@contextlib.contextmanager
def _no_host_reads():
    """Make every Python-level host read of a tensor raise (forward and backward run inside)."""
    real = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def refuse(name):
        def read(self, *a, **kw):
            raise AssertionError(f"host sync in a steady-state distributed step: Tensor.{name}()")
        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, fn in real.items():
            setattr(torch.Tensor, name, fn)


def _equal_full_batch(rank, world, n_local, d):
    ccl = import_module("kclip.kernels.clip_contrastive_loss")
    from kclip.kernels.dispatch import use_triton

    assert use_triton(torch.zeros(1)), "the children must run the Triton interpreter"
    group = dist.group.WORLD
    tol = TOL[torch.float32]
    names = ("loss", "d_image", "d_text", "d_logit_scale")
    agreed = None  # the local size the group has agreed on: the size check runs only when it changes
    # n_local twice (the second time is a steady-state step), then every rank moves to n_local - 1
    for step, n_p in enumerate((n_local, n_local, n_local - 1)):
        img, txt, s = _full_batch(world * n_p, d, seed=step)
        rows = slice(rank * n_p, (rank + 1) * n_p)
        want = _grads(ccl.clip_contrastive_loss_reference, img, txt, s)  # single process, full batch
        want = (want[0], want[1][rows], want[2][rows], want[3])
        # the chunked strategy in chunks of 5 local rows (3 chunks per pass; cuBLAS-style GEMMs, or the tiles in
        # Triton), the fused one, the reference
        chunked = functools.partial(ccl.clip_contrastive_loss, strategy="chunked")
        fused = functools.partial(ccl.clip_contrastive_loss, strategy="fused")
        resident = functools.partial(ccl.clip_contrastive_loss, strategy="resident")
        chunks = -(-n_p // 5)
        # resident in blocks of 4 local rows: per buffer (rows, columns of S), row statistics and dS' per block
        blocks = -(-n_p // 4)
        # (fn, chunk GEMM, all-gathers, Triton launches, torch.mm matmuls in N x N x D summed over ranks; GEMM="triton"
        # leaves only the backward's P @ B to torch.mm)
        for fn, gemm, loss_gathers, passes, gemm_eq in (
                (chunked, "cublas", 3, 4 * chunks, 6), (chunked, "triton", 3, 6 * chunks, 2),
                (fused, "cublas", 3, 4, 0), (resident, "cublas", 3, 4 * blocks, 4),
                (resident, "triton", 3, 4 * blocks, 4), (None, "cublas", 3, 4 * blocks, 4),
                (ccl.clip_contrastive_loss_reference, "cublas", 2, 0, None)):
            fn = fn or ccl.clip_contrastive_loss  # the budget's plan: resident at these sizes
            launches, gathers, checked, agreed = ccl.TRITON_LAUNCHES, [], agreed != n_p, n_p
            ccl.LAUNCH_OVERRIDES.update(chunk=dict(rows=5, GEMM=gemm), resident=dict(rows=4))
            flops = []
            try:
                with _count_all_gathers(gathers), _count_mm(flops), (
                        contextlib.nullcontext() if checked else _no_host_reads()):
                    got = _grads(fn, img[rows], txt[rows], s, process_group=group)
            finally:
                ccl.LAUNCH_OVERRIDES.clear()
            assert ccl.TRITON_LAUNCHES - launches == passes, "the Triton path did not run as planned"
            if gemm_eq is not None:  # this rank's share of the matmuls: 1 / world of the total
                assert sum(flops) * world == gemm_eq * 2 * (world * n_p) ** 2 * d, (fn, sum(flops))
            # I, T (and the Triton path's O(N) statistics), plus one tiny gather when the size is checked
            assert len(gathers) == loss_gathers + checked, (step, fn, len(gathers))
            for name, a, b in zip(names, got, want):
                torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"rank {rank} step {step} {name}: {m}")
            # the same loss value on every rank, bit for bit
            losses = [torch.zeros(()) for _ in range(world)]
            dist.all_gather(losses, got[0].reshape(()))
            assert all(torch.equal(x, losses[0]) for x in losses), losses


def _unequal_batches(rank, world, n_local, d):
    ccl = import_module("kclip.kernels.clip_contrastive_loss")
    x = F.normalize(torch.randn(n_local + rank, d), dim=1)  # ranks with different N_p
    for fn in (ccl.clip_contrastive_loss, ccl.clip_contrastive_loss_reference):
        with pytest.raises(ValueError, match="different local batch sizes"):
            fn(x, x.clone(), torch.tensor(1.0), process_group=dist.group.WORLD)


@pytest.mark.parametrize("n_local,d", [(13, 48)])
def test_two_ranks_equal_full_batch(n_local, d):
    run_ranks(_equal_full_batch, n_local, d)


def test_two_ranks_unequal_batches_error():
    run_ranks(_unequal_batches, 5, 16)
