"""kclip.cache: sharded fp16 cache, atomic resumable builds (SIGKILL mid-way), verification, mismatch refusal,
batched reads, pickling for loader workers, and the format's own writer."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from kclip.cache import (CacheCorruptError, CacheMismatchError, build_cache, cache_is_complete, captions_sha256,
                         expected_fields, open_cache, teacher_fields, write_cache)
from kclip.embedding_cache import write_shard
from kclip.teacher import load_teacher
from test_teacher import CORPUS, make_tiny_llama

REPO = Path(__file__).resolve().parents[1]
# 37 captions, shard_size 5 -> 8 shards, the last one holds 2.
CAPTIONS = [f"{CORPUS[i % len(CORPUS)]} {CORPUS[(3 * i + 1) % len(CORPUS)]}"[: 20 + 7 * (i % 9)] for i in range(37)]
SHARD = 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_llama(path)
    return path


@pytest.fixture(scope="module")
def teacher(tiny):
    return load_teacher(tiny, precision="fp32", device="cpu")


@pytest.fixture(scope="module")
def reference_cache(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref_cache")
    build_cache(teacher, CAPTIONS, out, shard_size=SHARD, progress=False)
    return out


def _shard_files(d: Path) -> list[Path]:
    return sorted(d.glob("shard_*.npy"))


def test_cache_contents_manifest_and_reading(teacher, reference_cache):
    m = json.loads((reference_cache / "manifest.json").read_text())
    assert m["count"] == 37 and m["num_shards"] == 8 and m["shard_size"] == SHARD and m["dtype"] == "float16"
    assert m["teacher"] == teacher.id and m["pooling"] == "mean" and m["precision"] == "fp32"
    assert m["max_length"] == 64 and m["prompt"] is None and m["dim"] == 64 and m["kclip_version"]
    assert m["captions_sha256"] == captions_sha256(CAPTIONS) and len(m["shards"]) == 8
    assert [s["count"] for s in m["shards"]] == [5] * 7 + [2]
    cache = open_cache(reference_cache, expect=expected_fields(teacher, CAPTIONS), verify_checksums=True)
    assert len(cache) == 37 and cache.dim == 64
    assert all(isinstance(mm, np.memmap) and mm.dtype == np.float16 for mm in cache.memmaps)
    want = teacher.encode(CAPTIONS).numpy().astype(np.float16).astype(np.float32)
    idx = [36, 0, 7, 5, 4, -1, 12]
    got = cache.get(idx, dtype=np.float32)
    assert got.dtype == np.float32 and got.shape == (7, 64)
    # Shards are embedded shard by shard (other batches): equal up to fp32 noise + fp16 rounding.
    np.testing.assert_allclose(got, want[idx], atol=2e-3, rtol=2e-3)
    full = cache.as_array()
    assert full.dtype == np.float16 and full.shape == (37, 64)
    np.testing.assert_array_equal(got, full[[36, 0, 7, 5, 4, 36, 12]].astype(np.float32))
    np.testing.assert_array_equal(cache[3], full[3])
    np.testing.assert_array_equal(cache[5:9], full[5:9])
    with pytest.raises(IndexError, match="37"):
        cache.get([37])
    with pytest.raises(ValueError, match="float16 or float32"):
        cache.get([0], dtype=np.float64)
    assert cache_is_complete(reference_cache)


@pytest.mark.parametrize("idx", [
    [3, 1, 4, 1],                          # one shard, any order, a repeat: one gather straight into the result
    list(range(2, 23)),                    # several shards, grouped in order: one gather per shard into slices
    [36, 0, 7, 5, 4, -1, 12, 12, 35, 20],  # several shards, scattered (negatives, repeats): gather + scatter
    [],
])
def test_get_batched_fp16_and_fp32(reference_cache, idx):
    cache = open_cache(reference_cache)
    full = cache.as_array()  # (37, 64) fp16, the ground truth
    rows = [i % 37 for i in idx]
    half = cache.get(idx)
    assert half.dtype == np.float16 and half.shape == (len(idx), 64) and half.flags.c_contiguous
    np.testing.assert_array_equal(half, full[rows])  # the stored bits, no float32 round trip
    single = cache.get(np.asarray(idx, dtype=np.int32), dtype=np.float32)
    assert single.dtype == np.float32
    np.testing.assert_array_equal(single, full[rows].astype(np.float32))


def test_pickle_drops_memory_maps_and_workers_reopen_them(reference_cache):
    cache = open_cache(reference_cache)
    blob = pickle.dumps(cache)
    assert b"numpy" not in blob, "the pickle carries arrays (the shards' contents)"
    copy = pickle.loads(blob)
    assert copy._memmaps is None  # reopened on first use
    np.testing.assert_array_equal(copy.get([5, 30]), cache.get([5, 30]))
    assert all(isinstance(mm, np.memmap) for mm in copy.memmaps)
    # A spawned DataLoader worker receives the cache by pickle and maps the shards itself.
    loader = torch.utils.data.DataLoader(cache, batch_size=8, num_workers=1, multiprocessing_context="spawn")
    got = torch.cat(list(loader))
    assert got.dtype == torch.float16
    np.testing.assert_array_equal(got.numpy(), cache.as_array())


def test_write_cache_is_the_same_format(teacher, reference_cache, tmp_path):
    """The format's own writer (embeddings computed elsewhere) writes the files build_cache writes."""
    ref = open_cache(reference_cache)
    out = tmp_path / "written"
    m = write_cache(out, ref.get(np.arange(37), dtype=np.float32), CAPTIONS, teacher_fields(teacher),
                    shard_size=SHARD)
    assert m.complete
    cache = open_cache(out, expect=expected_fields(teacher, CAPTIONS), verify_checksums=True)
    for a, b in zip(_shard_files(out), _shard_files(reference_cache)):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert cache.manifest.shards == ref.manifest.shards
    with pytest.raises(ValueError, match="already holds"):
        write_cache(out, ref.as_array(), CAPTIONS, teacher_fields(teacher), shard_size=SHARD)
    with pytest.raises(ValueError, match="shape"):
        write_cache(tmp_path / "w2", ref.as_array()[:5], CAPTIONS, teacher_fields(teacher))
    with pytest.raises(ValueError, match="lacks"):
        write_cache(tmp_path / "w3", ref.as_array(), CAPTIONS, {"teacher": "x"})


