"""Teacher throughput: tokens/s, captions/s, peak and weight memory for int8 / nf4 / bf16 on a Llama-2-7B shape.

What is measured (one process, one device):
- ``kind="throughput"``: ``Teacher.encode_tokenized`` over N captions (random token ids, lengths lognormal
  around ~13 words ~ 18 tokens, capped at 77 like CLIP's context), per precision, with length-bucketed
  batches (``token_budget``) and with naive fixed-size batches in data order (batch = budget // 77). Reports
  wall time (median/p20/p80 of ``--rep`` runs; the first run is the warm-up and the peak-memory run),
  captions/s, real tokens/s, peak memory above the weights, weight memory, and the embedding cosine of each
  precision against the highest one measured (bf16 on GPU, fp32 on CPU), mean and min over captions.
- ``kind="padding"``: padding efficiency (real / padded tokens) of bucketed vs naive batching.

The model is ``LlamaModel(LlamaConfig(...))`` with random weights built directly on the device (no
download). Every precision starts from the same seed in bf16 (fp32 on CPU) and is converted / quantised
with ``kclip.quantize.quantize_linears`` (bitsandbytes Linear8bitLt / Linear4bit), so the cosines compare
the same weights. Absolute numbers mean something only from a GPU.

    python -m bench.bench_teacher                 # GPU, Llama-2-7B shape
    python -m bench.bench_teacher --quick --results-dir /tmp/r   # tiny Llama on CPU, fp32 + int8
"""
from __future__ import annotations

import argparse
import gc
import warnings

import numpy as np
import torch

from bench.harness import ResultsLog, is_oom, plot_vs, provenance, time_fn
from kclip.quantize import quantize_linears
from kclip.teacher import Teacher, plan_batches

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
MAX_TOKENS = 77


