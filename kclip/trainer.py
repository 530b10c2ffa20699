"""The train stage: the Knowledge-CLIP student trained from cached teacher embeddings.

The step runs on the engine ``train.engine`` chooses (:mod:`kclip.engine`): plain torch (fp32 master weights,
autocast, DDP over ranks) when the student's training state fits one device, else DeepSpeed ZeRO. Only the
student's trainable parameters (CLIP towers, logit scale, W_e) reach the optimizer (:func:`build_optimizer`);
C is frozen. Checkpoints are the engine's (module, optimizer, scheduler), with client state holding the step,
the data position (epoch, micro-batch in epoch) and the config; ``resume`` continues from the latest one with
the engine that wrote it and replays the data order exactly (the order is a function of seed and epoch;
augmentation is seeded per sample). At the end the student is exported as a safetensors state dict that
``open_clip.create_model(name, pretrained=path)`` loads.

``train.grad_cache`` (:meth:`Trainer._grad_cache_step`) makes the ``grad_accum_steps`` micro-batches one
contrastive batch with its exact gradient; ``eval.every_steps`` (:class:`_StepEval`) measures retrieval during
training without changing it.
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
from kclip.config import Config, TrainConfig, to_dict
from kclip.data import PairDataset, PairIndex, pair_loader, rank_batches
from kclip.distributed import DistInfo, all_reduce_mean, barrier
from kclip.engine import build_engine, check_checkpoint_engine, choose_engine, input_dtype
from kclip.losses import KnowledgeClipLoss, contrastive_loss
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
    eval_index: PairIndex | None = None    # pairs for eval.every_steps: the run's val split (None: training pairs)


def _param_groups(model: KnowledgeClip, t: TrainConfig) -> list[dict]:
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


def build_optimizer(model: KnowledgeClip, t: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """The train stage's AdamW over ``model``'s trainable parameters (``train.lr``, ``train.weight_decay``,
    ``train.projector_lr``; betas (0.9, 0.98), eps 1e-6; the fused kernel on a GPU). With ``train.cuda_graph``
    it is capturable and each group's lr is a 0-d fp32 tensor on ``device`` of its own: a replayed step reads
    the lr the scheduler wrote there."""
    groups = _param_groups(model, t)
    kw = {"fused": True} if device.type == "cuda" else {}
    lr = t.lr
    if t.cuda_graph:
        for group in groups:
            group["lr"] = torch.tensor(float(group.get("lr", t.lr)), dtype=torch.float32, device=device)
        lr = torch.tensor(float(t.lr), dtype=torch.float32, device=device)
        kw["capturable"] = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, **kw)


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainConfig, total_steps: int):
    """Linear warm-up over ``train.warmup_steps``, then cosine to 0 at ``total_steps`` (stepped per optimizer step).
    A tensor lr (``train.cuda_graph``) is written in place from host floats: no step reads it back."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(t.warmup_steps, total_steps))
    # LambdaLR keeps tensor base lrs, and each step would read base_lr * factor back to fill the group's lr
    scheduler.base_lrs = [float(b) for b in scheduler.base_lrs]
    return scheduler


def some_parameter_idle(cfg: Config) -> bool:
    """Whether some trainable parameter of the student gets no gradient in a step, given the loss weights: the
    logit scale without the contrastive term, W_e without L_emb (and without L_conc through it), the separate
    image projector without L_conc. (DDP then has to look for such parameters after every backward.)"""
    loss = cfg.loss
    w_e = loss.alpha > 0 or (loss.beta > 0 and loss.concept_path == "shared")
    image_projector = loss.concept_path != "separate" or loss.beta > 0
    return not (loss.gamma > 0 and w_e and image_projector)


def steps_per_epoch(n: int, cfg: Config, world_size: int) -> int:
    micro = n // (cfg.train.batch_size * world_size)
    return micro // cfg.train.grad_accum_steps


