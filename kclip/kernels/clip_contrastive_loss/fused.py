"""Strategy ``"fused"``: zero workspace. Tile kernels compute S with ``tl.dot`` and never write it.

Forward: ``_row_stats_kernel`` (one program per BLOCK_M rows of A, an online base-2 softmax over column tiles)
gives the row LSE, the softmax-weighted mean cosine w and the diagonal cosine; it runs once per direction.
Backward: ``_grad_kernel``, one program per (row block of A, chunk of D), recomputes S tile by tile, forms
``P^r + P^c`` and accumulates ``P @ B`` in fp32; the ``-2 delta`` term is a rank-1 epilogue. D <= 512 is one
chunk; wider D goes in 256-wide chunks, each recomputing its S tiles.

Matmuls (N x N x D each): forward 2, backward 2 x (D chunks + 1): 6 at D <= 512, 10 at D = 768.
Memory: O(N) fp32 statistics beyond the inputs and gradients. Deterministic: no atomics.
Launch options ``FLATTEN`` (one pipelined loop over (column tile, D step)) and ``PREFETCH`` (the B rows and column
LSE issued before the S tile) reorder work only; GPU block sizes are fixed heuristics (``--tune`` sweeps them).
"""
from __future__ import annotations

import torch

from ..dispatch import FP_FUSION, cdiv, interpreting
from ._common import LAUNCH_OVERRIDES, _count, _precision, _row_outputs, tl, triton

