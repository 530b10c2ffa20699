"""Compile every kclip kernel for an H100/H200 (sm_90) as a launch there would, and report what ptxas says.

No GPU needed: Triton's wheel ships ptxas, and ``triton.compile`` with an explicit target goes all the way to
a cubin. The Triton interpreter (how CI runs the kernels) never lowers to PTX, so register spills, shared-memory
overflows and constructs that only fail in code generation would otherwise surface on the first GPU run.

Faithful to the runtime: a launch specialises its arguments before compiling (an integer equal to 1 becomes a
compile-time constant, integers and pointers divisible by 16 are marked so, which is what lets loads vectorise
and strides fold away). Each kernel here is compiled with the specialisation Triton's own launcher computes
for representative arguments (the shapes of issue #13: contrastive N 32k x D 512/768, projected-MSE B 4096 x
d 512 x d' 4096, k-means 500k x 4096 x 1000), not with a generic signature: a generic one reports register
spills the real kernel does not have (the 552- and 1184-byte spills quoted in issue #13 came from that).

    python -m bench.compile_sm90                                  # one line per kernel and launch config
    python -m bench.compile_sm90 --out bench/results/compile_sm90.md   # and the table, with versions

Each line: shared memory, registers per thread, spill bytes (stores), and how many wgmma (Hopper tensor-core)
instructions the PTX holds (and how many pre-Hopper mma.sync ones: a tile under 64 rows cannot use wgmma;
fp32 inputs use IEEE FMAs on purpose, no tensor cores). Exits 1 if any default launch config fails to compile
or overflows shared memory.
Run it as a script or module (``TRITON_INTERPRET`` must be unset; it is removed here before Triton loads).
"""
from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime as _dt  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import kclip.kernels  # noqa: E402,F401  (binds the public functions before the op modules are read)
from kclip.kernels.dispatch import FP_FUSION  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
H100_MAX_SHARED = 232_448  # bytes of shared memory one block may opt into on sm_90 (227 KiB)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Report:
    """What one compiled kernel costs on sm_90."""

    name: str
    dtype: str
    shape: str
    config: dict
    shared: int = 0
    registers: int | None = None
    spill_bytes: int | None = None
    wgmma: int = 0
    mma_sync: int = 0
    role: str = "default"  # "default": what a launch uses today; "autotune"/"tune": a candidate
    error: str = ""
    extra: dict = field(default_factory=dict)

    def line(self) -> str:
        mark = "ok  " if not self.error else "FAIL "
        head = f"{mark}{self.name} {self.dtype} {self.shape} [{self.role}] {self.config}"
        if self.error:
            return f"{head}: {self.error}"
        regs = "?" if self.registers is None else self.registers
        spill = "?" if self.spill_bytes is None else self.spill_bytes
        return (f"{head}: shared memory {self.shared}, registers {regs}, spill {spill} B, wgmma {self.wgmma}, "
                f"mma.sync {self.mma_sync}")


def _pointer(dtype: str) -> torch.Tensor:
    return torch.empty(8, dtype=_DTYPES[dtype])  # only its dtype and (16-byte) alignment matter


