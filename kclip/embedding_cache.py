"""The teacher embedding cache on disk: its format, its identity, how a shard is written, and the reader.

Layout of a cache folder::

    shard_00000.npy     (n_0, d') float16, plain .npy (np.load(mmap_mode="r") reads it as a memory map)
    shard_00000.json    sidecar: sha256 and byte size of the .npy, sha256 of the shard's captions, shape,
                        the teacher config it was computed with
    ...
    uids.json           optional: the caller's ids, in caption order
    manifest.json       written last, once every shard exists: its presence means "complete"

Shard ``i`` holds captions ``[i * shard_size, (i + 1) * shard_size)``; only the last shard may be shorter.
Every file is written atomically (``kclip.atomic``: temp file in the same folder, fsync, ``os.replace``, fsync
of the folder), a shard's sidecar after its data, and the manifest after every sidecar, so an interrupted
writer leaves finished shards, never a half-written one.

Identity. A cache is what its manifest says it is: the teacher config (``teacher``, ``revision``,
``precision``, ``pooling``, ``max_length``, ``prompt``, ``dim``; see :func:`teacher_fields`), the layout
(``shard_size``, ``dtype``) and the data (``count``, ``captions_sha256``, ``uids_sha256``). A caller pins any
of these ``EXPECT_FIELDS`` with ``expect`` (:func:`open_cache`, :func:`expected_fields`); every difference is
a :class:`CacheMismatchError` naming each field. Sidecars carry the same teacher config per shard, so a
folder of shards without a manifest still says whose it is.

Writing. :func:`write_shard` (fp16 conversion, overflow check, sha256, atomic data + sidecar) and
:func:`finalize_manifest` (collect the sidecars, write the manifest) are the format's writers; the teacher
pipeline (``kclip.cache_builder.build_cache``) and :func:`write_cache` (embeddings computed elsewhere:
tests, benchmarks, imports) both use them.

Reading. :func:`open_cache` checks the manifest and every shard's size (and, on request, its sha256) and
returns an :class:`EmbeddingCache`: memory-mapped shards, ``get(indices)`` gathers rows in the cache's own
float16 (or float32 on request) with one vectorised gather per shard touched. The memory maps are dropped
when the cache is pickled and reopened on first use, so each DataLoader worker maps the files itself instead
of receiving a copy of them.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kclip.atomic import atomic_write_bytes, atomic_write_json
from kclip.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
UIDS = "uids.json"
DTYPE = "float16"
# Fields a caller may pin with ``expect`` (open_cache / build_cache).
EXPECT_FIELDS = ("teacher", "revision", "precision", "pooling", "max_length", "prompt", "dim", "count",
                 "shard_size", "captions_sha256", "dtype", "uids_sha256")
# The teacher's part of the identity (what ``teacher_fields`` returns).
TEACHER_FIELDS = ("teacher", "revision", "precision", "pooling", "max_length", "prompt", "dim")
# What ``EmbeddingCache.get`` can return.
READ_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))


class CacheMismatchError(UserError, ValueError):
    """The cache on disk was built with another teacher config or other captions than the ones asked for."""


class CacheCorruptError(UserError, RuntimeError):
    """The cache on disk is incomplete or damaged (missing manifest or shard, wrong size or checksum)."""


# ----------------------------------------------------------------------------------------------------------
# Hashes and names
# ----------------------------------------------------------------------------------------------------------

def captions_sha256(captions: Sequence[str]) -> str:
    """sha256 over the captions in order (each length-prefixed, UTF-8), so order and boundaries count."""
    h = hashlib.sha256()
    for c in captions:
        b = c.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def uids_sha256(uids: Sequence[Any]) -> str:
    """sha256 of the uids as strings, in order (as ``captions_sha256``)."""
    return captions_sha256([str(u) for u in uids])


def shard_path(out_dir: str | os.PathLike, i: int) -> Path:
    return Path(out_dir) / f"shard_{i:05d}.npy"


def sidecar_path(out_dir: str | os.PathLike, i: int) -> Path:
    return Path(out_dir) / f"shard_{i:05d}.json"


def shard_bounds(i: int, shard_size: int, count: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of shard ``i``."""
    return i * shard_size, min((i + 1) * shard_size, count)


