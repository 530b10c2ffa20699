"""train.grad_cache: the grad_accum_steps micro-batches are ONE contrastive batch with its exact gradient.

The reference is the run the option stands in for: batch_size x grad_accum_steps pairs per rank and no
accumulation. The gradients are read where the engine hands them to the optimizer (the base optimizer's
``step``, after ZeRO's or DDP's reduction and averaging over ranks; clipping off), so every engine path is
covered: DeepSpeed ZeRO 0-3 and the torch engine, 1 and 2 ranks (gloo), fp32 and bf16. With dropout in the student the reference is the big batch's
loss with the masks each micro-batch's forward draws: it needs the RNG replay (a control turns replay off and
must see the gradients differ). A hook counts the samples whose activations are alive for backward.
"""
import copy

import os

# Imported here, before run_ranks' ranks make their process group (a rank imports this module first): imported
# after it (DeepSpeed 0.19 at least), they left the group referenced past destroy_process_group, which
# tests/_dist.py refuses (torch.distributed.nn.functional binds the live group as a default argument).
import deepspeed  # noqa: F401
import open_clip  # noqa: F401
import pytest
import torch.distributed.nn.functional  # noqa: F401
import torch
import torch.nn.functional as F

from _dist import run_ranks
from kclip.config import Config
from kclip.losses import contrastive_loss
from kclip.model import KnowledgeClip, build_clip
from kclip.trainer import Trainer

D_T, K, B, A = 24, 4, 4, 3      # teacher dim, concepts, micro-batch, micro-batches per step
LOSS = dict(alpha=1.0, beta=0.5, gamma=1.0)  # every term on; beta large enough that L_conc's share shows


def _data(clip, tokenizer, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = ("red", "blue", "green", "square", "circle", "cross", "above", "below", "small", "large")
    captions = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (5,), generator=g)) for _ in range(n)]
    return {"image": torch.randn(n, 3, *clip.visual.image_size, generator=g),
            "tokens": tokenizer(captions),
            "teacher": F.normalize(torch.randn(n, D_T, generator=g), dim=-1).half(),
            "concept": torch.randint(0, K, (n,), generator=g)}


def _rows(batch, lo, hi):
    return {k: v[lo:hi] for k, v in batch.items()}


def _model(clip):
    torch.manual_seed(0)  # W_e and C: the same start for every trainer of a test
    model = KnowledgeClip(copy.deepcopy(clip), D_T, K, distill_impl="reference")
    model.load_concept_classifier(torch.randn(K, D_T), torch.randn(K))
    return model


def _trainer(model, dist, batch_size, accum, grad_cache, zero_stage=2, precision="fp32", impl="reference"):
    """zero_stage: DeepSpeed's ZeRO stage, or "torch" for the torch engine (DDP at 2 ranks)."""
    cfg = Config()
    t = cfg.train
    t.batch_size, t.grad_accum_steps, t.grad_cache, t.precision = batch_size, accum, grad_cache, precision
    t.engine, t.zero_stage = ("torch", 2) if zero_stage == "torch" else ("deepspeed", zero_stage)
    t.lr, t.warmup_steps, t.grad_clip = 1e-3, 1, 0.0  # no clipping: the raw gradient reaches the optimizer
    cfg.loss.alpha, cfg.loss.beta, cfg.loss.gamma = LOSS["alpha"], LOSS["beta"], LOSS["gamma"]
    cfg.loss.contrastive_impl, cfg.loss.distill_impl = impl, "reference"
    return Trainer(cfg, model, dist, total_steps=50)


def _capture_grads(trainer) -> list:
    """Record, per optimizer step, the gradients the base optimizer is given (flat ZeRO partitions or the
    module's parameters) as (id(param), fp32 copy); ZeRO calls the base step once per parameter group."""
    seen = []
    opt = trainer.optimizer
    real = opt.step

    def step(*args, **kwargs):
        if not seen or seen[-1][0] != trainer.engine.global_steps:
            seen.append((trainer.engine.global_steps, []))
        seen[-1][1].extend((id(p), p.grad.detach().float().clone()) for g in opt.param_groups for p in g["params"]
                           if p.grad is not None)
        return real(*args, **kwargs)

    opt.step = step
    return seen


def _grads(seen) -> list:
    return [[g for _, g in grads] for _, grads in seen]


