"""``run_eval``: every evaluation for a set of models on the synthetic set (plus CUB/AWA2 when given).

What is measured where (all percentages):

- val.csv: image<->text retrieval R@K, caption->caption retrieval, attribute zero-shot (20 colour-shape
  classes; also on the held-out combos), compositional hard negatives (with the text-only bigram
  baseline beside the models);
- train.csv captions train the text-reconstruction probe's decoder, val.csv captions test it (EM and
  token accuracy), with the same step budget and seed for every encoder, the teacher included;
- ``concept_labels`` (k-means labels from the concepts stage, aligned with train.csv rows, or with
  val.csv rows if that is their length): NMI against the true attributes + cluster sizes;
- ``cub_root`` / ``awa2_root``: the released datasets, zero-shot with the paper's prompts.

The report also holds the chance level of each metric (a uniformly random ranking), computed exactly
for the data at hand. Outputs (atomic): ``report.json``, ``report.md``, ``report.png`` in ``out_dir``.
"""
from __future__ import annotations

import math
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from . import compositional, concept_stats, retrieval, text_em, zeroshot
from .encoders import encode_images, encode_texts, encoder_name
from .report import format_table, write_report
from .synthetic_split import SyntheticSplit, read_split

DEFAULT_TEXT_EM_STEPS = 300


def _git_rev() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _hit_chance(n_items: int, n_true: int, k: int) -> float:
    """P(at least one of n_true items is in the top k of a uniformly random ranking of n_items)."""
    if n_true <= 0:
        return 0.0
    if k >= n_items:
        return 1.0
    return 1.0 - math.comb(n_items - n_true, k) / math.comb(n_items, k)


