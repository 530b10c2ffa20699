"""k-means (kclip.kmeans): the Triton Lloyd loop against scikit-learn, determinism, the input path, errors."""
import numpy as np
import pytest
import torch

from conftest import planted, spy_launches
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score

import kclip.kmeans as kmeans
from kclip.kernels.dispatch import use_triton
from kclip.kmeans import fit_kmeans


CPU_BACKENDS = ["triton", "sklearn"]


@pytest.fixture
def triton_calls(monkeypatch):
    """Launches of the Triton assignment kernel (the Triton path, not the reference, ran)."""
    return spy_launches(monkeypatch, "kclip.kernels.kmeans_assign", "_kmeans_assign_triton")


@pytest.fixture
def update_calls(monkeypatch):
    """Launches of the Triton centroid update (the deterministic kernel ran)."""
    return spy_launches(monkeypatch, "kclip.kernels.kmeans_update", "_kmeans_update_triton")


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
    # the same Lloyd iterations as scikit-learn from the same init: same labels, centroids up to fp32 sums
    assert np.array_equal(ours.labels.numpy(), sk.labels_) and ours.n_iter == sk.n_iter_
    np.testing.assert_allclose(ours.centroids.numpy(), sk.cluster_centers_, atol=1e-4)
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
    assert np.array_equal(ours.labels.numpy(), sk.labels_)  # the same re-seeding as scikit-learn


def test_triton_deterministic_over_cache_targets(tmp_path, triton_calls, update_calls):
    """The pipeline's input (TeacherTargets over a real fp16 cache, read in chunks) and a tensor of the same
    fp16 values give the same clustering; reruns are bitwise equal."""
    from kclip.embedding_cache import open_cache, write_cache
    from kclip.targets import TeacherTargets

    x, truth, _ = planted(n=503, k=4, d=11, seed=6)
    captions = [f"caption {i}" for i in range(len(x))]
    teacher = {"teacher": "planted", "revision": None, "precision": "fp32", "pooling": "mean", "max_length": 8,
               "prompt": None, "dim": 11}
    write_cache(tmp_path / "cache", x, captions, teacher, shard_size=128)
    targets = TeacherTargets(open_cache(tmp_path / "cache"), "none")  # (503, 11) float32 rows, 4 shards
    a = fit_kmeans(targets, 4, backend="triton", seed=3, chunk_size=97)  # several chunks, last one ragged
    b = fit_kmeans(targets, 4, backend="triton", seed=3, chunk_size=97)
    c = fit_kmeans(torch.from_numpy(x.astype(np.float16)), 4, backend="triton", seed=3)  # tensor, one chunk
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centroids, b.centroids)
    assert torch.equal(a.labels, c.labels)
    torch.testing.assert_close(a.centroids, c.centroids, atol=1e-4, rtol=1e-5)
    assert normalized_mutual_info_score(truth, a.labels.numpy()) >= 0.99
    assert len({s[0] for s in triton_calls}) >= 2  # chunked calls: 97 and the ragged tail
    assert update_calls, "the centroid update did not run the Triton kernel"


def test_numpy_and_tensor_inputs_agree(triton_calls):
    x, _, _ = planted(n=300, k=3, d=5, seed=7)
    a = fit_kmeans(x, 3, backend="triton", seed=0)
    b = fit_kmeans(torch.from_numpy(x).requires_grad_(), 3, backend="triton", seed=0)  # no graph is built
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centroids, b.centroids)
    assert not b.centroids.requires_grad


def test_kmeanspp_subsample_path(monkeypatch, triton_calls):
    monkeypatch.setattr(kmeans, "KMEANSPP_MAX_POINTS", 128)
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
    if not kmeans._cuml_available():
        with pytest.raises(RuntimeError, match="cuML"):
            fit_kmeans(x, 3, backend="cuml")


def test_auto_backend_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU resolution only")
    assert kmeans.resolve_backend("auto") == "sklearn"


# ------------------------------------------------------------------------------------------------ bench