def _step_both(clip, tokenizer, dist, zero_stage, precision="fp32", grad_cache=True, impl="reference",
               steps=1):
    """(grads, outputs) of the grad-cache trainer (B x A) and of the big-batch trainer (B*A x 1) on this rank's
    rows of the same global batches; rank r holds rows [r*B*A, (r+1)*B*A) in both, as the samplers give them."""
    r, p = dist.rank, dist.world_size
    big = _trainer(_model(clip), dist, B * A, 1, False, zero_stage, precision, impl)
    small = _trainer(_model(clip), dist, B, A, grad_cache, zero_stage, precision, impl)
    grads_big, grads_small = _capture_grads(big), _capture_grads(small)
    outs_big, outs_small = [], []
    for s in range(steps):
        data = _rows(_data(clip, tokenizer, B * A * p, seed=s), r * B * A, (r + 1) * B * A)
        outs_big.append(big.train_step(data))
        for j in range(A):
            out = small.train_step(_rows(data, j * B, (j + 1) * B))
            assert (out == {}) == (grad_cache and j < A - 1)  # grad cache: the step runs at the last micro-batch
        outs_small.append(out)
    assert len(grads_big) == len(grads_small) == steps
    return (_grads(grads_small), outs_small), (_grads(grads_big), outs_big)


def _assert_same(small, big, atol=2e-5, rtol=1e-4, what=""):
    (g_small, o_small), (g_big, o_big) = small, big
    for s, (gs, gb) in enumerate(zip(g_small, g_big)):
        assert len(gs) == len(gb)
        for i, (a, b) in enumerate(zip(gs, gb)):
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=f"{what} step {s} gradient {i}")
    for os_, ob in zip(o_small, o_big):
        assert set(os_) == set(ob) == {"loss", "contrastive", "distill", "concept", "logit_scale"}
        for k in ob:
            torch.testing.assert_close(os_[k].float(), ob[k].float(), atol=atol, rtol=rtol, msg=f"{what} {k}")


@pytest.fixture(scope="module")
def tiny():
    clip, _, _, tokenizer = build_clip("kclip-tiny", seed=0)
    return clip, tokenizer


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3, "torch"])
def test_gradient_equals_the_big_batch_on_one_rank(tiny, zero_stage):
    from kclip.distributed import setup

    clip, tokenizer = tiny
    # two steps: the second starts from the parameters the first one's (equal) gradient produced
    small, big = _step_both(clip, tokenizer, setup(), zero_stage, steps=2)
    _assert_same(small, big, what=f"zero {zero_stage}")


def test_plain_accumulation_is_not_the_big_batch(tiny):
    """The control that shows the comparison can fail: averaging per-micro-batch losses (each with B-1
    negatives) is another gradient."""
    from kclip.distributed import setup

    clip, tokenizer = tiny
    small, big = _step_both(clip, tokenizer, setup(), 2, grad_cache=False)
    with pytest.raises(AssertionError):
        _assert_same(small, big)


def test_gradient_equals_the_big_batch_with_the_triton_contrastive_kernel(tiny):
    """The product's default contrastive op (the Triton kernel; the interpreter on CPU)."""
    from kclip.distributed import setup

    clip, tokenizer = tiny
    small, big = _step_both(clip, tokenizer, setup(), 2, impl="triton")
    _assert_same(small, big, what="triton")


def test_bf16_gradient_equals_the_big_batch_within_bf16_rounding(tiny):
    from kclip.distributed import setup

    clip, tokenizer = tiny
    small, big = _step_both(clip, tokenizer, setup(), 2, precision="bf16")
    # bf16 activations: the micro-batch forwards round differently from the big batch's (other GEMM shapes)
    (gs, _), (gb, _) = small, big
    for a, b in zip(gs[0], gb[0]):
        err = (a - b).norm() / b.norm().clamp_min(1e-12)
        assert err < 0.05, f"relative gradient error {err:.3g}"
    _assert_same(small, big, atol=2e-2, rtol=2e-2, what="bf16")


def _two_ranks(rank, world_size, stages):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
    from kclip.distributed import setup

    dist = setup()
    assert (dist.rank, dist.world_size) == (rank, world_size)
    clip, _, _, tokenizer = build_clip("kclip-tiny", seed=0)
    for stage in stages:
        small, big = _step_both(clip, tokenizer, dist, stage)
        _assert_same(small, big, what=f"rank {rank} zero {stage}")
    if 3 in stages:
        # Any ZeRO-3 engine of DeepSpeed 0.19 (a bare nn.Linear too, engine.destroy() or not) keeps the process
        # group alive through its zero.Init parameter closures, which run_ranks rightly refuses: its gloo threads
        # could abort the interpreter's shutdown. Both ranks are done (barrier): leave without that shutdown.
        import sys

        import torch.distributed

        torch.distributed.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@pytest.mark.parametrize("stages", [(0, 2, "torch"), (3,)])
