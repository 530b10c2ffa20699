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
statistics of ``S.T`` and ``dT`` is ``dI`` with the roles of (I, r) and (T, c) swapped. There are two
kernels, each launched twice (once per direction):

* ``_row_stats_kernel(A, B)``: one program per block of rows of A; an online (base-2) softmax over
  tiles of ``s * A @ B.T`` gives the row LSE, and in the same sweep the softmax-weighted mean cosine
  ``w`` (so ``dL/ds`` is known at the end of forward and needs no extra backward work). The diagonal
  ``G_ii`` (A_i . B_{i+offset}) is a tiny O(BLOCK_M * D) epilogue of the same program.
* ``_grad_kernel(A, B, lse_A, lse_B)``: one program per (row block of A, chunk of D): recompute the
  tile of ``S``, form ``P^r + P^c`` in registers, accumulate ``P @ B`` in fp32; the ``-2 delta`` term
  is a rank-1 epilogue (``-2 B_{i+offset}``), not a per-tile mask.

Pass count (tile matmuls of N x N x D each): forward 2 (row pass, column pass); backward 4 (per
direction: recompute S and the gradient GEMM) = **6**, versus the 4-matmul floor (1 forward + S, dI,
dT in backward). The floor needs column statistics and dT accumulated across programs, i.e.
floating-point atomics (order-dependent results) or an O(N^2 / block) buffer; both are refused here
(determinism, O(N) memory). What is fused instead: the diagonal and the ``dL/ds`` statistics ride in
the forward row passes (no diagonal mask or ds reduction in backward), and each backward program
loads every B tile once for both of its GEMMs. When D > 512 the backward splits D into chunks of at
most 512 columns, and each chunk recomputes its S tiles (D=768: 2 chunks of 512 padded, see limits).

Determinism: no atomics; every reduction is inside one program in a fixed order, or a ``torch.sum``
over an O(N) vector. Two runs give bit-identical loss and gradients.

Memory: saved for backward are the inputs and O(N) fp32 statistics (r, c, diag); the only
temporaries are the gradients themselves. No N x N tensor exists at any point.

