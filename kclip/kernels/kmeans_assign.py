"""k-means assignment step: nearest centroid and its squared distance, without the N x K matrix.

What is fused
    For every row ``x_i`` the kernel finds ``argmin_k ||x_i - c_k||^2`` and that minimum in one pass
    over centroid tiles. The N x K distance matrix is never written: each program owns a block of rows
    and keeps a running (min, argmin) in registers while it walks the centroids tile by tile.

Maths
    ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2. The argmin over k does not depend on ||x||^2, so the
    kernel keeps the running minimum of ``score_ik = ||c_k||^2 - 2 x_i.c_k`` (fp32 accumulation of the
    dot product over D tiles) and adds ||x_i||^2 (fp32) once at the end:
        sqdist_i = max(||x_i||^2 + min_k score_ik, 0)
    The clamp removes the small negative values that cancellation can produce for points that sit on
    a centroid. Ties: within a tile ``tl.argmin`` returns the lowest index, across tiles a later tile
    replaces the running minimum only when it is strictly smaller, so the LOWER index wins exactly as
    ``torch.argmin`` does.

    There is no backward: assignments are piecewise constant, so the outputs carry no gradient.

Precision
    fp32, bf16 and fp16 inputs. The centroids are cast to the dtype of ``x`` (tensor-core dot products
    need one operand dtype; the centroids are K x D, so the cast is cheap); ||c||^2 is computed in fp32
    from the cast centroids so that the score is consistent with the dot product. fp32 inputs use IEEE
    fp32 dot products (no TF32) so fp32 labels match the reference exactly away from near-ties.
    In the Triton interpreter ``tl.dot`` on bf16 operands is wrong, so tiles are upcast to fp32 there.

Memory
    O(N + K) extra: the two outputs and ||c||^2 (K floats). x is read ceil(K / BLOCK_K) times (from L2
    for the usual K ~ 1000). Offsets into x are int64, so N * D may exceed 2^31.

Determinism
    No atomics: one program owns each row and walks the tiles in a fixed order, so reruns are bitwise equal.

Limits
    Inputs must be finite (NaN rows get an arbitrary label); callers that need a check do it once on
    the data (``kclip.kmeans.fit_kmeans`` does).
"""
from __future__ import annotations

import functools

import torch

from .dispatch import FP_FUSION, cdiv, interpreting, use_triton

