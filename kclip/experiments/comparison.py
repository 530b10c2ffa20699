"""The paper's comparison on the embedded default: does Knowledge-CLIP fine-tuning beat contrastive fine-tuning
of a pretrained CLIP, and is the gain knowledge or regularisation? (paired seeds, 95% intervals)

Confirmatory protocol (declared in :mod:`kclip.experiments.design` before it was run; written at the top of
comparison.json and comparison.md, before any result):

- Primaries (``PRIMARIES``, at most 3; the teacher is ``smollm2-eol-whiten``: SmolLM2-135M with the PromptEOL
  template, last-token pooling, targets PCA-whitened to 64 components on the training captions, alpha = 1/64):
  P1 (b) kclip - (a) contrastive on held-out-combination zero-shot top-1 (the paper's Table 2 claim);
  P2 (b) kclip - (c) shuffled on text token accuracy of held-out-combination captions (caption-specific rows,
  not the extra loss, on captions never trained on); P3 (b) kclip[smollm2-eol-whiten] - (b) kclip[hashed-ngrams]
  on the same text metric (knowledge beyond the words of the caption).
- Analysis (``ANALYSIS``): per primary the per-seed paired differences, a two-sided paired t-test over seeds,
  **Holm** over the primaries (family-wise 0.05), the 95% t-interval, and the minimum detectable effect at the
  seeds run (paired t, 80% power, two-sided 0.05, from the observed seed SD). Everything else is exploratory.
- Seeds: 8 (0..7). Seed s has its own data draw (``data.synthetic.seed = s``), its own held-out combinations
  (``data.synthetic.heldout_seed`` cycling through the 4 distinct sets ``kclip.synthetic.heldout_combos`` can
  give, each used by two seeds) and its own phase-1 start, so the interval covers the data, the held-out
  choice and the start, not only the optimisation noise (``--fixed-data``: the earlier one-draw design).
- Controls: (c) the shuffled teacher; ``hashed-ngrams`` (:mod:`kclip.control_teacher`), a knowledge-free teacher
  that carries a caption's words and word pairs only; (d) the oracle (positive control). Sensitivity: the oracle
  at alpha 10, alpha 100 and beta 1 (arm (b) only): can the benchmark show an image-side gain at all?
- Post hoc (exploratory only): ``smollm2-std`` and ``smollm2-std-mean`` were added after the first results
  had been seen.

Phase 1, the stand-in "pretrained CLIP": the tiny student trained contrastively (alpha = beta = 0) from random
initialisation on a synthetic set of its own: another image seed (``data.synthetic.seed`` + 1000), the SAME
held-out colour-shape combinations as its seed's (``data.synthetic.heldout_seed``), so nothing of the
comparison's validation combinations leaks into the start. Its exported ``student.safetensors`` is built once
per seed's data and reused by every arm, teacher and rerun (``<out>/pretrain-<key>/``; the key hashes its
config, so another budget or data draw gets its own).

Phase 2, from that start (``model.pretrained=<phase-1 student>``), for each seed s every arm has the same start,
data and data order (``seed=s`` seeds the batch order and the head's initialisation):

    (a) contrastive  contrastive-only fine-tuning            alpha=0  beta=0
    (b) kclip        Knowledge-CLIP (the paper's weights)    alpha=1  beta=0.01
    (c) shuffled     (b) with the teacher's training rows    alpha=1  beta=0.01  loss.shuffle_teacher=true
                     permuted across captions: the same loss sizes, no caption-specific knowledge
    (d) oracle       (b) with the oracle teacher             alpha=1  beta=0.01  teacher.name=synthetic-oracle
                     (the captions' true attributes, kclip.oracle): a positive control for the wiring

(a) never reads a teacher (alpha = beta = 0: its training is the same whatever the teacher; the pipeline still
needs a cache, and the oracle's costs nothing), and (d) has its own teacher, so both run once per seed and are
shared by every teacher's table; (b) and (c) run per teacher (``--teachers``; the sensitivity variants run (b)
only, ``TEACHER_ARMS``). One teacher cache per teacher and data draw is shared by its runs
(``teacher.cache_dir``; variants that differ only outside ``teacher.*`` share it).

Statistics, per teacher and metric (the report's headline metrics and the held-out R^2 of the distillation):
each arm's mean +/- sample std over seeds, and the paired differences (b - a), (c - a), (b - c), (d - a):
per seed, their mean and a 95% t-interval over seeds (df = seeds - 1). That interval is the one reported and
the one a verdict rests on: the seed is the experimental unit (training randomness is the dominant noise
here, review: seed std 2-11 points); with ``--fixed-data`` all seeds share one validation set, so the seed spread
does not include the test-set sampling noise (by default each seed has its own draw, and it does). Beside it,
for the image-level metrics: a paired
bootstrap over validation images (captions move with their image; 2000 resamples, the same resampled image
positions for every seed (with per-seed data, different images at those positions), the seed-mean difference
recomputed), i.e. how much the difference would move on another
draw of validation images of the same trained models. The per-image hits come from the evaluators themselves
(``run_eval`` writes them beside the report: :mod:`kclip.eval.hits`) and are checked against the report (equal
means, or the bootstrap of that metric is left out).

Outputs (atomic, ``kclip.atomic``): ``comparison.json`` (everything, per-seed values included) and
``comparison.md`` (the exact command, git revision, library versions, machine, wall and CPU time, then per
teacher a table arm x metric and a table of paired differences with intervals). Each finished run keeps its
report in ``<run_dir>/comparison_result.json`` and its per-image hits in ``per_image.npz``; a rerun of the same
command reuses them (runs are keyed by their config, so a changed budget runs anew); a finished run's DeepSpeed
checkpoints are deleted (``--keep-checkpoints`` keeps them), and ``<out>/.gitignore`` keeps the runs, the
phase-1 start and the caches out of git, so committing ``<out>`` commits the two result files. ``--jobs N``
runs N runs at a time in worker processes of ``--threads`` torch threads each (2 idle cores: ``--jobs 2
--threads 1``, the default).

CLI (also ``kclip compare ...``); the confirmatory run is the defaults (the teachers of
``CONFIRMATORY_TEACHERS``, seeds 0..7, each seed its own data)::

    python -m kclip.experiments.comparison --out bench/results/comparison_confirmatory --epochs 6

The earlier exploratory comparison (one data draw, 3 seeds)::

    python -m kclip.experiments.comparison --out bench/results/comparison_tiny --teachers minilm smollm2 --seeds 0 1 2 --fixed-data
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from kclip.atomic import atomic_write_json, atomic_write_text
from kclip.eval.hits import HITS_FILE, load_hits, save_hits
from kclip.eval.report import flatten_metrics, json_safe

from .ablation import aggregate, run_or_reuse
from .comparison_report import _machine, _versions, render_markdown
from .design import (ALPHA, ANALYSIS, ARMS, CONFIRMATORY_TEACHERS, DEFAULTS, DIFFERENCES, IMAGE_LEVEL, METRICS,
                     ORACLE, PER_IMAGE_FILE, POST_HOC, POWER, PRETRAIN_INFO, PRIMARIES, RESULT_FILE, SENSITIVITY,
                     TEACHER_ARMS, TEACHERS, _cache_label, seed_data_overrides)
from .stats import (holm, minimum_detectable_effect, paired_bootstrap, paired_differences, paired_t_pvalue,
                    ratio_metric)

# ---------------------------------------------------------------------------------------- per-image hits


def _check_hits(hits: Mapping[str, tuple], metrics: Mapping[str, float]) -> dict[str, str]:
    """metric -> why its per-image hits do not reproduce the report (empty when they all do)."""
    bad = {}
    for k, (num, den) in hits.items():
        want = metrics.get(k)
        got = float(ratio_metric(num, den))
        if want is None or not math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6):
            bad[k] = f"per-image hits give {got:.6f}, the report {want}"
    return bad


# --------------------------------------------------------------------------------------------------- runs


@dataclass
class RunSpec:
    """One training + evaluation run of the comparison."""
    name: str                      # e.g. "seed0/minilm/kclip"
    arm: str
    teacher: str | None            # the teacher label for per-teacher arms
    seed: int
    base_config: str | None
    overrides: list
    run_dir: Path
    threads: int = 1
    stages: tuple = ("teach", "concepts", "train", "eval")
    progress: bool = False


@dataclass
class RunResult:
    spec: RunSpec
    report: dict
    reused: bool
    seconds: float
    cpu_seconds: float
    hits_path: Path | None = None
    hits_problems: dict = field(default_factory=dict)


def _key(items: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(sorted(items)).encode()).hexdigest()[:10]


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def execute(spec: RunSpec, run_fn: Callable | None = None, resume: bool = True, hits: bool = True,
            keep_checkpoints: bool = False) -> RunResult:
    """Run (or reuse) one comparison run and record its per-image hits; safe to call in a worker process.
    A finished run's DeepSpeed checkpoints are deleted unless ``keep_checkpoints``."""
    import torch

    if spec.threads:
        torch.set_num_threads(spec.threads)
    if run_fn is None:
        from kclip.pipeline import run

        def run_fn(cfg):
            return run(cfg, stages=spec.stages, progress=spec.progress)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    report, reused = run_or_reuse(spec.base_config, spec.overrides, spec.run_dir / RESULT_FILE, run_fn, resume,
                                  what=f"run {spec.name}")
    result = RunResult(spec, report, reused, 0.0, 0.0)
    path = spec.run_dir / PER_IMAGE_FILE
    evaluated = spec.run_dir / "eval" / HITS_FILE.format(model="after")  # written by run_eval beside its report
    if hits and evaluated.is_file() and not (resume and path.is_file()):
        save_hits(path, load_hits(evaluated))
    if hits and path.is_file():  # a committed run keeps only its result and hits files
        result.hits_path = path
        result.hits_problems = _check_hits(load_hits(path), flatten_metrics(report["models"]["after"]))
    result.seconds, result.cpu_seconds = time.perf_counter() - t0, _cpu_seconds() - c0
    if not keep_checkpoints and (spec.run_dir / "train_done.json").is_file():
        # only an unfinished training resumes from them; a finished run keeps its exported student (~230 MB saved)
        shutil.rmtree(spec.run_dir / "checkpoints", ignore_errors=True)
    if not reused:  # what the run cost, hits included (a reused run keeps the times of the invocation that made it)
        report.setdefault("ablation", {}).update(seconds=result.seconds, cpu_seconds=result.cpu_seconds,
                                                 threads=spec.threads)
        atomic_write_text(spec.run_dir / RESULT_FILE, json.dumps(json_safe(report), indent=2, default=str))
    return result


