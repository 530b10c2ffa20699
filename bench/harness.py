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
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import torch

from kclip.atomic import atomic_path, atomic_write_text
from kclip.stamps import GIT_REV_ENV  # noqa: F401  (bench.gpu_suite sets it for its steps)
from kclip.stamps import git_revision as _checkout_revision

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_REPO = Path(__file__).resolve().parent.parent
# The one name -> dtype map of the benches' --dtype options.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def sync(device: torch.device | str) -> None:
    """Wait until the device has run everything queued on it (nothing to wait for on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def git_revision() -> str:
    """The checkout's short git revision (``+dirty`` with uncommitted changes to tracked files).

    Where ``.git`` does not travel (a copied tree on a benchmark machine) the revision comes from the
    ``KCLIP_GIT_REV`` environment variable, which ``bench.gpu_suite`` sets for its steps.
    """
    return _checkout_revision(Path(__file__).resolve().parent)


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
    t = time_steps(lambda i: fn(), device, warmup, rep, sync_each=True)
    return {k: t[k] for k in ("ms_median", "ms_p20", "ms_p80")}


def time_steps(step: Callable[[int], object], device: torch.device | str, warmup: int, steps: int,
               sync_each: bool = False) -> dict:
    """Per-step times (ms) of ``step(i)``: median, p20, p80, plus the wall-clock mean over all timed steps.

    ``warmup`` untimed steps, then ``steps`` timed ones. On a GPU the steps run back to back, timed by CUDA
    events (as a training loop runs them), unless ``sync_each``: then the device is drained around each step
    and the host clock times it.
    """
    device = torch.device(device)
    for i in range(warmup):
        step(i)
    sync(device)
    t0 = time.perf_counter()
    if device.type == "cuda" and not sync_each:
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        events[0].record()
        for i in range(steps):
            step(warmup + i)
            events[i + 1].record()
        torch.cuda.synchronize(device)
        samples = [events[i].elapsed_time(events[i + 1]) for i in range(steps)]
    else:
        samples = []
        for i in range(steps):
            sync(device)
            s = time.perf_counter()
            step(warmup + i)
            sync(device)
            samples.append((time.perf_counter() - s) * 1e3)
    wall_ms = (time.perf_counter() - t0) * 1e3
    ordered = sorted(samples)
    q = statistics.quantiles(ordered, n=10, method="inclusive") if len(ordered) > 1 else [ordered[0]] * 9
    return {"ms_median": statistics.median(ordered), "ms_p20": q[1], "ms_p80": q[7], "ms_wall_mean": wall_ms / steps}


def host_us(fn: Callable[[], object], rep: int, warmup: int = 20) -> float:
    """Median wall microseconds of ``fn()`` over ``rep`` calls after ``warmup``, with no device sync: the host's
    own cost per call when ``fn`` runs on CPU tensors (with its launches stubbed, as the ``--host-us`` benches do)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def profile_fn(fn: Callable[[], object], device: torch.device | str, rep: int = 5, top: int = 8) -> dict:
    """Where one call of ``fn()`` spends its time: the device's busy time against the wall time, and the top ops.

    Runs ``fn()`` once untimed, ``rep`` times timed, ``rep`` times under ``torch.profiler``, ``rep`` times
    under ``cProfile``, then ``rep`` times counting host waits. Returns ``{"activity", "rep", "wall_ms",
    "host_ms", "device_ms", "busy", "bound", "top": [{"name", "calls", "ms", "share"}...], "host_top": [same
    keys], "syncs": {...}}``, all per call:

    - ``wall_ms``: from the call to the device being done (drained before and after each call).
    - ``host_ms``: until ``fn()`` returns, not waiting for the device at the end (but including any wait the
      call makes itself, e.g. an ``.item()``).
    - ``device_ms``: the summed self time of the device's kernels, copies and memsets (a GPU); on CPU the
      summed self time of the aten ops (the CPU is then the device).
    - ``busy`` = device_ms / wall_ms and ``bound``: "device" when the device is busy >= 80% of the wall time
      (faster kernels make the call faster), else "host" (the device waits for Python, launches or syncs:
      faster kernels alone will not help). None on CPU.
    - ``top``: the ``top`` kernels (GPU) or aten ops (CPU) by self time.
    - ``host_top``: where the host's time goes, the ``top`` Python functions by self time per call (``cProfile``
      over another ``rep`` calls; the device drained once at the end): on a host-bound call this names the
      launcher, the autograd glue or the library that holds the device up.
    - ``syncs``: how often the host waits for the device and at which lines (:func:`count_host_syncs`).
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    fn()
    sync()
    wall, host = [], []
    for _ in range(rep):
        sync()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
        sync()
        wall.append((time.perf_counter() - t0) * 1e3)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(rep):
            fn()
        sync()
    rows = []
    for e in prof.key_averages():
        if cuda:
            if e.device_type != DeviceType.CUDA:
                continue
            us = e.self_device_time_total
        else:
            if not e.key.startswith("aten::"):
                continue
            us = e.self_cpu_time_total
        if us > 0:
            rows.append((e.key, e.count, us))
    host_top = _host_profile(fn, rep, top, sync)
    syncs = count_host_syncs(fn, device, rep, top)
    total_us = sum(us for _, _, us in rows)
    rows.sort(key=lambda r: -r[2])
    device_ms, wall_ms = total_us / rep / 1e3, statistics.median(wall)
    busy = device_ms / wall_ms if cuda and wall_ms > 0 else None
    return {
        "activity": "cuda" if cuda else "cpu",
        "rep": rep,
        "wall_ms": wall_ms,
        "host_ms": statistics.median(host),
        "device_ms": device_ms,
        "busy": busy,
        "bound": None if busy is None else ("device" if busy >= 0.8 else "host"),
        "top": [{"name": name[:120], "calls": count / rep, "ms": us / rep / 1e3,
                 "share": us / total_us if total_us else None} for name, count, us in rows[:top]],
        "host_top": host_top,
        "syncs": syncs,
    }


# What reads a tensor's value on the host: on a GPU each call waits for the device to finish the queued work.
_HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")
# Frames that only pass an explicit wait on (the site named is the first frame outside them).
_WAIT_PLUMBING = ("torch/cuda/", "deepspeed/accelerator/")


def count_host_syncs(fn: Callable[[], object], device: torch.device | str, rep: int = 3, top: int = 4) -> dict:
    """How often one call of ``fn()`` makes the host wait for the device, and where.

    A wait drains the device's queue: the host stops running ahead, so launch overhead is no longer hidden
    behind device work. Counted:

    - explicit waits: ``torch.cuda.synchronize``, ``Event.synchronize``, ``Stream.synchronize`` on a GPU; on
      CPU the DeepSpeed accelerator's ``synchronize`` (a no-op there, a device-wide wait on a GPU), when
      DeepSpeed is loaded;
    - implicit waits: on a GPU every synchronizing CUDA operation ``torch.cuda.set_sync_debug_mode("warn")``
      reports (``.item()``, ``bool(t)``, device-to-host copies, ``nonzero``, ...); on CPU, where nothing waits,
      the calls that read a tensor's value on the host (``item``, ``tolist``, ``bool``/``float``/``int``,
      ``cpu``, ``numpy``), the same calls that wait on a GPU.

    Returns ``{"method", "per_call", "sites": [{"where": "file.py:line(function)", "per_call"}...]}`` (the
    ``top`` sites, most frequent first; ``where`` is the Python line that asked for the wait).
    """
    import collections
    import contextlib
    import warnings
    from unittest import mock

    device = torch.device(device)
    cuda = device.type == "cuda"
    sites: collections.Counter = collections.Counter()

    def count_caller() -> None:  # the frame that called the patched function, past any _WAIT_PLUMBING
        frame = sys._getframe(2)
        while frame.f_back is not None and any(d in frame.f_code.co_filename.replace("\\", "/")
                                               for d in _WAIT_PLUMBING):
            frame = frame.f_back
        sites[_short_frame(frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name)] += 1

    def waiting(original):
        def wait(*args, **kwargs):
            count_caller()
            with warnings.catch_warnings():  # counted here: not again by the sync debug mode
                warnings.simplefilter("ignore")
                return original(*args, **kwargs)
        return wait

    def reading(original):
        def read(self, *args, **kwargs):
            count_caller()
            return original(self, *args, **kwargs)
        return read

    if cuda:
        patches = [(torch.cuda, "synchronize", waiting), (torch.cuda.Event, "synchronize", waiting),
                   (torch.cuda.Stream, "synchronize", waiting)]
    else:
        patches = [(torch.Tensor, name, reading) for name in _HOST_READS]
        if "deepspeed.accelerator" in sys.modules:
            patches.append((sys.modules["deepspeed.accelerator"].get_accelerator(), "synchronize", waiting))
    caught = []
    if cuda:
        torch.cuda.synchronize(device)  # the work queued before does not count
    with contextlib.ExitStack() as stack:  # every patch comes off on the way out, errors included
        for owner, name, wrap in patches:
            stack.enter_context(mock.patch.object(owner, name, wrap(getattr(owner, name))))
        if cuda:
            caught = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            stack.callback(torch.cuda.set_sync_debug_mode, torch.cuda.get_sync_debug_mode())
            torch.cuda.set_sync_debug_mode("warn")
        for _ in range(rep):
            fn()
    for w in caught:
        if "synchroniz" in str(w.message):
            sites[_short_frame(w.filename, w.lineno)] += 1
    method = ("explicit waits + cuda sync debug mode" if cuda else
              "host reads of tensor values + DeepSpeed accelerator waits (CPU)")
    total = sum(sites.values())
    return {"method": method, "per_call": total / rep,
            "sites": [{"where": where, "per_call": n / rep} for where, n in sites.most_common(top)]}


def _host_profile(fn: Callable[[], object], rep: int, top: int, sync: Callable[[], None]) -> list[dict]:
    """The ``top`` Python functions by self time over ``rep`` calls of ``fn()``, per call: ``{"name", "calls",
    "ms", "share"}`` with ``name`` as ``package/file.py:line(function)`` (or ``{built-in ...}``) and ``share`` of
    the host's profiled time."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(rep):
        fn()
    prof.disable()
    sync()
    stats = {key: v for key, v in pstats.Stats(prof).stats.items()  # {(file, line, func): (prim calls, calls,
             if "_lsprof" not in key[2]}  # self s, cumulative s, callers)}, without the profiler's own frame
    total = sum(v[2] for v in stats.values())
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [{"name": _short_frame(*key), "calls": v[1] / rep, "ms": 1e3 * v[2] / rep,
             "share": v[2] / total if total else None} for key, v in rows]


