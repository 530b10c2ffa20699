"""k-means update step: per-cluster sums and counts of the points, bitwise reproducible on the GPU.

What is fused
    Given points ``x`` (N, D) and their labels (N,) in [0, K), computes ``sums[k] = sum_{i: label_i = k} x_i``
    in fp32 and ``counts[k] = #{i: label_i = k}``: the Lloyd update is then ``sums / counts``. A scatter-add
    (``index_add_``) on the GPU adds with atomics, so the order of the fp32 additions, and with it the last
    bits of a centroid, change from run to run. Here the rows are sorted by label once (a stable sort:
    within a cluster, ascending row order) and one program per (cluster, column block) adds its cluster's
    rows in that fixed order. No atomics, no fp32 copy of ``x``.

Maths
    order = stable argsort(labels) (one sort gives the sorted labels too), offsets[j] = #{labels < j} for
    j = 0..K (``searchsorted`` on the sorted labels), counts = diff(offsets). Program (k, j)
    walks ``order[offsets[k]:offsets[k+1]]`` in blocks of BLOCK_R rows, loads each gathered (BLOCK_R, BLOCK_D)
    tile of columns ``j * BLOCK_D ...`` and adds it (in fp32) into an fp32 accumulator of the same shape
    (BLOCK_R interleaved partial sums per column, which also rounds less than one running sum), then
    reduces the accumulator over rows (``tl.sum``: a fixed tree). The result depends only on the inputs and
    the block sizes, never on scheduling. There is no backward.

Memory and cost
    ``x`` is read once (each gathered row segment is BLOCK_D contiguous elements: 256 bytes in bf16), plus
    the labels, the sort (O(N) int64) and the (K, D) fp32 output. For N = 500k, D = 4096, K = 1000 in bf16
    that is 4.1 GB of reads. The one-hot alternative (``onehot(labels)^T @ x`` per chunk, deterministic in
    cuBLAS) costs 2*N*K*D = 4.1 TFLOP, as much as the assignment itself (in fp32 without tensor cores).
    The atomic ``index_add_`` it replaces also needed an fp32 copy of ``x`` (8 GB written).

Determinism
    Bitwise reproducible: no atomics, and the sums depend only on the inputs and the block sizes (see Maths).

Host waits
    None with ``check_labels=False`` (sort, searchsorted and the kernel are asynchronous; ``bincount`` on CUDA
    would read the labels' range on the host), so a Lloyd loop keeps its one host read per iteration. With
    the default ``check_labels=True``: one read, the smallest and largest label together.

Limits
    labels must lie in [0, K): checked by default; ``check_labels=False`` is for callers whose labels are in
    range by construction (``kmeans_assign``'s), and there a label outside [0, K) is counted nowhere. A program's
    work is its cluster's size: one cluster holding most points leaves most SMs idle (still one pass over x
    spread over D / BLOCK_D programs).
"""
from __future__ import annotations

import functools

import torch

from .dispatch import FP_FUSION, cdiv, interpreting, use_triton

__all__ = ["kmeans_update", "kmeans_update_reference"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Number of kernel launches, so tests can assert that the Triton path (not the reference) ran.
LAUNCH_COUNTS = {"segment_sum": 0}


def _check_inputs(x: torch.Tensor, labels: torch.Tensor, k: int) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("kmeans_update: x and labels must be torch tensors "
                        f"(got {type(x).__name__} and {type(labels).__name__}); convert with torch.as_tensor")
    if x.dim() != 2:
        raise ValueError(f"kmeans_update: x must be 2-D (N, D), got shape {tuple(x.shape)}")
    if labels.dim() != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(f"kmeans_update: labels must be (N,) = ({x.shape[0]},), got shape {tuple(labels.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"kmeans_update: x must be floating point, got {x.dtype}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"kmeans_update: labels must be int64 or int32, got {labels.dtype}")
    if x.device != labels.device:
        raise ValueError(f"kmeans_update: x is on {x.device} but labels are on {labels.device}; move both to one device")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"kmeans_update: k must be a positive int, got {k!r}")


def _counts(labels: torch.Tensor, k: int) -> torch.Tensor:
    """bincount with a clear error for labels outside [0, k) (bincount grows its output past k, or raises)."""
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"kmeans_update: labels must lie in [0, k={k}), got {int(labels.min())}")
    counts = torch.bincount(labels, minlength=k)  # (K,) int64 (integer adds: exact in any order)
    if counts.numel() != k:
        raise ValueError(f"kmeans_update: labels must lie in [0, k={k}), got {counts.numel() - 1}")
    return counts


def kmeans_update_reference(x: torch.Tensor, labels: torch.Tensor, k: int):
    """Cluster sums and counts in plain PyTorch (ground truth for tests; the CPU path without the interpreter).

    ``index_add_`` in fp32 (fp64 for fp64 inputs): on CPU it adds rows in index order, hence reproducible; on
    CUDA it uses atomics (not reproducible), which is why CUDA tensors take the kernel.

    Shapes:
        x (N, D), labels (N,) int -> sums float32 (K, D) (float64 for fp64 x), counts int64 (K,)
    """
    _check_inputs(x, labels, k)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    counts = _counts(labels, k)
    sums = torch.zeros((k, x.shape[1]), dtype=acc, device=x.device)  # (K, D)
    sums.index_add_(0, labels.long(), x.to(acc))
    return sums, counts


