"""Compile every kclip kernel, with each GPU launch config, for an H100 (sm_90) - no GPU needed.

The interpreter (how CI runs the kernels) does not lower to PTX, so register/shared-memory overflows
and constructs that only fail in codegen would otherwise surface on the first GPU run. Triton's wheel
ships ptxas; ``triton.compile`` with an explicit target goes all the way to a cubin. Run as a script
(TRITON_INTERPRET must be unset): prints one line per compiled kernel, exits non-zero on a failure.
"""
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import kclip.kernels  # noqa: E402,F401  (binds the public functions before the op modules are read)

TARGET = GPUTarget("cuda", 90, 32)
H100_MAX_SHARED = 232_448  # bytes of shared memory one block may opt into on sm_90 (227 KiB)


def compile_kernel(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int):
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    src = ASTSource(fn=fn, signature=sig, constexprs={(list(sig).index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(src, target=TARGET, options=dict(num_warps=num_warps, num_stages=num_stages))
    shared = kernel.metadata.shared
    if shared > H100_MAX_SHARED:  # compile does not check this; the launch would fail with OutOfResources
        raise triton.runtime.errors.OutOfResources(shared, H100_MAX_SHARED, "shared memory")
    return shared


def contrastive(dtype: str):
    import importlib
    m = importlib.import_module("kclip.kernels.clip_contrastive_loss")
    prec = "ieee" if dtype == "fp32" else "tf32"
    for d in (512, 768):
        b = m._stats_blocks(d)
        sig = dict(a_ptr=f"*{dtype}", b_ptr=f"*{dtype}", scale_ptr="*fp32", lse_ptr="*fp32", w_ptr="*fp32",
                   diag_ptr="*fp32", NA="i32", NB="i32", D="i32", offset="i32", stride_a="i32", stride_b="i32")
        yield f"clip_contrastive_loss row_stats {dtype} D={d}", compile_kernel(
            m._row_stats_kernel, sig, dict(BLOCK_M=b["BLOCK_M"], BLOCK_N=b["BLOCK_N"], BLOCK_K=b["BLOCK_K"],
                                           UPCAST=False, PRECISION=prec, EVEN_K=d % b["BLOCK_K"] == 0),
            b["num_warps"], b["num_stages"])
        g = m._grad_blocks(d)
        sig = dict(a_ptr=f"*{dtype}", b_ptr=f"*{dtype}", lse_a_ptr="*fp32", lse_b_ptr="*fp32", scale_ptr="*fp32",
                   coef_ptr="*fp32", da_ptr=f"*{dtype}", NA="i32", NB="i32", D="i32", offset="i32", stride_a="i32",
                   stride_b="i32", stride_da="i32")
        yield f"clip_contrastive_loss grad {dtype} D={d}", compile_kernel(
            m._grad_kernel, sig, dict(BLOCK_M=g["BLOCK_M"], BLOCK_N=g["BLOCK_N"], BLOCK_K=g["BLOCK_K"],
                                      BLOCK_DO=g["BLOCK_DO"], UPCAST=False, PRECISION=prec,
                                      EVEN_K=d % g["BLOCK_K"] == 0), g["num_warps"], g["num_stages"])


def projected_mse(dtype: str):
    import importlib
    m = importlib.import_module("kclip.kernels.projected_mse_loss")
    tuner, _, _ = m._forward_kernel()
    sig = dict(x_ptr=f"*{dtype}", w_ptr=f"*{dtype}", b_ptr=f"*{dtype}", t_ptr=f"*{dtype}", g_ptr=f"*{dtype}",
               partial_ptr="*fp32", colsum_ptr="*fp32", M="i32", N="i32", K="i32", stride_xm="i32",
               stride_xk="i32", stride_wn="i32", stride_wk="i32", stride_tm="i32", stride_tn="i32",
               stride_gm="i32", stride_gn="i32", partial_stride="i32")
    usable = 0
    for cfg in tuner.configs:
        try:
            shared = compile_kernel(tuner.fn, sig, dict(HAS_BIAS=True, STORE_G=True, STORE_COLSUM=True, UPCAST=False,
                                                        INPUT_PRECISION="ieee" if dtype == "fp32" else "tf32",
                                                        **cfg.kwargs), cfg.num_warps, cfg.num_stages)
            usable += 1
        except triton.runtime.errors.OutOfResources as exc:  # the autotuner skips such configs too
            shared = f"skipped by the autotuner ({exc})"
        yield f"projected_mse_loss fwd {dtype} {cfg.kwargs}", shared
    if not usable:
        raise RuntimeError(f"projected_mse_loss {dtype}: no autotune config fits on sm_90")


def kmeans(dtype: str):
    import importlib
    m = importlib.import_module("kclip.kernels.kmeans_assign")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    for n, k in ((500_000, 1000), (1000, 8)):
        b = m._block_sizes(n, k, 4096, torch_dtype)
        sig = dict(x_ptr=f"*{dtype}", c_ptr=f"*{dtype}", c_sq_ptr="*fp32", labels_ptr="*i64", sqdist_ptr="*fp32",
                   N="i32", K="i32", D="i32", stride_xn="i32", stride_xd="i32", stride_ck="i32", stride_cd="i32")
        yield f"kmeans_assign {dtype} N={n} K={k}", compile_kernel(
            m._kmeans_assign_kernel, sig, dict(BLOCK_N=b["BLOCK_N"], BLOCK_K=b["BLOCK_K"], BLOCK_D=b["BLOCK_D"],
                                               UPCAST=False, IEEE=dtype == "fp32"), b["num_warps"], b["num_stages"])


def kmeans_update(dtype: str):
    import importlib
    m = importlib.import_module("kclip.kernels.kmeans_update")
    for d in (4096, 48):
        b = m._block_sizes(d)
        sig = dict(x_ptr=f"*{dtype}", order_ptr="*i64", offsets_ptr="*i64", sums_ptr="*fp32", D="i32",
                   stride_xn="i32", stride_xd="i32")
        yield f"kmeans_update {dtype} D={d}", compile_kernel(
            m._segment_sum_kernel, sig, dict(BLOCK_R=b["BLOCK_R"], BLOCK_D=b["BLOCK_D"]), b["num_warps"],
            b["num_stages"])


def main() -> int:
    failures = 0
    for gen in (contrastive, projected_mse, kmeans, kmeans_update):
        for dtype in ("bf16", "fp32"):
            try:
                for name, shared in gen(dtype):
                    print(f"ok  {name}: shared memory {shared}")
            except Exception as exc:
                failures += 1
                print(f"FAIL {gen.__name__} {dtype}: {type(exc).__name__}: {exc}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
