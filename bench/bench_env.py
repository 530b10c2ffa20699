"""Environment probe: what the benchmark machine is, and the ceilings every other number is judged against.

One record (``env.jsonl``) with:

- versions of Python, torch, triton, transformers, open_clip, bitsandbytes, DeepSpeed, numpy and the peers
  (inf-cl, flash-kmeans, fast-pytorch-kmeans, cuML), or why each one does not import;
- the device: name, compute capability, multiprocessors, memory;
- ``matmul_tflops``: the achievable dense matmul rate, a square ``--matmul-n`` product (bf16 on a GPU, fp32 on
  CPU) on random data, median of ``triton.testing.do_bench``. The contrastive and teacher targets are stated
  as fractions of this measured ceiling, not of the datasheet;
- ``copy_tb_per_s``: device-to-device copy bandwidth (bytes read + written), the memory-bound ceiling;
- ``bnb_int8``: a bitsandbytes ``Linear8bitLt`` forward on the device against the fp16 ``nn.Linear`` it was
  quantised from (cosine, relative error, time): LLM.int8() works here or the record says why not;
- ``deepspeed_accelerator``: the accelerator and communication backend DeepSpeed picks.

    python -m bench.bench_env                  # GPU
    python -m bench.bench_env --quick --results-dir /tmp/r   # CPU, seconds
"""
from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time

import torch

from bench.harness import ResultsLog, provenance, time_fn

NAME = "env"
PACKAGES = ("torch", "triton", "transformers", "open_clip", "bitsandbytes", "deepspeed", "numpy", "omegaconf",
            "webdataset", "inf_cl", "flash_kmeans", "fast_pytorch_kmeans", "cuml", "sklearn")


def package_versions() -> dict:
    """name -> version, or ``"missing: <why>"`` (an import that fails is reported, never fatal)."""
    out = {}
    for name in PACKAGES:
        try:
            mod = importlib.import_module(name)
            out[name] = str(getattr(mod, "__version__", "installed"))
        except Exception as exc:  # noqa: BLE001 - ImportError, or a broken CUDA stack inside the package
            out[name] = f"missing: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    return out


def matmul_ceiling(n: int, device: torch.device) -> dict:
    """Dense n^3 matmul on random data: bf16 on a GPU, fp32 on CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)  # (n, n)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)  # (n, n)
    t = time_fn(lambda: a @ b, device, **({} if device.type == "cuda" else dict(warmup=1, rep=3)))
    return {"matmul_n": n, "matmul_dtype": str(dtype).replace("torch.", ""), "matmul_ms": t["ms_median"],
            "matmul_tflops": 2 * n ** 3 / (t["ms_median"] * 1e-3) / 1e12}


def copy_bandwidth(nbytes: int, device: torch.device) -> dict:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()  # (nbytes,)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, **({} if device.type == "cuda" else dict(warmup=1, rep=3)))
    return {"copy_bytes": nbytes, "copy_tb_per_s": 2 * nbytes / (t["ms_median"] * 1e-3) / 1e12}


def bnb_int8(device: torch.device, dim: int = 4096, rows: int = 4096) -> dict:
    """LLM.int8() through kclip's own quantisation path, against the fp16/fp32 layer it came from."""
    try:
        from kclip.quantize import quantize_linears, quiet_bnb_cast_notice

        dtype = torch.float16 if device.type == "cuda" else torch.float32
        torch.manual_seed(0)
        dense = torch.nn.Sequential(torch.nn.Linear(dim, dim)).to(device, dtype)
        x = torch.randn(rows, dim, device=device, dtype=dtype)  # (rows, dim)
        with torch.no_grad():
            want = dense(x).float()  # (rows, dim)
        q = torch.nn.Sequential(torch.nn.Linear(dim, dim))
        q.load_state_dict(dense.state_dict())
        q = q.to(dtype)
        quantize_linears(q, "int8", device)
        with torch.no_grad(), quiet_bnb_cast_notice():
            got = q(x).float()
            t = time_fn(lambda: q(x), device, **({} if device.type == "cuda" else dict(warmup=1, rep=3)))
        cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
        return {"bnb_int8_ok": True, "bnb_int8_layer": type(q[0]).__name__, "bnb_int8_cos_min": float(cos.min()),
                "bnb_int8_rel_err": float((got - want).norm() / want.norm()), "bnb_int8_ms": t["ms_median"],
                "bnb_int8_shape": [rows, dim, dim]}
    except Exception as exc:  # noqa: BLE001 - the record says why int8 does not run here
        return {"bnb_int8_ok": False, "bnb_int8_error": f"{type(exc).__name__}: {exc}"[:300]}


def deepspeed_accelerator() -> dict:
    try:
        from deepspeed.accelerator import get_accelerator

        acc = get_accelerator()
        return {"deepspeed_accelerator": acc.device_name(), "deepspeed_comm_backend": acc.communication_backend_name()}
    except Exception as exc:  # noqa: BLE001
        return {"deepspeed_accelerator": None, "deepspeed_error": f"{type(exc).__name__}: {exc}"[:300]}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU, small sizes, seconds")
    p.add_argument("--results-dir", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--matmul-n", type=int, default=None, help="square matmul size (default 8192; 256 with --quick)")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.quick or not torch.cuda.is_available() else "cuda"))
    rec = {**provenance(device), "bench": NAME, "impl": "env", "python": sys.version.split()[0],
           "platform": platform.platform(), "packages": package_versions()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        rec.update(capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                   memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda)
    t0 = time.perf_counter()
    rec.update(matmul_ceiling(args.matmul_n or (256 if args.quick else 8192), device))
    rec.update(copy_bandwidth((1 << 20) if args.quick else (2 << 30), device))
    rec.update(bnb_int8(device, *((64, 32) if args.quick else ())))
    rec.update(deepspeed_accelerator())
    rec["probe_s"] = time.perf_counter() - t0
    log = ResultsLog(NAME, args.results_dir)
    log.add(rec)
    print(f"[env] {rec['device']}: matmul {rec['matmul_dtype']} {rec['matmul_n']}^3 {rec['matmul_tflops']:.1f} TFLOP/s, "
          f"copy {rec['copy_tb_per_s']:.2f} TB/s, int8 "
          + (f"cos {rec['bnb_int8_cos_min']:.4f}" if rec.get("bnb_int8_ok") else rec.get("bnb_int8_error", "?"))
          + f", DeepSpeed {rec.get('deepspeed_accelerator')}/{rec.get('deepspeed_comm_backend')}", flush=True)
    for name, version in rec["packages"].items():
        print(f"[env]   {name:>20}: {version}", flush=True)
    return [rec]


if __name__ == "__main__":
    main()
