"""Fused projected-MSE distillation loss: ``mse_loss(x @ W^T + b, target)`` in one GEMM pass.

This is Knowledge-CLIP's text-embedding distillation term ``L_emb = || W_e(E_T(x_C)) - L(x_C) ||^2``:
the student's text embeddings ``x`` (B, d) go through the learnable projector ``W_e`` (an
``nn.Linear(d, d')``) and are compared with the cached teacher embeddings ``target`` (B, d').

What is fused
-------------
Forward is ONE tiled Triton GEMM ``Y = X W^T (+ b)`` whose epilogue, while the (BLOCK_M, BLOCK_N) tile
of ``Y`` is still in registers (fp32), does everything else:

    R       = Y - T                              (T read once, in its own dtype, converted to fp32)
    partial = sum(R^2) over the tile             -> partials[pid_m, pid_n]   (fp32, one per tile)
    G       = R                                  -> stored once, in the input dtype (B, d')
    colsum  = sum over the tile's rows of R      -> colsums[pid_m, n-range]  (fp32, only for d bias)

The loss is ``partials.sum() / n`` with ``n = B`` ("batchmean", the default: Knowledge-CLIP's Eq. 1 sums
the squared L2 over the teacher's d' dimensions per caption and averages over captions), ``n = B * d'``
("mean", ``F.mse_loss``'s element mean, which would divide L_emb by d' = 4096 for Llama 2 and all but switch
distillation off) or ``n = 1`` ("sum"). The gradient of the loss w.r.t. Y is ``s * G`` with ``s = 2/n``.
The kernel stores G unscaled and backward folds ``s`` into ``g`` (which it applies anyway): in fp16,
``2R/numel`` underflows (numel = 16.7M at B = 4096, d' = 4096 puts it at ~1e-7 * R, below fp16's normal
range), while ``R`` has exactly the range of eager's ``y - t``.

Every tile writes its own slot of ``partials`` and the slots
are reduced by one ``torch.sum`` over a fixed-shape buffer, so the result is deterministic (bit-identical
reruns; no float atomics anywhere). ``Y``, ``R`` and ``R^2`` never reach memory: there is no fp32
B x d' intermediate and no separate elementwise pass.

Backward (``g`` = grad_output, a 0-d tensor; ``c = g * s``)::

    dX = c * G W        (B, d')  @ (d', d)  -> (B, d)
    dW = c * G^T X      (d', B)  @ (B, d)   -> (d', d)
    db = c * sum_rows G = c * colsums.sum(0)   (no pass over G: the forward epilogue summed it)

so the whole forward+backward is three GEMMs (the fused forward one + two backward ones). The backward
GEMMs are plain GEMMs with nothing to fuse into their epilogues except the scalar ``g``, so they call
``torch.matmul`` (cuBLAS): a Triton GEMM cannot beat cuBLAS on a plain bf16 GEMM at these shapes, and the
bench's ``floor`` line (three cuBLAS GEMMs) measures exactly that choice (``kernel/floor`` ratio). ``c``
is folded in without an extra B x d pass where possible: it scales the smaller operand of dX (``W`` when
B >= d' and the dtype is not fp16, where ``c * W`` could underflow; else the output in place) and the
(d', d) dW output in place. Reading ``g`` as a Python number would cost a host sync, so it stays a tensor.

Memory
------
Beyond the inputs: one B x d' buffer ``G`` in the input dtype (saved for backward only when x or weight
needs a gradient; a bias-only gradient needs just the colsums), plus cdiv(B, BM) * cdiv(d', BN) fp32
partials and, when the bias needs a gradient, cdiv(B, BM) x d' fp32 colsums (B/16 x d' at most:
16x smaller than one fp32 B x d' matrix). Eager PyTorch keeps Y, R (and autograd's copies) instead.

Dtypes and options useful to the trainer
-----------------------------------------
- x, weight, bias: fp32, bf16 or fp16 (the same dtype, as ``F.linear`` requires); fp32 accumulation.
  fp32 GEMMs follow ``torch.backends.cuda.matmul.allow_tf32`` as ``F.linear`` does (IEEE fp32 by default).
- target may have ANY float dtype, independent of x: the fp16 teacher-embedding cache feeds a bf16
  student directly, read and converted to fp32 inside the epilogue (no cast pass). The loss dtype follows
  ``F.mse_loss``'s type promotion (bf16 x fp16 -> fp32), so the contract holds for mixed dtypes too.
- Under ``torch.autocast`` the function behaves like ``F.linear`` + ``F.mse_loss`` under autocast:
  x, weight, bias are cast to the autocast dtype for the GEMM and the loss comes back in fp32, so the
  trainer can keep an fp32 master ``W_e`` and call this inside its autocast region.
- target gets no gradient (it is the frozen teacher; it is treated as detached). The target
  normalisation (L2 / standardise) is the trainer's job, not this kernel's.
- x may have leading dimensions (..., d) like ``F.linear``; target must then be (..., d') exactly
  (no broadcasting: ``F.mse_loss`` only warns about it, here it is an error).

Limits
------
- fp64 (and anything not on one device, or CPU without ``TRITON_INTERPRET=1``) runs the reference.
- Autotuning (GPU) is keyed on (B, d', d); set ``KCLIP_AUTOTUNE=0`` to use one fixed config.
  In the Triton interpreter exactly one small config is used and low-precision tiles are upcast to fp32
  before ``tl.dot`` (the interpreter mis-computes bf16 ``tl.dot``).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from .dispatch import FP_FUSION, cdiv, interpreting, use_triton

__all__ = ["projected_mse_loss", "projected_mse_loss_reference"]

_REDUCTIONS = ("batchmean", "mean", "sum")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Number of forward-kernel launches, so tests can assert that the Triton path (not the reference) ran.
LAUNCH_COUNTS = {"forward": 0}


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"projected_mse_loss: reduction={reduction!r} is not supported; use 'batchmean', 'mean' or 'sum' "
            "(for per-element losses call F.mse_loss(F.linear(x, weight, bias), target, reduction='none'))."
        )


# ---------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------
def projected_mse_loss_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Plain PyTorch ground truth: the squared error of ``F.linear(x, weight, bias)`` against ``target``.

    Args:
        x: student embeddings.
        weight: projector weight, as in ``nn.Linear(d, d_out)``.
        target: teacher embeddings (treated as a constant: detached).
        bias: optional projector bias.
        reduction: "batchmean" (default: squared L2 summed over d_out per row, averaged over the rows: the
            paper's Eq. 1), "mean" (over all elements, = batchmean / d_out) or "sum".

    Shapes:
        x (..., d), weight (d_out, d), bias (d_out,), target (..., d_out) -> 0-d tensor.
    """
    _check_reduction(reduction)
    y = F.linear(x, weight, bias)
    target = target.detach()
    if target.dtype != y.dtype:  # promote as the kernel does (bf16 student x fp16 cache -> fp32); CUDA's
        common = torch.promote_types(y.dtype, target.dtype)  # mse_loss refuses mixed dtypes
        y, target = y.to(common), target.to(common)
    if reduction == "batchmean":
        rows = y.numel() // max(1, y.shape[-1]) if y.dim() > 1 else 1
        return F.mse_loss(y, target, reduction="sum") / rows
    return F.mse_loss(y, target, reduction=reduction)