# --------------------------------------------------------------------------------------------- the plan


def plan_runs(out_dir: Path, base_config: str | None, teachers: Mapping[str, Sequence[str]], seeds: Sequence[int],
              pretrained: Path | Mapping[int, Path], pretrain_key: str | Mapping[int, str], arms: Sequence[str],
              common: Sequence[str], threads: int = 1,
              seed_overrides: Mapping[int, Sequence[str]] | None = None) -> list[RunSpec]:
    """Every phase-2 run: shared arms once per seed, per-teacher arms once per (teacher, seed) (a teacher listed in
    :data:`TEACHER_ARMS` runs only its arms there).

    pretrained / pretrain_key: the phase-1 student and its key, one for every seed or per seed; seed_overrides:
    per seed, the overrides of its data draw (``seed_data_overrides``), which also key its teacher caches.
    """
    specs = []
    for seed in seeds:
        mine = list((seed_overrides or {}).get(seed, ()))
        start = pretrained[seed] if isinstance(pretrained, Mapping) else pretrained
        start_key = pretrain_key[seed] if isinstance(pretrain_key, Mapping) else pretrain_key
        data_key = _key([o for o in [*common, *mine] if o.startswith(("data.", "teacher."))]
                        + [f"config={base_config}"])
        for arm in arms:
            a = ARMS[arm]
            labels = [t for t in teachers if arm in TEACHER_ARMS.get(t, (arm,))] if a.per_teacher else [None]
            for label in labels:
                teacher = list(teachers[label]) if label is not None else []
                cache_label = _cache_label(label, teachers) if label is not None else "oracle"
                # a teacher variant's own settings (e.g. loss.alpha) win over the arm's
                overrides = [*common, *mine, *a.overrides, *teacher, f"seed={seed}"]
                key = _key([*overrides, f"pretrain={start_key}", f"config={base_config}"])
                name = f"seed{seed}/{label}/{arm}" if label is not None else f"seed{seed}/{arm}"
                run_dir = out_dir / "runs" / f"{name.replace('/', '-')}-{key}"
                overrides += [f"model.pretrained={start}",
                              f"teacher.cache_dir={out_dir / 'teacher_cache' / f'{cache_label}-{data_key}'}",
                              f"run_dir={run_dir}"]
                specs.append(RunSpec(name, arm, label, seed, base_config, overrides, run_dir, threads))
    return specs


