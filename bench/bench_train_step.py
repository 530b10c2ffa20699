"""End-to-end training throughput: kclip's training step vs the open_clip-style step and the online teacher.

One process, one device, side by side (per ``--models`` entry, 224 px, batch ``--batch-size`` per GPU):

- ``kclip-fused``     : the product's step, ``kclip.trainer.Trainer.train_step``, over ``KnowledgeClip`` with the
                        fused Triton losses, on the engine ``train.engine: auto`` picks here (the record's
                        ``engine``): the torch engine when the student's training state fits the device, else
                        DeepSpeed ZeRO-2. Clipping 1.0.
- ``kclip-reference`` : the same step with ``contrastive_impl = distill_impl = "reference"`` (eager losses).
- ``kclip-torch``     : the fused step on the torch engine (``train.engine: torch``: fp32 master weights, autocast,
                        fused torch AdamW, DDP at > 1 rank).
- ``kclip-graph``     : ``kclip-torch`` with ``train.cuda_graph``: the whole step captured once as a CUDA graph and
                        replayed (kclip/step_graph.py; the warm-up covers its eager steps and the capture). Against
                        ``kclip-torch`` it measures the host's share of the step. GPU only.
- ``kclip-zero2``, ``kclip-zero1``, ``kclip-zero3``, ``kclip-zero0``: the fused step on the DeepSpeed engine
                        (``train.engine: deepspeed``; its bf16 mode: bf16 module weights, fp32 master copy in its
                        optimizer) with ZeRO-2 / 1 / 3 / DeepSpeed without ZeRO partitioning (kclip's
                        configs/ds/zero{s}.json filled by ``kclip.config.deepspeed_config``). With ``kclip-torch``
                        and ``openclip-style`` they split the gap into what the losses cost and what each engine
                        costs.
- ``openclip-style``  : what one would write by hand on open_clip: ``open_clip.loss.ClipLoss`` + an eager
                        projected MSE + the same concept CE, fp32 master weights, ``torch.autocast(bf16)``
                        (open_clip's ``amp_bf16``), fused torch AdamW with kclip's parameter groups, clipping at
                        1.0; DDP when launched with > 1 rank. No DeepSpeed.
- ``online-teacher``  : ``kclip-fused`` with an 8-bit teacher run on every batch's captions (a Llama-2-7B shaped
                        ``LlamaModel`` with random weights, int8 through kclip's quantisation): what caching the
                        teacher ("embeddings as teachers") saves.

Every step: forward, loss, backward, clip, optimizer step, zero grads. The kclip rows call the product's own
``Trainer.train_step`` (no copy of it here); ``engine`` in each record says which engine stepped.

Inputs: random images / caption tokens already on the device (the input pipeline is ``bench_loader``'s job),
random fp16 (N, d') L2-normalised targets standing in for the teacher cache (gathered per step), random concept
labels and a random frozen classifier C with ``--num-concepts`` classes.

Timing: ``--warmup`` steps, then ``--steps`` steps timed one by one (CUDA events on a GPU, no host sync inside
the loop; wall clock on CPU); median / p20 / p80 step time. ``pairs_per_s`` is per GPU (batch / median step).
``peak_bytes``: the device's peak allocation during the steps above what was allocated before the impl was
built (weights + grads + optimizer state + activations; the teacher's weights for ``online-teacher``).

MFU: forward FLOPs are *counted* with ``torch.utils.flop_counter.FlopCounterMode`` over one forward of the
student with the reference losses (image and text towers, W_e, C, the contrastive logits); model FLOPs per step
= 3 x forward (PaLM's convention; the online teacher's FLOPs are *not* student FLOPs and are not counted).
MFU = model FLOPs / median step time / the device's dense bf16 peak (``PEAK_BF16_TFLOPS``; None on CPU or an
unknown GPU; the bf16 peak is used for ``--precision fp32`` too, so fp32 MFU reads low by design).

Kernel path: on CPU the fused losses fall back to the PyTorch references unless ``TRITON_INTERPRET=1``, so
``kclip-fused`` vs ``kclip-reference`` means something only on a GPU; each record says which path ran
(``kernel_path``).

    python -m bench.bench_train_step                       # GPU: ViT-B-32, 224 px, batch 256, bf16, all impls
    python -m bench.bench_train_step --models ViT-B-32 ViT-B-16
    torchrun --nproc_per_node 8 -m bench.bench_train_step  # data parallel: DDP (openclip-style, torch engine), ZeRO
    python -m bench.bench_train_step --quick --results-dir /tmp/r   # kclip-tiny on CPU, seconds

Results append to ``<results-dir>/train_step.jsonl`` (one record per model x impl, with the ratios
``vs_openclip_style`` and ``vs_online_teacher``); a bar plot goes beside it.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.harness import RESULTS_DIR, ResultsLog, format_profile, is_oom, profile_fn, provenance, time_steps

NAME = "train_step"
IMPLS = ("kclip-fused", "kclip-reference", "openclip-style", "online-teacher", "kclip-zero1", "kclip-zero3",
         "kclip-zero0", "kclip-torch", "kclip-zero2", "kclip-graph")
GPU_ONLY = ("kclip-graph",)  # left out (and said so) on a CPU

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets. First match wins,
# so the more specific names come first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),   # SXM (HBM3)
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("B200", 2250.0),
)

# The Knowledge-CLIP objective weights (paper: alpha = gamma = 1, beta = 0.01).
ALPHA, BETA, GAMMA = 1.0, 0.01, 1.0
GRAD_CLIP = 1.0

# Targets on one H100 for ViT-B-32, 224 px, batch 256, bf16 (printed as pass/fail when that is what ran).
TARGETS = {"vs_openclip_style": 1.3, "vs_online_teacher": 5.0, "mfu": 0.40}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Inputs:
    """Synthetic device-resident batches, cycled through by the steps."""
    images: list            # each (B, 3, H, W) in the step dtype
    tokens: list            # each (B, L) int64
    rows: list              # each (B,) int64 rows of the target "cache"
    targets: torch.Tensor   # (N, d') fp16, L2-normalised: stands in for the teacher cache
    concepts: torch.Tensor  # (N,) int64 concept labels
    classifier: tuple       # frozen C: weight (K, d'), bias (K,)
    teacher_tokens: list = field(default_factory=list)  # per batch: caption token ids for the online teacher

    def batch(self, i: int) -> tuple:
        j = i % len(self.images)
        rows = self.rows[j]
        return self.images[j], self.tokens[j], self.targets[rows], self.concepts[rows]


def caption_tokens(batch: int, context: int, vocab: int, rng: np.random.Generator) -> torch.Tensor:
    """CLIP-tokenised captions: SOT, ~13-word lognormal lengths of random ids, EOT (the largest id), zero pad."""
    sot, eot = vocab - 2, vocab - 1
    lengths = np.clip(np.round(rng.lognormal(np.log(13.0), 0.45, size=batch) * 1.3), 3, context - 2).astype(int)
    tokens = np.zeros((batch, context), dtype=np.int64)                          # (B, L)
    for row, n in enumerate(lengths):
        tokens[row, 0] = sot
        tokens[row, 1:n + 1] = rng.integers(1, sot, size=n)
        tokens[row, n + 1] = eot
    return torch.from_numpy(tokens)


def make_inputs(clip: nn.Module, batch: int, teacher_dim: int, num_concepts: int, teacher_vocab: int,
                dtype: torch.dtype, device: torch.device, distinct: int = 2, seed: int = 0) -> Inputs:
    """``distinct`` batches of random inputs on ``device`` for a student ``clip`` (its image size / context)."""
    from bench.bench_teacher import caption_lengths

    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    size = clip.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    context = int(clip.context_length)
    vocab = int(clip.vocab_size)
    n_rows = batch * distinct * 2
    targets = torch.randn(n_rows, teacher_dim, generator=g)                      # (N, d')
    targets = F.normalize(targets, dim=1).to(device, torch.float16)
    images, tokens, rows, teacher_tokens = [], [], [], []
    for _ in range(distinct):
        images.append(torch.randn(batch, 3, *size, generator=g).to(device, dtype))   # (B, 3, H, W)
        tokens.append(caption_tokens(batch, context, vocab, rng).to(device))         # (B, L)
        rows.append(torch.randperm(n_rows, generator=g)[:batch].to(device))          # (B,)
        lens = caption_lengths(batch, rng)
        teacher_tokens.append([[1] + rng.integers(3, teacher_vocab, size=int(n) - 1).tolist() for n in lens])
    concepts = torch.randint(0, num_concepts, (n_rows,), generator=g).to(device)     # (N,)
    weight = (torch.randn(num_concepts, teacher_dim, generator=g) / teacher_dim ** 0.5).to(device)  # (K, d')
    bias = torch.zeros(num_concepts, device=device)                                   # (K,)
    return Inputs(images, tokens, rows, targets, concepts, (weight, bias), teacher_tokens)


# ----------------------------------------------------------------------------------------------------------
# The steps
# ----------------------------------------------------------------------------------------------------------

def _config(batch: int, precision: str, zero_stage: int = 2, impl: str = "triton", num_concepts: int = 1000,
            engine: str = "auto"):
    """A kclip Config for the step: the paper's loss weights, the given batch / precision / engine / ZeRO stage /
    impls."""
    from kclip.config import Config

    cfg = Config()
    cfg.train.batch_size = batch
    cfg.train.precision = precision
    cfg.train.engine = engine
    cfg.train.zero_stage = zero_stage
    cfg.train.grad_clip = GRAD_CLIP
    cfg.train.warmup_steps = 10
    cfg.loss.alpha, cfg.loss.beta, cfg.loss.gamma = ALPHA, BETA, GAMMA
    cfg.loss.contrastive_impl = cfg.loss.distill_impl = impl
    cfg.concepts.k = num_concepts
    return cfg


class Runner:
    """One implementation's training step over a fresh copy of the student; ``close()`` frees it."""

    kernel_path = "n/a"
    optimizer_name = "torch AdamW"
    engine = "none (hand-written loop)"
    note = ""

    def step(self, i: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        for k in list(vars(self)):
            setattr(self, k, None)


class KclipRunner(Runner):
    """The product's step: ``kclip.trainer.Trainer.train_step`` (``engine`` as ``train.engine``, ZeRO ``stage`` for
    DeepSpeed, the YAML's precision, fused or reference losses), optionally with the teacher run on every batch
    (online-teacher)."""

    def __init__(self, impl: str, model: nn.Module, inputs: Inputs, args, dist, stage: int = 2, teacher=None,
                 engine: str = "auto", cuda_graph: bool = False):
        from kclip.trainer import Trainer

        which = "reference" if impl == "kclip-reference" else "triton"
        model.head.distill_impl = which
        cfg = _config(args.batch_size, args.precision, stage, which, args.num_concepts, engine)
        cfg.train.compile = args.compile
        cfg.train.cuda_graph = cuda_graph
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.trainer = Trainer(cfg, model, dist, total_steps=10_000)
        self.inputs, self.teacher, self.device = inputs, teacher, dist.device
        self.kernel_path = "reference" if which == "reference" else kernel_path(dist.device)
        if self.trainer.engine_name == "torch":
            self.engine = "torch"
            self.optimizer_name = f"torch engine: AdamW on fp32 master weights ({args.precision})"
            if cuda_graph:
                self.engine, self.optimizer_name = "torch+cuda_graph", self.optimizer_name + ", captured step"
        else:
            self.engine = f"deepspeed-zero{stage}"
            self.optimizer_name = f"DeepSpeed ZeRO-{stage} over torch AdamW ({args.precision})"
        if teacher is not None:
            self.note = (f"teacher {teacher.name} int8 ({sum(1 for _ in teacher.model.layers)} layers, "
                         f"d'={teacher.dim}) on every batch")

    def step(self, i: int) -> None:
        images, tokens, cached, concept = self.inputs.batch(i)
        if self.teacher is not None:  # what caching the teacher saves: its forward on every batch
            j = i % len(self.inputs.teacher_tokens)
            emb = self.teacher.encode_tokenized(self.inputs.teacher_tokens[j])   # (B, d') fp32
            cached = F.normalize(emb, dim=1).to(self.device, torch.float16, non_blocking=True)  # as the cache
        self.trainer.train_step({"image": images, "tokens": tokens, "teacher": cached, "concept": concept})

    def close(self) -> None:
        engine = getattr(self.trainer, "engine", None) if self.trainer is not None else None
        if engine is not None and hasattr(engine, "destroy"):
            with contextlib.suppress(Exception):
                engine.destroy()
        super().close()


class OpenClipStyleRunner(Runner):
    """The baseline one would write by hand on open_clip: ``open_clip.loss.ClipLoss`` + an eager projected MSE
    (Eq. 1: squared L2 over d' per caption, batch mean) + the same concept CE, fp32 master weights,
    ``torch.autocast(bf16)`` (open_clip's ``amp_bf16``), fused torch AdamW with kclip's parameter groups,
    gradient clipping at 1.0; DDP at > 1 rank."""

    def __init__(self, model: nn.Module, inputs: Inputs, args, dist):
        import open_clip

        from kclip.trainer import build_optimizer

        self.model, self.inputs, self.device = model, inputs, dist.device
        cfg = _config(args.batch_size, args.precision)
        self.optimizer = build_optimizer(model, cfg.train, dist.device)  # the train stage's AdamW and groups
        self.params = [p for p in model.parameters() if p.requires_grad]
        if args.compile:
            model.compile()
        self.forward = model
        if dist.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                         else contextlib.nullcontext())
        self.clip_loss = open_clip.loss.ClipLoss(local_loss=False, gather_with_grad=True, cache_labels=True,
                                                 rank=dist.rank, world_size=dist.world_size)
        self.kernel_path = "open_clip ClipLoss + eager MSE"

    def loss(self, i: int) -> torch.Tensor:
        """Batch ``i``'s total loss (under autocast): open_clip's ClipLoss, an eager projected MSE, the concept CE."""
        images, tokens, teacher, concept = self.inputs.batch(i)
        head = self.model.head
        with self.autocast:
            out = self.forward(images, tokens)  # embeddings and logit scale only (no teacher / concept)
            l_cont = self.clip_loss(out["image"], out["text"], out["logit_scale"])
            proj = F.linear(out["text"], head.weight, head.bias)                          # (B, d')
            l_emb = (proj.float() - teacher.float()).pow(2).sum(-1).mean()
            img = F.linear(out["image"], head.weight.detach(), head.bias.detach())        # (B, d')
            l_conc = F.cross_entropy(F.linear(img.float(), head.concept_weight, head.concept_bias), concept)
            return ALPHA * l_emb + BETA * l_conc + GAMMA * l_cont

    def step(self, i: int) -> None:
        self.loss(i).backward()
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def kernel_path(device: torch.device) -> str:
    """Which code the fused losses run on ``device``: Triton, the Triton interpreter, or the CPU fallback."""
    from kclip.kernels.dispatch import interpreting, use_triton

    probe = torch.empty(1, device=device)
    if not use_triton(probe):
        return "reference (CPU fallback: set TRITON_INTERPRET=1 for the kernels)"
    return "triton-interpreter" if interpreting() else "triton"


