"""Ablation runner: configs per (variant, seed), aggregation, outputs, resume, CLI; with a fake pipeline."""
import json
import math
import sys
import types

import pytest

from conftest import REPO_ROOT
from kclip.experiments.ablation import VARIANTS, aggregate, main, run_ablation

TINY = REPO_ROOT / "configs" / "tiny.yaml"


class FakePipeline:
    """Returns metrics computed from the config, so the expected means/stds are known exactly."""

    def __init__(self):
        self.calls = []

    def __call__(self, cfg):
        self.calls.append(cfg)
        a, b, g, s = cfg.loss.alpha, cfg.loss.beta, cfg.loss.gamma, cfg.seed
        return {"models": {
            "before": {"text_em": -1.0},
            "after": {"text_em": 10 * a + 1000 * b + s, "attribute_top1": 50.0 + g,
                      "retrieval": {"i2t_r1": 2.0 * s, "n_images": 200},
                      "text_em_detail": {"em": 0.0}, "seconds": 3.0},
        }}


def test_runs_configs_and_aggregates(tmp_path):
    fake = FakePipeline()
    res = run_ablation(TINY, tmp_path / "abl", seeds=(0, 1, 2), max_steps=7, extra_overrides=["train.log_every=3"],
                       run_fn=fake)
    assert len(fake.calls) == 4 * 3
    cfg = fake.calls[0]
    assert (cfg.loss.alpha, cfg.loss.beta, cfg.loss.gamma, cfg.seed) == (0.0, 0.0, 1.0, 0)
    assert cfg.train.max_steps == 7 and cfg.train.log_every == 3
    assert cfg.run_dir == str(tmp_path / "abl" / "runs" / "contrastive-seed0")
    assert len({c.run_dir for c in fake.calls}) == 12  # one run dir per (variant, seed)
    s = res["summary"]
    assert list(s) == list(VARIANTS)
    # text_em = 10 alpha + 1000 beta + seed over seeds 0, 1, 2 -> mean +1, sample std 1
    assert s["contrastive"]["text_em"] == {"mean": 1.0, "std": 1.0, "n": 3}
    assert s["contrastive+emb"]["text_em"]["mean"] == pytest.approx(11.0)
    assert s["contrastive+conc"]["text_em"]["mean"] == pytest.approx(11.0)
    assert s["all"]["text_em"]["mean"] == pytest.approx(21.0)
    assert s["all"]["retrieval.i2t_r1"] == {"mean": 2.0, "std": 2.0, "n": 3}
    assert s["all"]["attribute_top1"]["std"] == 0.0
    assert "retrieval.n_images" not in s["all"] and "seconds" not in s["all"] and "text_em_detail.em" not in s["all"]

    on_disk = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert on_disk["summary"] == json.loads(json.dumps(s)) and len(on_disk["runs"]) == 12
    md = (tmp_path / "abl" / "ablation.md").read_text()
    lines = md.splitlines()
    assert lines[:5] == ["# Knowledge-CLIP loss ablation", "", "Produced by:", "", "```"]
    assert lines[5].startswith("python -m kclip.experiments.ablation --config") and "--max-steps 7" in lines[5]
    assert "| metric | contrastive | contrastive+emb | contrastive+conc | all |" in md
    assert "| text reconstruction EM (trained captions; real data: val) | 1.0 ± 1.0 | 11.0 ± 1.0 | 11.0 ± 1.0 | 21.0 ± 1.0 |" in md

    # resume: finished runs are reused, nothing is retrained
    again = FakePipeline()
    res2 = run_ablation(TINY, tmp_path / "abl", seeds=(0, 1, 2), max_steps=7, extra_overrides=["train.log_every=3"],
                        run_fn=again)
    assert again.calls == [] and all(r["reused"] for r in res2["runs"]) and res2["summary"] == s


def test_aggregate_single_seed_and_missing_values():
    s = aggregate({"v": [{"a": 1.0, "b": float("nan")}, {"a": 3.0}]})
    assert s["v"]["a"]["mean"] == 2.0 and s["v"]["a"]["std"] == pytest.approx(math.sqrt(2))
    assert "b" not in s["v"]
    assert aggregate({"v": [{"a": 5.0}]})["v"]["a"] == {"mean": 5.0, "std": 0.0, "n": 1}


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown ablation variant"):
        run_ablation(TINY, tmp_path, variants=["nope"], run_fn=FakePipeline())
    with pytest.raises(ValueError, match="no report\\['models'\\]\\['after'\\]"):
        run_ablation(TINY, tmp_path, seeds=(0,), variants=["all"], run_fn=lambda cfg: {"models": {}})


def test_cli_uses_kclip_pipeline_run(tmp_path, monkeypatch, capsys):
    fake = FakePipeline()
    # the real pipeline.run returns {"run_dir", "train", "eval": report}
    monkeypatch.setitem(sys.modules, "kclip.pipeline",
                        types.SimpleNamespace(run=lambda cfg: {"run_dir": cfg.run_dir, "eval": fake(cfg)}))
    argv = ["--config", str(TINY), "--out", str(tmp_path / "cli"), "--seeds", "0", "1", "--variants",
            "contrastive,all", "--epochs", "2"]
    assert main(argv) == 0
    assert len(fake.calls) == 4 and all(c.train.epochs == 2 for c in fake.calls)
    md = (tmp_path / "cli" / "ablation.md").read_text()
    assert "python -m kclip.experiments.ablation --config" in md and "--variants contrastive,all --epochs 2" in md
    assert "| metric | contrastive | all |" in capsys.readouterr().out
