"""Config: the embedded default equals configs/tiny.yaml; errors name the key; DeepSpeed JSON filled from YAML;
presets and DeepSpeed JSONs found through the package from any working directory."""
import json

import pytest

from conftest import REPO_ROOT
from kclip.config import (Config, ConfigError, deepspeed_config, find_config_file, find_deepspeed_file,
                          load_config, preset_names, to_dict)


def test_tiny_yaml_is_the_embedded_default():
    assert to_dict(load_config(REPO_ROOT / "configs" / "tiny.yaml")) == to_dict(Config())
    assert to_dict(load_config("tiny")) == to_dict(Config())


def test_presets_resolve_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {"tiny", "paper"} <= set(preset_names())
    for name in ("paper", "paper.yaml", "configs/paper.yaml"):
        assert find_config_file(name).read_text() == (REPO_ROOT / "configs" / "paper.yaml").read_text()
    for name in ("zero3", "zero3.json", "configs/ds/zero3.json", "ds/zero3.json"):
        assert json.loads(find_deepspeed_file(name).read_text())["zero_optimization"]["stage"] == 3
    (tmp_path / "paper.yaml").write_text("seed: 7\n")  # a file that exists wins over the preset
    assert load_config("paper.yaml").seed == 7 and load_config("paper").seed == 0
    with pytest.raises(ConfigError, match="not a kclip preset; presets: .*paper.*tiny"):
        load_config("papper")
    with pytest.raises(ConfigError, match="kclip ships zero0.json, zero1.json, zero2.json, zero3.json"):
        deepspeed_config(load_config(None, ["train.deepspeed_config=zero4"]), world_size=1)


def test_paper_preset_matches_the_paper():
    cfg = load_config("paper")
    assert cfg.teacher.name == "meta-llama/Llama-2-7b-hf" and cfg.teacher.precision == "int8"
    assert cfg.model.name == "ViT-B-32" and cfg.model.pretrained == "openai"
    assert (cfg.loss.alpha, cfg.loss.beta, cfg.loss.gamma) == (1.0, 0.01, 1.0)
    assert cfg.train.lr == 5e-5 and cfg.train.epochs == 100 and cfg.concepts.k == 1000
    assert cfg.data.source == "csv"


def test_overrides_apply_with_types():
    cfg = load_config(None, ["train.epochs=3", "loss.beta=0.5", "teacher.precision=bf16"])
    assert cfg.train.epochs == 3 and cfg.loss.beta == 0.5 and cfg.teacher.precision == "bf16"
    # `model.pretrained=''` in a shell arrives as `model.pretrained=`: the empty string
    assert load_config("paper", ["model.pretrained=", "teacher.prompt=''"]).model.pretrained == ""


@pytest.mark.parametrize("override, needle", [
    ("train.epochz=3", "epochz"),
    ("train.epochs=three", "train.epochs"),
    ("teacher.precision=int4", "teacher.precision"),
    ("loss.contrastive_impl=cuda", "loss.contrastive_impl"),
    ("train.epochs", "key.sub=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  batch_sise: 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "bad.yaml" in str(e.value) and "batch_sise" in str(e.value)


def test_wrong_type_in_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("concepts:\n  k: many\n")
    with pytest.raises(ConfigError, match="concepts.k"):
        load_config(p)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_csv_source_needs_a_path():
    with pytest.raises(ConfigError, match="data.train"):
        load_config(None, ["data.source=csv"])


def test_deepspeed_json_batch_fields_come_from_yaml(tmp_path):
    cfg = load_config(None, ["train.batch_size=8", "train.grad_accum_steps=3", "train.precision=bf16",
                             "train.zero_stage=3"])
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 48 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3
    # a concrete, conflicting value in the JSON is refused, naming both
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 2}}))
    cfg = load_config(None, [f"train.deepspeed_config={bad}", "train.batch_size=8"])
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu"):
        deepspeed_config(cfg, world_size=1)


def test_deepspeed_throughput_timer_is_off_unless_the_json_asks(tmp_path):
    # on by default in DeepSpeed, it waits for the device at every forward and step (kclip times its own steps)
    assert deepspeed_config(load_config(None, []), world_size=1)["timers"] == {"throughput": {"enabled": False}}
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 2},
                               "timers": {"throughput": {"enabled": True, "synchronized": False}}}))
    ds = deepspeed_config(load_config(None, [f"train.deepspeed_config={own}"]), world_size=1)
    assert ds["timers"] == {"throughput": {"enabled": True, "synchronized": False}}
