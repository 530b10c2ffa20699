"""End to end on a small embedded default: teach -> concepts -> train -> eval, skip, resume, kernels on/off, and
what a rerun does after a config change (stamps).

Everything real: the synthetic set on disk, the MiniLM teacher in int8 (bitsandbytes), k-means, the
DeepSpeed engine (one gloo rank), open_clip export. Sizes are cut so the module runs in a few minutes.
"""
import json
import shutil

import pytest
import torch

from kclip.config import load_config
from kclip.pipeline import StaleOutputError, run

SMALL = [
    "data.synthetic.n_train_images=48", "data.synthetic.n_val_images=16", "concepts.k=6",
    "concepts.classifier_epochs=5", "train.batch_size=16", "train.epochs=1", "train.log_every=1",
    "train.checkpoint_every=3", "train.warmup_steps=2", "eval.batch_size=64", "eval.text_em_steps=20",
]


def _cfg(run_dir, *extra):
    return load_config(None, [f"run_dir={run_dir}", *SMALL, *extra])


def _losses(run_dir):
    """The step records of metrics.jsonl (the per-epoch held-out R^2 records are separate lines)."""
    return [r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if "loss" in r]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """One full run (reference losses), shared by the tests below."""
    run_dir = tmp_path_factory.mktemp("base")
    result = run(_cfg(run_dir, "loss.contrastive_impl=reference", "loss.distill_impl=reference"), progress=False)
    return run_dir, result


def test_every_stage_writes_its_output(base_run):
    run_dir, result = base_run
    for rel in ("config.yaml", "runs.jsonl", "data/train.csv", "data_index/train.json", "teacher/train/manifest.json",
                "teacher/val/manifest.json", "concepts/concepts.safetensors", "concepts/cluster_sizes.png",
                "concepts/stamp.json", "checkpoints/latest", "student.safetensors", "train_done.json",
                "train_stamp.json", "eval/report.json", "eval/stamp.json"):
        assert (run_dir / rel).exists(), rel
    plan = json.loads((run_dir / "runs.jsonl").read_text().splitlines()[0])["plan"]
    assert {k: v["action"] for k, v in plan.items()} == {"teach.train": "build", "teach.val": "build",
                                                         "concepts": "build", "train": "build", "eval": "build"}
    stamp = json.loads((run_dir / "train_stamp.json").read_text())
    assert stamp["complete"] and stamp["inputs"]["concepts.k"] == 6 and stamp["inputs"]["teacher.precision"] == "int8"
    assert stamp["upstream"]["concepts"] == json.loads((run_dir / "concepts/stamp.json").read_text())["output"]
    manifest = json.loads((run_dir / "teacher/train/manifest.json").read_text())
    assert manifest["precision"] == "int8" and manifest["count"] == 96 and manifest["dim"] == 384
    report = result["eval"]
    assert {"before", "after"} <= set(report["models"])
    assert report["evaluations"]["attribute_zeroshot"]["ran"] and report["evaluations"]["compositional"]["ran"]
    r2 = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if "distill_r2" in line]
    assert r2 and all(-100 < r["distill_r2"] <= 1 and r["distill_r2_captions"] == 32 for r in r2)  # one per epoch
    assert report["distillation"]["r2"] == pytest.approx(result["train"]["distill_r2"])
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


REF = ("loss.contrastive_impl=reference", "loss.distill_impl=reference")


def _mtimes(run_dir):
    return {rel: (run_dir / rel).stat().st_mtime_ns for rel in
            ("teacher/train/manifest.json", "concepts/concepts.safetensors", "student.safetensors", "eval/report.json")}


def test_changed_inputs_rebuild_cheap_stages_and_stop_before_expensive_ones(base_run, tmp_path, capsys):
    """eval inputs -> eval rebuilt alone; concepts.k -> stop (training would be discarded) naming the key and
    --rebuild train, nothing touched; loss.target_norm with --rebuild train -> concepts, train, eval rebuilt."""
    src, _ = base_run
    run_dir = tmp_path / "copy"  # a moved run directory is still up to date
    shutil.copytree(src, run_dir, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    invocations = len((run_dir / "runs.jsonl").read_text().splitlines())
    capsys.readouterr()

    run(_cfg(run_dir, *REF, "eval.text_em_steps=5"), progress=False)
    out = capsys.readouterr().out
    assert "eval: inputs changed, rebuilding (eval.text_em_steps: 20 -> 5)" in out
    for stage in ("concepts", "train"):
        assert f"{stage}: up to date, skipped" in out
    assert "teach: cache complete, skipped" in out

    before = _mtimes(run_dir)
    with pytest.raises(StaleOutputError) as e:
        run(_cfg(run_dir, *REF, "concepts.k=5"), progress=False)
    msg = str(e.value)
    assert "concepts.k: 6 -> 5" in msg and "--rebuild train" in msg and "train_stamp.json" in msg
    assert _mtimes(run_dir) == before  # nothing was changed

    result = run(_cfg(run_dir, *REF, "loss.target_norm=none", "train.max_steps=2"), rebuild=("train",), progress=False)
    out = capsys.readouterr().out
    assert "concepts: inputs changed, rebuilding (loss.target_norm: 'l2' -> 'none')" in out
    assert "train: rebuilding (--rebuild)" in out and "eval: rebuilding (--rebuild)" in out
    after = _mtimes(run_dir)
    assert after["teacher/train/manifest.json"] == before["teacher/train/manifest.json"]
    for rel in ("concepts/concepts.safetensors", "student.safetensors", "eval/report.json"):
        assert after[rel] != before[rel], rel
    assert [r["step"] for r in _losses(run_dir)] == [1, 2]  # the old run's metrics went with it
    assert json.loads((run_dir / "concepts/stamp.json").read_text())["inputs"]["loss.target_norm"] == "none"
    assert result["eval"]["models"]["after"]
    assert len((run_dir / "runs.jsonl").read_text().splitlines()) == invocations + 2  # the stopped run left no trace


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
    assert len(fused) == len(reference) == 3
    for a, b in zip(fused, reference):
        for key in ("loss", "contrastive", "distill", "concept"):
            assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(b[key])), (key, a, b)


def test_cache_from_another_teacher_config_is_refused(base_run, tmp_path):
    run_dir, _ = base_run
    _copy_upstream(run_dir, tmp_path)
    with pytest.raises(StaleOutputError) as e:
        run(_cfg(tmp_path, "teacher.pooling=last"), stages=("concepts",), progress=False)
    assert "teacher.pooling: 'mean' -> 'last'" in str(e.value) and "--rebuild teach" in str(e.value)


def test_zero3_with_loader_workers_trains_like_zero2(base_run, tmp_path):
    """ZeRO-3 partitions W_e, which the fused L_emb reads as a GEMM operand: the objective must gather it.
    Loader workers persist across epochs and must feed exactly the samples the main process would."""
    run_dir, _ = base_run
    _copy_upstream(run_dir, tmp_path)
    run(_cfg(tmp_path, "train.zero_stage=3", "data.num_workers=2", "loss.contrastive_impl=reference",
             "loss.distill_impl=reference"), stages=("train",), progress=False)
    assert len(_losses(tmp_path)) == len(_losses(run_dir)) == 6
    for a, b in zip(_losses(tmp_path), _losses(run_dir)):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * max(1.0, abs(b["loss"])), (a, b)
    import open_clip
    open_clip.create_model("kclip-tiny", pretrained=str(tmp_path / "student.safetensors"))
