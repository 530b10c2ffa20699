"""Symmetric CLIP contrastive loss (InfoNCE both ways): exact, deterministic, distributed, memory-budgeted.

Maths. Rows ``I, T`` (N, D), already exponentiated logit scale ``s``; ``G = I @ T.T``, ``S = s * G``::

    r_i = logsumexp_j S_ij    c_j = logsumexp_i S_ij
    L   = 1/(2N) * [ sum_i (r_i - S_ii) + sum_j (c_j - S_jj) ]
        = 0.5 * (F.cross_entropy(S, arange(N)) + F.cross_entropy(S.T, arange(N)))
    dS  = g/(2N) * (P^r + P^c - 2 delta),  P^r_ij = exp(S_ij - r_i),  P^c_ij = exp(S_ij - c_j)
    dI  = s * dS @ T    dT = s * dS.T @ I
    dL/ds = 1/(2N) * [ sum_i w^r_i + sum_j w^c_j - 2 sum_i G_ii ],  w^r_i = sum_j P^r_ij G_ij (w^c likewise)

``dL/ds`` comes out of the forward's softmax statistics, so no strategy spends backward work on it.

Strategies (``strategy=``; one file each), matmuls of N x N x D per forward + backward:

* ``"resident"`` (3): G once by cuBLAS, statistics, then dS' = P^r + P^c - 2 delta written over G in the
  forward; backward is two GEMMs. Workspace N x N x 4 bytes.
* ``"chunked"`` (5): G per chunk of R rows by cuBLAS, Triton softmax kernels; backward recomputes G per chunk.
  Workspace R x N x (4 + itemsize) bytes.
* ``"fused"`` (6 at D <= 512, 10 at D = 768): tile kernels, S never leaves registers. O(N) memory.

``strategy=None`` asks ``plan.plan_clip_contrastive_loss``: resident when its workspace fits ``memory_budget``
bytes, else chunked with the largest chunk that fits, else fused. Default budget: 1/16 of the CUDA device's
memory, 256 MiB on CPU. Resident and chunked need the bf16/fp16 -> fp32 ``torch.mm(out_dtype=)`` of torch >= 2.8
on CUDA; without it the planned strategy falls back to fused with one warning.

Precision: fp32/bf16/fp16 inputs, fp32 accumulation and statistics, probabilities in the inputs' dtype, fp32
inputs without TF32 (cuBLAS: unless the caller allowed it); loss in fp32, gradients in the input dtypes. The
interpreter upcasts bf16 before ``tl.dot``.
Determinism: no atomics, fixed reduction orders: two runs give bit-identical loss and gradients.

Distributed (``process_group``): each rank passes its local rows (equal N_p on every rank); I and T are
all-gathered without autograd, O(N) statistics are all-gathered in the forward, and backward has no collective.
``image_emb.grad``/``text_emb.grad`` are exactly dL_global/d(local rows) and ``logit_scale.grad`` is the full
dL_global/ds on every rank: data-parallel averaging of encoder gradients must be undone (x P, see kclip.losses).

torch.compile: a one-process call traces as two custom ops (``kclip::clip_contrastive_forward`` and
``_backward``), so code around it compiles with ``fullgraph=True``; a distributed call runs eagerly.

Limits: 2-D inputs of one shape, N >= 1, ``logit_scale`` one element. Without CUDA and without
``TRITON_INTERPRET=1`` the PyTorch reference runs (distributed too).
"""
from __future__ import annotations

import functools
import warnings
import weakref

import torch
import torch.nn.functional as F

from ..dispatch import use_triton
from . import _common, resident
from ._common import LAUNCH_OVERRIDES, _all_gather_rows, triton
from .chunked import _chunk_blocks, _grad_chunked, _pair_stats_chunked, _row_stats_chunked
from .fused import _grad_blocks, _grad_fused, _row_stats_fused, _stats_blocks  # noqa: F401  (blocks: bench, tests)
from .plan import (STRATEGIES, ContrastivePlan, chunk_rows_for, default_memory_budget, gemm_equivalents,
                   hbm_bytes_per_elem, plan_clip_contrastive_loss, workspace_bytes)

