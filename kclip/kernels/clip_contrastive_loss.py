"""Fused symmetric CLIP contrastive loss (InfoNCE both ways) in O(N) memory, deterministic, distributed.

What it computes
----------------
For L2-normalised rows ``I, T`` (N, D) and an already exponentiated logit scale ``s`` (0-d)::

    G = I @ T.T                     cosines, never stored
    S = s * G                       logits,  never stored
    r_i = logsumexp_j S_ij          row log-sum-exps     (image -> text)
    c_j = logsumexp_i S_ij          column log-sum-exps  (text -> image)
    L   = 1/(2N) * [ sum_i (r_i - S_ii) + sum_j (c_j - S_jj) ]
        = 0.5 * (F.cross_entropy(S, arange(N)) + F.cross_entropy(S.T, arange(N)))

Backward, with grad_output ``g``, row softmax ``P^r_ij = exp(S_ij - r_i)`` and column softmax
``P^c_ij = exp(S_ij - c_j)``::

    dS_ij = g/(2N) * (P^r_ij + P^c_ij - 2 delta_ij)
    dI    = s * dS @ T            dT = s * dS.T @ I
    dL/ds = 1/(2N) * [ sum_i w^r_i + sum_j w^c_j - 2 sum_i G_ii ]
            with w^r_i = sum_j P^r_ij G_ij  and  w^c_j = sum_i P^c_ij G_ij

Symmetry does half the work: ``S.T = s * T @ I.T``, so the column statistics of ``S`` are the row
statistics of ``S.T`` and ``dT`` is ``dI`` with the roles of (I, r) and (T, c) swapped. Both strategies
below are built from two operations, each run twice (once per direction):

* row statistics of ``(A, B)``: an online (base-2) softmax over tiles of ``s * A @ B.T`` gives the row
  LSE, and in the same sweep the softmax-weighted mean cosine ``w`` (so ``dL/ds`` is known at the end of
  forward and needs no backward work) and the diagonal cosine ``G_ii`` (A_i . B_{i+offset});
* the gradient of ``A``: recompute ``S``, form ``P^r + P^c - 2 delta`` and multiply by ``B``.

Pass count (matmuls of N x N x D each): forward 2 (row statistics both ways; 1 for ``"chunked"`` without a
process group, below); backward 4 (per direction: recompute S and the gradient GEMM) = **6**, versus the
4-matmul floor (1 forward + S, dI, dT in backward). The backward floor needs dT accumulated across
programs, i.e. floating-point atomics (order-dependent results) or an O(N^2 / block) buffer (fused), or an
N x D fp32 accumulator updated by every chunk (chunked: 4 D more bytes per sample and a read-modify-write
of it per chunk, through an ``addmm`` whose fp32-into-bf16-product form differs across torch versions);
none is done here.

Two strategies (``strategy=``; ``DEFAULT_STRATEGY`` is ``"chunked"``):

* ``"chunked"`` (default): the rows of A go in chunks of R (1024 on the GPU). Per chunk, cuBLAS computes
  the cosines ``G = A_chunk @ B.T`` with fp32 accumulation into an R x N fp32 workspace
  (``torch.mm(..., out_dtype=torch.float32)``), and Triton kernels sweep G. Forward without a process
  group needs ONE GEMM per chunk for both directions: ``_chunk_pair_stats_kernel`` folds the chunk's rows
  into running column statistics (chunks in a fixed order: deterministic, no atomics) and leaves per-row
  partials that ``_chunk_row_combine_kernel`` reduces (with the diagonal); distributed, each direction runs
  its own row statistics (``_chunk_row_stats_kernel``). Backward, per direction and chunk,
  ``_chunk_probs_kernel`` writes ``P^r + P^c - 2 delta`` in the inputs' dtype and cuBLAS forms ``P @ B``
  (fp32 result, scaled by ``s * g / (2N)`` and cast once). Matmuls: 1 + 4 = **5** (6 distributed), all at
  cuBLAS speed; the price is O(R N) workspace (R x N x (4 + itemsize) bytes: 6 KiB per sample in bf16 at
  R = 1024, whatever N) and memory traffic over it (per element of S about 8 bytes forward and 12 per
  backward direction). This is the plan of Liger-Kernel's fused linear cross-entropy: chunked GEMMs,
  fused softmax. Its bf16/fp16 -> fp32 GEMM needs torch >= 2.8 on CUDA (checked once per device and dtype with a
  tiny GEMM): where it cannot run, the default falls back to ``"fused"`` with one warning. Launch option
  ``GEMM="triton"`` (``LAUNCH_OVERRIDES["chunk"]``, off until a GPU times it):
  the chunk kernels compute their own cosine tiles with ``tl.dot`` in an ordinary 2-D tile grid
  (``_chunk_tile_stats_kernel`` leaves each tile's row and column partials in fixed slots, combined in a
  fixed order; ``_chunk_probs_kernel(TILE_GEMM=True)``), so G is never written: no fp32 workspace and about
  20 bytes less traffic per element of S, against Triton's GEMM efficiency instead of cuBLAS's.
* ``"fused"``: one Triton program per block of rows computes its tiles of S with ``tl.dot`` and never
  writes them (``_row_stats_kernel``, ``_grad_kernel``: one program per (row block of A, chunk of D),
  the ``-2 delta`` term a rank-1 epilogue). O(N) memory beyond the gradients, but measured on an H200 at
  5-10% of the bf16 matmul ceiling (see Limits). When D > 512 the backward splits D into chunks, and each
  chunk recomputes its S tiles (D=768: 3 chunks of 256).

Determinism: no atomics; every reduction is inside one program in a fixed order, a ``torch.sum`` over an
O(N) vector, or one cuBLAS GEMM per chunk (cuBLAS is bitwise reproducible for fixed shapes on one
stream). Two runs give bit-identical loss and gradients.

Memory: saved for backward are the inputs and O(N) fp32 statistics (r, c, diag). Temporaries: the
gradients, and for ``"chunked"`` the R x N workspace (above) and an R x D fp32 buffer. No N x N tensor
exists at any point.

Precision: inputs fp32/bf16/fp16, fp32 accumulation and fp32 softmax statistics. fp32 inputs use
IEEE fp32 dot products on the GPU (no TF32: ``"fused"`` always, ``"chunked"`` unless the caller turned
on ``torch.backends.cuda.matmul.allow_tf32``) so that they match the fp32 reference. The probabilities
meet B in the inputs' dtype in both strategies. The loss is returned in fp32 (as ``F.cross_entropy``
under autocast would); gradients come back in the input dtypes. Under the Triton CPU interpreter
low-precision operands are upcast to fp32 before ``tl.dot`` (the interpreter mis-computes bf16 dots),
and the chunked strategy's GEMMs run in fp32 on the upcast values (CPU has no bf16 -> fp32 GEMM).

Distributed (``process_group`` given)
-------------------------------------
Each of P ranks passes its LOCAL rows ``I_p, T_p`` (N_p, D); the global batch is their concatenation in
rank order (N = P * N_p) and the positive pairs are the global diagonal. Forward all-gathers I and T
(no autograd through the gather), runs the row pass for the local rows of I against all of T (r_p)
and the row pass for the local rows of T against all of I (c_p: the local *columns* of S), then
all-gathers the packed O(N) statistics (r, c, diag, w^r, w^c). Every rank then computes the same
global loss and the same global ``dL/ds`` from the same gathered numbers (this replaces an all-reduce
of the O(1) ds partial; there is no collective in backward). Backward computes locally::

    dI_p = s * dS[p rows, :] @ T_all      (needs r_p and all of c)
    dT_p = s * dS[:, p cols].T @ I_all    (needs c_p and all of r)

Gradient semantics on every rank: ``image_emb.grad`` / ``text_emb.grad`` are exactly
``d L_global / d (local rows)``, and ``logit_scale.grad`` is exactly ``d L_global / d s`` (the same on
every rank). No feature-gradient reduce-scatter is needed. Beware of data-parallel gradient
averaging (DDP, DeepSpeed): averaging encoder gradients over P ranks gives ``(1/P) * dL_global/dtheta``
(each rank holds the contribution of its own rows only), so the trainer multiplies encoder gradients
by P; ``logit_scale``'s gradient is already the full value on every rank, so averaging keeps it
right and multiplying it by P would over-scale it by P (scale it separately, or divide the loss
term's logit-scale contribution accordingly). Saved for backward on each rank: the gathered I and T
(O(N D), as open_clip keeps them) and the O(N) statistics.

Limits: 2-D inputs of equal shape, N >= 1; ranks must hold equal N_p (checked with one tiny
all-gather when a group first sees a local size, not on every step: see ``_check_equal_rows``; an
error tells you what to do otherwise). ``logit_scale`` must have one element. Rows
are assumed L2-normalised only for the cost model; the maths is exact for any rows. Without CUDA and
without ``TRITON_INTERPRET=1`` the PyTorch reference runs (distributed too, with an all-gather that
keeps local gradients). ``"fused"``: backward programs hold a BLOCK_M x BLOCK_DO fp32 accumulator: D <= 512
in one chunk; D > 512 in 256-wide chunks that each recompute their S tiles (D=768: 3 chunks). GPU block
sizes of both strategies are fixed heuristics (no autotune), timed on an H200 (``--tune``). Measured there
(bench/results/clip_contrastive_loss.jsonl), the fused plan reaches only 42-78 TFLOP/s of useful work (4-matmul
count) at N=32k: 5-10% of the 782 TFLOP/s bf16 matmul ceiling, and eager PyTorch (cuBLAS logits) is 3-7x
faster wherever its N x N logits fit. The kernel wins on memory (O(N) above the inputs) and against Inf-CL
(2.4-4.2x); closing the speed gap is open work. Register spills are not the cause: compiled as a launch
specialises them, no bf16 default configuration spills and all use wgmma (bench/results/compile_sm90/).
What the compiled code shows instead: the D loop nested in the column loop drains its two-stage pipeline
at the end of every column tile, the gradient kernel loads each tile's B rows only after its S tile
(unpipelined), and each tile waits for its P @ B GEMM to finish. The launch options ``FLATTEN`` and
``PREFETCH`` (off until timed) address the first two; ``bench_clip_contrastive_loss --tune --tune-set
pipeline`` times them. That measurement is why ``"chunked"``, whose matmuls are cuBLAS's, is the default;
it has not run on a GPU yet (its cost model above is arithmetic, not a measurement), and
``bench_clip_contrastive_loss`` times both strategies side by side (``kclip`` and ``kclip_fused``).
"""
from __future__ import annotations

