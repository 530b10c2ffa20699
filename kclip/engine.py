"""The training engines: plain torch (:class:`TorchEngine`) or DeepSpeed ZeRO, behind one small interface.

The trainer drives either one the same way::

    out = engine(images, tokens, teacher, concept)   # forward (autocast for the torch engine)
    engine.backward(loss)                            # / grad_accum_steps, unless scale_wrt_gas=False
    engine.step()                                    # acts at the accumulation boundary only
    engine.train() / engine.eval() / engine.training / engine.module
    engine.save_checkpoint(dir, tag=..., client_state=...); engine.load_checkpoint(dir) -> (path, client_state)

``train.engine`` chooses (:func:`choose_engine`): ``torch`` when the student's fp32 weights, gradients and
AdamW state fit comfortably on one device (ZeRO's partitioning then buys nothing and costs device drains and
host work every step), DeepSpeed ZeRO ``train.zero_stage`` otherwise; ``train.zero_stage`` and
``train.deepspeed_config`` apply to the DeepSpeed engine only (with ``auto``, ZeRO-3 or a DeepSpeed JSON asks
for it).

Both engines step the same maths: fp32 master weights, AdamW, the global gradient norm clipped to
``train.grad_clip``, the scheduler stepped after every optimizer step, gradients averaged over ranks (DDP here,
ZeRO's reduction there; kclip.losses is written for that average). They differ in low precision: DeepSpeed's
bf16/fp16 modes keep low-precision module weights and take inputs in that dtype; the torch engine keeps fp32
weights and runs the forward under ``torch.autocast``, so it takes fp32 inputs (:func:`input_dtype`).

Checkpoints keep DeepSpeed's layout, ``<dir>/<tag>/`` plus ``<dir>/latest`` holding the tag, so the trainer's
resume and rotation work unchanged; each engine refuses the other's checkpoints with a :class:`CheckpointEngineError`.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import warnings
from pathlib import Path

import torch

from kclip.atomic import atomic_path, atomic_write_json, atomic_write_text
from kclip.config import Config, ConfigError, deepspeed_config
from kclip.distributed import DistInfo, barrier
from kclip.errors import UserError

ENGINES = ("torch", "deepspeed")
ENGINE_FILE = "engine.json"           # in a torch-engine checkpoint folder: which engine wrote it
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
CHECKPOINT_FORMAT = 1
BYTES_PER_PARAM = 16                  # fp32 weight + gradient + AdamW's two moments
AUTO_MEMORY_SHARE = 0.5               # auto: the torch engine when that state takes at most this share of a device
_LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


class CheckpointEngineError(UserError, ValueError):
    """A checkpoint was written by the other engine (or by neither); the message names the folder and the fix."""


def checkpoint_engine(ckpt_dir: str | Path) -> str | None:
    """The engine that wrote the latest checkpoint in ``ckpt_dir`` ("torch", "deepspeed"), or None when there
    is none or its folder holds neither engine's files."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    folder = ckpt_dir / latest.read_text(encoding="utf-8").strip()
    if (folder / ENGINE_FILE).is_file():
        return json.loads((folder / ENGINE_FILE).read_text(encoding="utf-8")).get("engine", "torch")
    if any(folder.glob("*model_states.pt")) or any(folder.glob("*optim_states.pt")):
        return "deepspeed"
    return None


def check_checkpoint_engine(ckpt_dir: str | Path, engine: str) -> None:
    """Raise :class:`CheckpointEngineError` unless the latest checkpoint in ``ckpt_dir`` was written by ``engine``."""
    wrote = checkpoint_engine(ckpt_dir)
    if wrote == engine:
        return
    latest = Path(ckpt_dir) / "latest"
    folder = Path(ckpt_dir) / latest.read_text(encoding="utf-8").strip() if latest.is_file() else Path(ckpt_dir)
    if wrote is None:
        raise CheckpointEngineError(f"checkpoint {folder} holds neither a torch-engine nor a DeepSpeed checkpoint "
                                    "(interrupted while saving, or not kclip's): remove it, or start a new run_dir")
    raise CheckpointEngineError(
        f"checkpoint {folder} was written by the {wrote} engine; this run uses the {engine} engine "
        f"(train.engine). Resume with train.engine={wrote} (or auto), or start a new run_dir.")


def trainable_bytes(model: torch.nn.Module) -> int:
    """What the torch engine keeps per device for ``model``: 16 bytes per trainable parameter (fp32 weight,
    gradient and AdamW's two moments; activations come on top)."""
    return BYTES_PER_PARAM * sum(p.numel() for p in model.parameters() if p.requires_grad)


