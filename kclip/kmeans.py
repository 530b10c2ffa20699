"""k-means over embeddings, with four backends: our Triton Lloyd loop, cuML, scikit-learn, and ``auto``.

- ``triton``: our Lloyd loop on :func:`kclip.kernels.kmeans_assign` (nearest centroid, never N x K) and
  :func:`kclip.kernels.kmeans_update` (per-cluster sums, sorted by label); on a GPU, or on CPU tensors in
  the Triton interpreter (tests), or through the kernels' PyTorch references on CPU.
- ``cuml`` (RAPIDS, GPU) and ``sklearn`` (CPU): the libraries' own KMeans, fp32, data whole in memory.
- ``auto``: cuML when importable and a GPU is present, else Triton on a GPU, else scikit-learn.

Input (one path for every backend). ``x`` is either a torch tensor (any device; fp32, bf16 or fp16), as the
benchmarks pass it, or a row-sliceable (N, D) float array: anything with ``.shape`` whose ``x[a:b]`` and
``x[index_array]`` return rows as numpy arrays. The concepts stage passes ``kclip.targets.TeacherTargets``
(float32 rows computed from the memory-mapped cache); a numpy array works the same way. Backends read it only
through :func:`read_rows`, :func:`take_rows` and :func:`load_rows`, in row blocks, so a cache-backed source is
held whole only where a backend needs it whole (on the GPU when it fits; scikit-learn and cuML in fp32).

Determinism (Triton backend). The init draws come from a CPU ``torch.Generator`` seeded with ``seed``, so the
init is the same on every device. The assignment kernel is deterministic (lower index wins ties). The update
sums each cluster's rows in row order (stable sort by label, no atomics) and adds chunk partials in chunk
order, so a run is bitwise reproducible on the GPU as on CPU for the same data, device and ``chunk_size``.

Cost per Lloyd iteration: the assignment is 2*N*K*D FLOPs (tensor cores with bf16/fp16 rows; fp32 rows, what
``TeacherTargets`` yields, run IEEE fp32 without them: pass bf16/fp16 for speed), the update reads x once, and
the sort, segment bounds and (K, D) centroid division are small beside them. The host waits for the device
once per iteration (the convergence read); neither kernel waits by itself. Measured times: ``python -m
bench.bench_kmeans`` (``ms_per_iter``, ``kclip-assign``, ``kclip-update`` rows in ``bench/results/``).
"""
from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["KMeansResult", "fit_kmeans", "resolve_backend", "cluster_size_stats", "rows_shape", "read_rows",
           "take_rows", "load_rows", "default_device"]

# k-means++ on more than this many points is run on a seeded uniform subsample (see _kmeanspp_init).
KMEANSPP_MAX_POINTS = 65536
# The Triton backend copies the whole array to the GPU when it takes at most this share of free memory,
# and streams row chunks from the host every iteration otherwise.
GPU_RESIDENT_FRACTION = 0.5
_LOAD_BLOCK_BYTES = 256 << 20  # rows per read when loading or checking a source: 256 MiB at a time


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
    # Triton backend: wall seconds of each Lloyd iteration, host read to host read (the loop already reads
    # once per iteration, so timing it adds no wait); the first one also absorbs the initialisation's
    # queued device work, so the steady state is the later ones. Empty for the library backends.
    iter_seconds: tuple = ()


# --------------------------------------------------------------------------------------------------
# The input path: a tensor, or a row-sliceable array (TeacherTargets, numpy), read in row blocks
# --------------------------------------------------------------------------------------------------

def rows_shape(x) -> tuple[int, int]:
    """(N, D) of the input; a clear error for anything not 2-D."""
    shape = tuple(x.shape)
    if len(shape) != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {shape}; reshape or pick the embedding array")
    return int(shape[0]), int(shape[1])


def _as_tensor(rows) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        return rows.detach()  # clustering reads values: no autograd graph through the copies
    return torch.from_numpy(np.require(rows, requirements=["C", "W"]))  # copies only read-only/strided rows