# ---------------------------------------------------------------------------------------------------
# Triton kernel (imported lazily: importing this module does not import Triton)
# ---------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _forward_kernel():
    """Build the (autotuned) forward kernel once, on first use."""
    import triton
    import triton.language as tl

    @triton.jit
    def _projected_mse_fwd_kernel(
        x_ptr, w_ptr, b_ptr, t_ptr, g_ptr, partial_ptr, colsum_ptr,
        M, N, K,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_tm, stride_tn, stride_gm, stride_gn,
        partial_stride,
        HAS_BIAS: tl.constexpr, STORE_G: tl.constexpr, STORE_COLSUM: tl.constexpr,
        UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # Grouped tile order: GROUP_M row-blocks sweep the columns together, so W tiles stay in L2.
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        offs_k = tl.arange(0, BLOCK_K)  # (BK,)
        mask_m = offs_m < M
        mask_n = offs_n < N
        rows = offs_m.to(tl.int64)  # int64: B * d' passes 2^31 at B = 2^19, d' = 4096
        cols = offs_n.to(tl.int64)

        x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BM, BK)
        w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk  # (BK, BN) = W^T tile
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # (BM, BN)
        for k0 in range(0, K, BLOCK_K):
            k_mask = offs_k < K - k0
            a = tl.load(x_ptrs, mask=mask_m[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_mask[:, None] & mask_n[None, :], other=0.0)
            if UPCAST:  # the interpreter mis-computes tl.dot on bf16 operands
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk

        # Epilogue: Y -> R = Y - T -> sum(R^2) partial, G = scale * R, column sums of G.
        if HAS_BIAS:
            bias = tl.load(b_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)  # (BN,)
            acc += bias[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        t = tl.load(t_ptr + rows[:, None] * stride_tm + cols[None, :] * stride_tn, mask=mask, other=0.0)
        r = tl.where(mask, acc - t.to(tl.float32), 0.0)  # (BM, BN), fp32
        tile_sq = tl.sum(tl.sum(r * r, axis=1), axis=0)
        # Each tile owns one slot (fixed position, independent of launch order): deterministic.
        tl.store(partial_ptr + pid_m.to(tl.int64) * partial_stride + pid_n, tile_sq)
        if STORE_G:  # G = R; the scalar 2/numel (or 2) is applied in backward (fp16 underflow)
            tl.store(g_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gn,
                     r.to(g_ptr.dtype.element_ty), mask=mask)
        if STORE_COLSUM:
            tl.store(colsum_ptr + pid_m.to(tl.int64) * N + cols, tl.sum(r, axis=0), mask=mask_n)

    if interpreting():
        # The interpreter fails with more than one autotune config; one small config with several
        # tiles per dimension (and a K tail) on the test shapes.
        configs = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2})]
    elif os.environ.get("KCLIP_AUTOTUNE", "1") in ("0", ""):
        configs = [triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8},
                                 num_warps=8, num_stages=3)]
    else:
        # Few configs on purpose (tuning time). 128x256 accumulators + the T tile are register-heavy;
        # the autotuner skips configs that run out of shared memory (e.g. large fp32 tiles).
        configs = [
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=5),
        ]
    min_block_m = min(c.kwargs["BLOCK_M"] for c in configs)
    min_block_n = min(c.kwargs["BLOCK_N"] for c in configs)
    # Every launch overwrites the slots it sums (see _launch_forward), so autotuning reruns need no reset.
    kernel = triton.autotune(configs=configs, key=["M", "N", "K"])(_projected_mse_fwd_kernel)
    return kernel, min_block_m, min_block_n


