"""Strategy ``"chunked"``: O(R N) workspace. cuBLAS GEMMs per chunk of R rows, Triton softmax kernels.

Per chunk of R rows of A, cuBLAS writes the cosines ``G = A_chunk @ B.T`` into an R x NB fp32 workspace
(``_gemm_fp32``) and Triton kernels sweep it. Forward without a process group: ONE GEMM per chunk serves both
directions (``_chunk_pair_stats_kernel`` folds the chunk's rows into running column statistics, chunks in a
fixed order, and leaves per-row partials that ``_chunk_row_combine_kernel`` reduces); distributed, each
direction runs its own row statistics (``_chunk_row_stats_kernel``). Backward, per direction and chunk, G is
recomputed, ``_chunk_probs_kernel`` writes ``P^r + P^c - 2 delta`` in the inputs' dtype and cuBLAS forms
``P @ B`` in fp32 (scaled by ``s g / (2N)``, cast once).

Matmuls (N x N x D each): 1 + 4 = 5 (6 distributed). Workspace: R x NB x (4 + itemsize) bytes + R x D fp32
+ the forward's O(R NB / PAIR_N) partials; R comes from the memory budget (``plan.py``) or ``_chunk_blocks``.
Deterministic: fixed chunk order, no atomics.
Launch option ``GEMM="triton"`` (``LAUNCH_OVERRIDES["chunk"]``): the chunk kernels compute their own cosine tiles
with ``tl.dot`` (``_chunk_tile_stats_kernel`` leaves per-tile partials in fixed slots), so G is never written.
"""
from __future__ import annotations

import torch

from ..dispatch import FP_FUSION, cdiv, interpreting
from ._common import LAUNCH_OVERRIDES, _count, _gemm_fp32, _precision, _row_outputs, tl, triton

