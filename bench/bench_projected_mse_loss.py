"""Benchmark: fused projected-MSE loss, forward + backward, vs eager, torch.compile and the GEMM floor.

For each (d, B) one process measures, side by side on one device:

- ``kernel``  : ``kclip.kernels.projected_mse_loss`` (fused Triton forward + two cuBLAS backward GEMMs)
- ``eager``   : ``projected_mse_loss_reference`` (F.linear + F.mse_loss) with autograd
- ``compile`` : ``torch.compile`` of the reference (one specialisation per shape)
- ``floor``   : three plain cuBLAS GEMMs of the same shapes (X W^T, G W, G^T X): no loss kernel can
                beat this, so ``kernel_over_floor`` says how close to the floor the kernel runs.

Each step computes the loss and the gradients for x, weight and bias. Records: provenance, shape, impl,
median/p20/p80 ms, peak memory (GPU), OOM flag; the kernel record carries the ratios
``eager_over_kernel``, ``compile_over_kernel`` and ``kernel_over_floor``. Results are appended to
``<results-dir>/projected_mse_loss.jsonl`` and plotted to ``projected_mse_loss.png``.

    python -m bench.bench_projected_mse_loss                 # GPU: B 256..65536, d 512/768, d' 4096, bf16
    python -m bench.bench_projected_mse_loss --quick --results-dir /tmp/r   # CPU smoke run (seconds)
    python -m bench.bench_projected_mse_loss --batch-sizes 4096 --dims 512 --profile   # + where the time goes
    python -m bench.bench_projected_mse_loss --host-us --device cpu --dtype fp32 --batch-sizes 64 --dims 32

``--host-us`` (on with ``--quick``) measures the host side alone, on any machine: microseconds of Python and
torch dispatch per forward+backward call with the Triton launch stubbed out (``kernel``) against eager's
``F.linear`` + ``F.mse_loss`` + autograd on the same tiny CPU tensors (``eager``), records with
impls ``kernel-host`` and ``eager-host``. A real launch adds Triton's own launcher cost to the kernel's figure.
"""
from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch

from bench.harness import (DTYPES, RESULTS_DIR, ResultsLog, format_profile, is_oom, peak_memory_bytes, plot_vs,
                           profile_fn, provenance, time_fn)