# ---------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------
def autotune_choice() -> str | None:
    """The forward kernel's autotuned config for the last shape it ran (None before any launch): benchmarks
    record which tile their timings used."""
    if _forward_kernel.cache_info().currsize == 0:
        return None
    best = getattr(_forward_kernel()[0], "best_config", None)
    return None if best is None else str(best)


def _fp32_input_precision() -> str:
    # Follow F.linear: TF32 only where the user enabled it for cuBLAS fp32 matmuls.
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


# Per launch signature: (grid, the launch's keyword arguments) from the autotuner's choice. The first call of a
# signature goes through the autotuner (which benchmarks on a GPU); later calls launch the jit function with
# the chosen config directly, with buffers sized for it: per call, one allocation per buffer, one launch and
# the reductions, with no autotuner dispatch (argument dicts, key hashing) and no slicing of the buffers.
_CHOSEN: dict[tuple, tuple] = {}


def _launch_forward(x2, weight, target2, bias, store_g, store_colsum):
    """Run the fused forward. Returns (sum of squared residuals as fp32 0-d, G = R or None, colsums or None).

    Shapes: x2 (B, d), weight (d', d), target2 (B, d'), bias (d',) or None -> G (B, d'), colsums (d',).
    """
    kernel, min_bm, min_bn = _forward_kernel()
    M, K = x2.shape
    N = weight.shape[0]
    device = x2.device
    fp32_precision = _fp32_input_precision() if x2.dtype == torch.float32 else "tf32"  # ignored for 16-bit
    key = (M, N, K, x2.dtype, target2.dtype, bias is not None, store_g, store_colsum, device, fp32_precision)
    chosen = _CHOSEN.get(key)
    # Before a signature's first launch the buffers are sized for the smallest tiles any config uses, and only
    # the slots of the config that ran are summed, so stale slots from autotuning runs never count.
    tiles_m, tiles_n = chosen[0] if chosen is not None else (cdiv(M, min_bm), cdiv(N, min_bn))
    partials = torch.empty((tiles_m, tiles_n), dtype=torch.float32, device=device)
    g = torch.empty((M, N), dtype=x2.dtype, device=device) if store_g else None  # (B, d')
    colsums = torch.empty((tiles_m, N), dtype=torch.float32, device=device) if store_colsum else None
    args = (x2, weight, bias if bias is not None else x2, target2,
            g if g is not None else x2, partials, colsums if colsums is not None else partials,
            M, N, K,
            x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
            target2.stride(0), target2.stride(1),
            g.stride(0) if g is not None else 0, g.stride(1) if g is not None else 0,
            partials.stride(0))
    if chosen is None:
        flags = dict(HAS_BIAS=bias is not None, STORE_G=store_g, STORE_COLSUM=store_colsum,
                     UPCAST=interpreting() and x2.dtype != torch.float32, INPUT_PRECISION=fp32_precision,
                     **FP_FUSION)
        kernel[lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)](*args, **flags)
        best = kernel.best_config
        tiles = (cdiv(M, best.kwargs["BLOCK_M"]), cdiv(N, best.kwargs["BLOCK_N"]))
        _CHOSEN[key] = (tiles, {**flags, **best.all_kwargs()})
        partials = partials[:tiles[0], :tiles[1]]
        colsums = colsums[:tiles[0]] if colsums is not None else None
    else:
        kernel.fn[(tiles_m * tiles_n,)](*args, **chosen[1])
    LAUNCH_COUNTS["forward"] += 1
    sq_sum = partials.sum()  # fixed-shape reduction: deterministic
    col = colsums.sum(0) if colsums is not None else None  # (d',)
    return sq_sum, g, col


