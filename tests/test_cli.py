"""The launcher and CLI: DeepSpeed's flags are accepted, overrides reach the config, errors exit 2."""
import importlib.util

import pytest

import kclip.pipeline
from kclip import cli
from kclip.config import REPO_ROOT


@pytest.fixture
def captured(monkeypatch):
    calls = []
    monkeypatch.setattr(kclip.pipeline, "run", lambda cfg, **kw: calls.append((cfg, kw)) or {})
    return calls


def _train_py():
    spec = importlib.util.spec_from_file_location("kclip_train_launcher", REPO_ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_py_takes_deepspeed_flags_and_overrides(captured, monkeypatch):
    import sys
    monkeypatch.setattr(sys, "path", list(sys.path))  # train.py drops the repo root from sys.path
    monkeypatch.setenv("LOCAL_RANK", "0")  # records the original state, restored after the test
    monkeypatch.delenv("LOCAL_RANK")
    assert _train_py().main(["--local_rank=1", "--config", str(REPO_ROOT / "configs/tiny.yaml"),
                             "train.epochs=1", "--deepspeed_config", "configs/ds/zero3.json", "--no-resume"]) == 0
    cfg, kw = captured[0]
    assert cfg.train.epochs == 1 and cfg.train.deepspeed_config == "configs/ds/zero3.json"
    assert kw["stages"] == ("teach", "concepts", "train", "eval") and kw["resume"] is False
    import os
    assert os.environ["LOCAL_RANK"] == "1"


def test_single_stage_commands(captured):
    cli.main(["concepts", "concepts.k=7", "--stop-after", "3"])
    cfg, kw = captured[0]
    assert kw["stages"] == ("concepts",) and cfg.concepts.k == 7 and kw["stop_after"] == 3


def test_config_error_exits_2_naming_the_key(captured, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "train.batch_sise=3"])
    assert e.value.code == 2 and "batch_sise" in capsys.readouterr().err and not captured


def test_bench_lists_the_benchmarks(capsys):
    assert cli.main(["bench", "nope"]) == 2
    err = capsys.readouterr().err
    for name in ("clip_contrastive_loss", "projected_mse_loss", "kmeans", "teacher", "train_step"):
        assert name in err