def sha256_file(path: Path, chunk: int = 1 << 23) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``; None if the file is missing or not valid JSON (a half-finished cache)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_json(path, obj, indent=1, sort_keys=True)


# ----------------------------------------------------------------------------------------------------------
# Manifest and identity
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
        _write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, out_dir: Path | str) -> "Manifest":
        path = Path(out_dir) / MANIFEST
        d = read_json(path)
        if d is None:
            raise CacheCorruptError(f"{path} is missing or not valid JSON")
        return cls.from_dict(d)

    def fields(self) -> dict:
        """The comparable fields (those ``expect`` may name)."""
        return {k: getattr(self, k) for k in EXPECT_FIELDS}


def teacher_fields(teacher) -> dict:
    """The teacher's part of a cache's identity (``TEACHER_FIELDS`` from ``teacher.describe()``)."""
    d = teacher.describe()
    return {k: d[k] for k in TEACHER_FIELDS}


def expected_fields(teacher, captions: Sequence[str] | None = None) -> dict:
    """An ``expect`` dict for ``open_cache``: the teacher config (+ the captions' hash and count if given)."""
    d = teacher_fields(teacher)
    d["dtype"] = DTYPE
    if captions is not None:
        d["captions_sha256"] = captions_sha256(captions)
        d["count"] = len(captions)
    return d


def diff_fields(ours: dict, cached: dict) -> list[tuple[str, Any, Any]]:
    """(field, ours, cached) for every ``EXPECT_FIELDS`` entry of ``ours`` that ``cached`` does not match."""
    unknown = sorted(set(ours) - set(EXPECT_FIELDS))
    if unknown:
        raise ValueError(f"expect has unknown fields {unknown}; known: {list(EXPECT_FIELDS)}")
    return [(k, ours[k], cached.get(k)) for k in EXPECT_FIELDS if k in ours and ours[k] != cached.get(k)]


def mismatch_message(out_dir: Path, diffs: list[tuple[str, Any, Any]], what: str = "the cache") -> str:
    lines = [f"{what} in {out_dir} was built for a different teacher config or data; differing fields "
             f"(ours vs cached):"]
    for k, ours, cached in diffs:
        lines.append(f"  {k}: {ours!r} vs {cached!r}")
    lines.append(f"Either delete {out_dir} to rebuild it for this config, or point the teacher/data config "
                 f"(or cache dir) at the one this cache was built with.")
    return "\n".join(lines)


def _kclip_version() -> str:
    try:
        from kclip import __version__
        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


# ----------------------------------------------------------------------------------------------------------
# Writing: shards and the manifest
# ----------------------------------------------------------------------------------------------------------

def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def write_shard(out_dir: Path, i: int, emb, meta: dict) -> dict:
    """Convert one shard to fp16, write it and then its sidecar, both atomically. Returns the sidecar.

    Args:
        out_dir: the cache folder (exists).
        i: shard index.
        emb: the shard's embeddings, a float32 CPU tensor or array.
        meta: sidecar fields: ``index``, ``start``, ``count``, ``captions_sha256`` and ``config`` (the teacher
            config + ``shard_size``, ``dtype``, ``format_version``).

    Shapes:
        emb (n_i, d')

    Raises:
        FloatingPointError: a non-finite row, or one that overflows float16 (nothing is written).
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
    atomic_write_bytes(shard_path(out_dir, i), data)
    _write_json(sidecar_path(out_dir, i), sidecar)
    return sidecar


def check_shard(out_dir: Path, i: int, config: dict, shard_caps_sha: str, count: int, dim: int,
                verify_checksum: bool = True) -> dict | None:
    """The sidecar of a finished, intact shard; None if it must be (re)computed.

    Raises:
        CacheMismatchError: the shard was computed for another teacher config or other captions.
    """
    side = read_json(sidecar_path(out_dir, i))
    npy = shard_path(out_dir, i)
    if side is None or not npy.is_file():
        return None
    cfg = side.get("config", {})
    diffs = [(k, config[k], cfg.get(k)) for k in config if config[k] != cfg.get(k)]
    if side.get("captions_sha256") != shard_caps_sha:
        diffs.append((f"captions of shard {i} (sha256)", shard_caps_sha, side.get("captions_sha256")))
    if diffs:
        raise CacheMismatchError(mismatch_message(out_dir, diffs, what=f"shard {i}"))
    if side.get("shape") != [count, dim] or npy.stat().st_size != side.get("bytes"):
        log.warning("shard %d in %s has the wrong size; recomputing it", i, out_dir)
        return None
    if verify_checksum and sha256_file(npy) != side.get("sha256"):
        log.warning("shard %d in %s fails its sha256 check; recomputing it", i, out_dir)
        return None
    return side


def shard_config(teacher_config: dict, shard_size: int) -> dict:
    """The config every sidecar records: the teacher's identity + the layout."""
    return {**{k: teacher_config[k] for k in TEACHER_FIELDS}, "shard_size": shard_size, "dtype": DTYPE,
            "format_version": FORMAT_VERSION}