Precision: inputs fp32/bf16/fp16, fp32 accumulation and fp32 softmax statistics. fp32 inputs use
IEEE fp32 dot products on the GPU (no TF32) so that they match the fp32 reference. The loss is
returned in fp32 (as ``F.cross_entropy`` under autocast would); gradients come back in the input
dtypes. Under the Triton CPU interpreter low-precision operands are upcast to fp32 before ``tl.dot``
(the interpreter mis-computes bf16 dots).

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
keeps local gradients). Backward programs hold a BLOCK_M x BLOCK_DO fp32 accumulator: D <= 512 in
one chunk; D > 512 in 256-wide chunks that each recompute their S tiles (D=768: 3 chunks). GPU block
sizes are fixed heuristics (no autotune), timed on an H200 (``--tune``). Measured there
(bench/results/clip_contrastive_loss.jsonl), this plan reaches only 42-78 TFLOP/s of useful work (4-matmul
count) at N=32k: 5-10% of the 782 TFLOP/s bf16 matmul ceiling, and eager PyTorch (cuBLAS logits) is 3-7x
faster wherever its N x N logits fit. The kernel wins on memory (O(N) above the inputs) and against Inf-CL
(2.4-4.2x); closing the speed gap is open work. Register spills are not the cause: compiled as a launch
specialises them, no bf16 default configuration spills and all use wgmma (bench/results/compile_sm90/).
What the compiled code shows instead: the D loop nested in the column loop drains its two-stage pipeline
at the end of every column tile, the gradient kernel loads each tile's B rows only after its S tile
(unpipelined), and each tile waits for its P @ B GEMM to finish. The launch options ``FLATTEN`` and
``PREFETCH`` (off until timed) address the first two; ``bench_clip_contrastive_loss --tune --tune-set
pipeline`` times them.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from .dispatch import cdiv, interpreting, use_triton

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
            m_new = tl.maximum(m, tl.max(t, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(t - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            w = w * alpha + tl.sum(p * g, axis=1)
            m = m_new

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
            t = g * qk
            p = tl.exp2(t - ra[:, None]) + tl.exp2(t - rb[None, :])
            p = tl.where(col_mask[None, :], p, 0.0)  # (BM, BN) P^r + P^c
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


def _row_stats(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, offset: int):
    """Row LSE, weighted mean cosine and diagonal cosine of s * a @ b.T.

    Shapes: a (NA, D), b (NB, D), scale (1,) fp32 -> three fp32 (NA,) vectors.
    """
    global TRITON_LAUNCHES
    NA, D = a.shape
    NB = b.shape[0]
    lse = torch.empty(NA, device=a.device, dtype=torch.float32)  # (NA,)
    w = torch.empty_like(lse)  # (NA,)
    diag = torch.empty_like(lse)  # (NA,)
    cfg = _stats_blocks(D)
    grid = (cdiv(NA, cfg["BLOCK_M"]),)
    _row_stats_kernel[grid](
        a, b, scale, lse, w, diag, NA, NB, D, offset, a.stride(0), b.stride(0),
        UPCAST=interpreting() and a.dtype != torch.float32, PRECISION=_precision(a.dtype),
        EVEN_K=D % cfg["BLOCK_K"] == 0, **cfg)
    TRITON_LAUNCHES += 1
    return lse, w, diag


def _grad(a, b, lse_a, lse_b, scale, coef, offset: int) -> torch.Tensor:
    """dA = s * coef * ((P^r + P^c) @ b - 2 b[offset + i]) without forming P.

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
        EVEN_K=D % cfg["BLOCK_K"] == 0, **cfg)
    TRITON_LAUNCHES += 1
    return da


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
    def forward(ctx, image_emb, text_emb, logit_scale, process_group):
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

        r, w_r, diag = _row_stats(img, txt_all, scale, offset)  # row pass: local rows of S
        c, w_c, _ = _row_stats(txt, img_all, scale, offset)  # column pass: local columns of S
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
            d_img = _grad(img, txt_all, r, c_all, scale, coef, ctx.offset)  # (N_p, D)
        if ctx.needs_input_grad[1]:
            d_txt = _grad(txt, img_all, c, r_all, scale, coef, ctx.offset)  # (N_p, D)
        if ctx.needs_input_grad[2]:
            d_scale = (g[0] * dloss_dscale).reshape(ctx.scale_shape).to(ctx.scale_dtype)
        return d_img, d_txt, d_scale, None


# ------------------------------------------------------------------------------------------------
# Public function
# ------------------------------------------------------------------------------------------------
def clip_contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale,
                          process_group=None) -> torch.Tensor:
    """Symmetric CLIP contrastive loss without the N x N matrix (see the module docstring).

    Args:
        image_emb: image embeddings, rows L2-normalised (local rows when distributed).
        text_emb: text embeddings, rows L2-normalised, row i pairs with image row i.
        logit_scale: 0-d tensor (one element), already exponentiated, as open_clip passes it.
        process_group: ``None`` (default) for a local loss. A ``torch.distributed`` process group
            (e.g. ``dist.group.WORLD``) for the global-batch loss: every rank passes its local rows,
            gets the same global loss, exact ``dL_global/d(local rows)`` and the full ``dL_global/ds``.
    Shapes:
        image_emb, text_emb: (N, D) fp32/bf16/fp16; logit_scale: () -> loss () fp32 on the Triton
        path (input dtype on the plain-PyTorch CPU path).
    """
    _check_shapes(image_emb, text_emb)
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
    if process_group is not None:
        _check_equal_rows(image_emb.shape[0], image_emb.device, process_group)
    return _ClipContrastiveLoss.apply(image_emb, text_emb, logit_scale, process_group)
