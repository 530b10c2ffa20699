"""The teacher targets as the method sees them: cached teacher embeddings, L2-normalised, standardised
per dimension, or raw (``loss.target_norm``).

One view serves every consumer, so k-means, the concept classifier C and L_emb all live in the same space:
C classifies W_e's outputs, and W_e is trained to hit these targets. Rows are produced on demand from the
memory-mapped cache; nothing of size N x d' is held unless ``np.asarray`` is asked for.
"""
from __future__ import annotations

import numpy as np


SHUFFLE_STREAM = 0x5EED_7EAC  # keeps the shuffle's random stream apart from every other use of the run seed


def shuffle_permutation(n: int, seed: int) -> np.ndarray:
    """The fixed permutation of ``loss.shuffle_teacher``: (n,) int64, a function of (n, seed) only."""
    return np.random.default_rng([SHUFFLE_STREAM, int(seed)]).permutation(n)


class TeacherTargets:
    """An (N, d') float32 array-like over an EmbeddingCache with the target normalisation applied.

    Supports ``len``, ``shape``, ``dtype``, ``x[a:b]``, ``x[index_array]``, ``get(indices)`` and ``np.asarray``.

    Args:
        rows: optional (N,) permutation: row i of this view is cache row ``rows[i]`` (``loss.shuffle_teacher``,
            the shuffled-teacher control; every consumer of the view sees the same permuted rows).
    """

    def __init__(self, cache, mode: str = "l2", chunk: int = 65536, rows: np.ndarray | None = None):
        if mode not in ("l2", "standardize", "none"):
            raise ValueError(f"loss.target_norm is {mode!r}; it must be 'l2', 'standardize' or 'none'")
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64)
            if rows.shape != (len(cache),) or not np.array_equal(np.sort(rows), np.arange(len(cache))):
                raise ValueError(f"rows must be a permutation of the cache's {len(cache)} rows")
        self.cache = cache
        self.mode = mode
        self.rows = rows
        self.mean = self.std = None
        if mode == "standardize":
            self.mean, self.std = self._moments(chunk)

    def _moments(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-dimension mean and std over the whole cache, streamed in float64."""
        n = len(self.cache)
        s = np.zeros(self.cache.dim)
        s2 = np.zeros(self.cache.dim)
        for i in range(0, n, chunk):
            x = self.cache.get(np.arange(i, min(n, i + chunk)), dtype=np.float32).astype(np.float64)   # (c, d')
            s += x.sum(0)
            s2 += (x * x).sum(0)
        mean = s / n
        std = np.sqrt(np.maximum(s2 / n - mean * mean, 1e-12))
        return mean.astype(np.float32), std.astype(np.float32)

    def _apply(self, x: np.ndarray) -> np.ndarray:                                   # (k, d') float32
        if self.mode == "l2":
            return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        if self.mode == "standardize":
            return (x - self.mean) / self.std
        return x

    def _cache_rows(self, indices) -> np.ndarray:
        rows = np.asarray(indices).reshape(-1)
        return rows if self.rows is None else self.rows[rows]

    def get(self, indices) -> np.ndarray:
        """(k, d') float32 rows, normalised."""
        return self._apply(self.cache.get(self._cache_rows(indices), dtype=np.float32))

    def batch(self, indices) -> np.ndarray:
        """(k, d') float16 rows for the trainer: one gather from the cache, normalised in float32 (the one place
        targets are normalised), then float16, the cache's own precision, which the fused L_emb kernel reads
        directly (no cast pass on the device)."""
        rows = self._cache_rows(indices)
        if self.mode == "none":  # the cache's own fp16 rows, no round trip
            return self.cache.get(rows, dtype=np.float16)
        return self._apply(self.cache.get(rows, dtype=np.float32)).astype(np.float16)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            return self.get(np.arange(len(self))[key])
        return self.get(np.asarray(key).reshape(-1))

    def __len__(self) -> int:
        return len(self.cache)

    @property
    def dim(self) -> int:
        return self.cache.dim

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.cache), self.cache.dim)

    @property
    def dtype(self):
        return np.dtype(np.float32)

    def __array__(self, dtype=None, copy=None):
        out = self.get(np.arange(len(self)))
        return out if dtype is None else out.astype(dtype)
