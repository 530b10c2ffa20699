"""``run_eval``: every evaluation that applies to the data at hand, for a set of models; the report says which
ran and why the others did not.

What is measured where (all percentages):

- on any data source (the validation pairs, grouped by image):
  image<->text retrieval R@K; caption->caption retrieval (when some image has two or more captions);
  the text-reconstruction probe (trained on at most ``TEXT_EM_TRAIN_MAX`` training captions, tested on
  the validation captions: EM and token accuracy), with the same step budget and seed for every encoder,
  the teacher included; the concept cluster sizes (``concept_labels``, aligned with the training pairs);
- only on the built-in synthetic set, which has ground truth: attribute zero-shot (20 colour-shape
  classes; also on the held-out combos), compositional hard negatives (with the text-only bigram
  baseline beside the models), the NMI of the concept labels against the true attributes;
- ``cub_root`` / ``awa2_root``: the released datasets, zero-shot with the paper's prompts.

The report also holds the chance level of each metric (a uniformly random ranking), computed exactly
for the data at hand, and ``evaluations``: per evaluation whether it ran, on what, or why not.
Outputs (atomic): ``report.json``, ``report.md``, ``report.png`` in ``out_dir``.
"""
from __future__ import annotations

import math
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from kclip.stamps import git_revision

from . import compositional, concept_stats, hits, retrieval, text_em, zeroshot
from .encoders import encode_images, encode_texts, encoder_name
from .report import write_report
from .synthetic_split import SyntheticSplit, read_split

DEFAULT_TEXT_EM_STEPS = 300
# The probe sees steps x 64 captions in all (19,200 at the default budget): a seeded sample this size of the
# training captions is as good as all of them and keeps encoding CC3M-sized sets cheap.
TEXT_EM_TRAIN_MAX = 20_000


# ----------------------------------------------------------------------------------------------------------
# The protocols of zeroshot.py and text_em.py, each behind one function (their owners are reworking them).
# ----------------------------------------------------------------------------------------------------------

def _zeroshot_sets(cub_root, awa2_root, synthetic_val: SyntheticSplit | None, max_per_class, seed) -> dict:
    """name -> ZeroShotSet for the zero-shot evaluations that apply: 'attribute' (synthetic), 'cub', 'awa2'."""
    sets = {}
    if synthetic_val is not None:
        sets["attribute"] = zeroshot.synthetic_zeroshot_from_split(synthetic_val)
    if cub_root:
        sets["cub"] = zeroshot.load_cub(cub_root, max_per_class=max_per_class, seed=seed)
    if awa2_root:
        sets["awa2"] = zeroshot.load_awa2(awa2_root, max_per_class=max_per_class, seed=seed)
    return sets


def _zeroshot(model, dataset, batch_size: int, image_emb: torch.Tensor | None = None) -> dict:
    """Top-k zero-shot accuracy of ``model`` on ``dataset`` (``image_emb``: its images, precomputed)."""
    return zeroshot.zeroshot_accuracy(model, dataset, batch_size, image_emb=image_emb)


TEXT_EM_IN_DIST_MAX = 1000  # captions per synthetic evaluation split (trained, fresh) of the EM probe
# the probe's splits -> the suffix of their report keys (text_em<suffix>, text_token_acc<suffix>, ...)
TEXT_EM_SPLIT_KEYS = {"trained": "", "in_distribution": "", "fresh": "_fresh", "heldout": "_heldout"}


