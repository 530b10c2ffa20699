"""Pairs on disk -> a verified, indexed list of (uid, image, caption) -> a training dataset.

Sources:
- CSV/TSV (``.csv`` comma, ``.tsv``/``.tab`` tab): configurable image and caption columns, image paths
  relative to the file, an optional uid column (else ``<file stem>:<row>``).
- webdataset tar shards (``shards/train-{000..009}.tar``, brace-expanded): members grouped by key as
  webdataset does (``<key>.jpg|jpeg|png|webp`` + ``<key>.txt``), uid ``<shard stem>:<key>``. Shards are
  indexed once (member offsets), then read by random access, which gives exact resume and global shuffling.

Every sample is checked once (caption non-empty, image present and decodable) and the verified index is
saved beside the run, keyed by the source files' size and mtime, so later stages and restarts reuse it.
With ``on_bad_sample: error`` the first bad sample raises :class:`BadSampleError` naming the file and row;
with ``skip`` bad samples are left out, counted by reason and reported, never silently.
"""
from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from kclip.atomic import atomic_write_text
from kclip.errors import MissingFileError, UserError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
INDEX_VERSION = 1


class BadSampleError(UserError, ValueError):
    """A sample (row or shard member) cannot be used; the message names the file, row and what to do."""


@dataclass
class Pair:
    uid: str
    caption: str
    image: str                 # a file path, or the tar shard path for webdataset samples
    member_offset: int = -1    # webdataset: byte offset of the image inside the shard
    member_size: int = -1
    where: str = ""            # "file:row" or "shard:key", for error messages


@dataclass
class PairIndex:
    pairs: list[Pair]
    skipped: dict = field(default_factory=dict)     # reason -> count
    skipped_examples: list = field(default_factory=list)  # a few "where: reason" lines
    sources: list = field(default_factory=list)

    @property
    def captions(self) -> list[str]:
        return [p.caption for p in self.pairs]

    def report(self) -> str:
        if not self.skipped:
            return f"{len(self.pairs)} pairs, none skipped"
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items()))
        return f"{len(self.pairs)} pairs; skipped {sum(self.skipped.values())} bad samples ({reasons})"


class _BadSamples:
    """Collects bad samples under the configured policy."""

    def __init__(self, policy: str):
        self.policy = policy
        self.counts: Counter = Counter()
        self.examples: list[str] = []

    def bad(self, where: str, reason: str, detail: str) -> None:
        if self.policy == "error":
            raise BadSampleError(f"{where}: {detail}. Fix or remove it, or set data.on_bad_sample=skip "
                                 "to skip bad samples (they are counted and reported).")
        self.counts[reason] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{where}: {detail}")


def expand_shards(pattern: str) -> list[Path]:
    import braceexpand

    paths = [Path(p) for part in pattern.split("::") for p in braceexpand.braceexpand(part)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise MissingFileError(f"webdataset shard(s) not found: {', '.join(missing[:5])}"
                                f"{' ...' if len(missing) > 5 else ''} (from data pattern {pattern!r})")
    return paths


def _delimiter(path: Path) -> str:
    return "\t" if path.suffix.lower() in (".tsv", ".tab") else ","


def read_table(path: Path, image_column: str, caption_column: str, uid_column: str, bad: _BadSamples) -> list[Pair]:
    """Rows of a CSV/TSV pairs file as users save them; image paths resolved relative to the file.

    Read as UTF-8 with an optional byte-order mark (spreadsheets write one on "CSV UTF-8" export) and any
    line ends (LF, CRLF; the csv module handles them with ``newline=""``); header names are stripped of
    surrounding spaces. A configured column that is missing is an error listing the columns found.
    """
    if not path.is_file():
        raise MissingFileError(f"pairs file {path} does not exist (config key data.train / data.val): give the path "
                               "of a CSV/TSV file of image,caption rows, absolute or relative to the working directory")
    pairs = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=_delimiter(path))
            if reader.fieldnames is None:
                raise BadSampleError(f"{path}: the file is empty; it needs a header row naming the image and "
                                     f"caption columns (data.image_column, data.caption_column)")
            reader.fieldnames = [(c or "").strip() for c in reader.fieldnames]
            _check_columns(path, reader.fieldnames, image_column, caption_column, uid_column)
            for row_number, row in enumerate(reader, start=2):  # row 1 is the header
                where = f"{path}:{row_number}"
                caption = (row.get(caption_column) or "").strip()
                image = (row.get(image_column) or "").strip()
                uid = (row.get(uid_column) or "").strip() if uid_column else f"{path.stem}:{row_number}"
                if not caption:
                    bad.bad(where, "empty caption", f"empty caption in column {caption_column!r}")
                    continue
                if not image:
                    bad.bad(where, "missing image", f"empty image path in column {image_column!r}")
                    continue
                image_path = Path(image) if Path(image).is_absolute() else path.parent / image
                pairs.append(Pair(uid=uid, caption=caption, image=str(image_path), where=where))
    except UnicodeDecodeError as exc:
        raise BadSampleError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the file as "
                             "UTF-8 (spreadsheets: \"CSV UTF-8\") and run again") from None
    return pairs