if triton is not None:
    from ._common import _cosine_tile, _online_softmax_step, _pair_probs

    @triton.jit
    def _column_tile(lse_b_ptr, b_rows, cols, col_mask, dcols, d_mask):
        """What the gradient kernel needs of one column tile besides its S tile: the column LSE in base 2
        (padded columns +inf, so their probabilities are exactly 0) and the (BLOCK_N, BLOCK_DO) chunk of B rows."""
        rb = tl.load(lse_b_ptr + cols, mask=col_mask, other=float("inf")) * 1.4426950408889634
        bo = tl.load(b_rows + dcols[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        return rb, bo

    @triton.jit
    def _row_stats_kernel(
        a_ptr, b_ptr, scale_ptr,            # A (NA, D), B (NB, D), s (1,)
        lse_ptr, w_ptr, diag_ptr,           # outputs (NA,) fp32 each
        NA, NB, D, offset,                  # positive pair of row i is column i + offset
        stride_a, stride_b,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr, FLATTEN: tl.constexpr = False,
    ):
        """Row LSE of s*A@B.T, softmax-weighted mean cosine w, and diagonal cosine, for BLOCK_M rows."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < NA
        a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_a  # (BM, 1) pointers, int64 offsets
        qk = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634  # logits in base 2

        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_M,), tl.float32)
        w = tl.zeros((BLOCK_M,), tl.float32)
        for n0 in tl.range(0, NB, BLOCK_N, flatten=FLATTEN):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_mask = cols < NB
            b_rows = b_ptr + cols.to(tl.int64)[:, None] * stride_b
            g = _cosine_tile(a_rows, b_rows, row_mask, col_mask, D,  # (BM, BN) cosines of this tile
                             BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION, EVEN_K)
            t = tl.where(col_mask[None, :], g * qk, float("-inf"))  # (BM, BN) base-2 logits
            m, l, w = _online_softmax_step(m, l, w, g, t, 1)

        lse = m * 0.6931471805599453 + tl.log(l)
        tl.store(lse_ptr + rows, lse, mask=row_mask)
        tl.store(w_ptr + rows, w / l, mask=row_mask)

        # Diagonal cosine A_i . B_{i+offset}: an O(BM * D) epilogue instead of a mask in every tile.
        b_diag = b_ptr + (rows.to(tl.int64) + offset)[:, None] * stride_b
        d = tl.zeros((BLOCK_M,), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            msk = row_mask[:, None] & (ks < D)[None, :]
            a = tl.load(a_rows + ks[None, :], mask=msk, other=0.0).to(tl.float32)
            b = tl.load(b_diag + ks[None, :], mask=msk, other=0.0).to(tl.float32)
            d += tl.sum(a * b, axis=1)
        tl.store(diag_ptr + rows, d, mask=row_mask)

    @triton.jit
    def _grad_kernel(
        a_ptr, b_ptr, lse_a_ptr, lse_b_ptr, scale_ptr, coef_ptr,  # coef = g / (2N), device scalar
        da_ptr,                                                   # output (NA, D) in A's dtype
        NA, NB, D, offset,
        stride_a, stride_b, stride_da,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr, FLATTEN: tl.constexpr = False,
        PREFETCH: tl.constexpr = False,
    ):
        """dA[rows, d-chunk] = s*coef * (sum_j (exp(S_ij - lseA_i) + exp(S_ij - lseB_j)) B_j - 2 B_{i+off})."""
        pid_m = tl.program_id(0)
        pid_d = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < NA
        a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_a
        s = tl.load(scale_ptr).to(tl.float32)
        coef = tl.load(coef_ptr).to(tl.float32)
        qk = s * 1.4426950408889634
        # padded rows get +inf so their probabilities are exactly 0 (no inf * 0 = nan)
        ra = tl.load(lse_a_ptr + rows, mask=row_mask, other=float("inf")) * 1.4426950408889634
        dcols = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
        d_mask = dcols < D

        acc = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
        for n0 in tl.range(0, NB, BLOCK_N, flatten=FLATTEN):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_mask = cols < NB
            b_rows = b_ptr + cols.to(tl.int64)[:, None] * stride_b
            if PREFETCH:
                rb, bo = _column_tile(lse_b_ptr, b_rows, cols, col_mask, dcols, d_mask)
            g = _cosine_tile(a_rows, b_rows, row_mask, col_mask, D,  # (BM, BN) cosines of this tile
                             BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION, EVEN_K)
            if not PREFETCH:
                rb, bo = _column_tile(lse_b_ptr, b_rows, cols, col_mask, dcols, d_mask)
            p = tl.where(col_mask[None, :], _pair_probs(g, qk, ra, rb), 0.0)  # (BM, BN) P^r + P^c
            if UPCAST:
                bo = bo.to(tl.float32)
            acc = tl.dot(p.to(bo.dtype), bo, acc, input_precision=PRECISION)

        # -2 delta_ij term: row i's positive is B_{i+offset}.
        b_diag = b_ptr + (rows.to(tl.int64) + offset)[:, None] * stride_b
        out_mask = row_mask[:, None] & d_mask[None, :]
        bd = tl.load(b_diag + dcols[None, :], mask=out_mask, other=0.0).to(tl.float32)
        acc = (acc - 2.0 * bd) * (s * coef)
        da_rows = da_ptr + rows.to(tl.int64)[:, None] * stride_da
        tl.store(da_rows + dcols[None, :], acc.to(da_ptr.dtype.element_ty), mask=out_mask)


def _stats_blocks(D: int):
    if interpreting():  # small tiles so tests cross several row/column/K tiles
        return {**dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1),
                **LAUNCH_OVERRIDES.get("stats", {})}
    return {**dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3), **LAUNCH_OVERRIDES.get("stats", {})}


def _grad_blocks(D: int):
    if interpreting():
        return {**dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, BLOCK_DO=32, num_warps=4, num_stages=1),
                **LAUNCH_OVERRIDES.get("grad", {})}
    # The fp32 accumulator is BLOCK_M x BLOCK_DO registers; D above 512 is split into chunks (each
    # chunk recomputes its S tiles). D <= 512: (64, 32, 512) keeps D=512 in one chunk (254 registers, no
    # spills when compiled as launched: bench/compile_sm90.py) and was the fastest of the --tune candidates
    # on an H200 at D=512. FLATTEN / PREFETCH (kernel docstring) stay off until a GPU run times them.
    block_do = min(512, max(16, triton.next_power_of_2(D)))
    block_m = 128 if block_do <= 128 else 64
    block_n = 64 if block_do <= 128 else 32
    if D > 512:
        # Measured on an H200 (bench_clip_contrastive_loss --tune, N=32768, bf16; bench/results): at D=768,
        # three 256-wide chunks with (64, 64) tiles run the backward 18% faster than two 512-wide chunks
        # (129 vs 157 ms fwd+bwd), identical results; at D=512 the single 512-wide chunk stays best.
        block_do, block_m, block_n = 256, 64, 64
    return {**dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64, BLOCK_DO=block_do, num_warps=8, num_stages=2),
            **LAUNCH_OVERRIDES.get("grad", {})}


def _row_stats_fused(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, offset: int):
    """Row LSE, weighted mean cosine and diagonal cosine of s * a @ b.T (fused: S tiles never leave the kernel).

    Shapes: a (NA, D), b (NB, D), scale (1,) fp32 -> three fp32 (NA,) vectors.
    """
    NA, D = a.shape
    NB = b.shape[0]
    lse, w, diag = _row_outputs(NA, a.device)  # (NA,) each
    cfg = _stats_blocks(D)
    grid = (cdiv(NA, cfg["BLOCK_M"]),)
    _row_stats_kernel[grid](
        a, b, scale, lse, w, diag, NA, NB, D, offset, a.stride(0), b.stride(0),
        UPCAST=interpreting() and a.dtype != torch.float32, PRECISION=_precision(a.dtype),
        EVEN_K=D % cfg["BLOCK_K"] == 0, **cfg, **FP_FUSION)
    _count()
    return lse, w, diag


def _grad_fused(a, b, lse_a, lse_b, scale, coef, offset: int) -> torch.Tensor:
    """dA = s * coef * ((P^r + P^c) @ b - 2 b[offset + i]) without forming P (fused).

    Shapes: a (NA, D), b (NB, D), lse_a (NA,), lse_b (NB,), scale/coef (1,) fp32 -> (NA, D) in a.dtype.
    """
    NA, D = a.shape
    NB = b.shape[0]
    da = torch.empty_like(a)  # (NA, D)
    cfg = _grad_blocks(D)
    grid = (cdiv(NA, cfg["BLOCK_M"]), cdiv(D, cfg["BLOCK_DO"]))
    _grad_kernel[grid](
        a, b, lse_a, lse_b, scale, coef, da, NA, NB, D, offset, a.stride(0), b.stride(0), da.stride(0),
        UPCAST=interpreting() and a.dtype != torch.float32, PRECISION=_precision(a.dtype),
        EVEN_K=D % cfg["BLOCK_K"] == 0, **cfg, **FP_FUSION)
    _count()
    return da
