"""What every kclip benchmark shares: timing, peak memory, provenance, JSONL results and plots.

Times are medians with p20/p80 over repetitions (``triton.testing.do_bench`` on a GPU, a wall-clock
loop on CPU). Absolute times mean something only from a GPU; on CPU compare ratios within one run.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(device: torch.device | str) -> dict:
    """Who measured what where: device, library versions, git revision, UTC time."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "git": git_revision(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "interpreter": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    }


def time_fn(fn: Callable[[], object], device: torch.device | str, warmup: int = 3, rep: int = 10,
            wallclock: bool = False) -> dict:
    """Median, p20 and p80 of ``fn()`` in milliseconds.

    On a GPU ``triton.testing.do_bench`` (warm-up and repetitions by time) unless ``wallclock``: then, as on
    CPU, ``warmup`` untimed and ``rep`` timed calls, synchronising the device around each (for calls of
    seconds, where do_bench's time-based repetition would be too costly).
    """
    device = torch.device(device)
    if device.type == "cuda" and not wallclock:
        import triton.testing
        med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"ms_median": med, "ms_p20": p20, "ms_p80": p80}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(rep):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else [samples[0]] * 9
    return {"ms_median": statistics.median(samples), "ms_p20": q[1], "ms_p80": q[7]}


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str) -> int | None:
    """Peak device memory allocated during ``fn()`` above what was allocated before (GPU only)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def append_results(name: str, records: list[dict], results_dir: Path | str | None = None) -> Path:
    """Append records to ``<results_dir>/<name>.jsonl`` (one JSON object a line) and return the path."""
    results_dir = Path(results_dir) if results_dir is not None else RESULTS_DIR
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.jsonl"
    with open(path, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
    return path


def plot_vs(records: list[dict], x: str, ys: list[str], group: str, out_png: Path | str, title: str = "") -> Path:
    """One panel per metric in ``ys`` (log-log), one line per value of ``group``; written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ys), figsize=(5 * len(ys), 4), squeeze=False)
    for ax, y in zip(axes[0], ys):
        for key in sorted({str(r.get(group)) for r in records}):
            pts = sorted((r[x], r[y]) for r in records if str(r.get(group)) == key and r.get(y) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png