def _check_columns(path: Path, columns: list[str], image_column: str, caption_column: str, uid_column: str) -> None:
    """Every configured column must be in the header; the error lists the columns found and close matches."""
    import difflib

    for key, col in (("data.image_column", image_column), ("data.caption_column", caption_column),
                     ("data.uid_column", uid_column)):
        if col and col not in columns:
            close = difflib.get_close_matches(col, columns, n=1, cutoff=0.5) or \
                [c for c in columns if c.lower() == col.lower()]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise BadSampleError(f"{path}: no column {col!r} (config key {key}); the file has columns "
                                 f"{columns}{hint}. Set {key}=<one of them>.")


def read_shard(path: Path, bad: _BadSamples) -> list[Pair]:
    """Index one webdataset tar shard: group members by key, record the image member's offset."""
    groups: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                if "." not in base or base.startswith("."):
                    continue
                stem, ext = base.split(".", 1)
                key = os.path.join(os.path.dirname(member.name), stem)
                g = groups.setdefault(key, {})
                ext = ext.lower()
                if ext in IMAGE_EXTENSIONS:
                    g["image"] = (member.offset_data, member.size)
                elif ext == "txt":
                    g["txt"] = tar.extractfile(member).read().decode("utf-8", errors="replace").strip()
    except tarfile.TarError as exc:
        raise BadSampleError(f"{path}: not a readable tar shard ({exc}); re-create or remove it") from None
    pairs = []
    for key, g in groups.items():
        where = f"{path}:{key}"
        if "image" not in g:
            bad.bad(where, "missing image", f"sample {key!r} has no image member ({'/'.join(IMAGE_EXTENSIONS)})")
            continue
        if not g.get("txt"):
            bad.bad(where, "empty caption", f"sample {key!r} has no or an empty .txt caption")
            continue
        offset, size = g["image"]
        pairs.append(Pair(uid=f"{path.stem}:{key}", caption=g["txt"], image=str(path), member_offset=offset,
                          member_size=size, where=where))
    return pairs


def open_image(pair: Pair):
    """Decode a pair's image as RGB (from a file or a byte range of a tar shard)."""
    from PIL import Image

    if pair.member_offset >= 0:
        with open(pair.image, "rb") as f:
            f.seek(pair.member_offset)
            data = f.read(pair.member_size)
        img = Image.open(io.BytesIO(data))
    else:
        img = Image.open(pair.image)
    img.load()
    return img.convert("RGB")


def _check_image(pair: Pair) -> str | None:
    """None if the image decodes, else why not."""
    if pair.member_offset < 0 and not os.path.isfile(pair.image):
        return "missing image"
    try:
        open_image(pair)
    except Exception as exc:  # PIL raises many types for corrupt data
        return f"corrupt image ({type(exc).__name__}: {exc})"
    return None


