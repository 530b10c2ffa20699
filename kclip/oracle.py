"""An oracle teacher for the built-in synthetic set: each caption's true attributes as a vector.

A positive control for the Knowledge-CLIP wiring (``teacher.name: synthetic-oracle``): if distilling this
teacher does not help the student, no LLM teacher can be expected to. The oracle parses a caption with the
synthetic grammar (:meth:`kclip.synthetic.Scene.phrasings`) and returns the concatenation of one-hot blocks

    [size | colour | shape] of the left/upper object, [axis: horizontal | vertical], [size | colour | shape]
    of the right/lower object                                       (2 + 5 + 4) + 2 + (2 + 5 + 4) = 24 dims

The scene is put in a canonical form first: "A to the right of B" is "B to the left of A", "A below B" is
"B above A" (the same picture), so every phrasing of one scene, the inverse-relation one included, gives the
same vector, and scenes differing in one attribute (a size, a colour, a shape, the relation) give different
ones. Tokenising *is* parsing here: a caption's "tokens" are the indices of its seven one-hot entries.

It has the interface the cache builder needs (``describe``, ``tokenize``, ``encode_tokenized``, ``dim``), so
its rows are cached like any teacher's. The pipeline selects it by name (``kclip.pipeline.stages._load_teacher``);
the config's precision/pooling/max_length are recorded in its identity (so the cache's checks apply as for
any teacher) but change nothing. A caption outside the grammar is an error that names it.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch

from kclip.synthetic import COLORS, SHAPES, SIZES, parse_caption
from kclip.teacher_weights import loader_options

ORACLE_TEACHER = "synthetic-oracle"
ORACLE_VERSION = 1
_CANONICAL = {"to the left of": ("to the left of", False), "to the right of": ("to the left of", True),
              "above": ("above", False), "below": ("above", True)}  # relation -> (canonical relation, swap objects)
_AXES = ("to the left of", "above")
_OBJECT_BLOCK = (tuple(SIZES), tuple(COLORS), tuple(SHAPES))
_OBJECT_DIM = sum(len(v) for v in _OBJECT_BLOCK)
ORACLE_DIM = 2 * _OBJECT_DIM + len(_AXES)

def is_oracle(name: str) -> bool:
    """Whether ``teacher.name`` names the oracle."""
    return str(name).strip().lower() == ORACLE_TEACHER


def canonical_scene(caption: str) -> tuple[tuple[str, str, str], str, tuple[str, str, str]]:
    """The caption's scene as (left/upper object, "to the left of" | "above", right/lower object)."""
    s = parse_caption(caption)
    x, rel, y = (s.size_a, s.color_a, s.shape_a), s.relation, (s.size_b, s.color_b, s.shape_b)
    canon, swap = _CANONICAL[rel]
    return (y, canon, x) if swap else (x, canon, y)


def scene_slots(caption: str) -> list[int]:
    """The indices of the caption's seven one-hot entries in the oracle vector (its "tokens")."""
    first, rel, second = canonical_scene(caption)
    out = []
    for base, obj in ((0, first), (_OBJECT_DIM + len(_AXES), second)):
        offset = base
        for value, vocab in zip(obj, _OBJECT_BLOCK):
            out.append(offset + vocab.index(value))
            offset += len(vocab)
    out.insert(3, _OBJECT_DIM + _AXES.index(rel))
    return out


class OracleTeacher:
    """The oracle with the teacher interface the cache builder uses.

    Args:
        precision, pooling, max_length: the config's values, recorded in :meth:`describe` (the cache identity
            kclip checks for every teacher); they do not change the output.
    """

    def __init__(self, precision: str = "int8", pooling: str = "mean", max_length: int = 64):
        self.name = ORACLE_TEACHER
        self.revision = f"v{ORACLE_VERSION}"
        self.precision, self.pooling, self.max_length = precision, pooling, max_length
        self.dim = ORACLE_DIM
        layout = repr((ORACLE_VERSION, _OBJECT_BLOCK, _AXES)).encode()
        self.fingerprint = hashlib.sha256(layout).hexdigest()

    @property
    def id(self) -> str:
        return f"{self.name}@{self.revision}"

    def describe(self) -> dict:
        """What a cache manifest records about the teacher (the same keys as ``kclip.teacher.Teacher``)."""
        return {"teacher": self.id, "name": self.name, "revision": self.revision, "fingerprint": self.fingerprint,
                "model_type": "synthetic-oracle", "precision": self.precision, "quant_backend": None,
                "quantized_linears": {}, "pooling": self.pooling, "max_length": self.max_length, "prompt": None,
                "dim": self.dim, "pad_token_id": None, "padding_side": None, "token_budget": None,
                "layout": "one-hot [size, colour, shape] of the left/upper object, [horizontal, vertical], "
                          "[size, colour, shape] of the right/lower object"}

    def tokenize(self, captions: Sequence[str], offset: int = 0) -> list[list[int]]:
        """Each caption's seven one-hot indices (see :func:`scene_slots`).

        Raises:
            ValueError: a caption outside the synthetic grammar (its index, plus ``offset``, is named).
        """
        out = []
        for i, caption in enumerate(captions):
            try:
                out.append(scene_slots(caption))
            except ValueError as exc:
                raise ValueError(f"caption {i + offset}: {exc}; teacher.name {ORACLE_TEACHER!r} works only on the "
                                 "built-in synthetic set (data.source: synthetic)") from None
        return out

    def encode_tokenized(self, token_ids: Sequence[Sequence[int]], token_budget: int | None = None) -> torch.Tensor:
        """(n, 24) float32 CPU tensor: ones at each caption's indices."""
        out = np.zeros((len(token_ids), self.dim), dtype=np.float32)                 # (n, d')
        for row, slots in enumerate(token_ids):
            out[row, list(slots)] = 1.0
        return torch.from_numpy(out)

    def encode(self, captions: Sequence[str], token_budget: int | None = None) -> torch.Tensor:
        """(n, 24) float32: the oracle vectors of the captions."""
        return self.encode_tokenized(self.tokenize(captions))


def load_oracle(name: str = ORACLE_TEACHER, precision: str = "int8", pooling: str = "mean", max_length: int = 64,
                prompt: str | None = None, device=None, revision: str | None = None, trust_remote_code: bool = False,
                token_budget: int = 8192) -> OracleTeacher:
    """The oracle, with ``kclip.teacher.load_teacher``'s signature (the pipeline calls either one).

    Raises:
        ValueError: ``name`` is not the oracle, or a prompt is set (the oracle reads the bare caption).
    """
    if not is_oracle(name):
        raise ValueError(f"load_oracle: {name!r} is not {ORACLE_TEACHER!r}")
    if prompt:
        raise ValueError(f"teacher.prompt is {prompt!r}, but {ORACLE_TEACHER!r} parses the bare caption: set "
                         "teacher.prompt to ''")
    return OracleTeacher(precision=precision, pooling=pooling, max_length=max_length)


def load_oracle_from_config(section, device=None) -> OracleTeacher:
    """:func:`load_oracle` for a ``teacher`` config section, as ``kclip.teacher.load_teacher_from_config``."""
    return load_oracle(section.name, device=device, **loader_options(section))


__all__ = ["ORACLE_TEACHER", "ORACLE_DIM", "OracleTeacher", "canonical_scene", "is_oracle", "load_oracle",
           "load_oracle_from_config", "scene_slots"]
