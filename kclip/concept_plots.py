"""The concepts stage's figures, each written atomically as a PNG.

- :func:`plot_cluster_sizes`: sorted cluster sizes of the teacher's k-means, and of the same k-means over the
  CLIP text embeddings of the same captions when given (the paper's Figure 4; :func:`student_clusters`
  computes that second clustering).
- :func:`plot_projection`: a 2-D PCA (or t-SNE for small sets) of the teacher embeddings coloured by concept
  (the paper's Figure 5).

Figures are drawn on ``matplotlib.figure.Figure`` objects (the Agg canvas), never through pyplot, so nothing
global (the pyplot backend, its figure registry) changes in the caller's process.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from kclip.atomic import atomic_path
from kclip.kmeans import cluster_size_stats, fit_kmeans, rows_shape, take_rows

__all__ = ["SIZES_PLOT", "PROJECTION_PLOT", "student_clusters", "plot_cluster_sizes", "plot_projection"]

SIZES_PLOT = "cluster_sizes.png"
PROJECTION_PLOT = "concepts_2d.png"


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def student_clusters(student_text_embeddings, k: int, backend: str = "auto", seed: int = 0, max_iter: int = 100,
                     tol: float = 1e-4, progress: bool = False) -> dict:
    """Figure 4's second curve: k-means with the teacher's ``k`` over the CLIP text embeddings of the captions.

    Args:
        student_text_embeddings: (N, D_clip) CLIP text embeddings (a tensor or a row-sliceable array).
        k, backend, seed, max_iter, tol, progress: as for the teacher's k-means (``kclip.kmeans.fit_kmeans``).

    Returns:
        backend, inertia, n_iter, dim, cluster_sizes (list), cluster_size_stats, time_s.
    """
    t0 = time.perf_counter()
    km = fit_kmeans(student_text_embeddings, k, backend=backend, seed=seed, max_iter=max_iter, tol=tol,
                    progress=progress)
    sizes = torch.bincount(km.labels, minlength=k).numpy()
    return {"backend": km.backend, "inertia": km.inertia, "n_iter": km.n_iter,
            "dim": rows_shape(student_text_embeddings)[1], "cluster_sizes": sizes.tolist(),
            "cluster_size_stats": cluster_size_stats(sizes), "time_s": time.perf_counter() - t0}


def plot_cluster_sizes(path: Path, teacher_sizes: np.ndarray, student_sizes: np.ndarray | None = None) -> None:
    """Sorted cluster sizes (largest first), teacher vs CLIP text embeddings (paper Fig. 4).

    Shapes:
        teacher_sizes (K,), student_sizes (K,)
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
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
    _save(fig, path)


def plot_projection(path: Path, emb, labels: torch.Tensor, centroids: torch.Tensor, seed: int,
                    projection: str = "pca", max_points: int = 20000) -> str:
    """2-D view of (a seeded sample of at most ``max_points``) teacher embeddings coloured by concept (Fig. 5).

    Args:
        emb: the embeddings k-means ran on (a tensor or a row-sliceable array).
        labels, centroids: the k-means result.
        seed: seeds the sample, PCA's randomised SVD and t-SNE.
        projection: ``"pca"``, or ``"tsne"`` (used for at most 5000 points; PCA above).

    Shapes:
        emb (N, D'), labels (N,), centroids (K, D')

    Returns:
        The projection used: ``"pca"`` or ``"tsne"``.
    """
    from matplotlib.figure import Figure

    n, _ = rows_shape(emb)
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(n, generator=gen)[:max_points].sort().values.numpy() if n > max_points else np.arange(n)
    pts = take_rows(emb, idx).to(device="cpu", dtype=torch.float32)  # (M, D')
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
    fig = Figure(figsize=(6, 5))
    ax = fig.subplots()
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=lab, cmap="tab20" if k <= 20 else "nipy_spectral", s=4, alpha=0.7,
                    vmin=0, vmax=max(1, k - 1))
    if cxy is not None:
        ax.scatter(cxy[:, 0], cxy[:, 1], c="black", marker="x", s=30, label="centroids")
        ax.legend(loc="best", fontsize=7)
    fig.colorbar(sc, ax=ax, label="concept")
    ax.set_title(f"Teacher embeddings by concept ({method.upper()}, {len(idx)} of {n} points)")
    fig.tight_layout()
    _save(fig, path)
    return method