def _specialize(fn, args: dict, constexprs: dict):
    """(signature, constants, attrs) as Triton's launcher would build them for these argument values."""
    defaults = {k: p.default for k, p in inspect.signature(fn.fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs or name in defaults and name not in args:
            signature[name] = "constexpr"
            constants[(i,)] = constexprs.get(name, defaults.get(name))
            continue
        if name not in args:
            raise KeyError(f"{fn.__name__}: no representative value for argument {name!r}")
        # the launcher's own routine (Triton 3.6, on the GPU image, and newer): the answer a launch gets
        ty, how = native_specialize_impl(BaseBackend, args[name], False, True, True)
        signature[name] = ty
        if ty == "constexpr":
            constants[(i,)] = how
        elif how:
            attrs[(i,)] = BaseBackend.parse_attr(how)
    return signature, constants, attrs


def _compile(src: ASTSource, num_warps: int, num_stages: int):
    """``triton.compile`` for sm_90 and the log of Triton's own ptxas run on it.

    The log is the one a launch's compile writes, so registers and spills come with Triton's own ptxas flags
    (from 3.8 on, ``--regAllocOptLevel=2``, a workaround for ptxas 13.x) and its own ptxas (from 3.9 on, the
    CUDA 13.4 one also for sm_90). A kernel found in Triton's cache would skip ptxas, so it is compiled afresh.
    """
    log = io.StringIO()
    with triton.knobs.compilation.scope(), triton.knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        triton.knobs.compilation.always_compile = True
        triton.knobs.nvidia.dump_ptxas_log = True
        kernel = triton.compile(src, target=TARGET, options=dict(num_warps=num_warps, num_stages=num_stages,
                                                                  **FP_FUSION))  # the launches' options
    return kernel, log.getvalue()


def _ptxas_numbers(log: str) -> tuple[int | None, int | None]:
    """(registers per thread, spill-store bytes) from a ``ptxas -v`` log; None where the log does not say."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    return (int(regs.group(1)) if regs else None), (int(spill.group(1)) if spill else None)


def compile_kernel(rep: Report, fn, args: dict, constexprs: dict, num_warps: int, num_stages: int) -> Report:
    """Compile ``fn`` for sm_90 specialised for ``args``; fill ``rep`` (the error, if any, goes in it)."""
    try:
        signature, constants, attrs = _specialize(fn, args, constexprs)
        src = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
        kernel, log = _compile(src, num_warps, num_stages)
        rep.shared = kernel.metadata.shared
        if rep.shared > H100_MAX_SHARED:  # compile does not check this; the launch would fail with OutOfResources
            raise triton.runtime.errors.OutOfResources(rep.shared, H100_MAX_SHARED, "shared memory")
        ptx = kernel.asm["ptx"]
        rep.wgmma = ptx.count("wgmma.mma_async")
        rep.mma_sync = len(re.findall(r"\bmma\.sync", ptx))
        rep.registers, rep.spill_bytes = _ptxas_numbers(log)
    except Exception as exc:  # noqa: BLE001 - reported per config
        rep.error = f"{type(exc).__name__}: {str(exc)[:300]}"
    return rep


# --------------------------------------------------------------------------------------------------------
# The kernels, with representative runtime arguments
# --------------------------------------------------------------------------------------------------------

def contrastive(dtype: str, n: int = 32768):
    m = importlib.import_module("kclip.kernels.clip_contrastive_loss")
    from bench.bench_clip_contrastive_loss import TUNE_GRAD, TUNE_PIPELINE_GRAD, TUNE_PIPELINE_STATS, TUNE_STATS
    prec = "ieee" if dtype == "fp32" else "tf32"
    p, f32 = _pointer(dtype), _pointer("fp32")
    for d in (512, 768):
        stats_args = dict(a_ptr=p, b_ptr=p, scale_ptr=f32, lse_ptr=f32, w_ptr=f32, diag_ptr=f32, NA=n, NB=n, D=d,
                          offset=0, stride_a=d, stride_b=d)
        grad_args = dict(a_ptr=p, b_ptr=p, lse_a_ptr=f32, lse_b_ptr=f32, scale_ptr=f32, coef_ptr=f32, da_ptr=p,
                         NA=n, NB=n, D=d, offset=0, stride_a=d, stride_b=d, stride_da=d)
        default_stats, default_grad = m._stats_blocks(d), m._grad_blocks(d)
        stats_cfgs = [("default", default_stats)]
        grad_cfgs = [("default", default_grad)]
        if dtype == "bf16":  # the --tune candidates, as the bench would launch them (pipeline options on the defaults)
            stats_cfgs += [("tune", c) for c in TUNE_STATS if c != default_stats]
            stats_cfgs += [("tune", {**default_stats, **c}) for c in TUNE_PIPELINE_STATS]
            grad_cfgs += [("tune", c) for c in TUNE_GRAD if c != default_grad]
            grad_cfgs += [("tune", {**default_grad, **c}) for c in TUNE_PIPELINE_GRAD]
        for name, kernel, args, cfgs in (("row_stats", m._row_stats_kernel, stats_args, stats_cfgs),
                                         ("grad", m._grad_kernel, grad_args, grad_cfgs)):
            for role, cfg in cfgs:
                kw = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
                yield compile_kernel(
                    Report(f"clip_contrastive_loss {name}", dtype, f"N={n} D={d}", cfg, role=role), kernel, args,
                    dict(UPCAST=False, PRECISION=prec, EVEN_K=d % cfg["BLOCK_K"] == 0, **kw),
                    cfg["num_warps"], cfg["num_stages"])
    # the chunked strategy's softmax kernels: they read the fp32 cosines of R rows (no D, no tl.dot)
    chunk = m._chunk_blocks(768)
    rows = chunk["rows"]
    chunk_stats = dict(g_ptr=f32, scale_ptr=f32, lse_ptr=f32, w_ptr=f32, diag_ptr=f32, R=rows, NB=n, row0=0,
                       offset=0, stride_g=n)
    chunk_probs = dict(g_ptr=f32, p_ptr=p, lse_a_ptr=f32, lse_b_ptr=f32, scale_ptr=f32, a_ptr=p, b_ptr=p, R=rows,
                       NB=n, D=768, row0=0, offset=0, stride_g=n, stride_p=n, stride_a=768, stride_b=768)
    ncb = triton.cdiv(n, chunk["PAIR_N"])
    chunk_pair = dict(g_ptr=f32, scale_ptr=f32, part_ptr=f32, col_m_ptr=f32, col_l_ptr=f32, col_w_ptr=f32, R=rows,
                      NB=n, NCB=ncb, stride_g=n)
    chunk_combine = dict(part_ptr=f32, g_ptr=f32, lse_ptr=f32, w_ptr=f32, diag_ptr=f32, R=rows, NCB=ncb, row0=0,
                         stride_g=n)
    for name, kernel, args, blocks in (
            ("chunk_row_stats", m._chunk_row_stats_kernel, chunk_stats, dict(BLOCK_M="STATS_M", BLOCK_N="STATS_N")),
            ("chunk_pair_stats", m._chunk_pair_stats_kernel, chunk_pair, dict(BLOCK_M="PAIR_M", BLOCK_N="PAIR_N")),
            ("chunk_row_combine", m._chunk_row_combine_kernel, chunk_combine,
             dict(BLOCK_M="COMBINE_M", BLOCK_C="COMBINE_C")),
            ("chunk_probs", m._chunk_probs_kernel, chunk_probs, dict(BLOCK_M="PROBS_M", BLOCK_N="PROBS_N"))):
        constexprs = {k: chunk[v] for k, v in blocks.items()}
        cfg = {**constexprs, "num_warps": chunk["num_warps"], "num_stages": 3}
        yield compile_kernel(Report(f"clip_contrastive_loss {name}", dtype, f"N={n} R={rows}", cfg, role="default"),
                             kernel, args, constexprs, cfg["num_warps"], cfg["num_stages"])
    # GEMM="triton": the chunk kernels that compute their own cosine tiles (tl.dot over D)
    prec = "ieee" if dtype == "fp32" else "tf32"
    for d in (512, 768):
        tile = {k: chunk[k] for k in ("TILE_M", "TILE_N", "TILE_K", "TILE_WARPS", "TILE_STAGES")}
        consts = dict(BLOCK_M=tile["TILE_M"], BLOCK_N=tile["TILE_N"], BLOCK_K=tile["TILE_K"], UPCAST=False,
                      PRECISION=prec, EVEN_K=d % tile["TILE_K"] == 0)
        tile_stats = dict(a_ptr=p, b_ptr=p, scale_ptr=f32, row_part_ptr=f32, col_part_ptr=f32, diag_ptr=f32, R=rows,
                          NB=n, D=d, row0=0, offset=0, stride_a=d, stride_b=d, NCB=triton.cdiv(n, tile["TILE_N"]),
                          NRB=triton.cdiv(rows, tile["TILE_M"]))
        probs = dict(chunk_probs, D=d, stride_a=d, stride_b=d)
        cfg = {**consts, "num_warps": tile["TILE_WARPS"], "num_stages": tile["TILE_STAGES"]}
        for name, kernel, args, extra in (("chunk_tile_stats", m._chunk_tile_stats_kernel, tile_stats,
                                           dict(STORE_COLS=True)),
                                          ("chunk_probs TILE_GEMM", m._chunk_probs_kernel, probs, dict(TILE_GEMM=True))):
            yield compile_kernel(Report(f"clip_contrastive_loss {name}", dtype, f"N={n} R={rows} D={d}", cfg,
                                        role="option"), kernel, args, {**consts, **extra}, cfg["num_warps"],
                                 cfg["num_stages"])


def projected_mse(dtype: str, b: int = 4096, d: int = 512, d_out: int = 4096):
    m = importlib.import_module("kclip.kernels.projected_mse_loss")
    tuner, min_bm, min_bn = m._forward_kernel()
    p, f32 = _pointer(dtype), _pointer("fp32")
    target = _pointer("fp16" if dtype == "bf16" else dtype)  # the bf16 student reads the fp16 teacher cache
    args = dict(x_ptr=p, w_ptr=p, b_ptr=p, t_ptr=target, g_ptr=p, partial_ptr=f32, colsum_ptr=f32,
                M=b, N=d_out, K=d, stride_xm=d, stride_xk=1, stride_wn=d, stride_wk=1, stride_tm=d_out,
                stride_tn=1, stride_gm=d_out, stride_gn=1, partial_stride=triton.cdiv(d_out, min_bn))
    role = "autotune" if len(tuner.configs) > 1 else "default"
    for cfg in tuner.configs:
        yield compile_kernel(
            Report("projected_mse_loss fwd", dtype, f"B={b} d={d} d'={d_out}",
                   dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages), role=role),
            tuner.fn, args, dict(HAS_BIAS=True, STORE_G=True, STORE_COLSUM=True, UPCAST=False,
                                 INPUT_PRECISION="ieee" if dtype == "fp32" else "tf32", **cfg.kwargs),
            cfg.num_warps, cfg.num_stages)


def kmeans(dtype: str):
    m = importlib.import_module("kclip.kernels.kmeans_assign")
    p, f32, i64 = _pointer(dtype), _pointer("fp32"), torch.empty(8, dtype=torch.int64)
    d = 4096
    for n, k in ((500_000, 1000), (1000, 8)):
        cfg = m._block_sizes(n, k, d, _DTYPES[dtype])
        args = dict(x_ptr=p, c_ptr=p, c_sq_ptr=f32, labels_ptr=i64, sqdist_ptr=f32, N=n, K=k, D=d,
                    stride_xn=d, stride_xd=1, stride_ck=d, stride_cd=1)
        yield compile_kernel(
            Report("kmeans_assign", dtype, f"N={n} K={k} D={d}", cfg), m._kmeans_assign_kernel, args,
            dict(BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"], UPCAST=False,
                 IEEE=dtype == "fp32"), cfg["num_warps"], cfg["num_stages"])


def kmeans_update(dtype: str):
    m = importlib.import_module("kclip.kernels.kmeans_update")
    p, f32, i64 = _pointer(dtype), _pointer("fp32"), torch.empty(8, dtype=torch.int64)
    for d in (4096, 48):
        cfg = m._block_sizes(d)
        args = dict(x_ptr=p, order_ptr=i64, offsets_ptr=i64, sums_ptr=f32, D=d, stride_xn=d, stride_xd=1)
        yield compile_kernel(
            Report("kmeans_update", dtype, f"D={d}", cfg), m._segment_sum_kernel, args,
            dict(BLOCK_R=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_D"]), cfg["num_warps"], cfg["num_stages"])


def all_reports() -> list[Report]:
    reports = []
    for gen in (contrastive, projected_mse, kmeans, kmeans_update):
        for dtype in ("bf16", "fp32"):
            for rep in gen(dtype):
                print(rep.line(), flush=True)
                reports.append(rep)
    return reports


def failures(reports: list[Report]) -> list[Report]:
    """Reports that mean a launch would fail: a default config that does not compile, or an op+dtype whose
    autotune configs all fail (the autotuner skips the ones that do not fit). Tune candidates may fail."""
    bad = [r for r in reports if r.error and r.role == "default"]
    by_op: dict = {}
    for r in reports:
        if r.role == "autotune":
            by_op.setdefault((r.name, r.dtype), []).append(r)
    bad += [rs[0] for rs in by_op.values() if all(r.error for r in rs)]
    return bad


def markdown(reports: list[Report]) -> str:
    import platform
    lines = [
        "# sm_90 compile report (no GPU: Triton's ptxas on this machine)",
        "",
        f"Generated by `python -m bench.compile_sm90 --out ...` on {_dt.date.today().isoformat()}: Triton "
        f"{triton.__version__}, torch {torch.__version__}, Python {platform.python_version()}. Each kernel is "
        "specialised as a launch with the named shape would be (see the module docstring). Registers are per "
        "thread (255 is the ceiling); spill is ptxas's spill-store bytes; wgmma and mma.sync count Hopper and "
        "pre-Hopper tensor-core instructions in the PTX (fp32 inputs use IEEE FMAs on purpose: neither). "
        "Role: `default` is what a launch uses today, `autotune` a config the autotuner times, `tune` a "
        "`bench_clip_contrastive_loss --tune` candidate, `option` a launch option that is off by default.",
        "",
        "| kernel | dtype | shape | role | config | shared KiB | registers | spill B | wgmma | mma.sync |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        cfg = ", ".join(f"{k}={v}" for k, v in r.config.items())
        if r.error:
            lines.append(f"| {r.name} | {r.dtype} | {r.shape} | {r.role} | {cfg} | failed: {r.error[:80]} | | | | |")
            continue
        lines.append(f"| {r.name} | {r.dtype} | {r.shape} | {r.role} | {cfg} | {r.shared / 1024:.0f} | "
                     f"{r.registers if r.registers is not None else '?'} | "
                     f"{r.spill_bytes if r.spill_bytes is not None else '?'} | {r.wgmma} | {r.mma_sync} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="also write the markdown table here (atomically)")
    args = ap.parse_args(argv)
    reports = all_reports()
    if args.out:
        from kclip.atomic import atomic_write_text
        atomic_write_text(args.out, markdown(reports))
        print(f"wrote {args.out}")
    bad = failures(reports)
    for r in bad:
        print(f"FAIL {r.name} {r.dtype} {r.shape}: {r.error}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