def _pretrain_spec(out_dir: Path, base_config: str | None, common: Sequence[str], epochs: int, images: int,
                   threads: int) -> RunSpec:
    """Phase 1: contrastive-only training from random init on a synthetic set of its own (another image seed,
    the same held-out combinations)."""
    from kclip.config import load_config

    base = load_config(base_config, list(common)).data.synthetic
    held = base.seed if base.heldout_seed is None else base.heldout_seed
    overrides = [*common, f"data.synthetic.seed={base.seed + 1000}", f"data.synthetic.heldout_seed={held}",
                 f"data.synthetic.n_train_images={images}", "data.synthetic.n_val_images=100", *ORACLE,
                 "loss.alpha=0", "loss.beta=0", "loss.gamma=1", "model.pretrained=", "seed=0",
                 f"train.epochs={epochs}"]
    run_dir = out_dir / f"pretrain-{_key([*overrides, f'config={base_config}'])}"
    return RunSpec("pretrain", "pretrain", None, 0, base_config, [*overrides, f"run_dir={run_dir}"], run_dir, threads,
                   stages=("teach", "concepts", "train"))


def pretrain(spec: RunSpec, resume: bool = True, keep_checkpoints: bool = False) -> dict:
    """Build (or reuse) the phase-1 student (``<run_dir>/student.safetensors``); returns {seconds, cpu_seconds,
    threads, reused} (the times of the invocation that built it)."""
    import torch

    from kclip.config import load_config
    from kclip.pipeline import run
    from kclip.trainer import STUDENT_FILE, TRAIN_DONE

    path, info_path = spec.run_dir / STUDENT_FILE, spec.run_dir / PRETRAIN_INFO
    if resume and path.is_file() and (spec.run_dir / TRAIN_DONE).is_file() and info_path.is_file():
        return {**json.loads(info_path.read_text()), "reused": True}
    if spec.threads:
        torch.set_num_threads(spec.threads)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    run(load_config(spec.base_config, spec.overrides), stages=spec.stages, progress=spec.progress)
    info = {"seconds": time.perf_counter() - t0, "cpu_seconds": _cpu_seconds() - c0, "threads": spec.threads}
    atomic_write_json(info_path, info)
    if not keep_checkpoints:
        shutil.rmtree(spec.run_dir / "checkpoints", ignore_errors=True)
    return {**info, "reused": False}