if triton is not None:  # the kernels, for bench/compile_sm90.py and readers of this package
    from .chunked import (_chunk_col_combine_kernel, _chunk_pair_stats_kernel, _chunk_probs_kernel,  # noqa: F401
                          _chunk_row_combine_kernel, _chunk_row_stats_kernel, _chunk_tile_stats_kernel)
    from .fused import _grad_kernel, _row_stats_kernel  # noqa: F401


def __getattr__(name: str):
    if name == "TRITON_LAUNCHES":  # a live counter kept in _common (a plain import would copy the int)
        return _common.TRITON_LAUNCHES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    last agreed on: a loop with a fixed batch size pays it once. Ranks whose sizes change together are
    checked; a rank that changes its size *alone* meets the other ranks' feature all-gather instead,
    which gloo aborts ("Is there a distributed collective mismatch") and NCCL does not check (a hang until
    the group's timeout). ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` checks every collective's shapes (slow).
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
# Strategy choice
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _mm_out_dtype_problem(device: str, dtype: torch.dtype) -> str | None:
    """Why the resident/chunked strategies' low-precision -> fp32 GEMM cannot run on ``device`` for ``dtype`` (None:
    it can). Checked once per (device, dtype) with a tiny GEMM shaped like the real calls (a row slice times a
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


_WARNED_FALLBACK: set = set()


def _resolve_strategy(strategy: str | None, device: torch.device, dtype: torch.dtype,
                      planned: str = "resident") -> str:
    """The strategy to run: the one asked for, else ``planned`` (the budget planner's choice). Where the
    resident/chunked bf16/fp16 -> fp32 GEMM cannot run (torch < 2.8 on CUDA), a planned choice falls back to fused
    with one warning and an explicit one is an error that says why."""
    chosen = planned if strategy is None else strategy
    problem = _mm_out_dtype_problem(str(device), dtype) if chosen in ("resident", "chunked") else None
    if problem is None:
        return chosen
    if strategy is not None:
        raise RuntimeError(f"clip_contrastive_loss: strategy={strategy!r} cannot run here: {problem}. Upgrade "
                           "torch, or pass strategy='fused'.")
    if (str(device), dtype) not in _WARNED_FALLBACK:
        _WARNED_FALLBACK.add((str(device), dtype))
        warnings.warn(f"clip_contrastive_loss: the planned {chosen} strategy cannot run here ({problem}); using "
                      "strategy='fused' (slower on large batches).", RuntimeWarning, stacklevel=3)
    return "fused"


def plan_for(image_emb: torch.Tensor, world_size: int = 1, strategy: str | None = None,
             memory_budget: int | None = None) -> ContrastivePlan:
    """What ``clip_contrastive_loss`` runs for these local rows (N_p, D) on ``world_size`` ranks: the strategy (after
    the fallback above), its workspace in bytes and the chunk rows of ``chunked``. ``memory_budget`` in bytes
    (None: ``default_memory_budget`` of the tensor's device)."""
    n_rows, dim = image_emb.shape
    budget = default_memory_budget(image_emb.device) if memory_budget is None else int(memory_budget)
    shape = (n_rows, n_rows * world_size, dim, image_emb.dtype, world_size)
    auto = plan_clip_contrastive_loss(*shape, budget)
    name = _resolve_strategy(strategy, image_emb.device, image_emb.dtype, auto.strategy)
    if name == auto.strategy:
        return auto
    # asked for explicitly: chunked takes the largest chunk the budget allows (its default R without a budget)
    rows = (chunk_rows_for(*shape, budget) or _chunk_blocks(dim)["min_rows"]) if name == "chunked" and \
        memory_budget is not None else None
    return ContrastivePlan(name, workspace_bytes(name, *shape, rows), rows)


def _row_stats(a, b, scale, offset: int, strategy: str, rows):
    if strategy == "chunked":
        return _row_stats_chunked(a, b, scale, offset, rows)
    return _row_stats_fused(a, b, scale, offset)


def _grad(a, b, lse_a, lse_b, scale, coef, offset: int, strategy: str, rows):
    if strategy == "chunked":
        return _grad_chunked(a, b, lse_a, lse_b, scale, coef, offset, rows)
    return _grad_fused(a, b, lse_a, lse_b, scale, coef, offset)


# ------------------------------------------------------------------------------------------------
# One process: the forward's and the backward's kernel work, eagerly or as torch custom ops
# ------------------------------------------------------------------------------------------------
def _finish(stats: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, dL/ds) from the (N, 5) statistics [r, c, diag, w_r, w_c]."""
    n_total = stats.shape[0]
    # per-row differences before the (fixed-order) sums: r_i and s G_ii are close when the positive dominates,
    # and summing each first would cancel to a few ulps of N * s
    s_diag = scale[0] * stats[:, 2]  # (N,)
    loss = ((stats[:, 0] - s_diag) + (stats[:, 1] - s_diag)).sum() / (2 * n_total)
    dloss_dscale = ((stats[:, 3] - stats[:, 2]) + (stats[:, 4] - stats[:, 2])).sum() / (2 * n_total)
    return loss, dloss_dscale


def _local_forward_impl(img, txt, scale, strategy: str, chunk_rows: int):
    """One process's forward: (loss, dS' (resident; else empty), r, c (chunked/fused; else empty), dL/ds)."""
    rows = chunk_rows if chunk_rows > 0 else None

    def empty():  # an absent output (a custom op's outputs may not share storage)
        return img.new_empty(0, dtype=torch.float32)

    if strategy == "resident":
        g = resident.cosines(img, txt)  # (N, N) fp32
        r, w_r, diag, c, w_c = resident.pair_stats(g, scale, img.shape[1])
    elif strategy == "chunked":  # one GEMM per chunk serves both directions
        r, w_r, diag, c, w_c = _pair_stats_chunked(img, txt, scale, rows)
    else:
        r, w_r, diag = _row_stats(img, txt, scale, 0, strategy, rows)  # rows of S
        c, w_c, _ = _row_stats(txt, img, scale, 0, strategy, rows)  # columns of S
    loss, dloss_dscale = _finish(torch.stack([r, c, diag, w_r, w_c], dim=1), scale)
    if strategy == "resident":  # the gradient is known now: dS' over the cosines' buffer, G freed
        return loss, resident.probs_in_place(g, img, txt, r, c, scale, 0), empty(), empty(), dloss_dscale
    return loss, empty(), r, c, dloss_dscale


def _local_backward_impl(img, txt, scale, ds, r, c, coef, strategy: str, chunk_rows: int, need_img: bool,
                         need_txt: bool):
    """One process's (dI, dT) (empty where not needed) for the backward coefficient ``coef`` = g / (2N)."""
    d_img, d_txt = img.new_empty(0), txt.new_empty(0)
    if strategy == "resident":
        factor = scale * coef  # (1,) s * g / (2N)
        if need_img:
            d_img = resident.grad(ds, txt, factor, img.dtype)  # (N, D)
        if need_txt:
            d_txt = resident.grad(ds.T, img, factor, img.dtype)  # (N, D): dS'.T serves the text side
    else:
        how = (0, strategy, chunk_rows if chunk_rows > 0 else None)
        if need_img:
            d_img = _grad(img, txt, r, c, scale, coef, *how)  # (N, D)
        if need_txt:
            d_txt = _grad(txt, img, c, r, scale, coef, *how)  # (N, D)
    return d_img, d_txt


# The same work as the torch custom ops ``kclip::clip_contrastive_forward`` / ``_backward`` (declared at import: a
# schema and Python functions, nothing compiled or launched). torch.compile sees two opaque nodes with shape
# functions instead of tracing Triton's launchers, so code around the loss compiles without a graph break; eager
# calls skip the dispatcher. Distributed calls (collectives inside) stay eager.
@torch.library.custom_op("kclip::clip_contrastive_forward", mutates_args=(),
                         schema="(Tensor img, Tensor txt, Tensor scale, str strategy, int chunk_rows) "
                                "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def _forward_op(img, txt, scale, strategy, chunk_rows):
    return _local_forward_impl(img, txt, scale, strategy, chunk_rows)


@_forward_op.register_fake
def _(img, txt, scale, strategy, chunk_rows):
    n = img.shape[0]
    f32 = dict(dtype=torch.float32)
    resident_ = strategy == "resident"
    return (img.new_empty((), **f32), img.new_empty((n, n)) if resident_ else img.new_empty((0,), **f32),
            img.new_empty((0,) if resident_ else (n,), **f32), img.new_empty((0,) if resident_ else (n,), **f32),
            img.new_empty((), **f32))


@torch.library.custom_op("kclip::clip_contrastive_backward", mutates_args=(),
                         schema="(Tensor img, Tensor txt, Tensor scale, Tensor ds, Tensor r, Tensor c, Tensor coef, "
                                "str strategy, int chunk_rows, bool need_img, bool need_txt) -> (Tensor, Tensor)")
def _backward_op(img, txt, scale, ds, r, c, coef, strategy, chunk_rows, need_img, need_txt):
    return _local_backward_impl(img, txt, scale, ds, r, c, coef, strategy, chunk_rows, need_img, need_txt)


@_backward_op.register_fake
def _(img, txt, scale, ds, r, c, coef, strategy, chunk_rows, need_img, need_txt):
    return (torch.empty_like(img) if need_img else img.new_empty(0),
            torch.empty_like(txt) if need_txt else txt.new_empty(0))


def _local_forward(*args):
    return (_forward_op if torch.compiler.is_compiling() else _local_forward_impl)(*args)


def _local_backward(*args):
    return (_backward_op if torch.compiler.is_compiling() else _local_backward_impl)(*args)


# ------------------------------------------------------------------------------------------------
# Autograd
# ------------------------------------------------------------------------------------------------
class _ClipContrastiveLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image_emb, text_emb, logit_scale, process_group, strategy, chunk_rows):
        img = image_emb.detach().contiguous()  # (N_p, D)
        txt = text_emb.detach().contiguous()  # (N_p, D)
        scale = logit_scale.detach().reshape(1).to(device=img.device, dtype=torch.float32)  # (1,)
        ctx.strategy, ctx.chunk_rows = strategy, chunk_rows
        ctx.scale_shape, ctx.scale_dtype = logit_scale.shape, logit_scale.dtype
        ctx.local = process_group is None
        if ctx.local:
            loss, ds, r, c, dloss_dscale = _local_forward(img, txt, scale, strategy, chunk_rows or 0)
            ctx.save_for_backward(img, txt, scale, ds, r, c, dloss_dscale)
            ctx.n_total = img.shape[0]
            return loss

        import torch.distributed as dist

        n_local, dim = img.shape
        offset = dist.get_rank(process_group) * n_local
        img_all = _all_gather_rows(img, process_group)  # (N, D)
        txt_all = _all_gather_rows(txt, process_group)  # (N, D)
        g_img = g_txt = None
        if strategy == "resident":
            g_img = resident.cosines(img, txt_all)  # (N_p, N) fp32: rows of S / s
            g_txt = resident.cosines(txt, img_all)  # (N_p, N) fp32: columns of S / s, transposed
            r, w_r, diag = resident.row_stats(g_img, scale, offset, dim)
            c, w_c, _ = resident.row_stats(g_txt, scale, offset, dim)
        else:
            r, w_r, diag = _row_stats(img, txt_all, scale, offset, strategy, chunk_rows)  # local rows of S
            c, w_c, _ = _row_stats(txt, img_all, scale, offset, strategy, chunk_rows)  # local columns of S
        stats = _all_gather_rows(torch.stack([r, c, diag, w_r, w_c], dim=1), process_group)  # (N, 5), all ranks
        loss, dloss_dscale = _finish(stats, scale)
        r_all, c_all = stats[:, 0].contiguous(), stats[:, 1].contiguous()  # (N,)
        if strategy == "resident":  # the gradient is known now: dS' over the cosines' buffers, G freed
            ds_img = resident.probs_in_place(g_img, img, txt_all, r, c_all, scale, offset)  # (N_p, N)
            ds_txt = resident.probs_in_place(g_txt, txt, img_all, c, r_all, scale, offset)
            ctx.save_for_backward(img, img_all, txt_all, scale, ds_img, ds_txt, dloss_dscale)
        else:
            ctx.save_for_backward(img, txt, img_all, txt_all, scale, r, c, r_all, c_all, dloss_dscale)
        ctx.offset, ctx.n_total = offset, stats.shape[0]
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        g = grad_out.detach().reshape(1).to(torch.float32)  # (1,)
        coef = g / (2 * ctx.n_total)  # (1,) stays on device: no host sync
        d_img = d_txt = d_scale = None
        need_img, need_txt = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.local:
            img, txt, scale, ds, r, c, dloss_dscale = ctx.saved_tensors
            d_img, d_txt = _local_backward(img, txt, scale, ds, r, c, coef, ctx.strategy, ctx.chunk_rows or 0,
                                           need_img, need_txt)
            d_img, d_txt = (d_img if need_img else None), (d_txt if need_txt else None)
        elif ctx.strategy == "resident":
            img, img_all, txt_all, scale, ds_img, ds_txt, dloss_dscale = ctx.saved_tensors
            factor = scale * coef  # (1,) s * g / (2N)
            if need_img:
                d_img = resident.grad(ds_img, txt_all, factor, img.dtype)  # (N_p, D)
            if need_txt:  # the text rows' own dS'
                d_txt = resident.grad(ds_txt, img_all, factor, img.dtype)
        else:
            img, txt, img_all, txt_all, scale, r, c, r_all, c_all, dloss_dscale = ctx.saved_tensors
            how = (ctx.offset, ctx.strategy, ctx.chunk_rows)
            if need_img:
                d_img = _grad(img, txt_all, r, c_all, scale, coef, *how)  # (N_p, D)
            if need_txt:
                d_txt = _grad(txt, img_all, c, r_all, scale, coef, *how)  # (N_p, D)
        if ctx.needs_input_grad[2]:
            d_scale = (g[0] * dloss_dscale).reshape(ctx.scale_shape).to(ctx.scale_dtype)
        return d_img, d_txt, d_scale, None, None, None


# ------------------------------------------------------------------------------------------------
# Public function
# ------------------------------------------------------------------------------------------------
def clip_contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale, process_group=None,
                          strategy: str | None = None, memory_budget: int | None = None) -> torch.Tensor:
    """Symmetric CLIP contrastive loss with the workspace its memory budget allows (see the module docstring).

    Args:
        image_emb: image embeddings, rows L2-normalised (local rows when distributed).
        text_emb: text embeddings, rows L2-normalised, row i pairs with image row i.
        logit_scale: 0-d tensor (one element), already exponentiated, as open_clip passes it.
        process_group: ``None`` (default) for a local loss. A ``torch.distributed`` process group
            (e.g. ``dist.group.WORLD``) for the global-batch loss: every rank passes its local rows,
            gets the same global loss, exact ``dL_global/d(local rows)`` and the full ``dL_global/ds``.
        strategy: ``"resident"``, ``"chunked"``, ``"fused"``, or ``None``: the planner's choice under
            ``memory_budget``. Same results up to summation order.
        memory_budget: bytes of workspace allowed (None: 1/16 of the CUDA device's memory, 256 MiB on CPU);
            ``plan_for`` tells what it buys.
    Shapes:
        image_emb, text_emb: (N, D) fp32/bf16/fp16; logit_scale: () -> loss () fp32 on the Triton
        path (input dtype on the plain-PyTorch CPU path).
    """
    _check_shapes(image_emb, text_emb)
    _check_strategy(strategy)
    if memory_budget is not None and memory_budget < 0:
        raise ValueError(f"clip_contrastive_loss: memory_budget must be >= 0 bytes (or None: automatic), got "
                         f"{memory_budget}")
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
    world = 1
    if process_group is not None:
        import torch.distributed as dist

        _check_equal_rows(image_emb.shape[0], image_emb.device, process_group)
        world = dist.get_world_size(process_group)
    plan = plan_for(image_emb, world, strategy, memory_budget)
    return _ClipContrastiveLoss.apply(image_emb, text_emb, logit_scale, process_group, plan.strategy,
                                      plan.chunk_rows)


__all__ = ["clip_contrastive_loss", "clip_contrastive_loss_reference", "plan_clip_contrastive_loss", "plan_for",
           "default_memory_budget", "workspace_bytes", "gemm_equivalents", "hbm_bytes_per_elem", "ContrastivePlan",
           "STRATEGIES", "LAUNCH_OVERRIDES"]
