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

Where it lives: :mod:`~kclip.pipeline.plan` (the stages, stamps and decisions), :mod:`~kclip.pipeline.keys`
(the config keys each stage reads, from the config sections), :mod:`~kclip.pipeline.teacher_cache` (the
teacher cache's location and identity as the pipeline checks it) and :mod:`~kclip.pipeline.stages` (data
preparation, the stages' bodies and :func:`run`).
"""
from kclip.pipeline.keys import config_inputs, recorded_if_not, stage_keys
from kclip.pipeline.plan import (COST, DEPENDS, REBUILD_POLICY, STAGES, STAMPS, Decision, MissingInputError,
                                 StageContext, StaleOutputError, decide, pairs_identity, plan_teach, rebuild_names,
                                 stage_inputs)
from kclip.pipeline.stages import (CONFIG_FILE, RUNS_LOG, data_paths, open_teacher_cache, prepare_data, run,
                                   stage_concepts, stage_eval, stage_teach, stage_train)
from kclip.pipeline.teacher_cache import cache_changes, teach_identity, teacher_cache_dir, teacher_identity_from_config

__all__ = ["CONFIG_FILE", "COST", "DEPENDS", "REBUILD_POLICY", "RUNS_LOG", "STAGES", "STAMPS", "Decision",
           "MissingInputError", "StageContext", "StaleOutputError", "cache_changes", "config_inputs", "data_paths",
           "decide", "open_teacher_cache", "pairs_identity", "plan_teach", "prepare_data", "rebuild_names",
           "recorded_if_not", "run", "stage_concepts", "stage_eval", "stage_inputs", "stage_keys", "stage_teach",
           "stage_train", "teach_identity", "teacher_cache_dir", "teacher_identity_from_config"]