# ------------------------------------------------------------------------------------------------ summary


def run_metrics(report: Mapping) -> dict[str, float]:
    """The comparison's metrics of one run: the report's "after" metrics + the held-out distillation R^2."""
    out = flatten_metrics(report["models"]["after"])
    r2 = (report.get("distillation") or {}).get("r2")
    if r2 is not None:
        out["distill_r2"] = float(r2)
    return {k: out[k] for k, _ in METRICS if k in out}


def summarize(results: Sequence[RunResult], teachers: Sequence[str], seeds: Sequence[int], arms: Sequence[str],
              bootstrap: bool = True) -> dict:
    """Per teacher: each arm's mean/std/n per metric and the paired differences with their intervals."""
    by = {(r.spec.arm, r.spec.teacher, r.spec.seed): r for r in results}
    out = {}
    for label in teachers:
        def get(arm, seed):
            return by.get((arm, label if ARMS[arm].per_teacher else None, seed))

        arm_runs = {arm: [get(arm, s) for s in seeds] for arm in arms}
        values = {arm: [run_metrics(r.report) if r else {} for r in rs] for arm, rs in arm_runs.items()}
        stats = aggregate({arm: [v for v in vs if v] for arm, vs in values.items()})
        for arm in arms:
            for k in stats[arm]:
                stats[arm][k]["per_seed"] = [v.get(k) for v in values[arm]]
        diffs = {}
        for x, y in DIFFERENCES:
            if x not in arms or y not in arms:
                continue
            name = f"{ARMS[x].key}-{ARMS[y].key}"
            row = {}
            for k, _ in METRICS:
                d = paired_differences([v.get(k) for v in values[x]], [v.get(k) for v in values[y]])
                if d["n"] == 0:
                    continue
                if bootstrap and k in IMAGE_LEVEL:
                    d["bootstrap"] = _bootstrap(arm_runs[x], arm_runs[y], k)
                row[k] = d
            diffs[name] = {"x": x, "y": y, "metrics": row}
        out[label] = {"arms": stats, "differences": diffs}
    return out


def protocol(seeds: Sequence[int], seed_over: Mapping[int, Sequence[str]], teachers: Sequence[str]) -> dict:
    """The declared protocol (kclip.experiments.design), written into the output before the results."""
    return {
        "status": "declared in kclip/experiments/design.py before the confirmatory runs (PRIMARIES, ANALYSIS)",
        "primaries": [{"name": p.name, "x": {"arm": p.x[0], "teacher": p.x[1]}, "y": {"arm": p.y[0], "teacher": p.y[1]},
                       "metric": p.metric, "endpoint": p.describe(), "rationale": p.rationale,
                       "teachers_run": all(t is None or t in teachers for t in (p.x[1], p.y[1]))}
                      for p in PRIMARIES],
        "analysis": ANALYSIS, "alpha": ALPHA, "power": POWER,
        "multiplicity": f"Holm over the {len(PRIMARIES)} primaries",
        "seeds": list(seeds), "data_per_seed": {str(s): list(seed_over[s]) for s in seeds},
        "controls": {"shuffled": "arm (c): the teacher's training rows permuted across captions",
                     "hashed-ngrams": "a knowledge-free, caption-specific teacher (kclip.control_teacher)",
                     "oracle": "arm (d): the captions' true attributes (positive control)"},
        "sensitivity": [t for t in SENSITIVITY if t in teachers],
        "post_hoc_variants": [t for t in POST_HOC if t in teachers],
        "exploratory": "every other table, difference and interval in this output",
    }


