"""Concept learning: the concept classifier C, and the concepts stage that produces it.

Knowledge-CLIP gives every caption-image pair a concept label s = k-means cluster of the teacher's caption
embedding, trains a linear classifier ``C: R^d' -> R^K`` on (teacher embedding, s), freezes it, and later
asks ``C(W_e(E_I(image)))`` to predict s.

- :func:`train_concept_classifier`: the linear classifier, hard labels (cross-entropy, as in the paper) or
  soft labels ``softmax(-||x - c_k||^2 / T)``; returned frozen.
- :func:`run_concepts`: the stage: k-means (``kclip.kmeans.fit_kmeans``), C, ``concepts.safetensors``,
  ``concepts_report.json`` and the figures (``kclip.concept_plots``), each file written atomically;
  :func:`run_concepts_from_config` runs it from the ``concepts`` config section; :func:`load_concepts` reads
  the tensors back.

Input: the embeddings follow ``kclip.kmeans``'s one input path: a tensor, or a row-sliceable (N, d') float
array; the pipeline passes ``kclip.targets.TeacherTargets`` (float32 rows of the memory-mapped cache, with
the target normalisation applied, so k-means, C and L_emb share one space).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kclip import concept_plots
from kclip.atomic import atomic_path, atomic_write_json
from kclip.errors import MissingFileError
from kclip.kmeans import cluster_size_stats, default_device, fit_kmeans, load_rows, rows_shape

__all__ = ["train_concept_classifier", "run_concepts", "run_concepts_from_config", "load_concepts", "CONCEPTS_FILE",
           "REPORT_FILE"]

CONCEPTS_FILE = "concepts.safetensors"
REPORT_FILE = "concepts_report.json"


# --------------------------------------------------------------------------------------------------
# The concept classifier C
# --------------------------------------------------------------------------------------------------

def train_concept_classifier(emb, labels, k: int, epochs: int = 10, lr: float = 1e-2, val_fraction: float = 0.1,
                             seed: int = 0, soft_labels: bool = False, centroids=None, temperature: float = 1.0,
                             batch_size: int = 512, device=None, weight_decay: float = 0.0,
                             standardize: bool = False):
    """Train the linear concept classifier C on (teacher embedding, concept label) and freeze it.

    Adam, full passes over a shuffled training split, all randomness from ``seed``. With ``standardize`` the
    features are standardised while training and that affine map is folded into the returned layer, so C
    always applies to raw teacher-space vectors, which is what W_e(E_I(image)) produces.

    Args:
        emb: teacher embeddings: a tensor or a row-sliceable (N, D') float array (``kclip.kmeans``'s input
            path; the pipeline passes ``TeacherTargets``), held on ``device`` in fp32 while training.
        labels: concept labels from k-means.
        k: number of concepts.
        epochs, lr, batch_size, weight_decay: Adam schedule (constant lr).
        val_fraction: share of rows held out (seeded split) for ``val_acc``.
        soft_labels: train on ``softmax(-||x - c_k||^2 / temperature)`` instead of one-hot labels
            (needs ``centroids``); accuracies are still measured against the hard labels.
        centroids: (K, D') k-means centroids (for soft labels).
        temperature: soft-label temperature (in squared-distance units).
        device: where to train (default: CUDA if present, else CPU).
        standardize: standardise features (per-dimension mean/std of the training split) while training.
            Off by default, as the pipeline trains C on normalised targets: folding 1/std into C gives huge
            weights on near-constant dimensions, and with them huge logits for any input off the teacher
            manifold, such as W_e(E_I(image)) early in training. Turn it on for raw LLM hidden states,
            whose few very large dimensions otherwise dominate the optimisation.

    Shapes:
        emb (N, D'), labels (N,) int, centroids (K, D') -> nn.Linear(D', K) (frozen, eval), report dict

    Returns:
        (classifier, report) with report keys train_acc, val_acc, n_train, n_val, final_loss, epochs, time_s.
    """
    t0 = time.perf_counter()
    device = torch.device(device) if device is not None else default_device()
    n, d = rows_shape(emb)
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
    x = load_rows(emb, device, torch.float32)  # (N, D')
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

def run_concepts(embeddings, out_dir, k: int, backend: str = "auto", seed: int = 0, max_iter: int = 100,
                 tol: float = 1e-4, classifier_epochs: int = 10, classifier_lr: float = 1e-2,
                 soft_labels: bool = False, temperature: float = 1.0, student_text_embeddings=None,
                 progress: bool = True, projection: str = "pca", classifier_batch_size: int = 512,
                 device=None, classifier_standardize: bool = False) -> dict:
    """The concepts stage: k-means, classifier C, tensors, report and plots in ``out_dir``.

    Writes (each atomically, see ``kclip.atomic``; rerunning overwrites):
        concepts.safetensors   labels int64 (N,), centroids float32 (K, D'), classifier.weight (K, D'),
                               classifier.bias (K,)
        concepts_report.json   k, backend, inertia, n_iter, cluster sizes and their statistics,
                               classifier accuracies, timings (and the same for the CLIP text embeddings)
        cluster_sizes.png      sorted cluster sizes: teacher vs CLIP text embeddings (paper Fig. 4)
        concepts_2d.png        2-D PCA (or t-SNE for N <= 5000 with projection="tsne") coloured by concept
                               (paper Fig. 5)
    Deciding whether to skip an existing output is the caller's job.

    Args:
        embeddings: teacher caption embeddings: a tensor or a row-sliceable (N, D') float array (the pipeline
            passes ``TeacherTargets``).
        out_dir: output directory (created).
        k: number of concepts.
        student_text_embeddings: optional CLIP text embeddings of the same captions, clustered with the
            same k for Figure 4 only (``kclip.concept_plots.student_clusters``); the stage's outputs do
            not depend on them.
        classifier_standardize: ``standardize`` of :func:`train_concept_classifier`.
        Other arguments: see ``kclip.kmeans.fit_kmeans`` and :func:`train_concept_classifier`.

    Shapes:
        embeddings (N, D'), student_text_embeddings (N, D_clip)

    Returns:
        The report dict (also written to concepts_report.json).
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n, d = rows_shape(embeddings)
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

    from safetensors.torch import save_file

    tensors = {"labels": km.labels.contiguous(), "centroids": km.centroids.float().contiguous(),
               "classifier.weight": clf.weight.detach().float().cpu().contiguous(),
               "classifier.bias": clf.bias.detach().float().cpu().contiguous()}
    with atomic_path(out / CONCEPTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"k": str(k)})

    sizes = torch.bincount(km.labels, minlength=k).numpy()
    student = None
    if student_text_embeddings is not None:  # Figure 4's comparison curve
        student = concept_plots.student_clusters(student_text_embeddings, k, backend=backend, seed=seed,
                                                 max_iter=max_iter, tol=tol, progress=progress)
        timings["student_kmeans_s"] = student.pop("time_s")

    t0 = time.perf_counter()
    concept_plots.plot_cluster_sizes(out / concept_plots.SIZES_PLOT, sizes,
                                     np.asarray(student["cluster_sizes"]) if student else None)
    method = concept_plots.plot_projection(out / concept_plots.PROJECTION_PLOT, embeddings, km.labels,
                                           km.centroids, seed, projection)
    timings["plots_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start

    report: dict[str, Any] = {
        "k": int(k), "n": n, "dim": d, "backend": km.backend, "seed": int(seed), "inertia": km.inertia,
        "n_iter": km.n_iter, "max_iter": int(max_iter), "tol": float(tol),
        "cluster_sizes": sizes.tolist(), "cluster_size_stats": cluster_size_stats(sizes),
        "classifier": clf_report, "soft_labels": bool(soft_labels), "temperature": float(temperature),
        "student_text": student, "projection": method, "timings": timings,
        "files": [CONCEPTS_FILE, REPORT_FILE, concept_plots.SIZES_PLOT, concept_plots.PROJECTION_PLOT],
    }
    atomic_write_json(out / REPORT_FILE, report, indent=2, sort_keys=True)
    return report


def run_concepts_from_config(embeddings, out_dir, section, seed: int = 0, student_text_embeddings=None,
                             progress: bool = True) -> dict:
    """:func:`run_concepts` with the options of a ``concepts`` config section (``kclip.config.ConceptsConfig``)
    and the run's ``seed``; C is trained on the embeddings as given (``classifier_standardize`` off)."""
    return run_concepts(embeddings, out_dir, k=section.k, backend=section.backend, seed=seed,
                        max_iter=section.max_iter, tol=section.tol, classifier_epochs=section.classifier_epochs,
                        classifier_lr=section.classifier_lr, soft_labels=section.soft_labels,
                        temperature=section.temperature, student_text_embeddings=student_text_embeddings,
                        progress=progress, classifier_standardize=False)


def load_concepts(out_dir) -> dict[str, torch.Tensor]:
    """Tensors written by :func:`run_concepts`: labels, centroids, classifier.weight, classifier.bias."""
    path = Path(out_dir) / CONCEPTS_FILE
    if not path.exists():
        raise MissingFileError(f"{path} not found: run the concepts stage first (`kclip concepts`)")
    from safetensors.torch import load_file

    return load_file(str(path))
