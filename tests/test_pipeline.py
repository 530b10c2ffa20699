"""End to end on a small embedded default: teach -> concepts -> train -> eval, skip, resume, kernels on/off.

Everything real: the synthetic set on disk, the MiniLM teacher in int8 (bitsandbytes), k-means, the
DeepSpeed engine (one gloo rank), open_clip export. Sizes are cut so the module runs in a few minutes.
"""
import json
import shutil

import pytest
import torch

from kclip.cache import CacheMismatchError
from kclip.config import load_config
from kclip.pipeline import run

SMALL = [
    "data.synthetic.n_train_images=48", "data.synthetic.n_val_images=16", "concepts.k=6",
    "concepts.classifier_epochs=5", "train.batch_size=16", "train.epochs=1", "train.log_every=1",
    "train.checkpoint_every=3", "train.warmup_steps=2", "eval.batch_size=64",
]


def _cfg(run_dir, *extra):
    return load_config(None, [f"run_dir={run_dir}", *SMALL, *extra])


def _losses(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """One full run (reference losses), shared by the tests below."""
    run_dir = tmp_path_factory.mktemp("base")
    result = run(_cfg(run_dir, "loss.contrastive_impl=reference", "loss.distill_impl=reference"), progress=False)
    return run_dir, result


def test_every_stage_writes_its_output(base_run):
    run_dir, result = base_run
    for rel in ("config.yaml", "data/train.csv", "data_index/train.json", "teacher/train/manifest.json",
                "teacher/val/manifest.json", "concepts/concepts.safetensors", "concepts/cluster_sizes.png",
                "checkpoints/latest", "student.safetensors", "train_done.json", "eval/report.json"):
        assert (run_dir / rel).exists(), rel
    manifest = json.loads((run_dir / "teacher/train/manifest.json").read_text())
    assert manifest["precision"] == "int8" and manifest["count"] == 96 and manifest["dim"] == 384
    report = result["eval"]
    assert {"before", "after"} <= set(report["models"])
    losses = [r["loss"] for r in _losses(run_dir)]
    assert len(losses) == 6
    assert sum(losses[-2:]) < sum(losses[:2])  # it learns


def test_second_run_skips_every_stage(base_run, capsys):
    run_dir, result = base_run
    mtime = (run_dir / "student.safetensors").stat().st_mtime_ns
    again = run(_cfg(run_dir, "loss.contrastive_impl=reference", "loss.distill_impl=reference"), progress=False)
    out = capsys.readouterr().out
    for stage in ("teach", "concepts", "train", "eval"):
        assert f"{stage}: " in out and "skipped" in out
    assert (run_dir / "student.safetensors").stat().st_mtime_ns == mtime
    assert again["eval"]["models"]["after"] == result["eval"]["models"]["after"]


def test_exported_student_loads_in_open_clip(base_run):
    import open_clip
    from kclip.model import register_model_configs

    run_dir, _ = base_run
    register_model_configs()
    model = open_clip.create_model("kclip-tiny", pretrained=str(run_dir / "student.safetensors"))
    from safetensors.torch import load_file
    saved = load_file(run_dir / "student.safetensors")
    torch.testing.assert_close(model.visual.conv1.weight, saved["visual.conv1.weight"])
    fresh = open_clip.create_model("kclip-tiny")
    assert not torch.equal(fresh.visual.conv1.weight, model.visual.conv1.weight)


def _copy_upstream(src, dst):
    """Reuse the base run's data, teacher cache and concepts (deterministic) to train again quickly."""
    for rel in ("data", "data_index", "teacher", "concepts"):
        shutil.copytree(src / rel, dst / rel)


def test_resume_reaches_the_same_next_step_loss(base_run, tmp_path):
    run_dir, _ = base_run
    _copy_upstream(run_dir, tmp_path)
    cfg = _cfg(tmp_path, "loss.contrastive_impl=reference", "loss.distill_impl=reference")
    first = run(cfg, stages=("train",), progress=False, stop_after=3)
    assert first["train"]["stopped_early"] and not (tmp_path / "student.safetensors").exists()
    run(cfg, stages=("train",), progress=False)
    resumed, straight = _losses(tmp_path), _losses(run_dir)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(resumed, straight):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)


def test_kernels_on_and_off_give_the_same_losses(base_run, tmp_path):
    """The fused Triton losses (here in the interpreter) train exactly like the PyTorch references."""
    run_dir, _ = base_run
    _copy_upstream(run_dir, tmp_path)
    run(_cfg(tmp_path, "train.max_steps=3"), stages=("train",), progress=False)
    fused, reference = _losses(tmp_path), _losses(run_dir)[:3]
    for a, b in zip(fused, reference):
        for key in ("loss", "contrastive", "distill", "concept"):
            assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(b[key])), (key, a, b)


def test_cache_from_another_teacher_config_is_refused(base_run, tmp_path):
    run_dir, _ = base_run
    _copy_upstream(run_dir, tmp_path)
    with pytest.raises(CacheMismatchError) as e:
        run(_cfg(tmp_path, "teacher.pooling=last"), stages=("concepts",), progress=False)
    assert "pooling" in str(e.value) and "teacher" in str(e.value)


def test_zero3_with_loader_workers_trains_like_zero2(base_run, tmp_path):
    """ZeRO-3 partitions W_e, which the fused L_emb reads as a GEMM operand: the objective must gather it.
    Loader workers persist across epochs and must feed exactly the samples the main process would."""
    run_dir, _ = base_run
    _copy_upstream(run_dir, tmp_path)
    run(_cfg(tmp_path, "train.zero_stage=3", "data.num_workers=2", "loss.contrastive_impl=reference",
             "loss.distill_impl=reference"), stages=("train",), progress=False)
    for a, b in zip(_losses(tmp_path), _losses(run_dir)):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * max(1.0, abs(b["loss"])), (a, b)
    import open_clip
    open_clip.create_model("kclip-tiny", pretrained=str(tmp_path / "student.safetensors"))