# The fused forward as the torch custom op ``kclip::projected_mse_forward`` (declared at import: a schema and two
# Python functions, nothing compiled or launched). torch.compile sees one opaque node with a shape function
# instead of tracing Triton's launcher and its per-signature cache, so a step compiles around the loss without a
# graph break. Eager calls skip the op dispatcher and run ``_launch_forward`` directly. Absent outputs (G with no
# gradient to feed, the column sums with no bias gradient) are empty tensors.
@torch.library.custom_op("kclip::projected_mse_forward", mutates_args=(),
                         schema="(Tensor x2, Tensor weight, Tensor target2, Tensor? bias, bool store_g, "
                                "bool store_colsum) -> (Tensor, Tensor, Tensor)")
def _forward_op(x2, weight, target2, bias, store_g, store_colsum):
    sq_sum, g, colsum = _launch_forward(x2, weight, target2, bias, store_g, store_colsum)
    return sq_sum, g if g is not None else x2.new_empty(0), colsum if colsum is not None else sq_sum.new_empty(0)


@_forward_op.register_fake
def _(x2, weight, target2, bias, store_g, store_colsum):
    M, N = x2.shape[0], weight.shape[0]
    return (x2.new_empty((), dtype=torch.float32), x2.new_empty((M, N) if store_g else (0,)),
            x2.new_empty((N,) if store_colsum else (0,), dtype=torch.float32))


def _forward(x2, weight, target2, bias, store_g, store_colsum):
    """``_launch_forward`` eagerly, the custom op under ``torch.compile``; the same (sq_sum, G or None, colsums
    or None) either way."""
    if not torch.compiler.is_compiling():
        return _launch_forward(x2, weight, target2, bias, store_g, store_colsum)
    sq_sum, g, colsum = _forward_op(x2, weight, target2, bias, store_g, store_colsum)
    return sq_sum, g if store_g else None, colsum if store_colsum else None


# ---------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------
class _ProjectedMSELoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, target2, bias, reduction, out_dtype):
        need_x, need_w, _, need_b = ctx.needs_input_grad[:4]
        if torch.compiler.is_compiling():  # traced, needs_input_grad may read False (torch 2.11): keep every input
            need_x = need_w = True
            need_b = bias is not None
        ctx.need = (need_x, need_w, need_b)
        store_g = need_x or need_w  # G is needed only by the dX and dW GEMMs
        sq_sum, g, colsum = _forward(x2, weight, target2, bias, store_g, need_b)
        denom = _denominator(reduction, x2.shape[0], weight.shape[0])
        loss = sq_sum / denom  # fp32 0-d (out of place: an in-place op on the output breaks traced gradients)
        ctx.save_for_backward(g, x2 if need_w else None, weight if need_x else None, colsum)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.grad_scale = 2.0 / denom  # dLoss/dY = grad_scale * R
        return loss if out_dtype == torch.float32 else loss.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        g, x2, weight, colsum = ctx.saved_tensors
        need_x, need_w, need_b = ctx.need
        c = grad_out.to(torch.float32) * ctx.grad_scale  # 0-d fp32: dLoss/dY = c * G, no host sync
        grad_x = grad_w = grad_b = None
        if need_x:
            if g.shape[0] >= g.shape[1] and g.dtype != torch.float16:
                # scale the smaller operand: W (d', d) is smaller than dX (B, d); not in fp16 (underflow)
                grad_x = torch.matmul(g, weight * c.to(weight.dtype))  # (B, d)
            else:
                grad_x = torch.matmul(g, weight).mul_(c)  # (B, d)
        if need_w:
            grad_w = torch.matmul(g.t(), x2).mul_(c)  # (d', d)
        if need_b:
            grad_b = colsum * c  # (d',) fp32, summed in the forward epilogue (out of place: retain_graph)
            grad_b = grad_b if ctx.bias_dtype == torch.float32 else grad_b.to(ctx.bias_dtype)
        return grad_x, grad_w, None, grad_b, None, None


