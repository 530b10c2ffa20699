"""What each stage reads from the config: the config part of its stamp's inputs, derived from the sections.

A field of a config section is read by its section's stage (``SECTION_STAGE``: ``concepts.*`` by concepts,
``model.*``, ``loss.*``, ``train.*`` by train, ``eval.*`` by eval); stamps are transitive, so a later stage's
inputs hold the keys of every stage before it. The field's metadata (``kclip.config.knob``) says otherwise where
needed::

    knob(10, stage_input=False)            changes how, not what, a stage computes (cadence, workspace, compile)
    knob("l2", stage_input="concepts")     read already by an earlier stage than its section's
    knob(False, recorded_if_not=False)     added after stamps existed: recorded only when it differs from this
                                           value, so outputs stamped before the key existed stay current

``teacher.*`` and ``data.*`` belong to no stage: the teacher cache's manifest and the pairs' identity stand
for them (``kclip.pipeline.teacher_cache``, ``pairs_identity``). Top-level keys (``seed``) are read only
where their metadata says.

"""
from __future__ import annotations

import dataclasses

from kclip.config import Config, to_dict

# The stages whose stamps record config keys, in order (the teacher cache's manifest is its own stamp).
KEYED_STAGES = ("concepts", "train", "eval")
STAGE_INPUT = "stage_input"          # field metadata: False, or the first stage that reads the field
RECORDED_IF_NOT = "recorded_if_not"  # field metadata: the value at which the key is left out of stamps
SECTION_STAGE = {"concepts": "concepts", "model": "train", "loss": "train", "train": "train", "eval": "eval"}

def config_fields(cfg: Config) -> list[tuple[str, dataclasses.Field]]:
    """(flat key, field) of every leaf of the config (``train.lr``, ``data.synthetic.seed``), in order."""
    out = []

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                out.append((f"{prefix}{f.name}", f))

    walk(cfg, "")
    return out


def _metadata_stage(key: str, f: dataclasses.Field) -> str | None:
    if STAGE_INPUT not in f.metadata:
        return SECTION_STAGE.get(key.split(".")[0]) if "." in key else None
    stage = f.metadata[STAGE_INPUT]
    if stage is False:
        return None
    if stage not in KEYED_STAGES:
        raise ValueError(f"config field {key}: metadata {STAGE_INPUT}={stage!r}; it must be False or one of "
                         f"{', '.join(KEYED_STAGES)}")
    return stage


def stage_keys(cfg: Config) -> dict[str, tuple[str, ...]]:
    """stage -> the config keys it is the first to read (concepts, train, eval)."""
    out = {s: [] for s in KEYED_STAGES}
    for key, f in config_fields(cfg):
        stage = _metadata_stage(key, f)
        if stage is not None:
            out[stage].append(key)
    return {s: tuple(keys) for s, keys in out.items()}


def recorded_if_not(cfg: Config) -> dict:
    """key -> the value at which a stamp leaves the key out (keys added after stamps existed)."""
    return {key: f.metadata[RECORDED_IF_NOT] for key, f in config_fields(cfg) if RECORDED_IF_NOT in f.metadata}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_inputs(cfg: Config, stage: str) -> dict:
    """The config part of a stage's stamp inputs: key -> value for the keys of the stage and of every stage
    before it, without those at their ``recorded_if_not`` value."""
    if stage not in KEYED_STAGES:
        raise ValueError(f"stage {stage!r} records no config keys; stages that do: {', '.join(KEYED_STAGES)}")
    keys = stage_keys(cfg)
    flat = _flat(to_dict(cfg))
    inputs = {k: flat[k] for s in KEYED_STAGES[:KEYED_STAGES.index(stage) + 1] for k in keys[s]}
    for key, value in recorded_if_not(cfg).items():
        if key in inputs and inputs[key] == value:
            del inputs[key]
    return inputs