import functools
import warnings
import weakref

import torch
import torch.nn.functional as F

from .dispatch import FP_FUSION, cdiv, interpreting, use_triton

try:  # Triton is optional on CPU-only installs: the reference path still works.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None

# How many times the launchers ran a Triton kernel (tests assert the Triton path really ran).
TRITON_LAUNCHES = 0


# ------------------------------------------------------------------------------------------------
# Reference (plain PyTorch): ground truth for tests, benchmarks and the CPU path
# ------------------------------------------------------------------------------------------------
def _gather_keep_local(x: torch.Tensor, process_group) -> torch.Tensor:
    """All-gather rows of ``x`` (N_p, D) -> (P * N_p, D); this rank's slice is ``x`` itself, so autograd
    gives exactly d(global) / d(local rows), as open_clip's ``gather_features(gather_with_grad=False)``."""
    import torch.distributed as dist

    world = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous(), group=process_group)
    parts[rank] = x
    return torch.cat(parts, dim=0)  # (P * N_p, D)


def clip_contrastive_loss_reference(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale,
                                    process_group=None) -> torch.Tensor:
    """Symmetric CLIP InfoNCE in plain PyTorch (materialises the N x N logits).

    Args:
        image_emb: image embeddings, rows L2-normalised.
        text_emb: text embeddings, rows L2-normalised.
        logit_scale: 0-d tensor (or float), already exponentiated.
        process_group: if given, rows are this rank's local rows and the loss is over the global batch
            (all-gathered, local slice kept in the graph).
    Shapes:
        image_emb, text_emb: (N, D) -> 0-d loss in the input dtype.
    """
    _check_shapes(image_emb, text_emb)
    if process_group is not None:
        _check_equal_rows(image_emb.shape[0], image_emb.device, process_group)
        image_emb = _gather_keep_local(image_emb, process_group)  # (N, D)
        text_emb = _gather_keep_local(text_emb, process_group)  # (N, D)
    logits = logit_scale * image_emb @ text_emb.T  # (N, N)
    labels = torch.arange(logits.shape[0], device=logits.device)  # (N,)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def _check_shapes(image_emb: torch.Tensor, text_emb: torch.Tensor) -> None:
    if image_emb.dim() != 2 or text_emb.shape != image_emb.shape:
        raise ValueError(
            f"clip_contrastive_loss: image_emb and text_emb must both be (N, D) with the same shape; got "
            f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}. Flatten/project them to one (N, D) first.")
    if image_emb.shape[0] < 1:
        raise ValueError("clip_contrastive_loss: empty batch (N = 0); skip the loss for empty batches.")