def _denominator(reduction: str, rows: int, d_out: int) -> float:
    """What the summed squared error is divided by: rows (batchmean), rows * d_out (mean) or 1 (sum)."""
    return {"batchmean": float(rows), "mean": float(rows * d_out), "sum": 1.0}[reduction]


# ---------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------
def projected_mse_loss(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Fused squared error of ``F.linear(x, weight, bias)`` against ``target``, reduced as ``reduction``.

    One Triton GEMM whose epilogue forms the residual, the loss partials and the gradient buffer ``G``; the
    backward is two cuBLAS GEMMs. Gradients flow to ``x``, ``weight`` and ``bias``; ``target`` is a
    constant (detached). See the module docstring for the maths, memory and dtype rules.

    Args:
        x: student embeddings, fp32/bf16/fp16.
        weight: projector weight ``W_e`` as in ``nn.Linear(d, d_out)``, same dtype as x (or any dtype
            under autocast).
        target: teacher embeddings, any float dtype (e.g. the fp16 cache), read without a cast pass.
        bias: optional projector bias, same dtype as weight.
        reduction: "batchmean" (default; the paper's Eq. 1: ``||x W^T + b - t||^2`` summed over d_out for each
            row, averaged over the B rows), "mean" (over all B * d_out elements, ``F.mse_loss``'s default: the
            batchmean divided by d_out) or "sum".

    Shapes:
        x (..., d), weight (d_out, d), bias (d_out,), target (..., d_out) -> 0-d tensor in
        ``F.mse_loss``'s result dtype (fp32 under autocast).
    """
    _check_reduction(reduction)
    if x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"projected_mse_loss: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit: weight must be "
            "(d_out, d) as in nn.Linear and x (..., d)."
        )
    out_shape = (*x.shape[:-1], weight.shape[0])
    if tuple(target.shape) != out_shape:
        raise ValueError(
            f"projected_mse_loss: target {tuple(target.shape)} must have the projection's shape {out_shape} "
            "(x.shape[:-1] + (weight.shape[0],)); broadcasting is not supported — expand or fix the target."
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"projected_mse_loss: bias {tuple(bias.shape)} must be ({weight.shape[0]},).")
    target = target.detach()

    if not use_triton(x, weight, target, bias):
        return projected_mse_loss_reference(x, weight, target, bias, reduction)

    autocast_on = torch.is_autocast_enabled(x.device.type)
    if autocast_on:
        # Mirror F.linear (cast to the autocast dtype) + F.mse_loss (fp32 under autocast).
        cast = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(cast), weight.to(cast)
        bias = bias.to(cast) if bias is not None else None
        out_dtype = torch.float32
    else:
        if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
            raise ValueError(
                f"projected_mse_loss: x ({x.dtype}), weight ({weight.dtype}) and bias "
                f"({None if bias is None else bias.dtype}) must share one dtype, as F.linear requires; cast them "
                "or call inside torch.autocast."
            )
        out_dtype = torch.promote_types(x.dtype, target.dtype)
    if (x.dtype not in _KERNEL_DTYPES or not target.is_floating_point() or target.dtype == torch.float64
            or x.numel() == 0 or weight.shape[0] == 0):
        # fp64 or empty inputs: the reference defines the semantics (NaN mean of nothing, etc.).
        with torch.autocast(x.device.type, enabled=False):
            return projected_mse_loss_reference(x, weight, target, bias, reduction).to(out_dtype)

    x2 = x.reshape(-1, x.shape[-1])  # (B, d)
    target2 = target.reshape(-1, target.shape[-1])  # (B, d')
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    if not needs_grad:
        sq_sum, _, _ = _forward(x2, weight, target2, bias, store_g=False, store_colsum=False)
        return (sq_sum / _denominator(reduction, x2.shape[0], weight.shape[0])).to(out_dtype)
    return _ProjectedMSELoss.apply(x2, weight, target2, bias, reduction, out_dtype)
