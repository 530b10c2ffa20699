"""kclip.engine: the torch engine steps what the DeepSpeed engine steps, on 1 and 2 ranks, without host reads;
its checkpoints resume bit for bit; each engine refuses the other's checkpoints; ``train.engine: auto`` picks.

Losses are the reference implementations (no Triton interpreter): the engine is what is under test.
"""
import copy
import os

# Before run_ranks' ranks make their process group (tests/test_grad_cache.py says why).
import deepspeed  # noqa: F401
import open_clip  # noqa: F401
import pytest
import torch
import torch.distributed.nn.functional  # noqa: F401
import torch.nn.functional as F

from _dist import run_ranks
from kclip.config import Config, ConfigError, load_config
from kclip.distributed import DistInfo
from kclip.engine import CheckpointEngineError, TorchEngine, checkpoint_engine, choose_engine
from kclip.model import KnowledgeClip, build_clip
from kclip.trainer import Trainer

D_T, K, B = 24, 4, 4


def _data(clip, tokenizer, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = ("red", "blue", "green", "square", "circle", "cross", "above", "below", "small", "large")
    captions = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (5,), generator=g)) for _ in range(n)]
    return {"image": torch.randn(n, 3, *clip.visual.image_size, generator=g), "tokens": tokenizer(captions),
            "teacher": F.normalize(torch.randn(n, D_T, generator=g), dim=-1).half(),
            "concept": torch.randint(0, K, (n,), generator=g)}


def _rows(batch, lo, hi):
    return {k: v[lo:hi] for k, v in batch.items()}


def _trainer(clip, dist, engine="torch", zero_stage=2, precision="fp32", batch_size=B, accum=1, grad_cache=False,
             total_steps=20, **loss):
    cfg = Config()
    t = cfg.train
    t.engine, t.zero_stage, t.precision, t.batch_size = engine, zero_stage, precision, batch_size
    t.grad_accum_steps, t.grad_cache = accum, grad_cache
    # warm-up over 3 steps: the learning rate changes from step to step (the schedule is part of the state)
    t.lr, t.warmup_steps, t.grad_clip = 1e-3, 3, 0.5  # clipping at 0.5: active in these steps
    cfg.loss.contrastive_impl = cfg.loss.distill_impl = "reference"
    cfg.loss.beta = 0.5
    for k, v in loss.items():
        setattr(cfg.loss, k, v)
    torch.manual_seed(0)  # W_e and C: the same start for every trainer
    model = KnowledgeClip(copy.deepcopy(clip), D_T, K, distill_impl="reference")
    model.load_concept_classifier(torch.randn(K, D_T), torch.randn(K))
    return Trainer(cfg, model, dist, total_steps=total_steps)


def _run(trainer, batches):
    """The losses of the optimizer steps over ``batches`` (micro-batches, in order)."""
    return [out["loss"].clone() for out in map(trainer.train_step, batches) if out]


def _params(trainer):
    return [p.detach().float().clone() for p in trainer.engine.module.parameters()]


def _assert_same_run(a, b, rtol=1e-5, atol=1e-6, what=""):
    (losses_a, params_a), (losses_b, params_b) = a, b
    assert len(losses_a) == len(losses_b) > 0
    torch.testing.assert_close(torch.stack(losses_a), torch.stack(losses_b), rtol=rtol, atol=atol, msg=what)
    for i, (x, y) in enumerate(zip(params_a, params_b)):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=f"{what} parameter {i}")


@pytest.fixture(scope="module")
def tiny():
    clip, _, _, tokenizer = build_clip("kclip-tiny", seed=0)
    return clip, tokenizer


@pytest.fixture(scope="module")
def dist():
    from kclip.distributed import setup

    return setup()


@pytest.mark.parametrize("zero_stage, accum, grad_cache", [(0, 1, False), (2, 2, False), (2, 2, True)])
def test_torch_engine_steps_what_deepspeed_steps(tiny, dist, zero_stage, accum, grad_cache):
    """fp32, one rank, same start: same losses and parameters after 2 optimizer steps (AdamW, clipping, warm-up),
    with plain accumulation (1/grad_accum_steps in backward) and with the gradient cache (scale_wrt_gas=False)."""
    clip, tokenizer = tiny
    batches = [_rows(_data(clip, tokenizer, B * accum, seed=s), j * B, (j + 1) * B) for s in range(2)
               for j in range(accum)]
    runs = {}
    for engine in ("torch", "deepspeed"):
        trainer = _trainer(clip, dist, engine, zero_stage, accum=accum, grad_cache=grad_cache)
        assert trainer.engine_name == engine and isinstance(trainer.engine, TorchEngine) == (engine == "torch")
        runs[engine] = _run(trainer, batches), _params(trainer)
    _assert_same_run(runs["torch"], runs["deepspeed"], what=f"ZeRO-{zero_stage} accum {accum} gc {grad_cache}")