# The local batch size each process group last agreed on (see _check_equal_rows). Weak keys: a destroyed
# group drops out, and a new group is checked afresh even if it reuses an old one's address.
_AGREED_ROWS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _check_equal_rows(n_local: int, device: torch.device, process_group) -> None:
    """Raise a clear error when ranks hold different local batch sizes, without a host sync per step.

    The check (an all-gather of one int64 per rank and a read back to the host) runs on the first call
    for ``process_group`` and again only when this rank's ``n_local`` differs from the size the group
    last agreed on. A training loop with a fixed batch size therefore pays it once; steady-state steps
    issue no collective for it and never wait on the device. Every rank takes the same branch as long
    as the ranks' sizes change together (equal-size batches on every rank, e.g. ``drop_last=True``);
    the first call, and any step where all ranks move to a new size, is checked. A rank that changes
    its size *alone* cannot be caught without a per-step collective: its check then meets the other
    ranks' feature all-gather, which gloo aborts with "Is there a distributed collective mismatch"
    and NCCL does not check (expect a hang until the group's timeout). ``TORCH_DISTRIBUTED_DEBUG=DETAIL``
    makes torch check every collective's shapes across ranks (slow; for debugging).
    """
    import torch.distributed as dist

    try:
        if _AGREED_ROWS.get(process_group) == n_local:
            return
    except TypeError:  # a group object without weak references: check every call
        pass
    world = dist.get_world_size(process_group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([n_local], dtype=torch.int64, device=device), group=process_group)
    sizes = torch.cat(sizes).tolist()  # the one host sync, paid only when the size changes
    if len(set(sizes)) != 1:
        raise ValueError(
            f"clip_contrastive_loss: ranks hold different local batch sizes {sizes}; distributed mode needs "
            f"the same N_p on every rank. Use drop_last=True in the sampler (or pad to equal batches).")
    try:
        _AGREED_ROWS[process_group] = n_local
    except TypeError:
        pass


# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------
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


    # --- chunked strategy: the cosines of a chunk of rows come from cuBLAS, these kernels do the softmax ---
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


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------
def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs must match the fp32 reference: no TF32 on the GPU. Low precision uses tensor cores.
    return "ieee" if dtype == torch.float32 or interpreting() else "tf32"


# Launch-parameter overrides for tuning sweeps (``bench_clip_contrastive_loss --tune``): {"stats": {...},
# "grad": {...}} entries replace the heuristics' values below. Empty in normal use.
LAUNCH_OVERRIDES: dict = {}


def _stats_blocks(D: int):
    if interpreting():  # small tiles so tests cross several row/column/K tiles
        return {**dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1), **LAUNCH_OVERRIDES.get("stats", {})}
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
    global TRITON_LAUNCHES
    NA, D = a.shape
    NB = b.shape[0]
    lse, w, diag = _row_outputs(NA, a.device)  # (NA,) each
    cfg = _stats_blocks(D)
    grid = (cdiv(NA, cfg["BLOCK_M"]),)
    _row_stats_kernel[grid](
        a, b, scale, lse, w, diag, NA, NB, D, offset, a.stride(0), b.stride(0),
        UPCAST=interpreting() and a.dtype != torch.float32, PRECISION=_precision(a.dtype),
        EVEN_K=D % cfg["BLOCK_K"] == 0, **cfg, **FP_FUSION)
    TRITON_LAUNCHES += 1
    return lse, w, diag


def _grad_fused(a, b, lse_a, lse_b, scale, coef, offset: int) -> torch.Tensor:
    """dA = s * coef * ((P^r + P^c) @ b - 2 b[offset + i]) without forming P (fused).

    Shapes: a (NA, D), b (NB, D), lse_a (NA,), lse_b (NB,), scale/coef (1,) fp32 -> (NA, D) in a.dtype.
    """
    global TRITON_LAUNCHES
    NA, D = a.shape
    NB = b.shape[0]
    da = torch.empty_like(a)  # (NA, D)
    cfg = _grad_blocks(D)
    grid = (cdiv(NA, cfg["BLOCK_M"]), cdiv(D, cfg["BLOCK_DO"]))
    _grad_kernel[grid](
        a, b, lse_a, lse_b, scale, coef, da, NA, NB, D, offset, a.stride(0), b.stride(0), da.stride(0),
        UPCAST=interpreting() and a.dtype != torch.float32, PRECISION=_precision(a.dtype),
        EVEN_K=D % cfg["BLOCK_K"] == 0, **cfg, **FP_FUSION)
    TRITON_LAUNCHES += 1
    return da