def choose_engine(cfg: Config, model: torch.nn.Module, device: torch.device, ckpt_dir: str | Path | None = None
                  ) -> tuple[str, str]:
    """(engine, why) for ``train.engine``.

    ``torch`` and ``deepspeed`` are taken as given. ``auto``: the engine of the checkpoint a resume will load
    from ``ckpt_dir`` if there is one; ``deepspeed`` when the config asks for what only DeepSpeed does
    (``train.zero_stage`` 3, a ``train.deepspeed_config`` file); else ``torch`` on CPU, and on a GPU when
    :func:`trainable_bytes` is at most half of the device's memory; else ``deepspeed`` (ZeRO ``train.zero_stage``).
    """
    t = cfg.train
    if t.engine != "auto":
        return t.engine, "train.engine"
    if t.cuda_graph:  # the config already refused what only DeepSpeed does
        return "torch", "auto: train.cuda_graph captures the torch engine's step"
    found = checkpoint_engine(ckpt_dir) if ckpt_dir is not None else None
    if found is not None:
        return found, "auto: the engine of the checkpoint this run resumes"
    if t.zero_stage == 3:
        return "deepspeed", "auto: train.zero_stage=3 shards the parameters"
    if t.deepspeed_config:
        return "deepspeed", f"auto: train.deepspeed_config={t.deepspeed_config!r}"
    need = trainable_bytes(model)
    if device.type != "cuda":
        return "torch", "auto: on CPU, where partitioning saves no device memory"
    total = torch.cuda.get_device_properties(device).total_memory
    gib = f"{need / 2**30:.2f} GiB of weights, gradients and AdamW state vs {total / 2**30:.0f} GiB on the device"
    if need <= AUTO_MEMORY_SHARE * total:
        return "torch", f"auto: {gib}"
    return "deepspeed", f"auto: {gib}: ZeRO stage {t.zero_stage} partitions them"


def input_dtype(engine: str, precision: str) -> torch.dtype:
    """The dtype the engine's forward takes images in: DeepSpeed's bf16/fp16 modes hold module weights in that
    dtype; the torch engine holds fp32 weights and autocasts."""
    return _LOW_PRECISION.get(precision, torch.float32) if engine == "deepspeed" else torch.float32


def build_engine(engine: str, cfg: Config, model: torch.nn.Module, optimizer, scheduler, dist: DistInfo,
                 find_unused_parameters: bool = False):
    """The ``engine`` ("torch" or "deepspeed") over ``model`` with ``optimizer`` and ``scheduler`` (built over the
    model's parameters, e.g. :func:`kclip.trainer.build_optimizer`). ``find_unused_parameters``: some trainable
    parameter gets no gradient in a step (the torch engine's DDP must then look for them; DeepSpeed copes)."""
    if engine == "torch":
        return TorchEngine(cfg, model, optimizer, scheduler, dist, find_unused_parameters)
    if engine != "deepspeed":
        raise ConfigError(f"config key 'train.engine' is {engine!r}; it must be one of 'auto', "
                          f"{', '.join(map(repr, ENGINES))}")
    import deepspeed

    ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                       config=deepspeed_config(cfg, dist.world_size))
    return ds


