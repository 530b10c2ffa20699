"""The encoder protocol the evaluations consume, and the batching loops around it.

Every evaluation takes an object with ``encode_images`` and/or ``encode_texts`` (the lead's
``kclip.model`` wraps CLIP students and the teacher this way). The evaluator, not the encoder, owns
batching: :func:`encode_images` and :func:`encode_texts` loop over ``batch_size`` chunks, load images
lazily (paths are opened one batch at a time, so a CUB-sized set never sits in memory as pixels) and
check what comes back.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence, Union, runtime_checkable

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # PIL is only needed when images are actually opened
    from PIL import Image

ImageLike = Union["Image.Image", str, Path]


@runtime_checkable
class Encoders(Protocol):
    """A CLIP-like model: both methods return (B, D) float32 CPU tensors, rows L2-normalised."""

    name: str

    def encode_images(self, images: list) -> torch.Tensor: ...

    def encode_texts(self, texts: list[str]) -> torch.Tensor: ...


@runtime_checkable
class TextEncoder(Protocol):
    """Anything that embeds captions (the teacher, or a CLIP text tower): (B, D) float tensor."""

    def encode_texts(self, texts: list[str]) -> torch.Tensor: ...


def encoder_name(encoder, default: str = "model") -> str:
    return str(getattr(encoder, "name", default))


def _check(out, n: int, what: str, encoder) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{encoder_name(encoder)}.{what} returned {type(out).__name__}; it must return a torch.Tensor")
    if out.dim() != 2 or out.shape[0] != n:
        raise ValueError(f"{encoder_name(encoder)}.{what} returned shape {tuple(out.shape)} for a batch of {n}; "
                         f"it must return (batch, dim)")
    out = out.detach().float().cpu().clone()  # a plain tensor even if the encoder ran in inference_mode
    if not torch.isfinite(out).all():
        raise ValueError(f"{encoder_name(encoder)}.{what} returned NaN/inf embeddings; check the model's weights/precision")
    return out


def load_image(item: ImageLike):
    """A PIL RGB image from a path, a ``kclip.data.Pair`` (a file or a webdataset shard member), or an
    already-open image."""
    from PIL import Image

    if isinstance(item, (str, Path)):
        with Image.open(item) as im:
            return im.convert("RGB")
    if hasattr(item, "member_offset"):  # a kclip.data.Pair: eval reads shard members by byte range
        from kclip.data import open_image
        return open_image(item)
    return item


@torch.no_grad()
def encode_images(encoder, images: Sequence[ImageLike], batch_size: int = 256, normalize: bool = True) -> torch.Tensor:
    """Embed ``images`` (PIL images or paths) in batches of ``batch_size``.

    Shapes:
        returns (N, D) float32 on the CPU; rows re-normalised when ``normalize`` (idempotent for
        encoders that already normalise, and it keeps cosine scores honest for those that don't).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size}; it must be >= 1")
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = [load_image(x) for x in images[start:start + batch_size]]
        chunks.append(_check(encoder.encode_images(batch), len(batch), "encode_images", encoder))  # (b, D)
    if not chunks:
        raise ValueError("encode_images got no images")
    out = torch.cat(chunks)  # (N, D)
    return F.normalize(out, dim=-1) if normalize else out


@torch.no_grad()
def encode_texts(encoder, texts: Sequence[str], batch_size: int = 256, normalize: bool = True) -> torch.Tensor:
    """Embed ``texts`` in batches of ``batch_size``; (N, D) float32 CPU, rows normalised when ``normalize``."""
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size}; it must be >= 1")
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start:start + batch_size])
        chunks.append(_check(encoder.encode_texts(batch), len(batch), "encode_texts", encoder))  # (b, D)
    if not chunks:
        raise ValueError("encode_texts got no texts")
    out = torch.cat(chunks)  # (N, D)
    return F.normalize(out, dim=-1) if normalize else out