def read_rows(x, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` as a tensor: a view of a tensor (its device), a CPU tensor of an array's rows."""
    return _as_tensor(x[start:stop])


def take_rows(x, idx: np.ndarray) -> torch.Tensor:
    """Rows ``idx`` (any order) as a tensor, on ``x``'s device for a tensor, on CPU otherwise."""
    if isinstance(x, torch.Tensor):
        return x[torch.as_tensor(idx, device=x.device)]
    return _as_tensor(x[np.asarray(idx)])


def _block_rows(d: int, itemsize: int = 4) -> int:
    return max(1, _LOAD_BLOCK_BYTES // max(1, d * itemsize))


def load_rows(x, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """The whole input as one (N, D) tensor on ``device`` in ``dtype``: ``x`` itself when it already is one,
    else filled block by block (never a second full copy of an array source in host memory)."""
    device = _indexed(device)
    if isinstance(x, torch.Tensor) and x.device == device and x.dtype == dtype:
        return x.detach()
    n, d = rows_shape(x)
    out = torch.empty((n, d), dtype=dtype, device=device)  # (N, D)
    step = _block_rows(d)
    for s in range(0, n, step):
        out[s:s + step] = read_rows(x, s, min(n, s + step)).to(device=device, dtype=dtype, non_blocking=True)
    return out


def _indexed(device: torch.device | str) -> torch.device:
    """``device``, with ``cuda`` (the current CUDA device) as ``cuda:<index>``: a tensor's device compares equal only
    to an indexed one, and a failed comparison would copy the data."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def default_device() -> torch.device:
    """The current CUDA device with its index (``cuda:0``, not ``cuda``), else the CPU."""
    return _indexed("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _compute_device(x) -> torch.device:
    """Where the Triton backend runs: a CUDA tensor's own device (no copy to another GPU), else the default."""
    if isinstance(x, torch.Tensor) and x.device.type == "cuda":
        return x.device
    return default_device()


def _check_finite(x) -> None:
    n, d = rows_shape(x)
    step = _block_rows(d)
    if isinstance(x, torch.Tensor) and x.device.type != "cpu":
        # on the device: count the bad rows block by block without a host sync, read the count once
        bad_rows = torch.zeros((), dtype=torch.int64, device=x.device)
        for s in range(0, n, step):
            bad_rows += (~torch.isfinite(read_rows(x, s, min(n, s + step))).all(dim=1)).sum()
        if int(bad_rows) == 0:
            return
    for s in range(0, n, step):  # host data, or a device tensor known to hold a bad row: find the first one
        bad = (~torch.isfinite(read_rows(x, s, min(n, s + step))).all(dim=1)).cpu().numpy()
        if bool(bad.any()):
            row = s + int(np.flatnonzero(bad)[0])
            raise ValueError(f"embeddings contain NaN or inf (first bad row {row}, {int(bad.sum())} bad rows in rows "
                             f"{s}..{min(n, s + step) - 1}); recompute or drop those rows before clustering "
                             "(an fp16 cache overflows above 65504: store the teacher embeddings in fp32/bf16)")


def _check_k(k: int, n: int) -> None:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > n:
        raise ValueError(f"k={k} clusters exceeds the number of embeddings N={n}; lower k to at most {n} "
                         "or cluster more captions")


def _given_centroids(init, k: int, d: int) -> torch.Tensor:
    """An init array (tensor or array-like) as a checked (K, D) float32 CPU tensor."""
    c = torch.as_tensor(init if isinstance(init, torch.Tensor) else np.asarray(init)).detach()
    if tuple(c.shape) != (k, d):
        raise ValueError(f"init centroids have shape {tuple(c.shape)}, expected (k, D) = ({k}, {d})")
    if not bool(torch.isfinite(c).all()):
        raise ValueError("init centroids contain NaN or inf; pass finite centroids")
    return c.to(device="cpu", dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# The Triton backend: our own Lloyd loop
# --------------------------------------------------------------------------------------------------

class _Data:
    """The (N, D) input on the compute device in the compute dtype: held there whole when it fits, else
    streamed in row chunks (read from the source each iteration)."""

    def __init__(self, x, device: torch.device, chunk_size: int | None):
        self.n, self.d = rows_shape(x)
        self.device = device
        source_dtype = read_rows(x, 0, 1).dtype
        # GPU: distances in the source dtype (tensor cores for bf16/fp16); CPU and the interpreter: fp32.
        on_gpu = device.type == "cuda" and source_dtype in (torch.bfloat16, torch.float16, torch.float32)
        self.dtype = source_dtype if on_gpu else torch.float32
        self.source = x
        self.resident: torch.Tensor | None = None
        if isinstance(x, torch.Tensor) and x.device == device and x.dtype == self.dtype:
            self.resident = x  # already where it is needed: no copy
        elif device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            itemsize = torch.empty(0, dtype=self.dtype).element_size()
            if self.n * self.d * itemsize <= GPU_RESIDENT_FRACTION * free:  # leave room for the update buffers
                self.resident = load_rows(x, device, self.dtype)
        elif isinstance(x, torch.Tensor):
            self.resident = x  # CPU tensor: chunks are views, converted to fp32 per chunk
        # Chunk: bounds the fp32 copy of a CPU chunk (and the upload when streaming).
        self.chunk_size = int(chunk_size) if chunk_size else _block_rows(self.d)

    @property
    def whole_on_device(self) -> bool:
        """The data sits on the GPU in the compute dtype: assign and update in one launch each."""
        return self.device.type == "cuda" and self.resident is not None

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        src = self.resident if self.resident is not None else self.source
        for s in range(0, self.n, self.chunk_size):
            rows = read_rows(src, s, min(self.n, s + self.chunk_size))
            yield s, rows.to(device=self.device, dtype=self.dtype, non_blocking=True)

    def take(self, idx: np.ndarray) -> torch.Tensor:
        src = self.resident if self.resident is not None else self.source
        return take_rows(src, idx).to(device=self.device, dtype=self.dtype)


def _kmeanspp_init(data: _Data, k: int, gen: torch.Generator) -> torch.Tensor:
    """Seeded greedy k-means++ on at most KMEANSPP_MAX_POINTS rows.

    Greedy k-means++ (as scikit-learn): at each step draw ``2 + ln(k)`` candidates with probability
    proportional to D^2 (squared distance to the nearest chosen centre) and keep the one that lowers
    the total D^2 most. For large N the seeding runs on a uniform subsample drawn with the same
    generator: the init only needs a good spread of starting points, and Lloyd then runs on all N.
    All random draws come from the CPU generator, so the init is the same on every device for a seed.
    """
    n = data.n
    if n > KMEANSPP_MAX_POINTS:
        idx = torch.randperm(n, generator=gen)[:KMEANSPP_MAX_POINTS].sort().values.numpy()
        pts = data.take(idx).float()  # (M, D)
    else:
        pts = torch.cat([c.float() for _, c in data.chunks()])  # (M, D) = (N, D)
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


def _initial_centroids(init, data: _Data, k: int, gen: torch.Generator) -> torch.Tensor:
    if isinstance(init, str):
        if init == "k-means++":
            return _kmeanspp_init(data, k, gen)
        if init == "random":
            idx = torch.randperm(data.n, generator=gen)[:k].sort().values.numpy()
            return data.take(idx).float()
        raise ValueError(f"init must be 'k-means++', 'random' or a (K, D) array, got {init!r}")
    return _given_centroids(init, k, data.d).to(data.device)


def _lloyd_triton(x, k: int, seed: int, max_iter: int, tol: float, init, chunk_size: int | None,
                  progress: bool) -> KMeansResult:
    from kclip.kernels import kmeans_assign, kmeans_update

    device = _compute_device(x)
    data = _Data(x, device, chunk_size)
    gen = torch.Generator().manual_seed(int(seed))
    centroids = _initial_centroids(init, data, k, gen)  # (K, D) fp32
    n = data.n

    labels = torch.empty(n, dtype=torch.int64, device=device)  # (N,)
    sqdist = torch.empty(n, dtype=torch.float32, device=device)  # (N,)

    def assign_and_sum(c: torch.Tensor, with_sums: bool = True):
        """Assign every row to its nearest centroid; the per-cluster sums (K, D) fp32 and counts (K,) unless
        ``with_sums`` is False. kmeans_assign's labels lie in [0, K) by construction, so the update skips its
        range check: the loop's only host read stays the one per iteration below."""
        if data.whole_on_device:  # thousands of row blocks / (cluster, column) programs keep every SM busy
            labels[:], sqdist[:] = kmeans_assign(data.resident, c)
            return kmeans_update(data.resident, labels, k, check_labels=False) if with_sums else None
        sums = torch.zeros((k, data.d), dtype=torch.float32, device=device)  # (K, D)
        counts = torch.zeros(k, dtype=torch.int64, device=device)  # (K,)
        for s, xb in data.chunks():  # streamed (or CPU) data: chunk by chunk, partials added in chunk order
            lab, sq = kmeans_assign(xb, c)  # (B,), (B,)
            labels[s:s + xb.shape[0]] = lab
            sqdist[s:s + xb.shape[0]] = sq
            if with_sums:
                part_sums, part_counts = kmeans_update(xb, lab, k, check_labels=False)
                sums += part_sums
                counts += part_counts
        return (sums, counts) if with_sums else None

    iterator = range(max_iter)
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(iterator, desc=f"k-means (triton, K={k})", leave=False)
    n_iter = 0
    converged_exactly = False
    def means(sums, counts, old):  # (K, D) new centroids; a cluster without points keeps its old one
        return torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None].float(), old)

    iter_seconds = []
    tick = time.perf_counter()
    for _ in iterator:
        sums, counts = assign_and_sum(centroids)
        n_iter += 1
        new = means(sums, counts, centroids)
        # one host read per iteration: the empty-cluster count and the shift's two norms together
        n_empty, delta, norm = torch.stack([(counts == 0).sum().float(), (new - centroids).norm(),
                                            centroids.norm()]).tolist()
        n_empty = int(n_empty)
        if n_empty:
            # Re-seed empty clusters with the points farthest from their centroid (largest sqdist, lowest
            # index first on ties), moving each point out of its old cluster as scikit-learn does.
            empty = (counts == 0).nonzero().flatten()  # (E,)
            order = torch.sort(sqdist, descending=True, stable=True).indices[:n_empty]  # (E,)
            far_rows = data.take(order.cpu().numpy()).float()  # (E, D)
            # E is small and changes between iterations: a one-hot GEMM (deterministic, no atomics) instead of
            # the update kernel, whose Triton launch would compile a new specialisation for new row counts
            onehot = F.one_hot(labels[order], k).to(far_rows.dtype)  # (E, K)
            sums -= onehot.T @ far_rows
            counts -= onehot.sum(0).to(counts.dtype)
            sums[empty] = far_rows
            counts[empty] = 1
            new = means(sums, counts, centroids)
            delta = float((new - centroids).norm())
        shift = delta / max(norm, 1e-12)
        centroids = new
        iter_seconds.append(time.perf_counter() - tick)
        tick = time.perf_counter()
        if progress:
            iterator.set_postfix(shift=f"{shift:.2e}")
        if shift == 0.0 and n_empty == 0:
            converged_exactly = True  # labels already match the final centroids
            break
        if shift < tol:
            break
    if not converged_exactly:  # labels and inertia for the final centroids
        assign_and_sum(centroids, with_sums=False)
    inertia = float(sqdist.double().sum())
    return KMeansResult(labels=labels.cpu(), centroids=centroids.float().cpu(), inertia=inertia,
                        n_iter=n_iter, backend="triton", iter_seconds=tuple(iter_seconds))


# --------------------------------------------------------------------------------------------------
# Library backends: scikit-learn (CPU) and cuML (GPU)
# --------------------------------------------------------------------------------------------------

def _fit_sklearn(x, k, seed, max_iter, tol, init) -> KMeansResult:
    from sklearn.cluster import KMeans

    # scikit-learn needs the whole array in memory (fp32). Its tol is relative to the mean feature
    # variance (not the centroid norm as in the Triton backend).
    xs = load_rows(x, "cpu", torch.float32).numpy()  # (N, D)
    init_arg = init if isinstance(init, str) else _given_centroids(init, k, xs.shape[1]).numpy()
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
        raise RuntimeError(f"backend='cuml' needs RAPIDS cuML (pip install 'kclip[gpu]', i.e. cuml-cu13) and a GPU; "
                           f"importing it failed: {exc}. Use backend='triton' instead.") from exc
    if not torch.cuda.is_available():
        raise RuntimeError("backend='cuml' needs a CUDA GPU; use backend='sklearn' on CPU")
    # cuML clusters fp32/fp64 only: the whole (N, D) array goes to the GPU in fp32.
    xt = load_rows(x, "cuda", torch.float32).contiguous()  # (N, D)
    init_arg = "scalable-k-means++" if init == "k-means++" else init
    if not isinstance(init_arg, str):
        init_arg = _given_centroids(init_arg, k, xt.shape[1]).numpy()
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
        x: embeddings: a torch tensor (fp32/bf16/fp16, any device) or a row-sliceable (N, D) float array
            such as ``TeacherTargets`` or a numpy array (see the module docstring).
        k: number of clusters (1 <= k <= N).
        backend: ``auto`` | ``cuml`` | ``triton`` | ``sklearn`` (see :func:`resolve_backend`).
        seed: seeds the initialisation (all backends).
        max_iter: maximum Lloyd iterations.
        tol: Triton backend: stop when ||C_new - C_old||_F / ||C_old||_F < tol. scikit-learn and
            cuML apply their own definition of ``tol``.
        init: ``"k-means++"`` (Triton: seeded greedy k-means++ on at most 65536 sampled rows),
            ``"random"`` (k distinct rows) or an array (K, D) of initial centroids.
        chunk_size: rows per chunk for the Triton backend when the data is not held whole on the GPU
            (default: 256 MiB of fp32 rows).
        progress: tqdm bar over iterations (Triton backend).

    Shapes:
        x (N, D) -> labels int64 (N,), centroids float32 (K, D)

    On a GPU the Triton backend computes distances in the source dtype (bf16/fp16 with fp32
    accumulation; fp32 as IEEE fp32) and always sums centroids in fp32; on CPU everything is fp32.
    """
    n, d = rows_shape(x)
    _check_k(k, n)
    _check_finite(x)
    if not isinstance(init, str):
        _given_centroids(init, k, d)  # a wrong shape is an error before any backend starts
    backend = resolve_backend(backend)
    if backend == "sklearn":
        return _fit_sklearn(x, k, seed, max_iter, tol, init)
    if backend == "cuml":
        return _fit_cuml(x, k, seed, max_iter, tol, init)
    return _lloyd_triton(x, k, seed, max_iter, tol, init, chunk_size, progress)


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