NAME = "projected_mse_loss"


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny CPU sizes (B 64/96, d 32, d' 48, fp32)")
    p.add_argument("--results-dir", default=None, help=f"where the JSONL and plot go (default {RESULTS_DIR})")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 256..65536 doubling")
    p.add_argument("--dims", type=int, nargs="+", default=None, help="student dims d (default 512 768)")
    p.add_argument("--d-out", type=int, default=None, help="teacher dim d' (default 4096)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 (fp32 with --quick)")
    p.add_argument("--device", default=None, help="default cuda (cpu with --quick)")
    p.add_argument("--impls", nargs="+", choices=["kernel", "eager", "compile", "floor"], default=None)
    p.add_argument("--profile", action="store_true",
                   help="also profile each impl (device vs host time per call, top kernels) into its record")
    p.add_argument("--host-us", action="store_true",
                   help="also measure host microseconds per call with the Triton launch stubbed (CPU tensors)")
    args = p.parse_args(argv)
    if args.quick:
        defaults = dict(batch_sizes=[64, 96], dims=[32], d_out=48, dtype="fp32", device="cpu",
                        impls=["kernel", "eager", "floor"])
        args.host_us = True
    else:
        defaults = dict(batch_sizes=[256 * 2**i for i in range(9)], dims=[512, 768], d_out=4096, dtype="bf16",
                        device="cuda", impls=["kernel", "eager", "compile", "floor"])
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def _step_fns(impls, x, w, b, t):
    """One forward+backward closure per implementation (gradients via autograd.grad: no accumulation)."""
    from kclip.kernels import projected_mse_loss, projected_mse_loss_reference

    def loss_step(fn):
        def step():
            loss = fn(x, w, t, b)
            return torch.autograd.grad(loss, (x, w, b))
        return step

    xd, wd = x.detach(), w.detach()

    def floor():
        y = torch.matmul(xd, wd.t())  # (B, d'): stands in for G
        return torch.matmul(y, wd), torch.matmul(y.t(), xd)  # (B, d), (d', d)

    fns = {}
    for impl in impls:
        if impl == "kernel":
            fns[impl] = loss_step(projected_mse_loss)
        elif impl == "eager":
            fns[impl] = loss_step(projected_mse_loss_reference)
        elif impl == "compile":
            torch._dynamo.reset()  # fresh specialisation per shape; avoids the recompile limit
            fns[impl] = loss_step(torch.compile(projected_mse_loss_reference, dynamic=False))
        elif impl == "floor":
            fns[impl] = floor
    return fns


def host_us_stubbed(B: int, d: int, d_out: int, rep: int = 300) -> dict[str, float]:
    """Median host microseconds per forward+backward call on CPU tensors: ``kernel`` runs the product's Triton
    path with the launch replaced by a no-op (so only its own Python and torch calls count), ``eager`` runs
    the reference with autograd. Both compute the same tiny backward GEMMs on the CPU."""
    import functools
    import importlib
    from unittest import mock

    from bench.harness import host_us

    from kclip.kernels import projected_mse_loss, projected_mse_loss_reference

    mod = importlib.import_module("kclip.kernels.projected_mse_loss")  # the module (the package binds the function)
    kernel, _, _ = mod._forward_kernel()

    class _NoLaunch:  # the autotuned kernel and its jit function, minus the launch
        best_config = kernel.configs[0]
        fn = property(lambda self: self)

        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, d, generator=gen, requires_grad=True)  # (B, d)
    w = torch.randn(d_out, d, generator=gen, requires_grad=True)  # (d', d)
    b = torch.zeros(d_out, requires_grad=True)  # (d',)
    t = torch.randn(B, d_out, generator=gen)  # (B, d')

    per_call_us = functools.partial(host_us, rep=rep, warmup=20)

    def step(loss_fn):
        return lambda: torch.autograd.grad(loss_fn(x, w, t, b), (x, w, b))

    stub = _NoLaunch()
    with mock.patch.object(mod, "_forward_kernel", lambda: (stub, stub.best_config.kwargs["BLOCK_M"],
                                                            stub.best_config.kwargs["BLOCK_N"])), \
            mock.patch.object(mod, "use_triton", lambda *tensors: True), mock.patch.dict(mod._CHOSEN, clear=True):
        kernel_us = per_call_us(step(projected_mse_loss))
    return {"kernel": kernel_us, "eager": per_call_us(step(projected_mse_loss_reference))}


