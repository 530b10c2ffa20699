"""The Knowledge-CLIP pipeline: data -> teach -> concepts -> train -> eval, each stage skipped when its
output is already in the run directory and resumable when it was interrupted.

Layout of a run directory::

    config.yaml            the resolved config of the latest invocation
    data/                  the synthetic dataset (data.source: synthetic)
    data_index/            verified pair indexes (train.json, val.json)
    teacher/train, /val    embedding caches (sharded fp16 + manifest; teacher.cache_dir moves them)
    concepts/              labels, centroids, classifier C, report, plots
    checkpoints/           DeepSpeed checkpoints; metrics.jsonl, tensorboard/
    student.safetensors    the exported open_clip student; train_done.json
    eval/                  report.json, report.md, plots

Under the DeepSpeed launcher every rank runs this: the teacher cache is split across ranks, k-means and
evaluation run on rank 0 behind barriers, training is data parallel.
"""
from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from kclip.config import Config, to_yaml
from kclip.data import PairIndex, build_index
from kclip.distributed import DistInfo, barrier, broadcast_object, setup
from kclip.targets import TeacherTargets

STAGES = ("teach", "concepts", "train", "eval")


def _log(dist: DistInfo, msg: str) -> None:
    if dist.is_main:
        print(f"[kclip] {msg}", flush=True)


def data_paths(cfg: Config, run_dir: Path) -> tuple[str, str, str]:
    """(source kind for the indexer, train spec, val spec); synthetic data is generated first if needed."""
    if cfg.data.source == "synthetic":
        d = run_dir / "data"
        return "csv", str(d / "train.csv"), str(d / "val.csv")
    return cfg.data.source, cfg.data.train, cfg.data.val


def prepare_data(cfg: Config, run_dir: Path, dist: DistInfo, progress: bool = True) -> tuple[PairIndex, PairIndex | None]:
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
                         s.heldout_combos, s.seed, progress=progress)
            index(train_spec, "train")
            if val_spec:
                index(val_spec, "val")
        except Exception as exc:  # re-raised on every rank so none waits at the barrier forever
            error = exc
    error = broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise RuntimeError(f"data preparation failed on rank 0: {error}")
    barrier()
    train_index = index(train_spec, "train")
    val_index = index(val_spec, "val") if val_spec else None
    _log(dist, f"data: train {train_index.report()}" + (f"; val {val_index.report()}" if val_index else ""))
    return train_index, val_index


def _teacher_kwargs(cfg: Config) -> dict:
    t = cfg.teacher
    return dict(precision=t.precision, pooling=t.pooling, max_length=t.max_length, prompt=t.prompt or None,
                revision=t.revision or None, trust_remote_code=t.trust_remote_code, token_budget=t.token_budget)


def teacher_cache_dir(cfg: Config, run_dir: Path) -> Path:
    return Path(cfg.teacher.cache_dir) if cfg.teacher.cache_dir else run_dir / "teacher"


def stage_teach(cfg: Config, run_dir: Path, dist: DistInfo, splits: dict, progress: bool = True) -> None:
    """Embed every caption of every split once with the teacher (shards split across ranks)."""
    from kclip.cache import build_cache, cache_is_complete, captions_sha256, open_cache
    from kclip.teacher import load_teacher

    todo = {}
    for name, index in splits.items():
        out = teacher_cache_dir(cfg, run_dir) / name
        if cache_is_complete(out):
            # a finished cache must still match this data; the teacher fields are checked when it is opened
            open_cache(out, expect={"captions_sha256": captions_sha256(index.captions), "count": len(index.pairs)})
            continue
        todo[name] = (index, out)
    if not todo:
        _log(dist, "teach: cache complete, skipped")
        return
    t0 = time.perf_counter()
    teacher = load_teacher(cfg.teacher.name, device=dist.device, **_teacher_kwargs(cfg))
    for name, (index, out) in todo.items():
        build_cache(teacher, index.captions, out, shard_size=cfg.teacher.shard_size,
                    uids=[p.uid for p in index.pairs], rank=dist.rank, world_size=dist.world_size,
                    progress=progress and dist.is_main)
    del teacher
    gc.collect()
    barrier()
    _log(dist, f"teach: embedded {sum(len(i.pairs) for i, _ in todo.values())} captions in "
               f"{time.perf_counter() - t0:.1f}s")