def _fingerprint(files: list[Path]) -> list:
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def build_index(source: str, spec: str, image_column: str = "image", caption_column: str = "caption",
                uid_column: str = "", on_bad_sample: str = "error", cache_path: Path | None = None,
                num_threads: int = 8, progress: bool = True) -> PairIndex:
    """Read, verify and index a pairs source; reuse ``cache_path`` when the sources have not changed.

    Args:
        source: ``csv`` (CSV/TSV file; ``synthetic`` data is written as CSV) or ``wds`` (shard pattern).
        spec: the file path or the shard pattern.
    """
    from tqdm.auto import tqdm

    files = [Path(spec)] if source in ("csv", "synthetic") else expand_shards(spec)
    for f in files:
        if not f.is_file():
            raise MissingFileError(f"pairs file {f} does not exist (config key data.train / data.val): give the path "
                                   "of a CSV/TSV file of image,caption rows, absolute or relative to the working directory")
    settings = dict(version=INDEX_VERSION, source=source, image_column=image_column, caption_column=caption_column,
                    uid_column=uid_column, on_bad_sample=on_bad_sample, files=_fingerprint(files))
    if cache_path is not None and cache_path.is_file():
        cached = json.loads(cache_path.read_text())
        if cached.get("settings") == settings:
            return PairIndex(pairs=[Pair(**p) for p in cached["pairs"]], skipped=cached["skipped"],
                             skipped_examples=cached["skipped_examples"], sources=[str(f) for f in files])

    bad = _BadSamples(on_bad_sample)
    if source == "wds":
        pairs = [p for f in files for p in read_shard(f, bad)]
    else:
        pairs = read_table(files[0], image_column, caption_column, uid_column, bad)
    dupes = [u for u, n in Counter(p.uid for p in pairs).items() if n > 1]
    if dupes:
        raise BadSampleError(f"{spec}: uids must be unique; {len(dupes)} repeat (e.g. {dupes[0]!r}). "
                             "Fix the uid column or leave data.uid_column empty to use file:row uids.")
    good = []
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        checks = pool.map(_check_image, pairs)
        for pair, problem in tqdm(zip(pairs, checks), total=len(pairs), desc=f"verify {Path(spec).name}",
                                  disable=not progress, leave=False):
            if problem is None:
                good.append(pair)
            else:
                bad.bad(pair.where, problem.split(" (")[0], f"{problem}: {pair.image}")
    if not good:
        raise BadSampleError(f"{spec}: no usable pairs ({sum(bad.counts.values())} bad). See the examples: "
                             f"{bad.examples[:3]}")
    index = PairIndex(pairs=good, skipped=dict(bad.counts), skipped_examples=bad.examples,
                      sources=[str(f) for f in files])
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_path, json.dumps({"settings": settings, "pairs": [asdict(p) for p in good],
                                                  "skipped": index.skipped, "skipped_examples": index.skipped_examples}))
    return index


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of an epoch: a pure function of (seed, epoch), so resume replays it exactly."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def rank_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world_size: int) -> list[np.ndarray]:
    """This rank's micro-batches of an epoch: global batches of ``batch_size * world_size`` (last partial one
    dropped), rank ``r`` taking rows ``[r*B, (r+1)*B)`` of each, so the ranks' union is the global batch."""
    perm = epoch_permutation(n, seed, epoch)
    global_batch = batch_size * world_size
    n_batches = n // global_batch
    return [perm[i * global_batch + rank * batch_size: i * global_batch + (rank + 1) * batch_size]
            for i in range(n_batches)]


class DeviceNormalize:
    """The ``ToTensor`` + ``Normalize`` tail of an open_clip transform, run on the device over uint8 batches.

    Workers then ship 1 byte per pixel instead of 4 (4x less IPC and host-to-device traffic), and the
    arithmetic runs where the model is. In fp32 the result equals the torchvision transform exactly.
    """

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)    # (1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)      # (1, 3, 1, 1)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # copied once per device: a host-to-device copy in every step can make the host wait, and a captured
        # step (train.cuda_graph) cannot contain one
        if device not in self._on:
            self._on[device] = self.mean.to(device), self.std.to(device)
        return self._on[device]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_on": {}}  # loader workers get the host copies only

    def __call__(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        mean, std = self._stats(images.device)
        x = images.to(torch.float32).div_(255)                                   # (B, 3, H, W)
        x = x.sub_(mean).div_(std)
        return x.to(dtype)


def split_transform(preprocess):
    """(PIL-side transform, DeviceNormalize) for a transform ending in ToTensor + Normalize, else None."""
    from torchvision import transforms as T

    steps = list(getattr(preprocess, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-1], T.Normalize):
        return None
    if type(steps[-2]).__name__ not in ("ToTensor", "MaybeToTensor"):
        return None
    return T.Compose(steps[:-2]), DeviceNormalize(steps[-1].mean, steps[-1].std)


def _to_uint8_chw(img) -> torch.Tensor:
    """A PIL RGB image as a (3, H, W) uint8 tensor (what ToTensor reads, before its division by 255)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def collate_batch(batch):
    """collate_fn for a dataset whose ``__getitems__`` returns a finished batch (:class:`PairDataset`)."""
    if isinstance(batch, dict):
        return batch
    return torch.utils.data.default_collate(batch)


def pair_loader(dataset, batch_sampler, num_workers: int = 0, pin_memory: bool = False,
                persistent_workers: bool = False) -> torch.utils.data.DataLoader:
    """The DataLoader the trainer uses (and ``bench_loader`` measures): batches from ``__getitems__``,
    prefetching 4 batches per worker."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=num_workers, pin_memory=pin_memory,
        collate_fn=collate_batch, persistent_workers=persistent_workers and num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None)


