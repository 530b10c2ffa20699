"""The stages' bodies and the run: data, teach, concepts, train, eval, in order, as the plan decides.

Each component is built from its own config section (``kclip.teacher.load_teacher_from_config``,
``kclip.concepts.run_concepts_from_config``, ``kclip.synthetic.generate_from_config``, ``kclip.trainer.train``);
what to do with each stage is :mod:`kclip.pipeline.plan`'s, decided before anything is changed.
"""
from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import numpy as np
import torch

from kclip import __version__
from kclip.atomic import atomic_write_text
from kclip.config import Config, to_dict, to_yaml
from kclip.data import PairIndex, build_index
from kclip.distributed import DistInfo, barrier, broadcast_object, setup
from kclip.errors import UserError
from kclip.pipeline.plan import (STAGES, Decision, StageContext, StaleOutputError, _clear, _decided, _downstream, _log,
                                 _plan, _stamp, _stop_message, decide, plan_teach, rebuild_names)
from kclip.pipeline.teacher_cache import cache_changes, teacher_cache_dir
from kclip.stamps import file_digest

CONFIG_FILE = "config.yaml"
RUNS_LOG = "runs.jsonl"


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------

def data_paths(cfg: Config, run_dir: Path) -> tuple[str, str, str]:
    """(source kind for the indexer, train spec, val spec); synthetic data is generated first if needed."""
    if cfg.data.source == "synthetic":
        d = run_dir / "data"
        return "csv", str(d / "train.csv"), str(d / "val.csv")
    return cfg.data.source, cfg.data.train, cfg.data.val


def prepare_data(cfg: Config, run_dir: Path, dist: DistInfo,
                 progress: bool = True) -> tuple[PairIndex, PairIndex | None]:
    """Generate (synthetic) and verify/index the train and val pairs; rank 0 does the work, others reuse it."""
    source, train_spec, val_spec = data_paths(cfg, run_dir)
    columns = dict(image_column=cfg.data.image_column, caption_column=cfg.data.caption_column,
                   uid_column=cfg.data.uid_column, on_bad_sample=cfg.data.on_bad_sample)
    if cfg.data.source == "synthetic":
        columns.update(uid_column="uid")

    def index(spec, name):
        return build_index(source, spec, cache_path=run_dir / "data_index" / f"{name}.json",
                           progress=progress and dist.is_main, **columns)

    error = None
    if dist.is_main:
        try:
            if cfg.data.source == "synthetic":
                from kclip.synthetic import generate_from_config
                generate_from_config(run_dir / "data", cfg.data.synthetic, progress=progress)
            index(train_spec, "train")
            if val_spec:
                index(val_spec, "val")
        except Exception as exc:  # raised on every rank so none waits at the barrier forever
            error = exc
    told = broadcast_object(None if error is None else (isinstance(error, UserError), f"{error}"))
    if told is not None:
        if error is not None:
            raise error
        user_error, message = told
        raise (UserError if user_error else RuntimeError)(f"data preparation failed on rank 0: {message}")
    barrier()
    train_index = index(train_spec, "train")
    val_index = index(val_spec, "val") if val_spec else None
    _log(dist, f"data: train {train_index.report()}" + (f"; val {val_index.report()}" if val_index else ""))
    return train_index, val_index


# ----------------------------------------------------------------------------------------------------------
# Teach: the teacher and its cache
# ----------------------------------------------------------------------------------------------------------

def _load_teacher(cfg: Config, device):
    """The teacher of ``teacher.name``: the synthetic set's oracle (:mod:`kclip.oracle`), the hashed n-gram
    control (:mod:`kclip.control_teacher`), or a model (:mod:`kclip.teacher`), each from ``cfg.teacher``."""
    from kclip.control_teacher import is_control, load_control_from_config
    from kclip.oracle import is_oracle, load_oracle_from_config
    from kclip.teacher import load_teacher_from_config

    if is_control(cfg.teacher.name):
        return load_control_from_config(cfg.teacher, device=device)
    if is_oracle(cfg.teacher.name):
        if cfg.data.source != "synthetic":
            raise ValueError(f"teacher.name {cfg.teacher.name!r} encodes the attributes of the built-in synthetic "
                             f"set's captions; data.source is {cfg.data.source!r}: use a model teacher")
        return load_oracle_from_config(cfg.teacher, device=device)
    return load_teacher_from_config(cfg.teacher, device=device)


