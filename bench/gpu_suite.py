"""Every GPU measurement that matters, in priority order, inside one time budget.

GPU time is scarce (one H200 for about 15 minutes, machine start included), so the benchmarks run as one
prepared command that spends its seconds on what matters most first:

    python -m bench.gpu_suite --budget 480 --out /tmp/gs --pack $OUT     # on the GPU machine
    python -m bench.gpu_suite --list                                     # the plan, with estimated seconds
    python -m bench.gpu_suite --only contrastive projected_mse --budget 200 --out /tmp/gs
    python -m bench.gpu_suite --quick --out /tmp/gs                      # every step at tiny sizes on CPU
    kclip bench suite ...                                                # the same

How it keeps to the budget and loses nothing:

- Each step is a child process in its own process group (``python -m bench.bench_<op>`` or pytest) with a
  hard cap: ``min(step cap, budget left)``. At the cap the whole group gets SIGTERM, then SIGKILL. A step whose
  minimum no longer fits in what is left is skipped, and the skip is recorded with the reason.
- Every bench appends each measurement to ``<out>/results/<bench>.jsonl`` as soon as it is taken
  (``harness.ResultsLog``), the children run unbuffered and their output streams into ``<out>/suite.log`` and
  ``<out>/logs/<step>.log``, and after every step the whole of ``<out>`` is packed into
  ``<pack>/kclip-gpu-suite.tar.gz`` (with ``summary.md`` and ``suite.log`` beside it): a suite killed from
  outside still returns everything up to its last finished step, and the JSONL of the step it was in.
- Records carry the git revision; where ``.git`` did not travel, from ``KCLIP_GIT_REV`` (set it when you
  launch: the suite passes it on to every step).
- It ends with one table (``summary.md``, also printed): every performance target, the measured value, the
  ratio to the target and PASS / FAIL / n/a; then where the time goes for the profiled steps (``profile_*``:
  each bench's ``--profile``, ``harness.profile_fn``: wall vs device-busy time per call, host- or
  device-bound, the top kernel, the Python function with the most host time, and how often and where the
  host waits for the device); then the steps with their status and seconds.

``--quick`` runs the same steps with each bench's ``--quick`` sizes on CPU (Triton kernels in the interpreter):
the dry run that CI executes so the suite cannot rot. Its target table is marked as a dry run: CPU numbers
are not performance.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_NAME = "kclip-gpu-suite.tar.gz"
RESERVE_S = 8.0  # kept back from the budget for the final table and the last pack


@dataclasses.dataclass
class Step:
    """One child process of the suite.

    ``argv`` / ``quick_argv`` follow ``python`` (``-m bench.bench_x ...``); the suite appends
    ``--results-dir``. ``est_s`` is the expected time on one H200 (the plan and ``--list``), ``min_s`` the
    least time worth starting it with, ``cap_s`` its hard limit.
    """
    name: str
    what: str
    argv: list
    quick_argv: list
    est_s: float
    min_s: float
    cap_s: float
    results: bool = True  # a bench that takes --results-dir


def plan() -> list[Step]:
    """The steps in priority order (sizes from issue #13; estimates are for one H200)."""
    b = "bench."
    return [
        Step("env", "versions, bf16 matmul ceiling, copy bandwidth, bnb int8 Linear, DeepSpeed accelerator",
             ["-m", b + "bench_env"], ["-m", b + "bench_env", "--quick"], 25, 10, 60),
        Step("cuda_tests", "pytest -m cuda: every kernel against its reference on the GPU",
             ["-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests"],
             ["-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests/test_clip_contrastive_loss.py",
              "tests/test_projected_mse_loss.py", "tests/test_kmeans_assign.py", "tests/test_kmeans_update.py"],
             70, 30, 150, results=False),
        Step("contrastive", "clip_contrastive_loss fwd+bwd, N 16k/32k/131072 x D 768/512, kclip (the budget's plan: "
                            "resident up to 32k, chunked at 131072) and kclip_chunked vs open_clip ClipLoss vs Inf-CL "
                            "(N x N impls up to 32k)",
             ["-m", b + "bench_clip_contrastive_loss", "--ns", "16384", "32768", "131072", "--ds", "768", "512",
              "--impls", "kclip", "kclip_chunked", "eager", "inf_cl", "--materialising-max-n", "32768"],
             ["-m", b + "bench_clip_contrastive_loss", "--quick", "--impls", "kclip", "kclip_chunked", "eager"],
             115, 30, 200),
        Step("projected_mse", "projected_mse_loss fwd+bwd, B 4096, d 512, d' 4096: kernel, eager, compile, 3-GEMM floor",
             ["-m", b + "bench_projected_mse_loss", "--batch-sizes", "4096", "--dims", "512", "--d-out", "4096"],
             ["-m", b + "bench_projected_mse_loss", "--quick"], 60, 25, 120),
        Step("train_step", "ViT-B-32 224 px batch 256 bf16: kclip fused/reference, open_clip-style, online 8-bit "
                           "7B teacher, plain, captured (CUDA graph), DeepSpeed ZeRO-1/2/3",
             ["-m", b + "bench_train_step", "--models", "ViT-B-32", "--batch-size", "256", "--steps", "20",
              "--warmup", "5", "--teacher-steps", "4"],
             ["-m", b + "bench_train_step", "--quick", "--impls", "kclip-fused", "openclip-style", "online-teacher",
              "kclip-zero3"], 120, 45, 200),
        Step("kmeans", "k-means 500k x 4096 x 1000, 10 Lloyd iterations: kclip vs flash-kmeans, "
                       "fast-pytorch-kmeans, cuML",
             ["-m", b + "bench_kmeans", "--n", "500000", "--d", "4096", "--k", "1000", "--iters", "10", "--impls",
              "kclip-triton", "cuml", "flash-kmeans", "fast-pytorch-kmeans", "--profile"],
             ["-m", b + "bench_kmeans", "--quick", "--profile"], 45, 20, 100),
        Step("teacher", "Llama-2-7B-shaped teacher, 1024 captions: bf16 vs int8 (tokens/s, weight memory, cosine)",
             ["-m", b + "bench_teacher", "--precisions", "bf16,int8", "--num-captions", "1024", "--budgets", "16384",
              "--rep", "2"],
             ["-m", b + "bench_teacher", "--quick"], 80, 40, 150),
        # Where the time goes (torch.profiler: device vs host time per call, top kernels) for the three gaps
        # the first H200 run showed: projected-MSE 11x its floor, contrastive 5-10% of the ceiling, train step
        # 0.45x the open_clip-style step.
        Step("profile_projected_mse", "profile projected_mse_loss B 4096, d 512, d' 4096: kernel, eager, floor",
             ["-m", b + "bench_projected_mse_loss", "--batch-sizes", "4096", "--dims", "512", "--d-out", "4096",
              "--impls", "kernel", "eager", "floor", "--profile"],
             ["-m", b + "bench_projected_mse_loss", "--quick", "--batch-sizes", "64", "--impls", "kernel", "floor",
              "--profile"], 20, 10, 60),
        Step("profile_contrastive", "profile clip_contrastive_loss N 16384, D 768: kclip (resident), kclip_chunked, "
                                    "kclip_fused, eager",
             ["-m", b + "bench_clip_contrastive_loss", "--ns", "16384", "--ds", "768", "--impls", "kclip",
              "kclip_chunked", "kclip_fused", "eager", "--profile"],
             ["-m", b + "bench_clip_contrastive_loss", "--quick", "--ns", "64", "--impls", "kclip", "kclip_fused",
              "--profile"], 30, 10, 70),
        Step("profile_train_step", "profile the ViT-B-32 b256 bf16 step: kclip on the engine auto picks (torch on "
                                   "one GPU), captured as a CUDA graph, on DeepSpeed ZeRO-2 and ZeRO-0, open_clip-style",
             ["-m", b + "bench_train_step", "--models", "ViT-B-32", "--batch-size", "256", "--steps", "10",
              "--warmup", "5", "--impls", "kclip-fused", "kclip-graph", "kclip-zero2", "kclip-zero0", "openclip-style",
              "--profile"],
             ["-m", b + "bench_train_step", "--quick", "--impls", "kclip-fused", "kclip-zero2", "openclip-style",
              "--profile"], 55, 25, 110),
        # The fused tile shapes were swept on the H200 on 2026-11-30 (the D > 512 default came from it); this
        # sweeps the chunked strategy's rows and tiles and the fused kernels' untimed pipelining options.
        Step("contrastive_tune", "clip_contrastive_loss launch configurations at N 32k, D 768/512: chunked rows and "
                                 "tiles, fused pipelining options (each checked against the first default's gradients)",
             ["-m", b + "bench_clip_contrastive_loss", "--tune", "--tune-set", "chunk", "pipeline", "--ns", "32768",
              "--ds", "768", "512"],
             ["-m", b + "bench_clip_contrastive_loss", "--quick", "--tune", "--ns", "48"], 60, 25, 120),
        Step("contrastive_compile", "clip_contrastive_loss vs torch.compile of the reference at N 16k",
             ["-m", b + "bench_clip_contrastive_loss", "--ns", "16384", "--ds", "768", "512", "--impls", "compile"],
             ["-m", b + "bench_clip_contrastive_loss", "--quick", "--ns", "64", "--impls", "kclip"], 45, 25, 100),
        Step("projected_mse_sweep", "projected_mse_loss B 1k..64k x d 512/768 (no compile)",
             ["-m", b + "bench_projected_mse_loss", "--batch-sizes", "1024", "4096", "16384", "65536", "--dims",
              "512", "768", "--impls", "kernel", "eager", "floor"],
             ["-m", b + "bench_projected_mse_loss", "--quick", "--batch-sizes", "80"], 50, 20, 100),
        Step("teacher_nf4", "Llama-2-7B-shaped teacher: nf4 against bf16",
             ["-m", b + "bench_teacher", "--precisions", "bf16,nf4", "--num-captions", "512", "--budgets", "16384",
              "--rep", "2", "--no-naive"],
             ["-m", b + "bench_teacher", "--quick", "--precisions", "fp32,nf4", "--no-naive"], 60, 30, 120),
        Step("loader", "input pipeline: JPEG 224 px, ViT-B-32 transforms, batch 256, workers 0/4/8/16",
             ["-m", b + "bench_loader", "--workers", "0", "4", "8", "16"], ["-m", b + "bench_loader", "--quick"],
             90, 40, 150),
    ]


# --------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------

class Tee:
    """Lines to stdout, the suite log and the step log, as they come."""

    def __init__(self, suite_log: Path):
        self.suite = open(suite_log, "a", encoding="utf-8", buffering=1)
        self.step = None
        self.lock = threading.Lock()

    def write(self, line: str) -> None:
        with self.lock:
            sys.stdout.write(line)
            sys.stdout.flush()
            self.suite.write(line)
            if self.step is not None:
                self.step.write(line)

    def close(self) -> None:
        self.suite.close()


def run_child(cmd: list, cap_s: float, env: dict, cwd: Path, tee: Tee) -> tuple[int | None, bool]:
    """Run ``cmd`` in its own process group for at most ``cap_s`` seconds. (returncode, timed_out)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True, errors="replace")

    def pump():
        for line in proc.stdout:
            tee.write(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(0.1, cap_s))
    except subprocess.TimeoutExpired:
        timed_out = True
        tee.write(f"[suite] cap of {cap_s:.0f} s reached: stopping the step's process group\n")
        _kill_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _kill_group(proc, signal.SIGKILL)
            proc.wait()
    finally:
        # a grandchild that outlived its parent (DataLoader workers, compile workers) must not outlive the step
        _kill_group(proc, signal.SIGKILL)
    reader.join(timeout=5)
    return proc.returncode, timed_out


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def pack(out: Path, pack_dir: Path | None) -> None:
    """``<pack_dir>/kclip-gpu-suite.tar.gz`` of everything under ``out`` (atomic), plus summary and log beside it."""
    from kclip.atomic import atomic_path, atomic_write_bytes

    if pack_dir is None:
        return
    pack_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(pack_dir / PACK_NAME) as tmp, tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(out.rglob("*")):
            if path.is_file() and ".tmp" not in path.name:
                tar.add(path, arcname=str(path.relative_to(out)))
    for name in ("summary.md", "suite.log", "suite.json"):
        src = out / name
        if src.exists() and pack_dir.resolve() != out.resolve():
            atomic_write_bytes(pack_dir / name, src.read_bytes())


def _junit_counts(xml_path: Path) -> dict:
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else list(root)
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for s in suites:
        for k in out:
            out[k] += int(s.get(k, 0))
        for case in s.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    out["failed_tests"] = failed
    return out


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "ROLE_RANK", "CROSS_RANK", "CROSS_SIZE")


def run_suite(steps: list[Step], budget_s: float, out: Path, quick: bool = False, pack_dir: Path | None = None,
              python: str | None = None) -> dict:
    """Run ``steps`` in order within ``budget_s`` seconds; returns the suite record (also ``<out>/suite.json``)."""
    t_start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    results, logs = out / "results", out / "logs"
    results.mkdir(exist_ok=True)
    logs.mkdir(exist_ok=True)
    tee = Tee(out / "suite.log")
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    # every step is its own one-process job that makes its own process group: a launcher's rank variables
    # inherited from the caller (a parent that called kclip.distributed.setup, a shell under torchrun) would
    # point the step at a store that the parent holds or that no longer exists
    for var in LAUNCHER_VARS:
        env.pop(var, None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    if quick:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is a CPU run, also on a GPU machine
    from bench.harness import GIT_REV_ENV, git_revision

    revision = git_revision()
    env[GIT_REV_ENV] = revision
    suite = {"budget_s": budget_s, "quick": quick, "git": revision, "steps": [],
             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tee.write(f"[suite] {'dry run (CPU, --quick)' if quick else 'GPU run'}: {len(steps)} steps, budget "
              f"{budget_s:.0f} s, git {revision}, out {out}\n")
    problem = preflight(python or sys.executable, env)
    if problem:  # every step would fail the same way: say so once, spend nothing
        tee.write(f"[suite] preflight failed, no step run: {problem}\n")
        suite["preflight"] = problem
        steps = []
    try:
        for step in steps:
            left = budget_s - (time.monotonic() - t_start) - RESERVE_S
            entry = {"name": step.name, "what": step.what, "est_s": step.est_s}
            if left < step.min_s:
                entry.update(status="skipped", reason=f"{left:.0f} s left, the step needs at least {step.min_s:.0f} s")
                tee.write(f"[suite] skip {step.name}: {entry['reason']}\n")
                suite["steps"].append(entry)
                continue
            cap = min(step.cap_s, left)
            cmd = [python or sys.executable] + list(step.quick_argv if quick else step.argv)
            if step.results:
                cmd += ["--results-dir", str(results)]
            junit = logs / f"{step.name}.junit.xml"
            if "pytest" in cmd:
                cmd += [f"--junitxml={junit}"]
            entry["cmd"] = " ".join(cmd[1:])
            tee.write(f"[suite] === {step.name} (cap {cap:.0f} s, est {step.est_s:.0f} s): {step.what}\n")
            tee.step = open(logs / f"{step.name}.log", "w", encoding="utf-8", buffering=1)
            t0 = time.monotonic()
            try:
                rc, timed_out = run_child(cmd, cap, env, REPO_ROOT, tee)
            finally:
                tee.step.close()
                tee.step = None
            entry.update(seconds=round(time.monotonic() - t0, 1), returncode=rc, cap_s=round(cap, 1))
            # pytest: 0 all passed, 5 none collected (every test deselected or skipped away)
            ok = rc == 0 or ("pytest" in cmd and rc == 5)
            entry["status"] = "timeout" if timed_out else ("ok" if ok else "failed")
            if junit.exists():
                entry["tests"] = _junit_counts(junit)
            suite["steps"].append(entry)
            tee.write(f"[suite] --- {step.name}: {entry['status']} in {entry['seconds']:.1f} s\n")
            _write_json(out / "suite.json", suite)
            pack(out, pack_dir)
    finally:
        suite["seconds"] = round(time.monotonic() - t_start, 1)
        rows = target_rows(results, quick)
        summary = render_summary(suite, rows, profile_rows(results), tune_rows(results))
        suite["targets"] = rows
        _write_json(out / "suite.json", suite)
        (out / "summary.md").write_text(summary, encoding="utf-8")
        tee.write("\n" + summary)
        tee.close()
        pack(out, pack_dir)
    return suite


PREFLIGHT = ("import kclip.kernels as k; k.clip_contrastive_loss; import kclip.trainer, bench.harness")


def preflight(python: str, env: dict) -> str | None:
    """None when the suite's children can import kclip (kernels included), else what went wrong and what to do.

    A tree copied to a benchmark machine needs kclip and its dependencies installed there (``pip install -e .``),
    or every kernel step fails at import.
    """
    out = subprocess.run([python, "-c", PREFLIGHT], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    if out.returncode == 0:
        return None
    last = (out.stderr.strip().splitlines() or ["?"])[-1]
    return (f"{last} -- install kclip in this environment first (pip install --no-deps -e . from the repo root; "
            f"without an index: pip install --no-deps --no-build-isolation -e .)")


def _write_json(path: Path, obj) -> None:
    from kclip.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1, default=str))


# --------------------------------------------------------------------------------------------------------
# Targets (issue #13): measured value, ratio to the target (>= 1 meets it), PASS / FAIL / n/a
# --------------------------------------------------------------------------------------------------------

def _latest(recs: list, **match) -> dict | None:
    """The newest record (last line wins) whose fields equal ``match``, with a measurement or an error."""
    for r in reversed(recs):
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _ms(r):
    return r.get("ms_median") if r else None


def _row(target: str, measured, goal: float, higher_is_better: bool, unit: str = "", where: str = "",
         note: str = "") -> dict:
    if measured is None:
        return {"target": target, "where": where, "measured": None, "goal": goal, "ratio": None, "status": "n/a",
                "unit": unit, "note": note or "not measured"}
    ratio = measured / goal if higher_is_better else (goal / measured if measured else float("inf"))
    return {"target": target, "where": where, "measured": measured, "goal": goal, "ratio": ratio,
            "status": "PASS" if ratio >= 1 else "FAIL", "unit": unit, "note": note,
            "op": ">=" if higher_is_better else "<="}


def _div(a, b):
    return None if a is None or b in (None, 0) else a / b


# Where each target is read: the GPU sizes of the plan, and the --quick sizes (so the dry run exercises the
# same evaluation on the records it produced).
TARGET_AT = {
    "gpu": dict(n_small=16384, n_large_min=32768, ds=(768, 512), mem_d=768,
                pmse=dict(B=4096, d=512, d_out=4096), kmeans=dict(n=500000, d=4096, k=1000),
                teacher_model="llama2-7b-shape", teacher_ref="bf16", step=dict(model="ViT-B-32", batch=256)),
    "quick": dict(n_small=128, n_large_min=128, ds=(32,), mem_d=32,
                  pmse=dict(B=96, d=32, d_out=48), kmeans=dict(n=1000, d=16, k=8),
                  teacher_model="tiny-llama", teacher_ref="fp32", step=dict(model="kclip-tiny", batch=16)),
}


def target_rows(results: Path, quick: bool = False) -> list[dict]:
    """Every target of issue #13 against the records in ``results`` (newest record per configuration)."""
    from bench.harness import load_results  # harness imports torch: not for --list

    at_ = TARGET_AT["quick" if quick else "gpu"]
    data = load_results(results)
    rows: list[dict] = []
    env = _latest(data.get("env", []), impl="env")
    ceiling = env.get("matmul_tflops") if env else None

    # contrastive loss
    cl = data.get("clip_contrastive_loss", [])
    ns = sorted({r["N"] for r in cl if r.get("impl") == "kclip" and _ms(r)})
    n_small = at_["n_small"]
    for d in at_["ds"]:
        at = {n: {impl: _latest(cl, N=n, D=d, impl=impl) for impl in ("kclip", "kclip_chunked", "kclip_fused", "eager",
                                                                        "compile", "inf_cl")}
              for n in ns}
        if d == at_["mem_d"]:
            big = max((n for n in ns if at[n]["kclip"] and at[n]["kclip"].get("peak_mem_bytes")), default=None)
            mem = at[big]["kclip"]["peak_mem_bytes"] / big / 1024 if big else None
            rows.append(_row("contrastive memory per sample", mem, 12.0, False, "KiB", f"D={d}, N={big}",
                             "peak above the inputs (gradients included)"))
        n16 = at.get(n_small, {})
        rows.append(_row("contrastive vs eager (open_clip ClipLoss)", _div(_ms(n16.get("eager")), _ms(n16.get("kclip"))),
                         2.0, True, "x", f"D={d}, N={n_small}"))
        for impl in ("kclip_chunked", "kclip_fused"):  # the other strategies, side by side (kclip: the plan's)
            if n16.get(impl):
                rows.append(_row(f"contrastive, {impl[6:]} strategy, vs eager", _div(_ms(n16.get("eager")),
                                                                                    _ms(n16.get(impl))),
                                 2.0, True, "x", f"D={d}, N={n_small}", impl))
        rows.append(_row("contrastive vs torch.compile", _div(_ms(n16.get("compile")), _ms(n16.get("kclip"))),
                         1.5, True, "x", f"D={d}, N={n_small}"))
        inf = [(n, _div(_ms(at[n]["inf_cl"]), _ms(at[n]["kclip"]))) for n in ns]
        inf = [(n, v) for n, v in inf if v is not None]
        worst = min(inf, key=lambda t: t[1]) if inf else (None, None)
        rows.append(_row("contrastive vs Inf-CL (worst N)", worst[1], 3.0, True, "x", f"D={d}, N={worst[0]}"))
        frac = [(n, _div(at[n]["kclip"].get("tflops"), ceiling)) for n in ns if n >= at_["n_large_min"]
                and at[n]["kclip"]]
        frac = [(n, v) for n, v in frac if v is not None]
        worst = min(frac, key=lambda t: t[1]) if frac else (None, None)
        rows.append(_row("contrastive share of bf16 matmul ceiling (4-matmul floor FLOPs)", worst[1], 0.5, True, "",
                         f"D={d}, N={worst[0]}", f"ceiling {ceiling:.3g} TFLOP/s" if ceiling else "no ceiling measured"))

    # projected MSE
    pm = data.get("projected_mse_loss", [])
    shape = at_["pmse"]
    k, e, c, f = (_latest(pm, impl=i, **shape) for i in ("kernel", "eager", "compile", "floor"))
    where = f"B={shape['B']}, d={shape['d']}, d'={shape['d_out']}"
    rows.append(_row("projected-MSE vs eager", _div(_ms(e), _ms(k)), 1.5, True, "x", where))
    rows.append(_row("projected-MSE vs torch.compile", _div(_ms(c), _ms(k)), 1.2, True, "x", where))
    rows.append(_row("projected-MSE over the 3-GEMM floor", _div(_ms(k), _ms(f)), 1.3, False, "x", where))

    # k-means
    km = data.get("kmeans", [])
    big = at_["kmeans"]
    kc, fk = _latest(km, impl="kclip-triton", **big), _latest(km, impl="flash-kmeans", **big)
    kc_ms = kc.get("ms_per_iter") if kc else None
    where = f"{big['n']} x {big['d']}, K={big['k']}"
    rows.append(_row("k-means ms per steady-state Lloyd iteration", kc.get("steady_ms_per_iter") if kc else None,
                     10.0, False, "ms", where, f"set-up {kc['setup_s']:.2f} s" if kc and "setup_s" in kc else ""))
    rows.append(_row("k-means ms per Lloyd iteration (fit / iterations)", kc_ms, 20.0, False, "ms", where))
    rows.append(_row("k-means vs flash-kmeans", _div(fk.get("ms_per_iter") if fk else None, kc_ms), 1.0, True, "x",
                     where, (fk or {}).get("note") or (fk or {}).get("skipped") or (fk or {}).get("error") or ""))

    # teacher
    te = [r for r in data.get("teacher", []) if r.get("kind") == "throughput" and r.get("batching") == "bucketed"
          and r.get("model") == at_["teacher_model"] and "cos_ref" in r]  # the first budget: cosines measured there
    ref = at_["teacher_ref"]
    i8 = _latest(te, precision="int8") or {}
    same = {k: i8[k] for k in ("num_captions", "token_budget", "run_id") if k in i8}  # the int8 record's own run
    bf = _latest(te, precision=ref, **same) or ({} if i8 else _latest(te, precision=ref) or {})
    where = f"{at_['teacher_model']}, {ref} reference"
    rows.append(_row(f"teacher {ref} share of the matmul ceiling", _div(bf.get("tflops"), ceiling), 0.5, True, "",
                     where, "useful FLOPs (no padding)"))
    rows.append(_row(f"teacher int8 throughput vs {ref}", _div(i8.get("tokens_per_s"), bf.get("tokens_per_s")), 0.5,
                     True, "x", where))
    rows.append(_row(f"teacher int8 weight memory vs {ref}", _div(i8.get("weight_bytes"), bf.get("weight_bytes")), 0.55,
                     False, "x", where))
    rows.append(_row(f"teacher int8 cosine to {ref} (min over captions)", i8.get("cos_min"), 0.99, True, "",
                     where + ", random weights"))

    # train step
    st = at_["step"]
    ts = [r for r in data.get("train_step", []) if r.get("model") == st["model"] and r.get("batch") == st["batch"]]
    fused, oc, onl, z2, graph = (_latest(ts, impl=i) for i in ("kclip-fused", "openclip-style", "online-teacher",
                                                                "kclip-zero2", "kclip-graph"))
    where = f"{st['model']}, batch {st['batch']}"
    rows.append(_row("train step vs open_clip-style step", _div(_ms(oc), _ms(fused)), 1.3, True, "x", where,
                     f"engine {(fused or {}).get('engine', '?')}"))
    rows.append(_row("train step vs the same step on DeepSpeed ZeRO-2", _div(_ms(z2), _ms(fused)), 1.0, True, "x",
                     where))
    rows.append(_row("train step vs online-teacher step", _div(_ms(onl), _ms(fused)), 5.0, True, "x", where))
    rows.append(_row("captured step (train.cuda_graph) vs open_clip-style step", _div(_ms(oc), _ms(graph)), 1.3, True,
                     "x", where))
    rows.append(_row("train step MFU (dense bf16 datasheet peak)", (fused or {}).get("mfu"), 0.40, True, "", where))
    return rows


_PROFILE_WHERE = {"projected_mse_loss": ("B", "d", "d_out"), "clip_contrastive_loss": ("N", "D"),
                  "train_step": ("model", "batch"), "kmeans": ("n", "d", "k")}


def profile_rows(results: Path) -> list[dict]:
    """The newest profiled record (``--profile``) per bench, shape and impl: device vs host ms per call, top kernel."""
    from bench.harness import load_results  # harness imports torch: not for --list

    rows = {}
    for bench, recs in load_results(results).items():
        for r in recs:
            prof = r.get("profile")
            if not prof:
                continue
            where = ", ".join(f"{k}={r.get(k)}" for k in _PROFILE_WHERE.get(bench, ()) if k in r)
            rows[(bench, where, r.get("impl"))] = {  # a later record of the same key replaces an earlier one
                "bench": bench, "impl": r.get("impl"), "where": where, "wall_ms": prof.get("wall_ms"),
                "device_ms": prof["device_ms"], "host_ms": prof["host_ms"], "busy": prof.get("busy"),
                "bound": prof.get("bound"),
                "top": _top_entry(prof.get("top")),
                "host_top": _top_entry(prof.get("host_top")), "syncs": _sync_entry(prof.get("syncs"))}
    return list(rows.values())


def _top_entry(entries: list[dict] | None) -> str | None:
    """The first of a profile's ranked entries as ``name (share%)``."""
    if not entries:
        return None
    e = entries[0]
    return f"{e['name'][:60]} ({100 * (e['share'] or 0):.0f}%)"


def _sync_entry(syncs: dict | None) -> str | None:
    """A profile's host waits per call and the line that waits most: ``3 (deepspeed/x.py:233 x3)``."""
    if not syncs:
        return None
    site = syncs["sites"][0] if syncs.get("sites") else None
    return f"{syncs['per_call']:g}" + (f" ({site['where'][:60]} x{site['per_call']:g})" if site else "")


def tune_rows(results: Path) -> list[dict]:
    """The newest ``--tune`` run of the contrastive kernels: each variant's time against its strategy's default.

    One row per (N, D, strategy, variant): which kernel was varied, what changed against the default
    configuration, ms, speed-up over the default of the same strategy (> 1: faster) and the largest relative
    error of loss/gradients vs the run's first default.
    """
    from bench.bench_clip_contrastive_loss import TUNE_CFG
    from bench.harness import load_results

    recs = [r for r in load_results(results).get("clip_contrastive_loss", []) if r.get("impl") == "kclip-tune"]
    if not recs:
        return []
    run = recs[-1].get("run_id")
    recs = [r for r in recs if r.get("run_id") == run]
    defaults = {(r["N"], r["D"], r["strategy"]): r for r in recs if r.get("varied") == "default"}
    rows = []
    for r in recs:
        base = defaults.get((r["N"], r["D"], r["strategy"]))
        which = r.get("varied")
        cfg_key = TUNE_CFG.get(which, "grad_cfg")
        change = "–" if which == "default" or base is None else ", ".join(
            f"{k}={v}" for k, v in (r.get(cfg_key) or {}).items() if (base.get(cfg_key) or {}).get(k) != v) or "same"
        speedup = (_ms(base) / _ms(r)) if base and _ms(base) and _ms(r) else None
        rows.append({"N": r["N"], "D": r["D"], "strategy": r["strategy"], "varied": which, "change": change,
                     "ms": _ms(r), "speedup": speedup, "err": r.get("max_rel_err_vs_default"), "error": r.get("error")})
    return rows


def render_summary(suite: dict, rows: list[dict], profiles: list[dict] | None = None,
                   tunes: list[dict] | None = None) -> str:
    dry = suite.get("quick")
    lines = [f"# kclip GPU suite: {'DRY RUN on CPU (--quick): not performance numbers' if dry else 'results'}", "",
             f"git {suite.get('git')}, budget {suite.get('budget_s'):.0f} s, ran {suite.get('seconds', 0):.0f} s", ""]
    if suite.get("preflight"):
        lines += [f"**Preflight failed, no step ran:** {suite['preflight']}", ""]
    lines += ["| target | where | measured | target | ratio | status | note |", "|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        m = r["measured"]
        meas = "–" if m is None else (f"{m:.3g}" + (f" {r['unit']}" if r["unit"] not in ("", "x") else
                                                      ("x" if r["unit"] == "x" else "")))
        goal = f"{r.get('op', '')} {r['goal']:g}{'x' if r['unit'] == 'x' else ''}{' ' + r['unit'] if r['unit'] not in ('', 'x') else ''}"
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:.2f}"
        status = r["status"] if not dry or r["status"] == "n/a" else "dry-run"
        lines.append(f"| {r['target']} | {r['where']} | {meas} | {goal.strip()} | {ratio} | {status} | {r['note']} |")
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    if profiles:
        lines += ["", "Where the time goes (torch.profiler, per call; host-bound: the device is busy < 80% of the wall "
                  "time, waiting for launches or syncs; a host wait drains the device's queue, so launches stop "
                  "overlapping device work)", "",
                  "| bench | where | impl | wall ms | device ms | host ms | device busy | bound | top kernel | "
                  "top host function (Python self time) | host waits per call (most at) |",
                  "|---|---|---|---:|---:|---:|---:|---|---|---|---|"]
        for p in profiles:
            lines.append(f"| {p['bench']} | {p['where']} | {p['impl']} | {fmt(p['wall_ms'], '.3f')} | "
                         f"{p['device_ms']:.3f} | {p['host_ms']:.3f} | {fmt(p['busy'], '.0%')} | {p['bound'] or '–'} | "
                         f"{p['top'] or '–'} | {p.get('host_top') or '–'} | {p.get('syncs') or '–'} |")
    if tunes:
        lines += ["", "Contrastive launch configurations (`--tune`, fwd+bwd; speed-up > 1: faster than the default; "
                  "error: largest relative difference of loss and gradients from the default)", "",
                  "| N | D | strategy | kernel varied | change | ms | speed-up | max rel err |",
                  "|---:|---:|---|---|---|---:|---:|---:|"]
        for t in tunes:
            ms = t["error"][:60] if t["error"] else fmt(t["ms"], ".3f")
            lines.append(f"| {t['N']} | {t['D']} | {t['strategy']} | {t['varied']} | {t['change']} | {ms} | "
                         f"{fmt(t['speedup'], '.2f')} | "
                         f"{fmt(t['err'], '.1e')} |")
    lines += ["", "| step | status | seconds | cap | note |", "|---|---|---:|---:|---|"]
    for s in suite.get("steps", []):
        note = s.get("reason", "")
        t = s.get("tests")
        if t:
            note = f"{t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped"
            if t.get("failed_tests"):
                note += ": " + ", ".join(t["failed_tests"][:6])
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', '–')} | {s.get('cap_s', '–')} | {note} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole suite (default 480; 900 with --quick)")
    p.add_argument("--out", default=None, help="output folder (default bench/results/gpu_suite)")
    p.add_argument("--pack", default=None, help="folder that receives the packed results after every step (e.g. $OUT)")
    p.add_argument("--only", nargs="+", default=None, metavar="STEP",
                   help="run only these steps, in the order given (put what is still unmeasured first)")
    p.add_argument("--quick", action="store_true", help="every step at tiny sizes on CPU (the CI dry run)")
    p.add_argument("--list", action="store_true", help="print the plan with estimated seconds and exit")
    args = p.parse_args(argv)
    steps = plan()
    names = [s.name for s in steps]
    if args.only:
        unknown = [n for n in args.only if n not in names]
        if unknown:
            p.error(f"--only: unknown step(s) {unknown}; the steps are {', '.join(names)}")
        by_name = {s.name: s for s in steps}
        steps = [by_name[n] for n in dict.fromkeys(args.only)]  # the order given, each step once
    budget = args.budget if args.budget is not None else (900.0 if args.quick else 480.0)
    if args.list:
        total = 0.0
        print(f"{'#':>2} {'step':<20} {'est s':>6} {'min s':>6} {'cap s':>6} {'cum s':>6}  what")
        for i, s in enumerate(steps, 1):
            total += s.est_s
            print(f"{i:>2} {s.name:<20} {s.est_s:6.0f} {s.min_s:6.0f} {s.cap_s:6.0f} {total:6.0f}  {s.what}"
                  + ("   (beyond the budget)" if total > budget - RESERVE_S else ""))
        print(f"estimated total {total:.0f} s for a budget of {budget:.0f} s (estimates are for one H200)")
        return 0
    out = Path(args.out) if args.out else REPO_ROOT / "bench" / "results" / "gpu_suite"
    suite = run_suite(steps, budget, out, quick=args.quick, pack_dir=Path(args.pack) if args.pack else None)
    return 0 if not suite.get("preflight") and all(s["status"] in ("ok", "skipped") for s in suite["steps"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
