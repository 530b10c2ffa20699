"""The concept classifier C and the concepts stage (k-means itself: tests/test_kmeans.py)."""
import json

import numpy as np
import pytest
import torch

from conftest import planted, spy_launches
from sklearn.metrics import normalized_mutual_info_score

from kclip.concepts import load_concepts, run_concepts, train_concept_classifier


@pytest.fixture
def triton_calls(monkeypatch):
    """Launches of the Triton assignment kernel (the Triton path, not the reference, ran)."""
    return spy_launches(monkeypatch, "kclip.kernels.kmeans_assign", "_kmeans_assign_triton")


# ------------------------------------------------------------------------------------------------ classifier

def _planted_embeddings(n=3000, k=16, d=384, seed=0, spread=1.0, l2=False):
    x, truth, centers = planted(n=n, k=k, d=d, seed=seed, spread=spread)
    x = x + 5.0  # an offset and large scale, like raw LLM hidden states
    if l2:  # what the pipeline passes with loss.target_norm=l2 (TeacherTargets)
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x, truth


@pytest.mark.parametrize("standardize", [False, True])
def test_classifier_learns_and_is_frozen(standardize):
    # standardize=False (the default, the pipeline's choice) on normalised targets; True on raw hidden states
    x, truth = _planted_embeddings(l2=not standardize)
    clf, rep = train_concept_classifier(x, truth, 16, epochs=5, seed=0, device="cpu", standardize=standardize)
    assert isinstance(clf, torch.nn.Linear) and clf.weight.shape == (16, 384)
    assert not clf.training
    assert all(not p.requires_grad for p in clf.parameters())
    assert rep["n_val"] == 300 and rep["n_train"] == 2700
    assert rep["val_acc"] >= 0.95 and rep["train_acc"] >= 0.95
    # with standardize the affine map is folded in: the layer applies to raw embeddings either way
    acc = (clf(torch.from_numpy(x)).argmax(1).numpy() == truth).mean()
    assert acc >= 0.95


def test_classifier_default_is_unstandardised():
    """The default is what the pipeline uses (standardize=False): the same layer as asking for it."""
    x, truth = _planted_embeddings(n=400, k=4, d=32, seed=5, l2=True)
    a, _ = train_concept_classifier(x, truth, 4, epochs=1, seed=0, device="cpu")
    b, _ = train_concept_classifier(x, truth, 4, epochs=1, seed=0, device="cpu", standardize=False)
    c, _ = train_concept_classifier(x, truth, 4, epochs=1, seed=0, device="cpu", standardize=True)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)


def test_classifier_deterministic_and_seed_sensitive():
    x, truth = _planted_embeddings(n=800, k=8, d=64, seed=1)
    a, ra = train_concept_classifier(x, truth, 8, epochs=2, seed=3, device="cpu")
    b, rb = train_concept_classifier(torch.from_numpy(x), torch.from_numpy(truth), 8, epochs=2, seed=3, device="cpu")
    c, _ = train_concept_classifier(x, truth, 8, epochs=2, seed=4, device="cpu")
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert ra["val_acc"] == rb["val_acc"]
    assert not torch.equal(a.weight, c.weight)


def test_classifier_soft_labels():
    x, truth = _planted_embeddings(n=800, k=8, d=64, seed=2)  # raw states: standardised while training
    cent = np.stack([x[truth == j].mean(0) for j in range(8)])
    clf, rep = train_concept_classifier(x, truth, 8, epochs=4, seed=0, soft_labels=True, centroids=cent,
                                        temperature=5.0, device="cpu", standardize=True)
    assert rep["soft_labels"] and rep["val_acc"] >= 0.9
    with pytest.raises(ValueError, match="centroids"):
        train_concept_classifier(x, truth, 8, soft_labels=True)
    with pytest.raises(ValueError, match="labels"):
        train_concept_classifier(x, truth[:-1], 8)


# ------------------------------------------------------------------------------------------------ stage

def test_run_concepts_writes_everything(tmp_path, triton_calls):
    x, truth = _planted_embeddings(n=600, k=6, d=32, seed=3, spread=2.0)
    student = planted(n=600, k=6, d=12, seed=9)[0]
    out = tmp_path / "concepts"
    rep = run_concepts(torch.from_numpy(x).half(), out, 6, backend="triton", classifier_epochs=15,
                       student_text_embeddings=student, progress=False)
    for name in ("concepts.safetensors", "concepts_report.json", "cluster_sizes.png", "concepts_2d.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "cluster_sizes.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    on_disk = json.loads((out / "concepts_report.json").read_text())
    assert on_disk["k"] == 6 and on_disk["backend"] == "triton"
    assert sum(on_disk["cluster_sizes"]) == 600
    assert on_disk["student_text"]["cluster_sizes"] and "cluster_size_stats" in on_disk
    assert 0 < on_disk["cluster_size_stats"]["normalized_entropy"] <= 1
    assert on_disk["classifier"]["val_acc"] >= 0.9
    assert set(on_disk["timings"]) >= {"kmeans_s", "classifier_s", "plots_s", "total_s"}
    assert normalized_mutual_info_score(truth, load_concepts(out)["labels"].numpy()) >= 0.99

    t = load_concepts(out)
    assert set(t) == {"labels", "centroids", "classifier.weight", "classifier.bias"}
    assert t["labels"].dtype == torch.int64 and t["centroids"].dtype == torch.float32
    assert t["classifier.weight"].shape == (6, 32) and t["classifier.bias"].shape == (6,)
    assert rep["inertia"] == on_disk["inertia"]

    # rerun overwrites atomically, same result (idempotent)
    rep2 = run_concepts(torch.from_numpy(x).half(), out, 6, backend="triton", classifier_epochs=15,
                        student_text_embeddings=student, progress=False)
    t2 = load_concepts(out)
    assert torch.equal(t["labels"], t2["labels"]) and torch.equal(t["classifier.weight"], t2["classifier.weight"])
    assert rep2["inertia"] == rep["inertia"]


def test_run_concepts_tsne_and_missing(tmp_path):
    x, _ = _planted_embeddings(n=120, k=3, d=8, seed=4)
    rep = run_concepts(x, tmp_path, 3, backend="sklearn", classifier_epochs=1, projection="tsne", progress=False)
    assert rep["projection"] == "tsne" and (tmp_path / "concepts_2d.png").stat().st_size > 0
    with pytest.raises(FileNotFoundError, match="concepts stage"):
        load_concepts(tmp_path / "nowhere")
