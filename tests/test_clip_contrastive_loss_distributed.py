"""clip_contrastive_loss across 2 CPU processes (gloo), Triton interpreter in the children.

Each rank holds half of one global batch; the loss must equal the single-process full-batch loss, the
local gradients must equal the matching slices of the full-batch gradients, and the logit-scale
gradient must equal the full-batch one on every rank. The plain-PyTorch distributed path (used on CPU
without the interpreter) is checked the same way in the same processes.
"""
import os
import socket
from importlib import import_module

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import TOL

WORLD = 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def _worker(rank, port, n_local, d, uneven):
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported in this fresh process
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        ccl = import_module("kclip.kernels.clip_contrastive_loss")
        from kclip.kernels.dispatch import use_triton

        assert use_triton(torch.zeros(1)), "the children must run the Triton interpreter"
        group = dist.group.WORLD
        if uneven:  # ranks with different N_p must get a clear error, not a hang
            x = F.normalize(torch.randn(n_local + rank, d), dim=1)
            try:
                ccl.clip_contrastive_loss(x, x.clone(), torch.tensor(1.0), process_group=group)
            except ValueError as exc:
                assert "different local batch sizes" in str(exc)
            else:
                raise AssertionError("unequal local batches were accepted")
            return

        img, txt, s = _full_batch(WORLD * n_local, d)
        rows = slice(rank * n_local, (rank + 1) * n_local)
        want = _grads(ccl.clip_contrastive_loss_reference, img, txt, s)  # single process, full batch
        want = (want[0], want[1][rows], want[2][rows], want[3])
        tol = TOL[torch.float32]
        names = ("loss", "d_image", "d_text", "d_logit_scale")
        for fn in (ccl.clip_contrastive_loss, ccl.clip_contrastive_loss_reference):
            launches = ccl.TRITON_LAUNCHES
            got = _grads(fn, img[rows], txt[rows], s, process_group=group)
            if fn is ccl.clip_contrastive_loss:
                assert ccl.TRITON_LAUNCHES - launches == 4, "the Triton path did not run"
            for name, a, b in zip(names, got, want):
                torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"rank {rank} {name}: {m}")
            # the same loss value on every rank, bit for bit
            losses = [torch.zeros(()) for _ in range(WORLD)]
            dist.all_gather(losses, got[0].reshape(()))
            assert all(torch.equal(x, losses[0]) for x in losses), losses
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("n_local,d", [(13, 48)])
def test_two_ranks_equal_full_batch(n_local, d):
    mp.spawn(_worker, args=(_free_port(), n_local, d, False), nprocs=WORLD, join=True)


def test_two_ranks_unequal_batches_error():
    mp.spawn(_worker, args=(_free_port(), 5, 16, True), nprocs=WORLD, join=True)
