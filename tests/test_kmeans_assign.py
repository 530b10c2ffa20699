"""kmeans_assign: the Triton kernel (interpreter on CPU) against the PyTorch reference."""
import pytest
import torch

from conftest import TOL, assert_lowp_close

from kclip.kernels import kmeans_assign, kmeans_assign_reference
from kclip.kernels.dispatch import use_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_triton_path_is_exercised():
    x = torch.zeros(3, 4, device=DEVICE)
    assert use_triton(x), "kmeans_assign would fall back to the reference: TRITON_INTERPRET is not set"


def _separated(n, k, d, seed=0, spread=8.0, noise=0.5):
    """Points near centroids, keeping only rows whose best centroid beats the runner-up by a margin far
    above fp32 rounding (no near-ties, so fp32 labels must match exactly).

    The noise keeps sqdist from being tiny next to ||x||^2: fp32 cancellation in ||x||^2 - 2x.c + ||c||^2
    costs about eps * ||x||^2 absolute, which the TOL table (rtol 1e-4) covers when sqdist is not tiny."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(k, d, generator=g, dtype=torch.float64) * spread  # (K, D)
    lab = torch.randint(k, (8 * n + 64,), generator=g)
    x = c[lab] + noise * torch.randn(lab.numel(), d, generator=g, dtype=torch.float64)  # (M, D)
    if k > 1:
        two = torch.cdist(x, c).pow(2).topk(2, largest=False).values  # (M, 2)
        scale = x.pow(2).sum(1) + c.pow(2).sum(1).max()
        x = x[(two[:, 1] - two[:, 0]) > 1e-3 * scale]
    assert x.shape[0] >= n, "could not draw enough tie-free points: widen spread"
    return x[:n].float().to(DEVICE), c.float().to(DEVICE)


@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (1, 5, 7), (97, 1, 19), (131, 67, 33), (257, 13, 100), (61, 70, 3)])
def test_fp32_matches_reference(n, k, d):
    x, c = _separated(n, k, d, seed=n + k + d)
    labels, sq = kmeans_assign(x, c)
    ref_labels, ref_sq = kmeans_assign_reference(x.double(), c.double())
    assert labels.dtype == torch.int64 and sq.dtype == torch.float32
    assert labels.shape == (n,) and sq.shape == (n,)
    assert torch.equal(labels, ref_labels)
    _assert_sqdist_close(sq, ref_sq, x, c, labels)
    # and the materialised definition, independent of the reference's formula
    brute = torch.cdist(x.double(), c.double()).pow(2).min(1)
    assert torch.equal(labels, brute.indices)
    _assert_sqdist_close(sq, brute.values, x, c, labels)


def _assert_sqdist_close(sq, ref, x, c, labels):
    """TOL[fp32], with rtol taken relative to the operands ||x||^2 + ||c||^2: the expansion
    ||x||^2 - 2 x.c + ||c||^2 loses about eps * (||x||^2 + ||c||^2) to cancellation, whatever the order."""
    tol = TOL[torch.float32]
    scale = x.double().pow(2).sum(1) + c.double().pow(2).sum(1)[labels]  # (N,)
    err = (sq.double() - ref.double()).abs()
    bound = tol["atol"] + tol["rtol"] * torch.maximum(scale, ref.double().abs())
    assert (err <= bound).all(), f"sqdist error {(err - bound).max().item():.3e} above the TOL bound"


def test_exact_ties_lower_index_wins():
    # Integer-valued data: every distance is exact in fp32, so ties are exact. K=70 spans two
    # centroid tiles in the kernel, so ties are tested within a tile and across tiles.
    k, d = 70, 5
    c = torch.full((k, d), 50.0)
    c[3] = torch.tensor([1.0, 0, 0, 0, 0])
    c[9] = torch.tensor([0, 1.0, 0, 0, 0])  # same distance from the origin as c[3]
    c[66] = torch.tensor([1.0, 0, 0, 0, 0])  # duplicate of c[3] in the second tile
    c[40] = torch.tensor([4.0, 4.0, 0, 0, 0])
    c[68] = torch.tensor([4.0, 4.0, 0, 0, 0])
    x = torch.tensor([[0.0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0], [4.0, 4.0, 0, 0, 0], [4.0, 4.0, 0, 0, 0]])
    labels, sq = kmeans_assign(x.to(DEVICE), c.to(DEVICE))
    assert labels.tolist() == [3, 3, 40, 40]
    assert sq.tolist() == [1.0, 0.0, 0.0, 0.0]
    ref_labels, _ = kmeans_assign_reference(x, c)
    assert ref_labels.tolist() == [3, 3, 40, 40]


def test_sqdist_clamped_nonnegative():
    # points on their centroid: cancellation may go below zero; the kernel clamps at 0
    g = torch.Generator().manual_seed(1)
    c = torch.randn(9, 37, generator=g) * 100
    x = c[torch.tensor([0, 3, 8, 8, 5])]
    labels, sq = kmeans_assign(x.to(DEVICE), c.to(DEVICE))
    assert labels.tolist() == [0, 3, 8, 8, 5]
    assert (sq >= 0).all()
    assert sq.max().item() < 1e-2 * 37 * 100


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,d", [(113, 11, 48), (1, 3, 17)])
def test_lowp_inputs(n, k, d, dtype):
    # bf16 on CPU runs the interpreter's fp32 upcast path (tl.dot on bf16 is wrong there)
    x, c = _separated(n, k, d, seed=7)
    xl, cl = x.to(dtype), c.to(dtype)
    labels, sq = kmeans_assign(xl, cl)
    ref_labels, ref_sq = kmeans_assign_reference(xl.double(), cl.double())  # exact maths on the lowp values
    assert sq.dtype == torch.float32
    assert torch.equal(labels, ref_labels)
    eager_d = (xl[:, None, :] - cl[None, :, :]).pow(2).sum(-1)  # (N, K) eager in the low dtype
    eager = eager_d.gather(1, ref_labels[:, None].to(eager_d.device)).squeeze(1)
    assert_lowp_close(sq, eager, ref_sq, dtype, f"kmeans_assign {dtype} sqdist")


def test_mixed_dtypes_and_noncontiguous():
    x, c = _separated(64, 5, 40, seed=3)
    xt = x.T.contiguous().T  # non-contiguous (column-major) view
    labels, sq = kmeans_assign(xt, c.double())
    ref_labels, ref_sq = kmeans_assign_reference(x, c)
    assert torch.equal(labels, ref_labels)
    _assert_sqdist_close(sq, ref_sq, x, c, labels)


def test_empty_rows():
    labels, sq = kmeans_assign(torch.zeros(0, 4, device=DEVICE), torch.ones(2, 4, device=DEVICE))
    assert labels.shape == (0,) and sq.shape == (0,)


def test_errors_are_clear():
    x = torch.zeros(4, 5)
    with pytest.raises(ValueError, match="dimension mismatch"):
        kmeans_assign(x, torch.zeros(3, 6))
    with pytest.raises(ValueError, match="2-D"):
        kmeans_assign(torch.zeros(4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="2-D"):
        kmeans_assign(x, torch.zeros(5))
    with pytest.raises(ValueError, match="K=0"):
        kmeans_assign(x, torch.zeros(0, 5))
    with pytest.raises(TypeError, match="floating"):
        kmeans_assign(x.long(), torch.zeros(3, 5))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lowp_gpu_matches_fp32(dtype):
    x, c = _separated(5003, 1000, 4096 // 8 + 3, seed=11, spread=4.0)
    xl, cl = x.to(dtype), c.to(dtype)
    labels, sq = kmeans_assign(xl, cl)
    ref_labels, ref_sq = kmeans_assign_reference(xl.double(), cl.double())
    assert (labels == ref_labels).float().mean().item() > 0.999
    eager_d = torch.cdist(xl.float(), cl.float()).pow(2).to(dtype)  # low-precision eager distances
    eager = eager_d.gather(1, ref_labels[:, None]).squeeze(1)
    assert_lowp_close(sq, eager, ref_sq, dtype, f"kmeans_assign {dtype}")


@pytest.mark.cuda
def test_big_n_never_materialises_nxk():
    n, k, d = 2_000_000, 1024, 64
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(k, d, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    labels, sq = kmeans_assign(x, c)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 0.05 * n * k * 4, f"peak extra memory {extra} bytes suggests an N x K buffer"
    ref_labels, _ = kmeans_assign_reference(x[:5000], c)
    assert (labels[:5000] == ref_labels).float().mean().item() > 0.99
