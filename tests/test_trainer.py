"""kclip.trainer.Trainer: one train_step for the loop, the benches and the tests; the held-out R^2 of W_e(E_T(x))."""
import pytest
import torch
import torch.nn.functional as F

from kclip.config import Config
from kclip.distributed import setup
from kclip.model import KnowledgeClip, build_clip
from kclip.trainer import Trainer

D_T, K, B = 24, 4, 8


@pytest.fixture(scope="module")
def parts():
    clip, _, _, tokenizer = build_clip("kclip-tiny", seed=0)
    g = torch.Generator().manual_seed(0)
    captions = [f"a small red circle above a {c} {s}" for c in ("blue", "green", "yellow", "purple")
                for s in ("square", "cross")]
    batch = {"image": torch.randn(B, 3, *clip.visual.image_size, generator=g),
             "tokens": tokenizer(captions),
             "teacher": F.normalize(torch.randn(B, D_T, generator=g), dim=-1).half(),
             "concept": torch.randint(0, K, (B,), generator=g)}
    return clip, batch


def _trainer(clip, zero_stage=2, alpha=1.0, grad_cache_steps=0, engine="auto"):
    cfg = Config()
    # lr 1e-3: at 1e-2 AdamW collapses the 8-pair contrastive term to ln 8 on some head initialisations
    cfg.train.batch_size, cfg.train.zero_stage, cfg.train.lr, cfg.train.warmup_steps = B, zero_stage, 1e-3, 1
    cfg.train.engine = engine
    if grad_cache_steps:
        cfg.train.grad_cache, cfg.train.grad_accum_steps = True, grad_cache_steps
    cfg.loss.alpha = alpha
    import copy

    torch.manual_seed(0)  # the head's W_e and bias: the same start whatever ran before in the session
    model = KnowledgeClip(copy.deepcopy(clip), D_T, K)
    model.load_concept_classifier(torch.randn(K, D_T), torch.zeros(K))
    return Trainer(cfg, model, setup(), total_steps=50), model


# deepspeed 0: DeepSpeed without ZeRO partitioning (configs/ds/zero0.json); torch: kclip.engine.TorchEngine
@pytest.mark.parametrize("engine, zero_stage", [("deepspeed", 2), ("deepspeed", 0), ("torch", 2)])
def test_train_step_returns_device_tensors_and_learns(parts, engine, zero_stage):
    clip, batch = parts
    trainer, _ = _trainer(clip, zero_stage=zero_stage, engine=engine)
    assert trainer.engine_name == engine
    first = trainer.train_step(batch)
    assert set(first) == {"loss", "contrastive", "distill", "concept", "logit_scale"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in first.values())
    for _ in range(15):
        last = trainer.train_step(batch)
    assert float(last["loss"]) < 0.7 * float(first["loss"])  # the same batch again and again: it must fit
    assert float(last["distill"]) < float(first["distill"])


@pytest.mark.parametrize("grad_cache_steps", [0, 2])  # 2: the gradient-cache step over 2 micro-batches
def test_train_step_asks_deepspeed_for_no_device_wait(parts, monkeypatch, grad_cache_steps):
    # Each DeepSpeed accelerator synchronize() drains the GPU's queue and stalls the host; its throughput timer
    # used to ask for two per step. (On CPU the call is a no-op, but the call itself is what a GPU would pay.)
    from deepspeed.accelerator import get_accelerator

    clip, batch = parts
    trainer, _ = _trainer(clip, grad_cache_steps=grad_cache_steps, engine="deepspeed")
    waits = []
    accel = get_accelerator()
    real = accel.synchronize
    monkeypatch.setattr(accel, "synchronize", lambda *a, **k: (waits.append(1), real(*a, **k))[1])
    for _ in range(4 * max(1, grad_cache_steps)):  # DeepSpeed's timer starts waiting from its 2nd step on
        trainer.train_step(batch)
    assert waits == []


def test_distill_r2_is_one_minus_sse_over_sst(parts):
    clip, batch = parts
    trainer, model = _trainer(clip)
    r2_before = trainer.distill_r2(batch["tokens"], batch["teacher"])
    for _ in range(10):
        trainer.train_step(batch)
    r2 = trainer.distill_r2(batch["tokens"], batch["teacher"], batch_size=3)  # several chunks
    with torch.no_grad():
        model.eval()
        text = F.normalize(model.clip.encode_text(batch["tokens"]), dim=-1)
        pred = model.head.project_text(text)
        model.train()
    t = batch["teacher"].float()
    want = 1 - float(((pred - t) ** 2).sum()) / float(((t - t.mean(0)) ** 2).sum())
    assert r2 == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert r2 > r2_before + 0.05  # L_emb was fitted on these very captions
    assert trainer.engine.training  # back in training mode


def test_alpha_zero_needs_no_teacher(parts):
    clip, batch = parts
    trainer, _ = _trainer(clip, alpha=0.0)
    out = trainer.train_step({k: v for k, v in batch.items() if k != "teacher"})
    assert "distill" not in out and torch.isfinite(out["loss"])
