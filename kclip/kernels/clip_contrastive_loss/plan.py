"""Which strategy runs under a memory budget, what workspace it takes, and what it costs (pure arithmetic).

``plan_clip_contrastive_loss`` picks ``resident`` when its workspace fits the budget, else ``chunked`` with the
largest chunk of rows that fits (at most the default chunk, at least ``min_rows``), else ``fused`` (O(N)).
Workspace counts every temporary a strategy allocates beyond the inputs, the all-gathered inputs and the
(N_p, D) gradients, as a sum (an upper bound on its peak). ``gemm_equivalents`` and ``hbm_bytes_per_elem`` are
the cost model the benchmark prints: matmuls of N x N x D, and HBM bytes per element of the N x N matrix
besides the operand reads inside GEMMs (single device).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ..dispatch import cdiv
from .chunked import _chunk_blocks
from .fused import _grad_blocks
from .resident import _resident_blocks

STRATEGIES = ("resident", "chunked", "fused")
CPU_MEMORY_BUDGET = 256 << 20  # CPU / interpreter default: keeps test-sized batches resident
CUDA_BUDGET_FRACTION = 1 / 16  # of the device's total memory: N = 32k resident on an 80 GB H100 (4 GiB)


class ContrastivePlan(NamedTuple):
    strategy: str
    workspace_bytes: int
    chunk_rows: int | None  # chunked only


def default_memory_budget(device: torch.device | str) -> int:
    """The budget when none is given: 1/16 of a CUDA device's total memory, 256 MiB elsewhere. Total, not free,
    memory: the plan of a fixed shape must not change from step to step (it would change the rounding)."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_MEMORY_BUDGET
    return _cuda_budget(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_budget(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).total_memory * CUDA_BUDGET_FRACTION)


def workspace_bytes(strategy: str, n_rows: int, n_cols: int, dim: int, dtype: torch.dtype, world_size: int = 1,
                    chunk_rows: int | None = None) -> int:
    """Bytes of temporaries for ``n_rows`` local rows against ``n_cols`` columns (N = n_cols; n_rows = N / P)."""
    item = dtype.itemsize
    stats = 4 * (6 * n_rows + 6 * n_cols)  # O(N) fp32 statistics (local and gathered)
    if strategy == "fused":
        return stats
    if strategy == "resident":
        cfg = _resident_blocks(dim)
        rows = min(n_rows, cfg["rows"])
        buffers = (1 if world_size == 1 else 2) * n_rows * n_cols * 4  # G, overwritten by dS'
        scratch = rows * n_cols * item if item < 4 else 0  # the first block of a 2-byte dS'
        partials = 12 * cdiv(n_cols, cfg["PAIR_N"]) * rows + 12 * n_cols if world_size == 1 else 0
        return buffers + scratch + partials + n_rows * dim * 4 + stats
    if strategy == "chunked":
        cfg = _chunk_blocks(dim)
        rows = min(n_rows, cfg["rows"] if chunk_rows is None else chunk_rows)
        partials = 12 * cdiv(n_cols, cfg["PAIR_N"]) * rows + 12 * n_cols if world_size == 1 else 0
        return rows * n_cols * (4 + item) + rows * dim * 4 + partials + stats
    raise ValueError(f"workspace_bytes: strategy must be one of {STRATEGIES}, got {strategy!r}")


def plan_clip_contrastive_loss(n_rows: int, n_cols: int, dim: int, dtype: torch.dtype, world_size: int = 1,
                               memory_budget: int | None = None) -> ContrastivePlan:
    """The strategy ``clip_contrastive_loss(strategy=None)`` runs for this shape and budget (bytes; None: the CPU
    default, see ``default_memory_budget`` for CUDA), its workspace, and the chunk rows of ``chunked``."""
    budget = CPU_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    if budget < 0:
        raise ValueError(f"memory_budget must be >= 0 bytes, got {memory_budget}")
    need = workspace_bytes("resident", n_rows, n_cols, dim, dtype, world_size)
    if need <= budget:
        return ContrastivePlan("resident", need, None)
    rows = chunk_rows_for(n_rows, n_cols, dim, dtype, world_size, budget)
    if rows is not None:
        return ContrastivePlan("chunked", workspace_bytes("chunked", n_rows, n_cols, dim, dtype, world_size, rows),
                               rows)
    return ContrastivePlan("fused", workspace_bytes("fused", n_rows, n_cols, dim, dtype, world_size), None)


def chunk_rows_for(n_rows: int, n_cols: int, dim: int, dtype: torch.dtype, world_size: int, budget: int) -> int | None:
    """The largest chunk of rows whose chunked workspace fits ``budget``: at most the default chunk
    (``_chunk_blocks``), a multiple of 64 below it, at least ``min_rows``; None when not even that fits."""
    cfg = _chunk_blocks(dim)
    lo, hi = min(n_rows, cfg["min_rows"]), min(n_rows, cfg["rows"])
    for rows in (hi, *_smaller(hi, lo)):
        if workspace_bytes("chunked", n_rows, n_cols, dim, dtype, world_size, rows) <= budget:
            return rows
    return None


def _smaller(hi: int, lo: int):
    """Chunk sizes below ``hi`` down to ``lo``, largest first: multiples of 64 (whole GEMM tiles), then ``lo``."""
    r = (hi - 1) // 64 * 64
    while r > lo:
        yield r
        r -= 64
    if lo < hi:
        yield lo


def gemm_equivalents(strategy: str, dim: int, world_size: int = 1) -> int:
    """Matmuls of N x N x D per forward + backward (summed over ranks)."""
    if strategy == "resident":
        return 3 if world_size == 1 else 4  # distributed: rows and columns of S each computed once
    if strategy == "chunked":
        return 5 if world_size == 1 else 6  # backward recomputes G per direction
    if strategy == "fused":  # 2 row-statistics passes; per direction, each D chunk recomputes S, plus P @ B
        return 2 + 2 * (cdiv(dim, _grad_blocks(dim)["BLOCK_DO"]) + 1)
    raise ValueError(f"gemm_equivalents: strategy must be one of {STRATEGIES}, got {strategy!r}")


def hbm_bytes_per_elem(strategy: str, dim: int, dtype: torch.dtype) -> float:
    """HBM bytes per element of the N x N matrix, single device, besides the operand reads inside GEMMs."""
    item = dtype.itemsize
    partials = 24 / _chunk_blocks(dim)["PAIR_N"]  # 3 fp32 per (row, column block), written and read
    if strategy == "resident":
        return 4 + 4 + partials + 4 + item  # G write, statistics read, dS' read G and write
    if strategy == "chunked":
        return (4 + 4 + partials) + 2 * (4 + 4 + item)  # forward G write/read; per direction G again and P
    if strategy == "fused":
        return 0.0
    raise ValueError(f"hbm_bytes_per_elem: strategy must be one of {STRATEGIES}, got {strategy!r}")
