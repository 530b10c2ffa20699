"""The teacher embedding cache: sharded fp16 arrays + a manifest, built once, resumable, verified.

Layout of ``out_dir``::

    shard_00000.npy     (n_0, d') float16, plain .npy (np.load(mmap_mode="r") reads it as a memory map)
    shard_00000.json    sidecar: sha256 and byte size of the .npy, sha256 of the shard's captions, shape,
                        the teacher config it was computed with
    ...
    uids.json           optional: the caller's ids, in caption order
    manifest.json       written last, by rank 0, once every shard exists: its presence means "complete"

Shard ``i`` holds captions ``[i * shard_size, (i + 1) * shard_size)``; only the last shard may be shorter.

Resumability. Each shard is written atomically (temp file in the same folder, fsync, ``os.replace``) and its
sidecar after it, so a killed run leaves finished shards (file + sidecar), possibly one shard without a
sidecar, and stray temp files, never a half-written ``shard_*.npy``. A restart re-verifies every finished
shard of its rank (sha256 of the file against the sidecar, caption hash against the captions passed now,
teacher config against the teacher passed now) and recomputes only missing or corrupt shards. A shard
whose sidecar names another teacher config or other captions is *not* overwritten: that directory belongs
to another cache, and ``CacheMismatchError`` says so.

Overlap. While the model embeds shard ``i``, a thread tokenises shard ``i + 1`` (fast tokenizers release the
GIL) and a writer thread converts, hashes and writes shard ``i - 1``; at most two shards wait for the writer.

Multi-GPU (DeepSpeed launcher, torchrun): every rank calls ``build_cache(..., rank=r, world_size=W)`` and
embeds the shards with ``i % W == r``. If ``torch.distributed`` is initialised, all ranks meet at a barrier,
rank 0 checks that every shard's sidecar exists and writes ``manifest.json``, and a second barrier makes the
manifest visible to all before anyone returns. Without a process group (independent processes), rank 0
writes the manifest only if all shards are already there; otherwise it returns an incomplete Manifest
(``complete=False``) and a later ``build_cache`` call on rank 0 (which skips every finished shard) finishes
it. If a process group is initialised and ``world_size`` is left at 1, the group's rank and size are used.
Barriers use the process group's timeout (NCCL default 10-30 min): keep shards balanced (they are: shard
sizes are equal and shards are dealt round-robin).

Reading for training is a memory map: ``open_cache(dir).get(indices)`` gathers rows from the mapped shards
and returns float32; nothing is loaded whole unless ``as_array()`` is asked for.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
UIDS = "uids.json"
DTYPE = "float16"
# Fields a caller may pin with ``expect`` (open_cache / build_cache).
EXPECT_FIELDS = ("teacher", "revision", "precision", "pooling", "max_length", "prompt", "dim", "count",
                 "shard_size", "captions_sha256", "dtype", "uids_sha256")
_MAX_PENDING_WRITES = 2


class CacheMismatchError(ValueError):
    """The cache on disk was built with another teacher config or other captions than the ones asked for."""


class CacheCorruptError(RuntimeError):
    """The cache on disk is incomplete or damaged (missing manifest or shard, wrong size or checksum)."""


# ----------------------------------------------------------------------------------------------------------
# Hashes, names, atomic writes
# ----------------------------------------------------------------------------------------------------------

def captions_sha256(captions: Sequence[str]) -> str:
    """sha256 over the captions in order (each length-prefixed, UTF-8), so order and boundaries count."""
    h = hashlib.sha256()
    for c in captions:
        b = c.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _uids_sha256(uids: Sequence[Any]) -> str:
    return captions_sha256([str(u) for u in uids])


def shard_path(out_dir: Path, i: int) -> Path:
    return Path(out_dir) / f"shard_{i:05d}.npy"


def sidecar_path(out_dir: Path, i: int) -> Path:
    return Path(out_dir) / f"shard_{i:05d}.json"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then os.replace: readers see old or new, never half."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _atomic_write_json(path: Path, obj: dict) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def _sha256_file(path: Path, chunk: int = 1 << 23) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def _read_json(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Manifest:
    """What a cache holds and how it was made; ``manifest.json`` is its JSON form."""

    teacher: str
    revision: str | None
    precision: str
    pooling: str
    max_length: int
    prompt: str | None
    dim: int
    count: int
    shard_size: int
    num_shards: int
    shards: list[dict]  # per shard: file, count, bytes, sha256, captions_sha256
    captions_sha256: str
    uids_sha256: str | None = None
    kclip_version: str = ""
    dtype: str = DTYPE
    format_version: int = FORMAT_VERSION
    teacher_describe: dict = dataclasses.field(default_factory=dict)
    created: str = ""
    complete: bool = True  # False only for an in-memory manifest returned before all shards exist

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in d]
        if missing:
            raise CacheCorruptError(f"manifest lacks fields {missing}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, out_dir: Path | str) -> Path:
        path = Path(out_dir) / MANIFEST
        _atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, out_dir: Path | str) -> "Manifest":
        path = Path(out_dir) / MANIFEST
        d = _read_json(path)
        if d is None:
            raise CacheCorruptError(f"{path} is missing or not valid JSON")
        return cls.from_dict(d)

    def fields(self) -> dict:
        """The comparable fields (those ``expect`` may name)."""
        return {k: getattr(self, k) for k in EXPECT_FIELDS}


def teacher_fields(teacher) -> dict:
    """The teacher's part of a cache's identity."""
    d = teacher.describe()
    return {"teacher": d["teacher"], "revision": d["revision"], "precision": d["precision"],
            "pooling": d["pooling"], "max_length": d["max_length"], "prompt": d["prompt"], "dim": d["dim"]}


def expected_fields(teacher, captions: Sequence[str] | None = None) -> dict:
    """An ``expect`` dict for ``open_cache``: the teacher config (+ the captions' hash and count if given)."""
    d = teacher_fields(teacher)
    d["dtype"] = DTYPE
    if captions is not None:
        d["captions_sha256"] = captions_sha256(captions)
        d["count"] = len(captions)
    return d


def _diff(ours: dict, cached: dict) -> list[tuple[str, Any, Any]]:
    unknown = sorted(set(ours) - set(EXPECT_FIELDS))
    if unknown:
        raise ValueError(f"expect has unknown fields {unknown}; known: {list(EXPECT_FIELDS)}")
    return [(k, ours[k], cached.get(k)) for k in EXPECT_FIELDS if k in ours and ours[k] != cached.get(k)]


def _mismatch_message(out_dir: Path, diffs: list[tuple[str, Any, Any]], what: str = "the cache") -> str:
    lines = [f"{what} in {out_dir} was built for a different teacher config or data; differing fields "
             f"(ours vs cached):"]
    for k, ours, cached in diffs:
        lines.append(f"  {k}: {ours!r} vs {cached!r}")
    lines.append(f"Either delete {out_dir} to rebuild it for this config, or point the teacher/data config "
                 f"(or cache dir) at the one this cache was built with.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------------------

def _shard_bounds(i: int, shard_size: int, count: int) -> tuple[int, int]:
    return i * shard_size, min((i + 1) * shard_size, count)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _write_shard(out_dir: Path, i: int, emb, meta: dict) -> dict:
    """Convert one shard to fp16, write it and then its sidecar, both atomically. Returns the sidecar.

    Runs in the writer thread. ``emb`` is a (n_i, d') float32 CPU tensor or array.
    """
    with np.errstate(over="ignore"):  # overflow is checked just below, with a better message
        arr = np.ascontiguousarray(np.asarray(emb, dtype=np.float32).astype(np.float16))  # (n_i, d')
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0]) + meta["start"]
        raise FloatingPointError(
            f"shard {i}: the teacher produced a non-finite embedding (first at caption {bad}) or one that "
            f"overflows float16 (|x| > 65504); check the teacher's precision/pooling before caching")
    data = _npy_bytes(arr)
    sidecar = dict(meta, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), shape=list(arr.shape))
    _atomic_write_bytes(shard_path(out_dir, i), data)
    _atomic_write_json(sidecar_path(out_dir, i), sidecar)
    return sidecar


