"""train.cuda_graph: the captured step (kclip/step_graph.py), its device-side learning rate and its refusals.

On CPU: what the config and the trainer refuse, and that the device-side lr (a tensor the scheduler writes in
place) steps exactly what the float lr steps, reads nothing on the host and survives a resume. On a GPU
(``pytest -m cuda``): the captured and replayed step equals the eager step.
"""
import copy

import pytest
import torch

from kclip.config import Config, ConfigError, load_config
from kclip.engine import choose_engine
from kclip.model import KnowledgeClip
from kclip.trainer import Trainer
from test_engine import D_T, K, B, _assert_same_run, _data, _forbid_host_reads, _params, _run
from test_engine import dist, tiny  # noqa: F401  (the fixtures: the tiny CLIP and this process's rank)


def _trainer(clip, dist, cuda_graph, precision="fp32", impl="reference"):
    cfg = Config()
    t = cfg.train
    t.engine, t.precision, t.batch_size, t.cuda_graph = "torch", precision, B, cuda_graph
    t.lr, t.projector_lr, t.warmup_steps, t.grad_clip = 1e-3, 3e-3, 3, 0.5  # lr moves every step; clipping active
    cfg.loss.contrastive_impl = cfg.loss.distill_impl = impl
    cfg.loss.beta = 0.5
    torch.manual_seed(0)
    model = KnowledgeClip(copy.deepcopy(clip), D_T, K, distill_impl=impl)
    model.load_concept_classifier(torch.randn(K, D_T), torch.randn(K))
    return Trainer(cfg, model, dist, total_steps=20)


@pytest.mark.parametrize("override, key", [("train.engine=deepspeed", "train.engine"),
                                           ("train.zero_stage=3", "train.zero_stage"),
                                           ("train.precision=fp16", "train.precision"),
                                           ("train.grad_accum_steps=2", "train.grad_accum_steps")])
def test_config_refuses_what_one_captured_step_cannot_do(override, key):
    with pytest.raises(ConfigError, match=rf"'train.cuda_graph' is true but {key}=.*set train.cuda_graph to false"):
        load_config(None, ["train.cuda_graph=true", override])
    with pytest.raises(ConfigError, match="'train.cuda_graph=maybe'.*not a valid bool"):
        load_config(None, ["train.cuda_graph=maybe"])
    # not a stage input: the same maths, so a run directory stays current when it is turned on
    from kclip.pipeline import config_inputs

    assert "train.cuda_graph" not in config_inputs(load_config(None, ["train.cuda_graph=true"]), "train")


def test_trainer_on_cpu_says_it_needs_a_gpu(tiny, dist):
    if dist.device.type == "cuda":
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="'train.cuda_graph' is true but this run trains on cpu: CUDA graphs need"):
        _trainer(tiny[0], dist, cuda_graph=True)
    cfg = load_config(None, ["train.cuda_graph=true"])
    assert choose_engine(cfg, torch.nn.Linear(2, 2), torch.device("cuda", 0))[0] == "torch"  # auto: no ZeRO


def _device_lr_trainer(clip, dist, monkeypatch):
    """A cuda_graph trainer on CPU minus the capture: its optimizer and scheduler as on the GPU (tensor lrs)."""
    import kclip.step_graph

    monkeypatch.setattr(kclip.step_graph, "check_graphable", lambda *a: None)
    trainer = _trainer(clip, dist, cuda_graph=True)
    trainer.step_graph = None  # the eager step over the same engine.update/advance the graph captures
    return trainer


def test_device_lr_steps_what_the_float_lr_steps(tiny, dist, monkeypatch, tmp_path):
    clip, tokenizer = tiny
    batches = [_data(clip, tokenizer, B, seed=s) for s in range(5)]
    plain = _trainer(clip, dist, cuda_graph=False)
    want = _run(plain, batches), _params(plain)
    lrs_want = [g["lr"] for g in plain.optimizer.param_groups]

    dev = _device_lr_trainer(clip, dist, monkeypatch)
    lr_tensors = [g["lr"] for g in dev.optimizer.param_groups]
    assert all(isinstance(t, torch.Tensor) and t.ndim == 0 for t in lr_tensors)
    assert len({id(t) for t in lr_tensors}) == len(lr_tensors)  # one tensor per group: no aliasing
    losses = _run(dev, batches[:2])
    steps = {id(st["step"]) for st in dev.optimizer.state.values()}  # CPU AdamW keeps its counters on the host
    with monkeypatch.context() as m:  # the scheduler writes the lr without reading it back
        _forbid_host_reads(m, steps)
        losses += _run(dev, batches[2:3])
    dev.save_checkpoint(tmp_path, 3, (0, 3), keep=1)
    losses += _run(dev, batches[3:])
    # an fp32 lr in place of Python's double: the same steps up to its rounding
    _assert_same_run(want, (losses, _params(dev)), what="device lr")
    assert [float(g["lr"]) for g in dev.optimizer.param_groups] == pytest.approx(lrs_want, rel=1e-7)
    assert all(g["lr"] is t for g, t in zip(dev.optimizer.param_groups, lr_tensors))  # the tensors a graph reads

    resumed = _device_lr_trainer(clip, dist, monkeypatch)
    lr_tensors = [g["lr"] for g in resumed.optimizer.param_groups]
    assert resumed.load_checkpoint(tmp_path) == (3, 0, 3)
    assert all(g["lr"] is t for g, t in zip(resumed.optimizer.param_groups, lr_tensors))  # loaded in place
    got = losses[:3] + _run(resumed, batches[3:]), _params(resumed)
    _assert_same_run((losses, _params(dev)), got, rtol=0, atol=0, what="device lr, resumed")  # bit for bit


@pytest.mark.cuda
@pytest.mark.parametrize("precision, impl", [("fp32", "reference"), ("fp32", "triton"), ("bf16", "triton")])
def test_captured_step_replays_the_eager_step(tiny, dist, precision, impl):
    """3 eager warm-up steps, the capture, then replays: the same losses and parameters as the eager trainer,
    with every loss term, clipping and a moving learning rate."""
    clip, tokenizer = tiny
    batches = [_data(clip, tokenizer, B, seed=s) for s in range(7)]
    eager = _trainer(clip, dist, cuda_graph=False, precision=precision, impl=impl)
    want = _run(eager, batches), _params(eager)
    graphed = _trainer(clip, dist, cuda_graph=True, precision=precision, impl=impl)
    got = _run(graphed, batches), _params(graphed)
    assert graphed.step_graph.captured and graphed.step_graph.steps == len(batches)
    tol = dict(rtol=1e-5, atol=1e-6) if precision == "fp32" else dict(rtol=2e-2, atol=2e-3)
    _assert_same_run(want, got, what=f"{precision} {impl}", **tol)
    with pytest.raises(ValueError, match=r"train.cuda_graph: batch\['image'\] is .*same shapes"):
        graphed.train_step(_data(clip, tokenizer, B + 1, seed=9))
