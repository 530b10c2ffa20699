"""Fake encoders and a tiny synthetic set shared by the tests/test_eval_*.py files (no tests here).

- ``SceneOracle``: knows each image's scene (looked up by pixel bytes) and parses captions, so its
  image and caption embeddings coincide exactly for a true caption and differ for any negative, and a
  zero-shot prompt (``a <size> <colour> <shape>``) matches the combos present (best with the right
  size): every metric should be at its maximum.
- ``HashRandom``: a fixed random unit vector per image / text (seeded by content): chance level.
- ``Constant``: the same vector for everything: ties everywhere, so pessimistic metrics are 0.
"""
import hashlib
import re

import numpy as np
import torch
import torch.nn.functional as F

from kclip.synthetic import COLORS, RELATIONS, SHAPES, SIZES

_INV = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above"}
_OBJ = r"(small|large) (\w+) (\w+)"
_CAPTION = re.compile(rf"^a {_OBJ} (to the left of|to the right of|above|below) a {_OBJ}$")
_PROMPT = re.compile(rf"^a {_OBJ}$")  # the zero-shot prompt: one object in the caption grammar
COMBOS = [(c, s) for c in COLORS for s in SHAPES]


def small_synthetic(root, n_train=60, n_val=40, seed=0):
    from kclip.synthetic import generate

    generate(root, n_train_images=n_train, n_val_images=n_val, image_size=16, seed=seed, progress=False)
    return root


def _pixels_key(im) -> bytes:
    return hashlib.md5(np.asarray(im.convert("RGB")).tobytes()).digest()


class SceneOracle:
    """A perfect encoder for the synthetic set: embedding = (combos, (combo, size), (combo, relation, combo))."""

    def __init__(self, split, name="oracle"):
        from PIL import Image

        self.name = name
        self.scenes = {}
        for path, sc in zip(split.image_paths, split.scenes):
            with Image.open(path) as im:
                self.scenes[_pixels_key(im)] = sc
        self.n_combo = len(COMBOS)
        self.dim = self.n_combo + self.n_combo * len(SIZES) + self.n_combo * len(RELATIONS) * self.n_combo

    def _vec(self, objs, relation=None, with_size=True):
        v = torch.zeros(self.dim)
        idx = [COMBOS.index((c, s)) for _, c, s in objs]
        for i in idx:
            v[i] = 1.0
        if with_size:
            for (size, c, s), i in zip(objs, idx):
                v[self.n_combo + i * len(SIZES) + list(SIZES).index(size)] = 1.0
        if relation is not None:
            base = self.n_combo + self.n_combo * len(SIZES)
            a, b = idx
            for x, rel, y in ((a, relation, b), (b, _INV[relation], a)):
                v[base + (x * len(RELATIONS) + RELATIONS.index(rel)) * self.n_combo + y] = 1.0
        return v

    def encode_images(self, images):
        out = []
        for im in images:
            sc = self.scenes[_pixels_key(im)]
            objs = [(sc["size_a"], sc["color_a"], sc["shape_a"]), (sc["size_b"], sc["color_b"], sc["shape_b"])]
            out.append(self._vec(objs, sc["relation"]))
        return F.normalize(torch.stack(out), dim=-1)

    def encode_texts(self, texts):
        out = []
        for t in texts:
            m, p = _CAPTION.match(t), _PROMPT.match(t)
            if m:
                out.append(self._vec([m.group(1, 2, 3), m.group(5, 6, 7)], m.group(4)))
            elif p:
                out.append(self._vec([p.group(1, 2, 3)]))
            else:
                raise AssertionError(f"oracle cannot parse {t!r}")
        return F.normalize(torch.stack(out), dim=-1)


class HashRandom:
    """A fixed random unit vector per distinct image / text."""

    def __init__(self, name="random", dim=32, salt=0):
        self.name, self.dim, self.salt = name, dim, salt

    def _vec(self, key: bytes):
        seed = int.from_bytes(hashlib.md5(key + bytes([self.salt])).digest()[:4], "little")
        return F.normalize(torch.randn(self.dim, generator=torch.Generator().manual_seed(seed)), dim=0)

    def encode_images(self, images):
        return torch.stack([self._vec(_pixels_key(im)) for im in images])

    def encode_texts(self, texts):
        return torch.stack([self._vec(t.encode()) for t in texts])


class Constant:
    def __init__(self, name="constant", dim=8):
        self.name, self.dim = name, dim

    def encode_images(self, images):
        return F.normalize(torch.ones(len(images), self.dim), dim=-1)

    def encode_texts(self, texts):
        return F.normalize(torch.ones(len(texts), self.dim), dim=-1)