def test_gradient_equals_the_big_batch_on_two_ranks(stages):
    """The global batch is 2 x B x A pairs; each rank's (averaged) gradient equals the big-batch run's (torch: the
    torch engine's DDP average, which reduces only the last micro-batch's backward)."""
    run_ranks(_two_ranks, stages, timeout=300.0)


def _with_dropout(model):
    """Patch dropout in the image tower and dropout after a text block: both draw from the RNG."""
    from open_clip.transformer import PatchDropout

    model.clip.visual.patch_dropout = PatchDropout(0.5)
    block = model.clip.transformer.resblocks[1]
    block.register_forward_hook(lambda m, args, out: F.dropout(out, 0.3, m.training))
    return model


def _dropout_grads(tiny, replay: bool, monkeypatch):
    from kclip.distributed import setup

    clip, tokenizer = tiny
    data = _data(clip, tokenizer, B * A, seed=3)
    model = _with_dropout(_model(clip))
    reference = copy.deepcopy(model)
    trainer = _trainer(model, setup(), B, A, True, zero_stage=0)
    if not replay:
        monkeypatch.setattr(Trainer, "_set_rng_state", lambda self, state: None)
    seen = _capture_grads(trainer)
    torch.manual_seed(123)
    for j in range(A):
        trainer.train_step(_rows(data, j * B, (j + 1) * B))
    names = {id(p): n for n, p in trainer.engine.module.named_parameters()}
    assert len(seen) == 1
    got = {names[i]: g for i, g in seen[0][1]}  # ZeRO 0 in fp32: the optimizer steps the module's parameters

    # the big batch's loss with the masks drawn by each micro-batch's forward, in order, from the same state
    torch.manual_seed(123)
    reference.train()
    outs = [reference(*(_rows(data, j * B, (j + 1) * B)[k] for k in ("image", "tokens", "teacher", "concept")))
            for j in range(A)]
    cat = {k: torch.cat([o[k] for o in outs]) for k in ("image", "text")}
    loss = LOSS["gamma"] * contrastive_loss(cat["image"], cat["text"], outs[0]["logit_scale"], "reference")
    loss = loss + sum((LOSS["alpha"] * o["distill"] + LOSS["beta"] * o["concept"]) / A for o in outs)
    loss.backward()
    want = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert set(got) == set(want)
    return got, want


def test_dropout_masks_are_replayed(tiny, monkeypatch):
    got, want = _dropout_grads(tiny, True, monkeypatch)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=2e-5, rtol=1e-4, msg=name)


def test_without_rng_replay_the_dropout_gradient_is_wrong(tiny, monkeypatch):
    """The control of the test above: the re-run draws other masks, so the cached embedding gradients belong
    to another function."""
    got, want = _dropout_grads(tiny, False, monkeypatch)
    worst = max(float((got[n] - want[n]).norm() / want[n].norm().clamp_min(1e-12)) for n in want)
    assert worst > 1e-2


def test_one_micro_batch_of_activations_at_a_time(tiny):
    """A forward hook on each tower counts the samples whose output will be backpropagated (grad enabled) until
    their gradient arrives: never more than one micro-batch's."""
    from kclip.distributed import setup

    clip, tokenizer = tiny
    model = _model(clip)
    live = {"now": 0, "max": 0, "grad": 0, "no_grad": 0}

    def count(module, args, out):
        n = out.shape[0]
        if not (torch.is_grad_enabled() and out.requires_grad):
            live["no_grad"] += n
            return
        live["grad"] += n
        live["now"] += n
        live["max"] = max(live["max"], live["now"])
        out.register_hook(lambda g: live.__setitem__("now", live["now"] - n))

    model.clip.visual.register_forward_hook(count)
    model.clip.transformer.register_forward_hook(count)
    trainer = _trainer(model, setup(), B, A, True)
    data = _data(clip, tokenizer, B * A)
    for j in range(A):
        trainer.train_step(_rows(data, j * B, (j + 1) * B))
    # each tower sees every sample once without grad (embedding) and once with (the re-run)
    assert live["no_grad"] == live["grad"] == 2 * B * A
    assert live["now"] == 0
    assert live["max"] == 2 * B  # one micro-batch: its B images and B captions


# ----------------------------------------------------------------------------------------------------------
# The training loop: same pairs, same logged losses as the big batch; resume mid-epoch
# ----------------------------------------------------------------------------------------------------------