def data_fields(config: dict, captions: Sequence[str], uids: Sequence[Any] | None) -> dict:
    """The comparable identity (``EXPECT_FIELDS``) of a cache of ``captions`` under ``config``."""
    return {**{k: config[k] for k in EXPECT_FIELDS if k in config}, "count": len(captions),
            "captions_sha256": captions_sha256(captions), "uids_sha256": uids_sha256(uids) if uids is not None else None}


def new_manifest(config: dict, ours: dict, num_shards: int, shards: list[dict], complete: bool,
                 teacher_describe: dict) -> Manifest:
    return Manifest(
        **{k: config[k] for k in TEACHER_FIELDS}, count=ours["count"], shard_size=config["shard_size"],
        num_shards=num_shards, shards=shards, captions_sha256=ours["captions_sha256"],
        uids_sha256=ours["uids_sha256"], kclip_version=_kclip_version(), teacher_describe=teacher_describe,
        complete=complete, created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def finalize_manifest(out_dir: Path, config: dict, ours: dict, num_shards: int, shard_caps: list[str],
                      uids: Sequence[Any] | None, teacher_describe: dict, coordinated: bool) -> Manifest:
    """Collect every shard's sidecar (sizes checked; checksums were checked when each shard was written or
    verified) and write ``uids.json`` and ``manifest.json``.

    Args:
        out_dir: the cache folder.
        config: ``shard_config(...)``; ours: ``data_fields(...)``.
        num_shards, shard_caps: the shard count and each shard's captions hash.
        uids: the caller's ids (or None).
        teacher_describe: the teacher's full description, stored for provenance.
        coordinated: every writer has finished (a barrier was passed): a missing shard is an error, not
            another writer still running.

    Returns:
        The Manifest; ``complete=False`` (and nothing written) while shards are missing and not ``coordinated``.
        An unchanged manifest on disk is kept as it is (with its ``created`` time).

    Raises:
        CacheCorruptError: shards missing although ``coordinated``.
    """
    n = ours["count"]
    shards, missing = [], []
    for i in range(num_shards):
        s, e = shard_bounds(i, config["shard_size"], n)
        side = check_shard(out_dir, i, config, shard_caps[i], e - s, config["dim"], verify_checksum=False)
        if side is None:
            missing.append(i)
            continue
        shards.append({"file": shard_path(out_dir, i).name, "count": e - s, "bytes": side["bytes"],
                       "sha256": side["sha256"], "captions_sha256": side["captions_sha256"]})
    if missing:
        msg = f"cache {out_dir}: {len(missing)} of {num_shards} shards missing (first: {missing[:5]})"
        if coordinated:
            raise CacheCorruptError(msg + " after all ranks finished; a rank failed: rerun build_cache on all ranks")
        log.warning("%s; other ranks still running? Run build_cache on rank 0 again when they finish.", msg)
        return new_manifest(config, ours, num_shards, shards, complete=False, teacher_describe=teacher_describe)
    manifest = new_manifest(config, ours, num_shards, shards, complete=True, teacher_describe=teacher_describe)
    if (out_dir / MANIFEST).exists():
        old = Manifest.load(out_dir)
        if old.shards == manifest.shards and old.fields() == manifest.fields():
            return old  # nothing changed: keep the file (and its created time)
    if uids is not None:
        _write_json(out_dir / UIDS, {"uids": [str(u) for u in uids]})
    manifest.save(out_dir)
    return manifest


def write_cache(out_dir: str | os.PathLike, embeddings, captions: Sequence[str], teacher_config: dict,
                shard_size: int = 4096, uids: Sequence[Any] | None = None) -> Manifest:
    """Write a complete cache of embeddings computed elsewhere, in the same format ``build_cache`` writes.

    For tests, benchmarks, and embeddings imported from another tool: the teacher pipeline is
    ``kclip.cache_builder.build_cache``. ``out_dir`` must not hold a cache or shards already (delete it first):
    this writer does not resume.

    Args:
        out_dir: the cache folder (created).
        embeddings: (N, d') rows in caption order; a float array, tensor, or anything ``x[a:b]`` reads rows
            of (read one shard at a time, so an ``np.memmap`` is never loaded whole).
        captions: the N captions the rows belong to (hashed into the identity).
        teacher_config: the teacher's identity, ``TEACHER_FIELDS`` (``teacher``, ``revision``, ``precision``,
            ``pooling``, ``max_length``, ``prompt``, ``dim``); stored as ``teacher_describe`` too.
        shard_size: rows per shard.
        uids: optional ids in caption order.

    Shapes:
        embeddings (N, d') with d' == teacher_config["dim"]

    Raises:
        ValueError: no captions, a row count or dim that does not match, missing teacher fields, a
            non-empty ``out_dir``.
        FloatingPointError: a row that is not finite in float16.
    """
    out_dir = Path(out_dir)
    captions = list(captions)
    n = len(captions)
    missing = [k for k in TEACHER_FIELDS if k not in teacher_config]
    if missing:
        raise ValueError(f"write_cache: teacher_config lacks {missing}; it needs {list(TEACHER_FIELDS)}")
    if n == 0 or shard_size < 1:
        raise ValueError(f"write_cache: need at least one caption and shard_size >= 1 (got {n}, {shard_size})")
    shape = tuple(embeddings.shape)
    if shape != (n, teacher_config["dim"]):
        raise ValueError(f"write_cache: embeddings have shape {shape}, expected (len(captions), dim) = "
                         f"({n}, {teacher_config['dim']})")
    if uids is not None and len(uids) != n:
        raise ValueError(f"write_cache: {len(uids)} uids for {n} captions; pass one uid per caption or none")
    if out_dir.is_dir() and ((out_dir / MANIFEST).exists() or any(out_dir.glob("shard_*"))):
        raise ValueError(f"write_cache: {out_dir} already holds a cache or shards; delete it first")
    out_dir.mkdir(parents=True, exist_ok=True)

    config = shard_config(teacher_config, shard_size)
    ours = data_fields(config, captions, uids)
    num_shards = -(-n // shard_size)
    shard_caps = []
    for i in range(num_shards):
        s, e = shard_bounds(i, shard_size, n)
        shard_caps.append(captions_sha256(captions[s:e]))
        rows = embeddings[s:e]
        rows = rows.detach().float().cpu().numpy() if hasattr(rows, "detach") else rows  # a torch tensor
        write_shard(out_dir, i, rows, {"index": i, "start": s, "count": e - s, "captions_sha256": shard_caps[i],
                                       "config": config})
    return finalize_manifest(out_dir, config, ours, num_shards, shard_caps, uids, dict(teacher_config),
                             coordinated=True)


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------

class EmbeddingCache:
    """Read side of a finished cache: memory-mapped fp16 shards, rows gathered per batch.

    Pickling keeps the folder and the manifest and drops the memory maps; they are reopened (and their shapes
    checked again) on first use in the receiving process, e.g. in each DataLoader worker.

    Attributes:
        out_dir: the cache folder.
        manifest: the Manifest.
        memmaps: one read-only ``np.memmap`` per shard, (n_i, d') float16 (opened on first access).
    """

    def __init__(self, out_dir: str | os.PathLike, manifest: Manifest):
        self.out_dir = Path(out_dir)
        self.manifest = manifest
        self._memmaps: list[np.memmap] | None = None
        self._uids = None
        self.memmaps  # open (and check) now: a bad shard fails at open_cache, not in a loader worker

    @property
    def memmaps(self) -> list[np.memmap]:
        if self._memmaps is None:
            maps = [np.load(self.out_dir / s["file"], mmap_mode="r", allow_pickle=False) for s in self.manifest.shards]
            for s, mm in zip(self.manifest.shards, maps):
                if mm.shape != (s["count"], self.manifest.dim) or mm.dtype != np.float16:
                    raise CacheCorruptError(f"{self.out_dir / s['file']}: shape {mm.shape} {mm.dtype}, manifest "
                                            f"says ({s['count']}, {self.manifest.dim}) float16; delete the cache "
                                            f"and rebuild")
            self._memmaps = maps
        return self._memmaps

    def __getstate__(self) -> dict:
        # A pickled np.memmap carries its whole content: drop the maps, each process maps the files itself.
        return {**self.__dict__, "_memmaps": None}

    def __len__(self) -> int:
        return self.manifest.count

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def uids(self) -> list[str] | None:
        if self._uids is None and (self.out_dir / UIDS).exists():
            self._uids = (read_json(self.out_dir / UIDS) or {}).get("uids")
        return self._uids

    def _check_indices(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)  # (k,)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            bad = idx[(idx < -n) | (idx >= n)][0]
            raise IndexError(f"index {int(bad)} out of range for a cache of {n} embeddings")
        return np.where(idx < 0, idx + n, idx)

    def get(self, indices, dtype=np.float16) -> np.ndarray:
        """Rows ``indices`` (ints, negatives from the end) in ``dtype``: one gather per shard touched.

        float16 (the default) is the cache's own dtype: rows are copied once, from the memory map into the
        result, with no float32 round trip. float32 converts while copying.

        Args:
            indices: row numbers (any order, repeats allowed).
            dtype: ``np.float16`` or ``np.float32``.

        Shapes:
            indices (k,) -> (k, d')

        Raises:
            IndexError: an index outside [-N, N).
        """
        dtype = np.dtype(dtype)
        if dtype not in READ_DTYPES:
            raise ValueError(f"EmbeddingCache.get: dtype must be float16 or float32, got {dtype}")
        idx = self._check_indices(indices)  # (k,) in [0, N)
        out = np.empty((idx.size, self.dim), dtype=dtype)  # (k, d')
        if idx.size == 0:
            return out
        size = self.manifest.shard_size
        shard = idx // size  # (k,) every shard but the last is full
        local = idx - shard * size  # (k,)
        maps = self.memmaps
        if (shard == shard[0]).all():
            self._gather(maps[int(shard[0])], local, out)  # one shard: straight into the result
            return out
        order = np.argsort(shard, kind="stable")  # (k,)
        bounds = np.flatnonzero(np.diff(shard[order])) + 1
        contiguous = bool((order == np.arange(idx.size)).all())  # already grouped by shard: write slices
        for pos in np.split(order, bounds):
            s = int(shard[pos[0]])
            if contiguous:
                self._gather(maps[s], local[pos], out[pos[0]:pos[-1] + 1])
            else:
                out[pos] = np.take(maps[s], local[pos], axis=0, mode="clip")
        return out

    @staticmethod
    def _gather(mm: np.memmap, local: np.ndarray, out: np.ndarray) -> None:
        if out.dtype == mm.dtype:  # mode="clip" (indices are checked) lets np.take write into out unbuffered
            np.take(mm, local, axis=0, out=out, mode="clip")
        else:
            out[...] = np.take(mm, local, axis=0, mode="clip")

    def __getitem__(self, key):
        """``cache[i]`` (d',), ``cache[a:b]`` / ``cache[index_array]`` (k, d'), in float16 as ``get``."""
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
            if sha256_file(self.out_dir / s["file"]) != s["sha256"]:
                raise CacheCorruptError(f"{self.out_dir / s['file']} fails its sha256 check; rerun build_cache "
                                        f"(it recomputes corrupt shards) or delete the cache")

    def __repr__(self) -> str:
        return (f"EmbeddingCache({str(self.out_dir)!r}, count={len(self)}, dim={self.dim}, "
                f"shards={self.manifest.num_shards}, teacher={self.manifest.teacher!r})")


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
        diffs = diff_fields(dict(expect), m.fields())
        if diffs:
            raise CacheMismatchError(mismatch_message(out_dir, diffs))
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


__all__ = ["Manifest", "EmbeddingCache", "CacheMismatchError", "CacheCorruptError", "open_cache", "cache_is_complete",
           "write_cache", "write_shard", "finalize_manifest", "captions_sha256", "expected_fields", "teacher_fields",
           "EXPECT_FIELDS", "TEACHER_FIELDS"]
