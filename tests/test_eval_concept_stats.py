"""Concept statistics: NMI against attributes with exactly known values, cluster sizes."""
import itertools
import math

import numpy as np
import pytest

from kclip.eval.concept_stats import attribute_table, concept_stats


def _rows():
    # a full factorial design: colour x shape x size, each combination twice -> attributes independent
    rows = []
    for colour, shape, size in itertools.product(["red", "green", "blue"], ["circle", "square"], ["small", "large"]):
        rows += [dict(color_a=colour, shape_a=shape, size_a=size)] * 2
    return rows


def test_nmi_known_values():
    rows = _rows()
    table = attribute_table(rows, ["size_a", "color_a", "shape_a"])
    assert table["combo_a"][0] == "red circle"
    colour_labels = np.array([["red", "green", "blue"].index(r["color_a"]) for r in rows])
    s = concept_stats(colour_labels, table, k=5)
    assert s["nmi"]["color_a"] == pytest.approx(1.0)
    assert s["nmi"]["shape_a"] == pytest.approx(0.0, abs=1e-12) and s["nmi"]["size_a"] == pytest.approx(0.0, abs=1e-12)
    # combo (colour, shape): I = H(colour) = log 3, H(combo) = log 6 -> arithmetic NMI = 2 log3 / (log3 + log6)
    assert s["nmi"]["combo_a"] == pytest.approx(2 * math.log(3) / (math.log(3) + math.log(6)))
    assert s["best_attribute"] == "color_a"
    assert (s["n"], s["k"], s["n_nonempty"], s["n_empty"]) == (24, 5, 3, 2)
    assert (s["size_min"], s["size_max"], s["size_mean"], s["size_std"]) == (8, 8, 8.0, 0.0)
    assert s["largest_fraction"] == pytest.approx(1 / 3)
    assert s["size_entropy_ratio"] == pytest.approx(math.log(3) / math.log(5))


def test_collapsed_clustering_and_errors():
    rows = _rows()
    table = attribute_table(rows, ["color_a", "shape_a"])
    s = concept_stats(np.zeros(24, dtype=np.int64), table, k=4)
    assert all(v == pytest.approx(0.0, abs=1e-12) for v in s["nmi"].values())
    assert s["largest_fraction"] == 1.0 and s["n_empty"] == 3 and s["size_entropy_ratio"] == 0.0
    with pytest.raises(ValueError, match="'color_a' has 24 values but there are 3 labels"):
        concept_stats(np.array([0, 1, 2]), table)
    with pytest.raises(TypeError, match="integers"):
        concept_stats(np.zeros(24), table)