def naive_batches(n: int, batch_size: int) -> list[np.ndarray]:
    """Fixed-size batches in the given order (the baseline that length bucketing is measured against)."""
    return [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def padding_efficiency(lengths, batches: list[np.ndarray]) -> float:
    """Real tokens / padded tokens over all batches (1.0 = no padding)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    real = int(lengths.sum())
    padded = sum(int(lengths[b].max()) * len(b) for b in batches if len(b))
    return real / padded if padded else 1.0


def caption_lengths(n: int, rng: np.random.Generator, words_median: float = 13.0) -> np.ndarray:
    """Token lengths of realistic captions: lognormal words (median ~13), ~1.3 tokens a word, + BOS, <= 77."""
    words = rng.lognormal(np.log(words_median), 0.45, size=n)
    return np.clip(np.round(words * 1.3).astype(np.int64) + 1, 3, MAX_TOKENS)


def build_model(shape: dict, precision: str, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """Random-weight LlamaModel on ``device`` in ``precision`` (same weights for every precision)."""
    from transformers import LlamaConfig, LlamaModel

    init_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(init_dtype)
    try:
        with torch.device(device):
            model = LlamaModel(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    if precision == "fp32":
        model = model.float()
    elif precision == "bf16":
        model = model.to(torch.bfloat16)
    elif precision == "int8":
        # LLM.int8() keeps the rest in fp16 on GPU; fp32 on CPU.
        model = model.to(torch.float16 if device.type == "cuda" else torch.float32)
        quantize_linears(model, "int8", device)
    elif precision == "nf4":
        compute = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = model.to(compute)
        quantize_linears(model, "nf4", device, compute_dtype=compute)
    else:
        raise ValueError(f"unknown precision {precision!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def forward_flops(shape: dict, lengths: np.ndarray) -> float:
    """Useful forward FLOPs of a Llama of ``shape`` over captions of ``lengths`` tokens (no padding counted).

    Per token 2 x the projection/MLP weights (q, k, v, o, gate, up, down); per caption of L tokens the causal
    attention products QK^T and PV, 2 x 2 x L^2 / 2 x hidden per layer. The embedding lookup is free and the
    pooled model has no LM head.
    """
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape.get("num_key_value_heads", shape["num_attention_heads"])
    linear_params = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    tokens = float(np.sum(lengths))
    attention = 2.0 * layers * h * float(np.sum(lengths.astype(np.float64) ** 2))
    return 2.0 * linear_params * tokens + attention


def weight_bytes(model: torch.nn.Module) -> int:
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    for m in model.modules():  # bitsandbytes keeps scales beside the weights
        w = getattr(m, "weight", None)
        scb = getattr(w, "SCB", None)
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
        qs = getattr(w, "quant_state", None)
        absmax = getattr(qs, "absmax", None)
        if isinstance(absmax, torch.Tensor):
            total += absmax.numel() * absmax.element_size()
    return total


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny Llama on CPU, fp32 + int8, a few dozen captions")
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--precisions", default=None, help="comma list of int8,nf4,bf16,fp32")
    ap.add_argument("--num-captions", type=int, default=None)
    ap.add_argument("--budgets", default=None, help="comma list of token budgets (padded tokens per batch)")
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers (faster runs)")
    ap.add_argument("--rep", type=int, default=None)
    ap.add_argument("--no-naive", action="store_true", help="skip timing naive batching")
    args = ap.parse_args(argv)

    if args.quick:
        device = torch.device(args.device or "cpu")
        shape, precisions, n, budgets, rep = dict(TINY), ["fp32", "int8"], 48, [256, 1024], 1
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        shape, precisions, n, budgets, rep = dict(LLAMA2_7B), ["bf16", "int8", "nf4"], 2048, [4096, 16384], 3
    if args.precisions:
        precisions = args.precisions.split(",")
    n = args.num_captions or n
    budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else budgets
    rep = args.rep or rep
    if args.layers:
        shape["num_hidden_layers"] = args.layers

    rng = np.random.default_rng(0)
    lengths = caption_lengths(n, rng)
    toks = [rng.integers(3, shape["vocab_size"], size=int(L)).tolist() for L in lengths]
    for t in toks:
        t[0] = 1  # BOS
    real_tokens = int(lengths.sum())
    flops = forward_flops(shape, lengths)
    prov = provenance(device)
    base = {**prov, "bench": "teacher", "model": "llama2-7b-shape" if not args.quick else "tiny-llama",
            **{k: v for k, v in shape.items()}, "num_captions": n, "mean_tokens": float(lengths.mean()),
            "max_tokens": int(lengths.max())}
    log = ResultsLog("teacher", args.results_dir)
    records: list[dict] = []

    def add(rec: dict) -> None:  # on disk at once: a killed run keeps what it measured
        records.append(log.add(rec))

    for budget in budgets:
        add({**base, "kind": "padding", "impl": "padding", "token_budget": budget,
                        "bucketed_efficiency": padding_efficiency(lengths, plan_batches(lengths, budget)),
                        "naive_efficiency": padding_efficiency(lengths, naive_batches(n, max(1, budget // MAX_TOKENS))),
                        "naive_batch_size": max(1, budget // MAX_TOKENS)})

    ref_emb, ref_name = None, None
    order = sorted(precisions, key=lambda p: ["fp32", "bf16", "int8", "nf4"].index(p))  # reference first
    for precision in order:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated(device)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = build_model(shape, precision, device)
        except Exception as exc:  # noqa: BLE001 - record and go on (OOM, missing kernels)
            add({**base, "kind": "throughput", "impl": f"{precision}/build", "precision": precision,
                            "token_budget": budgets[0], "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        wbytes = weight_bytes(model)
        walloc = torch.cuda.memory_allocated(device) - before if device.type == "cuda" else None
        teacher = Teacher.from_model(model, None, name=base["model"], precision=precision, pooling="mean",
                                     max_length=MAX_TOKENS, device=device, pad_token_id=0)
        runs = [("bucketed", b) for b in budgets] + ([] if args.no_naive else [("naive", budgets[0])])
        for batching, budget in runs:
            rec = {**base, "kind": "throughput", "precision": precision, "batching": batching,
                   "impl": f"{precision}/{batching}", "token_budget": budget, "weight_bytes": wbytes,
                   "weight_bytes_allocated": walloc}
            if batching == "bucketed":
                fn = lambda b=budget: teacher.encode_tokenized(toks, token_budget=b)  # noqa: E731
            else:
                bs = max(1, budget // MAX_TOKENS)
                fn = lambda bs=bs: torch.cat([teacher.encode_tokenized(toks[i:i + bs], token_budget=10**9)  # noqa: E731
                                              for i in range(0, n, bs)])
            try:
                # First run: warm-up and peak memory (above the weights).
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    base_alloc = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                emb = fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    rec["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) - base_alloc
                else:
                    rec["peak_memory_bytes"] = None
                rec.update(time_fn(fn, device, warmup=0, rep=rep, wallclock=True))
            except Exception as exc:  # noqa: BLE001
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rec["error"] = ("OOM: " if is_oom(exc) else "") + f"{type(exc).__name__}: {exc}"[:300]
                add(rec)
                continue
            sec = rec["ms_median"] / 1e3
            rec["captions_per_s"] = n / sec
            rec["tokens_per_s"] = real_tokens / sec
            rec["flops"] = flops
            rec["tflops"] = flops / sec / 1e12  # useful FLOPs (no padding): compare with the bf16 matmul ceiling
            if batching == "bucketed" and budget == budgets[0]:
                if ref_emb is None:
                    ref_emb, ref_name = emb, precision
                cos = torch.nn.functional.cosine_similarity(emb.float(), ref_emb.float(), dim=-1)
                rec.update(cos_ref=ref_name, cos_mean=float(cos.mean()), cos_min=float(cos.min()))
            add(rec)
            print(f"{rec['impl']:>14} budget={budget:>6}: {rec['captions_per_s']:10.1f} cap/s "
                  f"{rec['tokens_per_s']:12.1f} tok/s  peak={rec.get('peak_memory_bytes')}  "
                  f"weights={wbytes / 2**30:.2f} GiB  cos={rec.get('cos_mean', float('nan')):.4f}", flush=True)
        del teacher, model
        gc.collect()
    for r in records:
        if r["kind"] == "padding":
            print(f"padding budget={r['token_budget']}: bucketed {r['bucketed_efficiency']:.3f} vs naive "
                  f"{r['naive_efficiency']:.3f} (batch {r['naive_batch_size']})")

    out = log.path
    thr = [r for r in records if r["kind"] == "throughput" and "error" not in r]
    if thr:
        ys = ["tokens_per_s"] + (["peak_memory_bytes"] if device.type == "cuda" else [])
        plot_vs(thr, "token_budget", ys, "impl", out.with_suffix(".png"),
                title=f"teacher throughput ({base['model']}, {prov['device']})")
    return records


if __name__ == "__main__":
    main()
