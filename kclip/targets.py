"""The teacher targets as the method sees them: cached teacher embeddings, L2-normalised, standardised
per dimension, PCA-whitened, or raw (``loss.target_norm``).

``whiten`` (k = 64) / ``whiten-<k>``: the targets projected on the top k principal components of the TRAINING
captions' cache and scaled to unit variance along each, (x - mu) U_k diag(lambda_k)^-1/2, so their covariance
over the training captions is the k x k identity and d' becomes k. The fit (mu, U_k, lambda_k) is always the
training split's: a view of the validation cache (a folder named ``val`` beside a finished ``train`` one, the
pipeline's layout) fits on that sibling, so validation targets are the same map applied unchanged. Components
with eigenvalue below 1e-8 of the largest are dropped (k is then smaller: rank-deficient teachers such as the
one-hot oracle). Whitened targets have a squared norm of ~k per caption, so ``loss.alpha`` should be scaled by
1/k to keep L_emb's size (the comparison's whitened variants do).

One view serves every consumer, so k-means, the concept classifier C and L_emb all live in the same space:
C classifies W_e's outputs, and W_e is trained to hit these targets. Rows are produced on demand from the
memory-mapped cache; nothing of size N x d' is held unless ``np.asarray`` is asked for.
"""
from __future__ import annotations

import numpy as np

from kclip.config import LossConfig, check_choice, choices


SHUFFLE_STREAM = 0x5EED_7EAC  # keeps the shuffle's random stream apart from every other use of the run seed


def shuffle_permutation(n: int, seed: int) -> np.ndarray:
    """The fixed permutation of ``loss.shuffle_teacher``: (n,) int64, a function of (n, seed) only."""
    return np.random.default_rng([SHUFFLE_STREAM, int(seed)]).permutation(n)


WHITEN_K = 64  # components of ``loss.target_norm: whiten`` (the tiny student's embedding width)


def whiten_k(mode: str) -> int | None:
    """k of a whitening ``loss.target_norm`` ("whiten": WHITEN_K, "whiten-<k>": k >= 1); None for other modes."""
    if mode == "whiten":
        return WHITEN_K
    if isinstance(mode, str) and mode.startswith("whiten-") and mode[7:].isdigit() and int(mode[7:]) >= 1:
        return int(mode[7:])
    return None


def _train_sibling(cache):
    """The training split's cache for a view of the validation split's (``<cache_dir>/val`` beside a finished
    ``<cache_dir>/train``); the cache itself otherwise."""
    from pathlib import Path

    out_dir = getattr(cache, "out_dir", None)
    train = Path(out_dir).parent / "train" if out_dir is not None else None
    if train is not None and Path(out_dir).name == "val" and (train / "manifest.json").is_file():
        from kclip.embedding_cache import open_cache
        return open_cache(train)
    return cache


def whitening_fit(cache, k: int, chunk: int = 65536,
                  rel_eps: float = 1e-8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA whitening fitted on every row of ``cache`` (streamed, float64).

    Returns:
        mean (d',) float32, whitener (d', k') float32 with k' = min(k, d', rank), eigenvalues (k',) float64
        (descending); (x - mean) @ whitener has identity covariance (ddof = 0) over the cache's rows. Each
        eigenvector's sign is fixed (its largest-magnitude entry positive), so the fit is deterministic.
    """
    n, d = len(cache), cache.dim
    s, s2 = np.zeros(d), np.zeros((d, d))
    for i in range(0, n, chunk):
        x = cache.get(np.arange(i, min(n, i + chunk)), dtype=np.float32).astype(np.float64)       # (c, d')
        s += x.sum(0)
        s2 += x.T @ x
    mean = s / n
    cov = s2 / n - np.outer(mean, mean)                                                        # (d', d')
    vals, vecs = np.linalg.eigh((cov + cov.T) / 2)
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    keep = int(min(k, d, np.sum(vals > rel_eps * max(vals[0], 1e-300))))
    if keep < 1:
        raise ValueError(f"loss.target_norm whiten: the teacher cache {getattr(cache, 'out_dir', '')} has no variance")
    vals, vecs = vals[:keep], vecs[:, :keep]
    flip = np.sign(vecs[np.abs(vecs).argmax(0), np.arange(keep)])
    vecs = vecs * np.where(flip == 0, 1.0, flip)
    return mean.astype(np.float32), (vecs / np.sqrt(vals)).astype(np.float32), vals


class TeacherTargets:
    """An (N, d') float32 array-like over an EmbeddingCache with the target normalisation applied.

    Supports ``len``, ``shape``, ``dtype``, ``x[a:b]``, ``x[index_array]``, ``get(indices)`` and ``np.asarray``.

    Args:
        rows: optional (N,) permutation: row i of this view is cache row ``rows[i]`` (``loss.shuffle_teacher``,
            the shuffled-teacher control; every consumer of the view sees the same permuted rows).
        fit: for "whiten": the cache to fit the whitening on (default: the training split's, see the module).
    """

    def __init__(self, cache, mode: str = "l2", chunk: int = 65536, rows: np.ndarray | None = None, fit=None):
        if mode not in ("l2", "standardize", "none") and whiten_k(mode) is None:  # direct callers; configs are checked
            check_choice("loss.target_norm", mode, choices(LossConfig, "target_norm"))
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64)
            if rows.shape != (len(cache),) or not np.array_equal(np.sort(rows), np.arange(len(cache))):
                raise ValueError(f"rows must be a permutation of the cache's {len(cache)} rows")
        self.cache = cache
        self.mode = mode
        self.rows = rows
        self.mean = self.std = None
        self.whitener = self.eigenvalues = None    # (d', k) float32 U_k diag(lambda_k)^-1/2, (k,) ("whiten")
        self.fit_source = None
        if mode == "standardize":
            self.mean, self.std = self._moments(chunk)
        elif whiten_k(mode) is not None:
            source = fit if fit is not None else _train_sibling(cache)
            self.fit_source = str(getattr(source, "out_dir", "")) or None
            self.mean, self.whitener, self.eigenvalues = whitening_fit(source, whiten_k(mode), chunk)

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
        if self.whitener is not None:
            return (x - self.mean) @ self.whitener
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
        return self.cache.dim if self.whitener is None else int(self.whitener.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.cache), self.dim)

    @property
    def dtype(self):
        return np.dtype(np.float32)

    def __array__(self, dtype=None, copy=None):
        out = self.get(np.arange(len(self)))
        return out if dtype is None else out.astype(dtype)