class Trainer:
    """The Knowledge-CLIP training step on the engine ``train.engine`` chooses: one method, :meth:`train_step`,
    that the training loop (:func:`train`), the benchmarks and the tests all call.

    Args:
        cfg: the run config (``train.*`` for the engine, optimizer, schedule, ZeRO stage and precision; ``loss.*``).
        model: the student (:class:`kclip.model.KnowledgeClip`, concept classifier loaded), fp32; it is moved to
            ``dist.device`` (by DeepSpeed for its engine).
        dist: this rank's :class:`DistInfo`.
        total_steps: optimizer steps of the schedule (warm-up + cosine).
        normalize: finishes uint8 images on the device (:class:`kclip.data.DeviceNormalize`), or None when
            batches already hold float images.
        ckpt_dir: the checkpoints a resume will load, if any: ``train.engine: auto`` then takes their engine.

    Attributes:
        engine: the :class:`kclip.engine.TorchEngine` or the DeepSpeed engine; ``engine_name`` ("torch" or
            "deepspeed") and ``engine_reason`` say which and why.
        dtype: the dtype images enter the engine's forward in (:func:`kclip.engine.input_dtype`).
    """

    def __init__(self, cfg: Config, model: KnowledgeClip, dist: DistInfo, total_steps: int, normalize=None,
                 ckpt_dir: Path | None = None):
        t = cfg.train
        self.cfg, self.model, self.dist, self.normalize = cfg, model, dist, normalize
        self.total_steps = total_steps
        self.engine_name, self.engine_reason = choose_engine(cfg, model, dist.device, ckpt_dir)
        self.dtype = input_dtype(self.engine_name, t.precision)
        if self.engine_name == "torch":
            model.to(dist.device)  # DeepSpeed places (and partitions) the module itself
        self.optimizer = build_optimizer(model, t, dist.device)
        self.scheduler = build_scheduler(self.optimizer, t, total_steps)
        self.loss_fn = KnowledgeClipLoss(cfg.loss.alpha, cfg.loss.beta, cfg.loss.gamma, cfg.loss.contrastive_impl,
                                         world_size=dist.world_size,
                                         contrastive_memory_budget_gb=cfg.loss.contrastive_memory_budget_gb)
        self.engine = build_engine(self.engine_name, cfg, model, self.optimizer, self.scheduler, dist,
                                   find_unused_parameters=some_parameter_idle(cfg))
        if t.compile:
            self.engine.compile()
        self.step_graph = None
        if t.cuda_graph:
            from kclip.step_graph import StepGraph, check_graphable

            check_graphable(t, self.engine_name, dist.device, dist.world_size)
            self.step_graph = StepGraph(self.engine, self._forward_loss)
        # Gradient cache: one accumulation window's micro-batches (as the loader gave them, on the host) until the
        # last one arrives. With one micro-batch per step the plain step already is the exact big-batch step.
        self.grad_cache = t.grad_cache and t.grad_accum_steps > 1
        self._pending: list[dict] = []
        # The per-pair terms (L_emb, L_conc) of a grad-cache step, weighted per micro-batch: the contrastive term
        # is taken over the whole batch separately.
        self._pair_loss_fn = KnowledgeClipLoss(cfg.loss.alpha, cfg.loss.beta, 0.0, cfg.loss.contrastive_impl,
                                               world_size=dist.world_size)

    def _device_batch(self, batch: dict, targets: bool = True) -> tuple:
        dev = self.dist.device
        images = batch["image"].to(dev, non_blocking=True)                  # (B, 3, H, W) uint8 or float
        images = self.normalize(images, self.dtype) if self.normalize is not None else images.to(self.dtype)
        tokens = batch["tokens"].to(dev, non_blocking=True)                 # (B, L)
        loss = self.cfg.loss
        targets_for = targets and loss.alpha > 0, targets and loss.beta > 0
        teacher = batch["teacher"].to(dev, non_blocking=True) if targets_for[0] else None   # (B, d') fp16
        concept = batch["concept"].to(dev, non_blocking=True) if targets_for[1] else None   # (B,)
        return images, tokens, teacher, concept

    def train_step(self, batch: dict) -> dict:
        """Forward, loss, backward and (at an accumulation boundary) the optimizer step for one micro-batch.

        Args:
            batch: ``image`` (B, 3, H, W) uint8 (with ``normalize``) or float, ``tokens`` (B, L) int64,
                ``teacher`` (B, d') fp16 targets (when alpha > 0), ``concept`` (B,) int64 (when beta > 0),
                on any device (moved here without blocking).
        Returns:
            {"loss", the loss terms, "logit_scale"}: detached 0-d device tensors. Nothing here waits for
            the device: read them (``.item()``) only when logging. With ``train.cuda_graph`` they are the captured
            step's outputs, overwritten by the next step (kclip.step_graph). With ``train.grad_cache`` (and
            grad_accum_steps > 1) the step runs when the window's last micro-batch arrives: the earlier calls
            only keep their batch and return {}; the last returns the whole batch's values.
        """
        if self.grad_cache:
            return self._grad_cache_step(batch)
        if self.step_graph is not None:
            return self.step_graph(batch)
        loss, out = self._forward_loss(batch)
        self.engine.backward(loss)
        self.engine.step()
        return out

    def _forward_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """(the loss, the step's detached outputs) of one micro-batch's forward."""
        out = self.engine(*self._device_batch(batch))
        loss, terms = self.loss_fn(out)
        return loss, {"loss": loss.detach(), **terms, "logit_scale": out["logit_scale"].detach()}

    def _grad_cache_step(self, batch: dict) -> dict:
        """The gradient-cache step (Gao et al. 2021) over one accumulation window of micro-batches.

        The window (``grad_accum_steps`` micro-batches on each of P ranks) is ONE contrastive batch of N pairs,
        and the gradient that reaches the optimizer equals that of the loss a run with batch_size x
        grad_accum_steps per rank and no accumulation computes:

        1. embed every micro-batch with no activations kept (no_grad), saving the RNG state before each forward;
        2. the contrastive loss over the whole batch once (kclip.losses.contrastive_loss: it all-gathers across
           ranks; its x P on the features undoes the engine's rank average), on leaf copies of the embeddings:
           its gradient w.r.t. this rank's embeddings and the logit scale;
        3. per micro-batch j (n_j pairs), with its RNG state restored (dropout, patch dropout, drop-path draw the
           same masks as in step 1, so the cached gradient belongs to the same function): forward with
           activations, backward of ``<image, dI_j> + <text, dT_j> + (n_j/n) (alpha L_emb_j + beta L_conc_j)``
           (+ ``scale * d scale / M``, M micro-batches: every backward then reaches every parameter, which
           DDP's reducing backward requires), then ``engine.step()``. L_emb and L_conc are per-pair means, so the
           n_j/n weights sum them to the window's mean on this rank; the engine's rank average then gives the
           global one, as in the big-batch run. ``scale_wrt_gas=False``: the weights already are the
           accumulation's share, the engine's 1/grad_accum_steps would count it twice.

        Only one micro-batch's activations are alive at a time; the cost is one extra no-grad forward.
        """
        self._pending.append(batch)
        if len(self._pending) < self.cfg.train.grad_accum_steps:
            return {}
        micro, self._pending = self._pending, []
        gamma = self.cfg.loss.gamma
        states, images, texts = [], [], []
        scale = None
        if gamma > 0:
            with torch.no_grad():
                for b in micro:
                    states.append(self._rng_state())
                    out = self.engine(*self._device_batch(b, targets=False))
                    images.append(out["image"])                            # (n_j, d)
                    texts.append(out["text"])                              # (n_j, d)
                    scale = out["logit_scale"]
            sizes = [x.shape[0] for x in images]
            # fp16 embeddings' gradients would underflow without the engine's loss scale: take them in fp32
            leaf_dtype = torch.float32 if images[0].dtype == torch.float16 else images[0].dtype
            image = torch.cat(images).to(leaf_dtype).requires_grad_()      # (n, d) this rank's rows
            text = torch.cat(texts).to(leaf_dtype).requires_grad_()        # (n, d)
            log_scale = scale.detach().to(leaf_dtype).requires_grad_()     # ()
            del images, texts
            with torch.enable_grad():
                cont = contrastive_loss(image, text, log_scale, self.loss_fn.contrastive_impl,
                                        self.loss_fn.group, self.loss_fn.world_size).float()
                d_image, d_text, d_scale = torch.autograd.grad(gamma * cont, (image, text, log_scale))
            d_images, d_texts = d_image.split(sizes), d_text.split(sizes)   # (n_j, d) each
            after = self._rng_state()
        else:  # no contrastive term: nothing couples the micro-batches
            sizes = [b["image"].shape[0] for b in micro]
        n = sum(sizes)
        pair_total, pair_terms = None, {}
        for j, b in enumerate(micro):
            if gamma > 0:
                self._set_rng_state(states[j])
            out = self.engine(*self._device_batch(b))
            weight = sizes[j] / n
            total, terms = self._pair_loss_fn(out)                         # alpha L_emb_j + beta L_conc_j
            surrogate = weight * total
            if gamma > 0:
                surrogate = surrogate + (out["image"].float() * d_images[j].float()).sum() \
                    + (out["text"].float() * d_texts[j].float()).sum()
                # the scale is shared by the micro-batches: its gradient enters in equal parts, so every backward
                # reaches every parameter (DDP reduces only the last one; ZeRO-3 accumulates per micro-batch)
                surrogate = surrogate + (out["logit_scale"].float() * d_scale.float()).sum() / len(micro)
            self.engine.backward(surrogate, scale_wrt_gas=False)
            self.engine.step()
            last_scale = out["logit_scale"].detach()
            del out, surrogate                                             # this micro-batch's graph is gone
            pair_total = weight * total.detach() if pair_total is None else pair_total + weight * total.detach()
            for k, v in terms.items():
                pair_terms[k] = weight * v if k not in pair_terms else pair_terms[k] + weight * v
        if gamma > 0:
            self._set_rng_state(after)  # where step 1 left it, whatever the re-runs drew
            loss = gamma * cont.detach() + pair_total
            return {"loss": loss, "contrastive": cont.detach(), **pair_terms, "logit_scale": scale.detach()}
        return {"loss": pair_total, **pair_terms, "logit_scale": last_scale}

    def _rng_state(self) -> tuple:
        """The generators a forward may draw from: CPU and this rank's CUDA device (host-side state, no sync)."""
        cuda = torch.cuda.get_rng_state(self.dist.device) if self.dist.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def _set_rng_state(self, state: tuple) -> None:
        cpu, cuda = state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.dist.device)

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
        """(step, epoch, micro-batch in epoch) of the latest checkpoint in ``ckpt_dir``.

        Raises:
            kclip.engine.CheckpointEngineError: the other engine wrote it.
        """
        check_checkpoint_engine(ckpt_dir, self.engine_name)  # before DeepSpeed fails on a folder it cannot read
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
        if self.engine_name == "deepspeed" and self.cfg.train.zero_stage == 3:
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
STEP_EVAL_PLOT = "eval_during_training.png"
STEP_EVAL_METRICS = ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")