def _chunk_blocks(D: int):
    """Chunk rows R (the workspace is R x NB: fp32 cosines + probabilities in the inputs' dtype) and the tiles
    of the chunk kernels (STATS: row statistics, PAIR/COMBINE: both directions' forward statistics, PROBS: the
    backward probabilities). R = 1024 keeps the workspace at 6 KiB per sample in bf16, whatever N. GPU tiles are
    sm_90 guesses until ``bench_clip_contrastive_loss --tune --tune-set chunk`` times them."""
    if interpreting():  # small chunks so tests cross several chunks, row blocks and column tiles
        base = dict(rows=16, STATS_M=4, STATS_N=16, PAIR_M=4, PAIR_N=8, COMBINE_M=4, COMBINE_C=4, PROBS_M=8,
                    PROBS_N=16, num_warps=4, GEMM="cublas", TILE_M=8, TILE_N=16, TILE_K=16, TILE_WARPS=4,
                    TILE_STAGES=1)
    else:
        base = dict(rows=1024, STATS_M=2, STATS_N=1024, PAIR_M=32, PAIR_N=64, COMBINE_M=16, COMBINE_C=64,
                    PROBS_M=32, PROBS_N=128, num_warps=4, GEMM="cublas", TILE_M=128, TILE_N=128, TILE_K=64,
                    TILE_WARPS=8, TILE_STAGES=3)
    cfg = {**base, **LAUNCH_OVERRIDES.get("chunk", {})}
    if cfg["GEMM"] not in ("cublas", "triton"):
        raise ValueError(f"clip_contrastive_loss: chunk GEMM must be 'cublas' or 'triton', got {cfg['GEMM']!r}")
    return cfg


def _tile_gemm_args(a: torch.Tensor, cfg: dict) -> dict:
    """Launch arguments of the chunk kernels that compute their cosine tiles themselves (``GEMM="triton"``)."""
    return dict(BLOCK_M=cfg["TILE_M"], BLOCK_N=cfg["TILE_N"], BLOCK_K=cfg["TILE_K"],
                UPCAST=interpreting() and a.dtype != torch.float32, PRECISION=_precision(a.dtype),
                EVEN_K=a.shape[1] % cfg["TILE_K"] == 0, num_warps=cfg["TILE_WARPS"], num_stages=cfg["TILE_STAGES"])