# ----------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------

def count_forward_flops(model: nn.Module, inputs: Inputs, precision: str, device: torch.device) -> int:
    """FLOPs of one forward of the student + the reference loss on one batch (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    from kclip.losses import KnowledgeClipLoss

    loss_fn = KnowledgeClipLoss(ALPHA, BETA, GAMMA, "reference")
    images, tokens, teacher, concept = inputs.batch(0)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    counter = FlopCounterMode(display=False)
    impl, model.head.distill_impl = model.head.distill_impl, "reference"  # FlopCounterMode cannot see Triton
    try:
        with torch.no_grad(), autocast, counter:
            loss_fn(model(images, tokens, teacher, concept))
    finally:
        model.head.distill_impl = impl
    return int(counter.get_total_flops())


def build_teacher(shape: dict, device: torch.device):
    """A random-weight Llama of ``shape``, int8 through kclip.teacher's quantisation, wrapped as a Teacher."""
    from bench.bench_teacher import build_model
    from kclip.teacher import Teacher

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(shape, "int8", device)
    name = "llama2-7b-shape" if shape["hidden_size"] == 4096 else "tiny-llama"
    return Teacher.from_model(model, None, name=name, precision="int8", pooling="mean", max_length=77,
                              device=device, pad_token_id=0)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_impl(impl: str, base: nn.Module, inputs: Inputs, args, dist, teacher_shape: dict) -> dict:
    """Build, warm up, time and free one implementation; returns its measurement fields (or error/skip)."""
    device = dist.device
    _free(device)
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runner = None
    rec: dict = {}
    steps, warmup = args.steps, args.warmup
    t_setup = time.perf_counter()
    try:
        torch.manual_seed(1)
        model = copy.deepcopy(base).to(device)
        if args.grad_checkpointing:
            model.clip.set_grad_checkpointing(True)
        model.train()
        if impl == "openclip-style":
            runner = OpenClipStyleRunner(model, inputs, args, dist)
        else:
            teacher = None
            if impl == "online-teacher":
                t0 = time.perf_counter()
                teacher = build_teacher(teacher_shape, device)
                rec["teacher_build_s"] = time.perf_counter() - t0
                steps, warmup = min(steps, args.teacher_steps), min(warmup, 2)
            engine = {"kclip-torch": "torch", "kclip-graph": "torch"}.get(
                impl, "deepspeed" if impl.startswith("kclip-zero") else "auto")
            stage = int(impl[-1]) if impl.startswith("kclip-zero") else 2
            runner = KclipRunner(impl, model, inputs, args, dist, stage, teacher, engine,
                                 cuda_graph=impl == "kclip-graph")
            if impl == "kclip-graph":  # its eager warm-up steps and the capture stay out of the timed steps
                from kclip.step_graph import WARMUP_STEPS

                warmup = max(warmup, WARMUP_STEPS + 1)
        del model
        rec["setup_s"] = time.perf_counter() - t_setup
        t_run = time.perf_counter()
        rec.update(time_steps(runner.step, device, warmup, steps))
        rec["run_s"] = time.perf_counter() - t_run
        rec["steps"], rec["warmup"] = steps, warmup
        if args.profile:
            calls = iter(range(warmup + steps, 10 ** 9))  # the next batches, as the timed loop would take them
            rec["profile"] = profile_fn(lambda: runner.step(next(calls)), device, rep=2 if args.quick else 3)
        if device.type == "cuda":
            rec["peak_bytes"] = torch.cuda.max_memory_allocated(device) - baseline
        else:
            rec["peak_bytes"] = None
    except Exception as exc:  # noqa: BLE001 - one impl failing must not lose the others' results
        rec["error"] = ("OOM: " if is_oom(exc) else "") + f"{type(exc).__name__}: {exc}"[:400]
    finally:
        if runner is not None:
            rec.update(kernel_path=runner.kernel_path, optimizer=runner.optimizer_name, engine=runner.engine)
            if runner.note:
                rec["note"] = runner.note
            runner.close()
        runner = None
        _free(device)
    return rec


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------