class _StepEval:
    """``eval.every_steps``: retrieval R@1/R@5 (image->text, text->image; :func:`kclip.eval.retrieval.retrieval_recall`)
    on a fixed subset of pairs during training, without changing the training.

    The subset: the first ``eval.every_steps_pairs`` validation pairs (``TrainInputs.eval_index``, which the
    pipeline fills with the run's val split), or training pairs when there is no validation split (said once, and recorded
    as ``eval/split``). Its images are decoded once with the validation transform (no augmentation) and kept on
    the host as uint8. Every rank runs the same forwards (ZeRO-3 gathers parameters collectively); rank 0 logs.
    Training is unchanged: the engine goes back to its mode, the RNG (CPU and this device) is forked, and the
    training loader is not touched.
    """

    def __init__(self, images, tokens, text_to_image, split: str, normalize, dist: DistInfo, batch_size: int):
        self.images, self.tokens, self.text_to_image = images, tokens, text_to_image  # (Ni, 3, H, W), (Nt, L), (Nt,)
        self.split, self.normalize, self.dist, self.batch_size = split, normalize, dist, batch_size

    @classmethod
    def build(cls, cfg: Config, run_dir: Path, inputs: TrainInputs, clip, tokenizer, dist: DistInfo):
        """The evaluator of ``cfg.eval.every_steps``, or None when it is off."""
        if cfg.eval.every_steps <= 0:
            return None
        from open_clip.transform import PreprocessCfg, image_transform_v2

        index, split = inputs.eval_index, "val"
        if index is None or not index.pairs:
            index, split = inputs.index, "train"
            if dist.is_main:
                print("[kclip] eval.every_steps: no validation pairs (data.val); evaluating retrieval on the first "
                      f"{cfg.eval.every_steps_pairs} TRAINING pairs instead", flush=True)
        pairs = index.pairs[:cfg.eval.every_steps_pairs]
        preprocess = image_transform_v2(PreprocessCfg(**clip.visual.preprocess_cfg), is_train=False)
        dataset = PairDataset(PairIndex(pairs=pairs), preprocess, tokenizer, seed=cfg.seed)
        first, rows, text_to_image = {}, [], []
        for i, p in enumerate(pairs):  # an image with several captions is one retrieval target
            key = (p.image, p.member_offset)
            if key not in first:
                first[key] = len(rows)
                rows.append(i)
            text_to_image.append(first[key])
        with torch.random.fork_rng(devices=[]):
            images = dataset.__getitems__(rows)["image"]                          # (Ni, 3, H, W)
        tokens = tokenizer([p.caption for p in pairs])                            # (Nt, L)
        return cls(images, tokens, torch.tensor(text_to_image), split, dataset.normalize, dist, cfg.eval.batch_size)

    @torch.no_grad()
    def __call__(self, trainer: "Trainer") -> dict:
        """{"eval/i2t_r1", ..., "eval/seconds", ...} for the model as it is now."""
        t0 = time.perf_counter()
        engine, dev = trainer.engine, self.dist.device
        was_training = engine.module.training  # (the DeepSpeed engine's own flag stays True in eval())
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            engine.eval()
            try:
                image, text = [], []
                for i in range(0, self.images.shape[0], self.batch_size):
                    x = self.images[i:i + self.batch_size].to(dev)
                    x = self.normalize(x, trainer.dtype) if self.normalize is not None else x.to(trainer.dtype)
                    image.append(engine(x, None, None, None)["image"].float())   # (b, d)
                for i in range(0, self.tokens.shape[0], self.batch_size):
                    text.append(engine(None, self.tokens[i:i + self.batch_size].to(dev), None, None)["text"].float())
            finally:
                engine.train(was_training)
        from kclip.eval.retrieval import retrieval_recall

        recall = retrieval_recall(torch.cat(image).cpu(), torch.cat(text).cpu(), self.text_to_image, ks=(1, 5))
        out = {f"eval/{k}": recall[k] for k in STEP_EVAL_METRICS}
        out.update({"eval/images": recall["n_images"], "eval/texts": recall["n_texts"], "eval/split": self.split,
                    "eval/seconds": time.perf_counter() - t0})
        return out