def _gemm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = a @ b with fp32 accumulation and an fp32 result (cuBLAS ``out_dtype`` for bf16/fp16 on CUDA).

    Shapes: a (M, K), b (K, N) (a transposed view is fine), out (M, N) fp32 contiguous.
    """
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)  # CPU (interpreter tests): the same products in fp32


def _row_outputs(n: int, device: torch.device):
    """Empty fp32 (n,) vectors for the row LSE, the weighted mean cosine w and the diagonal cosine."""
    lse = torch.empty(n, device=device, dtype=torch.float32)
    return lse, torch.empty_like(lse), torch.empty_like(lse)


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


def _row_stats_chunked(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, offset: int):
    """As ``_row_stats_fused``; per chunk of R rows of a, G = a_chunk @ b.T by cuBLAS into an R x NB fp32
    workspace, then one Triton sweep over G for the row LSE, w and the diagonal."""
    global TRITON_LAUNCHES
    NA, D = a.shape
    NB = b.shape[0]
    lse, w, diag = _row_outputs(NA, a.device)  # (NA,) each
    cfg = _chunk_blocks(D)
    rows = min(NA, cfg["rows"])
    if cfg["GEMM"] == "triton":  # tiles compute their cosines: row partials, then one combine per chunk
        row_part = torch.empty(3 * cdiv(NB, cfg["TILE_N"]) * rows, device=a.device, dtype=torch.float32)
        for row0, r, _ in _cosine_chunks(a, b, rows, cublas=False):
            ncb, _ = _tile_stats(a, b, scale, diag, row_part, row_part, row0, r, offset, cfg, store_cols=False)
            _chunk_row_combine_kernel[(cdiv(r, cfg["COMBINE_M"]),)](
                row_part, row_part, lse, w, diag, r, ncb, row0, 0,
                BLOCK_M=cfg["COMBINE_M"], BLOCK_C=cfg["COMBINE_C"], LOAD_DIAG=False, num_warps=cfg["num_warps"],
                **FP_FUSION)
            TRITON_LAUNCHES += 2
        return lse, w, diag
    for row0, r, g in _cosine_chunks(a, b, rows):
        _chunk_row_stats_kernel[(cdiv(r, cfg["STATS_M"]),)](
            g, scale, lse, w, diag, r, NB, row0, offset, g.stride(0),
            BLOCK_M=cfg["STATS_M"], BLOCK_N=cfg["STATS_N"], num_warps=cfg["num_warps"], **FP_FUSION)
        TRITON_LAUNCHES += 1
    return lse, w, diag


def _pair_stats_chunked(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor):
    """Both directions' statistics of s * a @ b.T (no process group) from ONE GEMM per chunk of rows of a: the
    row statistics of a (LSE, w, diagonal) and the column statistics (the row statistics of b against a).

    Shapes: a (N, D), b (N, D), scale (1,) fp32 -> (r, w_r, diag, c, w_c), fp32 (N,) each.
    """
    global TRITON_LAUNCHES
    NA, D = a.shape
    NB = b.shape[0]
    cfg = _chunk_blocks(D)
    rows = min(NA, cfg["rows"])
    lse, w, diag = _row_outputs(NA, a.device)  # (NA,) each
    col = torch.zeros(3, NB, device=a.device, dtype=torch.float32)  # (3, NB) running base-2 max, sum, w-sum
    col[0].fill_(float("-inf"))
    combine = dict(BLOCK_M=cfg["COMBINE_M"], BLOCK_C=cfg["COMBINE_C"], num_warps=cfg["num_warps"])
    if cfg["GEMM"] == "triton":  # tiles compute their cosines and leave row and column partials
        row_part = torch.empty(3 * cdiv(NB, cfg["TILE_N"]) * rows, device=a.device, dtype=torch.float32)
        col_part = torch.empty(3 * cdiv(rows, cfg["TILE_M"]) * NB, device=a.device, dtype=torch.float32)
        for row0, r, _ in _cosine_chunks(a, b, rows, cublas=False):  # fixed chunk order: deterministic
            ncb, nrb = _tile_stats(a, b, scale, diag, row_part, col_part, row0, r, 0, cfg, store_cols=True)
            _chunk_row_combine_kernel[(cdiv(r, cfg["COMBINE_M"]),)](
                row_part, row_part, lse, w, diag, r, ncb, row0, 0, LOAD_DIAG=False, **combine, **FP_FUSION)
            _chunk_col_combine_kernel[(cdiv(NB, cfg["PAIR_N"]),)](
                col_part, col[0], col[1], col[2], NB, nrb, BLOCK_N=cfg["PAIR_N"], num_warps=cfg["num_warps"],
                **FP_FUSION)
            TRITON_LAUNCHES += 3
    else:
        ncb = cdiv(NB, cfg["PAIR_N"])
        part = torch.empty(3, ncb, rows, device=a.device, dtype=torch.float32)  # (3, NCB, R) row partials
        for row0, r, g in _cosine_chunks(a, b, rows):  # chunks in a fixed order: deterministic column statistics
            _chunk_pair_stats_kernel[(ncb,)](
                g, scale, part, col[0], col[1], col[2], r, NB, ncb, g.stride(0),
                BLOCK_M=cfg["PAIR_M"], BLOCK_N=cfg["PAIR_N"], num_warps=cfg["num_warps"], **FP_FUSION)
            _chunk_row_combine_kernel[(cdiv(r, cfg["COMBINE_M"]),)](part, g, lse, w, diag, r, ncb, row0,
                                                                     g.stride(0), **combine, **FP_FUSION)
            TRITON_LAUNCHES += 2
    col_lse = col[0] * 0.6931471805599453 + torch.log(col[1])  # (NB,)
    return lse, w, diag, col_lse, col[2] / col[1]


def _grad_chunked(a, b, lse_a, lse_b, scale, coef, offset: int) -> torch.Tensor:
    """As ``_grad_fused``; per chunk of R rows of a: G by cuBLAS, P = P^r + P^c - 2 delta by a Triton kernel
    into the inputs' dtype, then dA_chunk = s * coef * (P @ b) by cuBLAS (fp32 result, scaled, cast once)."""
    global TRITON_LAUNCHES
    NA, D = a.shape
    NB = b.shape[0]
    da = torch.empty_like(a)  # (NA, D)
    cfg = _chunk_blocks(D)
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
        else:
            grid = (cdiv(r, cfg["PROBS_M"]), cdiv(NB, cfg["PROBS_N"]))
            _chunk_probs_kernel[grid](
                g, p, lse_a, lse_b, scale, a, b, r, NB, D, row0, offset, g.stride(0), p.stride(0), a.stride(0),
                b.stride(0), BLOCK_M=cfg["PROBS_M"], BLOCK_N=cfg["PROBS_N"], num_warps=cfg["num_warps"], **FP_FUSION)
        TRITON_LAUNCHES += 1
        _gemm_fp32(p[:r], b, acc[:r])
        torch.mul(acc[:r], factor, out=da[row0:row0 + r])
    return da


STRATEGIES = ("chunked", "fused")
# The strategy ``clip_contrastive_loss`` runs when none is asked for (see the module docstring).
DEFAULT_STRATEGY = "chunked"


