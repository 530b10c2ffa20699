"""Input pipeline throughput: can the DataLoader feed the training step?

Measures pairs/s of ``kclip.data.PairDataset`` (decode + open_clip's train transform + tokenise + one
memory-mapped teacher-embedding row + concept label per pair) through ``torch.utils.data.DataLoader`` for each
``--workers`` count, against a control that serves the same fields from in-memory tensors (DataLoader, collate,
worker IPC and pinning only, no decode).

The on-disk set is ``kclip.synthetic.generate`` at ``--image-size`` (224 by default, a few thousand images),
re-encoded as JPEG with its own CSV by default (``--image-format jpeg``: web data such as CC3M is JPEG; PNG
decodes slower), indexed and verified with ``kclip.data.build_index``. The teacher embeddings are a real
teacher cache of those captions (random fp16 rows of dimension ``--teacher-dim``, sharded as the product
shards them), written by the cache format's own writer (``kclip.embedding_cache.write_cache``) and read by
the product's reader (``open_cache`` -> ``EmbeddingCache``, memory-mapped, reopened in each worker) through
``kclip.targets.TeacherTargets`` (L2 mode): the code path training runs, not a copy of it.

Each worker count: a fresh DataLoader (``pin_memory`` on a GPU, batches moved to the device with
``non_blocking``, as ``kclip.trainer`` does), time to the first batch (worker start-up) reported apart, then
``--batches`` timed batches: pairs/s = pairs / time. If ``<results-dir>/train_step.jsonl`` holds a
``kclip-fused`` record from the same device, the summary says whether the loader keeps up with that step rate
(per GPU) and estimates the workers needed.

    python -m bench.bench_loader                      # 224 px, ViT-B-32 transforms, batch 256, workers 0/2/4/8
    python -m bench.bench_loader --quick --results-dir /tmp/r   # tiny, seconds on CPU

Results append to ``<results-dir>/loader.jsonl``; a plot goes beside it.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bench.harness import RESULTS_DIR, ResultsLog, plot_vs, provenance, read_records
from kclip.atomic import atomic_path

NAME = "loader"


# The identity the benchmark's cache records: no teacher ran, so its name says what the rows are.
BENCH_TEACHER = "random-normal (bench_loader)"


def teacher_cache(out_dir: Path, captions: list[str], dim: int, shard_size: int, seed: int = 0):
    """A finished teacher cache of random fp16 rows for ``captions``, opened with the product's reader.

    Reused when ``out_dir`` already holds one for these captions, dim and shard size; otherwise (re)written with
    ``kclip.embedding_cache.write_cache``, the format's writer (the same files ``build_cache`` writes).
    """
    from kclip.embedding_cache import (CacheCorruptError, CacheMismatchError, captions_sha256, open_cache,
                                       write_cache)

    expect = {"teacher": BENCH_TEACHER, "captions_sha256": captions_sha256(captions), "count": len(captions),
              "dim": dim, "shard_size": shard_size}
    try:
        return open_cache(out_dir, expect=expect)
    except (CacheCorruptError, CacheMismatchError):
        shutil.rmtree(out_dir, ignore_errors=True)
    rows = np.random.default_rng(seed).standard_normal((len(captions), dim), dtype=np.float32)  # (N, d')
    write_cache(out_dir, rows, captions, {"teacher": BENCH_TEACHER, "revision": None, "precision": "fp32",
                                          "pooling": "mean", "max_length": 0, "prompt": None, "dim": dim},
                shard_size=shard_size)
    return open_cache(out_dir, expect=expect)


def jpeg_copy(data_dir: Path, quality: int = 90) -> Path:
    """Re-encode the synthetic set's PNGs as JPEG next to them; returns the CSV pointing at the JPEGs."""
    from PIL import Image

    src_csv, out_csv = data_dir / "train.csv", data_dir / "train_jpeg.csv"
    if out_csv.is_file() and out_csv.stat().st_mtime >= src_csv.stat().st_mtime:
        return out_csv
    (data_dir / "images_jpeg").mkdir(exist_ok=True)
    with open(src_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    done = {}
    for row in rows:
        png = row["image"]
        if png not in done:
            jpg = "images_jpeg/" + Path(png).with_suffix(".jpg").name
            Image.open(data_dir / png).convert("RGB").save(data_dir / jpg, quality=quality)
            done[png] = jpg
        row["image"] = done[png]
    with atomic_path(out_csv) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out_csv


class InMemoryPairs(torch.utils.data.Dataset):
    """The control: the same fields as PairDataset from a small pool of precomputed tensors (no decode)."""

    def __init__(self, n: int, image_size: int, context: int, dim: int, pool: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.n = n
        self.images = torch.randn(pool, 3, image_size, image_size, generator=g)   # (P, 3, H, W)
        self.tokens = torch.randint(0, 49408, (pool, context), generator=g)        # (P, L)
        self.teacher = torch.randn(pool, dim, generator=g)                         # (P, d')
        self.labels = torch.randint(0, 1000, (n,), generator=g)                    # (N,)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        j = i % len(self.images)
        return {"image": self.images[j], "tokens": self.tokens[j], "index": i, "teacher": self.teacher[j],
                "concept": self.labels[i]}


def measure(dataset, batches: list[list[int]], workers: int, device: torch.device) -> dict:
    """Time one DataLoader pass: first batch (start-up) apart, then the rest; batches moved to ``device``."""
    pin = device.type == "cuda"
    from kclip.data import pair_loader

    loader = pair_loader(dataset, batches, num_workers=workers, pin_memory=pin)  # the trainer's loader

    def consume(micro):
        for key in ("image", "tokens", "teacher", "concept"):
            micro[key].to(device, non_blocking=pin)

    t0 = time.perf_counter()
    it = iter(loader)
    consume(next(it))
    first = time.perf_counter() - t0
    per_batch, pairs = [], 0
    t1 = last = time.perf_counter()
    for micro in it:
        consume(micro)
        pairs += len(micro["index"])
        now = time.perf_counter()
        per_batch.append((now - last) * 1e3)
        last = now
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t1
    del it, loader
    per_batch.sort()
    q = statistics.quantiles(per_batch, n=10, method="inclusive") if len(per_batch) > 1 else [per_batch[0]] * 9
    return {"first_batch_s": first, "timed_batches": len(per_batch), "timed_pairs": pairs,
            "pairs_per_s": pairs / elapsed, "ms_median": statistics.median(per_batch), "ms_p20": q[1],
            "ms_p80": q[7]}


def step_rate(results_dir: Path, device_name: str) -> dict | None:
    """The newest kclip-fused train_step record measured on ``device_name`` (None if there is none)."""
    path = results_dir / "train_step.jsonl"
    if not path.is_file():
        return None
    best = None
    for r in read_records(path):
        if r.get("impl") == "kclip-fused" and r.get("device") == device_name and r.get("pairs_per_s"):
            if best is None or r.get("date", "") >= best.get("date", ""):
                best = r
    return best


def compare(records: list[dict], step: dict | None) -> list[str]:
    """Lines saying whether the loader keeps up with the measured step rate."""
    real = [r for r in records if r["impl"] == "pairdataset" and r.get("pairs_per_s")]
    if not real:
        return ["no PairDataset measurement succeeded"]
    best = max(real, key=lambda r: r["pairs_per_s"])
    if step is None:
        return [f"best loader rate {best['pairs_per_s']:.0f} pairs/s ({best['num_workers']} workers); no kclip-fused "
                "train_step record from this device to compare with (run python -m bench.bench_train_step first)"]
    need = step["pairs_per_s"]
    per_worker = max((r["pairs_per_s"] / max(r["num_workers"], 1) for r in real if r["num_workers"] > 0),
                     default=best["pairs_per_s"])
    verdict = "keeps up" if best["pairs_per_s"] >= need else "is too slow"
    lines = [f"loader: {best['pairs_per_s']:.0f} pairs/s with {best['num_workers']} workers; kclip-fused step "
             f"({step['model']}, batch {step['batch']}, {step['precision']}) consumes {need:.0f} pairs/s per GPU: "
             f"the loader {verdict} ({best['pairs_per_s'] / need:.2f}x)",
             f"  ~{per_worker:.0f} pairs/s per worker -> about {int(np.ceil(need / per_worker))} worker(s) per GPU "
             "needed at this step rate"]
    return lines


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny: 48 images at 64 px, kclip-tiny transforms, workers 0/2, 3 cache shards")
    p.add_argument("--results-dir", default=None, help=f"where the JSONL and plot go (default {RESULTS_DIR})")
    p.add_argument("--data-dir", default=None, help="where the synthetic set lives (default: a temp folder, reused)")
    p.add_argument("--model", default=None, help="open_clip model whose train transform/tokenizer run (ViT-B-32)")
    p.add_argument("--num-images", type=int, default=None, help="synthetic images (2 captions each; default 3000)")
    p.add_argument("--image-size", type=int, default=None, help="stored image side in px (default 224)")
    p.add_argument("--image-format", choices=["jpeg", "png"], default="jpeg")
    p.add_argument("--batch-size", type=int, default=None, help="default 256")
    p.add_argument("--batches", type=int, default=None, help="timed batches per worker count (default 20)")
    p.add_argument("--workers", type=int, nargs="+", default=None, help="default 0 2 4 8")
    p.add_argument("--teacher-dim", type=int, default=None, help="d' of the cached teacher embeddings (4096)")
    p.add_argument("--shard-size", type=int, default=None,
                   help="captions per cache shard (default: the product's, teacher.shard_size)")
    p.add_argument("--no-control", action="store_true", help="skip the in-memory control")
    p.add_argument("--device", default=None, help="default cuda when available (cpu with --quick)")
    args = p.parse_args(argv)
    if args.quick:
        defaults = dict(model="kclip-tiny", num_images=48, image_size=64, batch_size=16, batches=4, workers=[0, 2],
                        teacher_dim=64, shard_size=32, device="cpu")
    else:
        defaults = dict(model="ViT-B-32", num_images=3000, image_size=224, batch_size=256, batches=20,
                        workers=[0, 2, 4, 8], teacher_dim=4096,
                        device="cuda" if torch.cuda.is_available() else "cpu")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> list[dict]:
    import open_clip

    from kclip.config import TeacherConfig
    from kclip.data import PairDataset, build_index
    from kclip.model import register_model_configs
    from kclip.synthetic import generate
    from kclip.targets import TeacherTargets

    args = _parse(argv)
    device = torch.device(args.device)
    results_dir = Path(args.results_dir) if args.results_dir else RESULTS_DIR
    data_dir = Path(args.data_dir) if args.data_dir else (
        Path(tempfile.gettempdir()) / f"kclip-bench-loader-{args.num_images}x{args.image_size}")

    t0 = time.perf_counter()
    generate(data_dir, n_train_images=args.num_images, n_val_images=1, captions_per_image=2,
             image_size=args.image_size, heldout=0, seed=0, progress=False)
    table = jpeg_copy(data_dir) if args.image_format == "jpeg" else data_dir / "train.csv"
    index = build_index("csv", str(table), cache_path=data_dir / f"index_{table.stem}.json", progress=False)
    n = len(index.pairs)
    shard_size = args.shard_size or TeacherConfig().shard_size
    cache = teacher_cache(data_dir / f"teacher_{table.stem}_{args.teacher_dim}", index.captions, args.teacher_dim,
                          shard_size)
    prep_s = time.perf_counter() - t0

    register_model_configs()
    cfg = open_clip.get_model_config(args.model)
    if cfg is None:
        raise ValueError(f"--model {args.model!r} is not an open_clip model config")
    size = cfg["vision_cfg"]["image_size"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        preprocess = open_clip.image_transform(size, is_train=True)
    tokenizer = open_clip.get_tokenizer(args.model)
    labels = torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(0))
    real = PairDataset(index, preprocess, tokenizer, TeacherTargets(cache, "l2"), labels, seed=0)
    context = int(tokenizer(["a"]).shape[1])
    control = InMemoryPairs(n, size, context, args.teacher_dim)

    needed = args.batch_size * (args.batches + 1)
    if n < needed:
        raise ValueError(f"{n} pairs make fewer than {args.batches + 1} batches of {args.batch_size}: raise "
                         f"--num-images to at least {-(-needed // 2)} or lower --batches / --batch-size")
    perm = np.random.default_rng(0).permutation(n)
    batches = [perm[i * args.batch_size:(i + 1) * args.batch_size].tolist() for i in range(args.batches + 1)]

    prov = provenance(device)
    base = {**prov, "bench": NAME, "model": args.model, "stored_image_size": args.image_size, "image_size": size,
            "image_format": args.image_format, "batch": args.batch_size, "num_pairs": n,
            "teacher_dim": args.teacher_dim, "cache_shards": cache.manifest.num_shards,
            "pin_memory": device.type == "cuda", "cpu_count": os.cpu_count(),
            "prepare_s": prep_s}
    log = ResultsLog(NAME, results_dir)
    records = []
    sets = [("pairdataset", real)] + ([] if args.no_control else [("in-memory", control)])
    for workers in args.workers:
        for impl, dataset in sets:
            rec = {**base, "impl": impl, "num_workers": workers}
            try:
                rec.update(measure(dataset, batches, workers, device))
            except Exception as exc:  # noqa: BLE001 - keep the other configurations
                rec["error"] = f"{type(exc).__name__}: {exc}"[:400]
            records.append(log.add(rec))  # on disk at once: a killed run keeps what it measured
            if "error" in rec:
                print(f"{impl:>12} workers={workers}: ERROR {rec['error']}", flush=True)
            else:
                print(f"{impl:>12} workers={workers}: {rec['pairs_per_s']:9.1f} pairs/s  batch "
                      f"{rec['ms_median']:.1f} ms (p20 {rec['ms_p20']:.1f}, p80 {rec['ms_p80']:.1f})  first batch "
                      f"{rec['first_batch_s']:.2f} s", flush=True)
    step = step_rate(results_dir, prov["device"])
    lines = compare(records, step)
    for r in records:
        if r["impl"] == "pairdataset" and r.get("pairs_per_s") and step is not None:
            r["step_pairs_per_s"] = step["pairs_per_s"]
            r["keeps_up"] = r["pairs_per_s"] >= step["pairs_per_s"]
    print("\n".join(lines))
    if device.type == "cpu":
        print("(CPU run: rates depend on this machine's cores; compare within the run)")
    out = log.update()  # keeps_up, into this run's lines
    ok = [r for r in records if r.get("pairs_per_s")]
    if ok:
        plot_vs([{**r, "workers_plus_1": r["num_workers"] + 1} for r in ok], "workers_plus_1", ["pairs_per_s"],
                "impl", out.with_suffix(".png"), title=f"loader pairs/s vs workers+1 ({prov['device']})")
    return records


if __name__ == "__main__":
    main()