def confirmatory(results: Sequence[RunResult], seeds: Sequence[int]) -> list[dict]:
    """The primaries' analysis (design.ANALYSIS): per primary the paired differences over the seeds where both
    sides ran, the two-sided paired t-test, Holm over the primaries, the 95% interval and the minimum detectable
    effect at the seeds run (80% power, two-sided 0.05, from the observed seed SD)."""
    by = {(r.spec.arm, r.spec.teacher, r.spec.seed): r for r in results}

    def values(side, metric):
        arm, teacher = side
        out = []
        for seed in seeds:
            r = by.get((arm, teacher if ARMS[arm].per_teacher else None, seed))
            out.append(run_metrics(r.report).get(metric) if r else None)
        return out

    rows = []
    for p in PRIMARIES:
        x, y = values(p.x, p.metric), values(p.y, p.metric)
        d = paired_differences(x, y)
        rows.append({"name": p.name, "endpoint": p.describe(), "metric": p.metric, "x_per_seed": x, "y_per_seed": y,
                     **d, "p": paired_t_pvalue(d["per_seed"]),
                     "mde": minimum_detectable_effect(d["std"], d["n"], ALPHA, POWER)})
    for row, adj in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"] = adj
        row["rejected"] = None if adj is None else bool(adj < ALPHA)
    return rows


def _bootstrap(xs: Sequence[RunResult | None], ys: Sequence[RunResult | None], metric: str) -> dict | None:
    """The paired image bootstrap of one metric over the seeds where both runs have consistent hits."""
    nx, dx, ny, dy = [], [], [], []
    for x, y in zip(xs, ys):
        if x is None or y is None or x.hits_path is None or y.hits_path is None:
            continue
        if metric in x.hits_problems or metric in y.hits_problems:
            continue
        hx, hy = load_hits(x.hits_path), load_hits(y.hits_path)
        if metric not in hx or metric not in hy or hx[metric][0].shape != hy[metric][0].shape:
            continue
        nx.append(hx[metric][0]), dx.append(hx[metric][1]), ny.append(hy[metric][0]), dy.append(hy[metric][1])
    if not nx:
        return None
    res = paired_bootstrap(np.stack(nx), np.stack(dx), np.stack(ny), np.stack(dy))
    res["seeds"] = len(nx)
    return res


# ---------------------------------------------------------------------------------------------------- main