def _check_shard(out_dir: Path, i: int, config: dict, shard_caps_sha: str, count: int, dim: int,
                 verify_checksum: bool = True) -> dict | None:
    """The sidecar of a finished, intact shard; None if it must be (re)computed.

    Raises:
        CacheMismatchError: the shard was computed for another teacher config or other captions.
    """
    side = _read_json(sidecar_path(out_dir, i))
    npy = shard_path(out_dir, i)
    if side is None or not npy.is_file():
        return None
    cfg = side.get("config", {})
    diffs = [(k, config[k], cfg.get(k)) for k in config if config[k] != cfg.get(k)]
    if side.get("captions_sha256") != shard_caps_sha:
        diffs.append((f"captions of shard {i} (sha256)", shard_caps_sha, side.get("captions_sha256")))
    if diffs:
        raise CacheMismatchError(_mismatch_message(out_dir, diffs, what=f"shard {i}"))
    if side.get("shape") != [count, dim] or npy.stat().st_size != side.get("bytes"):
        log.warning("shard %d in %s has the wrong size; recomputing it", i, out_dir)
        return None
    if verify_checksum and _sha256_file(npy) != side.get("sha256"):
        log.warning("shard %d in %s fails its sha256 check; recomputing it", i, out_dir)
        return None
    return side


