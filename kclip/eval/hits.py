"""Per-image hits: what each image contributes to an image-level metric, for paired resampling of images.

The evaluators hand back their per-item ranks and scores (``retrieval.retrieval_ranks``, ``zeroshot.topk_ranks``,
``compositional.compositional_scores``); this module turns them into, per metric, ``(num, den)`` arrays of shape
(Ni, C) such that ``100 * mean_c(sum_i num / sum_i den)`` is the metric the report holds (C = 1 for a rate over
images, one column per group for the hard-negative mean). ``run_eval`` writes them beside its report
(:data:`HITS_FILE`), so a driver that resamples images (``kclip.experiments.comparison``) reads them instead of
scoring again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from kclip.atomic import atomic_path

from .compositional import GROUPS

HITS_FILE = "per_image_{model}.npz"


def retrieval_hits(i2t_rank: torch.Tensor, t2i_rank: torch.Tensor, has_text: torch.Tensor, text_to_image,
                   ks: Sequence[int] = (1, 5, 10)) -> dict[str, tuple]:
    """``retrieval.i2t_r<k>`` (an image hits or not) and ``retrieval.t2i_r<k>`` (an image's captions that hit,
    over its captions) per image. Shapes: (Ni,), (Nt,), (Ni,), (Nt,) -> (Ni, 1) arrays."""
    ni = has_text.numel()
    t2i = np.asarray(text_to_image, dtype=np.int64)
    own = has_text.numpy().astype(float)[:, None]                                       # (Ni, 1)
    per_image = np.bincount(t2i, minlength=ni).astype(float)[:, None]                   # (Ni, 1)
    out = {}
    for k in ks:
        out[f"retrieval.i2t_r{k}"] = ((i2t_rank < k).numpy().astype(float)[:, None] * own, own)
        hits = np.bincount(t2i, weights=(t2i_rank < k).numpy().astype(float), minlength=ni)[:, None]
        out[f"retrieval.t2i_r{k}"] = (hits, per_image)
    return out


def topk_hits(rank: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, tuple]:
    """k -> (hit, counted) per image from ``zeroshot.topk_ranks`` (-1: no label, not counted). (Ni,) -> (Ni, 1)."""
    counted = (rank >= 0).numpy().astype(float)[:, None]
    return {k: (((rank >= 0) & (rank < k)).numpy().astype(float)[:, None], counted) for k in ks}


def compositional_hits(true_scores: Sequence[float], neg_scores: Mapping[str, Sequence[float | None]]) -> tuple:
    """``compositional.mean``: per image and group, negatives beaten and negatives faced (Ni, G) each."""
    ni = len(true_scores)
    num, den = np.zeros((ni, len(GROUPS))), np.zeros((ni, len(GROUPS)))
    for g, types in enumerate(GROUPS.values()):
        for t in types:
            for i, (ts, ns) in enumerate(zip(true_scores, neg_scores.get(t, ()))):
                if ns is not None:
                    num[i, g] += float(float(ts) > float(ns))
                    den[i, g] += 1.0
    return num, den


def save_hits(path: str | Path, hits: Mapping[str, tuple]) -> None:
    arrays = {}
    for k, (num, den) in hits.items():
        arrays[f"{k}::num"], arrays[f"{k}::den"] = num, den
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def load_hits(path: str | Path) -> dict[str, tuple]:
    with np.load(path) as z:
        keys = sorted({k.split("::")[0] for k in z.files})
        return {k: (z[f"{k}::num"], z[f"{k}::den"]) for k in keys}