def run_comparison(out_dir: str | Path, teachers: Sequence[str] = CONFIRMATORY_TEACHERS,
                   seeds: Sequence[int] = DEFAULTS["seeds"],
                   epochs: int = DEFAULTS["epochs"], pretrain_epochs: int = DEFAULTS["pretrain_epochs"],
                   pretrain_images: int = DEFAULTS["pretrain_images"], n_val_images: int = DEFAULTS["n_val_images"],
                   text_em_steps: int = DEFAULTS["text_em_steps"], arms: Sequence[str] = tuple(ARMS),
                   base_config: str | None = None, extra_overrides: Sequence[str] = (), jobs: int = 1,
                   threads: int = 1, resume: bool = True, command: str | None = None, progress: bool = True,
                   bootstrap: bool = True, keep_checkpoints: bool = False, vary_data: bool = True,
                   log: Callable[[str], None] | None = None) -> dict:
    """Run the comparison (phase 1 once, then every phase-2 run), summarise, write comparison.json/.md.

    Args:
        out_dir: results folder (pretrain-*/, runs/, teacher_cache/, comparison.json, comparison.md).
        teachers: labels of :data:`TEACHERS`, or ``label=teacher.name`` for another teacher.
        seeds: paired seeds (every arm runs each).
        epochs: fine-tuning epochs of every phase-2 run; pretrain_epochs / pretrain_images: phase 1's budget.
        n_val_images: validation images of the comparison's split (>= 1000 for the paper's comparison).
        text_em_steps: the text-EM probe's budget (``eval.text_em_steps``), the same for every arm.
        arms: a subset of :data:`ARMS` (default all four).
        base_config: a preset or YAML (None: the embedded default); extra_overrides: ``key=value`` for every run.
        jobs: runs at a time (worker processes; 1 = in this process); threads: torch threads per run.
        resume: reuse finished runs (their result files) and the phase-1 student.
        bootstrap: per-image hits and the paired image bootstrap; keep_checkpoints: keep finished runs'
            DeepSpeed checkpoints (deleted by default: ~230 MB a run, only an unfinished training needs them).
        vary_data: each seed gets its own data draw, held-out combinations and phase-1 start
            (``seed_data_overrides``); False: every seed shares the configured data and one phase-1 start.

    Returns:
        the comparison dict (also written as comparison.json).
    """
    say = log or (lambda msg: print(f"[compare] {msg}", flush=True))
    t0, c0 = time.perf_counter(), _cpu_seconds()
    out_dir = Path(out_dir)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    if not seeds:
        raise ValueError("the comparison needs at least one seed")
    teacher_overrides = {}
    for t in teachers:
        if "=" in t:
            label, name = t.split("=", 1)
            teacher_overrides[label] = [f"teacher.name={name}"]
        elif t in TEACHERS:
            teacher_overrides[t] = list(TEACHERS[t])
        else:
            raise ValueError(f"unknown teacher {t!r}; choose from {list(TEACHERS)} or pass label=teacher.name")
    common = [f"data.synthetic.n_val_images={n_val_images}", f"eval.text_em_steps={text_em_steps}",
              *extra_overrides]
    if command is None:
        command = "python -m kclip.experiments.comparison " + shlex.join(
            ["--out", str(out_dir), "--teachers", *teachers, "--seeds", *map(str, seeds), "--epochs", str(epochs),
             "--pretrain-epochs", str(pretrain_epochs), "--pretrain-images", str(pretrain_images), "--val-images",
             str(n_val_images), "--text-em-steps", str(text_em_steps), "--arms", *[a for a in ARMS if a in arms],
             *(["--config", base_config] if base_config else []), *[x for o in extra_overrides for x in ("--set", o)],
             "--jobs", str(jobs), "--threads", str(threads)] + ([] if resume else ["--no-resume"])
            + ([] if bootstrap else ["--no-bootstrap"]) + (["--keep-checkpoints"] if keep_checkpoints else [])
            + ([] if vary_data else ["--fixed-data"]))

    from kclip.config import load_config

    n_heldout = load_config(base_config, list(extra_overrides)).data.synthetic.heldout_combos
    seed_over = {s: (seed_data_overrides(s, n_heldout) if vary_data else []) for s in seeds}
    pres = {s: _pretrain_spec(out_dir, base_config, [*extra_overrides, *seed_over[s]], pretrain_epochs,
                              pretrain_images, threads) for s in seeds}
    for p in pres.values():
        p.progress = progress and jobs <= 1
    unique = list({p.run_dir: p for p in pres.values()}.values())  # one per seed, or one shared (vary_data=False)
    specs = plan_runs(out_dir, base_config, teacher_overrides, seeds,
                      {s: p.run_dir / "student.safetensors" for s, p in pres.items()},
                      {s: p.run_dir.name.split("-", 1)[1] for s, p in pres.items()},
                      [a for a in ARMS if a in arms], [*common, f"train.epochs={epochs}"], threads,
                      seed_overrides=seed_over)
    say(f"phase 1: {len(unique)} pretrained start(s) ({pretrain_epochs} epochs, {pretrain_images} images); "
        f"phase 2: {len(specs)} runs, {jobs} at a time")
    git_rev = _git_rev()  # the code the runs start from (read now: commits made during a long run do not count)
    pre_infos, caches, results = _run_all(unique, specs, jobs, resume, say, hits=bootstrap,
                                          keep_checkpoints=keep_checkpoints)
    pre_by_dir = {str(p.run_dir): (p, info) for p, info in zip(unique, pre_infos)}

    summary = summarize(results, list(teacher_overrides), seeds, [a for a in ARMS if a in arms], bootstrap)
    runs = [{"name": r.spec.name, "arm": r.spec.arm, "teacher": r.spec.teacher, "seed": r.spec.seed,
             "run_dir": str(r.spec.run_dir), "overrides": r.spec.overrides, "reused": r.reused,
             "seconds": (r.report.get("ablation") or {}).get("seconds"),
             "cpu_seconds": (r.report.get("ablation") or {}).get("cpu_seconds"),
             "git_rev": (r.report.get("provenance") or {}).get("git_rev"),  # the code that made this run
             "metrics": run_metrics(r.report), "hits_problems": r.hits_problems} for r in results]
    result = {
        "command": command, "git_rev": git_rev,
        # the declared protocol comes first, before any result
        "protocol": protocol(seeds, seed_over, list(teacher_overrides)),
        "versions": _versions(), "machine": _machine(),
        "wall_seconds": time.perf_counter() - t0, "cpu_seconds": _cpu_seconds() - c0 + _children_cpu(),
        "runs_seconds": sum(r["seconds"] or 0.0 for r in runs) + sum(i.get("seconds") or 0.0 for i in pre_infos),
        "n_runs_reused": sum(r["reused"] for r in runs),
        "seeds": list(seeds), "epochs": epochs, "pretrain_epochs": pretrain_epochs, "pretrain_images": pretrain_images,
        "n_val_images": n_val_images, "text_em_steps": text_em_steps, "arms": [a for a in ARMS if a in arms],
        "differences": [f"{ARMS[x].key}-{ARMS[y].key}" for x, y in DIFFERENCES if x in arms and y in arms],
        "teacher_overrides": teacher_overrides, "extra_overrides": list(extra_overrides),
        "vary_data": vary_data, "data_per_seed": {str(s): seed_over[s] for s in seeds},
        "pretrain": {str(s): {"student": str(p.run_dir / "student.safetensors"), "run_dir": str(p.run_dir),
                              "overrides": p.overrides, **pre_by_dir[str(p.run_dir)][1]} for s, p in pres.items()},
        "teacher_caches_built": caches, "jobs": jobs, "threads": threads,
        "confirmatory": confirmatory(results, seeds),
        "teachers": summary, "runs": runs,
    }
    # what is committed: comparison.json / .md and each run's result and hits (a resumed comparison reuses them)
    atomic_write_text(out_dir / ".gitignore", GITIGNORE)
    atomic_write_json(out_dir / "comparison.json", json_safe(result), sort_keys=False)
    atomic_write_text(out_dir / "comparison.md", render_markdown(result))
    say(f"wrote {out_dir / 'comparison.md'} and comparison.json ({result['wall_seconds']:.0f} s)")
    return result


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _cache_of(spec: RunSpec) -> str:
    return next(o.split("=", 1)[1] for o in spec.overrides if o.startswith("teacher.cache_dir="))


