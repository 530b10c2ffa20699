"""The training step as one CUDA graph (``train.cuda_graph``).

A ViT-B/32 step issues several hundred kernels from Python (the forward and backward of every block, the two
losses, the clipping norm, AdamW); at a few microseconds of host time each, the host can pace the device. Here
the step's device work (forward, losses, backward, :meth:`kclip.engine.TorchEngine.update`) is captured once
and replayed every step: one launch. What stays on the host between replays is the scheduler writing the next
learning rate into the optimizer's device-side lr (:func:`kclip.trainer.build_optimizer`) and the counters.

Contract:
    - The first ``warmup`` steps run eagerly on a side stream (they are real steps: lazy optimizer state,
      Triton autotuning and the cuBLAS workspaces are made there, outside the capture); the next step is
      captured, then replayed; every later step replays.
    - Every batch must have the shapes, dtypes and keys of the first (the trainer's loader gives only full
      batches); a different one is refused with a clear error instead of being silently mis-read.
    - The returned dict holds the graph's own output tensors: they are overwritten by the next step, so read
      them (``.item()``) before calling again, as the trainer's logging does.
    - Same maths as the eager step (the same kernels, replayed); dropout draws from the graph-safe default CUDA
      generator, so its masks differ from an eager run's.

Needs a CUDA device, the torch engine, one rank, ``train.precision`` bf16 or fp32 and ``grad_accum_steps`` 1
(:meth:`kclip.config.TrainConfig.check_cuda_graph` says so at config time; :func:`check_graphable` here).
"""
from __future__ import annotations

from typing import Callable

import torch

from kclip.config import ConfigError

WARMUP_STEPS = 3  # eager steps before the capture (torch's whole-network example uses 3 on a side stream)


def check_graphable(train, engine_name: str, device: torch.device, world_size: int) -> None:
    """Raise a :class:`ConfigError` naming ``train.cuda_graph`` when this run (``train``: the TrainConfig) cannot
    capture its step."""
    train.check_cuda_graph()  # again: the fields may have been set after the config was made
    if device.type != "cuda":
        raise ConfigError(f"config key 'train.cuda_graph' is true but this run trains on {device.type}: CUDA graphs "
                          "need a CUDA GPU; set train.cuda_graph to false")
    if engine_name != "torch":
        raise ConfigError(f"config key 'train.cuda_graph' is true but the run uses the {engine_name} engine (e.g. "
                          "from the checkpoint it resumes): set train.engine to torch, or train.cuda_graph to false")
    if world_size != 1:
        raise ConfigError(f"config key 'train.cuda_graph' is true on {world_size} ranks: the captured step is "
                          "single-GPU for now (DDP's reducer is not captured); set train.cuda_graph to false")


class StepGraph:
    """One training step, captured on first use and replayed.

    Args:
        engine: the :class:`kclip.engine.TorchEngine` (its ``update`` and ``advance`` split the step into its
            device and host halves).
        forward_loss: ``batch -> (loss, out)``: the step's forward and loss on device tensors, ``out`` the dict of
            detached 0-d tensors the step returns (what ``Trainer.train_step`` logs).
        warmup: eager steps before the capture.
    """

    def __init__(self, engine, forward_loss: Callable[[dict], tuple[torch.Tensor, dict]],
                 warmup: int = WARMUP_STEPS):
        self.engine, self.forward_loss, self.warmup = engine, forward_loss, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: dict[str, torch.Tensor] | None = None
        self.out: dict[str, torch.Tensor] | None = None
        self.steps = 0  # steps taken through this object (warm-up, capture and replays)

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _device_work(self) -> dict:
        loss, out = self.forward_loss(self.static)
        self.engine.backward(loss)
        self.engine.update()
        return out

    def _load(self, batch: dict) -> None:
        """Copy ``batch`` into the static input buffers (made from the first batch, on the engine's device)."""
        device = self.engine.device
        if self.static is None:
            self.static = {k: torch.empty_like(v, device=device) for k, v in batch.items()}
        if batch.keys() != self.static.keys():
            raise ValueError(f"train.cuda_graph: the batch has keys {sorted(batch)}, the captured step "
                             f"{sorted(self.static)}; every step must have the same inputs")
        for k, v in batch.items():
            s = self.static[k]
            if v.shape != s.shape or v.dtype != s.dtype:
                raise ValueError(f"train.cuda_graph: batch[{k!r}] is {tuple(v.shape)} {v.dtype}, the captured step "
                                 f"takes {tuple(s.shape)} {s.dtype}: every step must have the same shapes (a full "
                                 "batch); set train.cuda_graph to false for ragged batches")
            s.copy_(v, non_blocking=True)

    def __call__(self, batch: dict) -> dict:
        """One optimizer step on ``batch`` (host or device tensors); returns the step's detached 0-d outputs."""
        self._load(batch)
        if self.steps < self.warmup:
            side = torch.cuda.Stream(self.engine.device)
            side.wait_stream(torch.cuda.current_stream(self.engine.device))
            with torch.cuda.stream(side):
                out = self._device_work()
            torch.cuda.current_stream(self.engine.device).wait_stream(side)
        else:
            if self.graph is None:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.out = self._device_work()
            self.graph.replay()
            out = self.out
        self.engine.advance()
        self.steps += 1
        return dict(out)