def _two_ranks(rank, world_size):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
    from kclip.distributed import setup

    dist = setup()
    one = DistInfo(0, 1, 0, torch.device("cpu"))  # this process alone: the big-batch reference, no collective
    clip, _, _, tokenizer = build_clip("kclip-tiny", seed=0)
    # the grad cache's second step: DDP raises in it if a parameter (the logit scale) missed the reducing backward
    for accum, grad_cache, steps in ((2, False, 1), (2, True, 2)):
        data = [_data(clip, tokenizer, 2 * B * accum, seed=s) for s in range(steps)]
        # two ranks: rank r's micro-batch j of a step is rows [(r*A + j)*B, ...) of the global step batch
        mine = [_rows(d, (rank * accum + j) * B, (rank * accum + j + 1) * B) for d in data for j in range(accum)]
        # one rank, twice the micro-batch: micro-batch j is both ranks' micro-batch j; with the gradient cache
        # the order of the rows in the one contrastive batch does not matter, with plain accumulation each
        # micro-batch is its own contrastive batch of 2B pairs, as on two ranks
        both = [{k: torch.cat([d[k][(r * accum + j) * B:(r * accum + j + 1) * B] for r in range(2)]) for k in d}
                for d in data for j in range(accum)]
        ddp = _trainer(clip, dist, "torch", accum=accum, grad_cache=grad_cache)
        assert ddp.engine.ddp is not None and not ddp.engine.ddp.find_unused_parameters
        losses = _run(ddp, mine)
        for loss in losses:  # L_emb and L_conc are this rank's means: the logged loss is their rank average
            torch.distributed.all_reduce(loss)
        got = [loss / world_size for loss in losses], _params(ddp)
        ref = _trainer(clip, one, "torch", batch_size=2 * B, accum=accum, grad_cache=grad_cache)
        want = _run(ref, both), _params(ref)
        _assert_same_run(got, want, what=f"rank {rank} accum {accum} grad_cache {grad_cache}")
    # W_e gets no gradient without L_emb and L_conc: DDP must be told to look for unused parameters
    idle = _trainer(clip, dist, "torch", alpha=0.0, beta=0.0)
    assert idle.engine.ddp.find_unused_parameters
    before = idle.model.head.weight.detach().clone()
    for s in range(2):
        idle.train_step(_rows(_data(clip, tokenizer, 2 * B, seed=s), rank * B, (rank + 1) * B))
    assert torch.equal(idle.model.head.weight, before)


def test_ddp_on_two_ranks_equals_one_rank_with_twice_the_batch():
    run_ranks(_two_ranks, timeout=240.0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_runs_and_learns_on_cpu(tiny, dist, precision):
    """autocast bf16 / fp16 (+ GradScaler) on CPU: fp32 weights stay fp32, fp32 inputs, the loss falls."""
    clip, tokenizer = tiny
    trainer = _trainer(clip, dist, precision=precision)
    assert trainer.dtype == torch.float32
    batch = _data(clip, tokenizer, B)
    losses = [float(trainer.train_step(batch)["loss"]) for _ in range(5)]
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert losses[-1] < 0.9 * losses[0], losses
    if precision == "fp16":  # the first steps overflow at GradScaler's initial scale and are skipped
        assert trainer.engine.scaler.get_scale() < 2.0 ** 16


def test_checkpoint_resume_continues_bit_for_bit(tiny, dist, tmp_path):
    clip, tokenizer = tiny
    batches = [_data(clip, tokenizer, B, seed=s) for s in range(3)]
    whole = _trainer(clip, dist, precision="fp16")  # fp16: the loss scale is part of the state
    want = _run(whole, batches), _params(whole)
    assert whole.engine.scaler.get_scale() < 2.0 ** 16  # step 1 overflowed: the scale moved

    first = _trainer(clip, dist, precision="fp16")
    losses = _run(first, batches[:2])
    first.save_checkpoint(tmp_path, 2, (0, 2), keep=1)
    first.save_checkpoint(tmp_path, 2, (0, 2), keep=1)  # saving the same step again is harmless
    assert checkpoint_engine(tmp_path) == "torch" and (tmp_path / "latest").read_text() == "step_00000002"
    resumed = _trainer(clip, dist, precision="fp16")
    assert resumed.load_checkpoint(tmp_path) == (2, 0, 2)
    got = losses + _run(resumed, batches[2:]), _params(resumed)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert torch.equal(a, b)


def test_each_engine_refuses_the_other_engines_checkpoint(tiny, dist, tmp_path):
    clip, _ = tiny
    for wrote, other in (("deepspeed", "torch"), ("torch", "deepspeed")):
        folder = tmp_path / wrote
        trainer = _trainer(clip, dist, wrote, zero_stage=0)
        trainer.save_checkpoint(folder, 1, (0, 1), keep=2)  # (before any step: the layout is what matters)
        assert checkpoint_engine(folder) == wrote
        with pytest.raises(CheckpointEngineError, match=rf"{folder / 'step_00000001'} was written by the {wrote} "
                           rf"engine; this run uses the {other} engine.*train.engine={wrote}.*new run_dir"):
            _trainer(clip, dist, other, zero_stage=0).load_checkpoint(folder)
        # auto resumes with the engine that wrote the checkpoint
        cfg = load_config(None, ["train.engine=auto"])
        assert choose_engine(cfg, trainer.model, dist.device, folder)[0] == wrote


def _forbid_host_reads(monkeypatch, allowed_ids):
    """Every way a step could read a device value on the host raises (CPU tensors stand in for the device's).
    ``allowed_ids``: tensors kept on the host by design (AdamW's step counters without fused/capturable)."""
    def forbid(name):
        real = getattr(torch.Tensor, name)

        def guard(self, *args, **kwargs):
            if id(self) in allowed_ids:
                return real(self, *args, **kwargs)
            raise AssertionError(f"Tensor.{name} in a steady-state step: the host waits for the device")
        return guard

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbid(name))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("torch.cuda.synchronize in a steady-state step")))