@functools.lru_cache(maxsize=None)
def _mm_out_dtype_problem(device: str, dtype: torch.dtype) -> str | None:
    """Why the chunked strategy's low-precision -> fp32 GEMM cannot run on ``device`` for ``dtype`` (None: it
    can). Checked once per (device, dtype) with a tiny GEMM shaped like the real calls (a row slice times a
    transposed view into a slice of an fp32 buffer), so a torch or backend without it is found before training."""
    if not device.startswith("cuda") or dtype == torch.float32:
        return None  # fp32 GEMMs need no out_dtype; on CPU (the interpreter) the GEMMs run in fp32
    if "dtype" not in torch.ops.aten.mm.overloads():
        return f"torch {torch.__version__} has no torch.mm(..., out_dtype=) (it came with torch 2.8)"
    try:
        a = torch.linspace(-1, 1, 48, device=device).reshape(3, 16).to(dtype)  # (3, 16)
        b = torch.linspace(1, -1, 80, device=device).reshape(5, 16).to(dtype)  # (5, 16)
        out = torch.empty(4, 5, device=device, dtype=torch.float32)
        torch.mm(a[1:], b.T, out_dtype=torch.float32, out=out[:2])
        want = a[1:].float() @ b.float().T
        if not torch.allclose(out[:2], want, rtol=1e-3, atol=1e-3):
            return f"torch.mm(..., out_dtype=torch.float32) on {dtype} gave wrong values on {device}"
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        return f"torch.mm(..., out_dtype=torch.float32) on {dtype} failed on {device}: {type(exc).__name__}: {exc}"
    return None


def _check_strategy(strategy: str | None) -> None:
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"clip_contrastive_loss: strategy must be one of {STRATEGIES} or None, got {strategy!r}")


