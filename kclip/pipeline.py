"""The Knowledge-CLIP pipeline: data -> teach -> concepts -> train -> eval. Each stage records what it consumed
and is skipped only when that still matches; training resumes where it was interrupted.

Layout of a run directory::

    config.yaml            the resolved config of the latest invocation
    runs.jsonl             one line per invocation: its resolved config, the stages asked for, and what each
                           stage did (skip / build / resume / rebuild) and why
    data/                  the synthetic dataset (data.source: synthetic)
    data_index/            verified pair indexes (train.json, val.json), keyed by the source files
    teacher/train, /val    embedding caches (sharded fp16 + manifest.json; teacher.cache_dir moves them)
    concepts/              labels, centroids, classifier C, report, plots; stamp.json
    checkpoints/           DeepSpeed checkpoints; metrics.jsonl, tensorboard/
    student.safetensors    the exported open_clip student; train_done.json; train_stamp.json
    eval/                  report.json, report.md, plots; stamp.json

Stamps (:mod:`kclip.stamps`). Every stage's output has a stamp: the config keys it consumed, those of the
stages before it (transitively), the identity of the data and of the teacher cache, the digests of the
upstream outputs it read, the kclip version and the whole resolved config of the invocation that built it.
The teacher cache's stamp is its own ``manifest.json`` (teacher, revision, precision, pooling,
max_length, prompt, caption hashes, count). What kclip does when a stage's inputs changed depends on what
the stage costs to redo:

    stage      output                         inputs changed ->
    data       data_index/*.json              re-indexed automatically (cheap; keyed by file size/mtime)
    teach      teacher/<split>/ (manifest)    STOP: re-embedding every caption is expensive (--rebuild teach)
    concepts   concepts/ (stamp.json)         rebuilt automatically (k-means + a linear classifier: cheap)
    train      student, checkpoints/          STOP: training is expensive (--rebuild train)
                 (train_stamp.json)
    eval       eval/ (stamp.json)             rebuilt automatically (cheap)

A stop happens before anything is changed and names each changed key (``old -> new``) and the flag that
rebuilds. ``--rebuild STAGE[,STAGE]`` (or ``all``) discards and rebuilds those stages and whatever depends
on them. A stage whose output has no stamp (made before kclip recorded stage inputs) counts as changed.
The kclip version is recorded but a new version alone rebuilds nothing.

Under the DeepSpeed launcher every rank runs this: rank 0 decides (and broadcasts) what each stage does,
the teacher cache is split across ranks, k-means and evaluation run on rank 0 behind barriers, training
is data parallel.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kclip import __version__
from kclip.atomic import atomic_write_text
from kclip.config import Config, to_dict, to_yaml
from kclip.data import PairIndex, build_index
from kclip.distributed import DistInfo, barrier, broadcast_object, setup
from kclip.errors import UserError
from kclip.stamps import file_digest, input_changes, make_stamp, read_stamp, short, upstream_changes, write_stamp
from kclip.targets import TeacherTargets, shuffle_permutation

STAGES = ("teach", "concepts", "train", "eval")
DEPENDS = {"teach": (), "concepts": ("teach",), "train": ("teach", "concepts"), "eval": ("teach", "concepts", "train")}
# What kclip does when a finished stage's inputs changed: "auto" rebuilds it, "ask" stops and names --rebuild.
REBUILD_POLICY = {"teach": "ask", "concepts": "auto", "train": "ask", "eval": "auto"}
COST = {"teach": "embedding every caption with the teacher again", "train": "training again"}

# The config keys each stage consumes (a trailing "." is a whole section). Keys that change how, not what,
# a stage computes are left out: logging/checkpoint cadence, loader workers, token_budget/shard_size, batch
# sizes of evaluation, torch.compile, gradient checkpointing, evaluation during training (eval.every_steps*: it
# only adds eval/* records, the training is the same). train.grad_cache changes the trained batch: an input.
CONCEPTS_KEYS = ("seed", "concepts.", "loss.target_norm", "loss.shuffle_teacher", "model.name", "model.pretrained")
TRAIN_KEYS = ("seed", "model.", "loss.", "train.")
TRAIN_IGNORED = ("train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.compile",
                 "model.grad_checkpointing", "loss.contrastive_memory_budget_gb")
EVAL_KEYS = ("data.source", "eval.cub_root", "eval.awa2_root", "eval.text_em_steps")

# Keys added after stamps existed, recorded only when they differ from this value: outputs stamped before the key
# existed (made with that value) stay current, and turning the key on or off is still a change.
RECORDED_IF_NOT = {"loss.shuffle_teacher": False, "train.grad_cache": False}

CONFIG_FILE = "config.yaml"
RUNS_LOG = "runs.jsonl"
STAMPS = {"concepts": "concepts/stamp.json", "train": "train_stamp.json", "eval": "eval/stamp.json"}


class StaleOutputError(UserError, RuntimeError):
    """A stage's existing output was made from other inputs and is too expensive to rebuild unasked (or, for a
    stage this command does not run, cannot be rebuilt by it); the message names every changed key
    (old -> new) and what to run."""


class MissingInputError(UserError, FileNotFoundError):
    """A stage this command runs needs the output of a stage it does not run, and that output is missing or
    unfinished; the message names the stage to run first."""


def _log(dist: DistInfo, msg: str) -> None:
    if dist.is_main:
        print(f"[kclip] {msg}", flush=True)


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
                from kclip.synthetic import generate
                s = cfg.data.synthetic
                generate(run_dir / "data", s.n_train_images, s.n_val_images, s.captions_per_image, s.image_size,
                         s.heldout_combos, s.seed, progress=progress, heldout_seed=s.heldout_seed)
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


def pairs_identity(index: PairIndex, split: str) -> dict:
    """What a split's pairs are, for stamps: sha256 over (uid, caption, image path relative to the pairs file,
    shard member) in order, so moving a dataset folder changes nothing but editing it does. (The captions
    alone are in the teacher cache's manifest.)"""
    base = Path(index.sources[0]).parent if index.sources else Path(".")
    h = hashlib.sha256()
    for p in index.pairs:
        image = os.path.relpath(p.image, base) + (f"@{p.member_offset}" if p.member_offset >= 0 else "")
        b = f"{p.uid}\t{p.caption}\t{image}".encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return {f"data.{split}:pairs_sha256": h.hexdigest()}


# ----------------------------------------------------------------------------------------------------------
# The teacher cache and its identity (from the config alone: reading a cache needs no teacher weights)
# ----------------------------------------------------------------------------------------------------------

def teacher_cache_dir(cfg: Config, run_dir: Path) -> Path:
    return Path(cfg.teacher.cache_dir) if cfg.teacher.cache_dir else run_dir / "teacher"


def teacher_identity_from_config(cfg: Config) -> dict:
    """The teacher's part of a cache's identity, from the config alone (no weights, no network).

    ``teacher.name`` is compared by the names it can stand for (as given, as an absolute folder path, the
    embedded default's aliases); an empty ``teacher.revision`` matches a cache of any revision of that name
    (the manifest records which). Where the teacher's files are still at hand, :func:`_teacher_files_changed`
    also compares their fingerprint (``kclip.teacher.teacher_identity``).
    """
    t = cfg.teacher
    return {"name": t.name, "revision": t.revision or None, "precision": t.precision, "pooling": t.pooling,
            "max_length": t.max_length, "prompt": t.prompt or None}


def _teacher_names(name: str) -> set[str]:
    """The names a cache manifest may record for the config's ``teacher.name``."""
    from kclip.teacher import DEFAULT_TEACHER

    names = {name, str(Path(name).expanduser()), str(Path(name).expanduser().resolve())}
    if name.lower().replace("_", "-").endswith("all-minilm-l6-v2"):  # the embedded default and its aliases
        names.add(DEFAULT_TEACHER)
    return names


def _teacher_files_changed(manifest, cfg: Config) -> list[str]:
    """For a teacher that is a local folder / GGUF file or an installed package: ``teacher`` id change when its
    files (fingerprint) or package version differ from the cache's. Nothing when the files are gone (training
    from a finished cache needs no weights) or for a Hub id (its cached commit may be evicted)."""
    from kclip.teacher import teacher_identity

    t = cfg.teacher
    try:
        ident = teacher_identity(t.name, t.revision or None, t.precision, t.pooling, t.max_length, t.prompt or None)
    except (FileNotFoundError, ValueError, OSError):
        return []
    if ident.get("source") not in ("folder", "gguf", "package") or ident["teacher"] == manifest.teacher:
        return []
    return [f"teacher files: {manifest.teacher!r} -> {ident['teacher']!r}"]


def _manifest_name(manifest) -> str:
    name = (manifest.teacher_describe or {}).get("name")
    if name:
        return name
    rev = manifest.revision
    return manifest.teacher[: -len(f"@{rev}")] if rev and manifest.teacher.endswith(f"@{rev}") else manifest.teacher


def cache_changes(manifest, cfg: Config, index: PairIndex, split: str) -> list[str]:
    """``key: cached -> config`` for every way the cache differs from what the config asks for."""
    from kclip.cache import captions_sha256

    ident = teacher_identity_from_config(cfg)
    out = []
    cached_name = _manifest_name(manifest)
    if cached_name not in _teacher_names(ident["name"]):
        out.append(f"teacher.name: {cached_name!r} -> {ident['name']!r}")
    if ident["revision"] is not None and manifest.revision != ident["revision"]:
        out.append(f"teacher.revision: {manifest.revision!r} -> {ident['revision']!r}")
    for key in ("precision", "pooling", "max_length", "prompt"):
        if getattr(manifest, key) != ident[key]:
            out.append(f"teacher.{key}: {getattr(manifest, key)!r} -> {ident[key]!r}")
    if not out:
        out += _teacher_files_changed(manifest, cfg)
    caps = captions_sha256(index.captions)
    if manifest.captions_sha256 != caps or manifest.count != len(index.pairs):
        out.append(f"data.{split} captions: {manifest.count} (sha256 {short(manifest.captions_sha256)}) -> "
                   f"{len(index.pairs)} (sha256 {short(caps)})")
    return out


def teach_identity(manifest, split: str) -> dict:
    """A finished cache's identity as downstream stamps record it (the manifest's fields, config-key named)."""
    return {"teacher.name": _manifest_name(manifest), "teacher.revision": manifest.revision,
            "teacher.precision": manifest.precision, "teacher.pooling": manifest.pooling,
            "teacher.max_length": manifest.max_length, "teacher.prompt": manifest.prompt, "teacher.dim": manifest.dim,
            f"data.{split}:captions_sha256": manifest.captions_sha256, f"data.{split}:count": manifest.count}


def open_teacher_cache(cfg: Config, run_dir: Path, name: str, index: PairIndex):
    """The split's finished cache, checked against the config and the captions (no teacher weights needed).

    Raises:
        StaleOutputError: the cache was built with another teacher config or for other captions; the message
            names each key and ``--rebuild teach``.
        kclip.cache.CacheCorruptError: no finished cache there.
    """
    from kclip.cache import Manifest, captions_sha256, open_cache

    out = teacher_cache_dir(cfg, run_dir) / name
    if (out / "manifest.json").is_file():
        changes = cache_changes(Manifest.load(out), cfg, index, name)
        if changes:
            raise StaleOutputError(_stop_message(run_dir, {"teach": changes}, {"teach"}, cfg))
    t = teacher_identity_from_config(cfg)
    # the config-derived fields once more through the cache's own check (which also verifies the shards)
    expect = {k: t[k] for k in ("precision", "pooling", "max_length", "prompt")}
    expect.update(captions_sha256=captions_sha256(index.captions), count=len(index.pairs))
    return open_cache(out, expect=expect)


# ----------------------------------------------------------------------------------------------------------
# Stage context, stamps and decisions
# ----------------------------------------------------------------------------------------------------------

@dataclass
class StageContext:
    """What every stage is called with: the config, the run directory, this process's place, the data
    (split -> PairIndex) and, once the teacher stage is settled, the caches (split -> EmbeddingCache)."""
    cfg: Config
    run_dir: Path
    dist: DistInfo
    splits: dict
    caches: dict = field(default_factory=dict)
    progress: bool = True
    _targets: dict = field(default_factory=dict, repr=False)
    _pairs: dict = field(default_factory=dict, repr=False)

    def targets(self, split: str, shuffled: bool = True) -> TeacherTargets:
        """The split's teacher targets as the method sees them (``loss.target_norm``), built once.

        With ``loss.shuffle_teacher`` the training split's rows are permuted (a fixed permutation seeded by
        ``seed``) here, so k-means, C and L_emb all see the same shuffled rows; ``shuffled=False`` gives the
        true rows (the report's teacher column). Validation rows are never shuffled.
        """
        shuffle = shuffled and split == "train" and self.cfg.loss.shuffle_teacher
        key = (split, shuffle)
        if key not in self._targets:
            cache = self.caches[split]
            rows = shuffle_permutation(len(cache), self.cfg.seed) if shuffle else None
            self._targets[key] = TeacherTargets(cache, self.cfg.loss.target_norm, rows=rows)
        return self._targets[key]

    def pairs_identity(self, split: str) -> dict:
        if split not in self._pairs:
            self._pairs[split] = pairs_identity(self.splits[split], split)
        return self._pairs[split]


@dataclass
class Decision:
    action: str                          # skip | build | resume | rebuild | stop
    reasons: list = field(default_factory=list)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _pick(cfg: Config, keys: tuple, ignored: tuple = ()) -> dict:
    flat = _flat(to_dict(cfg))
    return {k: v for k, v in flat.items()
            if any(k == s or (s.endswith(".") and k.startswith(s)) for s in keys) and k not in ignored}


def _output_digest(stage: str, run_dir: Path) -> dict | None:
    """The digest an upstream stage's stamp recorded for its output (None without a stamp)."""
    stamp = read_stamp(run_dir / STAMPS[stage])
    return stamp.get("output") if stamp else None


def stage_inputs(stage: str, ctx: StageContext) -> tuple[dict, dict]:
    """(inputs, upstream output digests) the stage's stamp must match, from the config, the data and the
    teacher caches' manifests (transitive: train's inputs include the concepts stage's)."""
    cfg, run_dir = ctx.cfg, ctx.run_dir
    inputs = {**teach_identity(ctx.caches["train"].manifest, "train"), **_pick(cfg, CONCEPTS_KEYS)}
    upstream = {}
    if stage in ("train", "eval"):
        inputs.update(_pick(cfg, TRAIN_KEYS, TRAIN_IGNORED))
        inputs.update(ctx.pairs_identity("train"))
        upstream["concepts"] = _output_digest("concepts", run_dir)
    if stage == "eval":
        inputs.update(teach_identity(ctx.caches["val"].manifest, "val"))
        inputs.update(_pick(cfg, EVAL_KEYS))
        inputs.update(ctx.pairs_identity("val"))
        upstream["train"] = _output_digest("train", run_dir)
    for key, value in RECORDED_IF_NOT.items():
        if key in inputs and inputs[key] == value:
            del inputs[key]
    return inputs, upstream


def _state(stage: str, run_dir: Path) -> tuple[bool, bool]:
    """(done, started): the output is finished; (train) checkpoints of an unfinished run exist."""
    from kclip.trainer import TRAIN_DONE

    if stage == "concepts":
        from kclip.concepts import CONCEPTS_FILE
        return (run_dir / "concepts" / CONCEPTS_FILE).is_file(), False
    if stage == "train":
        return (run_dir / TRAIN_DONE).is_file(), (run_dir / "checkpoints" / "latest").is_file()
    return (run_dir / "eval" / "report.json").is_file(), False


def decide(stage: str, ctx: StageContext, explicit: set, pending: set = frozenset()) -> Decision:
    """What to do with one of concepts/train/eval: skip it, build it, resume it, rebuild it, or stop.

    Args:
        explicit: stages the user asked to rebuild (with everything downstream of them).
        pending: stages that will be rebuilt earlier in this run; their output digests are not known yet, so
            they are not compared here (they are when the stage's turn comes).
    """
    done, started = _state(stage, ctx.run_dir)
    if stage in explicit:
        return Decision("rebuild" if done or started else "build", ["--rebuild"])
    if not done and not started:
        return Decision("build")
    stamp = read_stamp(ctx.run_dir / STAMPS[stage])
    if stamp is None:
        reasons = [f"its output has no stamp ({STAMPS[stage]}; made by a kclip that did not record stage inputs)"]
    else:
        inputs, upstream = stage_inputs(stage, ctx)
        reasons = input_changes(stamp, inputs)
        reasons += upstream_changes(stamp, {k: v for k, v in upstream.items() if k not in pending})
    if not reasons:
        return Decision("skip" if done else "resume")
    return Decision("rebuild" if REBUILD_POLICY[stage] == "auto" else "stop", reasons)


def rebuild_names(rebuild, stages=STAGES) -> set:
    """The stage names of ``--rebuild`` (comma lists; ``all`` = every stage of ``stages``).

    Raises:
        ValueError: an unknown name.
    """
    names = set()
    for item in rebuild or ():
        for name in str(item).split(","):
            name = name.strip()
            if name == "all":
                names |= set(stages)
            elif name:
                if name not in STAGES:
                    raise ValueError(f"--rebuild {name!r}: stages are {', '.join(STAGES)} (or all)")
                names.add(name)
    return names


def _downstream(names: set) -> set:
    """``names`` with every stage that depends on one of them (their inputs change with them)."""
    return set(names) | {s for s in STAGES if any(n in DEPENDS[s] for n in names)}


def _stop_message(run_dir: Path, stale: dict, stops: set, cfg: Config) -> str:
    """The message of a stop: what changed per stage, why kclip does not rebuild it unasked, the flag that does."""
    lines = [f"stopped before changing anything in {run_dir}: the output of a stage that is expensive to redo "
             f"was made from other inputs."]
    for stage, reasons in stale.items():
        where = (teacher_cache_dir(cfg, run_dir) if stage == "teach" else run_dir / STAMPS[stage])
        lines.append(f"  {stage} ({where}){'' if stage in stops else ' [rebuilt automatically]'}:")
        lines += [f"    {r}" for r in reasons]
    flag = ",".join(s for s in STAGES if s in stops)
    after = [s for s in STAGES if any(x in DEPENDS[s] for x in stops) and s not in stops]
    cost = "; ".join(COST[s] for s in STAGES if s in stops)
    lines.append(f"Rebuilding means {cost}, so kclip does not discard it by itself. To rebuild, rerun with "
                 f"--rebuild {flag}" + (f" ({', '.join(after)} then rebuilt too)" if after else "") +
                 "; or restore the old value(s); or use another run_dir" +
                 (" / teacher.cache_dir" if "teach" in stops else "") + ".")
    return "\n".join(lines)


def _clear(stage: str, ctx: StageContext) -> None:
    """Remove a stage's output before rebuilding it (rank 0; logged)."""
    from kclip.trainer import STUDENT_FILE, TRAIN_DONE

    run_dir = ctx.run_dir
    paths = {"teach": [teacher_cache_dir(ctx.cfg, run_dir) / s for s in ctx.splits],
             "concepts": [run_dir / "concepts"],
             "train": [run_dir / p for p in ("checkpoints", "tensorboard", STUDENT_FILE, TRAIN_DONE, "metrics.jsonl",
                                             STAMPS["train"])],
             "eval": [run_dir / "eval"]}[stage]
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    _log(ctx.dist, f"{stage}: removed the old output ({', '.join(str(p) for p in paths)})")


def _decided(ctx: StageContext, fn, *args):
    """Run a decision on rank 0 and give every rank its result (or its error)."""
    result, error = None, None
    if ctx.dist.is_main:
        try:
            result = fn(*args)
        except Exception as exc:  # re-raised on every rank
            error = exc
    result, error = broadcast_object((result, None if error is None else (type(error), str(error))))
    if error is not None:
        kind, msg = error
        raise (kind(msg) if issubclass(kind, (StaleOutputError, ValueError, FileNotFoundError)) else RuntimeError(msg))
    return result


# ----------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------

def _teacher_kwargs(cfg: Config) -> dict:
    t = cfg.teacher
    return dict(precision=t.precision, pooling=t.pooling, max_length=t.max_length, prompt=t.prompt or None,
                revision=t.revision or None, trust_remote_code=t.trust_remote_code, token_budget=t.token_budget)


def _load_teacher(cfg: Config, device):
    """The teacher of ``teacher.name``: the synthetic set's oracle (:mod:`kclip.oracle`), the hashed n-gram
    control (:mod:`kclip.control_teacher`), or a model."""
    from kclip.control_teacher import is_control, load_control
    from kclip.oracle import is_oracle, load_oracle
    from kclip.teacher import load_teacher

    if is_control(cfg.teacher.name):
        return load_control(cfg.teacher.name, device=device, **_teacher_kwargs(cfg))
    if is_oracle(cfg.teacher.name):
        if cfg.data.source != "synthetic":
            raise ValueError(f"teacher.name {cfg.teacher.name!r} encodes the attributes of the built-in synthetic "
                             f"set's captions; data.source is {cfg.data.source!r}: use a model teacher")
        return load_oracle(cfg.teacher.name, device=device, **_teacher_kwargs(cfg))
    return load_teacher(cfg.teacher.name, device=device, **_teacher_kwargs(cfg))


def plan_teach(ctx: StageContext, requested: bool, explicit: set) -> dict:
    """split -> Decision for the teacher caches (their manifests are their stamps)."""
    from kclip.cache import Manifest, cache_is_complete

    out = {}
    for split, index in ctx.splits.items():
        folder = teacher_cache_dir(ctx.cfg, ctx.run_dir) / split
        exists = folder.is_dir() and any(folder.iterdir())
        if requested and "teach" in explicit:
            out[split] = Decision("rebuild" if exists else "build", ["--rebuild"])
        elif cache_is_complete(folder):
            changes = cache_changes(Manifest.load(folder), ctx.cfg, index, split)
            out[split] = Decision("stop", changes) if changes else Decision("skip")
        else:
            out[split] = Decision("resume" if exists else "build")
    return out


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


def _stamp(stage: str, ctx: StageContext, output: dict | None, complete: bool = True) -> None:
    if ctx.dist.is_main:
        inputs, upstream = stage_inputs(stage, ctx)
        write_stamp(ctx.run_dir / STAMPS[stage],
                    make_stamp(stage, inputs, upstream, to_dict(ctx.cfg), __version__, output, complete))


def stage_concepts(ctx: StageContext) -> None:
    """k-means over the training captions' teacher targets, the frozen classifier C, plots (rank 0)."""
    from kclip.concepts import CONCEPTS_FILE, run_concepts
    from kclip.eval.run_encoders import student_text_embeddings

    cfg, dist = ctx.cfg, ctx.dist
    out = ctx.run_dir / "concepts"
    if dist.is_main:
        c = cfg.concepts
        student = student_text_embeddings(cfg.model.name, cfg.model.pretrained, ctx.splits["train"].captions,
                                          cfg.seed, dist.device, cfg.eval.batch_size)
        report = run_concepts(ctx.targets("train"), out, student_text_embeddings=student, k=c.k,
                              backend=c.backend, seed=cfg.seed, max_iter=c.max_iter, tol=c.tol,
                              classifier_epochs=c.classifier_epochs, classifier_lr=c.classifier_lr,
                              soft_labels=c.soft_labels, temperature=c.temperature, progress=ctx.progress,
                              classifier_standardize=False)
        acc = report.get("classifier", {}).get("val_acc")
        _log(dist, f"concepts: k={c.k} ({report.get('backend')}), inertia {report.get('inertia'):.4g}, "
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

def _plan(ctx: StageContext, stages: tuple, explicit: set) -> dict:
    """stage -> Decision for the requested stages after teach, decided before anything is changed.

    A stage that was not requested but that a requested stage reads must be current (else an error says
    which stage to run). Raises StaleOutputError when an expensive stage would have to be discarded unasked.
    """
    plan, pending = {}, set()
    for stage in ("concepts", "train", "eval"):
        if stage in stages:
            if stage == "eval" and "val" not in ctx.splits:
                plan[stage] = Decision("skip", ["no validation split (data.val)"])
                continue
            d = decide(stage, ctx, explicit, pending)
            plan[stage] = d
            if d.action in ("build", "rebuild"):
                pending.add(stage)
        elif any(stage in DEPENDS[s] for s in stages if s != stage) and stage != "teach":
            users = [s for s in stages if stage in DEPENDS[s]]
            d = decide(stage, ctx, set(), pending)
            if d.action in ("build", "resume"):
                raise MissingInputError(f"{'/'.join(users)} needs the {stage} output in {ctx.run_dir}, which is "
                                        f"{'missing' if d.action == 'build' else 'not finished'}. Run `kclip {stage}` "
                                        f"(or `kclip run`) first.")
            if d.action != "skip":
                raise StaleOutputError(f"{'/'.join(users)} needs the {stage} output in {ctx.run_dir}, which was made "
                                       f"from other inputs: {'; '.join(d.reasons)}. Run `kclip {stage}` (or "
                                       f"`kclip run`) first.")
    stops = {s for s, d in plan.items() if d.action == "stop"}
    if stops:
        stale = {s: d.reasons for s, d in plan.items()
                 if d.action in ("stop", "rebuild") and d.reasons != ["--rebuild"]}
        raise StaleOutputError(_stop_message(ctx.run_dir, stale, stops, ctx.cfg))
    return plan


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