def test_bench_quick(tmp_path):
    from bench import bench_kmeans

    records = bench_kmeans.main(["--quick", "--results-dir", str(tmp_path)])
    impls = {r["impl"] for r in records}
    assert {"kclip-triton", "sklearn", "kclip-update", "torch-index-add-update", "torch-onehot-update"} <= impls
    update = {r["impl"]: r for r in records if r.get("update_ms")}
    assert {"kclip-update", "torch-index-add-update", "torch-onehot-update"} <= set(update), records
    assert (tmp_path / "kmeans.jsonl").stat().st_size > 0
    assert list(tmp_path.glob("kmeans*.png"))
    # the fit's steady state apart from its set-up: the iterations' own times, and what the fit spent outside them
    for r in (r for r in records if r["impl"] == "kclip-triton" and "fit_s" in r):
        assert 0 < r["steady_ms_per_iter"] and 0 <= r["setup_s"] < r["fit_s"], r
        assert r["setup_s"] + r["first_iter_ms"] / 1e3 <= r["fit_s"]


def test_triton_fit_times_each_iteration():
    x, _, _ = planted(n=300, k=4, d=8, seed=1, spread=3.0)
    res = fit_kmeans(torch.from_numpy(x), 4, backend="triton", seed=0, max_iter=6, tol=0.0)
    assert len(res.iter_seconds) == res.n_iter and all(t > 0 for t in res.iter_seconds)
    assert fit_kmeans(x, 4, backend="sklearn", seed=0, max_iter=6).iter_seconds == ()


# ------------------------------------------------------------------------------------------------ GPU

@pytest.mark.cuda
def test_gpu_triton_bf16_streaming_matches_resident(monkeypatch):
    x, truth, _ = planted(n=200_003, k=64, d=256, seed=0, spread=3.0)
    xt = torch.from_numpy(x).to("cuda", torch.bfloat16)
    resident = fit_kmeans(xt, 64, backend="triton", seed=0, max_iter=30)
    monkeypatch.setattr(kmeans, "GPU_RESIDENT_FRACTION", 0.0)  # force chunked host -> GPU streaming
    streamed = fit_kmeans(xt.cpu(), 64, backend="triton", seed=0, max_iter=30, chunk_size=50_000)
    assert normalized_mutual_info_score(truth, resident.labels.numpy()) >= 0.95
    assert torch.equal(resident.labels, streamed.labels) or \
        abs(resident.inertia - streamed.inertia) <= 1e-3 * resident.inertia


@pytest.mark.cuda
def test_gpu_triton_bitwise_reproducible():
    x, _, _ = planted(n=100_003, k=32, d=384, seed=1, spread=2.0)
    xt = torch.from_numpy(x).to("cuda", torch.bfloat16)
    a = fit_kmeans(xt, 32, backend="triton", seed=0, max_iter=20, tol=0.0)
    b = fit_kmeans(xt, 32, backend="triton", seed=0, max_iter=20, tol=0.0)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centroids, b.centroids)


@pytest.mark.cuda
def test_gpu_fit_reads_the_tensor_in_place_and_checks_it_on_device():
    """A CUDA tensor is clustered where it lies: no second copy of it (the device ``cuda`` is not equal to the
    tensor's ``cuda:0``; comparing them once cost a full copy), and a bad row is still found and named."""
    x, _, _ = planted(n=200_003, k=16, d=256, seed=3, spread=2.0)
    xt = torch.from_numpy(x).to("cuda", torch.bfloat16)  # (N, D) 100 MiB
    fit_kmeans(xt, 16, backend="triton", seed=0, max_iter=2)  # warm: compile outside the measured fit
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fit_kmeans(xt, 16, backend="triton", seed=0, max_iter=5)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < xt.numel() * xt.element_size() / 2, f"the fit allocated {extra / 2**20:.0f} MiB: a copy of x?"
    xt[123_457, 7] = float("nan")
    with pytest.raises(ValueError, match="first bad row 123457"):
        fit_kmeans(xt, 16, backend="triton", seed=0, max_iter=2)


def test_triton_lloyd_loop_waits_for_the_device_once_per_iteration(triton_calls):
    from bench.harness import count_host_syncs
    x, _, _ = planted(n=300, d=8, k=4, seed=5)
    init, xt = x[:4].copy(), torch.from_numpy(x)
    res = fit_kmeans(xt, 4, backend="triton", init=init, max_iter=3, tol=0.0)
    got = count_host_syncs(lambda: fit_kmeans(xt, 4, backend="triton", init=init, max_iter=3, tol=0.0), "cpu",
                           rep=1, top=50)
    sites = {s["where"]: s["per_call"] for s in got["sites"]}
    assert not [w for w in sites if w.startswith("kclip/kernels/")], sites  # assign and update never wait themselves
    # the loop: one read per iteration, then the result's three (inertia, labels, centroids)
    assert sum(n for w, n in sites.items() if "(_lloyd_triton)" in w) == res.n_iter + 3, sites