def open_teacher_cache(cfg: Config, run_dir: Path, name: str, index: PairIndex):
    """The split's cache, refused when it was made by another teacher config or for other captions."""
    from kclip.cache import captions_sha256, open_cache

    from kclip.teacher import teacher_identity

    t = cfg.teacher
    ident = teacher_identity(t.name, t.revision or None, t.precision, t.pooling, t.max_length, t.prompt or None)
    expect = {k: ident[k] for k in ("teacher", "revision", "precision", "pooling", "max_length", "prompt")}
    expect.update(captions_sha256=captions_sha256(index.captions), count=len(index.pairs))
    cache = open_cache(teacher_cache_dir(cfg, run_dir) / name, expect=expect)
    return cache


STUDENT_SAMPLE = 50_000


def _student_text_embeddings(cfg: Config, index: PairIndex, dist: DistInfo) -> torch.Tensor:
    """The untrained student's text embeddings of (a seeded sample of at most 50k) training captions: the
    paper's Figure 4 compares their cluster sizes with the teacher's."""
    from kclip.model import ClipEncoders, build_clip

    captions = index.captions
    if len(captions) > STUDENT_SAMPLE:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(len(captions), STUDENT_SAMPLE, replace=False))
        captions = [captions[i] for i in keep]
    clip, _, preprocess, tokenizer = build_clip(cfg.model.name, cfg.model.pretrained, seed=cfg.seed)
    return ClipEncoders("student", clip, preprocess, tokenizer, dist.device, cfg.eval.batch_size).encode_texts(captions)


def stage_concepts(cfg: Config, run_dir: Path, dist: DistInfo, cache, index: PairIndex, progress: bool = True) -> None:
    from kclip.concepts import run_concepts

    out = run_dir / "concepts"
    if (out / "concepts.safetensors").is_file():
        _log(dist, "concepts: found, skipped")
        return
    if dist.is_main:
        c = cfg.concepts
        student = _student_text_embeddings(cfg, index, dist)
        report = run_concepts(TeacherTargets(cache, cfg.loss.target_norm), out, student_text_embeddings=student, k=c.k,
                              backend=c.backend, seed=cfg.seed, max_iter=c.max_iter, tol=c.tol,
                              classifier_epochs=c.classifier_epochs, classifier_lr=c.classifier_lr,
                              soft_labels=c.soft_labels, temperature=c.temperature, progress=progress,
                              classifier_standardize=False)
        acc = report.get("classifier", {}).get("val_acc")
        _log(dist, f"concepts: k={c.k} ({report.get('backend')}), inertia {report.get('inertia'):.4g}, "
                   f"classifier held-out accuracy {acc if acc is None else f'{acc:.3f}'}")
    barrier()


def stage_train(cfg: Config, run_dir: Path, dist: DistInfo, index: PairIndex, cache, resume: bool = True,
                progress: bool = True, stop_after: int = 0) -> dict | None:
    from kclip.concepts import load_concepts
    from kclip.trainer import TRAIN_DONE, TrainInputs, train

    if (run_dir / TRAIN_DONE).is_file():
        _log(dist, "train: done, skipped")
        return None
    concepts = load_concepts(run_dir / "concepts")
    inputs = TrainInputs(index=index, teacher=TeacherTargets(cache, cfg.loss.target_norm), labels=concepts["labels"].long(),
                         classifier_weight=concepts["classifier.weight"], classifier_bias=concepts["classifier.bias"])
    return train(cfg, run_dir, inputs, dist, resume=resume, progress=progress, stop_after=stop_after)


