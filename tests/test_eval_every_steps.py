"""eval.every_steps: retrieval R@1/R@5 during training, logged as eval/<metric> at the right steps and plotted,
without changing the training (the student has dropout here, so a forgotten model.train() or a draw from the
training RNG would change the losses)."""
import json

import pytest
import torch

from test_grad_cache import _with_dropout, inputs, make_train_inputs, step_records, train_config  # noqa: F401


@pytest.fixture
def dropout_student(monkeypatch):
    import kclip.trainer as trainer_module

    real = trainer_module.build_student

    def build(*args, **kwargs):
        model, preprocess, tokenizer = real(*args, **kwargs)
        return _with_dropout(model), preprocess, tokenizer

    monkeypatch.setattr(trainer_module, "build_student", build)


def test_eval_every_steps_logs_retrieval_and_leaves_training_unchanged(inputs, tmp_path, dropout_student):  # noqa: F811
    from kclip.distributed import setup
    from kclip.trainer import STEP_EVAL_PLOT, train

    dist = setup()
    off, on = tmp_path / "off", tmp_path / "on"
    train(train_config(off, 16), off, inputs, dist, progress=False)
    train(train_config(on, 16, eval__every_steps=2, eval__every_steps_pairs=20), on, inputs, dist, progress=False)

    assert step_records(on) == [{**r, "pairs_per_s": s["pairs_per_s"]} for r, s in zip(step_records(off),
                                                                                        step_records(on))]
    assert len(step_records(on)) == 6 and not (off / STEP_EVAL_PLOT).exists()
    evals = [r for r in map(json.loads, open(on / "metrics.jsonl")) if "eval/i2t_r1" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    for r in evals:
        for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"):
            assert 0.0 <= r[f"eval/{k}"] <= 100.0
        assert r["eval/i2t_r5"] >= r["eval/i2t_r1"] and r["eval/t2i_r5"] >= r["eval/t2i_r1"]
        # the first 20 validation pairs: 10 images with 2 captions each
        assert (r["eval/texts"], r["eval/images"], r["eval/split"]) == (20, 10, "val")
        assert r["eval/seconds"] > 0
    assert (on / STEP_EVAL_PLOT).stat().st_size > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(on / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/t2i_r1")] == [2, 4, 6]
    assert "train/loss" in events.Tags()["scalars"]


def test_step_eval_recall_is_the_retrieval_metric(inputs, tmp_path):  # noqa: F811
    """The numbers are kclip.eval.retrieval's on the model's embeddings of the subset (val transform, eval mode)."""
    from kclip.distributed import setup
    from kclip.eval.retrieval import retrieval_recall
    from kclip.model import ClipEncoders
    from kclip.trainer import Trainer, _StepEval, build_student

    cfg = train_config(tmp_path, 16, eval__every_steps=1, eval__every_steps_pairs=12)
    model, _, tokenizer = build_student(cfg, inputs.teacher.dim, inputs.classifier_weight, inputs.classifier_bias)
    trainer = Trainer(cfg, model, setup(), total_steps=10)
    step_eval = _StepEval.build(cfg, tmp_path, inputs, model.clip, tokenizer, trainer.dist)
    rng = torch.get_rng_state()
    got = step_eval(trainer)
    assert torch.equal(torch.get_rng_state(), rng) and trainer.engine.module.training  # back in training mode

    import open_clip
    from PIL import Image

    _, _, preprocess_val = open_clip.create_model_and_transforms("kclip-tiny")
    encoders = ClipEncoders("now", model.clip, preprocess_val, tokenizer)
    pairs = inputs.eval_index.pairs[:12]
    images = list(dict.fromkeys(p.image for p in pairs))
    want = retrieval_recall(encoders.encode_images([Image.open(i).convert("RGB") for i in images]),
                            encoders.encode_texts([p.caption for p in pairs]),
                            [images.index(p.image) for p in pairs], ks=(1, 5))
    for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"):
        assert got[f"eval/{k}"] == pytest.approx(want[k]), k


def test_every_steps_is_not_an_input_of_any_stage():
    """Turning it on must not make the pipeline ask for --rebuild train (nor rebuild eval)."""
    from kclip.config import load_config
    from kclip.pipeline import config_inputs

    cfg = load_config(None, ["eval.every_steps=5", "eval.every_steps_pairs=64"])
    picked = config_inputs(cfg, "eval")  # the last stage: every stage's keys
    assert "eval.text_em_steps" in picked and not any(k.startswith("eval.every_steps") for k in picked)


def test_bad_values_name_the_key():
    from kclip.config import ConfigError, load_config

    for bad in ("eval.every_steps=-1", "eval.every_steps_pairs=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            load_config(None, [bad])