def _dist_info() -> tuple[bool, int, int]:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return True, dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover
        pass
    return False, 0, 1


def _barrier() -> None:
    import torch.distributed as dist
    dist.barrier()


def _kclip_version() -> str:
    try:
        from kclip import __version__
        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


def build_cache(teacher, captions: Sequence[str], out_dir: str | os.PathLike, shard_size: int = 4096,
                uids: Sequence[Any] | None = None, rank: int = 0, world_size: int = 1, progress: bool = True,
                expect: dict | None = None) -> Manifest:
    """Embed ``captions`` with ``teacher`` into a sharded fp16 cache at ``out_dir``; resumes where it stopped.

    Args:
        teacher: a ``kclip.teacher.Teacher`` (anything with ``describe``, ``tokenize(captions, offset)`` and
            ``encode_tokenized``).
        captions: all captions, in dataset order (every rank passes the full list).
        out_dir: the cache folder (created).
        shard_size: captions per shard.
        uids: optional ids in caption order, saved to ``uids.json`` and hashed into the manifest.
        rank, world_size: this process embeds shards ``i % world_size == rank``.
        progress: tqdm bar with captions/s, tokens/s and ETA.
        expect: fields the cache must have (see ``EXPECT_FIELDS``), checked before any work.

    Returns:
        The Manifest (``complete=False`` if rank 0 runs without a process group and other ranks' shards
        are still missing; nothing is written in that case).

    Raises:
        ValueError: no captions, an empty caption (index named), bad shard_size / rank.
        CacheMismatchError: ``out_dir`` holds a cache of another teacher config or other captions, or
            ``expect`` disagrees with the teacher/captions passed.
    """
    from kclip.teacher import check_captions

    captions = list(captions)
    n = len(captions)
    if n == 0:
        raise ValueError("build_cache: no captions (count 0); a cache needs at least one caption")
    if shard_size < 1:
        raise ValueError(f"build_cache: shard_size must be >= 1, got {shard_size}")
    is_dist, drank, dworld = _dist_info()
    if is_dist and world_size == 1 and dworld > 1:
        rank, world_size = drank, dworld
    # Barriers only when the process group spans exactly the ranks of this build (a one-rank group, or a
    # group of another size, cannot coordinate it: then rank 0 finalises once every shard exists).
    is_dist = is_dist and dworld > 1 and dworld == world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"build_cache: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if uids is not None and len(uids) != n:
        raise ValueError(f"build_cache: {len(uids)} uids for {n} captions; pass one uid per caption or none")
    check_captions(captions)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    config = teacher_fields(teacher)
    config["shard_size"] = shard_size
    config["dtype"] = DTYPE
    config["format_version"] = FORMAT_VERSION
    ours = {**{k: config[k] for k in EXPECT_FIELDS if k in config}, "count": n,
            "captions_sha256": captions_sha256(captions),
            "uids_sha256": _uids_sha256(uids) if uids is not None else None}
    if expect:
        diffs = _diff(dict(expect), ours)
        if diffs:
            raise CacheMismatchError(_mismatch_message(out_dir, diffs, what="expect vs the teacher/captions "
                                                                            "given to build_cache for the cache"))
    if (out_dir / MANIFEST).exists():
        cached = Manifest.load(out_dir)
        # uids are compared only when given (a rerun without uids may reuse a cache built with them).
        diffs = _diff({k: v for k, v in ours.items() if not (k == "uids_sha256" and v is None)}, cached.fields())
        if diffs:
            raise CacheMismatchError(_mismatch_message(out_dir, diffs))

    num_shards = -(-n // shard_size)
    shard_caps = [captions_sha256(captions[slice(*_shard_bounds(i, shard_size, n))]) for i in range(num_shards)]
    mine = [i for i in range(num_shards) if i % world_size == rank]
    todo = []
    for i in mine:
        s, e = _shard_bounds(i, shard_size, n)
        if _check_shard(out_dir, i, config, shard_caps[i], e - s, teacher.dim) is None:
            todo.append(i)
    if len(todo) < len(mine):
        log.info("cache %s: rank %d skips %d verified shard(s), computes %d", out_dir, rank,
                 len(mine) - len(todo), len(todo))
    if todo:
        _embed_shards(teacher, captions, out_dir, todo, shard_size, config, shard_caps, rank, progress)

    if is_dist:
        _barrier()
    manifest = None
    if rank == 0:
        manifest = _finalize(teacher, out_dir, config, ours, num_shards, shard_caps, n, uids, is_dist)
    if is_dist:
        _barrier()
    if manifest is None:
        manifest = (Manifest.load(out_dir) if (out_dir / MANIFEST).exists()
                    else _manifest_from(teacher, config, ours, num_shards, [], complete=False))
    return manifest


def _manifest_from(teacher, config: dict, ours: dict, num_shards: int, shards: list[dict],
                   complete: bool) -> Manifest:
    return Manifest(
        teacher=config["teacher"], revision=config["revision"], precision=config["precision"],
        pooling=config["pooling"], max_length=config["max_length"], prompt=config["prompt"], dim=config["dim"],
        count=ours["count"], shard_size=config["shard_size"], num_shards=num_shards, shards=shards,
        captions_sha256=ours["captions_sha256"], uids_sha256=ours["uids_sha256"], kclip_version=_kclip_version(),
        teacher_describe=teacher.describe(), complete=complete,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def _finalize(teacher, out_dir: Path, config: dict, ours: dict, num_shards: int, shard_caps: list[str], n: int,
              uids, coordinated: bool) -> Manifest:
    """Rank 0: collect every shard's sidecar (sizes checked; each rank verified its own sums) and write the manifest."""
    shards, missing = [], []
    for i in range(num_shards):
        s, e = _shard_bounds(i, config["shard_size"], n)
        side = _check_shard(out_dir, i, config, shard_caps[i], e - s, config["dim"], verify_checksum=False)
        if side is None:
            missing.append(i)
            continue
        shards.append({"file": shard_path(out_dir, i).name, "count": e - s, "bytes": side["bytes"],
                       "sha256": side["sha256"], "captions_sha256": side["captions_sha256"]})
    if missing:
        msg = (f"cache {out_dir}: {len(missing)} of {num_shards} shards missing (first: {missing[:5]})")
        if coordinated:
            raise CacheCorruptError(msg + " after all ranks finished; a rank failed: rerun build_cache on all ranks")
        log.warning("%s; other ranks still running? Run build_cache on rank 0 again when they finish.", msg)
        return _manifest_from(teacher, config, ours, num_shards, shards, complete=False)
    manifest = _manifest_from(teacher, config, ours, num_shards, shards, complete=True)
    if (out_dir / MANIFEST).exists():
        old = Manifest.load(out_dir)
        if old.shards == manifest.shards and old.fields() == manifest.fields():
            return old  # nothing changed: keep the file (and its created time)
    if uids is not None:
        _atomic_write_json(out_dir / UIDS, {"uids": [str(u) for u in uids]})
    manifest.save(out_dir)
    return manifest


def _embed_shards(teacher, captions: list[str], out_dir: Path, todo: list[int], shard_size: int, config: dict,
                  shard_caps: list[str], rank: int, progress: bool) -> None:
    """The pipeline: tokenise shard i+1 (thread) | embed shard i (this thread) | write shard i-1 (thread)."""
    n = len(captions)
    total = sum(min((i + 1) * shard_size, n) - i * shard_size for i in todo)

    def tokenize(i: int) -> list[list[int]]:
        s, e = _shard_bounds(i, shard_size, n)
        return teacher.tokenize(captions[s:e], offset=s)

    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="cap", desc=f"teach[r{rank}]", disable=not progress, position=rank,
                   dynamic_ncols=True, smoothing=0.1)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        bar = None
    tok_pool = ThreadPoolExecutor(1, thread_name_prefix="kclip-tokenize")
    write_pool = ThreadPoolExecutor(1, thread_name_prefix="kclip-write")
    pending: list[Future] = []
    ok = False
    try:
        t0 = time.perf_counter()
        tokens = 0
        next_tok = tok_pool.submit(tokenize, todo[0])
        for j, i in enumerate(todo):
            toks = next_tok.result()
            if j + 1 < len(todo):
                next_tok = tok_pool.submit(tokenize, todo[j + 1])
            emb = teacher.encode_tokenized(toks)  # (n_i, d') float32, CPU
            s, e = _shard_bounds(i, shard_size, n)
            meta = {"index": i, "start": s, "count": e - s, "captions_sha256": shard_caps[i], "config": config}
            pending.append(write_pool.submit(_write_shard, out_dir, i, emb, meta))
            while len(pending) > _MAX_PENDING_WRITES or (pending and pending[0].done()):
                pending.pop(0).result()  # bounded memory; surfaces writer errors early
            tokens += sum(len(t) for t in toks)
            if bar is not None:
                bar.update(len(toks))
                bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):,.0f}", shard=i)
        for f in pending:
            f.result()
        ok = True
    finally:
        tok_pool.shutdown(wait=True, cancel_futures=not ok)
        write_pool.shutdown(wait=True, cancel_futures=not ok)
        if bar is not None:
            bar.close()


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------