def _measure(impl, fn, device, profile=False):
    try:
        fn()  # warm-up: autotuning / compilation happen here, not in the timings
        rec = time_fn(fn, device)
        rec["peak_mem_bytes"] = peak_memory_bytes(fn, device)
        rec["oom"] = False
        if profile:
            rec["profile"] = profile_fn(fn, device)
        return rec
    except Exception as exc:  # noqa: BLE001 - OOM (and compile failures) are results, everything else raises
        if is_oom(exc):
            rec = {"ms_median": None, "ms_p20": None, "ms_p80": None, "peak_mem_bytes": None, "oom": True,
                   "error": str(exc).splitlines()[0][:200]}
        elif impl == "compile":
            rec = {"ms_median": None, "ms_p20": None, "ms_p80": None, "peak_mem_bytes": None, "oom": False,
                   "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
        else:
            raise
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        return rec


def _autotune_best() -> str | None:
    """The forward kernel's autotune winner for the last shape it ran (what the timings above used)."""
    from kclip.kernels.projected_mse_loss import autotune_choice

    return autotune_choice()


def _ratio(num, den):
    return None if num is None or den is None or den == 0 else num / den


def main(argv=None):
    args = _parse(argv)
    from kclip.kernels.dispatch import use_triton

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_projected_mse_loss: no CUDA device; run with --quick (CPU) or on a GPU machine.")
    dtype = DTYPES[args.dtype]
    prov = provenance(device)
    log = ResultsLog(NAME, args.results_dir)
    records = []
    for d in args.dims:
        for B in args.batch_sizes:
            shape_recs = {}
            try:
                gen = torch.Generator(device=device).manual_seed(0)
                x = torch.randn(B, d, device=device, generator=gen).to(dtype).requires_grad_(True)  # (B, d)
                w = (torch.randn(args.d_out, d, device=device, generator=gen) / d ** 0.5).to(dtype)  # (d', d)
                w.requires_grad_(True)
                b = torch.zeros(args.d_out, device=device, dtype=dtype, requires_grad=True)  # (d',)
                t = torch.randn(B, args.d_out, device=device, generator=gen).to(dtype)  # (B, d')
            except Exception as exc:  # noqa: BLE001
                if not is_oom(exc):
                    raise
                x = w = b = t = None

            def record(impl, measured):
                rec = {**prov, "op": NAME, "impl": impl, "B": B, "d": d, "d_out": args.d_out, "dtype": args.dtype,
                       "bias": True, "quick": args.quick, "series": f"{impl} d={d}", **measured}
                shape_recs[impl] = log.add(rec)  # on disk now: a killed run keeps what it measured
                records.append(rec)
                ms, mem = rec.get("ms_median"), rec.get("peak_mem_bytes")
                print(f"d={d:4d} B={B:6d} {impl:8s} "
                      f"{'OOM' if rec.get('oom') else ('err' if ms is None else f'{ms:9.3f} ms')}"
                      f"{'' if mem is None else f'  peak {mem / 2**20:9.1f} MiB'}", flush=True)

            if x is not None:
                kernel_path = "triton" if use_triton(x) else "reference"
                for impl, fn in _step_fns(args.impls, x, w, b, t).items():
                    record(impl, _measure(impl, fn, device, args.profile))
                    if shape_recs[impl].get("profile"):
                        print(format_profile(shape_recs[impl]["profile"]), flush=True)
            else:
                kernel_path = None
                for impl in args.impls:
                    record(impl, {"ms_median": None, "peak_mem_bytes": None, "oom": True,
                                  "error": "OOM allocating inputs"})
            del x, w, b, t
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

            kernel_ms = shape_recs.get("kernel", {}).get("ms_median")
            kr = shape_recs.get("kernel")
            if kr is not None:
                kr["kernel_path"] = kernel_path
                kr["autotune_best"] = _autotune_best()
                kr["eager_over_kernel"] = _ratio(shape_recs.get("eager", {}).get("ms_median"), kernel_ms)
                kr["compile_over_kernel"] = _ratio(shape_recs.get("compile", {}).get("ms_median"), kernel_ms)
                kr["kernel_over_floor"] = _ratio(kernel_ms, shape_recs.get("floor", {}).get("ms_median"))
                log.update()  # the ratios, into this run's lines
                fmt = lambda v: "  n/a" if v is None else f"{v:5.2f}"  # noqa: E731
                print(f"    ratios: eager/kernel {fmt(kr['eager_over_kernel'])}  compile/kernel "
                      f"{fmt(kr['compile_over_kernel'])}  kernel/floor {fmt(kr['kernel_over_floor'])}", flush=True)

    if args.host_us:
        for d in args.dims:
            for B in args.batch_sizes:
                us = host_us_stubbed(B, d, args.d_out)
                for impl, value in us.items():
                    rec = {**provenance(torch.device("cpu")), "op": NAME, "impl": f"{impl}-host", "B": B, "d": d,
                           "d_out": args.d_out, "dtype": "fp32", "bias": True, "quick": args.quick,
                           "measure": "host_us_stubbed", "host_us": value}
                    log.add(rec)
                print(f"d={d:4d} B={B:6d} host us per call, Triton launch stubbed: kernel {us['kernel']:7.1f}  "
                      f"eager {us['eager']:7.1f}", flush=True)

    path = log.path
    metrics = ["ms_median"] + (["peak_mem_bytes"] if any(r.get("peak_mem_bytes") for r in records) else [])
    png = plot_vs(records, "B", metrics, "series", Path(path).with_suffix(".png"),
                  title=f"projected_mse_loss fwd+bwd, d'={args.d_out}, {args.dtype}, {prov['device']}")
    print(f"results: {path}\nplot: {png}")
    return records


if __name__ == "__main__":
    main()
