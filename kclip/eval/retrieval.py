"""Image-text retrieval recall (R@K) and caption-to-caption retrieval.

Conventions (all metrics here):
- scores are dot products of the given embeddings (cosine when rows are normalised, as the
  evaluator makes them);
- ties count against the query (pessimistic): an item ties with the true one is ranked above it.
  A constant encoder therefore scores 0, not 100, and results never depend on sort stability;
- recalls are percentages in [0, 100].

i2t R@K: image i hits if *any* of its captions is among the K highest-scoring captions, i.e. fewer
than K captions of other images score >= its best caption. t2i R@K: caption t hits if fewer than K
other images score >= its own image. Caption retrieval: each caption of an image with >= 2 captions
queries all *other* captions; it hits at K if fewer than K captions of other images score >= its best
same-image caption (the query itself is excluded).

The score matrix is built in row chunks, so memory is O(chunk x N), not O(N x N).
"""
from __future__ import annotations

from typing import Sequence

import torch

_CHUNK = 1024


def _as_index(text_to_image, n_texts: int, n_images: int | None = None) -> torch.Tensor:
    t2i = torch.as_tensor(text_to_image, dtype=torch.long).flatten()  # (Nt,)
    if t2i.numel() != n_texts:
        raise ValueError(f"text_to_image has {t2i.numel()} entries but there are {n_texts} texts")
    if n_images is not None and n_texts and (t2i.min() < 0 or t2i.max() >= n_images):
        raise ValueError(f"text_to_image must index images 0..{n_images - 1}; got range "
                         f"[{int(t2i.min())}, {int(t2i.max())}]")
    return t2i


def retrieval_ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image) -> tuple:
    """Per query, how many wrong items score at or above the right one (0 = a hit at R@1; ties count against).

    Shapes:
        image_emb (Ni, D), text_emb (Nt, D), text_to_image (Nt,) int -> (i2t_rank (Ni,), t2i_rank (Nt,),
        has_text (Ni,) bool); an image with no caption has no i2t rank (its entry is meaningless).
    """
    image_emb = image_emb.float()  # (Ni, D)
    text_emb = text_emb.float()  # (Nt, D)
    ni, nt = image_emb.shape[0], text_emb.shape[0]
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"image_emb dim {image_emb.shape[1]} != text_emb dim {text_emb.shape[1]}")
    t2i = _as_index(text_to_image, nt, ni)  # (Nt,)
    has_text = torch.zeros(ni, dtype=torch.bool)
    has_text[t2i] = True

    # i2t: for each image, rank of its best caption among captions of other images
    i2t_rank = torch.empty(ni, dtype=torch.long)
    for s in range(0, ni, _CHUNK):
        sim = image_emb[s:s + _CHUNK] @ text_emb.T  # (c, Nt)
        own = t2i[None, :] == torch.arange(s, s + sim.shape[0])[:, None]  # (c, Nt)
        best_pos = sim.masked_fill(~own, float("-inf")).amax(dim=1, keepdim=True)  # (c, 1)
        i2t_rank[s:s + sim.shape[0]] = ((sim >= best_pos) & ~own).sum(dim=1)
    # t2i: for each caption, rank of its image among the other images
    t2i_rank = torch.empty(nt, dtype=torch.long)
    for s in range(0, nt, _CHUNK):
        sim = text_emb[s:s + _CHUNK] @ image_emb.T  # (c, Ni)
        idx = t2i[s:s + sim.shape[0]]  # (c,)
        pos = sim.gather(1, idx[:, None])  # (c, 1)
        t2i_rank[s:s + sim.shape[0]] = (sim >= pos).sum(dim=1) - 1  # minus the true image itself
    return i2t_rank, t2i_rank, has_text


def recall_from_ranks(i2t_rank: torch.Tensor, t2i_rank: torch.Tensor, has_text: torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10)) -> dict:
    """The recalls of :func:`retrieval_recall` from the ranks of :func:`retrieval_ranks`."""
    nt = t2i_rank.numel()
    out: dict = {}
    valid = i2t_rank[has_text]
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * (valid < k).float().mean().item() if valid.numel() else float("nan")
    for k in ks:
        out[f"t2i_r{k}"] = 100.0 * (t2i_rank < k).float().mean().item() if nt else float("nan")
    out["n_images"] = int(has_text.sum())
    out["n_texts"] = nt
    if int((~has_text).sum()):
        out["n_images_without_text"] = int((~has_text).sum())
    return out


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@K for image->text and text->image retrieval, in percent.

    Args:
        image_emb: image embeddings.
        text_emb: caption embeddings (same D).
        text_to_image: for each caption, the index of its image.
        ks: the K values.

    Shapes:
        image_emb (Ni, D), text_emb (Nt, D), text_to_image (Nt,) int.

    Returns:
        {"i2t_r1": ..., "i2t_r5": ..., "t2i_r1": ..., ..., "n_images": Ni, "n_texts": Nt}. Images with
        no caption are skipped for i2t (and counted in ``n_images_without_text``).
    """
    return recall_from_ranks(*retrieval_ranks(image_emb, text_emb, text_to_image), ks)


def caption_retrieval(text_emb: torch.Tensor, text_to_image, ks: Sequence[int] = (1, 5)) -> dict:
    """Caption-to-caption retrieval: is another caption of the same image the nearest neighbour?

    Args:
        text_emb: caption embeddings (normalise them for cosine).
        text_to_image: for each caption, its image id (any integers; only equality matters).
        ks: the K values.

    Shapes:
        text_emb (Nt, D), text_to_image (Nt,).

    Returns:
        {"r1": ..., "r5": ..., "n_queries": q} in percent, over the captions whose image has at least
        two captions (the others cannot be answered and are not counted).
    """
    text_emb = text_emb.float()  # (Nt, D)
    nt = text_emb.shape[0]
    t2i = _as_index(text_to_image, nt)  # (Nt,)
    ranks = []
    for s in range(0, nt, _CHUNK):
        sim = text_emb[s:s + _CHUNK] @ text_emb.T  # (c, Nt)
        rows = torch.arange(s, s + sim.shape[0])
        is_self = rows[:, None] == torch.arange(nt)[None, :]  # (c, Nt)
        same = (t2i[rows][:, None] == t2i[None, :]) & ~is_self  # (c, Nt)
        answerable = same.any(dim=1)  # (c,)
        best_pos = sim.masked_fill(~same, float("-inf")).amax(dim=1, keepdim=True)  # (c, 1)
        rank = ((sim >= best_pos) & ~same & ~is_self).sum(dim=1)  # (c,)
        ranks.append(rank[answerable])
    rank = torch.cat(ranks) if ranks else torch.empty(0, dtype=torch.long)
    out = {f"r{k}": (100.0 * (rank < k).float().mean().item() if rank.numel() else float("nan")) for k in ks}
    out["n_queries"] = int(rank.numel())
    return out
