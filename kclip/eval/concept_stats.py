"""How well k-means concept labels line up with the synthetic set's true attributes.

The concepts stage clusters the teacher's caption embeddings; on the synthetic set we know what each
caption says, so we can ask which attributes the clusters capture. For each attribute column
(size_a, color_a, shape_a, relation, size_b, color_b, shape_b) and for the combo (color_a, shape_a),
:func:`concept_stats` reports the normalised mutual information (scikit-learn's
``normalized_mutual_info_score``, arithmetic averaging; 0 = independent, 1 = the clusters are exactly
that attribute's values up to renaming), plus cluster-size statistics (a collapsed k-means shows up as
a few huge clusters and many empty ones).
"""
from __future__ import annotations

from collections import Counter
from typing import Mapping, Sequence

import numpy as np

COMBO_KEY = "combo_a"  # (color_a, shape_a)


def attribute_table(scenes_or_rows: Sequence[Mapping[str, str]], columns: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Column-wise attribute values (one entry per row) plus the ``combo_a`` = "color_a shape_a" column."""
    if not scenes_or_rows:
        raise ValueError("attribute_table got no rows")
    columns = list(columns or ["size_a", "color_a", "shape_a", "relation", "size_b", "color_b", "shape_b"])
    table = {c: [str(r[c]) for r in scenes_or_rows] for c in columns}
    if "color_a" in table and "shape_a" in table:
        table[COMBO_KEY] = [f"{c} {s}" for c, s in zip(table["color_a"], table["shape_a"])]
    return table


def concept_stats(labels, attributes: Mapping[str, Sequence], k: int | None = None) -> dict:
    """NMI of cluster ``labels`` against each attribute column, and cluster-size statistics.

    Args:
        labels: the k-means label of each row.
        attributes: column name -> per-row values (e.g. from :func:`attribute_table`), same length.
        k: the number of clusters k-means was asked for (to count empty clusters); default
            max(label) + 1.

    Shapes:
        labels (N,) int; each attribute column (N,).

    Returns:
        {"nmi": {column: float}, "best_attribute": column with the highest NMI, "n": N, "k": k,
         "n_nonempty": ..., "n_empty": ..., "size_min"/"size_max"/"size_mean"/"size_std" (over the
         non-empty clusters), "largest_fraction": the biggest cluster's share of rows,
         "size_entropy_ratio": entropy of the size distribution / log(k) (1 = perfectly balanced)}.
    """
    from sklearn.metrics import normalized_mutual_info_score

    labels = np.asarray(labels).reshape(-1)
    n = labels.shape[0]
    if n == 0:
        raise ValueError("concept_stats got no labels")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers (cluster ids); got dtype {labels.dtype}")
    nmi = {}
    for name, values in attributes.items():
        if len(values) != n:
            raise ValueError(f"attribute column {name!r} has {len(values)} values but there are {n} labels")
        nmi[name] = float(normalized_mutual_info_score(list(map(str, values)), labels))
    k = int(k if k is not None else labels.max() + 1)
    counts = Counter(labels.tolist())
    sizes = np.array(sorted(counts.values()), dtype=np.float64)
    p = sizes / n
    entropy = float(-(p * np.log(p)).sum())
    return {
        "nmi": nmi,
        "best_attribute": max(nmi, key=nmi.get) if nmi else None,
        "n": int(n),
        "k": k,
        "n_nonempty": int(len(counts)),
        "n_empty": int(max(k - len(counts), 0)),
        "size_min": int(sizes.min()),
        "size_max": int(sizes.max()),
        "size_mean": float(sizes.mean()),
        "size_std": float(sizes.std()),
        "largest_fraction": float(sizes.max() / n),
        "size_entropy_ratio": float(entropy / np.log(k)) if k > 1 else 1.0,
    }