__all__ = ["kmeans_assign", "kmeans_assign_reference"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Number of kernel launches, so tests can assert that the Triton path (not the reference) ran.
LAUNCH_COUNTS = {"assign": 0}


def _check_inputs(x: torch.Tensor, centroids: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(centroids, torch.Tensor):
        raise TypeError("kmeans_assign: x and centroids must be torch tensors "
                        f"(got {type(x).__name__} and {type(centroids).__name__}); convert with torch.as_tensor")
    if x.dim() != 2:
        raise ValueError(f"kmeans_assign: x must be 2-D (N, D), got shape {tuple(x.shape)}; reshape to (N, D)")
    if centroids.dim() != 2:
        raise ValueError(f"kmeans_assign: centroids must be 2-D (K, D), got shape {tuple(centroids.shape)}")
    if x.shape[1] != centroids.shape[1]:
        raise ValueError(f"kmeans_assign: dimension mismatch, x is {tuple(x.shape)} (D={x.shape[1]}) but centroids "
                         f"are {tuple(centroids.shape)} (D={centroids.shape[1]}); both need the same D")
    if centroids.shape[0] < 1:
        raise ValueError("kmeans_assign: centroids is empty (K=0); pass at least one centroid")
    if x.dtype not in _FLOAT_DTYPES or centroids.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"kmeans_assign: floating inputs required, got x {x.dtype} and centroids {centroids.dtype}")
    if x.device != centroids.device:
        raise ValueError(f"kmeans_assign: x is on {x.device} but centroids are on {centroids.device}; "
                         "move both to one device")


def kmeans_assign_reference(x: torch.Tensor, centroids: torch.Tensor, chunk_rows: int | None = None):
    """Nearest centroid in plain PyTorch (ground truth for tests; the CPU path without the interpreter).

    Computes ``||x||^2 - 2 x c^T + ||c||^2`` in fp32 (fp64 for fp64 inputs) over row chunks so that at
    most ``chunk_rows x K`` distances exist at once; ``torch.min`` returns the first (lowest) index on ties.

    Args:
        x: points.
        centroids: cluster centres.
        chunk_rows: rows per chunk (default: about 2^24 distances per chunk).

    Shapes:
        x (N, D), centroids (K, D) -> labels int64 (N,), sqdist float32 (N,)
    """
    _check_inputs(x, centroids)
    n, k = x.shape[0], centroids.shape[0]
    acc = torch.float64 if (x.dtype == torch.float64 or centroids.dtype == torch.float64) else torch.float32
    c = centroids.to(acc)  # (K, D)
    c_sq = (c * c).sum(1)  # (K,)
    labels = torch.empty(n, dtype=torch.int64, device=x.device)  # (N,)
    sqdist = torch.empty(n, dtype=torch.float32, device=x.device)  # (N,)
    step = chunk_rows or max(1, (1 << 24) // k)
    for s in range(0, n, step):
        xb = x[s:s + step].to(acc)  # (B, D)
        d = (xb * xb).sum(1, keepdim=True) - 2.0 * (xb @ c.T) + c_sq[None, :]  # (B, K)
        m, idx = d.min(dim=1)
        labels[s:s + step] = idx
        sqdist[s:s + step] = m.clamp_min(0).to(torch.float32)
    return labels, sqdist


# ---------------------------------------------------------------------------------------------------
# Triton kernel (imported lazily: importing this module does not import Triton)
# ---------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _assign_kernel():
    """Build the jit kernel once, on first use."""
    import triton
    import triton.language as tl

    @triton.jit
    def _kmeans_assign_kernel(
        x_ptr, c_ptr, c_sq_ptr, labels_ptr, sqdist_ptr,
        N, K, D,
        stride_xn, stride_xd, stride_ck, stride_cd,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) int64: N * D may pass 2^31
        row_mask = rows < N
        dcols = tl.arange(0, BLOCK_D)
        kcols = tl.arange(0, BLOCK_K)

        # ||x||^2 in fp32 (added once at the end; it does not change the argmin).
        x_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_idx = d0 + dcols
            xt = tl.load(x_ptr + rows[:, None] * stride_xn + d_idx[None, :] * stride_xd,
                         mask=row_mask[:, None] & (d_idx[None, :] < D), other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_D)
            x_sq += tl.sum(xt * xt, axis=1)

        best = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
        best_idx = tl.zeros((BLOCK_N,), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            k_idx = k0 + kcols
            k_mask = k_idx < K
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d_idx = d0 + dcols
                d_mask = d_idx < D
                xt = tl.load(x_ptr + rows[:, None] * stride_xn + d_idx[None, :] * stride_xd,
                             mask=row_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
                ct = tl.load(c_ptr + k_idx[None, :] * stride_ck + d_idx[:, None] * stride_cd,
                             mask=k_mask[None, :] & d_mask[:, None], other=0.0)  # (BLOCK_D, BLOCK_K)
                if UPCAST:
                    xt = xt.to(tl.float32)
                    ct = ct.to(tl.float32)
                if IEEE:
                    acc = tl.dot(xt, ct, acc, input_precision="ieee")
                else:
                    acc = tl.dot(xt, ct, acc)
            c_sq = tl.load(c_sq_ptr + k_idx, mask=k_mask, other=0.0)  # (BLOCK_K,)
            score = c_sq[None, :] - 2.0 * acc  # (BLOCK_N, BLOCK_K)
            score = tl.where(k_mask[None, :], score, float("inf"))
            tile_min = tl.min(score, axis=1)
            tile_arg = tl.argmin(score, axis=1, tie_break_left=True).to(tl.int32) + k0
            better = tile_min < best  # strict: an earlier (lower-index) tile keeps ties
            best = tl.where(better, tile_min, best)
            best_idx = tl.where(better, tile_arg, best_idx)

        sq = tl.maximum(x_sq + best, 0.0)
        tl.store(labels_ptr + rows, best_idx.to(tl.int64), mask=row_mask)
        tl.store(sqdist_ptr + rows, sq, mask=row_mask)

    return _kmeans_assign_kernel


def __getattr__(name: str):
    # ``bench.compile_sm90`` reads the jit function as a module attribute; build it on that first read.
    if name == "_kmeans_assign_kernel":
        return _assign_kernel()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _block_sizes(n: int, k: int, d: int, dtype: torch.dtype) -> dict:
    """Tile sizes: tensor-core friendly on the GPU, few (large) numpy ops in the interpreter."""
    from triton import next_power_of_2 as pow2
    if interpreting():
        return dict(BLOCK_N=min(128, max(16, pow2(n))), BLOCK_K=min(64, max(16, pow2(k))),
                    BLOCK_D=min(64, max(16, pow2(d))), num_warps=4, num_stages=1)
    wide = dtype == torch.float32  # fp32 tiles take twice the shared memory
    return dict(BLOCK_N=64 if n <= 4096 else 128, BLOCK_K=min(128, max(16, pow2(k))),
                BLOCK_D=32 if wide else 64, num_warps=8, num_stages=3)


def _kmeans_assign_triton(x: torch.Tensor, centroids: torch.Tensor):
    n, d = x.shape
    k = centroids.shape[0]
    if x.dtype == torch.float64:
        x = x.float()
    c = centroids.to(x.dtype)  # (K, D) one operand dtype for tl.dot
    c_sq = c.float().pow(2).sum(1).contiguous()  # (K,) fp32, from the cast centroids
    labels = torch.empty(n, dtype=torch.int64, device=x.device)  # (N,)
    sqdist = torch.empty(n, dtype=torch.float32, device=x.device)  # (N,)
    if n == 0:
        return labels, sqdist
    cfg = _block_sizes(n, k, d, x.dtype)
    grid = (cdiv(n, cfg["BLOCK_N"]),)
    _assign_kernel()[grid](
        x, c, c_sq, labels, sqdist, n, k, d,
        x.stride(0), x.stride(1), c.stride(0), c.stride(1),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"],
        UPCAST=interpreting() and x.dtype != torch.float32,
        IEEE=x.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **FP_FUSION,
    )
    LAUNCH_COUNTS["assign"] += 1
    return labels, sqdist


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor):
    """Nearest centroid of every row and the squared distance to it (lower index wins ties).

    Runs the Triton kernel on CUDA tensors (and on CPU tensors under ``TRITON_INTERPRET=1``), else the
    PyTorch reference. No gradient flows through the outputs (the assignment is piecewise constant).

    Args:
        x: points, fp32/bf16/fp16 (fp64 is computed in fp32 by the kernel).
        centroids: cluster centres, any float dtype (cast to ``x.dtype`` for the dot products).

    Shapes:
        x (N, D), centroids (K, D) -> labels int64 (N,), sqdist float32 (N,)
    """
    _check_inputs(x, centroids)
    if not use_triton(x, centroids):
        return kmeans_assign_reference(x, centroids)
    with torch.no_grad():
        return _kmeans_assign_triton(x.detach(), centroids.detach())