@pytest.mark.parametrize("precision, grad_cache", [("fp32", False), ("bf16", False), ("fp32", True)])
def test_torch_engine_step_reads_nothing_on_the_host(tiny, dist, monkeypatch, precision, grad_cache):
    clip, tokenizer = tiny
    accum = 2 if grad_cache else 1
    trainer = _trainer(clip, dist, precision=precision, accum=accum, grad_cache=grad_cache)
    data = _data(clip, tokenizer, B * accum)
    batches = [_rows(data, j * B, (j + 1) * B) for j in range(accum)]
    _run(trainer, batches)  # the first step builds the optimizer state
    steps = [st["step"] for st in trainer.optimizer.state.values()]
    assert steps and all(s.device.type == "cpu" for s in steps)
    with monkeypatch.context() as m:
        _forbid_host_reads(m, {id(s) for s in steps})
        out = _run(trainer, batches * (1 if grad_cache else 2))
    assert len(out) == (1 if grad_cache else 2) and torch.isfinite(torch.stack(out)).all()


def test_auto_picks_torch_when_the_state_fits_one_device(tiny, monkeypatch):
    clip, _ = tiny
    model = KnowledgeClip(copy.deepcopy(clip), D_T, K)
    cfg = load_config(None, [])
    assert cfg.train.engine == "auto"
    assert choose_engine(cfg, model, torch.device("cpu"))[0] == "torch"  # CPU: always
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)

    class Props:
        total_memory = 0

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    gpu = torch.device("cuda", 0)
    Props.total_memory = 2 * 16 * n          # fp32 weights + grads + AdamW moments take half: fits
    assert choose_engine(cfg, model, gpu)[0] == "torch"
    Props.total_memory = 2 * 16 * n - 1      # a byte less: ZeRO partitions them
    engine, why = choose_engine(cfg, model, gpu)
    assert engine == "deepspeed" and "ZeRO stage 2" in why
    Props.total_memory = 10 ** 15
    assert choose_engine(load_config(None, ["train.zero_stage=3"]), model, gpu)[0] == "deepspeed"
    assert choose_engine(load_config(None, ["train.engine=deepspeed"]), model, gpu)[0] == "deepspeed"


def test_engine_key_is_checked_and_stamped():
    with pytest.raises(ConfigError, match="'train.engine' is 'jax'"):
        load_config(None, ["train.engine=jax"])
    with pytest.raises(ConfigError, match="train.engine.*torch.*train.zero_stage=3.*deepspeed"):
        load_config(None, ["train.engine=torch", "train.zero_stage=3"])
    with pytest.raises(ConfigError, match="train.engine.*torch.*train.deepspeed_config"):
        load_config(None, ["train.engine=torch", "train.deepspeed_config=zero2"])
    # it changes the step's rounding: a train input; stamps made before the key existed (auto) stay current
    from kclip.pipeline import config_inputs, recorded_if_not

    assert config_inputs(load_config(None, ["train.engine=torch"]), "train")["train.engine"] == "torch"
    assert "train.engine" not in config_inputs(load_config(None), "train")
    assert recorded_if_not(load_config(None))["train.engine"] == "auto"