def _short_frame(file: str, line: int, func: str | None = None) -> str:
    """``.../site-packages/triton/runtime/jit.py``, 600, ``run`` -> ``triton/runtime/jit.py:600(run)`` (without
    ``func``: ``triton/runtime/jit.py:600``)."""
    if file == "~":  # built-ins: cProfile names them by themselves
        return func or file
    path = Path(file)
    if path.is_absolute() and path.is_relative_to(_REPO):  # this repository's own files: from its root
        return f"{path.relative_to(_REPO).as_posix()}:{line}" + (f"({func})" if func else "")
    parts = path.parts
    for anchor in ("site-packages", "dist-packages"):
        if anchor in parts:
            parts = parts[len(parts) - parts[::-1].index(anchor):]
            break
    else:
        parts = parts[-3:]
    return f"{'/'.join(parts)}:{line}" + (f"({func})" if func else "")


def format_profile(prof: dict, indent: str = "    ") -> str:
    """``profile_fn``'s result as a few printable lines."""
    bound = f", device busy {prof['busy']:.0%}: {prof['bound']}-bound" if prof.get("bound") else ""
    lines = [f"{indent}profile ({prof['activity']}): wall {prof['wall_ms']:.3f} ms/call, device {prof['device_ms']:.3f}, "
             f"host {prof['host_ms']:.3f}{bound}"]

    def ranked(entries: list[dict]) -> list[str]:  # one line per kernel or Python function
        out = []
        for t in entries:
            share = "" if t["share"] is None else f"{100 * t['share']:5.1f}%"
            out.append(f"{indent}  {t['ms']:9.3f} ms {share} x{t['calls']:<5g} {t['name'][:90]}")
        return out

    lines += ranked(prof["top"])
    if prof.get("syncs"):
        sy = prof["syncs"]
        sites = ", ".join(f"{t['where']} x{t['per_call']:g}" for t in sy["sites"])
        lines.append(f"{indent}host waits for the device: {sy['per_call']:g} per call ({sy['method']})"
                     + (f": {sites}" if sites else ""))
    if prof.get("host_top"):
        lines.append(f"{indent}host, Python self time per call (cProfile):")
        lines += ranked(prof["host_top"])
    return "\n".join(lines)


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