def stage_teach(ctx: StageContext, todo: dict) -> None:
    """Embed the captions of the splits in ``todo`` (split -> Decision) once with the teacher (shards split
    across ranks); a resumed cache recomputes only its missing shards."""
    from kclip.cache import build_cache

    cfg, dist = ctx.cfg, ctx.dist
    todo = {s: d for s, d in todo.items() if d.action in ("build", "resume", "rebuild")}
    if not todo:
        _log(dist, "teach: cache complete, skipped")
        return
    if dist.is_main and any(d.action == "rebuild" for d in todo.values()):
        _clear("teach", ctx)
    barrier()
    t0 = time.perf_counter()
    teacher = _load_teacher(cfg, dist.device)
    for split in todo:
        index = ctx.splits[split]
        build_cache(teacher, index.captions, teacher_cache_dir(cfg, ctx.run_dir) / split,
                    shard_size=cfg.teacher.shard_size, uids=[p.uid for p in index.pairs], rank=dist.rank,
                    world_size=dist.world_size, progress=ctx.progress and dist.is_main)
    del teacher
    gc.collect()
    barrier()
    _log(dist, f"teach: embedded {sum(len(ctx.splits[s].pairs) for s in todo)} captions in "
               f"{time.perf_counter() - t0:.1f}s")


def open_teacher_cache(cfg: Config, run_dir: Path, name: str, index: PairIndex):
    """The split's finished cache, checked against the config and the captions (no teacher weights needed).

    Raises:
        StaleOutputError: the cache was built with another teacher config or for other captions; the message
            names each key and ``--rebuild teach``.
        kclip.cache.CacheCorruptError: no finished cache there (``open_cache`` checks every shard's size).
    """
    from kclip.cache import Manifest, open_cache

    out = teacher_cache_dir(cfg, run_dir) / name
    if (out / "manifest.json").is_file():
        changes = cache_changes(Manifest.load(out), cfg, index, name)
        if changes:
            raise StaleOutputError(_stop_message(run_dir, {"teach": changes}, {"teach"}, cfg))
    return open_cache(out)


# ----------------------------------------------------------------------------------------------------------
# Concepts, train, eval
# ----------------------------------------------------------------------------------------------------------

def stage_concepts(ctx: StageContext) -> None:
    """k-means over the training captions' teacher targets, the frozen classifier C, plots (rank 0)."""
    from kclip.concepts import CONCEPTS_FILE, run_concepts_from_config
    from kclip.eval.run_encoders import student_text_embeddings

    cfg, dist = ctx.cfg, ctx.dist
    out = ctx.run_dir / "concepts"
    if dist.is_main:
        student = student_text_embeddings(cfg.model.name, cfg.model.pretrained, ctx.splits["train"].captions,
                                          cfg.seed, dist.device, cfg.eval.batch_size)
        report = run_concepts_from_config(ctx.targets("train"), out, cfg.concepts, seed=cfg.seed,
                                          student_text_embeddings=student, progress=ctx.progress)
        acc = report.get("classifier", {}).get("val_acc")
        _log(dist, f"concepts: k={cfg.concepts.k} ({report.get('backend')}), inertia {report.get('inertia'):.4g}, "
                   f"classifier held-out accuracy {acc if acc is None else f'{acc:.3f}'}")
        _stamp("concepts", ctx, file_digest(out / CONCEPTS_FILE))
    barrier()