def text_em_splits(data: "EvalData", em_train: list[str], seed: int) -> tuple[list[str], dict]:
    """(probe-fit captions, {split: captions}) for the text-reconstruction probe (Kamath et al.).

    Real data: ``in_distribution``, the val captions (same distribution, never trained on). The synthetic set
    has three: ``trained``, captions the student trained on, held back from the probe's fit; ``fresh``, new
    captions of seen colour-shape combinations that occur nowhere in training (:func:`kclip.synthetic.
    fresh_captions`); ``heldout``, the val captions, each naming a colour-shape pair never seen in training.
    """
    if data.synthetic is None:
        return em_train, {"in_distribution": list(data.val.captions)}
    from kclip.synthetic import fresh_captions

    train = data.synthetic[0]
    n_eval = min(TEXT_EM_IN_DIST_MAX, max(1, len(set(em_train)) // 5))
    fit, trained = text_em.split_captions(em_train, n_eval, seed)
    fresh = fresh_captions(train.meta, train.captions, n_eval, seed)
    return fit, {"trained": trained, "fresh": fresh, "heldout": list(data.val.captions)}


def _text_em(encoders: Mapping[str, object], fit: list[str], splits: dict, steps: int, seed: int, batch_size: int,
             progress: bool) -> dict:
    """Table 1: one autoencoder-trained, frozen decoder; a linear map + LayerNorm per frozen encoder.
    ``steps`` trains the autoencoder, half of it each map."""
    from kclip.synthetic import slot_hits

    return text_em.text_em_table(encoders, fit, splits, seed=seed, ae_steps=steps, map_steps=max(50, steps // 2),
                                 embed_batch_size=batch_size, progress=progress,
                                 slot_fn=slot_hits if "trained" in splits else None)


def _em_fields(row: dict) -> dict:
    """The report fields of one encoder's probe row: EM, token accuracy and (synthetic) slot accuracy per split."""
    out = {}
    for split, m in row["splits"].items():
        suffix = TEXT_EM_SPLIT_KEYS[split]
        out.update({f"text_em{suffix}": m["em"], f"text_token_acc{suffix}": m["token_acc"]})
        if "slot_acc" in m:
            out[f"text_slot_acc{suffix}"] = m["slot_acc"]
    return out


# ----------------------------------------------------------------------------------------------------------
# What is evaluated
# ----------------------------------------------------------------------------------------------------------

@dataclass
class EvalSplit:
    """Caption-image pairs grouped by image, as the retrieval metrics need them.

    Attributes:
        images: (Ni,) the unique images, first-seen order: paths, or ``kclip.data.Pair`` for images
            inside webdataset shards (``encoders.load_image`` opens both).
        captions: (Nt,) every caption, pair order.
        text_to_image: (Nt,) index into ``images`` of each caption's image.
    """
    images: list
    captions: list[str]
    text_to_image: list[int]


@dataclass
class EvalData:
    """The data of one evaluation.

    Attributes:
        val: the held-out pairs.
        train_captions: the training captions (the text-reconstruction probe trains on them).
        description: what the data is, for the report (e.g. the pairs files).
        synthetic: (train, val) of the built-in synthetic set when that is the data: its ground truth
            enables the attribute zero-shot, hard-negative and concept-NMI evaluations.
    """
    val: EvalSplit
    train_captions: list[str]
    description: str = ""
    synthetic: tuple[SyntheticSplit, SyntheticSplit] | None = field(default=None, repr=False)


def split_from_index(index) -> EvalSplit:
    """Group a ``kclip.data.PairIndex`` by image (a file path, or a shard member's byte range)."""
    key_of: dict = {}
    images, t2i = [], []
    for pair in index.pairs:
        key = (pair.image, pair.member_offset)
        if key not in key_of:
            key_of[key] = len(images)
            images.append(pair if pair.member_offset >= 0 else pair.image)
        t2i.append(key_of[key])
    return EvalSplit(images, [p.caption for p in index.pairs], t2i)


def split_from_synthetic(split: SyntheticSplit) -> EvalSplit:
    return EvalSplit(list(split.image_paths), list(split.captions), list(split.text_to_image))


def synthetic_eval_data(data_dir: str | Path) -> EvalData:
    """The built-in synthetic set at ``data_dir`` (train.csv, val.csv, meta.json), with its ground truth."""
    train, val = read_split(data_dir, "train"), read_split(data_dir, "val")
    return EvalData(split_from_synthetic(val), list(train.captions), f"synthetic set {Path(data_dir).resolve()}",
                    synthetic=(train, val))


def index_eval_data(val_index, train_index, synthetic_dir: str | Path | None = None, description: str = "") -> EvalData:
    """Eval data from the verified pair indexes of any source; ``synthetic_dir`` adds the synthetic ground truth.

    Raises:
        ValueError: ``synthetic_dir`` is given but its val.csv does not hold the validation pairs.
    """
    data = EvalData(split_from_index(val_index), [p.caption for p in train_index.pairs], description)
    if synthetic_dir is not None:
        train, val = read_split(synthetic_dir, "train"), read_split(synthetic_dir, "val")
        if list(val.captions) != data.val.captions or list(train.captions) != data.train_captions:
            raise ValueError(f"the synthetic set in {synthetic_dir} does not match the indexed pairs (were rows "
                             "skipped?); its ground truth cannot be aligned with them")
        data.synthetic = (train, val)
    return data


# ----------------------------------------------------------------------------------------------------------
# Chance levels
# ----------------------------------------------------------------------------------------------------------

def _hit_chance(n_items: int, n_true: int, k: int) -> float:
    """P(at least one of n_true items is in the top k of a uniformly random ranking of n_items)."""
    if n_true <= 0:
        return 0.0
    if k >= n_items:
        return 1.0
    return 1.0 - math.comb(n_items - n_true, k) / math.comb(n_items, k)


def _mean(xs) -> float | None:
    xs = list(xs)
    return 100.0 * sum(xs) / len(xs) if xs else None


def chance_levels(val: EvalSplit, zs: zeroshot.ZeroShotSet | None = None, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Each metric's value under a uniformly random ranking (percent), for this data (``zs``: the synthetic
    attribute set, for the synthetic-only metrics)."""
    nt, ni = len(val.captions), len(val.images)
    per_image = [0] * ni
    for j in val.text_to_image:
        per_image[j] += 1
    ret = {}
    for k in ks:
        ret[f"i2t_r{k}"] = _mean(_hit_chance(nt, m, k) for m in per_image if m)
        ret[f"t2i_r{k}"] = _mean(_hit_chance(ni, 1, k) for _ in range(nt))
    cap = {f"r{k}": _mean(_hit_chance(nt - 1, per_image[j] - 1, k) for j in val.text_to_image if per_image[j] > 1)
           for k in (1, 5)}
    out = {"retrieval": ret, "caption_retrieval": cap, "text_em": 0.0}
    if zs is None:
        return out
    c = len(zs.class_names)
    held = set(zs.heldout_classes)
    out.update(attribute_top1=_mean(_hit_chance(c, len(l), 1) for l in zs.labels),
               attribute_top5=_mean(_hit_chance(c, len(l), 5) for l in zs.labels),
               compositional={g: 50.0 for g in (*compositional.GROUPS, "mean")})
    if held:  # the image's other combos are left out of the ranking
        held_n = [(len([x for x in l if x in held]), len([x for x in l if x not in held])) for l in zs.labels]
        out["attribute_heldout_top1"] = _mean(_hit_chance(c - o, m, 1) for m, o in held_n if m)
        out["attribute_heldout_top5"] = _mean(_hit_chance(c - o, m, 5) for m, o in held_n if m)
    return out


# ----------------------------------------------------------------------------------------------------------
# The evaluations
# ----------------------------------------------------------------------------------------------------------

def _resolve_concepts(concept_labels, data: EvalData, k: int | None) -> dict:
    """Cluster-size statistics of the concept labels; plus NMI against the true attributes on synthetic data."""
    if isinstance(concept_labels, torch.Tensor):
        concept_labels = concept_labels.detach().cpu().numpy()
    labels = np.asarray(concept_labels).reshape(-1)
    if data.synthetic is not None:
        train, val = data.synthetic
        if len(labels) == len(train.rows):
            rows, split = train.rows, "train"
        elif len(labels) == len(val.rows):
            rows, split = val.rows, "val"
        else:
            raise ValueError(f"concept_labels has {len(labels)} entries; it must align with train.csv "
                             f"({len(train.rows)} rows) or val.csv ({len(val.rows)} rows)")
        attributes = concept_stats.attribute_table(rows, val.meta.get("attribute_columns"))
    else:
        if len(labels) != len(data.train_captions):
            raise ValueError(f"concept_labels has {len(labels)} entries; it must align with the "
                             f"{len(data.train_captions)} training pairs")
        attributes, split = {}, "train"
    stats = concept_stats.concept_stats(labels, attributes, k)
    stats["split"] = split
    return stats


def _evaluate_model(model, data: EvalData, zs_sets: dict, items, batch_size: int,
                    caption_retrieval: bool) -> tuple[dict, dict]:
    """(the model's report entry, its per-image hits: :mod:`kclip.eval.hits`)."""
    t0 = time.perf_counter()
    val = data.val
    img = encode_images(model, val.images, batch_size)                                  # (Ni, D)
    txt_raw = encode_texts(model, val.captions, batch_size, normalize=False)           # (Nt, D)
    txt = torch.nn.functional.normalize(txt_raw, dim=-1)                               # (Nt, D)
    ranks = retrieval.retrieval_ranks(img, txt, val.text_to_image)
    entry: dict = {"retrieval": retrieval.recall_from_ranks(*ranks)}
    per_image = hits.retrieval_hits(*ranks, val.text_to_image)
    if caption_retrieval:
        entry["caption_retrieval"] = retrieval.caption_retrieval(txt, val.text_to_image)
    if "attribute" in zs_sets:
        zs = zs_sets["attribute"]
        scores = zeroshot.class_scores(model, zs, batch_size, image_emb=img)           # (Ni, C)
        zsr = zeroshot.zeroshot_metrics(scores, zs)
        entry.update(attribute_top1=zsr["top1"], attribute_top5=zsr["top5"],
                     attribute_heldout_top1=zsr.get("heldout_top1"), attribute_heldout_top5=zsr.get("heldout_top5"),
                     zeroshot_detail=zsr)
        for k, h in hits.topk_hits(zeroshot.topk_ranks(scores, zs.labels)).items():
            per_image[f"attribute_top{k}"] = h
        if zs.heldout_classes:
            held = zeroshot.topk_ranks(scores, zeroshot.heldout_labels(zs), ignore=zs.labels)
            for k, h in hits.topk_hits(held).items():
                per_image[f"attribute_heldout_top{k}"] = h
    if items is not None:
        scored = compositional.compositional_scores(model, val.images, items, batch_size, image_emb=img)
        entry["compositional"] = compositional.accuracy_from_scores(*scored)
        per_image["compositional.mean"] = hits.compositional_hits(*scored)
    for name in ("cub", "awa2"):
        if name in zs_sets:
            entry[name] = _zeroshot(model, zs_sets[name], batch_size)
    entry["seconds"] = time.perf_counter() - t0
    return entry, per_image


def _em_train_captions(captions: list[str], seed: int) -> list[str]:
    if len(captions) <= TEXT_EM_TRAIN_MAX:
        return list(captions)
    keep = np.sort(np.random.default_rng(seed).choice(len(captions), TEXT_EM_TRAIN_MAX, replace=False))
    return [captions[i] for i in keep]


def _evaluations(data: EvalData, caption_retrieval: bool, concept_labels, cub_root, awa2_root, em_train: list[str],
                 has_teacher: bool) -> dict:
    """Per evaluation: {"ran": True, "on": what it ran on} or {"ran": False, "why": why not}."""
    nv, ni = len(data.val.captions), len(data.val.images)
    needs_truth = "needs the built-in synthetic set's ground truth (data.source is not synthetic)"

    def entry(ran: bool, on: str, why: str) -> dict:
        return {"ran": True, "on": on} if ran else {"ran": False, "why": why}

    concepts_on = "k-means labels of the training captions: " + (
        "cluster sizes, NMI vs the true attributes" if data.synthetic else f"cluster sizes only (NMI {needs_truth})")
    return {
        "retrieval": entry(True, f"{ni} val images, {nv} val captions", ""),
        "caption_retrieval": entry(caption_retrieval, "val images with 2+ captions",
                                   "no val image has two or more captions"),
        "text_em": entry(True, "Kamath et al. probe: autoencoder-trained frozen decoder, a linear map + LayerNorm "
                               f"per encoder, fitted on {len(em_train)} train captions; EM on held-back train-"
                               "distribution captions" + (f" and on the {nv} val captions (held-out combos)"
                                                          if data.synthetic else f" (here the {nv} val captions)"), ""),
        "teacher": entry(has_teacher, "cached teacher embeddings (text-only metrics)", "no teacher encoder given"),
        "attribute_zeroshot": entry(data.synthetic is not None, "synthetic val images, 20 colour-shape classes",
                                    needs_truth),
        "compositional": entry(data.synthetic is not None, "synthetic val images, hard-negative captions", needs_truth),
        "concepts": entry(concept_labels is not None, concepts_on, "no concept labels given"),
        "cub": entry(bool(cub_root), str(cub_root), "eval.cub_root not set (the CUB_200_2011 folder as released)"),
        "awa2": entry(bool(awa2_root), str(awa2_root),
                      "eval.awa2_root not set (the Animals_with_Attributes2 folder as released)"),
    }


def _git_rev() -> str:
    # The commit alone, as reports have always recorded it (kclip.experiments.comparison reads it from here too).
    return git_revision(mark_dirty=False, from_env=False)


def run_eval(models: Mapping[str, object], data: EvalData | str | Path, out_dir: str | Path, teacher=None,
             concept_labels=None, cub_root: str | Path | None = None, awa2_root: str | Path | None = None,
             batch_size: int = 256, seed: int = 0, text_em_steps: int = DEFAULT_TEXT_EM_STEPS, progress: bool = True,
             concept_k: int | None = None, zeroshot_max_per_class: int | None = None,
             distillation: dict | None = None) -> dict:
    """Evaluate each model (and the teacher's text side) on what applies to ``data``, and write the report.

    Args:
        models: name -> Encoders (``encode_images``/``encode_texts``). Name them "before" and "after"
            to get a delta column.
        data: an :class:`EvalData` (any source; see :func:`index_eval_data`), or the folder of a synthetic
            set (images/, train.csv, val.csv, meta.json).
        out_dir: where report.json / report.md / report.png go.
        teacher: optional text encoder (``encode_texts``): caption retrieval and the EM probe.
        concept_labels: optional (N,) k-means labels aligned with the training pairs (or, on the synthetic
            set, with val.csv rows if that is their length).
        concept_k: the k of that k-means (to count empty clusters).
        cub_root, awa2_root: optional released CUB-200-2011 / AWA2 folders.
        text_em_steps: the EM probe's training budget (the same for every encoder).
        zeroshot_max_per_class: cap images per class on CUB/AWA2.
        distillation: the training summary's held-out R^2 of W_e(E_T(x)) against the teacher, for the report.

    Returns:
        the report dict (also written as report.json): {"models": {name: metrics}, "teacher",
        "baselines", "chance", "concepts", "evaluations", "provenance"}. Each model's per-image hits
        (:mod:`kclip.eval.hits`) are written beside it as ``per_image_<name>.npz``.
    """
    from tqdm.auto import tqdm

    if not models:
        raise ValueError("run_eval needs at least one model")
    t0 = time.perf_counter()
    if not isinstance(data, EvalData):
        data = synthetic_eval_data(data)
    synthetic_train, synthetic_val = data.synthetic if data.synthetic else (None, None)
    zs_sets = _zeroshot_sets(cub_root, awa2_root, synthetic_val, zeroshot_max_per_class, seed)
    items = compositional.build_items(synthetic_val.scenes, synthetic_val.meta, seed) if data.synthetic else None
    em_train = _em_train_captions(data.train_captions, seed)
    caption_retrieval = len(set(data.val.text_to_image)) < len(data.val.text_to_image)

    # checked before any model runs, so a misaligned label file fails fast
    concepts = _resolve_concepts(concept_labels, data, concept_k) if concept_labels is not None else None

    report: dict = {"models": {}}
    per_image = {}
    for name, model in tqdm(list(models.items()), desc="eval models", disable=not progress, leave=False):
        report["models"][name], per_image[name] = _evaluate_model(model, data, zs_sets, items, batch_size,
                                                                  caption_retrieval)
    fit, em_splits = text_em_splits(data, em_train, seed)
    probe = _text_em({**models, **({"teacher": teacher} if teacher is not None else {})}, fit, em_splits,
                     text_em_steps, seed, batch_size, progress)
    for name in models:
        report["models"][name].update(_em_fields(probe["encoders"][name]))
    report["text_em_probe"] = {"autoencoder": {**_em_fields(probe["autoencoder"]),
                                               "vocab_size": probe["autoencoder"]["vocab_size"]},
                               "n_fit_captions": len(fit), "splits": {k: len(v) for k, v in em_splits.items()},
                               "detail": probe}
    if teacher is not None:
        t1 = time.perf_counter()
        raw = encode_texts(teacher, data.val.captions, batch_size, normalize=False)             # (Nt, D')
        report["teacher"] = {"name": encoder_name(teacher, "teacher"), **_em_fields(probe["encoders"]["teacher"])}
        if caption_retrieval:
            report["teacher"]["caption_retrieval"] = retrieval.caption_retrieval(
                torch.nn.functional.normalize(raw, dim=-1), data.val.text_to_image)
        report["teacher"]["seconds"] = time.perf_counter() - t1
    else:
        report["teacher"] = None
    report["baselines"] = {}
    if items is not None:
        report["baselines"]["compositional_text_only"] = compositional.text_only_baseline(synthetic_train.captions,
                                                                                          items)
    report["chance"] = chance_levels(data.val, zs_sets.get("attribute"))
    report["concepts"] = concepts
    report["distillation"] = distillation
    report["evaluations"] = _evaluations(data, caption_retrieval, concept_labels, cub_root, awa2_root, em_train,
                                         teacher is not None)
    report["provenance"] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_rev": _git_rev(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "data": data.description,
        "data_params": synthetic_val.meta.get("params") if synthetic_val is not None else None,
        "n_val_images": len(data.val.images),
        "n_val_captions": len(data.val.captions),
        "n_train_captions": len(data.train_captions),
        "n_text_em_train_captions": len(em_train),
        "seed": seed,
        "batch_size": batch_size,
        "text_em_steps": text_em_steps,
        "models": {n: encoder_name(m, n) for n, m in models.items()},
        "teacher": encoder_name(teacher, "teacher") if teacher is not None else None,
        "cub_root": str(cub_root) if cub_root else None,
        "awa2_root": str(awa2_root) if awa2_root else None,
        "runtime_s": time.perf_counter() - t0,
    }
    write_report(report, out_dir)  # the caller prints format_table(report) (the pipeline does, once)
    for name, h in per_image.items():  # what each image contributes to each image-level metric
        hits.save_hits(Path(out_dir) / hits.HITS_FILE.format(model=name), h)
    return report