def _resolve_strategy(strategy: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The strategy to run: the one asked for, else ``DEFAULT_STRATEGY``. Where the chunked strategy's bf16/fp16
    -> fp32 GEMM cannot run (torch < 2.8 on CUDA, or a backend without it), the default falls back to fused
    with one warning, and an explicit ``strategy="chunked"`` is an error that says why. ``strategy`` is already
    checked (``clip_contrastive_loss`` checks it before any path is chosen)."""
    chosen = DEFAULT_STRATEGY if strategy is None else strategy
    problem = _mm_out_dtype_problem(str(device), dtype) if chosen == "chunked" else None
    if problem is None:
        return chosen
    if strategy == "chunked":
        raise RuntimeError(f"clip_contrastive_loss: strategy='chunked' cannot run here: {problem}. Upgrade torch, "
                           "or pass strategy='fused'.")
    if (str(device), dtype) not in _WARNED_FALLBACK:
        _WARNED_FALLBACK.add((str(device), dtype))
        warnings.warn(f"clip_contrastive_loss: the default chunked strategy cannot run here ({problem}); using "
                      "strategy='fused' (slower on large batches).", RuntimeWarning, stacklevel=3)
    return "fused"


_WARNED_FALLBACK: set = set()


def _row_stats(a, b, scale, offset: int, strategy: str):
    return (_row_stats_chunked if strategy == "chunked" else _row_stats_fused)(a, b, scale, offset)


def _grad(a, b, lse_a, lse_b, scale, coef, offset: int, strategy: str):
    return (_grad_chunked if strategy == "chunked" else _grad_fused)(a, b, lse_a, lse_b, scale, coef, offset)


def _all_gather_rows(x: torch.Tensor, process_group) -> torch.Tensor:
    """(N_p, ...) on each rank -> (P * N_p, ...) in rank order, no autograd."""
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(parts, x.contiguous(), group=process_group)
    return torch.cat(parts, dim=0)


# ------------------------------------------------------------------------------------------------
# Autograd
# ------------------------------------------------------------------------------------------------
class _ClipContrastiveLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image_emb, text_emb, logit_scale, process_group, strategy):
        img = image_emb.detach().contiguous()  # (N_p, D)
        txt = text_emb.detach().contiguous()  # (N_p, D)
        scale = logit_scale.detach().reshape(1).to(device=img.device, dtype=torch.float32)  # (1,)
        n_local = img.shape[0]
        if process_group is None:
            offset, img_all, txt_all = 0, img, txt
        else:
            import torch.distributed as dist

            offset = dist.get_rank(process_group) * n_local
            img_all = _all_gather_rows(img, process_group)  # (N, D)
            txt_all = _all_gather_rows(txt, process_group)  # (N, D)

        if process_group is None and strategy == "chunked":  # one GEMM per chunk serves both directions
            r, w_r, diag, c, w_c = _pair_stats_chunked(img, txt, scale)
        else:
            r, w_r, diag = _row_stats(img, txt_all, scale, offset, strategy)  # row pass: local rows of S
            c, w_c, _ = _row_stats(txt, img_all, scale, offset, strategy)  # column pass: local columns of S
        stats = torch.stack([r, c, diag, w_r, w_c], dim=1)  # (N_p, 5)
        if process_group is not None:
            stats = _all_gather_rows(stats, process_group)  # (N, 5), identical on every rank
        n_total = stats.shape[0]
        sums = stats.sum(dim=0)  # (5,) fixed-order reductions: deterministic
        loss = (sums[0] + sums[1] - 2.0 * scale[0] * sums[2]) / (2 * n_total)
        dloss_dscale = (sums[3] + sums[4] - 2.0 * sums[2]) / (2 * n_total)

        r_all = stats[:, 0].contiguous() if process_group is not None else r  # (N,)
        c_all = stats[:, 1].contiguous() if process_group is not None else c  # (N,)
        ctx.save_for_backward(img, txt, img_all, txt_all, scale, r, c, r_all, c_all, dloss_dscale)
        ctx.offset = offset
        ctx.strategy = strategy
        ctx.n_total = n_total
        ctx.scale_shape = logit_scale.shape
        ctx.scale_dtype = logit_scale.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        img, txt, img_all, txt_all, scale, r, c, r_all, c_all, dloss_dscale = ctx.saved_tensors
        g = grad_out.detach().reshape(1).to(torch.float32)  # (1,)
        coef = g / (2 * ctx.n_total)  # (1,) stays on device: no host sync
        d_img = d_txt = d_scale = None
        if ctx.needs_input_grad[0]:
            d_img = _grad(img, txt_all, r, c_all, scale, coef, ctx.offset, ctx.strategy)  # (N_p, D)
        if ctx.needs_input_grad[1]:
            d_txt = _grad(txt, img_all, c, r_all, scale, coef, ctx.offset, ctx.strategy)  # (N_p, D)
        if ctx.needs_input_grad[2]:
            d_scale = (g[0] * dloss_dscale).reshape(ctx.scale_shape).to(ctx.scale_dtype)
        return d_img, d_txt, d_scale, None, None


# ------------------------------------------------------------------------------------------------
# Public function
# ------------------------------------------------------------------------------------------------
def clip_contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale,
                          process_group=None, strategy: str | None = None) -> torch.Tensor:
    """Symmetric CLIP contrastive loss without the N x N matrix (see the module docstring).

    Args:
        image_emb: image embeddings, rows L2-normalised (local rows when distributed).
        text_emb: text embeddings, rows L2-normalised, row i pairs with image row i.
        logit_scale: 0-d tensor (one element), already exponentiated, as open_clip passes it.
        process_group: ``None`` (default) for a local loss. A ``torch.distributed`` process group
            (e.g. ``dist.group.WORLD``) for the global-batch loss: every rank passes its local rows,
            gets the same global loss, exact ``dL_global/d(local rows)`` and the full ``dL_global/ds``.
        strategy: ``"chunked"`` (cuBLAS GEMMs per chunk of rows, Triton softmax kernels), ``"fused"`` (tile
            kernels, S never leaves registers) or ``None`` for ``DEFAULT_STRATEGY``. Same results up to
            summation order; see the module docstring for speed and memory.
    Shapes:
        image_emb, text_emb: (N, D) fp32/bf16/fp16; logit_scale: () -> loss () fp32 on the Triton
        path (input dtype on the plain-PyTorch CPU path).
    """
    _check_shapes(image_emb, text_emb)
    _check_strategy(strategy)
    if not torch.is_tensor(logit_scale):
        logit_scale = torch.tensor(float(logit_scale), device=image_emb.device)
    if logit_scale.numel() != 1:
        raise ValueError(f"clip_contrastive_loss: logit_scale must have one element, got shape "
                         f"{tuple(logit_scale.shape)}; pass the exponentiated scalar (model.logit_scale.exp()).")
    if triton is None or not use_triton(image_emb, text_emb):
        return clip_contrastive_loss_reference(image_emb, text_emb, logit_scale, process_group)
    if image_emb.dtype != text_emb.dtype:
        common = torch.promote_types(image_emb.dtype, text_emb.dtype)
        image_emb, text_emb = image_emb.to(common), text_emb.to(common)
    if image_emb.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"clip_contrastive_loss: dtype {image_emb.dtype} unsupported; use fp32, bf16 or fp16.")
    strategy = _resolve_strategy(strategy, image_emb.device, image_emb.dtype)
    if process_group is not None:
        _check_equal_rows(image_emb.shape[0], image_emb.device, process_group)
    return _ClipContrastiveLoss.apply(image_emb, text_emb, logit_scale, process_group, strategy)