def stage_train(ctx: StageContext, resume: bool = True, stop_after: int = 0) -> dict:
    """Train (or resume) the student from the cached targets and the frozen concepts; stamp it when done."""
    from kclip.concepts import load_concepts
    from kclip.trainer import STUDENT_FILE, TrainInputs, train

    concepts = load_concepts(ctx.run_dir / "concepts")
    heldout = {}
    if "val" in ctx.caches:  # the per-epoch R^2 of W_e(E_T(x)) on captions never trained on
        heldout = dict(heldout_captions=ctx.splits["val"].captions, heldout_teacher=ctx.targets("val"))
    inputs = TrainInputs(index=ctx.splits["train"], teacher=ctx.targets("train"), labels=concepts["labels"].long(),
                         classifier_weight=concepts["classifier.weight"], classifier_bias=concepts["classifier.bias"],
                         eval_index=ctx.splits.get("val"), **heldout)
    _stamp("train", ctx, None, complete=False)  # a resumed training is checked against these inputs too
    barrier()
    summary = train(ctx.cfg, ctx.run_dir, inputs, ctx.dist, resume=resume, progress=ctx.progress,
                    stop_after=stop_after)
    if not summary.get("stopped_early"):
        _stamp("train", ctx, file_digest(ctx.run_dir / STUDENT_FILE) if ctx.dist.is_main else None)
    barrier()
    return summary


def stage_eval(ctx: StageContext) -> dict | None:
    """Before/after evaluation on the validation pairs of any source (rank 0); prints the table, returns the report."""
    from kclip.concepts import load_concepts
    from kclip.eval.report import format_table
    from kclip.eval.run import index_eval_data, run_eval
    from kclip.eval.run_encoders import CachedTeacherTexts
    from kclip.model import ClipEncoders, build_clip
    from kclip.trainer import STUDENT_FILE, TRAIN_DONE

    cfg, dist, run_dir = ctx.cfg, ctx.dist, ctx.run_dir
    out = run_dir / "eval"
    report = None
    if dist.is_main:
        before = build_clip(cfg.model.name, cfg.model.pretrained, seed=cfg.seed)
        after = build_clip(cfg.model.name, str(run_dir / STUDENT_FILE))
        models = {
            "before": ClipEncoders("before", before[0], before[2], before[3], dist.device, cfg.eval.batch_size),
            "after": ClipEncoders("after", after[0], after[2], after[3], dist.device, cfg.eval.batch_size),
        }
        teacher = CachedTeacherTexts(f"teacher:{cfg.teacher.name}",
                                     [(ctx.targets(s, shuffled=False), ctx.splits[s].captions)
                                      for s in ("val", "train")])
        synthetic = run_dir / "data" if cfg.data.source == "synthetic" else None
        _, train_spec, val_spec = data_paths(cfg, run_dir)
        data = index_eval_data(ctx.splits["val"], ctx.splits["train"], synthetic_dir=synthetic,
                               description=f"{cfg.data.source} pairs: train {train_spec}, val {val_spec}")
        labels = load_concepts(run_dir / "concepts")["labels"].numpy()
        done = run_dir / TRAIN_DONE
        summary = json.loads(done.read_text()) if done.is_file() else {}
        distillation = ({"r2": summary["distill_r2"], "captions": summary.get("distill_r2_captions")}
                        if "distill_r2" in summary else None)
        report = run_eval(models, data, out, teacher=teacher, concept_labels=labels,
                          batch_size=cfg.eval.batch_size, seed=cfg.seed, progress=ctx.progress,
                          concept_k=cfg.concepts.k, cub_root=cfg.eval.cub_root or None,
                          awa2_root=cfg.eval.awa2_root or None, text_em_steps=cfg.eval.text_em_steps,
                          distillation=distillation)
        _stamp("eval", ctx, file_digest(out / "report.json"))
        print(format_table(report), flush=True)
    barrier()
    return report


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------

def _say(ctx: StageContext, stage: str, d: Decision) -> None:
    why = f" ({'; '.join(d.reasons)})" if d.reasons and d.reasons != ["--rebuild"] else ""
    msg = {"skip": "up to date, skipped", "build": "building", "resume": "resuming",
           "rebuild": ("rebuilding (--rebuild)" if d.reasons == ["--rebuild"] else "inputs changed, rebuilding")}
    _log(ctx.dist, f"{stage}: {msg[d.action]}{why}")


