"""Loss ablation: which of L_emb, L_conc, L_cont carries the gains? (mean +/- std over seeds)

Variants (``VARIANTS``; L = alpha * L_emb + beta * L_conc + gamma * L_cont):

    contrastive      alpha=0  beta=0     gamma=1   (plain CLIP training)
    contrastive+emb  alpha=1  beta=0     gamma=1
    contrastive+conc alpha=0  beta=0.01  gamma=1
    all              alpha=1  beta=0.01  gamma=1   (the paper's Knowledge-CLIP)

For each (variant, seed) the runner builds a config with ``kclip.config.load_config(base, overrides)``
(overrides: the variant's loss weights, ``seed=<s>``, ``run_dir=<out>/runs/<variant>-seed<s>``, the
budget overrides and any ``extra`` ones) and calls ``kclip.pipeline.run(cfg)``, which runs
teach/concepts/train/eval and returns the eval report; the metrics of ``report["models"]["after"]``
are aggregated. Every run has its own run_dir but all share one teacher cache (``teacher.cache_dir =
<out>/teacher_cache``): the teacher sees only captions, so its embeddings are the same for every variant
and seed of one data config, and they are computed once.

A finished run's report is saved to ``<run_dir>/ablation_result.json``; re-running the same command
skips runs that have one (so an interrupted ablation resumes). Outputs (atomic): ``ablation.json``
(per-run metrics + per-variant mean/std/n) and ``ablation.md`` (the command line that produced it at
the top, then one row per metric, one column per variant). The std is the sample std (ddof=1); 0 for
a single seed.

CLI::

    python -m kclip.experiments.ablation --config configs/tiny.yaml --out results/ablation --seeds 0 1 2 \
        [--variants all,contrastive] [--max-steps 200] [--epochs 2] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from kclip.atomic import atomic_write_text
from kclip.eval.report import MAIN_ROWS, flatten_metrics, json_safe

VARIANTS: dict[str, list[str]] = {
    "contrastive": ["loss.alpha=0", "loss.beta=0", "loss.gamma=1"],
    "contrastive+emb": ["loss.alpha=1", "loss.beta=0", "loss.gamma=1"],
    "contrastive+conc": ["loss.alpha=0", "loss.beta=0.01", "loss.gamma=1"],
    "all": ["loss.alpha=1", "loss.beta=0.01", "loss.gamma=1"],
}
RESULT_FILE = "ablation_result.json"


def _default_run() -> Callable:
    from kclip.pipeline import run  # on first use: importing the experiments stays cheap

    return run


def _eval_report(result) -> dict | None:
    """The eval report from what the runner returned: the report itself, or pipeline.run's {"eval": report, ...}."""
    if isinstance(result, Mapping) and "models" not in result and isinstance(result.get("eval"), Mapping):
        result = result["eval"]
    if isinstance(result, Mapping) and isinstance(result.get("models"), Mapping) and "after" in result["models"]:
        return result
    return None


def run_or_reuse(base_config_path, overrides: Sequence[str], result_path: str | Path, run_fn: Callable,
                 resume: bool = True, what: str = "run") -> tuple[dict, bool]:
    """One run of an ablation-style sweep: reuse ``result_path`` (a finished run's report) when ``resume``, else
    build the config (``load_config(base_config_path, overrides)``), run it, and save its report there (atomic).

    Returns:
        (the eval report, reused). The report gains ``["ablation"]["seconds"]`` (wall time of a fresh run).

    Raises:
        ValueError: the runner returned no ``report["models"]["after"]`` (``what`` names the run).
    """
    from kclip.config import load_config

    result_path = Path(result_path)
    if resume and result_path.is_file():
        return json.loads(result_path.read_text()), True
    cfg = load_config(base_config_path, list(overrides))
    t0 = time.perf_counter()
    report = _eval_report(run_fn(cfg))
    if report is None:
        raise ValueError(f"{what} returned no report['models']['after']; the pipeline must return the eval report dict")
    report = dict(report)
    report.setdefault("ablation", {})["seconds"] = time.perf_counter() - t0
    Path(result_path).parent.mkdir(parents=True, exist_ok=True)  # a runner may not have made the run dir
    atomic_write_text(result_path, json.dumps(json_safe(report), indent=2, default=str))
    return report, False


def aggregate(results: Mapping[str, Sequence[Mapping[str, float]]]) -> dict:
    """Per variant, per metric: {"mean", "std" (ddof=1; 0 for one value), "n"} over the seeds' flat metrics."""
    out = {}
    for variant, runs in results.items():
        keys = sorted({k for r in runs for k in r})
        stats = {}
        for k in keys:
            vals = [float(r[k]) for r in runs if r.get(k) is not None and math.isfinite(float(r[k]))]
            if not vals:
                continue
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
            stats[k] = {"mean": mean, "std": std, "n": len(vals)}
        out[variant] = stats
    return out


