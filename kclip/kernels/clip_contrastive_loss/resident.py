"""Strategy ``"resident"``: 3 GEMM-equivalents. S is computed once, and its gradient is formed in the forward.

Forward: cuBLAS writes the cosines ``G = I @ T.T`` (N x N fp32, ``_gemm_fp32``); the chunked strategy's
``_chunk_pair_stats_kernel`` / ``_chunk_row_combine_kernel`` sweep G in row blocks for the row and column
statistics (r, c, w and the diagonal); then ``_chunk_probs_kernel`` overwrites G with
``dS' = P^r + P^c - 2 delta`` in the inputs' dtype (the gradient is known in the forward, as in Liger-Kernel's
fused linear cross-entropy). Backward is two cuBLAS GEMMs with fp32 results, scaled by ``s g / (2N)`` and cast
once: ``dI = dS' @ T`` and ``dT = dS'.T @ I``.

In place: fp32 dS' takes each element's own slot. A 2-byte dS' is packed into the first half of G's bytes: its
rows [r0, r1) land on G rows below r0, so rows are converted in blocks [b, 2b), [2b, 4b), ... after the first
block, which goes to a small scratch buffer (b rows) copied in last. Every G row is read before it is overwritten.

Distributed (P ranks, local rows): as open_clip's ``local_loss``, rank p keeps two N_p x N buffers,
``I_p @ T_all.T`` (its rows of S) and ``T_p @ I_all.T`` (its columns); row statistics of each are all-gathered
(O(N)) before dS' is formed, so each rank's gradients need no collective in backward: 4 GEMM-eq in all.

Workspace (``plan.py``): k x N_p x N x 4 bytes (k = 1, or 2 distributed), a b x N scratch for 2-byte inputs,
O(N b / PAIR_N) statistics partials and an N_p x D fp32 accumulator. Deterministic: fixed block order, no atomics.
"""
from __future__ import annotations

import torch

from ..dispatch import interpreting
from ._common import LAUNCH_OVERRIDES, _gemm_fp32, _row_outputs
from .chunked import _chunk_blocks, _pair_stats_sweep, _probs, _row_stats_sweep


def _resident_blocks(D: int) -> dict:
    """The chunk kernels' tiles (``_chunk_blocks``) and ``rows``: the row block of the statistics sweep and the
    first (scratch) block of the in-place dS'. ``LAUNCH_OVERRIDES["resident"]`` replaces values (tuning, tests)."""
    cfg = dict(_chunk_blocks(D))
    cfg["rows"] = 8 if interpreting() else 1024  # interpreter: several blocks at test sizes
    return {**cfg, **LAUNCH_OVERRIDES.get("resident", {})}


def _row_blocks(g: torch.Tensor, rows: int):
    """(row0, r, G[row0:row0 + r]) for consecutive blocks of ``rows`` rows of a resident G."""
    for row0 in range(0, g.shape[0], rows):
        r = min(rows, g.shape[0] - row0)
        yield row0, r, g[row0:row0 + r]


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """G = a @ b.T in fp32 (one GEMM). Shapes: a (NA, D), b (NB, D) -> (NA, NB) fp32."""
    g = torch.empty(a.shape[0], b.shape[0], device=a.device, dtype=torch.float32)  # (NA, NB)
    return _gemm_fp32(a, b.T, g)


def pair_stats(g: torch.Tensor, scale: torch.Tensor, D: int):
    """Row and column statistics of s * G (no process group): (r, w_r, diag, c, w_c), fp32 vectors."""
    cfg = _resident_blocks(D)
    rows = min(g.shape[0], cfg["rows"])
    return _pair_stats_sweep(_row_blocks(g, rows), scale, g.shape[0], g.shape[1], rows, cfg)


def row_stats(g: torch.Tensor, scale: torch.Tensor, offset: int, D: int):
    """Row statistics of s * G whose row i pairs with column i + offset: (lse, w, diag), fp32 (NA,) each."""
    cfg = _resident_blocks(D)
    out = _row_outputs(g.shape[0], g.device)  # (NA,) each
    return _row_stats_sweep(_row_blocks(g, min(g.shape[0], cfg["rows"])), scale, out, g.shape[1], offset, cfg)


def probs_in_place(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lse_a: torch.Tensor, lse_b: torch.Tensor,
                   scale: torch.Tensor, offset: int) -> torch.Tensor:
    """Overwrite G (NA, NB) fp32 with dS' = P^r + P^c - 2 delta in a.dtype; returns dS' (NA, NB), a view of G's
    storage (see the module docstring for the order that makes the 2-byte packing safe)."""
    NA, NB = g.shape
    cfg = _resident_blocks(a.shape[1])
    if a.dtype == torch.float32:  # each tile is read, then written to the same addresses
        for row0, r, gb in _row_blocks(g, min(NA, cfg["rows"])):
            _probs(gb, gb, lse_a, lse_b, scale, a, b, r, row0, offset, cfg)
        return g
    ds = g.view(-1).view(a.dtype)[:NA * NB].view(NA, NB)  # (NA, NB) over the first half of G's bytes
    first = min(NA, cfg["rows"])
    scratch = torch.empty(first, NB, device=g.device, dtype=a.dtype)  # (b, NB) dS' rows 0 .. b
    _probs(g, scratch, lse_a, lse_b, scale, a, b, first, 0, offset, cfg)
    row0 = first
    while row0 < NA:  # dS' rows [row0, 2 row0) overwrite G rows [row0 / 2, row0): already read
        r = min(row0, NA - row0)
        _probs(g[row0:], ds[row0:], lse_a, lse_b, scale, a, b, r, row0, offset, cfg)
        row0 += r
    ds[:first].copy_(scratch)  # G rows [0, b / 2): read by the first block
    return ds


def grad(ds: torch.Tensor, b: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """factor * (dS' @ b) with an fp32 result, cast once (one GEMM).

    Shapes: ds (NA, NB) (a transposed view is fine), b (NB, D), factor (1,) fp32 -> (NA, D) in ``dtype``.
    """
    acc = torch.empty(ds.shape[0], b.shape[1], device=b.device, dtype=torch.float32)  # (NA, D)
    _gemm_fp32(ds, b, acc)
    out = torch.empty(acc.shape, device=b.device, dtype=dtype)  # (NA, D)
    return torch.mul(acc, factor, out=out)
