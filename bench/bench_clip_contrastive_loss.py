"""Benchmark: symmetric CLIP contrastive loss, forward + backward, time and peak memory vs batch size N.

Side by side in one process on one device:

* ``kclip``   - ``kclip.kernels.clip_contrastive_loss`` as callers get it: the strategy its memory budget plans
  (``plan_for``: resident where N x N fp32 fits the default budget, else chunked, else fused);
* ``kclip_resident`` / ``kclip_chunked`` / ``kclip_fused`` - the same function with that strategy forced;
* ``eager``   - open_clip's ``ClipLoss`` (materialises two N x N logit matrices);
* ``compile`` - ``torch.compile`` of ``clip_contrastive_loss_reference``;
* ``inf_cl``  - Inf-CL (``from inf_cl import cal_inf_loss``), symmetric as
  ``0.5 * (cal_inf_loss(s * I, T) + cal_inf_loss(T, s * I))`` (the scale rides on the features: Inf-CL's
  ``scale=`` all-reduces in backward and needs a process group); CUDA only, skipped when it does not import.

Each record: provenance, N, D, dtype, impl, ms_median/p20/p80 of forward+backward, peak memory above the
inputs (GPU), ``oom: true`` when that impl ran out of memory at that N. For ``kclip*`` also the strategy that ran,
its planned ``workspace_bytes``, the achieved TFLOP/s counted against the **4-matmul floor**,
``flops = 4 * N * N * D * 2``, and ``flops_executed``: the matmuls the strategy really runs.

Cost model, beside every kclip and eager row (``model_*`` fields and the printed line): GEMM-equivalents (matmuls
of N x N x D: eager 6, resident 3, chunked 5, fused 6-10) and HBM bytes per element of N x N besides the operand
reads inside GEMMs (eager 14 x itemsize; the strategies' from ``hbm_bytes_per_elem``), turned into a predicted
time at the matmul and copy ceilings of the newest ``env.jsonl`` record for this device (on a CPU: the newest GPU
on record, named in ``model_device``). A measured ratio that disagrees with the model is a finding to explain.

    python -m bench.bench_clip_contrastive_loss                 # GPU: N 1k..131072, D 512/768, bf16
    python -m bench.bench_clip_contrastive_loss --quick --results-dir /tmp/r   # seconds on CPU
    python -m bench.bench_clip_contrastive_loss --host-us --ns 256 --ds 64    # host side alone, any machine

``--host-us`` (on with ``--quick``) measures the host side alone: microseconds of Python and torch dispatch
per forward+backward call on tiny CPU tensors, each kclip strategy with its Triton launches replaced by
no-ops (its own torch ops, GEMMs included, still run), against eager (open_clip's ``ClipLoss`` with autograd):
records with impl ``<name>-host`` and ``measure: host_us_stubbed``. A GPU adds each launch's own cost (a
few microseconds per Triton launch) to the kclip figures; ``triton_launches`` says how many a call makes.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time
from importlib import import_module
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import harness

NAME = "clip_contrastive_loss"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ("kclip", "kclip_resident", "kclip_chunked", "kclip_fused", "eager", "compile", "inf_cl")
FORCED = {"kclip_resident": "resident", "kclip_chunked": "chunked", "kclip_fused": "fused"}


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny CPU sizes (N 64/128, D 32, fp32) in seconds")
    p.add_argument("--ns", type=int, nargs="+", help="batch sizes (default 1024..131072 doubling)")
    p.add_argument("--ds", type=int, nargs="+", help="embedding dims (default 512 768)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 (fp32 with --quick)")
    p.add_argument("--device", help="default cuda if available else cpu")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile impl")
    p.add_argument("--materialising-max-n", type=int, default=None,
                   help="largest N for the impls that build the N x N logits (eager, compile); above it they are "
                        "recorded as skipped instead of run into an OOM (default: no limit)")
    p.add_argument("--tune", action="store_true",
                   help="instead of the comparison: time the kernel under other launch configurations (see "
                        "--tune-set), each checked against the default configuration's loss and gradients")
    p.add_argument("--tune-set", choices=TUNE_SETS, nargs="+", default=["all"],
                   help="pipeline: the fused default tiles with FLATTEN/PREFETCH; tiles: other fused tile shapes; "
                        "chunk: the chunked strategy's rows and tiles; all: every set")
    p.add_argument("--host-us", action="store_true",
                   help="also measure host microseconds per call with the Triton launches stubbed (CPU tensors)")
    p.add_argument("--profile", action="store_true",
                   help="also profile each impl (device vs host time per call, top kernels) into its record")
    p.add_argument("--results-dir", help="where the JSONL and the plot go (default bench/results)")
    return p.parse_args(argv)


def _inputs(n, d, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=gen), dim=1).to(device=device, dtype=dtype)  # (N, D)
    txt = F.normalize(torch.randn(n, d, generator=gen), dim=1).to(device=device, dtype=dtype)  # (N, D)
    scale = torch.tensor(1 / 0.07, device=device)  # ()
    return img.requires_grad_(), txt.requires_grad_(), scale.requires_grad_()


def _inf_cl_loss():
    from inf_cl import cal_inf_loss

    def loss(img, txt, s):
        # Inf-CL's own ``scale=`` argument all-reduces its gradient in backward, which fails without a
        # process group; scaling the image features instead gives the same logits s * I @ T.T, and autograd
        # carries the gradient to s through the product.
        d = img.shape[1]
        head_dim = next(h for h in (256, 128, 64, 32, 16) if d % h == 0)
        img_s = img * s.to(img.dtype)  # (N, D)
        return 0.5 * (cal_inf_loss(img_s, txt, head_dim=head_dim) + cal_inf_loss(txt, img_s, head_dim=head_dim))
    return loss


# --tune-set tiles: other tile shapes, each a whole launch configuration (sm_90 candidates; the first of each list is
# today's heuristic for D <= 512). Timed on an H200 on 2026-11-30 (bench/results/clip_contrastive_loss.jsonl).
TUNE_STATS = [dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
              dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
              dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
              dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, num_warps=8, num_stages=2)]
TUNE_GRAD = [dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, BLOCK_DO=512, num_warps=8, num_stages=2),
             dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, BLOCK_DO=512, num_warps=8, num_stages=2),
             dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_DO=256, num_warps=8, num_stages=2),
             dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=64, BLOCK_DO=256, num_warps=8, num_stages=2),
             dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, BLOCK_DO=128, num_warps=8, num_stages=2)]
# --tune-set pipeline: the default tiles of each D with a pipelining option switched on (merged into the
# default configuration). Untimed so far; both compile for sm_90 without spills (bench/compile_sm90.py):
#   FLATTEN  one software-pipelined loop over (column tile, D step) instead of a D loop nested in the column
#            loop, whose pipeline drains at the end of every column tile (tl.range(flatten=True))
#   PREFETCH the grad kernel issues the column tile's B rows and column LSE before its S tile, not after,
#            so their global-load latency hides behind the S GEMM
TUNE_PIPELINE_STATS = [dict(FLATTEN=True)]
TUNE_PIPELINE_GRAD = [dict(PREFETCH=True), dict(FLATTEN=True), dict(FLATTEN=True, PREFETCH=True)]
# --tune-set chunk: the chunked strategy's chunk rows and kernel tiles (sm_90 guesses, untimed; merged into the
# default). Rows trade workspace (R x N x 6 bytes in bf16) for larger cuBLAS GEMMs; small R may keep the fp32
# cosines in L2 between the GEMM and the softmax kernel (R = 256 at N = 32k: 32 MiB).
TUNE_CHUNK = [dict(rows=256), dict(rows=512), dict(rows=2048), dict(rows=4096),
              dict(PAIR_M=16, PAIR_N=128), dict(PAIR_M=64, PAIR_N=64, num_warps=8), dict(COMBINE_M=4, COMBINE_C=128),
              dict(PROBS_M=64, PROBS_N=128, num_warps=8), dict(PROBS_M=16, PROBS_N=512),
              # GEMM="triton": the chunk kernels compute their cosine tiles (no G workspace, no G traffic)
              dict(GEMM="triton"), dict(GEMM="triton", rows=4096), dict(GEMM="triton", TILE_M=64, TILE_WARPS=4,
                                                                         TILE_STAGES=4),
              dict(GEMM="triton", TILE_N=64, TILE_STAGES=4)]
TUNE_SETS = ("pipeline", "tiles", "chunk", "all")
# --quick (interpreter): one variant of each kernel, different from the interpreter's default tiles (the
# interpreter runs FLATTEN/PREFETCH as the plain loop: there they check only that the options are accepted)
TUNE_QUICK_STATS = [dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1, FLATTEN=True)]
TUNE_QUICK_GRAD = [dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, BLOCK_DO=16, num_warps=4, num_stages=1, FLATTEN=True,
                        PREFETCH=True)]
TUNE_QUICK_CHUNK = [dict(rows=7, STATS_M=2, STATS_N=32, PAIR_M=2, PAIR_N=16, COMBINE_M=2, COMBINE_C=8, PROBS_M=4,
                         PROBS_N=32),
                    dict(GEMM="triton", rows=7, TILE_M=4, TILE_N=16)]
# the record field holding the configuration of the kernel a variant varies
TUNE_CFG = {"stats": "stats_cfg", "grad": "grad_cfg", "chunk": "chunk_cfg"}


def tune_variants(tune_sets, quick: bool) -> list:
    """[(varied kernel, strategy, LAUNCH_OVERRIDES)]: each strategy's default first, then one kernel varied at a
    time ("stats"/"grad": the fused strategy's kernels; "chunk": the chunked strategy's rows and tiles)."""
    sets = {tune_sets} if isinstance(tune_sets, str) else set(tune_sets)
    if not sets or not sets <= set(TUNE_SETS):
        raise ValueError(f"--tune-set takes some of {TUNE_SETS}, got {sorted(sets)}")
    if "all" in sets:
        sets = set(TUNE_SETS)
    if quick:
        stats, grad, chunk = TUNE_QUICK_STATS, TUNE_QUICK_GRAD, TUNE_QUICK_CHUNK
    else:
        stats = (TUNE_STATS[1:] if "tiles" in sets else []) + (TUNE_PIPELINE_STATS if "pipeline" in sets else [])
        grad = (TUNE_GRAD[1:] if "tiles" in sets else []) + (TUNE_PIPELINE_GRAD if "pipeline" in sets else [])
        chunk = TUNE_CHUNK if "chunk" in sets else []
    variants = []
    if stats or grad:
        variants += [("default", "fused", {})] + [("stats", "fused", {"stats": c}) for c in stats]
        variants += [("grad", "fused", {"grad": c}) for c in grad]
    if chunk:
        variants += [("default", "chunked", {})] + [("chunk", "chunked", {"chunk": c}) for c in chunk]
    return variants


def tune(ns, ds, dtype, device, log, prov, reps, tune_set=("all",)) -> list:
    """Time fwd+bwd under other launch configurations (one kernel varied at a time, per strategy), checking each
    variant's loss and gradients against the first variant's (the default configuration of its run)."""
    kmod = import_module("kclip.kernels.clip_contrastive_loss")
    variants = tune_variants(tune_set, quick=device.type == "cpu")
    records = []
    for d in ds:
        for n in ns:
            img, txt, s = _inputs(n, d, dtype, device)
            want = None
            for which, strategy, overrides in variants:
                kmod.LAUNCH_OVERRIDES.clear()
                kmod.LAUNCH_OVERRIDES.update(overrides)
                fn = functools.partial(kmod.clip_contrastive_loss, strategy=strategy)
                rec = dict(prov, N=n, D=d, dtype=str(dtype).replace("torch.", ""), impl="kclip-tune", varied=which,
                           strategy=strategy, tune_set=" ".join([tune_set] if isinstance(tune_set, str) else tune_set))
                if strategy == "fused":
                    rec.update(stats_cfg=kmod._stats_blocks(d), grad_cfg=kmod._grad_blocks(d))
                else:
                    rec.update(chunk_cfg=kmod._chunk_blocks(d))
                try:
                    _step(fn, img, txt, s)
                    loss = fn(img, txt, s).detach().float()
                    got = (loss, img.grad.float(), txt.grad.float(), s.grad.float())
                    if want is None:
                        want = got
                    rec["max_rel_err_vs_default"] = max(float((g - w).norm() / w.norm().clamp_min(1e-30))
                                                        for g, w in zip(got, want))
                    rec.update(harness.time_fn(lambda: _step(fn, img, txt, s), device, **reps))
                    rec["tflops"] = 4 * n * n * d * 2 / (rec["ms_median"] * 1e-3) / 1e12
                except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory / registers: a result
                    rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                finally:
                    kmod.LAUNCH_OVERRIDES.clear()
                records.append(log.add(rec))
                cfg = next(iter(overrides.values()), None)
                print(f"tune N={n} D={d} {strategy:>7} {which:>7} {cfg or ''}: " + (rec.get("error") or
                      f"{rec['ms_median']:.3f} ms, {rec['tflops']:.0f} TFLOP/s, err {rec['max_rel_err_vs_default']:.1e}"),
                      flush=True)
            img = txt = s = None
    return records


def _make_impls(names, device, compile_ok):
    kmod = import_module("kclip.kernels.clip_contrastive_loss")
    impls = {}
    if "kclip" in names:
        impls["kclip"] = kmod.clip_contrastive_loss  # the strategy the default memory budget plans
    for name, strategy in FORCED.items():
        if name in names:
            impls[name] = functools.partial(kmod.clip_contrastive_loss, strategy=strategy)
    if "eager" in names:
        from open_clip.loss import ClipLoss
        impls["eager"] = ClipLoss()
    if "compile" in names and compile_ok:
        impls["compile"] = torch.compile(kmod.clip_contrastive_loss_reference)
    if "inf_cl" in names and device.type == "cuda":
        try:
            impls["inf_cl"] = _inf_cl_loss()
        except Exception as exc:  # noqa: BLE001 - a missing/broken peer is reported, not fatal
            print(f"inf_cl unavailable: {type(exc).__name__}: {exc}")
    return impls, kmod


def cost_model(strategy: str, n: int, d: int, dtype: torch.dtype, ceilings: dict | None) -> dict:
    """GEMM-equivalents, HBM bytes per N x N element and the predicted fwd+bwd ms at ``ceilings`` (one device)
    for a kclip strategy or ``"eager"`` (open_clip ClipLoss: 2 logit GEMMs + 4 in backward; logits written twice,
    2 log_softmax forwards read + write, nll_loss's zero-filled gradients, 2 log_softmax backwards read 2 + write 1:
    14 x itemsize)."""
    kmod = import_module("kclip.kernels.clip_contrastive_loss")
    if strategy == "eager":
        gemm_eq, bpe = 6, 14.0 * dtype.itemsize
    else:
        gemm_eq, bpe = kmod.gemm_equivalents(strategy, d), kmod.hbm_bytes_per_elem(strategy, d, dtype)
    rec = {"model_gemm_eq": gemm_eq, "model_bytes_per_elem": bpe, "model_device": None, "model_ms": None}
    if ceilings:
        matmul_ms = gemm_eq * 2 * n * n * d / (ceilings["matmul_tflops"] * 1e12) * 1e3
        bytes_ms = bpe * n * n / (ceilings["copy_tb_per_s"] * 1e12) * 1e3
        rec.update(model_device=ceilings["device"], model_ms=matmul_ms + bytes_ms, model_matmul_ms=matmul_ms,
                   model_bytes_ms=bytes_ms)
    return rec


def _model_line(rec: dict) -> str:
    where = rec["model_device"] or "no env.jsonl ceilings"
    at = f" -> {rec['model_ms']:.4g} ms at {where} ceilings" if rec.get("model_ms") is not None else f" ({where})"
    ratio = (f", measured/model {rec['ms_median'] / rec['model_ms']:.2f}x" if rec.get("model_ms") and
             rec.get("ms_median") and rec.get("model_same_device") else "")
    return f"model: {rec['model_gemm_eq']:g} GEMM-eq + {rec['model_bytes_per_elem']:.1f} B/elem{at}{ratio}"


def _step(loss_fn, img, txt, s):
    img.grad = txt.grad = s.grad = None
    loss_fn(img, txt, s).backward()


class _NoLaunch:
    """A ``@triton.jit`` kernel minus the launch: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def host_us_stubbed(n: int, d: int, rep: int = 200) -> dict[str, dict]:
    """Per impl: the median host microseconds of one forward+backward on CPU fp32 (N, D) tensors and the Triton
    launches it makes. ``kclip_<strategy>`` runs the product's function with each kernel's launch replaced by a
    no-op, ``use_triton`` forced on and the GPU's launch configurations (the interpreter is not involved);
    ``eager`` is open_clip's ClipLoss."""
    from unittest import mock

    kmod = import_module("kclip.kernels.clip_contrastive_loss")
    img, txt, s = _inputs(n, d, torch.float32, torch.device("cpu"))

    per_call_us = functools.partial(harness.host_us, rep=rep, warmup=10)

    out = {}
    with contextlib.ExitStack() as stack:
        for sub in ("_common", "fused", "chunked", "resident", "plan"):
            mod = import_module(f"kclip.kernels.clip_contrastive_loss.{sub}")
            if hasattr(mod, "interpreting"):  # the GPU's launch configurations, not the interpreter's small tiles
                stack.enter_context(mock.patch.object(mod, "interpreting", lambda: False))
            for name, obj in vars(mod).items():
                # a JITFunction, or an InterpretedFunction under TRITON_INTERPRET
                if name.endswith("_kernel") and type(obj).__module__.startswith("triton."):
                    stack.enter_context(mock.patch.object(mod, name, _NoLaunch()))
        stack.enter_context(mock.patch.object(kmod, "use_triton", lambda *tensors: True))
        for name, strategy in FORCED.items():
            fn = functools.partial(kmod.clip_contrastive_loss, strategy=strategy)
            before = kmod.TRITON_LAUNCHES
            _step(fn, img, txt, s)
            launches = kmod.TRITON_LAUNCHES - before
            out[name] = {"host_us": per_call_us(lambda: _step(fn, img, txt, s)), "triton_launches": launches}
    from open_clip.loss import ClipLoss

    eager = ClipLoss()
    out["eager"] = {"host_us": per_call_us(lambda: _step(eager, img, txt, s)), "triton_launches": 0}
    return out