def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="kclip-tiny on CPU, batch 16, 3 steps, fp32, tiny int8 Llama, every impl")
    p.add_argument("--results-dir", default=None, help=f"where the JSONL and plot go (default {RESULTS_DIR})")
    p.add_argument("--models", nargs="+", default=None, help="open_clip model names (default ViT-B-32)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per GPU per step (default 256)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per impl (default 30)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10)")
    p.add_argument("--teacher-steps", type=int, default=None, help="timed steps for online-teacher (default 8)")
    p.add_argument("--teacher-layers", type=int, default=None, help="override the teacher's 32 layers")
    p.add_argument("--num-concepts", type=int, default=None, help="K (default 1000)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (engine.compile for DeepSpeed)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="also profile each impl's step (device vs host time, top kernels) into its record")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=None, help="subset of impls (default all)")
    p.add_argument("--device", default=None, help="default: the rank's GPU, else cpu (--quick: cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads while running (--quick: 1, stable timings on a shared machine)")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.quick
    if args.quick:
        defaults = dict(models=["kclip-tiny"], precision="fp32", batch_size=16, steps=3, warmup=1, teacher_steps=2,
                        num_concepts=16, impls=list(IMPLS), threads=1)
    else:
        defaults = dict(models=["ViT-B-32"], precision="bf16" if gpu else "fp32", batch_size=256, steps=30,
                        warmup=10, teacher_steps=8, num_concepts=1000, impls=list(IMPLS))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def _setup_dist(args):
    """The process group and this rank's device.

    ``kclip.distributed.setup()`` makes a one-rank group when not launched (NCCL when a GPU is visible, else
    gloo). A CPU run (``--quick`` / ``--device cpu``) needs gloo even on a GPU machine, so it asks for gloo; if
    an NCCL group already exists, ``--quick`` runs on the GPU instead.
    """
    import torch.distributed as tdist

    from kclip.distributed import DistInfo, setup

    want = torch.device(args.device) if args.device else (torch.device("cpu") if args.quick else None)
    cpu_on_gpu_machine = want is not None and want.type == "cpu" and torch.cuda.is_available()
    info = setup(backend="gloo" if cpu_on_gpu_machine and not tdist.is_initialized() else None)
    if want is not None and want.type == "cpu" and tdist.get_backend() == "nccl" and not args.device:
        want = info.device
    return DistInfo(info.rank, info.world_size, info.local_rank, want or info.device)


def add_ratios(records: list[dict]) -> None:
    """Per model: throughput ratios vs openclip-style and online-teacher (in place)."""
    by_model: dict = {}
    for r in records:
        if r.get("ms_median"):
            by_model.setdefault(r["model"], {})[r["impl"]] = r["ms_median"]
    for r in records:
        ms = by_model.get(r["model"], {})
        if not r.get("ms_median"):
            continue
        for key, ref in (("vs_openclip_style", "openclip-style"), ("vs_online_teacher", "online-teacher")):
            if ref in ms and r["impl"] != ref:
                r[key] = ms[ref] / r["ms_median"]


def summary(records: list[dict]) -> str:
    lines = [f"{'model':<12} {'impl':<17} {'ms med':>9} {'p20':>9} {'p80':>9} {'pairs/s':>10} {'MFU':>6} "
             f"{'peak GiB':>8} {'vs oc':>6} {'vs onl':>7}  kernel_path"]
    fmt = lambda v, f: (f % v) if isinstance(v, (int, float)) else "-"  # noqa: E731
    for r in records:
        if "error" in r:
            lines.append(f"{r['model']:<12} {r['impl']:<17} ERROR {r['error']}")
            continue
        peak = r["peak_bytes"] / 2**30 if r.get("peak_bytes") else None
        lines.append(f"{r['model']:<12} {r['impl']:<17} {r['ms_median']:9.2f} {r['ms_p20']:9.2f} {r['ms_p80']:9.2f} "
                     f"{r['pairs_per_s']:10.1f} {fmt(r['mfu'] * 100 if r.get('mfu') else None, '%.1f%%'):>6} "
                     f"{fmt(peak, '%.2f'):>8} {fmt(r.get('vs_openclip_style'), '%.2fx'):>6} "
                     f"{fmt(r.get('vs_online_teacher'), '%.1fx'):>7}  {r.get('kernel_path', '')}")
    return "\n".join(lines)


def check_targets(records: list[dict]) -> list[str]:
    """Pass/fail lines for the GPU targets, for the ViT-B-32 / 224 / 256 / bf16 GPU records."""
    out = []
    rs = {r["impl"]: r for r in records if r["model"] == "ViT-B-32" and r["batch"] == 256
          and r["precision"] == "bf16" and not r["device"].lower().startswith("cpu") and "error" not in r}
    fused = rs.get("kclip-fused")
    if not fused:
        return out
    checks = [("kclip-fused vs openclip-style", fused.get("vs_openclip_style"), TARGETS["vs_openclip_style"]),
              ("kclip-fused vs online-teacher", fused.get("vs_online_teacher"), TARGETS["vs_online_teacher"]),
              ("kclip-fused MFU", fused.get("mfu"), TARGETS["mfu"])]
    for what, value, target in checks:
        state = "n/a" if value is None else ("PASS" if value >= target else "FAIL")
        out.append(f"  {state:4} {what}: {'-' if value is None else f'{value:.3f}'} (target >= {target})")
    return out


def plot(records: list[dict], out_png: Path) -> Path | None:
    ok = [r for r in records if r.get("pairs_per_s")]
    if not ok:
        return None

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kclip.atomic import atomic_path

    models = sorted({r["model"] for r in ok})
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        rs = [r for r in ok if r["model"] == model]
        ax.barh([r["impl"] for r in rs], [r["pairs_per_s"] for r in rs], color="tab:blue")
        for y, r in enumerate(rs):
            label = f"{r['pairs_per_s']:.0f}" + (f"  MFU {r['mfu']:.0%}" if r.get("mfu") else "")
            ax.text(r["pairs_per_s"], y, " " + label, va="center", fontsize=7)
        ax.set_xlabel("pairs/s per device")
        ax.set_title(f"{model}, batch {rs[0]['batch']}, {rs[0]['precision']} ({rs[0]['device']})", fontsize=8)
        ax.invert_yaxis()
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return out_png


def main(argv=None) -> list[dict]:
    args = _parse(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)


def _main(args) -> list[dict]:
    from bench.bench_teacher import LLAMA2_7B, TINY
    from kclip.model import KnowledgeClip, build_clip, register_model_configs

    register_model_configs()
    dist = _setup_dist(args)
    device = dist.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    teacher_shape = dict(TINY if args.quick or device.type == "cpu" else LLAMA2_7B)
    if args.teacher_layers:
        teacher_shape["num_hidden_layers"] = args.teacher_layers
    teacher_dim = teacher_shape["hidden_size"]
    prov = provenance(device)
    peak = peak_flops(device)
    impls = [i for i in IMPLS if i in args.impls]  # fixed order
    if device.type != "cuda" and any(i in GPU_ONLY for i in impls):
        if dist.is_main:
            print(f"[train_step] skipped on {device.type}: {', '.join(i for i in impls if i in GPU_ONLY)} (CUDA only)")
        impls = [i for i in impls if i not in GPU_ONLY]
    log = ResultsLog(NAME, args.results_dir) if dist.is_main else None
    records: list[dict] = []
    for name in args.models:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clip, _, _, _ = build_clip(name, seed=0)
        base = KnowledgeClip(clip, teacher_dim, args.num_concepts)
        inputs = make_inputs(clip, args.batch_size, teacher_dim, args.num_concepts, teacher_shape["vocab_size"],
                             dtype, device, seed=dist.rank)
        base.load_concept_classifier(*(t.cpu() for t in inputs.classifier))
        size = clip.visual.image_size
        common = {**prov, "bench": NAME, "model": name, "image_size": size[0] if isinstance(size, (tuple, list))
                  else size, "batch": args.batch_size, "precision": args.precision, "world_size": dist.world_size,
                  "compile": args.compile, "grad_checkpointing": args.grad_checkpointing,
                  "teacher_dim": teacher_dim, "num_concepts": args.num_concepts,
                  "params": sum(p.numel() for p in base.parameters() if p.requires_grad)}
        try:
            probe = copy.deepcopy(base).to(device)
            fwd = count_forward_flops(probe, inputs, args.precision, device)
            del probe
            flop_fields = {"forward_flops": fwd, "flops_per_step": 3 * fwd,
                           "flop_count": "FlopCounterMode forward (student + reference loss) x 3"}
        except Exception as exc:  # noqa: BLE001
            flop_fields = {"forward_flops": None, "flops_per_step": None, "flop_count": f"failed: {exc}"[:200]}
        _free(device)
        for impl in impls:
            if dist.is_main:
                print(f"[train_step] {name} {impl} ...", flush=True)
            rec = {**common, "impl": impl, **flop_fields, "peak_flops": peak}
            rec.update(run_impl(impl, base, inputs, args, dist, teacher_shape))
            if rec.get("ms_median"):
                sec = rec["ms_median"] / 1e3
                rec["pairs_per_s"] = args.batch_size / sec
                rec["pairs_per_s_wall"] = args.batch_size / (rec["ms_wall_mean"] / 1e3)
                rec["mfu"] = (rec["flops_per_step"] / sec / peak) if (peak and rec.get("flops_per_step")) else None
            records.append(log.add(rec) if log else rec)  # on disk at once: a killed run keeps what it measured
            if dist.is_main:
                print(f"[train_step] {name} {impl}: " + (rec.get("error") or f"{rec['ms_median']:.2f} ms/step, "
                      f"{rec['pairs_per_s']:.0f} pairs/s" + (f", MFU {rec['mfu']:.1%}" if rec.get("mfu") else "")),
                      flush=True)
                if rec.get("profile"):
                    print(format_profile(rec["profile"]), flush=True)
        del base, inputs
        _free(device)
    add_ratios(records)
    if dist.is_main:
        print(summary(records))
        if device.type == "cpu":
            print("(CPU: absolute times are not meaningful; kclip-fused vs kclip-reference compares "
                  f"{records[0].get('kernel_path', '?') if records else '?'} vs reference)")
        lines = check_targets(records)
        if lines:
            print("targets (one H100, ViT-B-32, 224 px, batch 256, bf16):")
            print("\n".join(lines))
        out = log.update()  # the ratios, into this run's lines
        plot(records, out.with_suffix(".png"))
        print(f"[train_step] {len(records)} records -> {out}")
    return records


if __name__ == "__main__":
    main()