_CHILD = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    import kclip.cache as C
    import kclip.embedding_cache as F
    from kclip.teacher import load_teacher

    model, out, kill_at, shard_size, caps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    captions = json.loads(Path(caps).read_text())
    teacher = load_teacher(model, precision="fp32", device="cpu")
    encoded = []
    enc = teacher.encode_tokenized
    def counting(toks, **kw):
        encoded.append(len(toks))
        return enc(toks, **kw)
    teacher.encode_tokenized = counting
    atomic = F.atomic_write_bytes
    def dying(path, data):
        # SIGKILL half-way through writing shard `kill_at`: a partial temp file is all that is left of it.
        if kill_at >= 0 and Path(path).name == f"shard_{kill_at:05d}.npy":
            tmp = Path(path).parent / f".{Path(path).name}.tmp-{os.getpid()}-0"
            with open(tmp, "wb") as f:
                f.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return atomic(path, data)
    F.atomic_write_bytes = dying
    C.build_cache(teacher, captions, out, shard_size=shard_size, progress=True)
    print("ENCODED", json.dumps(encoded))
""")


def _run_child(tmp_path, model, out, kill_at):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    caps = tmp_path / "captions.json"
    caps.write_text(json.dumps(CAPTIONS))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(script), str(model), str(out), str(kill_at), str(SHARD), str(caps)],
                          capture_output=True, text=True, env=env, cwd=str(REPO), timeout=300)


def test_sigkill_midway_then_resume_is_identical(tiny, reference_cache, tmp_path):
    out = tmp_path / "cache"
    killed = _run_child(tmp_path, tiny, out, kill_at=4)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    finished = sorted(p.name for p in out.glob("shard_*.json"))
    assert finished == [f"shard_{i:05d}.json" for i in range(4)]  # shards 0-3 done, 4 died mid-write
    assert not (out / "shard_00004.npy").exists() and list(out.glob(".shard_00004.npy.tmp-*"))
    assert not (out / "manifest.json").exists() and not cache_is_complete(out)
    with pytest.raises(CacheCorruptError, match="4 finished shard.*interrupted"):
        open_cache(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in _shard_files(out)}

    resumed = _run_child(tmp_path, tiny, out, kill_at=-1)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    encoded = json.loads(resumed.stdout.split("ENCODED", 1)[1])
    assert encoded == [5, 5, 5, 2]  # only shards 4..7 were embedded again
    assert {p.name: p.stat().st_mtime_ns for p in _shard_files(out) if p.name in mtimes} == mtimes
    # Byte-equal to the uninterrupted build.
    ref = _shard_files(reference_cache)
    assert [p.name for p in _shard_files(out)] == [p.name for p in ref]
    for a, b in zip(_shard_files(out), ref):
        assert a.read_bytes() == b.read_bytes(), a.name
    m_out = json.loads((out / "manifest.json").read_text())
    m_ref = json.loads((reference_cache / "manifest.json").read_text())
    assert m_out["shards"] == m_ref["shards"] and m_out["captions_sha256"] == m_ref["captions_sha256"]
    open_cache(out, verify_checksums=True)


def test_corrupt_shard_recomputed_alone(teacher, reference_cache, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    build_cache(teacher, CAPTIONS, out, shard_size=SHARD, progress=False)
    # Flip one byte in shard 2's data (same size, so only the checksum can tell), delete shard 6's sidecar.
    p2 = out / "shard_00002.npy"
    data = bytearray(p2.read_bytes())
    data[-3] ^= 0xFF
    p2.write_bytes(bytes(data))
    (out / "shard_00006.json").unlink()
    with pytest.raises(CacheCorruptError, match="sha256"):
        open_cache(out, verify_checksums=True)
    calls = []
    real = teacher.encode_tokenized
    monkeypatch.setattr(teacher, "encode_tokenized", lambda toks, **kw: calls.append(len(toks)) or real(toks, **kw))
    build_cache(teacher, CAPTIONS, out, shard_size=SHARD, progress=False)
    assert calls == [5, 5]  # shards 2 and 6 only
    for a, b in zip(_shard_files(out), _shard_files(reference_cache)):
        assert a.read_bytes() == b.read_bytes(), a.name
    open_cache(out, verify_checksums=True)
    calls.clear()
    build_cache(teacher, CAPTIONS, out, shard_size=SHARD, progress=False)  # complete: nothing to do
    assert calls == []


def test_mismatch_refused_with_named_fields(tiny, teacher, reference_cache, tmp_path):
    last = load_teacher(tiny, precision="fp32", pooling="last", device="cpu")
    with pytest.raises(CacheMismatchError) as e:
        open_cache(reference_cache, expect=expected_fields(last, CAPTIONS))
    msg = str(e.value)
    assert "pooling: 'last' vs 'mean'" in msg and "delete" in msg and "teacher:" not in msg
    other_caps = CAPTIONS[:-1] + ["a different last caption"]
    with pytest.raises(CacheMismatchError) as e:
        open_cache(reference_cache, expect=expected_fields(teacher, other_caps))
    assert "captions_sha256" in str(e.value) and "count" not in str(e.value)
    with pytest.raises(CacheMismatchError, match=r"count: 36 vs 37"):
        open_cache(reference_cache, expect={"count": 36})
    # Another teacher (other weights in another folder) -> teacher id differs.
    other_dir = tmp_path / "other_llama"
    make_tiny_llama(other_dir, seed=1)
    other = load_teacher(other_dir, precision="fp32", device="cpu")
    with pytest.raises(CacheMismatchError, match=r"(?s)teacher: .*other_llama.* vs "):
        open_cache(reference_cache, expect=expected_fields(other))
    with pytest.raises(ValueError, match="unknown fields"):
        open_cache(reference_cache, expect={"pooler": "mean"})
    # build_cache refuses to overwrite a cache of another config, finished or partial.
    with pytest.raises(CacheMismatchError, match="pooling"):
        build_cache(last, CAPTIONS, reference_cache, shard_size=SHARD, progress=False)
    partial = tmp_path / "partial"
    build_cache(teacher, CAPTIONS, partial, shard_size=SHARD, progress=False)
    (partial / "manifest.json").unlink()
    with pytest.raises(CacheMismatchError, match="(?s)shard 0.*pooling"):
        build_cache(last, CAPTIONS, partial, shard_size=SHARD, progress=False)
    with pytest.raises(CacheMismatchError, match="prompt"):
        build_cache(teacher, CAPTIONS, tmp_path / "x", shard_size=SHARD, progress=False,
                    expect={"prompt": "A photo of {}"})


def test_ranks_split_shards_and_rank0_finalises(teacher, reference_cache, tmp_path):
    out = tmp_path / "cache"
    uids = [f"id{i}" for i in range(len(CAPTIONS))]
    m0 = build_cache(teacher, CAPTIONS, out, shard_size=SHARD, rank=0, world_size=3, progress=False, uids=uids)
    assert not m0.complete and not (out / "manifest.json").exists()  # ranks 1, 2 not done yet
    assert sorted(p.name for p in _shard_files(out)) == ["shard_00000.npy", "shard_00003.npy", "shard_00006.npy"]
    build_cache(teacher, CAPTIONS, out, shard_size=SHARD, rank=1, world_size=3, progress=False, uids=uids)
    build_cache(teacher, CAPTIONS, out, shard_size=SHARD, rank=2, world_size=3, progress=False, uids=uids)
    m = build_cache(teacher, CAPTIONS, out, shard_size=SHARD, rank=0, world_size=3, progress=False, uids=uids)
    assert m.complete and (out / "manifest.json").exists()
    cache = open_cache(out, verify_checksums=True)
    assert cache.uids == uids
    for a, b in zip(_shard_files(out), _shard_files(reference_cache)):
        assert a.read_bytes() == b.read_bytes(), a.name
    with pytest.raises(ValueError, match="rank"):
        build_cache(teacher, CAPTIONS, out, shard_size=SHARD, rank=3, world_size=3, progress=False)


def test_empty_inputs_are_clear_errors(teacher, tmp_path):
    with pytest.raises(ValueError, match="no captions"):
        build_cache(teacher, [], tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="shard_size"):
        build_cache(teacher, ["a dog"], tmp_path / "a", shard_size=0, progress=False)
    with pytest.raises(ValueError, match="caption 3 is empty"):
        build_cache(teacher, ["a dog", "a cat", "a bird", ""], tmp_path / "a", progress=False)
    with pytest.raises(CacheCorruptError, match="no cache was built"):
        open_cache(tmp_path / "nothing")
    # A manifest claiming count 0 / a 0-caption shard is refused.
    out = tmp_path / "b"
    build_cache(teacher, ["a dog", "a cat"], out, shard_size=1, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    m["shards"][1]["count"] = 0
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheCorruptError, match="inconsistent|0 captions"):
        open_cache(out)
    m.update(count=0, num_shards=0, shards=[])
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheCorruptError, match="count 0"):
        open_cache(out)
    assert not cache_is_complete(out)


def test_captions_sha256_is_order_and_boundary_sensitive():
    assert captions_sha256(["ab", "c"]) != captions_sha256(["a", "bc"])
    assert captions_sha256(["a", "b"]) != captions_sha256(["b", "a"])
    assert captions_sha256(["a", "b"]) == captions_sha256(("a", "b"))


def test_fp16_overflow_is_refused(tmp_path):
    with pytest.raises(FloatingPointError, match="caption 3"):
        write_shard(tmp_path, 0, torch.tensor([[1.0], [2.0], [3.0], [1e6]]), {"start": 0})
    assert not list(tmp_path.glob("shard_*"))
