"""Building the teacher embedding cache: embed every caption once, shard by shard, resumable, across ranks.

The format (files, identity, shard and manifest writers, the reader) is ``kclip.embedding_cache``; this module
runs the teacher over the captions and decides what still has to be computed.

Resumability. Shards are written atomically, data before sidecar, so a killed run leaves finished shards (file
+ sidecar), possibly one shard without a sidecar, and stray temp files, never a half-written ``shard_*.npy``.
A restart re-verifies every finished shard of its rank (sha256 of the file against the sidecar, caption hash
against the captions passed now, teacher config against the teacher passed now) and recomputes only missing or
corrupt shards. A shard whose sidecar names another teacher config or other captions is *not* overwritten: that
folder belongs to another cache, and ``CacheMismatchError`` says so.

Overlap. While the model embeds shard ``i``, a thread tokenises shard ``i + 1`` (fast tokenizers release the
GIL) and a writer thread converts, hashes and writes shard ``i - 1``; at most two shards wait for the writer.

Multi-GPU (DeepSpeed launcher, torchrun): every rank calls ``build_cache(..., rank=r, world_size=W)`` and embeds
the shards with ``i % W == r``; ``rank`` and ``world_size`` are used as given. When a ``torch.distributed``
process group of exactly ``W`` ranks is initialised (``kclip.distributed``), all ranks meet at a barrier, rank 0
checks that every shard's sidecar exists and writes ``manifest.json``, and a second barrier makes the manifest
visible to all before anyone returns. Without such a group (independent processes, or a group of another
size), rank 0 writes the manifest only if all shards are already there; otherwise it returns an incomplete
Manifest (``complete=False``) and a later ``build_cache`` call on rank 0 (which skips every finished shard)
finishes it. Barriers use the process group's timeout (NCCL default 10-30 min): keep shards balanced (they
are: shard sizes are equal and shards are dealt round-robin).
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from kclip.embedding_cache import (MANIFEST, CacheMismatchError, Manifest, captions_sha256, check_shard,
                                   data_fields, diff_fields, finalize_manifest, mismatch_message, new_manifest,
                                   shard_bounds, shard_config, teacher_fields, write_shard)

log = logging.getLogger(__name__)

_MAX_PENDING_WRITES = 2


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
        rank, world_size: this process embeds shards ``i % world_size == rank`` (used as given).
        progress: tqdm bar with captions/s, tokens/s and ETA.
        expect: fields the cache must have (see ``EXPECT_FIELDS``), checked before any work.

    Returns:
        The Manifest (``complete=False`` if rank 0 runs without a process group spanning the build and
        other ranks' shards are still missing; nothing is written in that case).

    Raises:
        ValueError: no captions, an empty caption (index named), bad shard_size / rank, or a ``rank`` that
            is not this process's rank in a process group of ``world_size`` ranks.
        CacheMismatchError: ``out_dir`` holds a cache of another teacher config or other captions, or
            ``expect`` disagrees with the teacher/captions passed.
    """
    from kclip.distributed import barrier, process_group
    from kclip.teacher import check_captions

    captions = list(captions)
    n = len(captions)
    if n == 0:
        raise ValueError("build_cache: no captions (count 0); a cache needs at least one caption")
    if shard_size < 1:
        raise ValueError(f"build_cache: shard_size must be >= 1, got {shard_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"build_cache: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    # Barriers only when the process group spans exactly the ranks of this build (a one-rank group, or a
    # group of another size, cannot coordinate it: then rank 0 finalises once every shard exists).
    group = process_group()
    coordinated = group is not None and group[1] > 1 and group[1] == world_size
    if coordinated and group[0] != rank:
        raise ValueError(f"build_cache: rank={rank}, but this process is rank {group[0]} of the process group of "
                         f"{world_size}; pass rank=torch.distributed.get_rank() (or the launcher's RANK)")
    if uids is not None and len(uids) != n:
        raise ValueError(f"build_cache: {len(uids)} uids for {n} captions; pass one uid per caption or none")
    check_captions(captions)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    config = shard_config(teacher_fields(teacher), shard_size)
    ours = data_fields(config, captions, uids)
    if expect:
        diffs = diff_fields(dict(expect), ours)
        if diffs:
            raise CacheMismatchError(mismatch_message(out_dir, diffs, what="expect vs the teacher/captions "
                                                                          "given to build_cache for the cache"))
    if (out_dir / MANIFEST).exists():
        cached = Manifest.load(out_dir)
        # uids are compared only when given (a rerun without uids may reuse a cache built with them).
        diffs = diff_fields({k: v for k, v in ours.items() if not (k == "uids_sha256" and v is None)},
                            cached.fields())
        if diffs:
            raise CacheMismatchError(mismatch_message(out_dir, diffs))

    num_shards = -(-n // shard_size)
    shard_caps = [captions_sha256(captions[slice(*shard_bounds(i, shard_size, n))]) for i in range(num_shards)]
    mine = [i for i in range(num_shards) if i % world_size == rank]
    todo = []
    for i in mine:
        s, e = shard_bounds(i, shard_size, n)
        if check_shard(out_dir, i, config, shard_caps[i], e - s, teacher.dim) is None:
            todo.append(i)
    if len(todo) < len(mine):
        log.info("cache %s: rank %d skips %d verified shard(s), computes %d", out_dir, rank,
                 len(mine) - len(todo), len(todo))
    if todo:
        _embed_shards(teacher, captions, out_dir, todo, shard_size, config, shard_caps, rank, progress)

    if coordinated:
        barrier()
    manifest = None
    if rank == 0:
        manifest = finalize_manifest(out_dir, config, ours, num_shards, shard_caps, uids, teacher.describe(),
                                     coordinated)
    if coordinated:
        barrier()
    if manifest is None:
        manifest = (Manifest.load(out_dir) if (out_dir / MANIFEST).exists()
                    else new_manifest(config, ours, num_shards, [], complete=False,
                                      teacher_describe=teacher.describe()))
    return manifest


def _embed_shards(teacher, captions: list[str], out_dir: Path, todo: list[int], shard_size: int, config: dict,
                  shard_caps: list[str], rank: int, progress: bool) -> None:
    """The pipeline: tokenise shard i+1 (thread) | embed shard i (this thread) | write shard i-1 (thread)."""
    n = len(captions)
    total = sum(min((i + 1) * shard_size, n) - i * shard_size for i in todo)

    def tokenize(i: int) -> list[list[int]]:
        s, e = shard_bounds(i, shard_size, n)
        return teacher.tokenize(captions[s:e], offset=s)

    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="cap", desc=f"teach[r{rank}]", disable=not progress, position=rank,
               dynamic_ncols=True, smoothing=0.1)
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
            s, e = shard_bounds(i, shard_size, n)
            meta = {"index": i, "start": s, "count": e - s, "captions_sha256": shard_caps[i], "config": config}
            pending.append(write_pool.submit(write_shard, out_dir, i, emb, meta))
            while len(pending) > _MAX_PENDING_WRITES or (pending and pending[0].done()):
                pending.pop(0).result()  # bounded memory; surfaces writer errors early
            tokens += sum(len(t) for t in toks)
            bar.update(len(toks))
            bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):,.0f}", shard=i)
        for f in pending:
            f.result()
        ok = True
    finally:
        tok_pool.shutdown(wait=True, cancel_futures=not ok)
        write_pool.shutdown(wait=True, cancel_futures=not ok)
        bar.close()


__all__ = ["build_cache"]