class CachedTeacherTexts:
    """The teacher as an ``encode_texts`` encoder over its cached caption embeddings (no model loaded)."""

    def __init__(self, name: str, caches_and_indexes: list):
        self.name = name
        self._rows = {}
        for cache, index in caches_and_indexes:
            for i, caption in enumerate(index.captions):
                self._rows.setdefault(caption, (cache, i))

    def encode_texts(self, texts) -> torch.Tensor:
        missing = [t for t in texts if t not in self._rows]
        if missing:
            raise KeyError(f"teacher embedding not cached for {len(missing)} texts (e.g. {missing[0]!r})")
        groups: dict = {}                                  # one gather per cache, not one read per caption
        for j, t in enumerate(texts):
            cache, i = self._rows[t]
            positions, rows = groups.setdefault(id(cache), (cache, [], []))[1:]
            positions.append(j)
            rows.append(i)
        out = None
        for cache, positions, rows in groups.values():
            if out is None:
                out = np.empty((len(texts), cache.dim), dtype=np.float32)    # (n, d')
            out[positions] = cache.get(rows)
        if out is None:
            return torch.empty(0, 0)
        return torch.nn.functional.normalize(torch.from_numpy(out), dim=-1)


def stage_eval(cfg: Config, run_dir: Path, dist: DistInfo, splits: dict, caches: dict, progress: bool = True) -> dict | None:
    """Before/after evaluation on the held-out split (rank 0); prints the table, returns the report."""
    from kclip.eval.report import format_table
    from kclip.eval.run import run_eval
    from kclip.model import ClipEncoders, build_clip
    from kclip.trainer import STUDENT_FILE

    out = run_dir / "eval"
    report = None
    if (out / "report.json").is_file():
        _log(dist, "eval: found, skipped")
        report = json.loads((out / "report.json").read_text())
    elif dist.is_main:
        if cfg.data.source != "synthetic":
            _log(dist, "eval: the built-in evaluations need the synthetic layout (val.csv + meta.json); "
                       "use `kclip eval` with --cub/--awa2 for real benchmarks")
        before = build_clip(cfg.model.name, cfg.model.pretrained, seed=cfg.seed)
        after = build_clip(cfg.model.name, str(run_dir / STUDENT_FILE))
        models = {
            "before": ClipEncoders("before", before[0], before[2], before[3], dist.device, cfg.eval.batch_size),
            "after": ClipEncoders("after", after[0], after[2], after[3], dist.device, cfg.eval.batch_size),
        }
        teacher = CachedTeacherTexts(f"teacher:{cfg.teacher.name}", [(caches[k], splits[k]) for k in splits])
        from kclip.concepts import load_concepts
        labels = load_concepts(run_dir / "concepts")["labels"].numpy()
        report = run_eval(models, run_dir / "data", out, teacher=teacher, concept_labels=labels,
                          batch_size=cfg.eval.batch_size, seed=cfg.seed, progress=progress,
                          concept_k=cfg.concepts.k, cub_root=cfg.eval.cub_root or None,
                          awa2_root=cfg.eval.awa2_root or None, text_em_steps=cfg.eval.text_em_steps)
    barrier()
    if dist.is_main and report is not None:
        print(format_table(report), flush=True)
    return report


def run(cfg: Config, stages: tuple = STAGES, resume: bool = True, progress: bool = True, stop_after: int = 0) -> dict:
    """Run the requested stages whose output is missing, in order; return {"eval": report, ...}."""
    dist = setup()
    run_dir = Path(cfg.run_dir)
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)}")
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / "config.yaml.tmp"
        tmp.write_text(to_yaml(cfg))
        os.replace(tmp, run_dir / "config.yaml")
    barrier()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    train_index, val_index = prepare_data(cfg, run_dir, dist, progress)
    splits = {"train": train_index, **({"val": val_index} if val_index is not None else {})}
    result: dict = {"run_dir": str(run_dir)}
    if "teach" in stages:
        stage_teach(cfg, run_dir, dist, splits, progress)
    needs_cache = {"concepts", "train", "eval"} & set(stages)
    caches = {k: open_teacher_cache(cfg, run_dir, k, v) for k, v in splits.items()} if needs_cache else {}
    if "concepts" in stages:
        stage_concepts(cfg, run_dir, dist, caches["train"], train_index, progress)
    if "train" in stages:
        result["train"] = stage_train(cfg, run_dir, dist, train_index, caches["train"], resume, progress, stop_after)
        if result["train"] and result["train"].get("stopped_early"):
            return result
    if "eval" in stages:
        if val_index is None:
            _log(dist, "eval: no validation split (data.val), skipped")
        else:
            result["eval"] = stage_eval(cfg, run_dir, dist, splits, caches, progress)
    return result