def _record_invocation(ctx: StageContext, stages, rebuild, plan: dict) -> None:
    """config.yaml (the latest invocation) and one line of runs.jsonl per invocation (rank 0)."""
    if not ctx.dist.is_main:
        return
    atomic_write_text(ctx.run_dir / CONFIG_FILE, to_yaml(ctx.cfg))
    line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stages": list(stages), "rebuild": sorted(rebuild),
            "kclip_version": __version__,
            "plan": {k: {"action": d.action, "reasons": d.reasons} for k, d in plan.items()},
            "config": to_dict(ctx.cfg)}
    with open(ctx.run_dir / RUNS_LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(line, default=str) + "\n")


def run(cfg: Config, stages: tuple = STAGES, resume: bool = True, progress: bool = True, stop_after: int = 0,
        rebuild=()) -> dict:
    """Run the requested stages in order: each is skipped when its stamp matches, built when missing, resumed
    (train) when interrupted, rebuilt when it is cheap and its inputs changed; return {"eval": report, ...}.

    Args:
        rebuild: stage names (or "all"; comma lists allowed) to discard and rebuild, with everything
            downstream of them.

    Raises:
        StaleOutputError: an expensive stage's output (teacher cache, training) was made from other inputs;
            nothing was changed, and the message names each key and the ``--rebuild`` that rebuilds.
    """
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)}")
    stages = tuple(s for s in STAGES if s in stages)
    names = rebuild_names(rebuild, stages)
    if names - set(stages):
        raise ValueError(f"--rebuild {','.join(sorted(names - set(stages)))}: not a stage of this command "
                         f"({', '.join(stages)}); use `kclip run --rebuild ...`")
    explicit = _downstream(names)
    dist = setup()
    run_dir = Path(cfg.run_dir)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    _log(dist, f"device: {dist.device} x {dist.world_size} rank(s)"
               + ("" if torch.cuda.is_available() else " (no CUDA GPU visible to torch: running on CPU)"))
    barrier()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    train_index, val_index = prepare_data(cfg, run_dir, dist, progress)
    ctx = StageContext(cfg, run_dir, dist, {"train": train_index, **({"val": val_index} if val_index else {})},
                       progress=progress)
    result: dict = {"run_dir": str(run_dir)}

    # 1. the teacher cache (its manifest is its stamp)
    teach_plan = _decided(ctx, plan_teach, ctx, "teach" in stages, explicit)
    stale = {s: d.reasons for s, d in teach_plan.items() if d.action == "stop"}
    if stale:
        raise StaleOutputError(_stop_message(run_dir, {"teach": [r for rs in stale.values() for r in rs]}, {"teach"},
                                             cfg))
    if "teach" in stages:
        stage_teach(ctx, teach_plan)
    later = [s for s in stages if s != "teach"]
    # val: eval, and the held-out R^2 that training logs each epoch
    needed = {"train"} | ({"val"} if {"eval", "train"} & set(later) and val_index is not None else set())
    if later:
        ctx.caches = {s: open_teacher_cache(cfg, run_dir, s, ctx.splits[s]) for s in ctx.splits if s in needed}

    # 2. concepts, train, eval: decided up front, so a stop changes nothing; re-checked at each stage's turn
    plan = _decided(ctx, _plan, ctx, stages, explicit) if later else {}
    _record_invocation(ctx, stages, explicit, {**{f"teach.{s}": d for s, d in teach_plan.items()}, **plan})
    for stage in later:
        if plan[stage].reasons == ["no validation split (data.val)"]:
            _log(dist, "eval: no validation split (data.val), skipped")
            continue
        d = _decided(ctx, decide, stage, ctx, explicit)  # now with the digests of what ran before it
        if d.action == "stop":
            raise StaleOutputError(_stop_message(run_dir, {stage: d.reasons}, {stage}, cfg))
        _say(ctx, stage, d)
        if d.action == "skip":
            if stage == "eval":
                result["eval"] = json.loads((run_dir / "eval" / "report.json").read_text())
            continue
        if d.action == "rebuild" and dist.is_main:
            _clear(stage, ctx)
        barrier()
        if stage == "concepts":
            stage_concepts(ctx)
        elif stage == "train":
            result["train"] = stage_train(ctx, resume=resume, stop_after=stop_after)
            if result["train"].get("stopped_early"):
                return result
        else:
            result["eval"] = stage_eval(ctx)
    return result