class _Teacher:
    """Stands in for kclip.targets.TeacherTargets: fixed random unit rows."""

    def __init__(self, n, dim=D_T, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.dim = dim
        self.rows = F.normalize(torch.randn(n, dim, generator=g), dim=-1).half().numpy()

    def batch(self, rows):
        return self.rows[list(rows)]


def make_train_inputs(root, n_train_images=48, n_val_images=12):
    """TrainInputs over the synthetic set written to ``root/data`` (train and val pairs, 2 captions an image)."""
    from kclip.data import build_index
    from kclip.synthetic import generate
    from kclip.trainer import TrainInputs

    generate(root / "data", n_train_images, n_val_images, 2, 32, 4, 0, progress=False)
    index = {s: build_index("csv", str(root / "data" / f"{s}.csv"), uid_column="uid", progress=False)
             for s in ("train", "val")}
    n = len(index["train"].pairs)
    g = torch.Generator().manual_seed(1)
    return TrainInputs(index=index["train"], teacher=_Teacher(n), labels=torch.randint(0, K, (n,), generator=g),
                       classifier_weight=torch.randn(K, D_T, generator=g), classifier_bias=torch.zeros(K),
                       eval_index=index["val"])


def train_config(run_dir, batch_size, accum=1, grad_cache=False, **extra):
    from kclip.config import load_config

    overrides = [f"run_dir={run_dir}", f"train.batch_size={batch_size}", f"train.grad_accum_steps={accum}",
                 f"train.grad_cache={str(grad_cache).lower()}", "train.epochs=1", "train.log_every=1",
                 "train.warmup_steps=2", "train.checkpoint_every=100", "train.r2_captions=0",
                 "loss.beta=0.5", "loss.contrastive_impl=reference", "loss.distill_impl=reference",
                 *[f"{k.replace('__', '.')}={v}" for k, v in extra.items()]]
    return load_config(None, overrides)


def step_records(run_dir):
    import json

    return [r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if "loss" in r]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_train_inputs(tmp_path_factory.mktemp("pairs"))


def test_training_logs_the_big_batch_losses_and_resumes_mid_epoch(inputs, tmp_path):
    from kclip.distributed import setup
    from kclip.trainer import train

    dist = setup()
    train(train_config(tmp_path / "big", 16), tmp_path / "big", inputs, dist, progress=False)
    train(train_config(tmp_path / "gc", 8, 2, True), tmp_path / "gc", inputs, dist, progress=False)
    cfg = train_config(tmp_path / "resumed", 8, 2, True)
    first = train(cfg, tmp_path / "resumed", inputs, dist, progress=False, stop_after=2)
    assert first["stopped_early"]
    train(cfg, tmp_path / "resumed", inputs, dist, progress=False)

    big, gc, resumed = (step_records(tmp_path / d) for d in ("big", "gc", "resumed"))
    assert [r["step"] for r in big] == [r["step"] for r in gc] == [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b, c in zip(gc, big, resumed):
        for key in ("loss", "contrastive", "distill", "concept", "logit_scale"):
            # the same pairs in the same order, the same gradient: the same numbers step after step
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(b[key])), (key, a, b)
            assert abs(c[key] - a[key]) <= 1e-6 * max(1.0, abs(a[key])), (key, c, a)


@pytest.mark.parametrize("world_size", [1, 2])
def test_micro_batches_are_the_big_batch_rows_of_each_rank(world_size):
    """Rank r's grad_accum_steps micro-batches of a step are, in order, the rows rank r gets with batch_size x
    grad_accum_steps and no accumulation, also after a resume in the middle of an epoch."""
    import itertools

    from kclip.distributed import DistInfo
    from kclip.trainer import _ResumableBatches

    n, b, a = 101, 3, 4
    per_epoch = n // (b * a * world_size)
    for rank in range(world_size):
        dist = DistInfo(rank, world_size, rank, torch.device("cpu"))
        big = _ResumableBatches(n, b * a, 0, dist, per_epoch, 0, 0)
        small = _ResumableBatches(n, b, 0, dist, per_epoch * a, 0, 0, split=a)
        want = list(itertools.islice(iter(big), 2 * per_epoch))           # two epochs
        got = list(itertools.islice(iter(small), 2 * per_epoch * a))
        assert [sum(got[i * a:(i + 1) * a], []) for i in range(2 * per_epoch)] == want
        resumed = _ResumableBatches(n, b, 0, dist, per_epoch * a, 0, 2 * a, split=a)  # from step 2
        assert list(itertools.islice(iter(resumed), a)) == got[2 * a:3 * a]


def test_grad_cache_is_an_input_of_the_train_stage():
    """It changes the trained batch; train stamps made before the key existed (grad_cache off) stay current."""
    from kclip.config import load_config
    from kclip.pipeline import config_inputs, recorded_if_not

    assert config_inputs(load_config(None, ["train.grad_cache=true"]), "train")["train.grad_cache"] is True
    assert "train.grad_cache" not in config_inputs(load_config(None), "train")
    assert recorded_if_not(load_config(None))["train.grad_cache"] is False
