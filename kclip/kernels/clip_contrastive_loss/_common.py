"""What the strategies share: the Triton tile helpers, the launch counter and overrides, the fp32 GEMM.

``_cosine_tile`` (a tile of A @ B.T, fp32 accumulation), the online-softmax step and the per-tile partials are
``@triton.jit`` helpers called by the kernels of ``fused.py``, ``chunked.py`` and ``resident.py``.
``_gemm_fp32`` is the one cuBLAS entry point of the chunked and resident strategies (fp32 result from any input
dtype: ``torch.mm(..., out_dtype=torch.float32)`` on CUDA, an fp32 product on CPU).
"""
from __future__ import annotations

import torch

from ..dispatch import interpreting

try:  # Triton is optional on CPU-only installs: the reference path still works.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None

# How many times the launchers ran a Triton kernel (tests assert the Triton path really ran). Read it as
# ``kclip.kernels.clip_contrastive_loss.TRITON_LAUNCHES``.
TRITON_LAUNCHES = 0

# Launch-parameter overrides for tuning sweeps (``bench_clip_contrastive_loss --tune``) and tests: {"stats": {...},
# "grad": {...}, "chunk": {...}, "resident": {...}} entries replace the heuristics' values. Empty in normal use.
LAUNCH_OVERRIDES: dict = {}


def _count(n: int = 1) -> None:
    """Add ``n`` Triton launches to the counter."""
    global TRITON_LAUNCHES
    TRITON_LAUNCHES += n


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs must match the fp32 reference: no TF32 on the GPU. Low precision uses tensor cores.
    return "ieee" if dtype == torch.float32 or interpreting() else "tf32"


def _row_outputs(n: int, device: torch.device):
    """Empty fp32 (n,) vectors for the row LSE, the weighted mean cosine w and the diagonal cosine."""
    lse = torch.empty(n, device=device, dtype=torch.float32)
    return lse, torch.empty_like(lse), torch.empty_like(lse)


def _gemm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = a @ b with fp32 accumulation and an fp32 result (cuBLAS ``out_dtype`` for bf16/fp16 on CUDA).

    Shapes: a (M, K), b (K, N) (transposed views are fine), out (M, N) fp32 contiguous.
    """
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)  # CPU (interpreter tests): the same products in fp32


def _all_gather_rows(x: torch.Tensor, process_group) -> torch.Tensor:
    """(N_p, ...) on each rank -> (P * N_p, ...) in rank order, no autograd."""
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(parts, x.contiguous(), group=process_group)
    return torch.cat(parts, dim=0)


if triton is not None:

    @triton.jit
    def _cosine_tile(a_rows, b_rows, row_mask, col_mask, D,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr):
        """A (BLOCK_M, BLOCK_N) tile of A @ B.T over D in BLOCK_K steps, fp32 accumulation (both passes use it)."""
        g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            if EVEN_K:  # D % BLOCK_K == 0: row/column masks only (fewer registers)
                a = tl.load(a_rows + ks[None, :], mask=row_mask[:, None], other=0.0)
                b = tl.load(b_rows + ks[None, :], mask=col_mask[:, None], other=0.0)
            else:
                k_mask = ks < D
                a = tl.load(a_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                b = tl.load(b_rows + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            g = tl.dot(a, tl.trans(b), g, input_precision=PRECISION)
        return g

    @triton.jit
    def _online_softmax_step(m, l, w, g, t, AXIS: tl.constexpr):
        """Fold one (BM, BN) tile of base-2 logits ``t`` (cosines ``g``) into the running max ``m``, sum of
        exponentials ``l`` and exponential-weighted cosine sum ``w`` of its rows (AXIS 1: the forward sweeps) or
        of its columns (AXIS 0: the chunked pair statistics)."""
        m_new = tl.maximum(m, tl.max(t, axis=AXIS))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(t - tl.expand_dims(m_new, AXIS))
        return m_new, l * alpha + tl.sum(p, axis=AXIS), w * alpha + tl.sum(p * g, axis=AXIS)

    @triton.jit
    def _tile_partial(t, g, valid, AXIS: tl.constexpr):
        """One tile's softmax partial per row (AXIS 1) or per column (AXIS 0): the max of the base-2 logits ``t``
        (a finite 0 where ``valid`` is false: padding, never stored), the sum of exp2(t - max) and that sum
        weighted by the cosines ``g``."""
        mx = tl.where(valid, tl.max(t, axis=AXIS), 0.0)
        p = tl.exp2(t - tl.expand_dims(mx, AXIS))
        return mx, tl.sum(p, axis=AXIS), tl.sum(p * g, axis=AXIS)

    @triton.jit
    def _store_partial(ptr, stride, mx, l, w, mask):
        """A partial's three fields into a (3, ...) buffer: max at ``ptr``, sum at ``+ stride``, weighted sum at
        ``+ 2 * stride``."""
        tl.store(ptr, mx, mask=mask)
        tl.store(ptr + stride, l, mask=mask)
        tl.store(ptr + 2 * stride, w, mask=mask)

    @triton.jit
    def _pair_probs(g, qk, ra, rb):
        """P^r + P^c of a tile: exp(S - r_i) + exp(S - c_j) in base 2 (``ra``, ``rb``: LSEs times log2(e))."""
        t = g * qk
        return tl.exp2(t - ra[:, None]) + tl.exp2(t - rb[None, :])
