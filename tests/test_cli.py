"""The launcher and CLI: DeepSpeed's flags are accepted, overrides reach the config, errors exit 2."""
import importlib.util

import pytest

import kclip.pipeline
from kclip import cli
from conftest import REPO_ROOT


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
    assert kw["stages"] == ("concepts",) and cfg.concepts.k == 7 and kw["stop_after"] == 3 and kw["rebuild"] == []


def test_rebuild_and_presets_by_name(captured):
    cli.main(["run", "--config", "paper", "--rebuild", "teach,concepts", "--rebuild", "eval", "model.name=kclip-tiny"])
    cfg, kw = captured[0]
    assert kw["rebuild"] == ["teach,concepts", "eval"] and cfg.teacher.name == "meta-llama/Llama-2-7b-hf"
    assert cfg.model.name == "kclip-tiny"


def test_config_command_prints_the_resolved_config(captured, capsys):
    assert cli.main(["config", "--config", "paper", "train.epochs=3", "model.pretrained="]) == 0
    out = capsys.readouterr().out
    assert "epochs: 3" in out and "Llama-2-7b-hf" in out and "pretrained: ''" in out and not captured


def test_stale_output_exits_3_with_the_message(monkeypatch, capsys):
    def stop(cfg, **kw):
        raise kclip.pipeline.StaleOutputError("stopped: teacher.pooling: 'mean' -> 'last' ... --rebuild teach")
    monkeypatch.setattr(kclip.pipeline, "run", stop)
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "teacher.pooling=last"])
    assert e.value.code == 3 and "--rebuild teach" in capsys.readouterr().err


def test_rebuild_of_a_stage_not_run_exits_2(captured, capsys):
    for argv, needle in ((["train", "--rebuild", "teach"], "--rebuild teach is not a stage of this command"),
                         (["run", "--rebuild", "concept"], "stages are teach, concepts, train, eval")):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2 and needle in capsys.readouterr().err and not captured


def test_unknown_rebuild_stage_is_an_error():
    from kclip.pipeline import rebuild_names
    assert rebuild_names(["teach,concepts", "all"], ("train", "eval")) == {"teach", "concepts", "train", "eval"}
    with pytest.raises(ValueError, match="--rebuild 'concept'"):
        rebuild_names(["concept"])


def test_config_error_exits_2_naming_the_key(captured, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "train.batch_sise=3"])
    assert e.value.code == 2 and "batch_sise" in capsys.readouterr().err and not captured


def test_bench_lists_the_benchmarks(capsys):
    assert cli.main(["bench", "nope"]) == 2
    err = capsys.readouterr().err
    for name in ("clip_contrastive_loss", "projected_mse_loss", "kmeans", "teacher", "train_step"):
        assert name in err


def test_bench_runs_a_benchmark_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout: bench/ is found beside kclip/, --results-dir stays relative here
    assert cli.main(["bench", "env", "--quick", "--results-dir", "out", "--device", "cpu"]) == 0
    assert (tmp_path / "out" / "env.jsonl").is_file()


@pytest.mark.parametrize("content, needle", [
    (None, "does not exist (config key data.train / data.val)"),
    ("", "the file is empty"),
    ("image,caption\nmissing.jpg,a red square\n", "missing.jpg"),
])
def test_data_mistakes_are_one_line_without_a_traceback(tmp_path, capsys, content, needle):
    """A missing, empty or all-bad pairs file is the user's to fix: `kclip: <what and how>`, exit 2, no traceback."""
    pairs = tmp_path / "pairs.csv"
    if content is not None:
        pairs.write_text(content)
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--no-progress", "data.source=csv", f"data.train={pairs}", "data.val=",
                  f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("kclip: ") and needle in err[0], err