def render_markdown(summary: Mapping[str, Mapping[str, Mapping]], command: str, seeds: Sequence[int]) -> str:
    """The ablation table: metrics as rows (report order first), variants as columns, "mean ± std"."""
    variants = list(summary)
    keys = sorted({k for v in summary.values() for k in v})
    order = [k for k, _ in MAIN_ROWS if k in keys] + [k for k in keys if k not in dict(MAIN_ROWS)]
    label = dict(MAIN_ROWS)
    lines = ["# Knowledge-CLIP loss ablation", "", "Produced by:", "", "```", command, "```", "",
             f"Seeds {list(seeds)}; cells are mean ± std (sample std over seeds) of the trained model's metrics "
             "(percent). Variants: " + "; ".join(f"**{v}** = {', '.join(VARIANTS.get(v, []))}" for v in variants) + ".",
             "", "| metric | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
    for k in order:
        cells = []
        for v in variants:
            s = summary[v].get(k)
            cells.append(f"{s['mean']:.1f} ± {s['std']:.1f}" if s else "–")
        lines.append(f"| {label.get(k, k)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_ablation(base_config_path: str | Path, out_dir: str | Path, seeds: Sequence[int] = (0, 1, 2),
                 variants: Sequence[str] | Mapping[str, Sequence[str]] | None = None, max_steps: int | None = None,
                 epochs: int | None = None, extra_overrides: Sequence[str] = (), run_fn: Callable | None = None,
                 command: str | None = None, resume: bool = True) -> dict:
    """Train and evaluate every (variant, seed); aggregate mean +/- std; write ablation.json / ablation.md.

    Args:
        base_config_path: the YAML preset (e.g. configs/tiny.yaml).
        out_dir: results folder; each run gets ``<out_dir>/runs/<variant>-seed<s>`` as its run_dir.
        seeds: one run per seed per variant (``seed=<s>`` override).
        variants: names from :data:`VARIANTS`, or a dict name -> override list; None = all four.
        max_steps, epochs: budget overrides (``train.max_steps``, ``train.epochs``) for every run.
        extra_overrides: more ``key=value`` overrides for every run.
        run_fn: cfg -> eval report dict (or a dict holding it under "eval"); default ``kclip.pipeline.run``.
        command: the command line recorded at the top of ablation.md (default: the equivalent CLI call).
        resume: reuse ``ablation_result.json`` of finished runs.

    Returns:
        {"summary": {variant: {metric: {mean, std, n}}}, "runs": [...], "command", "seeds", "variants"}.
    """
    if variants is None:
        chosen = dict(VARIANTS)
    elif isinstance(variants, Mapping):
        chosen = {k: list(v) for k, v in variants.items()}
    else:
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown ablation variant(s) {unknown}; choose from {list(VARIANTS)}")
        chosen = {v: VARIANTS[v] for v in variants}
    if not seeds:
        raise ValueError("run_ablation needs at least one seed")
    out_dir = Path(out_dir)
    budget = ([f"train.max_steps={max_steps}"] if max_steps is not None else []) + \
        ([f"train.epochs={epochs}"] if epochs is not None else [])
    if command is None:
        command = " ".join(["python -m kclip.experiments.ablation", "--config", shlex.quote(str(base_config_path)),
                            "--out", shlex.quote(str(out_dir)), "--seeds", *map(str, seeds),
                            "--variants", shlex.quote(",".join(chosen))]
                           + ([f"--max-steps {max_steps}"] if max_steps is not None else [])
                           + ([f"--epochs {epochs}"] if epochs is not None else [])
                           + [f"--set {shlex.quote(o)}" for o in extra_overrides])
    run_fn = run_fn or _default_run()
    runs, per_variant = [], {v: [] for v in chosen}
    for variant, loss_overrides in chosen.items():
        for seed in seeds:
            run_dir = out_dir / "runs" / f"{variant}-seed{seed}"
            result_path = run_dir / RESULT_FILE
            # the teacher's embeddings depend on neither the loss weights nor the seed: embed once, share
            overrides = [*loss_overrides, f"seed={seed}", f"run_dir={run_dir}",
                         f"teacher.cache_dir={out_dir / 'teacher_cache'}", *budget, *extra_overrides]
            report, reused = run_or_reuse(base_config_path, overrides, result_path, run_fn, resume,
                                          what=f"run for variant {variant!r} seed {seed}")
            metrics = flatten_metrics(report["models"]["after"])
            per_variant[variant].append(metrics)
            runs.append({"variant": variant, "seed": seed, "run_dir": str(run_dir), "overrides": overrides,
                         "reused": reused, "metrics": metrics})
    summary = aggregate(per_variant)
    result = {"command": command, "base_config": str(base_config_path), "seeds": list(seeds),
              "variants": chosen, "summary": summary, "runs": runs}
    atomic_write_text(out_dir / "ablation.json", json.dumps(json_safe(result), indent=2))
    atomic_write_text(out_dir / "ablation.md", render_markdown(summary, command, seeds))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kclip.experiments.ablation", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="base YAML preset, e.g. configs/tiny.yaml")
    p.add_argument("--out", required=True, help="results folder (ablation.json, ablation.md, runs/)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--max-steps", type=int, default=None, help="train.max_steps for every run")
    p.add_argument("--epochs", type=int, default=None, help="train.epochs for every run")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every run (repeatable)")
    p.add_argument("--no-resume", action="store_true", help="rerun runs that already have a result")
    args = p.parse_args(argv)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = "python -m kclip.experiments.ablation " + shlex.join(argv_list)
    result = run_ablation(args.config, args.out, seeds=args.seeds,
                          variants=[v.strip() for v in args.variants.split(",") if v.strip()],
                          max_steps=args.max_steps, epochs=args.epochs, extra_overrides=args.extra,
                          command=command, resume=not args.no_resume)
    print((Path(args.out) / "ablation.md").read_text())
    return 0 if result["summary"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
