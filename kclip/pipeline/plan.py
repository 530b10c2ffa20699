"""The plan: the stages, what each one's output was made from (its stamp), and what to do with each stage
(skip, build, resume, rebuild, stop), decided before anything is changed.

A stage's stamp inputs are the config keys it reads (:mod:`kclip.pipeline.keys`, transitive), the identity
of the teacher cache (:mod:`kclip.pipeline.teacher_cache`) and of the data (:func:`pairs_identity`); its
upstream digests are those its upstream stages' stamps recorded for their outputs.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from kclip import __version__
from kclip.config import Config, to_dict
from kclip.data import PairIndex
from kclip.distributed import DistInfo, broadcast_object
from kclip.errors import UserError
from kclip.pipeline.keys import config_inputs
from kclip.pipeline.teacher_cache import cache_changes, teach_identity, teacher_cache_dir
from kclip.stamps import input_changes, make_stamp, read_stamp, upstream_changes, write_stamp
from kclip.targets import TeacherTargets, shuffle_permutation

STAGES = ("teach", "concepts", "train", "eval")
DEPENDS = {"teach": (), "concepts": ("teach",), "train": ("teach", "concepts"), "eval": ("teach", "concepts", "train")}
# What kclip does when a finished stage's inputs changed: "auto" rebuilds it, "ask" stops and names --rebuild.
REBUILD_POLICY = {"teach": "ask", "concepts": "auto", "train": "ask", "eval": "auto"}
COST = {"teach": "embedding every caption with the teacher again", "train": "training again"}
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


# ----------------------------------------------------------------------------------------------------------
# Stamps
# ----------------------------------------------------------------------------------------------------------

def _output_digest(stage: str, run_dir: Path) -> dict | None:
    """The digest an upstream stage's stamp recorded for its output (None without a stamp)."""
    stamp = read_stamp(run_dir / STAMPS[stage])
    return stamp.get("output") if stamp else None


def stage_inputs(stage: str, ctx: StageContext) -> tuple[dict, dict]:
    """(inputs, upstream output digests) the stage's stamp must match, from the config, the data and the
    teacher caches' manifests (transitive: train's inputs include the concepts stage's)."""
    inputs = {**teach_identity(ctx.caches["train"].manifest, "train"), **config_inputs(ctx.cfg, stage)}
    upstream = {}
    if stage in ("train", "eval"):
        inputs.update(ctx.pairs_identity("train"))
        upstream["concepts"] = _output_digest("concepts", ctx.run_dir)
    if stage == "eval":
        inputs.update(teach_identity(ctx.caches["val"].manifest, "val"))
        inputs.update(ctx.pairs_identity("val"))
        upstream["train"] = _output_digest("train", ctx.run_dir)
    return inputs, upstream


def _stamp(stage: str, ctx: StageContext, output: dict | None, complete: bool = True) -> None:
    if ctx.dist.is_main:
        inputs, upstream = stage_inputs(stage, ctx)
        write_stamp(ctx.run_dir / STAMPS[stage],
                    make_stamp(stage, inputs, upstream, to_dict(ctx.cfg), __version__, output, complete))


# ----------------------------------------------------------------------------------------------------------
# Decisions
# ----------------------------------------------------------------------------------------------------------

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