def main(argv=None):
    args = _parse(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick:
        ns, ds, dtype = args.ns or [64, 128], args.ds or [32], DTYPES[args.dtype or "fp32"]
    else:
        ns = args.ns or [1024 * 2 ** i for i in range(8)]  # 1k .. 131072
        ds, dtype = args.ds or [512, 768], DTYPES[args.dtype or "bf16"]
    if device.type == "cpu" and "triton" not in sys.modules:
        # Triton kernels run on CPU only in the interpreter, which must be chosen before triton loads.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.tune:
        prov = harness.provenance(device)
        return tune(ns, ds, dtype, device, harness.ResultsLog(NAME, args.results_dir), prov,
                    dict(warmup=1, rep=3) if args.quick else {}, args.tune_set)
    # torch.compile on CPU needs a C++ toolchain and takes tens of seconds: GPU only unless asked for.
    compile_ok = not args.no_compile and (device.type == "cuda" or not args.quick)
    impls, kmod = _make_impls(args.impls, device, compile_ok)
    if "compile" in args.impls and not compile_ok:
        print("compile: skipped (torch.compile on CPU takes ~40 s to build; run without --quick to include it)")

    # the CPU interpreter is slow: few repetitions in --quick (its times are not meaningful anyway)
    reps = dict(warmup=1, rep=5) if args.quick else {}
    prov = harness.provenance(device)
    log = harness.ResultsLog(NAME, args.results_dir)
    dirs = ([Path(args.results_dir)] if args.results_dir else []) + [harness.RESULTS_DIR]
    ceilings = harness.recorded_ceilings(prov["device"], dirs)
    records = []
    for d in ds:
        for n in ns:
            for name, fn in impls.items():
                rec = dict(prov, N=n, D=d, dtype=str(dtype).replace("torch.", ""), impl=name,
                           series=f"{name} D={d}", oom=False)
                if name in ("eager", "compile") and args.materialising_max_n and n > args.materialising_max_n:
                    rec["skipped"] = (f"N > --materialising-max-n {args.materialising_max_n}: the N x N logits "
                                      f"alone are {n * n * dtype.itemsize / 2**30:.0f} GiB per copy")
                    records.append(log.add(rec))
                    print(f"N={n:>7} D={d:>4} {name:>8}: skipped ({rec['skipped']})", flush=True)
                    continue
                try:
                    img, txt, s = _inputs(n, d, dtype, device)
                    launches = kmod.TRITON_LAUNCHES
                    rec.update(harness.time_fn(lambda: _step(fn, img, txt, s), device, **reps))
                    if name.startswith("kclip"):
                        rec["triton_path"] = kmod.TRITON_LAUNCHES > launches
                    # the gradients of the timed runs are still allocated: free them first, or the peak above
                    # the baseline would leave out the (N, D) gradient buffers every step allocates
                    img.grad = txt.grad = s.grad = None
                    mem = harness.peak_memory_bytes(lambda: _step(fn, img, txt, s), device)
                    rec["peak_mem_bytes"] = mem
                    rec["peak_mem_mib"] = None if mem is None else mem / 2 ** 20
                    if args.profile:
                        rec["profile"] = harness.profile_fn(lambda: _step(fn, img, txt, s), device,
                                                            rep=2 if args.quick else 5)
                except Exception as exc:  # noqa: BLE001 - record and go on with the next impl/size
                    if harness.is_oom(exc):
                        rec["oom"] = True
                    else:
                        rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                finally:
                    img = txt = s = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                if name.startswith("kclip"):
                    rows = torch.empty((), dtype=dtype, device=device).expand(n, d)  # (N, D) stand-in, no memory
                    plan = kmod.plan_for(rows, strategy=FORCED.get(name))
                    rec.update(strategy=plan.strategy, workspace_bytes=plan.workspace_bytes,
                               chunk_rows=plan.chunk_rows)
                    rec["flops"] = 4 * n * n * d * 2
                    rec["flops_executed"] = kmod.gemm_equivalents(plan.strategy, d) * n * n * d * 2
                    rec["flop_count"] = "floor: 4 matmuls of N*N*D (x2 flops each)"
                    if rec.get("ms_median"):
                        rec["tflops"] = rec["flops"] / (rec["ms_median"] * 1e-3) / 1e12
                        rec["tflops_executed"] = rec["flops_executed"] / (rec["ms_median"] * 1e-3) / 1e12
                if name.startswith("kclip") or name == "eager":
                    rec.update(cost_model(rec.get("strategy", "eager"), n, d, dtype, ceilings))
                    rec["model_same_device"] = bool(ceilings and ceilings["same_device"])
                records.append(log.add(rec))
                status = "OOM" if rec["oom"] else rec.get("error") or (
                    f"{rec['ms_median']:.3f} ms  mem={rec.get('peak_mem_mib')}")
                strategy = f" [{rec['strategy']}]" if rec.get("strategy") else ""
                model = f"  | {_model_line(rec)}" if "model_gemm_eq" in rec else ""
                print(f"N={n:>7} D={d:>4} {name:>14}{strategy}: {status}{model}", flush=True)
                if rec.get("profile"):
                    print(harness.format_profile(rec["profile"]), flush=True)

    if args.host_us or args.quick:
        cpu = harness.provenance(torch.device("cpu"))
        for d in ds:
            for n in ns:
                us = host_us_stubbed(n, d)
                for name, r in us.items():
                    log.add(dict(cpu, N=n, D=d, dtype="float32", impl=f"{name}-host", measure="host_us_stubbed",
                                 quick=args.quick, **r))
                print(f"N={n:>7} D={d:>4} host us per fwd+bwd, Triton launches stubbed: " + "  ".join(
                    f"{name} {r['host_us']:.0f} ({r['triton_launches']} launches)" for name, r in us.items()),
                    flush=True)

    out = log.path
    harness.plot_vs(records, "N", ["ms_median", "peak_mem_mib"], "series", Path(out).with_suffix(".png"),
                    title=f"clip_contrastive_loss fwd+bwd, {prov['device']}, {rec['dtype']}")
    print(f"results -> {out}")
    return records


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"done in {time.time() - t0:.1f}s")
