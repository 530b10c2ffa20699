"""The train stage: a DeepSpeed engine over the Knowledge-CLIP student, from cached teacher embeddings.

Only the student's trainable parameters (CLIP towers, logit scale, W_e) reach the optimizer; C is frozen.
Checkpoints are DeepSpeed's (module, optimizer, scheduler), with client state holding the step, the data
position (epoch, micro-batch in epoch) and the config; ``resume`` continues from the latest one and replays
the data order exactly (the order is a function of seed and epoch; augmentation is seeded per sample). At
the end the student is exported as a safetensors state dict that ``open_clip.create_model(name,
pretrained=path)`` loads.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kclip.atomic import atomic_write_json
from kclip.config import Config, deepspeed_config, to_dict
from kclip.data import PairDataset, PairIndex, pair_loader, rank_batches
from kclip.distributed import DistInfo, all_reduce_mean, barrier
from kclip.losses import KnowledgeClipLoss
from kclip.model import KnowledgeClip, build_clip, export_student

TRAIN_DONE = "train_done.json"
STUDENT_FILE = "student.safetensors"


@dataclass
class TrainInputs:
    index: PairIndex                 # training pairs, in cache row order
    teacher: object                  # TeacherTargets: batch(indices) -> (n, d') fp16 normalised targets; .dim
    labels: torch.Tensor             # (N,) int64 concept labels
    classifier_weight: torch.Tensor  # (K, d')
    classifier_bias: torch.Tensor    # (K,)
    heldout_captions: list | None = None   # captions never trained on (the val split), for the per-epoch R^2
    heldout_teacher: object = None         # their TeacherTargets (same normalisation as ``teacher``)


def _param_groups(model: KnowledgeClip, cfg: Config) -> list[dict]:
    """AdamW groups: no weight decay on gains, biases, embeddings and the logit scale; W_e (the head) its own lr."""
    decay, no_decay, head = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("head."):
            head.append(p)
        elif p.ndim < 2 or "logit_scale" in name or "embedding" in name or "token_embedding" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    t = cfg.train
    return [{"params": decay, "weight_decay": t.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
            {"params": head, "weight_decay": 0.0, "lr": t.projector_lr or t.lr}]


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def steps_per_epoch(n: int, cfg: Config, world_size: int) -> int:
    micro = n // (cfg.train.batch_size * world_size)
    return micro // cfg.train.grad_accum_steps


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    """The Knowledge-CLIP training step over a DeepSpeed engine: one method, :meth:`train_step`, that the
    training loop (:func:`train`), the benchmarks and the tests all call.

    Args:
        cfg: the run config (``train.*`` for the optimizer, schedule, ZeRO stage and precision; ``loss.*``).
        model: the student (:class:`kclip.model.KnowledgeClip`, concept classifier loaded).
        dist: this rank's :class:`DistInfo`.
        total_steps: optimizer steps of the schedule (warm-up + cosine).
        normalize: finishes uint8 images on the device (:class:`kclip.data.DeviceNormalize`), or None when
            batches already hold float images.
    """

    def __init__(self, cfg: Config, model: KnowledgeClip, dist: DistInfo, total_steps: int, normalize=None):
        import deepspeed

        t = cfg.train
        self.cfg, self.model, self.dist, self.normalize = cfg, model, dist, normalize
        self.total_steps = total_steps
        self.dtype = DTYPES[t.precision]
        self.optimizer = torch.optim.AdamW(_param_groups(model, cfg), lr=t.lr, betas=(0.9, 0.98), eps=1e-6,
                                           **({"fused": True} if dist.device.type == "cuda" else {}))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(t.warmup_steps, total_steps))
        self.loss_fn = KnowledgeClipLoss(cfg.loss.alpha, cfg.loss.beta, cfg.loss.gamma, cfg.loss.contrastive_impl,
                                         world_size=dist.world_size)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer,
                                                    lr_scheduler=self.scheduler,
                                                    config=deepspeed_config(cfg, dist.world_size))
        if t.compile:
            self.engine.compile()

    def _device_batch(self, batch: dict) -> tuple:
        dev = self.dist.device
        images = batch["image"].to(dev, non_blocking=True)                  # (B, 3, H, W) uint8 or float
        images = self.normalize(images, self.dtype) if self.normalize is not None else images.to(self.dtype)
        tokens = batch["tokens"].to(dev, non_blocking=True)                 # (B, L)
        loss = self.cfg.loss
        teacher = batch["teacher"].to(dev, non_blocking=True) if loss.alpha > 0 else None   # (B, d') fp16
        concept = batch["concept"].to(dev, non_blocking=True) if loss.beta > 0 else None    # (B,)
        return images, tokens, teacher, concept

    def train_step(self, batch: dict) -> dict:
        """Forward, loss, backward and (at an accumulation boundary) the optimizer step for one micro-batch.

        Args:
            batch: ``image`` (B, 3, H, W) uint8 (with ``normalize``) or float, ``tokens`` (B, L) int64,
                ``teacher`` (B, d') fp16 targets (when alpha > 0), ``concept`` (B,) int64 (when beta > 0),
                on any device (moved here without blocking).
        Returns:
            {"loss", the loss terms, "logit_scale"}: detached 0-d device tensors. Nothing here waits for
            the device: read them (``.item()``) only when logging.
        """
        out = self.engine(*self._device_batch(batch))
        loss, terms = self.loss_fn(out)
        self.engine.backward(loss)
        self.engine.step()
        return {"loss": loss.detach(), **terms, "logit_scale": out["logit_scale"].detach()}

    @torch.no_grad()
    def distill_r2(self, tokens: torch.Tensor, targets: torch.Tensor, batch_size: int = 256) -> float:
        """R^2 = 1 - SSE/SST of W_e(E_T(x)) against the teacher targets on held-out captions: the share of the
        teacher's variance the student's projected text embedding explains (0: no better than predicting the
        mean teacher vector). Every rank runs the same batches (ZeRO-3 gathers parameters collectively).

        Shapes: tokens (M, L), targets (M, d') -> float.
        """
        dev = self.dist.device
        targets32 = targets.to(dev, torch.float32)                           # (M, d')
        sst = float(((targets32 - targets32.mean(0)) ** 2).sum())
        sse = torch.zeros((), device=dev, dtype=torch.float64)
        was_training = self.engine.training
        self.engine.eval()
        try:
            for i in range(0, tokens.shape[0], batch_size):
                tok = tokens[i:i + batch_size].to(dev)
                tgt = targets[i:i + batch_size].to(dev)
                out = self.engine(None, tok, tgt, None)
                sse += out["distill"].double() * tok.shape[0]                 # batchmean -> sum over rows
        finally:
            self.engine.train(was_training)
        return 1.0 - float(sse) / max(sst, 1e-12)

    def save_checkpoint(self, ckpt_dir: Path, step: int, position: tuple, keep: int) -> None:
        epoch, batch_in_epoch = position
        client = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                  "world_size": self.dist.world_size, "batch_size": self.cfg.train.batch_size,
                  "config": to_dict(self.cfg)}
        self.engine.save_checkpoint(str(ckpt_dir), tag=f"step_{step:08d}", client_state=client)
        barrier()
        if self.dist.is_main:  # keep the newest few
            tags = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())
            for old in tags[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()

    def load_checkpoint(self, ckpt_dir: Path) -> tuple[int, int, int]:
        """(step, epoch, micro-batch in epoch) of the latest checkpoint in ``ckpt_dir``."""
        _, client = self.engine.load_checkpoint(str(ckpt_dir))
        t = self.cfg.train
        if client.get("world_size") != self.dist.world_size or client.get("batch_size") != t.batch_size:
            raise ValueError(f"checkpoint in {ckpt_dir} was made with {client.get('world_size')} ranks x batch "
                             f"{client.get('batch_size')}; this run has {self.dist.world_size} x {t.batch_size}. "
                             "Resume with the same layout, or start a new run_dir.")
        return client["step"], client["epoch"], client["batch_in_epoch"]

    def export(self, path: Path) -> None:
        """Write the student's open_clip weights (gathered from ZeRO-3 partitions when needed)."""
        clip = self.engine.module.clip
        if self.cfg.train.zero_stage == 3:
            import deepspeed
            with deepspeed.zero.GatheredParameters(list(clip.parameters()), modifier_rank=None):
                if self.dist.is_main:
                    export_student(_fp32(clip), path)
        elif self.dist.is_main:
            export_student(_fp32(clip), path)
        barrier()


def build_student(cfg: Config, teacher_dim: int, classifier_weight: torch.Tensor, classifier_bias: torch.Tensor):
    """(KnowledgeClip with C loaded, train transform, tokenizer) as the train stage builds it."""
    clip, preprocess_train, _, tokenizer = build_clip(cfg.model.name, cfg.model.pretrained, seed=cfg.seed)
    if cfg.model.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    torch.manual_seed(cfg.seed + 1)
    model = KnowledgeClip(clip, teacher_dim, int(classifier_weight.shape[0]), cfg.loss.concept_path,
                          cfg.loss.distill_impl)
    model.load_concept_classifier(classifier_weight, classifier_bias)
    return model, preprocess_train, tokenizer


def _heldout(inputs: TrainInputs, tokenizer, limit: int):
    """(tokens (M, L), targets (M, d') fp16) of at most ``limit`` held-out captions, or None."""
    if not limit or not inputs.heldout_captions or inputs.heldout_teacher is None:
        return None
    m = min(limit, len(inputs.heldout_captions))
    rows = np.arange(m)
    return tokenizer(list(inputs.heldout_captions[:m])), torch.from_numpy(inputs.heldout_teacher.batch(rows))


R2_WARN = 0.1  # below this held-out R^2 the projection does not fit the teacher: say so


def train(cfg: Config, run_dir: Path, inputs: TrainInputs, dist: DistInfo, resume: bool = True,
          progress: bool = True, stop_after: int = 0) -> dict:
    """Train (or resume) the student; return a summary. ``stop_after`` > 0 stops (checkpointed) after that step."""
    from tqdm.auto import tqdm

    t = cfg.train
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    n = len(inputs.index.pairs)
    per_epoch = steps_per_epoch(n, cfg, dist.world_size)
    if per_epoch == 0:
        raise ValueError(f"{n} training pairs make no full global batch of train.batch_size={t.batch_size} x "
                         f"{dist.world_size} ranks x grad_accum_steps={t.grad_accum_steps}: lower train.batch_size")
    total_steps = t.max_steps or per_epoch * t.epochs
    model, preprocess_train, tokenizer = build_student(cfg, inputs.teacher.dim, inputs.classifier_weight,
                                                       inputs.classifier_bias)
    dataset = PairDataset(inputs.index, preprocess_train, tokenizer, inputs.teacher, inputs.labels, seed=cfg.seed)
    trainer = Trainer(cfg, model, dist, total_steps, normalize=dataset.normalize)
    heldout = _heldout(inputs, tokenizer, t.r2_captions) if cfg.loss.alpha > 0 else None

    step, epoch, batch_in_epoch = 0, 0, 0
    if resume and (ckpt_dir / "latest").is_file():
        step, epoch, batch_in_epoch = trainer.load_checkpoint(ckpt_dir)
        if dist.is_main:
            print(f"[kclip] resumed from {ckpt_dir} at step {step} (epoch {epoch}, micro-batch {batch_in_epoch})")

    metrics = _Metrics(run_dir, dist)
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not (progress and dist.is_main),
               dynamic_ncols=True)
    accum = t.grad_accum_steps
    window_t0, window_samples = time.perf_counter(), 0
    stopped = False
    r2 = None
    # One loader for the whole run: workers persist across epochs. Each sample index carries its epoch
    # (epoch * N + row), which seeds its augmentation, so workers need no per-epoch state.
    sampler = _ResumableBatches(n, t.batch_size, cfg.seed, dist, per_epoch * accum, epoch, batch_in_epoch)
    loader = pair_loader(dataset, sampler, cfg.data.num_workers, pin_memory=dist.device.type == "cuda",
                         persistent_workers=True)
    for micro in loader if step < total_steps else ():
        out = trainer.train_step(micro)
        batch_in_epoch += 1
        window_samples += micro["image"].shape[0] * dist.world_size
        if batch_in_epoch % accum:
            continue
        step += 1
        bar.update(1)
        if step % t.log_every == 0 or step == total_steps or step == stop_after:
            elapsed = time.perf_counter() - window_t0
            record = {"step": step, "epoch": epoch, **{k: all_reduce_mean(v.item()) for k, v in out.items()},
                      "lr": trainer.scheduler.get_last_lr()[0], "pairs_per_s": window_samples / max(elapsed, 1e-9)}
            window_t0, window_samples = time.perf_counter(), 0
            metrics.log(record, step)
            bar.set_postfix(loss=f"{record['loss']:.4f}", pps=f"{record['pairs_per_s']:.0f}")
        epoch_done = batch_in_epoch >= per_epoch * accum
        next_position = (epoch + 1, 0) if epoch_done else (epoch, batch_in_epoch)
        if epoch_done and heldout is not None:
            r2 = trainer.distill_r2(*heldout)
            metrics.log({"step": step, "epoch": epoch, "distill_r2": r2, "distill_r2_captions": len(heldout[0])}, step)
        if step % t.checkpoint_every == 0 or step == total_steps or step == stop_after:
            trainer.save_checkpoint(ckpt_dir, step, next_position, t.keep_checkpoints)
        if epoch_done:
            epoch, batch_in_epoch = epoch + 1, 0
        if step >= total_steps or step == stop_after:
            stopped = step == stop_after and step < total_steps
            break
    bar.close()
    metrics.close()
    summary = {"steps": step, "total_steps": total_steps, "epochs": epoch, "stopped_early": stopped}
    if stopped:
        return summary
    if heldout is not None:
        r2 = trainer.distill_r2(*heldout) if r2 is None else r2
        summary.update(distill_r2=r2, distill_r2_captions=len(heldout[0]))
        if dist.is_main:
            verdict = ("the projection does NOT fit the teacher: the student is not distilling (check loss.alpha, "
                       "the learning rate and loss.target_norm)" if r2 < R2_WARN else "the student distils")
            print(f"[kclip] held-out R^2 of W_e(E_T(x)) vs the teacher: {r2:.3f} on {len(heldout[0])} captions: "
                  f"{verdict}", flush=True)
    trainer.export(run_dir / STUDENT_FILE)
    if dist.is_main:
        atomic_write_json(run_dir / TRAIN_DONE, summary)
    barrier()
    return summary


class _Metrics:
    """metrics.jsonl (one record a line) and TensorBoard scalars, written by rank 0."""

    def __init__(self, run_dir: Path, dist: DistInfo):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.main = dist.is_main
        self.writer = None
        if self.main:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                self.writer = None

    def log(self, record: dict, step: int) -> None:
        if not self.main:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _ResumableBatches:
    """This rank's micro-batches from (epoch, micro-batch) on, forever; indices are ``epoch * n + row``."""

    def __init__(self, n: int, batch_size: int, seed: int, dist: DistInfo, per_epoch: int, epoch: int, start: int):
        self.n, self.batch_size, self.seed, self.dist = n, batch_size, seed, dist
        self.per_epoch, self.epoch, self.start = per_epoch, epoch, start

    def __iter__(self):
        epoch, start = self.epoch, self.start
        while True:
            batches = rank_batches(self.n, self.batch_size, self.seed, epoch, self.dist.rank, self.dist.world_size)
            for b in batches[start:self.per_epoch]:
                yield (b + epoch * self.n).tolist()
            epoch, start = epoch + 1, 0


def _fp32(clip):
    """A float32 view of the student for export (bf16/fp16 engines keep low-precision module weights)."""
    if all(p.dtype == torch.float32 for p in clip.parameters()):
        return clip
    import copy
    return copy.deepcopy(clip).float()