def plot_step_eval(metrics_path: Path, out: Path) -> Path | None:
    """The eval/* records of metrics.jsonl against the step (the last record of a step wins after a resume)."""
    by_step = {}
    if Path(metrics_path).is_file():
        for line in open(metrics_path, encoding="utf-8"):
            rec = json.loads(line)
            if f"eval/{STEP_EVAL_METRICS[0]}" in rec:
                by_step[rec["step"]] = rec
    if not by_step:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(by_step)
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in STEP_EVAL_METRICS:
        ax.plot(steps, [by_step[s][f"eval/{k}"] for s in steps], marker="o", label=k)
    split = by_step[steps[-1]].get("eval/split", "val")
    ax.set(xlabel="optimizer step", ylabel="recall (%)",
           title=f"retrieval during training ({by_step[steps[-1]].get('eval/texts')} {split} captions)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


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
    trainer = Trainer(cfg, model, dist, total_steps, normalize=dataset.normalize,
                      ckpt_dir=ckpt_dir if resume else None)
    if dist.is_main:
        print(f"[kclip] engine: {trainer.engine_name} ({trainer.engine_reason})", flush=True)
    heldout = _heldout(inputs, tokenizer, t.r2_captions) if cfg.loss.alpha > 0 else None
    step_eval = _StepEval.build(cfg, run_dir, inputs, model.clip, tokenizer, dist)

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
    # grad_cache: the step's micro-batches are this rank's rows of the big batch (batch_size x grad_accum_steps),
    # in order, so the step sees what a run without accumulation sees; plain accumulation keeps its own layout
    sampler = _ResumableBatches(n, t.batch_size, cfg.seed, dist, per_epoch * accum, epoch, batch_in_epoch,
                                split=accum if t.grad_cache else 1)
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
                      "lr": float(trainer.scheduler.get_last_lr()[0]), "pairs_per_s": window_samples / max(elapsed, 1e-9)}
            window_t0, window_samples = time.perf_counter(), 0
            metrics.log(record, step)
            bar.set_postfix(loss=f"{record['loss']:.4f}", pps=f"{record['pairs_per_s']:.0f}")
        if step_eval is not None and step % cfg.eval.every_steps == 0:
            metrics.log({"step": step, "epoch": epoch, **step_eval(trainer)}, step)
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
    if step_eval is not None and dist.is_main:
        plot_step_eval(run_dir / "metrics.jsonl", run_dir / STEP_EVAL_PLOT)
    summary = {"steps": step, "total_steps": total_steps, "epochs": epoch, "stopped_early": stopped,
               "engine": trainer.engine_name}
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
                    self.writer.add_scalar(k if "/" in k else f"train/{k}", v, step)  # eval/<metric> as named

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _ResumableBatches:
    """This rank's micro-batches from (epoch, micro-batch) on, forever; indices are ``epoch * n + row``.

    ``split`` > 1: this rank's batches of ``batch_size * split`` rows (the no-accumulation layout of that batch
    size), each cut into ``split`` consecutive micro-batches of ``batch_size``.
    """

    def __init__(self, n: int, batch_size: int, seed: int, dist: DistInfo, per_epoch: int, epoch: int, start: int,
                 split: int = 1):
        self.n, self.batch_size, self.seed, self.dist = n, batch_size, seed, dist
        self.per_epoch, self.epoch, self.start, self.split = per_epoch, epoch, start, split

    def __iter__(self):
        epoch, start = self.epoch, self.start
        b = self.batch_size
        while True:
            batches = rank_batches(self.n, b * self.split, self.seed, epoch, self.dist.rank, self.dist.world_size)
            micro = [big[i * b:(i + 1) * b] for big in batches for i in range(self.split)]
            for m in micro[start:self.per_epoch]:
                yield (m + epoch * self.n).tolist()
            epoch, start = epoch + 1, 0


def _fp32(clip):
    """A float32 view of the student for export (DeepSpeed's bf16/fp16 modes keep low-precision module weights)."""
    if all(p.dtype == torch.float32 for p in clip.parameters()):
        return clip
    import copy
    return copy.deepcopy(clip).float()
