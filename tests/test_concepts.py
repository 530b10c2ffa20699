"""Concept learning: fit_kmeans backends, the concept classifier, the concepts stage and its bench."""
import json

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score

import kclip.concepts as concepts
from kclip.concepts import fit_kmeans, load_concepts, run_concepts, train_concept_classifier
from kclip.kernels.dispatch import use_triton


def planted(n=997, k=6, d=13, seed=0, spread=10.0, dtype=np.float32):
    g = np.random.default_rng(seed)
    centers = g.normal(size=(k, d)) * spread
    truth = g.integers(0, k, size=n)
    x = (centers[truth] + g.normal(size=(n, d))).astype(dtype)
    return x, truth, centers


CPU_BACKENDS = ["triton", "sklearn"]


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts calls into the Triton launcher, proving the Triton path (not the reference) ran."""
    import sys

    from kclip.kernels import kmeans_assign  # noqa: F401  lazy export first: importing the submodule
    # directly would bind the package attribute `kmeans_assign` to the module instead of the function
    ka = sys.modules["kclip.kernels.kmeans_assign"]

    calls = []
    real = ka._kmeans_assign_triton

    def spy(x, c):
        calls.append(tuple(x.shape))
        return real(x, c)

    monkeypatch.setattr(ka, "_kmeans_assign_triton", spy)
    return calls


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_planted_clusters_nmi(backend, triton_calls):
    x, truth, _ = planted()
    res = fit_kmeans(x, 6, backend=backend, seed=0)
    assert res.backend == backend
    assert res.labels.dtype == torch.int64 and res.labels.shape == (997,)
    assert res.centroids.dtype == torch.float32 and res.centroids.shape == (6, 13)
    assert normalized_mutual_info_score(truth, res.labels.numpy()) >= 0.99
    assert res.n_iter >= 1
    if backend == "triton":
        assert use_triton(torch.zeros(1)), "TRITON_INTERPRET must be set for CPU tests"
        assert len(triton_calls) >= 2, "the Triton kernel did not run"


def test_triton_inertia_matches_sklearn_same_init(triton_calls):
    # overlapping clusters so Lloyd takes several iterations from a poor init
    x, _, _ = planted(n=601, k=5, d=9, seed=4, spread=1.5)
    init = x[[0, 1, 2, 3, 4]]
    ours = fit_kmeans(x, 5, backend="triton", init=init, max_iter=300, tol=1e-7)
    sk = KMeans(5, init=init, n_init=1, max_iter=300, tol=1e-7).fit(x)
    assert abs(ours.inertia - sk.inertia_) <= 0.01 * sk.inertia_
    assert ours.n_iter > 1
    assert triton_calls
    # inertia is consistent with the returned labels and centroids
    recomputed = ((torch.from_numpy(x) - ours.centroids[ours.labels]) ** 2).sum().item()
    assert abs(recomputed - ours.inertia) <= 1e-4 * ours.inertia


def test_sklearn_backend_uses_given_init():
    x, _, _ = planted(n=300, k=4, d=5, seed=2, spread=1.0)
    init = x[:4]
    ours = fit_kmeans(x, 4, backend="sklearn", init=init, max_iter=200, tol=1e-8)
    sk = KMeans(4, init=init, n_init=1, max_iter=200, tol=1e-8).fit(x)
    assert ours.inertia == pytest.approx(sk.inertia_, rel=1e-6)


def test_empty_clusters_are_reseeded(triton_calls):
    # every initial centroid is the same point: the lower index wins all ties, so clusters 1..K-1 start
    # empty and must be re-seeded from the farthest points (as scikit-learn does).
    x, truth, _ = planted(n=400, k=5, d=7, seed=5)
    init = np.repeat(x[:1], 5, axis=0)
    ours = fit_kmeans(x, 5, backend="triton", init=init, max_iter=100, tol=1e-6)
    sizes = torch.bincount(ours.labels, minlength=5)
    assert (sizes > 0).all(), f"an empty cluster survived: {sizes.tolist()}"
    sk = KMeans(5, init=init, n_init=1, max_iter=100, tol=1e-6).fit(x)
    assert abs(ours.inertia - sk.inertia_) <= 0.01 * sk.inertia_


def test_triton_deterministic_and_memmap_fp16(tmp_path, triton_calls):
    x, truth, _ = planted(n=503, k=4, d=11, seed=6)
    mm = np.lib.format.open_memmap(tmp_path / "emb.npy", mode="w+", dtype=np.float16, shape=x.shape)
    mm[:] = x
    mm.flush()
    mm = np.load(tmp_path / "emb.npy", mmap_mode="r")
    a = fit_kmeans(mm, 4, backend="triton", seed=3, chunk_size=97)  # several chunks, last one ragged
    b = fit_kmeans(mm, 4, backend="triton", seed=3, chunk_size=97)
    c = fit_kmeans(torch.from_numpy(x.astype(np.float16)), 4, backend="triton", seed=3)  # tensor, one chunk
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centroids, b.centroids)
    assert torch.equal(a.labels, c.labels)
    torch.testing.assert_close(a.centroids, c.centroids, atol=1e-4, rtol=1e-5)
    assert normalized_mutual_info_score(truth, a.labels.numpy()) >= 0.99
    assert len({s[0] for s in triton_calls}) >= 2  # chunked calls: 97 and the ragged tail


def test_kmeanspp_subsample_path(monkeypatch, triton_calls):
    monkeypatch.setattr(concepts, "KMEANSPP_MAX_POINTS", 128)
    x, truth, _ = planted(n=700, k=5, d=6, seed=8)
    res = fit_kmeans(x, 5, backend="triton", seed=1)
    assert normalized_mutual_info_score(truth, res.labels.numpy()) >= 0.99


def test_errors(tmp_path):
    x, _, _ = planted(n=20, k=3, d=4)
    with pytest.raises(ValueError, match=r"k=21 .*exceeds.*N=20"):
        fit_kmeans(x, 21, backend="sklearn")
    for bad in (np.nan, np.inf):
        y = x.copy()
        y[7, 2] = bad
        for backend in ("triton", "sklearn"):
            with pytest.raises(ValueError, match=r"NaN or inf \(first bad row 7"):
                fit_kmeans(y, 3, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        fit_kmeans(x, 3, backend="faiss")
    with pytest.raises(ValueError, match="init centroids have shape"):
        fit_kmeans(x, 3, backend="triton", init=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="2-D"):
        fit_kmeans(x[:, 0], 3)
    if not concepts._cuml_available():
        with pytest.raises(RuntimeError, match="cuML"):
            fit_kmeans(x, 3, backend="cuml")


def test_auto_backend_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU resolution only")
    assert concepts.resolve_backend("auto") == "sklearn"


# ------------------------------------------------------------------------------------------------ classifier

def _planted_embeddings(n=3000, k=16, d=384, seed=0, spread=1.0):
    x, truth, centers = planted(n=n, k=k, d=d, seed=seed, spread=spread)
    x = x + 5.0  # an offset and large scale, like raw LLM hidden states
    return x, truth


def test_classifier_learns_and_is_frozen():
    x, truth = _planted_embeddings()
    clf, rep = train_concept_classifier(x, truth, 16, epochs=5, seed=0, device="cpu")
    assert isinstance(clf, torch.nn.Linear) and clf.weight.shape == (16, 384)
    assert not clf.training
    assert all(not p.requires_grad for p in clf.parameters())
    assert rep["n_val"] == 300 and rep["n_train"] == 2700
    assert rep["val_acc"] >= 0.95 and rep["train_acc"] >= 0.95
    # the standardisation is folded in: the layer applies to raw embeddings
    acc = (clf(torch.from_numpy(x)).argmax(1).numpy() == truth).mean()
    assert acc >= 0.95


def test_classifier_deterministic_and_seed_sensitive():
    x, truth = _planted_embeddings(n=800, k=8, d=64, seed=1)
    a, ra = train_concept_classifier(x, truth, 8, epochs=2, seed=3, device="cpu")
    b, rb = train_concept_classifier(torch.from_numpy(x), torch.from_numpy(truth), 8, epochs=2, seed=3, device="cpu")
    c, _ = train_concept_classifier(x, truth, 8, epochs=2, seed=4, device="cpu")
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert ra["val_acc"] == rb["val_acc"]
    assert not torch.equal(a.weight, c.weight)


def test_classifier_soft_labels():
    x, truth = _planted_embeddings(n=800, k=8, d=64, seed=2)
    cent = np.stack([x[truth == j].mean(0) for j in range(8)])
    clf, rep = train_concept_classifier(x, truth, 8, epochs=4, seed=0, soft_labels=True, centroids=cent,
                                        temperature=5.0, device="cpu")
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


# ------------------------------------------------------------------------------------------------ bench

def test_bench_quick(tmp_path):
    from bench import bench_kmeans

    records = bench_kmeans.main(["--quick", "--results-dir", str(tmp_path)])
    impls = {r["impl"] for r in records}
    assert {"kclip-triton", "sklearn"} <= impls
    assert (tmp_path / "kmeans.jsonl").stat().st_size > 0
    assert list(tmp_path.glob("kmeans*.png"))


# ------------------------------------------------------------------------------------------------ GPU

@pytest.mark.cuda
def test_gpu_triton_bf16_streaming_matches_resident(monkeypatch):
    x, truth, _ = planted(n=200_003, k=64, d=256, seed=0, spread=3.0)
    xt = torch.from_numpy(x).to("cuda", torch.bfloat16)
    resident = fit_kmeans(xt, 64, backend="triton", seed=0, max_iter=30)
    monkeypatch.setattr(concepts, "GPU_RESIDENT_FRACTION", 0.0)  # force chunked host -> GPU streaming
    streamed = fit_kmeans(xt.cpu(), 64, backend="triton", seed=0, max_iter=30, chunk_size=50_000)
    assert normalized_mutual_info_score(truth, resident.labels.numpy()) >= 0.95
    assert torch.equal(resident.labels, streamed.labels) or \
        abs(resident.inertia - streamed.inertia) <= 1e-3 * resident.inertia
