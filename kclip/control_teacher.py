"""A knowledge-free, caption-specific control teacher: hashed word n-gram counts through a fixed random projection.

``teacher.name: hashed-ngrams``. Each caption is lower-cased and split into words (``[a-z0-9]+``); its unigrams
and bigrams are hashed (BLAKE2b of the n-gram text, a fixed function: the same on every machine and run) into
``BUCKETS`` buckets, giving a count vector c (BUCKETS,), and the teacher's embedding is c @ P with P a fixed
(BUCKETS, DIM) Gaussian matrix (entries N(0, 1/DIM), seeded by ``PROJECTION_SEED``).

What it carries: exactly which words, and which adjacent word pairs, a caption has (different captions give
different vectors up to hash collisions; the same caption always gives the same one). What it does not: any
knowledge beyond the words: no meaning of a word, no similarity between "red" and "crimson", no canonical
form of a scene (unlike the oracle, :mod:`kclip.oracle`, "A left of B" and "B right of A" share only their
unigrams). So if distilling it gives the same gain as an LM teacher, that gain is caption information, not
world knowledge (the review's "knowledge vs caption-specific information" control).

It has the interface the cache builder needs (``describe``, ``tokenize``, ``encode_tokenized``, ``dim``) and
the pipeline selects it by name (``kclip.pipeline.stages._load_teacher``), as it does the oracle. Its identity
(``describe``: version, buckets, dimension, projection seed, hash) is what the embedding cache records;
precision/pooling/max_length from the config are recorded but change nothing; a prompt is refused.
"""
from __future__ import annotations

import hashlib
import re
from typing import Sequence

import numpy as np
import torch

from kclip.teacher_weights import loader_options

CONTROL_TEACHER = "hashed-ngrams"
CONTROL_VERSION = 1
BUCKETS = 4096          # hash buckets of the count vector
DIM = 384               # the projection's width (MiniLM's d', so the loss sizes are comparable)
PROJECTION_SEED = 20260
NGRAMS = (1, 2)
_WORD = re.compile(r"[a-z0-9]+")


def is_control(name: str) -> bool:
    """Whether ``teacher.name`` names the hashed n-gram control teacher."""
    return str(name).strip().lower() == CONTROL_TEACHER


def words(caption: str) -> list[str]:
    return _WORD.findall(caption.lower())


def ngrams(caption: str) -> list[str]:
    """The caption's unigrams then bigrams (bigrams joined by a space)."""
    w = words(caption)
    return [*w, *(f"{a} {b}" for a, b in zip(w, w[1:]))]


def bucket(gram: str, buckets: int = BUCKETS) -> int:
    """The fixed hash bucket of an n-gram (BLAKE2b, 8 bytes, mod ``buckets``)."""
    return int.from_bytes(hashlib.blake2b(gram.encode(), digest_size=8).digest(), "little") % buckets


def projection(buckets: int = BUCKETS, dim: int = DIM, seed: int = PROJECTION_SEED) -> np.ndarray:
    """(buckets, dim) float32 Gaussian matrix, N(0, 1/dim) entries, a function of its arguments only."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((buckets, dim)) / np.sqrt(dim)).astype(np.float32)


class HashedNgramTeacher:
    """The control teacher with the teacher interface the cache builder uses."""

    def __init__(self, precision: str = "int8", pooling: str = "mean", max_length: int = 64):
        self.name = CONTROL_TEACHER
        self.revision = f"v{CONTROL_VERSION}"
        self.precision, self.pooling, self.max_length = precision, pooling, max_length
        self.dim = DIM
        self.buckets = BUCKETS
        self.projection = projection()                                                  # (BUCKETS, DIM)
        self._projection64 = self.projection.astype(np.float64)
        layout = repr((CONTROL_VERSION, BUCKETS, DIM, PROJECTION_SEED, NGRAMS, "blake2b-8", _WORD.pattern))
        self.fingerprint = hashlib.sha256(layout.encode()).hexdigest()

    @property
    def id(self) -> str:
        return f"{self.name}@{self.revision}"

    def describe(self) -> dict:
        """What a cache manifest records about the teacher (the same keys as ``kclip.teacher.Teacher``)."""
        return {"teacher": self.id, "name": self.name, "revision": self.revision, "fingerprint": self.fingerprint,
                "model_type": "hashed-ngrams", "precision": self.precision, "quant_backend": None,
                "quantized_linears": {}, "pooling": self.pooling, "max_length": self.max_length, "prompt": None,
                "dim": self.dim, "pad_token_id": None, "padding_side": None, "token_budget": None,
                "layout": f"word unigram+bigram counts hashed (blake2b) into {BUCKETS} buckets, times a fixed "
                          f"Gaussian ({BUCKETS}, {DIM}) projection seeded {PROJECTION_SEED}"}

    def tokenize(self, captions: Sequence[str], offset: int = 0) -> list[list[int]]:
        """Each caption's n-gram buckets (with repeats: they are counts)."""
        return [[bucket(g) for g in ngrams(c)] for c in captions]

    def counts(self, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """(n, BUCKETS) float32 n-gram counts."""
        out = np.zeros((len(token_ids), self.buckets), dtype=np.float32)
        for row, ids in enumerate(token_ids):
            np.add.at(out[row], np.asarray(ids, dtype=np.int64), 1.0)
        return out

    def encode_tokenized(self, token_ids: Sequence[Sequence[int]], token_budget: int | None = None) -> torch.Tensor:
        """(n, DIM) float32 CPU tensor: counts @ projection, row by row over the caption's sorted buckets in
        float64 (a caption's vector does not depend on the batch it is encoded in, to the bit)."""
        out = np.zeros((len(token_ids), self.dim), dtype=np.float32)
        proj = self._projection64
        for row, ids in enumerate(token_ids):
            if len(ids):
                buckets, counts = np.unique(np.asarray(ids, dtype=np.int64), return_counts=True)
                out[row] = (counts[:, None] * proj[buckets]).sum(0)
        return torch.from_numpy(out)

    def encode(self, captions: Sequence[str], token_budget: int | None = None) -> torch.Tensor:
        return self.encode_tokenized(self.tokenize(captions))


def load_control(name: str = CONTROL_TEACHER, precision: str = "int8", pooling: str = "mean", max_length: int = 64,
                 prompt: str | None = None, device=None, revision: str | None = None, trust_remote_code: bool = False,
                 token_budget: int = 8192) -> HashedNgramTeacher:
    """The control teacher, with ``kclip.teacher.load_teacher``'s signature (the pipeline calls either one).

    Raises:
        ValueError: ``name`` is not the control teacher, or a prompt is set (it reads the bare caption).
    """
    if not is_control(name):
        raise ValueError(f"load_control: {name!r} is not {CONTROL_TEACHER!r}")
    if prompt:
        raise ValueError(f"teacher.prompt is {prompt!r}, but {CONTROL_TEACHER!r} hashes the bare caption's words: "
                         "set teacher.prompt to ''")
    return HashedNgramTeacher(precision=precision, pooling=pooling, max_length=max_length)


def load_control_from_config(section, device=None) -> HashedNgramTeacher:
    """:func:`load_control` for a ``teacher`` config section, as ``kclip.teacher.load_teacher_from_config``."""
    return load_control(section.name, device=device, **loader_options(section))


__all__ = ["CONTROL_TEACHER", "BUCKETS", "DIM", "HashedNgramTeacher", "bucket", "is_control", "load_control",
           "load_control_from_config", "ngrams", "projection", "words"]