def chance_levels(val: SyntheticSplit, zs: zeroshot.ZeroShotSet, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Each metric's value under a uniformly random ranking (percent), for this data."""
    nt, ni = len(val.captions), len(val.image_paths)
    per_image = [0] * ni
    for j in val.text_to_image:
        per_image[j] += 1
    mean = lambda xs: 100.0 * sum(xs) / len(xs) if xs else None  # noqa: E731
    ret = {}
    for k in ks:
        ret[f"i2t_r{k}"] = mean([_hit_chance(nt, m, k) for m in per_image if m])
        ret[f"t2i_r{k}"] = mean([_hit_chance(ni, 1, k) for _ in range(nt)])
    cap = {f"r{k}": mean([_hit_chance(nt - 1, per_image[j] - 1, k) for j in val.text_to_image if per_image[j] > 1])
           for k in (1, 5)}
    c = len(zs.class_names)
    held = set(zs.heldout_classes)
    out = {"retrieval": ret, "caption_retrieval": cap, "text_em": 0.0,
           "attribute_top1": mean([_hit_chance(c, len(l), 1) for l in zs.labels]),
           "attribute_top5": mean([_hit_chance(c, len(l), 5) for l in zs.labels]),
           "compositional": {g: 50.0 for g in (*compositional.GROUPS, "mean")}}
    if held:  # the image's other combos are left out of the ranking
        held_n = [(len([x for x in l if x in held]), len([x for x in l if x not in held])) for l in zs.labels]
        out["attribute_heldout_top1"] = mean([_hit_chance(c - o, m, 1) for m, o in held_n if m])
        out["attribute_heldout_top5"] = mean([_hit_chance(c - o, m, 5) for m, o in held_n if m])
    return out


def _resolve_concepts(concept_labels, train: SyntheticSplit, val: SyntheticSplit, k: int | None) -> dict:
    if isinstance(concept_labels, torch.Tensor):
        concept_labels = concept_labels.detach().cpu().numpy()
    labels = np.asarray(concept_labels).reshape(-1)
    if len(labels) == len(train.rows):
        rows, split = train.rows, "train"
    elif len(labels) == len(val.rows):
        rows, split = val.rows, "val"
    else:
        raise ValueError(f"concept_labels has {len(labels)} entries; it must align with train.csv ({len(train.rows)} "
                         f"rows) or val.csv ({len(val.rows)} rows)")
    stats = concept_stats.concept_stats(labels, concept_stats.attribute_table(rows, val.meta.get("attribute_columns")), k)
    stats["split"] = split
    return stats


def _evaluate_model(model, val, train, zs, items, cub, awa2, batch_size, seed, text_em_steps, progress) -> dict:
    t0 = time.perf_counter()
    img = encode_images(model, val.image_paths, batch_size)  # (Ni, D)
    txt_raw = encode_texts(model, val.captions, batch_size, normalize=False)  # (Nt, D)
    txt = torch.nn.functional.normalize(txt_raw, dim=-1)  # (Nt, D)
    entry: dict = {}
    entry["retrieval"] = retrieval.retrieval_recall(img, txt, val.text_to_image)
    entry["caption_retrieval"] = retrieval.caption_retrieval(txt, val.text_to_image)
    zsr = zeroshot.zeroshot_accuracy(model, zs, batch_size, image_emb=img)
    entry.update(attribute_top1=zsr["top1"], attribute_top5=zsr["top5"],
                 attribute_heldout_top1=zsr.get("heldout_top1"), attribute_heldout_top5=zsr.get("heldout_top5"),
                 zeroshot_detail=zsr)
    entry["compositional"] = compositional.compositional_accuracy(model, val.image_paths, items, batch_size, image_emb=img)
    em = text_em.text_em_probe(model, train.captions, val.captions, steps=text_em_steps, seed=seed,
                               embed_batch_size=batch_size, test_emb=txt_raw, progress=progress)
    entry.update(text_em=em["em"], text_token_acc=em["token_acc"], text_em_detail=em)
    if cub is not None:
        entry["cub"] = zeroshot.zeroshot_accuracy(model, cub, batch_size)
    if awa2 is not None:
        entry["awa2"] = zeroshot.zeroshot_accuracy(model, awa2, batch_size)
    entry["seconds"] = time.perf_counter() - t0
    return entry


def run_eval(models: Mapping[str, object], data_dir: str | Path, out_dir: str | Path, teacher=None,
             concept_labels=None, cub_root: str | Path | None = None, awa2_root: str | Path | None = None,
             batch_size: int = 256, seed: int = 0, text_em_steps: int = DEFAULT_TEXT_EM_STEPS, progress: bool = True,
             concept_k: int | None = None, zeroshot_max_per_class: int | None = None) -> dict:
    """Evaluate each model (and the teacher's text side) and write the report.

    Args:
        models: name -> Encoders (``encode_images``/``encode_texts``). Name them "before" and "after"
            to get a delta column.
        data_dir: the synthetic set (images/, train.csv, val.csv, meta.json).
        out_dir: where report.json / report.md / report.png go.
        teacher: optional text encoder (``encode_texts``): caption retrieval and the EM probe.
        concept_labels: optional (N,) k-means labels aligned with train.csv (or val.csv) rows.
        concept_k: the k of that k-means (to count empty clusters).
        cub_root, awa2_root: optional released CUB-200-2011 / AWA2 folders.
        text_em_steps: the EM probe's training budget (the same for every encoder).
        zeroshot_max_per_class: cap images per class on CUB/AWA2.

    Returns:
        the report dict (also written as report.json): {"models": {name: metrics}, "teacher",
        "baselines", "chance", "concepts", "provenance"}.
    """
    from tqdm.auto import tqdm

    if not models:
        raise ValueError("run_eval needs at least one model")
    t0 = time.perf_counter()
    val, train = read_split(data_dir, "val"), read_split(data_dir, "train")
    zs = zeroshot.synthetic_zeroshot_from_split(val)
    items = compositional.build_items(val.scenes, val.meta, seed)
    cub = zeroshot.load_cub(cub_root, max_per_class=zeroshot_max_per_class, seed=seed) if cub_root else None
    awa2 = zeroshot.load_awa2(awa2_root, max_per_class=zeroshot_max_per_class, seed=seed) if awa2_root else None

    # checked before any model runs, so a misaligned label file fails fast
    concepts = _resolve_concepts(concept_labels, train, val, concept_k) if concept_labels is not None else None

    report: dict = {"models": {}}
    for name, model in tqdm(list(models.items()), desc="eval models", disable=not progress, leave=False):
        report["models"][name] = _evaluate_model(model, val, train, zs, items, cub, awa2, batch_size, seed,
                                                 text_em_steps, progress)
    if teacher is not None:
        t1 = time.perf_counter()
        raw = encode_texts(teacher, val.captions, batch_size, normalize=False)  # (Nt, D')
        em = text_em.text_em_probe(teacher, train.captions, val.captions, steps=text_em_steps, seed=seed,
                                   embed_batch_size=batch_size, test_emb=raw, progress=progress)
        report["teacher"] = {
            "name": encoder_name(teacher, "teacher"),
            "caption_retrieval": retrieval.caption_retrieval(torch.nn.functional.normalize(raw, dim=-1), val.text_to_image),
            "text_em": em["em"], "text_token_acc": em["token_acc"], "text_em_detail": em,
            "seconds": time.perf_counter() - t1,
        }
    else:
        report["teacher"] = None
    report["baselines"] = {"compositional_text_only": compositional.text_only_baseline(train.captions, items)}
    report["chance"] = chance_levels(val, zs)
    report["concepts"] = concepts
    report["provenance"] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_rev": _git_rev(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "data_dir": str(Path(data_dir).resolve()),
        "data_params": val.meta.get("params"),
        "n_val_images": len(val.image_paths),
        "n_val_captions": len(val.captions),
        "n_train_captions": len(train.captions),
        "seed": seed,
        "batch_size": batch_size,
        "text_em_steps": text_em_steps,
        "models": {n: encoder_name(m, n) for n, m in models.items()},
        "teacher": encoder_name(teacher, "teacher") if teacher is not None else None,
        "cub_root": str(cub_root) if cub_root else None,
        "awa2_root": str(awa2_root) if awa2_root else None,
        "runtime_s": time.perf_counter() - t0,
    }
    write_report(report, out_dir)
    if progress:
        print(format_table(report), file=sys.stderr)
    return report