class ResultsLog:
    """A bench's results file, written as it measures: nothing measured is lost if the bench is killed.

    ``add(rec)`` appends the record to ``<results_dir>/<name>.jsonl`` at once (flushed). Ratios and other
    fields derived from several records are added to the same dicts later; ``update()`` then rewrites this
    run's lines in place (atomically), leaving every other run's lines as they were. Records carry
    ``run_id`` (one per ``ResultsLog``) and ``seq`` (their order in the run).
    """

    def __init__(self, name: str, results_dir: Path | str | None = None):
        self.dir = Path(results_dir) if results_dir is not None else RESULTS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"{name}.jsonl"
        self.run_id = uuid.uuid4().hex[:12]
        self.records: list[dict] = []

    def add(self, rec: dict) -> dict:
        rec.update(run_id=self.run_id, seq=len(self.records))
        self.records.append(rec)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
            f.flush()
        return rec

    def update(self) -> Path:
        """Rewrite this run's lines with the current contents of its records (other lines untouched)."""
        mine = iter(self.records)
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                is_mine = json.loads(line).get("run_id") == self.run_id
            except (json.JSONDecodeError, AttributeError):
                is_mine = False
            out.append(json.dumps(next(mine), sort_keys=True) if is_mine else line)
        atomic_write_text(self.path, "".join(x + "\n" for x in out))
        return self.path


