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
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kclip.config import Config, deepspeed_config, to_dict
from kclip.data import PairDataset, PairIndex, rank_batches
from kclip.distributed import DistInfo, all_reduce_mean, barrier
from kclip.losses import KnowledgeClipLoss, KnowledgeClipObjective
from kclip.model import KnowledgeClip, build_clip, export_student

TRAIN_DONE = "train_done.json"
STUDENT_FILE = "student.safetensors"


@dataclass
class TrainInputs:
    index: PairIndex                 # training pairs, in cache row order
    teacher: object                  # TeacherTargets: get(indices) -> (n, d') float32 targets; .dim
    labels: torch.Tensor             # (N,) int64 concept labels
    classifier_weight: torch.Tensor  # (K, d')
    classifier_bias: torch.Tensor    # (K,)


def _param_groups(model: KnowledgeClip, cfg: Config) -> list[dict]:
    """AdamW groups: no weight decay on gains, biases, embeddings and the logit scale; W_e's own lr."""
    decay, no_decay, projector = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("projector."):
            projector.append(p)
        elif p.ndim < 2 or "logit_scale" in name or "embedding" in name or "token_embedding" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    t = cfg.train
    return [{"params": decay, "weight_decay": t.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
            {"params": projector, "weight_decay": 0.0, "lr": t.projector_lr or t.lr}]


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


def train(cfg: Config, run_dir: Path, inputs: TrainInputs, dist: DistInfo, resume: bool = True,
          progress: bool = True, stop_after: int = 0) -> dict:
    """Train (or resume) the student; return a summary. ``stop_after`` > 0 stops (checkpointed) after that step."""
    import deepspeed
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
    clip, preprocess_train, _, tokenizer = build_clip(cfg.model.name, cfg.model.pretrained, seed=cfg.seed)
    if cfg.model.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    torch.manual_seed(cfg.seed + 1)
    model = KnowledgeClip(clip, inputs.teacher.dim, int(inputs.classifier_weight.shape[0]))
    model.load_concept_classifier(inputs.classifier_weight, inputs.classifier_bias)
    fused = dist.device.type == "cuda"
    optimizer = torch.optim.AdamW(_param_groups(model, cfg), lr=t.lr, betas=(0.9, 0.98), eps=1e-6,
                                  **({"fused": True} if fused else {}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(t.warmup_steps, total_steps))
    loss_fn = KnowledgeClipLoss(cfg.loss.alpha, cfg.loss.beta, cfg.loss.gamma, cfg.loss.contrastive_impl,
                                cfg.loss.distill_impl, world_size=dist.world_size)
    objective = KnowledgeClipObjective(model, loss_fn)
    if t.zero_stage == 3:
        objective.register_for_zero3()
    engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, dist.world_size))
    if t.compile:
        engine.compile()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[t.precision]

    step, epoch, batch_in_epoch = 0, 0, 0
    if resume and (ckpt_dir / "latest").is_file():
        _, client = engine.load_checkpoint(str(ckpt_dir))
        step, epoch, batch_in_epoch = client["step"], client["epoch"], client["batch_in_epoch"]
        if client.get("world_size") != dist.world_size or client.get("batch_size") != t.batch_size:
            raise ValueError(f"checkpoint in {ckpt_dir} was made with {client.get('world_size')} ranks x batch "
                             f"{client.get('batch_size')}; this run has {dist.world_size} x {t.batch_size}. Resume "
                             "with the same layout, or start a new run_dir.")
        if dist.is_main:
            print(f"[kclip] resumed from {ckpt_dir} at step {step} (epoch {epoch}, micro-batch {batch_in_epoch})")

    dataset = PairDataset(inputs.index, preprocess_train, tokenizer, inputs.teacher, inputs.labels, seed=cfg.seed)

    metrics_path = run_dir / "metrics.jsonl"
    writer = None
    if dist.is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            writer = None
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not (progress and dist.is_main),
               dynamic_ncols=True)
    accum = t.grad_accum_steps
    window_t0, window_samples = time.perf_counter(), 0
    stopped = False
    # One loader for the whole run: workers persist across epochs. Each sample index carries its epoch
    # (epoch * N + row), which seeds its augmentation, so workers need no per-epoch state.
    sampler = _ResumableBatches(n, t.batch_size, cfg.seed, dist, per_epoch * accum, epoch, batch_in_epoch)
    workers = cfg.data.num_workers
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, pin_memory=dist.device.type == "cuda",
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
    for micro in loader if step < total_steps else ():
        images = micro["image"].to(dist.device, non_blocking=True)             # (B, 3, H, W) uint8
        images = dataset.normalize(images, dtype) if dataset.normalize else images.to(dtype)
        tokens = micro["tokens"].to(dist.device, non_blocking=True)            # (B, L)
        teacher = micro["teacher"].to(dist.device, non_blocking=True)          # (B, d')
        concept = micro["concept"].to(dist.device, non_blocking=True)          # (B,)
        loss, terms = engine(images, tokens, teacher, concept)
        engine.backward(loss)
        engine.step()
        batch_in_epoch += 1
        window_samples += images.shape[0] * dist.world_size
        if batch_in_epoch % accum:
            continue
        step += 1
        bar.update(1)
        if step % t.log_every == 0 or step == total_steps or step == stop_after:
            elapsed = time.perf_counter() - window_t0
            record = {"step": step, "epoch": epoch, "loss": all_reduce_mean(loss.item()),
                      **{k: all_reduce_mean(v.item()) for k, v in terms.items()},
                      "lr": scheduler.get_last_lr()[0],
                      "pairs_per_s": window_samples / max(elapsed, 1e-9)}
            window_t0, window_samples = time.perf_counter(), 0
            if dist.is_main:
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                if writer is not None:
                    for k, v in record.items():
                        if k not in ("step", "epoch"):
                            writer.add_scalar(f"train/{k}", v, step)
                bar.set_postfix(loss=f"{record['loss']:.4f}", pps=f"{record['pairs_per_s']:.0f}")
        epoch_done = batch_in_epoch >= per_epoch * accum
        next_position = (epoch + 1, 0) if epoch_done else (epoch, batch_in_epoch)
        if step % t.checkpoint_every == 0 or step == total_steps or step == stop_after:
            _save_checkpoint(engine, ckpt_dir, step, next_position, cfg, dist)
        if epoch_done:
            epoch, batch_in_epoch = epoch + 1, 0
        if step >= total_steps or step == stop_after:
            stopped = step == stop_after and step < total_steps
            break
    bar.close()
    if writer is not None:
        writer.close()
    summary = {"steps": step, "total_steps": total_steps, "epochs": epoch, "stopped_early": stopped}
    if stopped:
        return summary
    _export(engine, run_dir, cfg, dist)
    if dist.is_main:
        _atomic_json(run_dir / TRAIN_DONE, summary)
    barrier()
    return summary


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


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _save_checkpoint(engine, ckpt_dir: Path, step: int, position: tuple, cfg: Config, dist: DistInfo) -> None:
    epoch, batch_in_epoch = position
    client = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "world_size": dist.world_size,
              "batch_size": cfg.train.batch_size, "config": to_dict(cfg)}
    engine.save_checkpoint(str(ckpt_dir), tag=f"step_{step:08d}", client_state=client)
    barrier()
    if dist.is_main:  # keep the newest few
        tags = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())
        for old in tags[: -cfg.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def _export(engine, run_dir: Path, cfg: Config, dist: DistInfo) -> None:
    """Write the student's open_clip weights (gathered from ZeRO-3 partitions when needed)."""
    module = engine.module.model
    if cfg.train.zero_stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(module.clip.parameters()), modifier_rank=None):
            if dist.is_main:
                export_student(_fp32(module.clip), run_dir / STUDENT_FILE)
    elif dist.is_main:
        export_student(_fp32(module.clip), run_dir / STUDENT_FILE)
    barrier()


def _fp32(clip):
    """A float32 view of the student for export (bf16/fp16 engines keep low-precision module weights)."""
    if all(p.dtype == torch.float32 for p in clip.parameters()):
        return clip
    import copy
    return copy.deepcopy(clip).float()