class EmbeddingCache:
    """Read side of a finished cache: memory-mapped fp16 shards, rows gathered as float32.

    Attributes:
        manifest: the Manifest.
        memmaps: one read-only ``np.memmap`` per shard, (n_i, d') float16.
    """

    def __init__(self, out_dir: str | os.PathLike, manifest: Manifest):
        self.out_dir = Path(out_dir)
        self.manifest = manifest
        self.memmaps = [np.load(self.out_dir / s["file"], mmap_mode="r", allow_pickle=False)
                        for s in manifest.shards]
        for s, mm in zip(manifest.shards, self.memmaps):
            if mm.shape != (s["count"], manifest.dim) or mm.dtype != np.float16:
                raise CacheCorruptError(f"{self.out_dir / s['file']}: shape {mm.shape} {mm.dtype}, manifest says "
                                        f"({s['count']}, {manifest.dim}) float16; delete the cache and rebuild")
        self._uids = None

    def __len__(self) -> int:
        return self.manifest.count

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def uids(self) -> list[str] | None:
        if self._uids is None and (self.out_dir / UIDS).exists():
            self._uids = (_read_json(self.out_dir / UIDS) or {}).get("uids")
        return self._uids

    def get(self, indices) -> np.ndarray:
        """Rows ``indices`` (ints, negatives from the end) as float32. Shapes: (k,) -> (k, d')."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)  # (k,)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            bad = idx[(idx < -n) | (idx >= n)][0]
            raise IndexError(f"index {int(bad)} out of range for a cache of {n} embeddings")
        idx = np.where(idx < 0, idx + n, idx)
        shard = idx // self.manifest.shard_size  # (k,) every shard but the last is full
        local = idx - shard * self.manifest.shard_size  # (k,)
        out = np.empty((idx.size, self.dim), dtype=np.float32)  # (k, d')
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.memmaps[int(s)][local[sel]]
        return out

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self.get([key])[0]
        if isinstance(key, slice):
            return self.get(np.arange(len(self))[key])
        return self.get(key)

    def as_array(self, dtype=np.float16) -> np.ndarray:
        """All embeddings (n, d'): the memory map itself for a single fp16 shard, else a concatenation in RAM."""
        if len(self.memmaps) == 1 and np.dtype(dtype) == np.float16:
            return self.memmaps[0]
        return np.concatenate([np.asarray(m, dtype=dtype) for m in self.memmaps], axis=0)

    def verify(self) -> None:
        """Full check: every shard's sha256 against the manifest. Raises CacheCorruptError."""
        for s in self.manifest.shards:
            if _sha256_file(self.out_dir / s["file"]) != s["sha256"]:
                raise CacheCorruptError(f"{self.out_dir / s['file']} fails its sha256 check; rerun build_cache "
                                        f"(it recomputes corrupt shards) or delete the cache")

    def __repr__(self) -> str:
        return (f"EmbeddingCache({str(self.out_dir)!r}, count={len(self)}, dim={self.dim}, "
                f"shards={len(self.memmaps)}, teacher={self.manifest.teacher!r})")


def open_cache(out_dir: str | os.PathLike, expect: dict | None = None,
               verify_checksums: bool = False) -> EmbeddingCache:
    """Open a finished cache for reading.

    Args:
        out_dir: the cache folder.
        expect: fields the cache must have (``EXPECT_FIELDS``; see ``expected_fields``).
        verify_checksums: also sha256 every shard (reads everything once); otherwise sizes and headers only.

    Raises:
        CacheCorruptError: no manifest (not built / not finished), a missing shard, wrong sizes, count 0.
        CacheMismatchError: ``expect`` differs from the manifest (the message names each field).
    """
    out_dir = Path(out_dir)
    if not (out_dir / MANIFEST).exists():
        have = len(list(out_dir.glob("shard_*.json"))) if out_dir.is_dir() else 0
        state = (f"it holds {have} finished shard(s) but no manifest: the build was interrupted; rerun "
                 f"build_cache / `kclip teach` to finish it" if have else "no cache was built there")
        raise CacheCorruptError(f"no {MANIFEST} in {out_dir}: {state}")
    m = Manifest.load(out_dir)
    if m.count <= 0 or m.num_shards <= 0:
        raise CacheCorruptError(f"{out_dir / MANIFEST}: count {m.count}, {m.num_shards} shards; an empty cache "
                                f"is not usable: delete it and build from a non-empty caption list")
    if len(m.shards) != m.num_shards or sum(s["count"] for s in m.shards) != m.count:
        raise CacheCorruptError(f"{out_dir / MANIFEST} is inconsistent (shards {len(m.shards)}/{m.num_shards}, "
                                f"rows {sum(s['count'] for s in m.shards)}/{m.count}); delete the cache and rebuild")
    for s in m.shards:
        p = out_dir / s["file"]
        if s["count"] <= 0:
            raise CacheCorruptError(f"{p}: a shard of 0 captions; delete the cache and rebuild")
        if not p.is_file() or p.stat().st_size != s["bytes"]:
            raise CacheCorruptError(f"{p} is missing or has the wrong size; rerun build_cache to recompute it")
    if expect:
        diffs = _diff(dict(expect), m.fields())
        if diffs:
            raise CacheMismatchError(_mismatch_message(out_dir, diffs))
    cache = EmbeddingCache(out_dir, m)
    if verify_checksums:
        cache.verify()
    return cache


def cache_is_complete(out_dir: str | os.PathLike) -> bool:
    """True if ``out_dir`` holds a finished cache (manifest + every shard at its size)."""
    try:
        open_cache(out_dir)
        return True
    except (CacheCorruptError, OSError, ValueError):
        return False


__all__ = ["Manifest", "EmbeddingCache", "CacheMismatchError", "CacheCorruptError", "build_cache", "open_cache",
           "cache_is_complete", "captions_sha256", "expected_fields", "teacher_fields", "EXPECT_FIELDS"]