def _cache_ready(cache: str) -> bool:
    return all((Path(cache) / split / "manifest.json").is_file() for split in ("train", "val"))


def _teach(spec: RunSpec) -> dict:
    """The data and teacher cache of a run (needs no student: runs beside phase 1); returns its times."""
    import torch

    from kclip.config import load_config
    from kclip.pipeline import run

    torch.set_num_threads(spec.threads)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    run(load_config(spec.base_config, spec.overrides), stages=("teach",), progress=False)
    return {"cache": _cache_of(spec), "seconds": time.perf_counter() - t0, "cpu_seconds": _cpu_seconds() - c0,
            "threads": spec.threads}


# what of <out> git keeps: the summary, each run's result and hits, each phase-1 start's times (a later session
# resumes from them); the students, data, checkpoints and teacher caches stay out
GITIGNORE = ("runs/*/*\n!runs/*/" + RESULT_FILE + "\n!runs/*/" + PER_IMAGE_FILE + "\npretrain-*/*\n!pretrain-*/"
             + PRETRAIN_INFO + "\nteacher_cache/\n")
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _in_worker(fn, *args):
    """Run ``fn`` in a worker process: its own one-rank process group (a MASTER_PORT inherited from a parent
    that set one up would already be taken), no hub access."""
    for key in _DIST_ENV:
        os.environ.pop(key, None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return fn(*args)


def _finished(spec: RunSpec, resume: bool, hits: bool) -> bool:
    """A run whose result (and hits) are on disk: it needs neither its teacher cache nor its phase-1 start."""
    return resume and (spec.run_dir / RESULT_FILE).is_file() and (not hits or (spec.run_dir / PER_IMAGE_FILE).is_file())


def _start_of(spec: RunSpec) -> Path:
    return Path(next(o.split("=", 1)[1] for o in spec.overrides if o.startswith("model.pretrained="))).parent


@dataclass
class _Task:
    fn: Callable
    args: tuple
    deps: set
    done: Callable


def _run_all(pres: Sequence[RunSpec], specs: list[RunSpec], jobs: int, resume: bool, say: Callable[[str], None],
             hits: bool = True, keep_checkpoints: bool = False) -> tuple[list[dict], list, list[RunResult]]:
    """Phase 1, the teacher caches and every run, seed by seed: a run starts once its cache and its phase-1 start
    exist, and the next seed's caches and start are built beside the current seed's runs, so an interrupted
    comparison leaves whole seeds behind. A run already finished (``resume``) needs neither, so a comparison
    resumed from committed results builds only what its unfinished runs need. In this process (jobs = 1) or
    ``jobs`` tasks at a time in worker processes. Returns (phase-1 infos in the order of ``pres``, caches built,
    results)."""
    n = len(specs)
    done: list[RunResult] = []
    caches: list[dict] = []
    pre_info: dict[Path, dict] = {}

    def report(r: RunResult) -> None:
        done.append(r)
        m = run_metrics(r.report)
        brief = ", ".join(f"{k.split('.')[-1]} {m[k]:.{3 if k == 'distill_r2' else 1}f}"
                          for k in ("retrieval.i2t_r1", "attribute_heldout_top1", "distill_r2") if k in m)
        say(f"[{len(done)}/{n}] {r.spec.name}: {'reused' if r.reused else f'{r.seconds:.0f} s'} ({brief})")

    def pretrained(pre: RunSpec):
        def record(info: dict) -> None:
            pre_info[pre.run_dir] = info
            say(f"phase 1: {'reused' if info['reused'] else 'built in %.0f s' % info['seconds']} {pre.run_dir}")
        return record

    def taught(info: dict) -> None:
        caches.append(info)
        say(f"teacher cache {info['cache']}: {info['seconds']:.0f} s")

    by_dir = {p.run_dir: p for p in pres}
    tasks: dict[str, _Task] = {}  # insertion order = priority: seed by seed, cache and start before the runs
    for spec in specs:
        if _finished(spec, resume, hits):
            tasks[f"run:{spec.name}"] = _Task(execute, (spec, None, resume, hits, keep_checkpoints), set(), report)
            continue
        deps = set()
        cache = _cache_of(spec)
        if not _cache_ready(cache):
            if f"teach:{cache}" not in tasks:
                say(f"teacher cache {cache}: to embed (in {spec.run_dir})")
                tasks[f"teach:{cache}"] = _Task(_teach, (spec,), set(), taught)
            deps.add(f"teach:{cache}")
        pre = by_dir[_start_of(spec)]
        tasks.setdefault(f"pretrain:{pre.run_dir}", _Task(pretrain, (pre, resume, keep_checkpoints), set(),
                                                          pretrained(pre)))
        deps.add(f"pretrain:{pre.run_dir}")
        tasks[f"run:{spec.name}"] = _Task(execute, (spec, None, resume, hits, keep_checkpoints), deps, report)
    skipped = [p.run_dir for p in pres if f"pretrain:{p.run_dir}" not in tasks]
    if skipped:
        say(f"phase 1: {len(skipped)} start(s) not needed (every run from them is finished)")
    for d in skipped:
        info_path = d / PRETRAIN_INFO
        pre_info[d] = {**(json.loads(info_path.read_text()) if info_path.is_file() else {}), "reused": True}

    finished: set[str] = set()
    if jobs <= 1:
        for key, task in tasks.items():  # in order, so every task's dependencies ran before it
            if key.startswith("run:"):
                say(f"[{len(done) + 1}/{n}] {key[4:]}: {'checking' if resume else 'running'}")
            task.done(task.fn(*task.args))
    else:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            running: dict = {}
            while tasks or running:
                for key in [k for k, t in tasks.items() if t.deps <= finished]:
                    if len(running) >= jobs:
                        break
                    task = tasks.pop(key)
                    if key.startswith("run:") and not _finished(task.args[0], resume, hits):
                        say(f"start {key[4:]}")
                    running[pool.submit(_in_worker, task.fn, *task.args)] = (key, task)
                ready, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for f in ready:
                    key, task = running.pop(f)
                    task.done(f.result())
                    finished.add(key)
    order = {s.name: i for i, s in enumerate(specs)}
    return [pre_info[p.run_dir] for p in pres], caches, sorted(done, key=lambda r: order[r.spec.name])


def _git_rev() -> str:
    from kclip.stamps import git_revision
    return git_revision(mark_dirty=False, from_env=False)  # the commit alone, as the runs' reports record it


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kclip.experiments.comparison",
                                description="The paper's comparison on the embedded default: arms (a) contrastive, "
                                            "(b) Knowledge-CLIP, (c) shuffled teacher, (d) oracle teacher from one "
                                            "pretrained start, paired seeds, 95%% intervals "
                                            "(see kclip.experiments.comparison)")
    p.add_argument("--out", required=True, help="results folder (comparison.json, comparison.md, runs/)")
    p.add_argument("--teachers", nargs="+", default=list(CONFIRMATORY_TEACHERS),
                   help=f"teacher labels ({', '.join(TEACHERS)}) or label=teacher.name (default: the confirmatory "
                        f"set {' '.join(CONFIRMATORY_TEACHERS)})")
    p.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULTS["seeds"]))
    p.add_argument("--fixed-data", action="store_true",
                   help="every seed shares the configured data draw, held-out combos and one phase-1 start (the "
                        "pre-confirmatory design); default: each seed its own")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="fine-tuning epochs of every phase-2 run")
    p.add_argument("--pretrain-epochs", type=int, default=DEFAULTS["pretrain_epochs"])
    p.add_argument("--pretrain-images", type=int, default=DEFAULTS["pretrain_images"],
                   help="training images of phase 1's own split")
    p.add_argument("--val-images", type=int, default=DEFAULTS["n_val_images"])
    p.add_argument("--text-em-steps", type=int, default=DEFAULTS["text_em_steps"])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--config", default=None, help="base preset or YAML (default: the embedded default)")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run, phase 1 included (repeatable)")
    p.add_argument("--jobs", type=int, default=DEFAULTS["jobs"], help="runs at a time (worker processes)")
    p.add_argument("--threads", type=int, default=DEFAULTS["threads"], help="torch threads per run")
    p.add_argument("--no-resume", action="store_true", help="rerun finished runs")
    p.add_argument("--no-bootstrap", action="store_true",
                   help="skip the per-image paired bootstrap (and the per-image hits it needs)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep finished runs' DeepSpeed checkpoints")
    args = p.parse_args(argv)
    command = "python -m kclip.experiments.comparison " + shlex.join(list(sys.argv[1:] if argv is None else argv))
    run_comparison(args.out, teachers=args.teachers, seeds=args.seeds, epochs=args.epochs,
                   pretrain_epochs=args.pretrain_epochs, pretrain_images=args.pretrain_images,
                   n_val_images=args.val_images, text_em_steps=args.text_em_steps, arms=args.arms,
                   base_config=args.config, extra_overrides=args.extra, jobs=args.jobs, threads=args.threads,
                   resume=not args.no_resume, command=command, bootstrap=not args.no_bootstrap,
                   keep_checkpoints=args.keep_checkpoints, vary_data=not args.fixed_data)
    print((Path(args.out) / "comparison.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