# ---------------------------------------------------------------------------------------------------
# Triton kernel (imported lazily: importing this module does not import Triton)
# ---------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _update_kernel():
    """Build the jit kernel once, on first use."""
    import triton
    import triton.language as tl

    @triton.jit
    def _segment_sum_kernel(
        x_ptr, order_ptr, offsets_ptr, sums_ptr,
        D, stride_xn, stride_xd,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        k = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        col_mask = cols < D
        start = tl.load(offsets_ptr + k)  # int64: this cluster's rows are order[start:stop]
        stop = tl.load(offsets_ptr + k + 1)
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for r0 in range(start, stop, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)  # (BLOCK_R,) positions in the sorted order
            r_mask = r < stop
            rows = tl.load(order_ptr + r, mask=r_mask, other=0)  # (BLOCK_R,) int64 row numbers: N * D may pass 2^31
            tile = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xd,
                           mask=r_mask[:, None] & col_mask[None, :], other=0.0)  # (BLOCK_R, BLOCK_D)
            acc += tile.to(tl.float32)
        total = tl.sum(acc, axis=0)  # (BLOCK_D,) fixed reduction tree
        tl.store(sums_ptr + k.to(tl.int64) * D + cols, total, mask=col_mask)

    return _segment_sum_kernel


def __getattr__(name: str):
    # ``bench.compile_sm90`` reads the jit function as a module attribute; build it on that first read.
    if name == "_segment_sum_kernel":
        return _update_kernel()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _block_sizes(d: int) -> dict:
    """A (BLOCK_R, BLOCK_D) tile per step: 256-byte bf16 row segments on the GPU, few numpy ops in the interpreter."""
    from triton import next_power_of_2 as pow2

    if interpreting():
        return dict(BLOCK_R=64, BLOCK_D=min(128, max(16, pow2(d))), num_warps=4, num_stages=1)
    return dict(BLOCK_R=32, BLOCK_D=128 if d > 64 else max(16, pow2(d)), num_warps=4, num_stages=2)


def _segments(labels: torch.Tensor, k: int, check: bool):
    """The rows in cluster order (N,), each cluster's [start, stop) in that order (K + 1,), and the counts (K,):
    one stable sort and a ``searchsorted``, no host wait unless ``check`` (then one read of both ends)."""
    sorted_labels, order = torch.sort(labels, stable=True)  # (N,), (N,) int64: ascending rows within a cluster
    if check and labels.numel():
        lo, hi = torch.stack([sorted_labels[0], sorted_labels[-1]]).tolist()
        if lo < 0 or hi >= k:
            raise ValueError(f"kmeans_update: labels must lie in [0, k={k}), got {lo if lo < 0 else hi}")
    bounds = torch.arange(k + 1, dtype=sorted_labels.dtype, device=labels.device)  # (K + 1,)
    offsets = torch.searchsorted(sorted_labels, bounds)  # (K + 1,) int64: offsets[j] = #{labels < j}
    return order, offsets, offsets.diff()


def _kmeans_update_triton(x: torch.Tensor, labels: torch.Tensor, k: int, check_labels: bool = True):
    if x.dtype == torch.float64:
        x = x.float()
    n, d = x.shape
    order, offsets, counts = _segments(labels, k, check_labels)  # (N,), (K + 1,), (K,)
    sums = torch.empty((k, d), dtype=torch.float32, device=x.device)  # (K, D)
    if d == 0:
        return sums, counts
    cfg = _block_sizes(d)
    grid = (k, cdiv(d, cfg["BLOCK_D"]))
    _update_kernel()[grid](
        x, order, offsets, sums, d, x.stride(0), x.stride(1),
        BLOCK_R=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **FP_FUSION,
    )
    LAUNCH_COUNTS["segment_sum"] += 1
    return sums, counts


def kmeans_update(x: torch.Tensor, labels: torch.Tensor, k: int, check_labels: bool = True):
    """Per-cluster sums (fp32) and counts of ``x`` under ``labels``: the pieces of the Lloyd update.

    Runs the Triton kernel on CUDA tensors (and on CPU tensors under ``TRITON_INTERPRET=1``), else the PyTorch
    reference. The kernel is bitwise reproducible (no atomics; see the module docstring).

    Args:
        x: points, fp32/bf16/fp16 (fp64 is summed in fp32 by the kernel).
        labels: cluster of each row, int64/int32 in [0, k).
        k: number of clusters.
        check_labels: raise on a label outside [0, k) (one host read on the Triton path). False for labels
            in range by construction (``kmeans_assign``'s): then the Triton path never waits for the device.

    Shapes:
        x (N, D), labels (N,) -> sums float32 (K, D), counts int64 (K,)
    """
    _check_inputs(x, labels, k)
    if not use_triton(x, labels):
        return kmeans_update_reference(x, labels, k)
    with torch.no_grad():
        return _kmeans_update_triton(x.detach(), labels, k, check_labels)
