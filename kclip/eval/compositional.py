"""Compositional hard negatives on the synthetic set (ARO / SugarCrepe style, with exact ground truth).

For each validation image the *true* caption is the scene's canonical phrasing
``"a <size_a> <colour_a> <shape_a> <relation> a <size_b> <colour_b> <shape_b>"`` and each negative
changes exactly one thing, so it is false for that image:

- ``attribute_swap``: the two objects' colours are exchanged (skipped when both have the same colour,
  where the swap would not change the caption; ``n`` says how many images had one);
- ``attribute_replace`` = ``replace_color`` + ``replace_shape`` + ``replace_size``: one object's
  colour / shape / size is replaced by another value of the vocabulary (object and value drawn with
  a seeded RNG per image);
- ``relation_replace`` = ``relation_opposite`` (left <-> right, above <-> below) +
  ``relation_other`` (one of the two perpendicular relations, seeded).

Accuracy = percent of (image, negative) pairs where sim(image, true) > sim(image, negative), strictly
(a tie is a failure, so a constant encoder gets 0; chance for a random encoder is 50). Group scores
pool their sub-types' pairs; ``mean`` is the mean of the three groups.

Text-only baseline: a bigram language model (add-one smoothing, sentence boundary tokens) fit on the
*training* captions scores each caption by its log-probability and "prefers" the more plausible one.
It never sees the image, so what it gets right is what a model could get from caption priors alone
(the SugarCrepe critique of ARO/CREPE). Word order matters to it, so it is not fooled into a tie by
swaps; and because the held-out (colour, shape) combos never occur in training captions while every
validation image contains one, it tends to prefer negatives that *remove* a held-out combo, so it
scores at or below 50% here: the benchmark cannot be solved blind, and a model above it is reading
the image.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .encoders import encode_images, encode_texts

GROUPS = {
    "attribute_swap": ("attribute_swap",),
    "attribute_replace": ("replace_color", "replace_shape", "replace_size"),
    "relation_replace": ("relation_opposite", "relation_other"),
}
NEGATIVE_TYPES = tuple(t for ts in GROUPS.values() for t in ts)
_OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above"}


def scene_caption(scene: Mapping[str, str]) -> str:
    """The canonical caption (phrasing 0 of ``kclip.synthetic.Scene``)."""
    return (f"a {scene['size_a']} {scene['color_a']} {scene['shape_a']} {scene['relation']} "
            f"a {scene['size_b']} {scene['color_b']} {scene['shape_b']}")


def make_negatives(scene: Mapping[str, str], vocab: Mapping[str, Sequence[str]], rng: random.Random) -> dict[str, str | None]:
    """One caption per negative type for ``scene`` (None where the type does not apply).

    Args:
        vocab: {"colors": [...], "shapes": [...], "sizes": [...], "relations": [...]} (meta.json keys).
        rng: draws which object is edited and the replacement value.
    """
    s = dict(scene)
    out: dict[str, str | None] = {}
    if s["color_a"] != s["color_b"]:
        out["attribute_swap"] = scene_caption({**s, "color_a": s["color_b"], "color_b": s["color_a"]})
    else:
        out["attribute_swap"] = None
    for kind, key in (("replace_color", "colors"), ("replace_shape", "shapes"), ("replace_size", "sizes")):
        col = {"colors": "color", "shapes": "shape", "sizes": "size"}[key] + "_" + rng.choice("ab")
        choices = [v for v in vocab[key] if v != s[col]]
        out[kind] = scene_caption({**s, col: rng.choice(choices)}) if choices else None
    rel = s["relation"]
    opposite = _OPPOSITE.get(rel)
    out["relation_opposite"] = scene_caption({**s, "relation": opposite}) if opposite else None
    others = [r for r in vocab["relations"] if r not in (rel, opposite)]
    out["relation_other"] = scene_caption({**s, "relation": rng.choice(others)}) if others else None
    return out


def build_items(scenes: Sequence[Mapping[str, str]], meta: Mapping, seed: int = 0) -> list[dict]:
    """Per image {"true": caption, <type>: negative or None}; deterministic given ``seed``."""
    vocab = {k: list(meta[k]) for k in ("colors", "shapes", "sizes", "relations")}
    items = []
    for i, sc in enumerate(scenes):
        rng = random.Random(seed * 1_000_003 + i)
        items.append({"true": scene_caption(sc), **make_negatives(sc, vocab, rng)})
    return items


def accuracy_from_scores(true_scores: Sequence[float], neg_scores: Mapping[str, Sequence[float | None]]) -> dict:
    """Percent of pairs with true > negative, per type, per group, and the mean of the groups.

    Args:
        true_scores: (N,) score of each image's true caption.
        neg_scores: type -> (N,) score of the negative (None where the image has none of that type).
    """
    out: dict = {}
    wins_by_type: dict[str, list[bool]] = {}
    for t, scores in neg_scores.items():
        wins = [float(ts) > float(ns) for ts, ns in zip(true_scores, scores) if ns is not None]
        wins_by_type[t] = wins
        out[t] = 100.0 * sum(wins) / len(wins) if wins else float("nan")
        out[f"n_{t}"] = len(wins)
    groups = []
    for g, types in GROUPS.items():
        pooled = [w for t in types for w in wins_by_type.get(t, [])]
        if pooled:
            out[g] = 100.0 * sum(pooled) / len(pooled)
            groups.append(out[g])
    out["mean"] = sum(groups) / len(groups) if groups else float("nan")
    return out


def compositional_scores(encoder, images: Sequence, items: Sequence[Mapping[str, str | None]], batch_size: int = 256,
                         image_emb: torch.Tensor | None = None) -> tuple[list[float], dict[str, list]]:
    """(true_scores (N,), type -> (N,) negative scores, None where an image has none of that type): what
    :func:`accuracy_from_scores` takes. Arguments as :func:`compositional_accuracy`."""
    if image_emb is None:
        image_emb = encode_images(encoder, images, batch_size)  # (N, D)
    if image_emb.shape[0] != len(items):
        raise ValueError(f"{image_emb.shape[0]} image embeddings for {len(items)} items")
    texts, where = [], []  # unique (row, key) -> text index
    for i, it in enumerate(items):
        for key in ("true", *NEGATIVE_TYPES):
            if it.get(key) is not None:
                where.append((i, key))
                texts.append(it[key])
    emb = encode_texts(encoder, texts, batch_size)  # (T, D)
    rows = torch.tensor([i for i, _ in where])
    sims = (image_emb.float()[rows] * emb).sum(dim=1).tolist()  # (T,)
    table: dict[tuple[int, str], float] = {w: s for w, s in zip(where, sims)}
    true_scores = [table[(i, "true")] for i in range(len(items))]
    return true_scores, {t: [table.get((i, t)) for i in range(len(items))] for t in NEGATIVE_TYPES}


def compositional_accuracy(encoder, images: Sequence, items: Sequence[Mapping[str, str | None]], batch_size: int = 256,
                           image_emb: torch.Tensor | None = None) -> dict:
    """Hard-negative accuracy of ``encoder`` (percent): true caption vs each negative, per type.

    Args:
        images: (N,) image paths / PIL images, aligned with ``items`` (from :func:`build_items`).
        image_emb: (N, D) precomputed normalised image embeddings (skips encoding).
    """
    return accuracy_from_scores(*compositional_scores(encoder, images, items, batch_size, image_emb))


def _tokens(text: str) -> list[str]:
    return ["<s>", *text.lower().replace(",", " ,").split(), "</s>"]


class BigramLM:
    """Add-one smoothed bigram language model over whitespace words (the text-only baseline)."""

    def __init__(self, captions: Sequence[str]):
        if not captions:
            raise ValueError("BigramLM needs training captions")
        self.unigrams: Counter = Counter()
        self.bigrams: Counter = Counter()
        for c in captions:
            toks = _tokens(c)
            self.unigrams.update(toks[:-1])
            self.bigrams.update(zip(toks[:-1], toks[1:]))
        self.vocab_size = len({w for c in captions for w in _tokens(c)}) + 1  # +1: unseen words

    def log_prob(self, text: str) -> float:
        toks = _tokens(text)
        return sum(math.log((self.bigrams[(a, b)] + 1) / (self.unigrams[a] + self.vocab_size))
                   for a, b in zip(toks[:-1], toks[1:]))


def text_only_baseline(train_captions: Sequence[str], items: Sequence[Mapping[str, str | None]]) -> dict:
    """The blind baseline: :class:`BigramLM` log-probabilities in place of image-text similarities."""
    lm = BigramLM(train_captions)
    true_scores = [lm.log_prob(it["true"]) for it in items]
    neg = {t: [lm.log_prob(it[t]) if it.get(t) is not None else None for it in items] for t in NEGATIVE_TYPES}
    return accuracy_from_scores(true_scores, neg)


def synthetic_items(data_dir: str | Path, split: str = "val", seed: int = 0) -> tuple[list, list[dict]]:
    """(image paths, items) for the synthetic ``split``: one item per unique image."""
    from .synthetic_split import read_split

    data = read_split(data_dir, split)
    return list(data.image_paths), build_items(data.scenes, data.meta, seed)