def read_records(path: Path | str) -> list[dict]:
    """One results file's records, in file order. Unreadable lines (a run killed mid-write) are skipped, counted
    and reported on stderr; records written before a field existed get the value it implied (``_backfill``)."""
    path = Path(path)
    recs, bad = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict):
            recs.append(_backfill(path.stem, rec))
        else:
            bad += 1
    if bad:
        print(f"[bench] {path}: skipped {bad} unreadable line(s)", file=sys.stderr)
    return recs


def load_results(results_dir: Path | str) -> dict[str, list[dict]]:
    """bench name (file stem) -> its records (:func:`read_records`), for every ``*.jsonl`` in ``results_dir``
    that holds any."""
    out = {}
    for path in sorted(Path(results_dir).glob("*.jsonl")):
        recs = read_records(path)
        if recs:
            out[path.stem] = recs
    return out


def recorded_ceilings(device: str, results_dirs=(RESULTS_DIR,)) -> dict | None:
    """The newest ``env`` record's ceilings for ``device`` (a device name), else for the newest GPU on record:
    ``{"device", "matmul_tflops", "copy_tb_per_s", "same_device"}``; None when no record has them. The first
    directory that holds a usable record wins (a run's own results before the repository's)."""
    for d in results_dirs:
        path = Path(d) / "env.jsonl"
        if not path.exists():
            continue
        recs = [r for r in read_records(path) if r.get("matmul_tflops") and r.get("copy_tb_per_s")]
        mine = [r for r in recs if r.get("device") == device]
        gpus = [r for r in recs if not r.get("interpreter") and not str(r.get("device", "cpu")).startswith("cpu")]
        pick = (mine or gpus or [None])[-1]
        if pick:
            return {"device": pick["device"], "matmul_tflops": pick["matmul_tflops"],
                    "copy_tb_per_s": pick["copy_tb_per_s"], "same_device": pick["device"] == device}
    return None


def _backfill(bench: str, rec: dict) -> dict:
    """Fields that records written before they existed imply: a contrastive ``kclip`` or ``kclip-tune`` record
    without a ``strategy`` ran the fused kernels (the only strategy until the chunked one became the default)."""
    if bench == "clip_contrastive_loss" and rec.get("impl") in ("kclip", "kclip-tune") and "strategy" not in rec:
        return {**rec, "strategy": "fused"}
    return rec


def plot_vs(records: list[dict], x: str, ys: list[str], group: str, out_png: Path | str, title: str = "") -> Path:
    """One panel per metric in ``ys`` (log-log), one line per value of ``group``; written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ys), figsize=(5 * len(ys), 4), squeeze=False)
    for ax, y in zip(axes[0], ys):
        plotted = 0
        for key in sorted({str(r.get(group)) for r in records}):
            pts = sorted((r[x], r[y]) for r in records if str(r.get(group)) == key and r.get(y) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
                plotted += 1
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        if not plotted:  # e.g. peak CUDA memory in a CPU run: say so instead of an empty log-log panel
            ax.text(0.5, 0.5, f"no {y} in these records", transform=ax.transAxes, ha="center", va="center")
            continue
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return out_png