if triton is not None:
    from ._common import _cosine_tile, _online_softmax_step, _pair_probs, _store_partial, _tile_partial

    @triton.jit
    def _chunk_row_stats_kernel(
        g_ptr, scale_ptr,                   # G (R, NB) fp32: cosines of this chunk's rows; s (1,)
        lse_ptr, w_ptr, diag_ptr,           # outputs (NA,) fp32 each; this chunk fills rows row0 .. row0 + R
        R, NB, row0, offset, stride_g,      # the positive of chunk row i is column row0 + i + offset
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Row LSE of s*G, softmax-weighted mean cosine w and the diagonal cosine, for BLOCK_M rows of G."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # chunk-local
        row_mask = rows < R
        g_rows = g_ptr + rows.to(tl.int64)[:, None] * stride_g
        qk = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_M,), tl.float32)
        w = tl.zeros((BLOCK_M,), tl.float32)
        for n0 in range(0, NB, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_mask = cols < NB
            g = tl.load(g_rows + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)  # (BM, BN)
            t = tl.where(col_mask[None, :], g * qk, float("-inf"))
            m, l, w = _online_softmax_step(m, l, w, g, t, 1)
        out = row0 + rows
        tl.store(lse_ptr + out, m * 0.6931471805599453 + tl.log(l), mask=row_mask)
        tl.store(w_ptr + out, w / l, mask=row_mask)
        diag = tl.load(g_ptr + rows.to(tl.int64) * stride_g + (out + offset), mask=row_mask, other=0.0)
        tl.store(diag_ptr + out, diag, mask=row_mask)

    @triton.jit
    def _chunk_pair_stats_kernel(
        g_ptr, scale_ptr,                   # G (R, NB) fp32: cosines of this chunk's rows against all columns
        part_ptr,                           # out (3, NCB, R) fp32: per (column block, row) max, sum, weighted sum
        col_m_ptr, col_l_ptr, col_w_ptr,    # (NB,) fp32 running column statistics (base-2 max), read and updated
        R, NB, NCB, stride_g,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """One read of G for both directions: fold the chunk's rows into the running column statistics of its
        BLOCK_N columns (a fixed chunk order: deterministic) and leave each row's partial over these columns."""
        pid = tl.program_id(0)
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < NB
        qk = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
        cm = tl.load(col_m_ptr + cols, mask=col_mask, other=0.0)
        cl = tl.load(col_l_ptr + cols, mask=col_mask, other=0.0)
        cw = tl.load(col_w_ptr + cols, mask=col_mask, other=0.0)
        for m0 in range(0, R, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_mask = rows < R
            mask = row_mask[:, None] & col_mask[None, :]
            g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * stride_g + cols[None, :], mask=mask, other=0.0)
            t = tl.where(mask, g * qk, float("-inf"))  # (BM, BN) base-2 logits; padding never counts
            # columns: the same online step as the rows', along axis 0 (padded columns see finite zeros: unused)
            tc = tl.where(col_mask[None, :], t, 0.0)
            cm, cl, cw = _online_softmax_step(cm, cl, cw, g, tc, 0)
            # rows: this tile's partial over the block's columns (padded rows: a finite max, sums of 0, not stored)
            rm, rl, rw = _tile_partial(t, g, row_mask, 1)
            _store_partial(part_ptr + pid * R + rows, R * NCB, rm, rl, rw, row_mask)  # contiguous rows: coalesced
        tl.store(col_m_ptr + cols, cm, mask=col_mask)
        tl.store(col_l_ptr + cols, cl, mask=col_mask)
        tl.store(col_w_ptr + cols, cw, mask=col_mask)

    @triton.jit
    def _chunk_row_combine_kernel(
        part_ptr, g_ptr,                    # partials (3, NCB, R) of _chunk_pair_stats_kernel; G (R, NB) fp32
        lse_ptr, w_ptr, diag_ptr,           # outputs (NA,) fp32; this chunk fills rows row0 .. row0 + R
        R, NCB, row0, stride_g,
        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, LOAD_DIAG: tl.constexpr = True,
    ):
        """Row LSE, w (and with LOAD_DIAG the diagonal cosine, from G) of BLOCK_M rows from their per-column-block
        partials, in block order."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < R
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_M,), tl.float32)
        w = tl.zeros((BLOCK_M,), tl.float32)
        for c0 in range(0, NCB, BLOCK_C):
            cb = c0 + tl.arange(0, BLOCK_C)
            mask = row_mask[:, None] & (cb < NCB)[None, :]
            part = part_ptr + cb[None, :] * R + rows[:, None]
            pm = tl.load(part, mask=mask, other=float("-inf"))
            pl = tl.load(part + R * NCB, mask=mask, other=0.0)
            pw = tl.load(part + 2 * R * NCB, mask=mask, other=0.0)
            m_new = tl.maximum(m, tl.max(pm, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padded rows: keep them finite
            scale = tl.exp2(pm - m_safe[:, None])
            alpha = tl.exp2(m - m_safe)
            l = l * alpha + tl.sum(pl * scale, axis=1)
            w = w * alpha + tl.sum(pw * scale, axis=1)
            m = m_new
        out = row0 + rows
        l = tl.where(row_mask, l, 1.0)  # padded rows: finite, never stored
        tl.store(lse_ptr + out, m * 0.6931471805599453 + tl.log(l), mask=row_mask)
        tl.store(w_ptr + out, w / l, mask=row_mask)
        if LOAD_DIAG:
            diag = tl.load(g_ptr + rows.to(tl.int64) * stride_g + out, mask=row_mask, other=0.0)
            tl.store(diag_ptr + out, diag, mask=row_mask)

    @triton.jit
    def _chunk_probs_kernel(
        g_ptr, p_ptr, lse_a_ptr, lse_b_ptr, scale_ptr,  # G (R, NB) fp32 -> P (R, NB) in the inputs' dtype
        a_ptr, b_ptr,                                   # TILE_GEMM: A (NA, D), B (NB, D) instead of G
        R, NB, D, row0, offset, stride_g, stride_p, stride_a, stride_b,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE_GEMM: tl.constexpr = False, BLOCK_K: tl.constexpr = 64,
        UPCAST: tl.constexpr = False, PRECISION: tl.constexpr = "tf32", EVEN_K: tl.constexpr = True,
    ):
        """P[i, j] = exp(S_ij - lseA_i) + exp(S_ij - lseB_j) - 2 delta_ij for one (BLOCK_M, BLOCK_N) tile; the
        cosines are read from G, or (TILE_GEMM) computed here from the chunk's rows of A and B (no G at all)."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # chunk-local
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < R
        col_mask = cols < NB
        mask = row_mask[:, None] & col_mask[None, :]
        qk = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
        ra = tl.load(lse_a_ptr + row0 + rows, mask=row_mask, other=float("inf")) * 1.4426950408889634
        rb = tl.load(lse_b_ptr + cols, mask=col_mask, other=float("inf")) * 1.4426950408889634
        if TILE_GEMM:
            g = _cosine_tile(a_ptr + (row0 + rows).to(tl.int64)[:, None] * stride_a,
                             b_ptr + cols.to(tl.int64)[:, None] * stride_b, row_mask, col_mask, D,
                             BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION, EVEN_K)
        else:
            g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * stride_g + cols[None, :], mask=mask, other=0.0)
        p = _pair_probs(g, qk, ra, rb)
        p = tl.where((row0 + rows + offset)[:, None] == cols[None, :], p - 2.0, p)
        tl.store(p_ptr + rows.to(tl.int64)[:, None] * stride_p + cols[None, :], p.to(p_ptr.dtype.element_ty),
                 mask=mask)

    @triton.jit
    def _chunk_tile_stats_kernel(
        a_ptr, b_ptr, scale_ptr,            # A (NA, D): this chunk is rows row0 .. row0 + R; B (NB, D)
        row_part_ptr, col_part_ptr,         # out (3, NCB, R) and (3, NRB, NB) fp32: max, sum, weighted sum
        diag_ptr,                           # out (NA,) fp32: the diagonal cosine of the chunk's rows
        R, NB, D, row0, offset, stride_a, stride_b, NCB, NRB,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr, STORE_COLS: tl.constexpr,
    ):
        """The forward of the chunked strategy with the GEMM in Triton (``GEMM="triton"``): one program per
        (BLOCK_M, BLOCK_N) tile of the chunk's cosines computes it and leaves, for each of its rows and (with
        STORE_COLS) each of its columns, the tile's partial (max, sum of exponentials, weighted sum) in a fixed
        slot: the cosines never reach memory, and the partials are combined in a fixed order (deterministic)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # chunk-local
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < R
        col_mask = cols < NB
        g = _cosine_tile(a_ptr + (row0 + rows).to(tl.int64)[:, None] * stride_a,
                         b_ptr + cols.to(tl.int64)[:, None] * stride_b, row_mask, col_mask, D,
                         BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION, EVEN_K)
        qk = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
        t = tl.where(row_mask[:, None] & col_mask[None, :], g * qk, float("-inf"))  # (BM, BN) base-2 logits
        rm, rl, rw = _tile_partial(t, g, row_mask, 1)
        _store_partial(row_part_ptr + pid_n * R + rows, R * NCB, rm, rl, rw, row_mask)
        if STORE_COLS:
            cm, cl, cw = _tile_partial(t, g, col_mask, 0)
            _store_partial(col_part_ptr + pid_m * NB + cols, NB * NRB, cm, cl, cw, col_mask)
        # the positive of chunk row i is column row0 + i + offset: the one tile holding it stores the cosine
        dcol = row0 + rows + offset
        here = row_mask & (dcol >= pid_n * BLOCK_N) & (dcol < pid_n * BLOCK_N + BLOCK_N)
        diag = tl.sum(tl.where(cols[None, :] == dcol[:, None], g, 0.0), axis=1)
        tl.store(diag_ptr + row0 + rows, diag, mask=here)

    @triton.jit
    def _chunk_col_combine_kernel(
        col_part_ptr,                       # (3, NRB, NB) fp32 partials of _chunk_tile_stats_kernel
        col_m_ptr, col_l_ptr, col_w_ptr,    # (NB,) fp32 running column statistics (base-2 max), read and updated
        NB, NRB,
        BLOCK_N: tl.constexpr,
    ):
        """Fold one chunk's column partials into the running column statistics, row block by row block."""
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < NB
        cm = tl.load(col_m_ptr + cols, mask=col_mask, other=0.0)
        cl = tl.load(col_l_ptr + cols, mask=col_mask, other=0.0)
        cw = tl.load(col_w_ptr + cols, mask=col_mask, other=0.0)
        for rb in range(0, NRB):
            part = col_part_ptr + rb * NB + cols
            pm = tl.load(part, mask=col_mask, other=0.0)
            m_new = tl.maximum(cm, pm)
            alpha = tl.exp2(cm - m_new)
            beta = tl.exp2(pm - m_new)
            cl = cl * alpha + tl.load(part + NB * NRB, mask=col_mask, other=0.0) * beta
            cw = cw * alpha + tl.load(part + 2 * NB * NRB, mask=col_mask, other=0.0) * beta
            cm = m_new
        tl.store(col_m_ptr + cols, cm, mask=col_mask)
        tl.store(col_l_ptr + cols, cl, mask=col_mask)
        tl.store(col_w_ptr + cols, cw, mask=col_mask)


def _chunk_blocks(D: int, rows: int | None = None):
    """Chunk rows R (the workspace is R x NB: fp32 cosines + probabilities in the inputs' dtype), the smallest
    chunk the planner picks (min_rows) and the tiles of the chunk kernels (STATS: row statistics, PAIR/COMBINE:
    both directions' forward statistics, PROBS: the backward probabilities). R = 1024 keeps the workspace at 6 KiB
    per sample in bf16, whatever N; ``rows`` (a budgeted chunk) replaces it. ``LAUNCH_OVERRIDES["chunk"]`` wins
    over both (tuning, tests). GPU tiles are sm_90 guesses until ``--tune --tune-set chunk`` times them."""
    if interpreting():  # small chunks so tests cross several chunks, row blocks and column tiles
        base = dict(rows=16, min_rows=4, STATS_M=4, STATS_N=16, PAIR_M=4, PAIR_N=8, COMBINE_M=4, COMBINE_C=4,
                    PROBS_M=8, PROBS_N=16, num_warps=4, GEMM="cublas", TILE_M=8, TILE_N=16, TILE_K=16, TILE_WARPS=4,
                    TILE_STAGES=1)
    else:
        base = dict(rows=1024, min_rows=64, STATS_M=2, STATS_N=1024, PAIR_M=32, PAIR_N=64, COMBINE_M=16,
                    COMBINE_C=64, PROBS_M=32, PROBS_N=128, num_warps=4, GEMM="cublas", TILE_M=128, TILE_N=128,
                    TILE_K=64, TILE_WARPS=8, TILE_STAGES=3)
    if rows is not None:
        base["rows"] = max(1, int(rows))
    cfg = {**base, **LAUNCH_OVERRIDES.get("chunk", {})}
    if cfg["GEMM"] not in ("cublas", "triton"):
        raise ValueError(f"clip_contrastive_loss: chunk GEMM must be 'cublas' or 'triton', got {cfg['GEMM']!r}")
    return cfg


def _tile_gemm_args(a: torch.Tensor, cfg: dict) -> dict:
    """Launch arguments of the chunk kernels that compute their cosine tiles themselves (``GEMM="triton"``)."""
    return dict(BLOCK_M=cfg["TILE_M"], BLOCK_N=cfg["TILE_N"], BLOCK_K=cfg["TILE_K"],
                UPCAST=interpreting() and a.dtype != torch.float32, PRECISION=_precision(a.dtype),
                EVEN_K=a.shape[1] % cfg["TILE_K"] == 0, num_warps=cfg["TILE_WARPS"], num_stages=cfg["TILE_STAGES"])


def _cosine_chunks(a: torch.Tensor, b: torch.Tensor, rows: int, cublas: bool = True):
    """Yield (row0, r, G) per chunk of ``rows`` rows of a, in order: G[:r] = a[row0:row0 + r] @ b.T in fp32, by
    cuBLAS into one (rows, NB) fp32 workspace reused by every chunk (valid until the next chunk). With
    ``cublas=False`` (the kernels compute their own tiles) only (row0, r, None): no GEMM, no workspace."""
    g = torch.empty(rows, b.shape[0], device=a.device, dtype=torch.float32) if cublas else None  # (R, NB)
    bt = b.T  # (D, NB) view
    for row0 in range(0, a.shape[0], rows):
        r = min(rows, a.shape[0] - row0)
        if cublas:
            _gemm_fp32(a[row0:row0 + r], bt, g[:r])
        yield row0, r, g


def _tile_stats(a, b, scale, diag, row_part, col_part, row0: int, r: int, offset: int, cfg: dict,
                store_cols: bool) -> tuple[int, int]:
    """Launch ``_chunk_tile_stats_kernel`` for chunk rows row0 .. row0 + r; returns its (NCB, NRB)."""
    ncb, nrb = cdiv(b.shape[0], cfg["TILE_N"]), cdiv(r, cfg["TILE_M"])
    _chunk_tile_stats_kernel[(nrb, ncb)](
        a, b, scale, row_part, col_part, diag, r, b.shape[0], a.shape[1], row0, offset, a.stride(0), b.stride(0),
        ncb, nrb, STORE_COLS=store_cols, **_tile_gemm_args(a, cfg), **FP_FUSION)
    return ncb, nrb


def _row_stats_chunked(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, offset: int, rows: int | None = None):
    """As ``_row_stats_fused``; per chunk of R rows of a, G = a_chunk @ b.T by cuBLAS into an R x NB fp32
    workspace, then one Triton sweep over G for the row LSE, w and the diagonal."""
    NA, D = a.shape
    NB = b.shape[0]
    lse, w, diag = _row_outputs(NA, a.device)  # (NA,) each
    cfg = _chunk_blocks(D, rows)
    rows = min(NA, cfg["rows"])
    if cfg["GEMM"] == "triton":  # tiles compute their cosines: row partials, then one combine per chunk
        row_part = torch.empty(3 * cdiv(NB, cfg["TILE_N"]) * rows, device=a.device, dtype=torch.float32)
        for row0, r, _ in _cosine_chunks(a, b, rows, cublas=False):
            ncb, _ = _tile_stats(a, b, scale, diag, row_part, row_part, row0, r, offset, cfg, store_cols=False)
            _chunk_row_combine_kernel[(cdiv(r, cfg["COMBINE_M"]),)](
                row_part, row_part, lse, w, diag, r, ncb, row0, 0,
                BLOCK_M=cfg["COMBINE_M"], BLOCK_C=cfg["COMBINE_C"], LOAD_DIAG=False, num_warps=cfg["num_warps"],
                **FP_FUSION)
            _count(2)
        return lse, w, diag
    return _row_stats_sweep(_cosine_chunks(a, b, rows), scale, (lse, w, diag), NB, offset, cfg)


def _row_stats_sweep(chunks, scale, out, NB: int, offset: int, cfg: dict):
    """Row LSE, w and diagonal cosine of the rows of each chunk (row0, r, G) of fp32 cosines (G: r x NB rows,
    any row stride) into ``out`` = (lse, w, diag), one ``_chunk_row_stats_kernel`` launch per chunk."""
    lse, w, diag = out
    for row0, r, g in chunks:
        _chunk_row_stats_kernel[(cdiv(r, cfg["STATS_M"]),)](
            g, scale, lse, w, diag, r, NB, row0, offset, g.stride(0),
            BLOCK_M=cfg["STATS_M"], BLOCK_N=cfg["STATS_N"], num_warps=cfg["num_warps"], **FP_FUSION)
        _count(1)
    return lse, w, diag


def _pair_stats_chunked(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, rows: int | None = None):
    """Both directions' statistics of s * a @ b.T (no process group) from ONE GEMM per chunk of rows of a: the
    row statistics of a (LSE, w, diagonal) and the column statistics (the row statistics of b against a).

    Shapes: a (N, D), b (N, D), scale (1,) fp32 -> (r, w_r, diag, c, w_c), fp32 (N,) each.
    """
    NA, D = a.shape
    NB = b.shape[0]
    cfg = _chunk_blocks(D, rows)
    rows = min(NA, cfg["rows"])
    if cfg["GEMM"] == "cublas":
        return _pair_stats_sweep(_cosine_chunks(a, b, rows), scale, NA, NB, rows, cfg)
    # GEMM="triton": tiles compute their cosines and leave row and column partials
    lse, w, diag = _row_outputs(NA, a.device)  # (NA,) each
    col = torch.zeros(3, NB, device=a.device, dtype=torch.float32)  # (3, NB) running base-2 max, sum, w-sum
    col[0].fill_(float("-inf"))
    combine = dict(BLOCK_M=cfg["COMBINE_M"], BLOCK_C=cfg["COMBINE_C"], num_warps=cfg["num_warps"])
    row_part = torch.empty(3 * cdiv(NB, cfg["TILE_N"]) * rows, device=a.device, dtype=torch.float32)
    col_part = torch.empty(3 * cdiv(rows, cfg["TILE_M"]) * NB, device=a.device, dtype=torch.float32)
    for row0, r, _ in _cosine_chunks(a, b, rows, cublas=False):  # fixed chunk order: deterministic
        ncb, nrb = _tile_stats(a, b, scale, diag, row_part, col_part, row0, r, 0, cfg, store_cols=True)
        _chunk_row_combine_kernel[(cdiv(r, cfg["COMBINE_M"]),)](
            row_part, row_part, lse, w, diag, r, ncb, row0, 0, LOAD_DIAG=False, **combine, **FP_FUSION)
        _chunk_col_combine_kernel[(cdiv(NB, cfg["PAIR_N"]),)](
            col_part, col[0], col[1], col[2], NB, nrb, BLOCK_N=cfg["PAIR_N"], num_warps=cfg["num_warps"],
            **FP_FUSION)
        _count(3)
    col_lse = col[0] * 0.6931471805599453 + torch.log(col[1])  # (NB,)
    return lse, w, diag, col_lse, col[2] / col[1]


def _pair_stats_sweep(chunks, scale, NA: int, NB: int, rows: int, cfg: dict):
    """Both directions' statistics from the chunks (row0, r, G) of fp32 cosines that cover rows 0 .. NA of
    s * a @ b.T in order (G: r x NB, any row stride; at most ``rows`` rows each): the row statistics of a and the
    running column statistics, folded chunk after chunk (a fixed order: deterministic).

    Returns (r, w_r, diag, c, w_c), fp32 (NA,) and (NB,) vectors.
    """
    device = scale.device
    lse, w, diag = _row_outputs(NA, device)  # (NA,) each
    col = torch.zeros(3, NB, device=device, dtype=torch.float32)  # (3, NB) running base-2 max, sum, w-sum
    col[0].fill_(float("-inf"))
    combine = dict(BLOCK_M=cfg["COMBINE_M"], BLOCK_C=cfg["COMBINE_C"], num_warps=cfg["num_warps"])
    ncb = cdiv(NB, cfg["PAIR_N"])
    part = torch.empty(3, ncb, rows, device=device, dtype=torch.float32)  # (3, NCB, R) row partials
    for row0, r, g in chunks:
        _chunk_pair_stats_kernel[(ncb,)](
            g, scale, part, col[0], col[1], col[2], r, NB, ncb, g.stride(0),
            BLOCK_M=cfg["PAIR_M"], BLOCK_N=cfg["PAIR_N"], num_warps=cfg["num_warps"], **FP_FUSION)
        _chunk_row_combine_kernel[(cdiv(r, cfg["COMBINE_M"]),)](part, g, lse, w, diag, r, ncb, row0,
                                                                 g.stride(0), **combine, **FP_FUSION)
        _count(2)
    col_lse = col[0] * 0.6931471805599453 + torch.log(col[1])  # (NB,)
    return lse, w, diag, col_lse, col[2] / col[1]


def _grad_chunked(a, b, lse_a, lse_b, scale, coef, offset: int, rows: int | None = None) -> torch.Tensor:
    """As ``_grad_fused``; per chunk of R rows of a: G by cuBLAS, P = P^r + P^c - 2 delta by a Triton kernel
    into the inputs' dtype, then dA_chunk = s * coef * (P @ b) by cuBLAS (fp32 result, scaled, cast once)."""
    NA, D = a.shape
    NB = b.shape[0]
    da = torch.empty_like(a)  # (NA, D)
    cfg = _chunk_blocks(D, rows)
    rows = min(NA, cfg["rows"])
    p = torch.empty(rows, NB, device=a.device, dtype=a.dtype)  # (R, NB) P^r + P^c - 2 delta
    acc = torch.empty(rows, D, device=a.device, dtype=torch.float32)  # (R, D) P @ b in fp32
    factor = scale * coef  # (1,) s * g / (2N), on device: no host sync
    tile = cfg["GEMM"] == "triton"
    for row0, r, g in _cosine_chunks(a, b, rows, cublas=not tile):
        if tile:  # the kernel computes its cosine tiles itself: no G
            kw = _tile_gemm_args(a, cfg)
            grid = (cdiv(r, kw["BLOCK_M"]), cdiv(NB, kw["BLOCK_N"]))
            _chunk_probs_kernel[grid](p, p, lse_a, lse_b, scale, a, b, r, NB, D, row0, offset, 0, p.stride(0),
                                      a.stride(0), b.stride(0), TILE_GEMM=True, **kw, **FP_FUSION)
            _count(1)
        else:
            _probs(g, p, lse_a, lse_b, scale, a, b, r, row0, offset, cfg)
        _gemm_fp32(p[:r], b, acc[:r])
        torch.mul(acc[:r], factor, out=da[row0:row0 + r])
    return da


def _probs(g, p, lse_a, lse_b, scale, a, b, r: int, row0: int, offset: int, cfg: dict) -> None:
    """P[:r] = P^r + P^c - 2 delta of rows row0 .. row0 + r from their fp32 cosines G[:r] (``p`` in the inputs'
    dtype; ``p`` may alias ``g`` element for element: each tile is read before it is written)."""
    grid = (cdiv(r, cfg["PROBS_M"]), cdiv(g.shape[1], cfg["PROBS_N"]))
    _chunk_probs_kernel[grid](
        g, p, lse_a, lse_b, scale, a, b, r, g.shape[1], a.shape[1], row0, offset, g.stride(0), p.stride(0),
        a.stride(0), b.stride(0), BLOCK_M=cfg["PROBS_M"], BLOCK_N=cfg["PROBS_N"], num_warps=cfg["num_warps"],
        **FP_FUSION)
    _count(1)
