"""Encoders built from a run's artefacts, for the evaluations and the concepts figure.

- :class:`CachedTeacherTexts`: the teacher as an ``encode_texts`` encoder over its cached caption
  embeddings, seen through :class:`kclip.targets.TeacherTargets` (the one place the teacher target is
  normalised), so no teacher weights are loaded and eval sees the targets the student was trained on.
- :func:`student_text_embeddings`: the untrained student's text embeddings of (a seeded sample of) the
  training captions; the paper's Figure 4 compares their cluster sizes with the teacher's.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

STUDENT_SAMPLE = 50_000


class CachedTeacherTexts:
    """``encode_texts`` over cached teacher embeddings (no model loaded).

    Args:
        name: the encoder's name in reports.
        targets_and_captions: (targets, captions) per split, where ``targets.get(rows)`` returns the
            (n, d') float32 targets of those rows (a :class:`kclip.targets.TeacherTargets`) and
            ``captions`` lists the split's captions in row order. A caption found in several splits is
            read from the first.
    """

    def __init__(self, name: str, targets_and_captions: Sequence[tuple[object, Sequence[str]]]):
        self.name = name
        self._rows: dict[str, tuple[int, int]] = {}        # caption -> (source, row)
        self._sources = []
        for s, (targets, captions) in enumerate(targets_and_captions):
            self._sources.append(targets)
            for i, caption in enumerate(captions):
                self._rows.setdefault(caption, (s, i))

    def covers(self, texts: Sequence[str]) -> bool:
        """Whether every one of ``texts`` is cached (evaluations skip a caption split it does not cover)."""
        return all(t in self._rows for t in texts)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, d') float32: the cached targets of ``texts`` (one gather per split, not one read per caption)."""
        missing = [t for t in texts if t not in self._rows]
        if missing:
            raise KeyError(f"teacher embedding not cached for {len(missing)} texts (e.g. {missing[0]!r}); the "
                           "cached teacher encodes only the captions of the run's splits")
        if not texts:
            return torch.empty(0, self._sources[0].dim if self._sources else 0)
        out = np.empty((len(texts), self._sources[self._rows[texts[0]][0]].dim), dtype=np.float32)  # (n, d')
        groups: dict[int, tuple[list[int], list[int]]] = {}
        for j, t in enumerate(texts):
            s, i = self._rows[t]
            positions, rows = groups.setdefault(s, ([], []))
            positions.append(j)
            rows.append(i)
        for s, (positions, rows) in groups.items():
            out[positions] = self._sources[s].get(rows)                               # (m, d')
        return torch.from_numpy(out)


def student_text_embeddings(model_name: str, pretrained: str, captions: Sequence[str], seed: int, device,
                            batch_size: int = 256, max_captions: int = STUDENT_SAMPLE) -> torch.Tensor:
    """The untrained student's L2-normalised text embeddings of at most ``max_captions`` captions.

    Args:
        model_name, pretrained: the student as in ``model.name`` / ``model.pretrained``; built with ``seed``,
            so it is the same initialisation training starts from.
        captions: the training captions; above ``max_captions`` a seeded sample (in caption order) is used.

    Shapes:
        returns (min(N, max_captions), D) float32 on the CPU.
    """
    from kclip.model import ClipEncoders, build_clip

    captions = list(captions)
    if len(captions) > max_captions:
        keep = np.sort(np.random.default_rng(seed).choice(len(captions), max_captions, replace=False))
        captions = [captions[i] for i in keep]
    clip, _, preprocess, tokenizer = build_clip(model_name, pretrained, seed=seed)
    return ClipEncoders("student", clip, preprocess, tokenizer, device, batch_size).encode_texts(captions)