class PairDataset(torch.utils.data.Dataset):
    """(image, tokens, teacher target, concept label) per sample index ``epoch * N + row``.

    The epoch travels in the index so that persistent workers need no per-epoch state: augmentation
    randomness is seeded per (seed, epoch, row), and a sample looks the same whether it is read in a
    worker or the main process, before or after a resume.

    With ``uint8_images`` (and a transform that ends in ToTensor + Normalize) images come out as (3, H, W)
    uint8 and ``self.normalize`` (a :class:`DeviceNormalize`) finishes them on the device.
    """

    def __init__(self, index: PairIndex, preprocess, tokenizer, teacher_embeddings=None, concept_labels=None,
                 seed: int = 0, uint8_images: bool = True):
        self.pairs = index.pairs
        split = split_transform(preprocess) if uint8_images else None
        self.preprocess, self.normalize = split if split is not None else (preprocess, None)
        self.tokenizer = tokenizer
        self.teacher = teacher_embeddings       # object with get(indices) -> (n, d') float32, or None
        self.labels = concept_labels            # (N,) int64 tensor, or None
        self.seed = seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitems__(self, indices) -> dict:
        """A whole batch at once (the DataLoader calls this with a batch sampler): images and tokens per pair,
        teacher targets in one gather (fp16), labels by indexing. Use :func:`collate_batch` as collate_fn.

        Shapes: -> image (B, 3, H, W) uint8 (or float), tokens (B, L), teacher (B, d') fp16, concept (B,), index (B,)
        """
        samples = [self._sample(int(i)) for i in indices]
        rows = [s[0] for s in samples]
        batch = {"image": torch.stack([s[1] for s in samples]),
                 "tokens": self.tokenizer([self.pairs[r].caption for r in rows]),
                 "index": torch.tensor(rows, dtype=torch.int64)}
        if self.teacher is not None:
            batch["teacher"] = torch.from_numpy(np.ascontiguousarray(self.teacher.batch(rows)))  # (B, d') fp16
        if self.labels is not None:
            batch["concept"] = self.labels[batch["index"]]
        return batch

    def _sample(self, i: int) -> tuple:
        """(row, image) of sample index ``epoch * N + row``, augmented with its (seed, epoch, row) seed."""
        epoch, i = divmod(int(i), len(self.pairs))
        pair = self.pairs[i]
        try:
            img = open_image(pair)
        except Exception as exc:
            raise BadSampleError(f"{pair.where}: image {pair.image} can no longer be read ({exc}); it passed the "
                                 "scan, so it changed since: delete the run's data_index/ and restart") from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, epoch, i)) & 0x7FFF_FFFF)
            image = self.preprocess(img)                                    # (3, H, W)
        if self.normalize is not None:
            image = _to_uint8_chw(image)                                    # (3, H, W) uint8
        return i, image

    def __getitem__(self, i: int) -> dict:
        """One sample (the batch path is :meth:`__getitems__`); same fields without the batch dimension."""
        i, image = self._sample(int(i))
        item = {"image": image, "tokens": self.tokenizer([self.pairs[i].caption])[0], "index": i}
        if self.teacher is not None:
            item["teacher"] = torch.from_numpy(np.ascontiguousarray(self.teacher.batch([i])[0]))  # (d',) fp16
        if self.labels is not None:
            item["concept"] = self.labels[i]
        return item
