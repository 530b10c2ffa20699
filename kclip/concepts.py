"""Concept learning: k-means over the teacher's caption embeddings, then the frozen concept classifier C.

Knowledge-CLIP gives every caption-image pair a concept label s = k-means cluster of the teacher's
caption embedding, trains a linear classifier ``C: R^d' -> R^K`` on (teacher embedding, s), freezes it,
and later asks ``C(W_e(E_I(image)))`` to predict s. This module holds the three stages:

- :func:`fit_kmeans`: k-means with four backends. ``cuml`` (RAPIDS, GPU), ``triton`` (our Lloyd loop on
  :func:`kclip.kernels.kmeans_assign`; GPU, or the Triton interpreter on CPU in tests), ``sklearn``
  (CPU), and ``auto`` = cuML when importable and a GPU is present, else Triton on a GPU, else sklearn.
  The input may be a torch tensor, a numpy array or a numpy memmap (the embedding cache is a
  memory-mapped fp16 array): the Triton backend streams it to the GPU in row chunks when it does not
  fit, and iterates chunks on CPU.
- :func:`train_concept_classifier`: the linear classifier, hard labels (cross-entropy, as in the paper)
  or soft labels ``softmax(-||x - c_k||^2 / T)``; returned frozen.
- :func:`run_concepts`: both, plus ``concepts.safetensors``, ``concepts_report.json`` and two plots,
  written atomically; :func:`load_concepts` reads the tensors back.

Determinism (Triton backend): the init draws come from a CPU ``torch.Generator`` seeded with ``seed``;
the assignment kernel is deterministic; the centroid update sums each chunk with ``index_add_`` and
adds the per-chunk partial sums in chunk order. On CPU ``index_add_`` is sequential, hence bitwise
reproducible. On CUDA ``index_add_`` uses atomics, so the last bits of a centroid may differ between
runs (labels then differ only for points on a near-tie); under ``torch.use_deterministic_algorithms(True)``
PyTorch switches to its deterministic implementation.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

__all__ = ["KMeansResult", "fit_kmeans", "train_concept_classifier", "run_concepts", "load_concepts",
           "cluster_size_stats"]

CONCEPTS_FILE = "concepts.safetensors"
REPORT_FILE = "concepts_report.json"
SIZES_PLOT = "cluster_sizes.png"
PROJECTION_PLOT = "concepts_2d.png"

# k-means++ on more than this many points is run on a seeded uniform subsample (see _kmeanspp_init).
KMEANSPP_MAX_POINTS = 65536
# The Triton backend copies the whole array to the GPU when it takes at most this share of free memory,
# and streams row chunks from the host every iteration otherwise.
GPU_RESIDENT_FRACTION = 0.5


@dataclass
class KMeansResult:
    """Output of :func:`fit_kmeans`.

    Shapes:
        labels int64 (N,) on CPU, centroids float32 (K, D) on CPU.
    """

    labels: torch.Tensor
    centroids: torch.Tensor
    inertia: float
    n_iter: int
    backend: str


# --------------------------------------------------------------------------------------------------
# Data access: tensors, numpy arrays and memmaps, read in row chunks
# --------------------------------------------------------------------------------------------------

def _shape(x) -> tuple[int, int]:
    shape = tuple(x.shape)
    if len(shape) != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {shape}; reshape or pick the embedding array")
    return int(shape[0]), int(shape[1])


def _rows(x, start: int, stop: int, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """Rows [start, stop) of a tensor / ndarray / memmap as a tensor on ``device``."""
    if isinstance(x, torch.Tensor):
        t = x[start:stop]
    else:
        t = torch.from_numpy(np.require(x[start:stop], requirements=["C", "W"]))  # copies read-only memmaps
    return t.to(device=device, dtype=dtype or t.dtype, non_blocking=True)


def _take(x, idx: np.ndarray, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """Rows ``idx`` (any order) of a tensor / ndarray / memmap as a tensor on ``device``."""
    if isinstance(x, torch.Tensor):
        t = x[torch.as_tensor(idx, device=x.device)]
    else:
        t = torch.from_numpy(np.require(x[np.asarray(idx)], requirements=["C", "W"]))
    return t.to(device=device, dtype=dtype or t.dtype)


def _source_dtype(x) -> torch.dtype:
    if isinstance(x, torch.Tensor):
        return x.dtype
    return torch.from_numpy(np.zeros(0, dtype=np.asarray(x[:0]).dtype)).dtype


class _ChunkedSource:
    """Iterates an (N, D) source in row chunks on one device, holding it there when it fits."""

    def __init__(self, x, device: torch.device, chunk_size: int | None, compute_dtype: torch.dtype):
        self.n, self.d = _shape(x)
        self.device = device
        self.dtype = compute_dtype
        bytes_per_row = self.d * torch.empty(0, dtype=compute_dtype).element_size()
        self.resident: torch.Tensor | None = None
        if isinstance(x, torch.Tensor) and x.device == device and x.dtype == compute_dtype:
            self.resident = x  # already where it is needed: no copy
        elif device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if self.n * bytes_per_row <= GPU_RESIDENT_FRACTION * free:  # leave room for the update buffers
                self.resident = torch.empty((self.n, self.d), dtype=compute_dtype, device=device)  # (N, D)
                step = max(1, (256 << 20) // max(1, bytes_per_row))
                for s in range(0, self.n, step):
                    self.resident[s:s + step] = _rows(x, s, min(self.n, s + step), device, compute_dtype)
        elif device.type == "cpu" and isinstance(x, torch.Tensor):
            self.resident = x  # chunks are views, converted per chunk
        self.source = x
        # Chunk: bounds the fp32 copy made for the centroid update (and the upload when streaming).
        default = max(1, (256 << 20) // max(1, self.d * 4))
        self.chunk_size = int(chunk_size) if chunk_size else default

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        for s in range(0, self.n, self.chunk_size):
            e = min(self.n, s + self.chunk_size)
            if self.resident is not None:
                yield s, self.resident[s:e].to(self.dtype)
            else:
                yield s, _rows(self.source, s, e, self.device, self.dtype)

    def take(self, idx: np.ndarray) -> torch.Tensor:
        src = self.resident if self.resident is not None else self.source
        return _take(src, idx, self.device, self.dtype)


def _check_finite(x, chunk_rows: int = 1 << 16) -> None:
    n, _ = _shape(x)
    for s in range(0, n, chunk_rows):
        if isinstance(x, torch.Tensor):
            bad = (~torch.isfinite(x[s:s + chunk_rows]).all(dim=1)).cpu().numpy()
        else:
            bad = ~np.isfinite(np.asarray(x[s:s + chunk_rows])).all(axis=1)
        if bool(bad.any()):
            row = s + int(np.flatnonzero(bad)[0])
            count = int(bad.sum())
            raise ValueError(f"embeddings contain NaN or inf (first bad row {row}, {count} bad rows in rows "
                             f"{s}..{min(n, s + chunk_rows) - 1}); recompute or drop those rows before clustering "
                             "(an fp16 cache overflows above 65504: store the teacher embeddings in fp32/bf16)")


def _check_k(k: int, n: int) -> None:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > n:
        raise ValueError(f"k={k} clusters exceeds the number of embeddings N={n}; lower k to at most {n} "
                         "or cluster more captions")


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# The Triton backend: our own Lloyd loop
# --------------------------------------------------------------------------------------------------

def _kmeanspp_init(src: _ChunkedSource, k: int, gen: torch.Generator) -> torch.Tensor:
    """Seeded greedy k-means++ on at most KMEANSPP_MAX_POINTS rows.

    Greedy k-means++ (as scikit-learn): at each step draw ``2 + ln(k)`` candidates with probability
    proportional to D^2 (squared distance to the nearest chosen centre) and keep the one that lowers
    the total D^2 most. For large N the seeding runs on a uniform subsample drawn with the same
    generator: the init only needs a good spread of starting points, and Lloyd then runs on all N.
    All random draws come from the CPU generator, so the init is the same on every device for a seed.
    """
    n = src.n
    if n > KMEANSPP_MAX_POINTS:
        idx = torch.randperm(n, generator=gen)[:KMEANSPP_MAX_POINTS].sort().values.numpy()
        pts = src.take(idx).float()  # (M, D)
    else:
        pts = torch.cat([c.float() for _, c in src.chunks()])  # (M, D) = (N, D)
    m = pts.shape[0]
    trials = 2 + int(math.log(k))
    pts_sq = pts.pow(2).sum(1)  # (M,)

    def sqdist_to(rows: torch.Tensor) -> torch.Tensor:  # (M, L) squared distances to pts[rows]
        c = pts[rows]  # (L, D)
        return (pts_sq[:, None] - 2.0 * (pts @ c.T) + pts_sq[rows][None, :]).clamp_min(0)

    chosen = [int(torch.randint(m, (1,), generator=gen))]
    closest = sqdist_to(torch.tensor(chosen, device=pts.device))[:, 0].double()  # (M,)
    for _ in range(1, k):
        weights = closest.cpu()
        total = float(weights.sum())
        if not total > 0:  # every point coincides with a chosen centre: pick uniformly
            cand = torch.randint(m, (trials,), generator=gen)
        else:
            u = torch.rand(trials, generator=gen, dtype=torch.float64) * total
            cand = torch.searchsorted(weights.cumsum(0), u).clamp_max(m - 1)
        cand_d = torch.minimum(closest[:, None], sqdist_to(cand.to(pts.device)).double())  # (M, L)
        best = int(torch.argmin(cand_d.sum(0)))  # lowest index on ties
        chosen.append(int(cand[best]))
        closest = cand_d[:, best]
    return pts[torch.tensor(chosen, device=pts.device)].clone()  # (K, D)


def _random_init(src: _ChunkedSource, k: int, gen: torch.Generator) -> torch.Tensor:
    idx = torch.randperm(src.n, generator=gen)[:k].sort().values.numpy()
    return src.take(idx).float()


def _initial_centroids(init, src: _ChunkedSource, k: int, gen: torch.Generator) -> torch.Tensor:
    if isinstance(init, str):
        if init == "k-means++":
            return _kmeanspp_init(src, k, gen)
        if init == "random":
            return _random_init(src, k, gen)
        raise ValueError(f"init must be 'k-means++', 'random' or a (K, D) array, got {init!r}")
    c = torch.as_tensor(np.asarray(init) if not isinstance(init, torch.Tensor) else init)
    if tuple(c.shape) != (k, src.d):
        raise ValueError(f"init centroids have shape {tuple(c.shape)}, expected (k, D) = ({k}, {src.d})")
    if not bool(torch.isfinite(c).all()):
        raise ValueError("init centroids contain NaN or inf; pass finite centroids")
    return c.to(device=src.device, dtype=torch.float32).clone()


def _lloyd_triton(x, k: int, seed: int, max_iter: int, tol: float, init, chunk_size: int | None,
                  progress: bool) -> KMeansResult:
    from kclip.kernels import kmeans_assign

    device = _default_device()
    sdtype = _source_dtype(x)
    if device.type == "cuda":
        compute_dtype = sdtype if sdtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
    else:
        compute_dtype = torch.float32  # CPU (and the interpreter): fp32 everywhere
    src = _ChunkedSource(x, device, chunk_size, compute_dtype)
    gen = torch.Generator().manual_seed(int(seed))
    centroids = _initial_centroids(init, src, k, gen)  # (K, D) fp32
    n, d = src.n, src.d

    labels = torch.empty(n, dtype=torch.int64, device=device)  # (N,)
    sqdist = torch.empty(n, dtype=torch.float32, device=device)  # (N,)

    # Data held on the GPU is assigned in one launch (thousands of row blocks keep every SM busy);
    # streamed data, and CPU data, is assigned chunk by chunk. The update always goes by chunks, which
    # bounds the fp32 copy that index_add_ needs.
    assign_whole = device.type == "cuda" and src.resident is not None

    def assign_and_sum(c: torch.Tensor):
        sums = torch.zeros((k, d), dtype=torch.float32, device=device)  # (K, D)
        counts = torch.zeros(k, dtype=torch.int64, device=device)  # (K,)
        if assign_whole:
            labels[:], sqdist[:] = kmeans_assign(src.resident, c)
        for s, xb in src.chunks():
            if assign_whole:
                lab = labels[s:s + xb.shape[0]]
            else:
                lab, sq = kmeans_assign(xb, c)  # (B,), (B,)
                labels[s:s + xb.shape[0]] = lab
                sqdist[s:s + xb.shape[0]] = sq
            part = torch.zeros((k, d), dtype=torch.float32, device=device)  # (K, D) this chunk's sums
            part.index_add_(0, lab, xb.float())
            sums += part  # chunk partials added in chunk order
            counts += torch.bincount(lab, minlength=k)
        return sums, counts

    iterator = range(max_iter)
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(iterator, desc=f"k-means (triton, K={k})", leave=False)
    n_iter = 0
    converged_exactly = False
    for _ in iterator:
        sums, counts = assign_and_sum(centroids)
        n_iter += 1
        empty = (counts == 0).nonzero().flatten()  # (E,)
        if empty.numel():
            # Re-seed empty clusters with the points farthest from their centroid (largest sqdist,
            # lowest index first on ties), moving each point out of its old cluster as sklearn does.
            order = torch.sort(sqdist, descending=True, stable=True).indices[: empty.numel()]  # (E,)
            far_rows = src.take(order.cpu().numpy()).float()  # (E, D)
            old = labels[order]
            sums.index_add_(0, old, -far_rows)
            counts.index_add_(0, old, -torch.ones_like(old))
            sums[empty] = far_rows
            counts[empty] = 1
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None].float(), centroids)  # (K, D)
        shift = float((new - centroids).norm()) / max(float(centroids.norm()), 1e-12)
        centroids = new
        if progress:
            iterator.set_postfix(shift=f"{shift:.2e}")
        if shift == 0.0 and empty.numel() == 0:
            converged_exactly = True  # labels already match the final centroids
            break
        if shift < tol:
            break
    if not converged_exactly:  # labels and inertia for the final centroids
        assign_and_sum(centroids)
    inertia = float(sqdist.double().sum())
    return KMeansResult(labels=labels.cpu(), centroids=centroids.float().cpu(), inertia=inertia,
                        n_iter=n_iter, backend="triton")


# --------------------------------------------------------------------------------------------------
# Library backends: scikit-learn (CPU) and cuML (GPU)
# --------------------------------------------------------------------------------------------------

def _as_numpy32(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _fit_sklearn(x, k, seed, max_iter, tol, init) -> KMeansResult:
    from sklearn.cluster import KMeans

    # scikit-learn needs the whole array in memory (fp32). Its tol is relative to the mean feature
    # variance (not the centroid norm as in the Triton backend).
    xs = _as_numpy32(x)
    init_arg = init if isinstance(init, str) else _as_numpy32(init)
    km = KMeans(n_clusters=k, init=init_arg, n_init=1, max_iter=max_iter, tol=tol, random_state=seed)
    km.fit(xs)
    return KMeansResult(labels=torch.from_numpy(km.labels_.astype(np.int64)),
                        centroids=torch.from_numpy(km.cluster_centers_.astype(np.float32)),
                        inertia=float(km.inertia_), n_iter=int(km.n_iter_), backend="sklearn")


def _cuml_available() -> bool:
    return importlib.util.find_spec("cuml") is not None


def _fit_cuml(x, k, seed, max_iter, tol, init) -> KMeansResult:
    try:
        from cuml.cluster import KMeans
    except Exception as exc:  # ImportError, or a broken CUDA/RAPIDS install
        raise RuntimeError(f"backend='cuml' needs RAPIDS cuML (pip install 'kclip[gpu]', i.e. cuml-cu12) and a GPU; "
                           f"importing it failed: {exc}. Use backend='triton' instead.") from exc
    if not torch.cuda.is_available():
        raise RuntimeError("backend='cuml' needs a CUDA GPU; use backend='sklearn' on CPU")
    # cuML clusters fp32/fp64 only: the whole (N, D) array goes to the GPU in fp32.
    xt = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    xt = xt.to(device="cuda", dtype=torch.float32).contiguous()  # (N, D)
    init_arg = "scalable-k-means++" if init == "k-means++" else init
    if not isinstance(init_arg, str):
        init_arg = _as_numpy32(init_arg)
    km = KMeans(n_clusters=k, init=init_arg, n_init=1, max_iter=max_iter, tol=tol, random_state=seed,
                output_type="numpy")
    km.fit(xt)
    return KMeansResult(labels=torch.from_numpy(np.asarray(km.labels_).astype(np.int64)),
                        centroids=torch.from_numpy(np.asarray(km.cluster_centers_, dtype=np.float32)),
                        inertia=float(km.inertia_), n_iter=int(getattr(km, "n_iter_", max_iter)), backend="cuml")


def resolve_backend(backend: str) -> str:
    """``auto`` -> cuML (importable and a GPU), else Triton on a GPU, else scikit-learn."""
    if backend == "auto":
        if torch.cuda.is_available():
            return "cuml" if _cuml_available() else "triton"
        return "sklearn"
    if backend not in ("cuml", "triton", "sklearn"):
        raise ValueError(f"backend must be 'auto', 'cuml', 'triton' or 'sklearn', got {backend!r}")
    return backend


def fit_kmeans(x, k: int, backend: str = "auto", seed: int = 0, max_iter: int = 100, tol: float = 1e-4,
               init="k-means++", chunk_size: int | None = None, progress: bool = False) -> KMeansResult:
    """k-means (Lloyd) with a choice of backend.

    Args:
        x: embeddings: torch tensor, numpy array or numpy memmap (fp16/bf16/fp32).
        k: number of clusters (1 <= k <= N).
        backend: ``auto`` | ``cuml`` | ``triton`` | ``sklearn`` (see :func:`resolve_backend`).
        seed: seeds the initialisation (all backends).
        max_iter: maximum Lloyd iterations.
        tol: Triton backend: stop when ||C_new - C_old||_F / ||C_old||_F < tol. scikit-learn and
            cuML apply their own definition of ``tol``.
        init: ``"k-means++"`` (Triton: seeded greedy k-means++ on at most 65536 sampled rows),
            ``"random"`` (k distinct rows) or an array (K, D) of initial centroids.
        chunk_size: rows per chunk for the Triton backend (default: 256 MiB of fp32 rows).
        progress: tqdm bar over iterations (Triton backend).

    Shapes:
        x (N, D) -> labels int64 (N,), centroids float32 (K, D)

    On a GPU the Triton backend computes distances in the source dtype (bf16/fp16 with fp32
    accumulation; fp32 as IEEE fp32); on CPU everything is fp32.
    """
    n, _ = _shape(x)
    _check_k(k, n)
    _check_finite(x)
    backend = resolve_backend(backend)
    if backend == "sklearn":
        return _fit_sklearn(x, k, seed, max_iter, tol, init)
    if backend == "cuml":
        return _fit_cuml(x, k, seed, max_iter, tol, init)
    return _lloyd_triton(x, k, seed, max_iter, tol, init, chunk_size, progress)


# --------------------------------------------------------------------------------------------------
# The concept classifier C
# --------------------------------------------------------------------------------------------------

def _materialise(emb, device: torch.device) -> torch.Tensor:
    """(N, D) fp32 tensor on ``device`` (the classifier's training set is small: N x d' floats)."""
    n, _ = _shape(emb)
    if isinstance(emb, torch.Tensor):
        return emb.detach().to(device=device, dtype=torch.float32)
    out = torch.empty(_shape(emb), dtype=torch.float32, device=device)
    step = 1 << 16
    for s in range(0, n, step):
        out[s:s + step] = _rows(emb, s, min(n, s + step), device, torch.float32)
    return out


def train_concept_classifier(emb, labels, k: int, epochs: int = 10, lr: float = 1e-2, val_fraction: float = 0.1,
                             seed: int = 0, soft_labels: bool = False, centroids=None, temperature: float = 1.0,
                             batch_size: int = 512, device=None, weight_decay: float = 0.0, standardize: bool = True):
    """Train the linear concept classifier C on (teacher embedding, concept label) and freeze it.

    Training standardises the features (per-dimension mean/std of the training split; LLM hidden states
    have a few very large dimensions) and folds that affine map into the returned layer, so C applies
    to raw teacher-space vectors, which is what W_e(E_I(image)) produces. Adam, full passes over a
    shuffled training split, all randomness from ``seed``.

    Args:
        emb: teacher embeddings (tensor, ndarray or memmap).
        labels: concept labels from k-means.
        k: number of concepts.
        epochs, lr, batch_size, weight_decay: Adam schedule (constant lr).
        val_fraction: share of rows held out (seeded split) for ``val_acc``.
        soft_labels: train on ``softmax(-||x - c_k||^2 / temperature)`` instead of one-hot labels
            (needs ``centroids``); accuracies are still measured against the hard labels.
        centroids: (K, D') k-means centroids (for soft labels).
        temperature: soft-label temperature (in squared-distance units).
        device: where to train (default: CUDA if present, else CPU).
        standardize: standardise features while training (for raw LLM states). Pass False when the
            embeddings are already normalised (kclip's pipeline does): folding 1/std into C would give
            huge weights on near-constant dimensions, and with them huge logits for any input off the
            teacher manifold, such as W_e(E_I(image)) early in training.

    Shapes:
        emb (N, D'), labels (N,) int, centroids (K, D') -> nn.Linear(D', K) (frozen, eval), report dict

    Returns:
        (classifier, report) with report keys train_acc, val_acc, n_train, n_val, final_loss, epochs, time_s.
    """
    t0 = time.perf_counter()
    device = torch.device(device) if device is not None else _default_device()
    n, d = _shape(emb)
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).long().flatten()
    if y.numel() != n:
        raise ValueError(f"labels has {y.numel()} entries but emb has N={n} rows; pass one label per embedding")
    if n and (int(y.min()) < 0 or int(y.max()) >= k):
        raise ValueError(f"labels must lie in [0, k={k}), got range [{int(y.min())}, {int(y.max())}]")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if soft_labels and centroids is None:
        raise ValueError("soft_labels=True needs the k-means centroids: pass centroids=<(K, D') array>")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    gen = torch.Generator().manual_seed(int(seed))
    x = _materialise(emb, device)  # (N, D')
    y = y.to(device)
    perm = torch.randperm(n, generator=gen)
    n_val = int(round(val_fraction * n)) if n > 1 else 0
    n_val = min(n_val, n - 1)
    val_idx, train_idx = perm[:n_val].to(device), perm[n_val:].to(device)
    n_train = train_idx.numel()

    xt = x[train_idx]  # (n_train, D')
    if standardize:
        mean = xt.mean(0)  # (D',)
        std = xt.std(0, unbiased=False).clamp_min(1e-6)  # (D',)
    else:
        mean, std = torch.zeros(d, device=device), torch.ones(d, device=device)

    soft_c = None
    if soft_labels:
        soft_c = torch.as_tensor(np.asarray(centroids) if not isinstance(centroids, torch.Tensor) else centroids)
        soft_c = soft_c.to(device=device, dtype=torch.float32)  # (K, D')
        if tuple(soft_c.shape) != (k, d):
            raise ValueError(f"centroids have shape {tuple(soft_c.shape)}, expected (k, D') = ({k}, {d})")

    layer = nn.Linear(d, k)
    with torch.no_grad():  # seeded init (nn.Linear's default uses the global RNG)
        bound = 1.0 / math.sqrt(d)
        layer.weight.copy_(torch.empty(k, d).uniform_(-bound, bound, generator=gen))
        layer.bias.zero_()
    layer = layer.to(device)
    opt = torch.optim.Adam(layer.parameters(), lr=lr, weight_decay=weight_decay)

    final_loss = float("nan")
    for _ in range(epochs):
        order = train_idx[torch.randperm(n_train, generator=gen).to(device)]
        total, seen = 0.0, 0
        for s in range(0, n_train, batch_size):
            idx = order[s:s + batch_size]
            xb = x[idx]  # (B, D')
            logits = layer((xb - mean) / std)  # (B, K)
            if soft_c is not None:
                sq = torch.cdist(xb, soft_c).pow(2)  # (B, K)
                target = torch.softmax(-sq / temperature, dim=1)
                loss = -(target * torch.log_softmax(logits, dim=1)).sum(1).mean()
            else:
                loss = nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
            seen += idx.numel()
        final_loss = total / max(1, seen)

    # Fold the standardisation into the layer: W (x - m)/s + b = (W/s) x + (b - W (m/s)).
    classifier = nn.Linear(d, k).to(device)
    with torch.no_grad():
        w = layer.weight / std[None, :]
        classifier.weight.copy_(w)
        classifier.bias.copy_(layer.bias - w @ mean)
    classifier.eval()
    classifier.requires_grad_(False)

    def accuracy(idx: torch.Tensor) -> float | None:
        if idx.numel() == 0:
            return None
        with torch.no_grad():
            hits = 0
            for s in range(0, idx.numel(), 8192):
                b = idx[s:s + 8192]
                hits += int((classifier(x[b]).argmax(1) == y[b]).sum())
        return hits / idx.numel()

    report = {"train_acc": accuracy(train_idx), "val_acc": accuracy(val_idx), "n_train": int(n_train),
              "n_val": int(n_val), "final_loss": final_loss, "epochs": int(epochs), "lr": float(lr),
              "soft_labels": bool(soft_labels), "time_s": time.perf_counter() - t0}
    return classifier, report


# --------------------------------------------------------------------------------------------------
# The concepts stage: fit, train, write, plot
# --------------------------------------------------------------------------------------------------

def cluster_size_stats(sizes) -> dict:
    """Balance of a clustering: min/max/mean/std, coefficient of variation, normalised entropy, Gini."""
    s = np.asarray(sizes, dtype=np.float64)
    k, total = len(s), s.sum()
    p = s / total if total > 0 else np.zeros_like(s)
    nz = p[p > 0]
    entropy = float(-(nz * np.log(nz)).sum() / math.log(k)) if k > 1 else 1.0
    srt = np.sort(s)
    gini = float((2 * np.arange(1, k + 1) - k - 1).dot(srt) / (k * total)) if total > 0 else 0.0
    return {"min": int(s.min()), "max": int(s.max()), "mean": float(s.mean()), "std": float(s.std()),
            "cv": float(s.std() / s.mean()) if s.mean() > 0 else 0.0, "normalized_entropy": entropy,
            "gini": gini, "n_empty": int((s == 0).sum())}


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _plot_cluster_sizes(path: Path, teacher_sizes: np.ndarray, student_sizes: np.ndarray | None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ranks = np.arange(1, len(teacher_sizes) + 1)
    ax.plot(ranks, np.sort(teacher_sizes)[::-1], marker=".", label="teacher (LLM) embeddings")
    if student_sizes is not None:
        ax.plot(ranks, np.sort(student_sizes)[::-1], marker=".", label="CLIP text embeddings")
    ax.set_xlabel("cluster rank (largest first)")
    ax.set_ylabel("cluster size")
    ax.set_title(f"Cluster-size distribution, K={len(teacher_sizes)}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _atomic_write_bytes(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


def _plot_projection(path: Path, emb, labels: torch.Tensor, centroids: torch.Tensor, seed: int,
                     projection: str, max_points: int = 20000) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, _ = _shape(emb)
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(n, generator=gen)[:max_points].sort().values.numpy() if n > max_points else np.arange(n)
    pts = _take(emb, idx, torch.device("cpu"), torch.float32)  # (M, D')
    lab = labels[torch.as_tensor(idx)].numpy()
    mean = pts.mean(0, keepdim=True)
    method = projection
    if projection == "tsne" and pts.shape[0] <= 5000:
        from sklearn.manifold import TSNE
        xy = TSNE(n_components=2, random_state=seed, init="pca", max_iter=500,
                  perplexity=min(30.0, max(2.0, (pts.shape[0] - 1) / 3))).fit_transform(pts.numpy())
        cxy = None
    else:
        method = "pca"
        with torch.random.fork_rng(devices=[]):  # pca_lowrank draws from the global RNG
            torch.manual_seed(seed)
            q = min(2, pts.shape[1], pts.shape[0])
            _, _, v = torch.pca_lowrank(pts - mean, q=q, center=False)  # (D', q)
        v = torch.nn.functional.pad(v, (0, 2 - v.shape[1]))
        xy = ((pts - mean) @ v).numpy()  # (M, 2)
        cxy = ((centroids.float() - mean) @ v).numpy()  # (K, 2)
    k = centroids.shape[0]
    fig, ax = plt.subplots(figsize=(6, 5))
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=lab, cmap="tab20" if k <= 20 else "nipy_spectral", s=4, alpha=0.7,
                    vmin=0, vmax=max(1, k - 1))
    if cxy is not None:
        ax.scatter(cxy[:, 0], cxy[:, 1], c="black", marker="x", s=30, label="centroids")
        ax.legend(loc="best", fontsize=7)
    fig.colorbar(sc, ax=ax, label="concept")
    ax.set_title(f"Teacher embeddings by concept ({method.upper()}, {len(idx)} of {n} points)")
    fig.tight_layout()
    _atomic_write_bytes(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return method


def run_concepts(embeddings, out_dir, k: int, backend: str = "auto", seed: int = 0, max_iter: int = 100,
                 tol: float = 1e-4, classifier_epochs: int = 10, classifier_lr: float = 1e-2,
                 soft_labels: bool = False, temperature: float = 1.0, student_text_embeddings=None,
                 progress: bool = True, projection: str = "pca", classifier_batch_size: int = 512,
                 device=None, classifier_standardize: bool = True) -> dict:
    """The concepts stage: k-means, classifier C, tensors, report and plots in ``out_dir``.

    Writes (each atomically: a temp file in ``out_dir``, then ``os.replace``; rerunning overwrites):
        concepts.safetensors   labels int64 (N,), centroids float32 (K, D'), classifier.weight (K, D'),
                               classifier.bias (K,)
        concepts_report.json   k, backend, inertia, n_iter, cluster sizes and their statistics,
                               classifier accuracies, timings (and the same for the CLIP text embeddings)
        cluster_sizes.png      sorted cluster sizes: teacher vs CLIP text embeddings (paper Fig. 4)
        concepts_2d.png        2-D PCA (or t-SNE for N <= 5000 with projection="tsne") coloured by concept
                               (paper Fig. 5)
    Deciding whether to skip an existing output is the caller's job.

    Args:
        embeddings: teacher caption embeddings (tensor, ndarray, memmap).
        out_dir: output directory (created).
        k: number of concepts.
        student_text_embeddings: optional CLIP text embeddings of the same captions, clustered with the
            same k for the cluster-size comparison.
        Other arguments: see :func:`fit_kmeans` and :func:`train_concept_classifier`.

    Shapes:
        embeddings (N, D'), student_text_embeddings (N, D_clip)

    Returns:
        The report dict (also written to concepts_report.json).
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n, d = _shape(embeddings)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    km = fit_kmeans(embeddings, k, backend=backend, seed=seed, max_iter=max_iter, tol=tol, progress=progress)
    timings["kmeans_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    clf, clf_report = train_concept_classifier(embeddings, km.labels, k, epochs=classifier_epochs, lr=classifier_lr,
                                               standardize=classifier_standardize,
                                               seed=seed, soft_labels=soft_labels, centroids=km.centroids,
                                               temperature=temperature, batch_size=classifier_batch_size,
                                               device=device)
    timings["classifier_s"] = time.perf_counter() - t0

    sizes = torch.bincount(km.labels, minlength=k).numpy()
    student = None
    student_sizes = None
    if student_text_embeddings is not None:
        t0 = time.perf_counter()
        skm = fit_kmeans(student_text_embeddings, k, backend=backend, seed=seed, max_iter=max_iter, tol=tol,
                         progress=progress)
        timings["student_kmeans_s"] = time.perf_counter() - t0
        student_sizes = torch.bincount(skm.labels, minlength=k).numpy()
        student = {"backend": skm.backend, "inertia": skm.inertia, "n_iter": skm.n_iter,
                   "dim": _shape(student_text_embeddings)[1], "cluster_sizes": student_sizes.tolist(),
                   "cluster_size_stats": cluster_size_stats(student_sizes)}

    from safetensors.torch import save_file

    tensors = {"labels": km.labels.contiguous(), "centroids": km.centroids.float().contiguous(),
               "classifier.weight": clf.weight.detach().float().cpu().contiguous(),
               "classifier.bias": clf.bias.detach().float().cpu().contiguous()}
    _atomic_write_bytes(out / CONCEPTS_FILE, lambda p: save_file(tensors, str(p), metadata={"k": str(k)}))

    t0 = time.perf_counter()
    _plot_cluster_sizes(out / SIZES_PLOT, sizes, student_sizes)
    method = _plot_projection(out / PROJECTION_PLOT, embeddings, km.labels, km.centroids, seed, projection)
    timings["plots_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start

    report: dict[str, Any] = {
        "k": int(k), "n": n, "dim": d, "backend": km.backend, "seed": int(seed), "inertia": km.inertia,
        "n_iter": km.n_iter, "max_iter": int(max_iter), "tol": float(tol),
        "cluster_sizes": sizes.tolist(), "cluster_size_stats": cluster_size_stats(sizes),
        "classifier": clf_report, "soft_labels": bool(soft_labels), "temperature": float(temperature),
        "student_text": student, "projection": method, "timings": timings,
        "files": [CONCEPTS_FILE, REPORT_FILE, SIZES_PLOT, PROJECTION_PLOT],
    }
    text = json.dumps(report, indent=2, sort_keys=True)
    _atomic_write_bytes(out / REPORT_FILE, lambda p: p.write_text(text, encoding="utf-8"))
    return report


def load_concepts(out_dir) -> dict[str, torch.Tensor]:
    """Tensors written by :func:`run_concepts`: labels, centroids, classifier.weight, classifier.bias."""
    path = Path(out_dir) / CONCEPTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the concepts stage first (`kclip concepts`)")
    from safetensors.torch import load_file

    return load_file(str(path))
