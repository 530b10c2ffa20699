"""kmeans_update: the Triton segment-sum kernel (interpreter on CPU) against the PyTorch reference."""
import pytest
import torch

from conftest import TOL, spy_launches

from kclip.kernels import kmeans_update, kmeans_update_reference
from kclip.kernels.dispatch import use_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def kernel_calls(monkeypatch):
    """Launches of the Triton path (the kernel, not the reference, ran)."""
    return spy_launches(monkeypatch, "kclip.kernels.kmeans_update", "_kmeans_update_triton")


def _data(n, d, k, dtype=torch.float32, seed=0, empty=()):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g) * 3 + 1).to(dtype)  # (N, D)
    labels = torch.randint(k, (n,), generator=g)  # (N,)
    for e in empty:  # clusters with no point
        labels[labels == e] = (e + 1) % k
    return x.to(DEVICE), labels.to(DEVICE)


@pytest.mark.parametrize("n,d,k", [(1, 1, 1), (7, 3, 5), (200, 13, 6), (301, 130, 9), (64, 257, 2)])
def test_fp32_matches_reference(n, d, k, kernel_calls):
    assert use_triton(torch.zeros(1, device=DEVICE)), "TRITON_INTERPRET must be set for CPU tests"
    x, labels = _data(n, d, k, seed=n + d + k, empty=(k - 1,) if k > 2 else ())
    sums, counts = kmeans_update(x, labels, k)
    assert kernel_calls == [(n, d)]
    assert sums.dtype == torch.float32 and sums.shape == (k, d) and counts.dtype == torch.int64
    ref_sums, ref_counts = kmeans_update_reference(x.double(), labels, k)
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(sums.double(), ref_sums, **TOL[torch.float32])
    if k > 2:
        assert counts[k - 1] == 0 and (sums[k - 1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_sum_in_fp32(dtype):
    x, labels = _data(300, 40, 7, dtype=dtype, seed=1)
    sums, counts = kmeans_update(x, labels, 7)
    ref, _ = kmeans_update_reference(x.double(), labels, 7)  # the same low-precision values, summed in fp64
    assert sums.dtype == torch.float32
    torch.testing.assert_close(sums.double(), ref, **TOL[torch.float32])


def test_strided_int32_labels_and_reproducible():
    x, labels = _data(150, 24, 4, seed=2)
    xt = x.t().contiguous().t()  # (N, D) column-major: strides (1, N)
    a = kmeans_update(xt, labels.int(), 4)
    b = kmeans_update(xt, labels.int(), 4)
    c = kmeans_update(x, labels, 4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])


def test_errors():
    x, labels = _data(10, 3, 4)
    with pytest.raises(ValueError, match=r"\[0, k=3\)"):
        kmeans_update(x, labels.clamp_max(3), 3)
    with pytest.raises(ValueError, match=r"\[0, k=4\), got -1"):
        kmeans_update(x, labels - 1, 4)
    with pytest.raises(ValueError, match="labels must be"):
        kmeans_update(x, labels[:-1], 4)
    with pytest.raises(TypeError, match="int64 or int32"):
        kmeans_update(x, labels.float(), 4)


def test_unchecked_labels_give_the_same_result_without_a_host_wait(kernel_calls):
    from bench.harness import count_host_syncs
    x, labels = _data(257, 19, 6, seed=3, empty=(2,))
    checked = kmeans_update(x, labels, 6)
    unchecked = kmeans_update(x, labels, 6, check_labels=False)
    assert kernel_calls == [(257, 19), (257, 19)]
    assert torch.equal(checked[0], unchecked[0]) and torch.equal(checked[1], unchecked[1])
    # the Lloyd loop's update (labels from kmeans_assign) never waits; a checked call reads both label ends once
    assert count_host_syncs(lambda: kmeans_update(x, labels, 6, check_labels=False), DEVICE)["per_call"] == 0
    assert count_host_syncs(lambda: kmeans_update(x, labels, 6), DEVICE)["per_call"] == 1