class TorchEngine:
    """The training step over plain torch: fp32 master weights, autocast, DDP, GradScaler for fp16.

    Args:
        cfg: ``train.precision`` (fp32: nothing; bf16: ``torch.autocast`` bf16 around the forward; fp16: autocast
            fp16 and a ``torch.amp.GradScaler``), ``train.grad_accum_steps``, ``train.grad_clip`` (0: off).
        model: the module, on ``dist.device``, in fp32.
        optimizer, scheduler: over ``model``'s parameters; stepped at each accumulation boundary.
        dist: this rank; more than one rank wraps the module in ``DistributedDataParallel`` over the default
            process group (kclip.distributed.setup), which averages gradients over ranks as DeepSpeed does.
        find_unused_parameters: passed to DDP; needed only when some trainable parameter gets no gradient.

    The step never reads a device value on the host: clipping uses the norm on the device, and an fp16 overflow
    skips the update inside the optimizer when it supports it (fused AdamW on a GPU; elsewhere GradScaler reads
    the overflow flag). Unlike DeepSpeed, the schedule advances on a skipped fp16 step too (skipping it would
    need that flag on the host).
    """

    name = "torch"

    def __init__(self, cfg: Config, model: torch.nn.Module, optimizer, scheduler, dist: DistInfo,
                 find_unused_parameters: bool = False):
        t = cfg.train
        if any(p.dtype != torch.float32 for p in model.parameters() if p.requires_grad):
            raise ValueError("TorchEngine keeps fp32 master weights: give it an fp32 model (train.precision "
                             "is applied by autocast)")
        self.module, self.optimizer, self.lr_scheduler = model, optimizer, scheduler
        self.device, self.dist = dist.device, dist
        self.grad_accum_steps, self.grad_clip = t.grad_accum_steps, t.grad_clip
        self.autocast_dtype = _LOW_PRECISION.get(t.precision)
        self.scaler = torch.amp.GradScaler(self.device.type) if t.precision == "fp16" else None
        # a captured region may not reuse autocast's cast-weight cache across replays (torch.cuda.graphs' rule)
        self.autocast_cache = not t.cuda_graph
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.micro_steps = self.global_steps = 0
        self.ddp = None
        if dist.world_size > 1:
            ddp = torch.nn.parallel.DistributedDataParallel
            ids = [self.device.index] if self.device.type == "cuda" else None
            # buffers (C, the attention mask) never change in training: no broadcast before every forward (the
            # keyword torch 2.14 renamed it to, where it exists)
            no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters \
                else "broadcast_buffers"
            self.ddp = ddp(model, device_ids=ids, find_unused_parameters=find_unused_parameters, **{no_sync: False})

    # the module's mode is the engine's
    @property
    def training(self) -> bool:
        return self.module.training

    def train(self, mode: bool = True) -> "TorchEngine":
        self.module.train(mode)
        return self

    def eval(self) -> "TorchEngine":
        return self.train(False)

    def compile(self) -> None:
        """``torch.compile`` the module in place (DDP then calls the compiled forward)."""
        self.module.compile()

    def is_gradient_accumulation_boundary(self) -> bool:
        """The next backward completes an accumulation window (DeepSpeed's rule: one step() per micro-batch)."""
        return (self.micro_steps + 1) % self.grad_accum_steps == 0

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=self.autocast_cache)

    def __call__(self, *args, **kwargs):
        """The module's forward (under autocast in bf16/fp16). A forward that builds a graph goes through DDP,
        which reduces gradients in its backward only at an accumulation boundary (what ``no_sync()`` sets)."""
        forward = self.module
        if self.ddp is not None and torch.is_grad_enabled():
            self.ddp.require_backward_grad_sync = self.is_gradient_accumulation_boundary()
            forward = self.ddp
        with self._autocast():
            return forward(*args, **kwargs)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        """Accumulate ``loss``'s gradient: divided by ``grad_accum_steps`` unless ``scale_wrt_gas`` is False (the
        caller already weighted it), multiplied by the loss scale in fp16."""
        if scale_wrt_gas and self.grad_accum_steps > 1:
            loss = loss / self.grad_accum_steps
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def step(self) -> None:
        """At an accumulation boundary: :meth:`update`, then :meth:`advance`. Between boundaries only the
        micro-step count moves."""
        if self.is_gradient_accumulation_boundary():
            self.update()
            self.advance()
        else:
            self.micro_steps += 1

    def update(self) -> None:
        """The device half of an optimizer step: unscale (fp16), clip, optimizer step, zero the gradients. No host
        read and no host-side state change (kclip.step_graph captures it)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def advance(self) -> None:
        """The host half: the scheduler's next learning rate (written into the optimizer's lr, in place when it
        is a device tensor) and the step counters."""
        if self.scaler is not None:
            with warnings.catch_warnings():  # after a skipped step torch warns that the optimizer did not step
                warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
                self.lr_scheduler.step()
        else:
            self.lr_scheduler.step()
        self.global_steps += 1
        self.micro_steps += 1

    def save_checkpoint(self, save_dir: str | Path, tag: str, client_state: dict | None = None) -> None:
        """``<save_dir>/<tag>/`` (weights as safetensors; optimizer, scheduler, loss scale, counters and
        ``client_state`` in one torch file; which engine wrote it), then ``<save_dir>/latest`` = tag. Rank 0
        writes (every rank holds the same state); each file is written atomically and ``latest`` moves last,
        so an interrupted save leaves the previous checkpoint the latest. Every rank must call it."""
        from safetensors.torch import save_file

        folder = Path(save_dir) / tag
        if self.dist.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            weights = {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
            with atomic_path(folder / WEIGHTS_FILE) as tmp:
                save_file(weights, str(tmp))
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.lr_scheduler.state_dict(),
                     "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                     "micro_steps": self.micro_steps, "global_steps": self.global_steps,
                     "client_state": client_state or {}}
            with atomic_path(folder / STATE_FILE) as tmp:
                torch.save(state, tmp)
            atomic_write_json(folder / ENGINE_FILE, {"engine": self.name, "format": CHECKPOINT_FORMAT})
            atomic_write_text(Path(save_dir) / "latest", tag)
        barrier()

    def load_checkpoint(self, load_dir: str | Path) -> tuple[str, dict]:
        """Load the checkpoint ``<load_dir>/latest`` names into the module, optimizer, scheduler and loss scale.

        Returns:
            (its folder, the client_state it was saved with).
        Raises:
            CheckpointEngineError: it was written by the DeepSpeed engine (or is incomplete).
        """
        from safetensors.torch import load_file

        check_checkpoint_engine(load_dir, self.name)
        folder = Path(load_dir) / (Path(load_dir) / "latest").read_text(encoding="utf-8").strip()
        # on the host: load_state_dict copies into the parameters, and the optimizer moves its state to theirs
        self.module.load_state_dict(load_file(str(folder / WEIGHTS_FILE), device="cpu"))
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, lr in zip(self.optimizer.param_groups, lrs):
            if isinstance(lr, torch.Tensor):  # a device lr (train.cuda_graph) stays the tensor the step reads
                group["lr"] = lr.copy_(group["lr"])
        self.lr_scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.micro_steps, self.global_steps = state["micro_steps"], state["global_steps"]
        return str(folder), state["client_state"]
