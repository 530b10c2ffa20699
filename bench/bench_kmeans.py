"""k-means at scale: kclip's Triton Lloyd loop vs cuML, flash-kmeans, fast-pytorch-kmeans, scikit-learn.

Every implementation runs the same number of Lloyd iterations from the same initial centroids
(``tol=0`` where the library allows it), so ``ms_per_iter = fit_s / n_iter`` compares like with like;
``fit_s`` is the wall time of that fit including the library's own data conversion. For kclip the
assignment kernel alone is also timed (``assign_ms``, ``harness.time_fn``) against the chunked
PyTorch reference (``torch-reference`` rows), and so is the centroid update (``update_ms``): the
deterministic segment-sum kernel (``kclip-update``: sort by label, one program per cluster and column
block) against the atomic ``index_add_`` it replaced (``torch-index-add-update``, nondeterministic on a
GPU) and the one-hot GEMM alternative (``torch-onehot-update``: ``onehot(labels)^T @ x`` per chunk,
deterministic, 2*N*K*D FLOPs), all on the labels of the initial centroids.

scikit-learn runs on the CPU: above ``--sklearn-max-n`` points it clusters a uniform subsample of
that size, and it runs at most ``--sklearn-iters`` iterations; the record says so (``subsample_n``,
``note``) and its ``ms_per_iter`` is for the subsample.

Default sizes (GPU): N in {100k, 500k, 2M}, D = 4096, K = 1000, bf16 data (the teacher cache dtype).
``--quick``: N in {500, 1000}, D = 16, K = 8 on CPU, kclip (Triton interpreter when TRITON_INTERPRET=1)
and scikit-learn; finishes in seconds.

    python -m bench.bench_kmeans [--quick] [--profile] [--results-dir DIR]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench import harness

def _planted(n: int, d: int, k: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Mixture of k Gaussians, generated in row blocks so 2M x 4096 never exists in fp32."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    centers = (torch.randn(k, d, generator=g) * 2.0).to(device)  # (K, D)
    x = torch.empty((n, d), dtype=dtype, device=device)  # (N, D)
    gd = torch.Generator(device=device).manual_seed(seed + 1)
    step = 1 << 16
    for s in range(0, n, step):
        e = min(n, s + step)
        lab = torch.randint(k, (e - s,), generator=gd, device=device)
        x[s:e] = (centers[lab] + torch.randn(e - s, d, generator=gd, device=device)).to(dtype)
    return x


def _timed(fn, device: torch.device):
    """(result, seconds, peak extra device bytes or None)."""
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = fn()
    harness.sync(device)
    sec = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    return out, sec, peak


def _inertia(x: torch.Tensor, centroids: torch.Tensor) -> float:
    from kclip.kernels import kmeans_assign

    c = torch.as_tensor(np.asarray(centroids.cpu() if isinstance(centroids, torch.Tensor) else centroids))
    total = 0.0
    for s in range(0, x.shape[0], 1 << 18):
        _, sq = kmeans_assign(x[s:s + (1 << 18)], c.to(x.device))
        total += float(sq.double().sum())
    return total


# ------------------------------------------------------------------------------------------------ runners

def onehot_update(x: torch.Tensor, labels: torch.Tensor, k: int, chunk: int = 1 << 16) -> torch.Tensor:
    """Cluster sums as ``onehot(labels)^T @ x`` per row chunk (cuBLAS GEMMs: deterministic), fp32 out."""
    sums = torch.zeros((k, x.shape[1]), dtype=torch.float32, device=x.device)  # (K, D)
    for s in range(0, x.shape[0], chunk):
        xb = x[s:s + chunk]  # (B, D)
        onehot = torch.nn.functional.one_hot(labels[s:s + chunk], k).to(xb.dtype)  # (B, K), exact in any dtype
        if xb.is_cuda and xb.dtype != torch.float32:
            sums += torch.mm(onehot.T, xb, out_dtype=torch.float32)  # bf16/fp16 GEMM, fp32 accumulate and out
        else:
            sums += onehot.T.float() @ xb.float()
    return sums


def run_kclip(x, init, iters, device):
    from kclip.kmeans import fit_kmeans

    res = fit_kmeans(x, init.shape[0], backend="triton", init=init, max_iter=iters, tol=0.0)
    return res.n_iter, res.inertia, steady_state(res.iter_seconds)


def steady_state(iter_seconds) -> dict:
    """The fit's own per-iteration times: ``steady_ms_per_iter`` (median of the iterations after the first, which
    also absorbs the initialisation's queued work), ``first_iter_ms``, and the sum for ``setup_s`` below."""
    its = [1e3 * t for t in iter_seconds]
    if not its:
        return {}
    later = sorted(its[1:] or its)
    return {"steady_ms_per_iter": later[len(later) // 2], "first_iter_ms": its[0], "iters_s": sum(its) / 1e3}


def run_cuml(x, init, iters, device):
    from cuml.cluster import KMeans

    x32 = x.float().contiguous()  # cuML clusters fp32 only
    km = KMeans(n_clusters=init.shape[0], init=init.float().cpu().numpy(), n_init=1, max_iter=iters, tol=0.0,
                output_type="numpy")
    km.fit(x32)
    return int(getattr(km, "n_iter_", iters)), float(km.inertia_), {"note": "fp32 copy of the data (cuML needs fp32)"}


def run_flash_kmeans(x, init, iters, device):
    from flash_kmeans import batch_kmeans_Euclid

    kwargs = dict(n_clusters=init.shape[0], tol=0.0, verbose=False)
    try:
        out = batch_kmeans_Euclid(x[None], max_iters=iters, init_centroids=init.to(x.dtype)[None], **kwargs)
        note = "given init"
    except TypeError:  # older/newer signature: no init argument
        out = batch_kmeans_Euclid(x[None], max_iters=iters, **kwargs)
        note = "library init (no init argument)"
    ids, centers, n_iter = out
    n_iter = int(n_iter) if n_iter is not None else iters
    return n_iter, _inertia(x, centers[0].float()), {"note": note}


def run_fast_pytorch_kmeans(x, init, iters, device):
    from fast_pytorch_kmeans import KMeans

    km = KMeans(n_clusters=init.shape[0], mode="euclidean", max_iter=iters, tol=0.0, verbose=0)
    if x.dtype == torch.bfloat16:  # it asserts fp32/fp16 input ("input must be floating point" for bf16)
        x = x.half()
    km.fit_predict(x, centroids=init.to(device=x.device, dtype=x.dtype))
    return iters, _inertia(x, km.centroids.float()), {"note": "n_iter = max_iter (library does not report it)"}


def run_sklearn(x_np, init_np, iters):
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=init_np.shape[0], init=init_np, n_init=1, max_iter=iters, tol=0.0)
    km.fit(x_np)
    return int(km.n_iter_), float(km.inertia_)


def _available(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:  # not installed, or its CUDA stack is broken
        return False


# ------------------------------------------------------------------------------------------------ main

def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny CPU sizes (seconds)")
    p.add_argument("--results-dir", default=None, help="where kmeans.jsonl and the plot go (default bench/results)")
    p.add_argument("--n", type=int, nargs="+", default=None, help="numbers of points")
    p.add_argument("--d", type=int, default=None)
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--iters", type=int, default=None, help="Lloyd iterations per fit (tol=0)")
    p.add_argument("--dtype", choices=sorted(harness.DTYPES), default=None, help="data dtype (default bf16 on GPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--sklearn-max-n", type=int, default=None, help="scikit-learn subsample cap")
    p.add_argument("--sklearn-iters", type=int, default=None, help="scikit-learn iteration cap")
    p.add_argument("--profile", action="store_true",
                   help="also profile the kclip-triton fit (wall vs device-busy time, top kernels) into its record")
    p.add_argument("--impls", nargs="+", default=None,
                   help="subset of kclip-triton cuml flash-kmeans fast-pytorch-kmeans sklearn")
    a = p.parse_args(argv)

    if a.quick:
        device = torch.device(a.device or "cpu")
        sizes, d, k = a.n or [500, 1000], a.d or 16, a.k or 8
        iters, dtype = a.iters or 3, harness.DTYPES[a.dtype or "fp32"]
        sk_max_n, sk_iters = a.sklearn_max_n or 10**9, a.sklearn_iters or iters
        impls = a.impls or ["kclip-triton", "sklearn"]
    else:
        device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        sizes, d, k = a.n or [100_000, 500_000, 2_000_000], a.d or 4096, a.k or 1000
        iters = a.iters or 10
        dtype = harness.DTYPES[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
        sk_max_n, sk_iters = a.sklearn_max_n or 100_000, a.sklearn_iters or 3
        impls = a.impls or ["kclip-triton", "cuml", "flash-kmeans", "fast-pytorch-kmeans", "sklearn"]

    gpu_runners = {"kclip-triton": (None, run_kclip), "cuml": ("cuml", run_cuml),
                   "flash-kmeans": ("flash_kmeans", run_flash_kmeans),
                   "fast-pytorch-kmeans": ("fast_pytorch_kmeans", run_fast_pytorch_kmeans)}
    prov = harness.provenance(device)
    log = harness.ResultsLog("kmeans", a.results_dir)
    records: list[dict] = []

    def add(rec: dict) -> None:  # on disk at once: a killed run keeps what it measured
        records.append(log.add(rec))
        ms = rec.get("ms_per_iter") or rec.get("assign_ms") or rec.get("update_ms")
        print(f"{rec['impl']:>24} n={rec['n']:>8} " + (f"{ms:10.2f} ms " if ms is not None else " " * 14)
              + str(rec.get("error") or rec.get("skipped") or rec.get("note") or ""), flush=True)

    for n in sizes:
        x = _planted(n, d, k, dtype, device)  # (N, D)
        g = torch.Generator().manual_seed(123)
        init_idx = torch.randperm(n, generator=g)[:k].sort().values
        init = x[init_idx.to(device)].float()  # (K, D) the same initial centroids for everyone
        base = dict(prov, n=n, d=d, k=k, dtype=str(dtype).replace("torch.", ""), max_iter=iters, init="given")

        if "kclip-triton" in impls:  # the two Lloyd steps alone, each against its PyTorch alternatives
            from kclip.kernels import kmeans_assign, kmeans_assign_reference, kmeans_update, kmeans_update_reference

            labels = kmeans_assign(x, init)[0]  # (N,) the labels the update steps sum under
            steps = (("kclip-assign", "assign_ms", lambda: kmeans_assign(x, init)),
                     ("torch-reference-assign", "assign_ms", lambda: kmeans_assign_reference(x, init)),
                     # as the Lloyd loop calls it: kmeans_assign's labels need no range check (no host wait)
                     ("kclip-update", "update_ms", lambda: kmeans_update(x, labels, k, check_labels=False)),
                     ("torch-index-add-update", "update_ms", lambda: kmeans_update_reference(x, labels, k)),
                     ("torch-onehot-update", "update_ms", lambda: onehot_update(x, labels, k)))
            for name, key, fn in steps:
                try:
                    t = harness.time_fn(fn, device, warmup=1, rep=3 if device.type == "cpu" else 10)
                    mem = harness.peak_memory_bytes(fn, device)
                    add(dict(base, impl=name, **{key: t["ms_median"]}, ms_p20=t["ms_p20"],
                             ms_p80=t["ms_p80"], peak_bytes=mem, ms_per_iter=None, fit_s=None))
                except Exception as exc:  # OOM or a missing feature: record and go on
                    add(dict(base, impl=name, error=f"{type(exc).__name__}: {exc}"[:300],
                             oom=harness.is_oom(exc)))
            del labels

        for impl, (module, runner) in gpu_runners.items():
            if impl not in impls:
                continue
            if module is not None and (device.type != "cuda" or not _available(module)):
                why = "GPU only" if device.type != "cuda" else "not importable"
                if impl == "cuml" and device.type == "cuda":
                    why = ("not importable: cuML comes with the [gpu] extra (cuml-cu13), about 640 MB of wheels for "
                           "CUDA 13, more than a benchmark machine without an index can be sent")
                add(dict(base, impl=impl, skipped=why))
                continue
            try:
                # one untimed 1-iteration fit first: Triton compilation / autotuning of every library stays out
                # of its timed fit (the kclip kernels were already warmed by the assign-only rows above)
                runner(x, init, 1, device)
                (n_iter, inertia, extra), sec, peak = _timed(lambda: runner(x, init, iters, device), device)
                if a.profile and impl == "kclip-triton":  # where the fit's time goes beyond its two kernels
                    extra["profile"] = harness.profile_fn(lambda: runner(x, init, iters, device), device, rep=2)
                    print(harness.format_profile(extra["profile"]), flush=True)
                if "iters_s" in extra:  # set-up: everything in the fit outside its iterations
                    extra["setup_s"] = sec - extra.pop("iters_s")
                add(dict(base, impl=impl, n_iter=n_iter, fit_s=sec, ms_per_iter=1e3 * sec / max(1, n_iter),
                         inertia=inertia, peak_bytes=peak, **extra))
            except Exception as exc:
                add(dict(base, impl=impl, error=f"{type(exc).__name__}: {exc}"[:300],
                         oom=harness.is_oom(exc)))
                if device.type == "cuda":
                    torch.cuda.empty_cache()

        if "sklearn" in impls:
            sub_n = min(n, sk_max_n)
            sub = x if sub_n == n else x[torch.randperm(n, generator=g)[:sub_n].sort().values.to(device)]
            x_np = sub.float().cpu().numpy()
            sk_it = min(iters, sk_iters)
            t0 = time.perf_counter()
            n_iter, inertia = run_sklearn(x_np, init.cpu().numpy(), sk_it)
            sec = time.perf_counter() - t0
            note = []
            if sub_n < n:
                note.append(f"uniform subsample of {sub_n} of {n} points")
            if sk_it < iters:
                note.append(f"iterations capped at {sk_it} (others ran {iters})")
            add(dict(base, impl="sklearn", device_used="cpu", n_iter=n_iter, fit_s=sec,
                     ms_per_iter=1e3 * sec / max(1, n_iter), inertia=inertia, subsample_n=sub_n,
                     max_iter=sk_it, peak_bytes=None, note="; ".join(note) or "full data"))
            del x_np
        del x
        if device.type == "cuda":
            torch.cuda.empty_cache()

    out = log.path
    plot_recs = [dict(r, ms=r.get("ms_per_iter") or r.get("assign_ms") or r.get("update_ms"), peak_mib=(r["peak_bytes"] / 2**20
                 if r.get("peak_bytes") else None)) for r in records]
    panels = ["ms"] + (["peak_mib"] if any(r["peak_mib"] for r in plot_recs) else [])
    harness.plot_vs(plot_recs, "n", panels, "impl", out.parent / "kmeans.png",
                    title=f"k-means, D={d}, K={k}, {dtype}, {prov['device']} (ms = per Lloyd iteration; "
                          "*-assign / *-update = that step only)")
    return records


if __name__ == "__main__":
    main()
