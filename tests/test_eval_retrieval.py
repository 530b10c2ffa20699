"""Retrieval recall on hand-built embeddings whose answers are computed by hand."""
import pytest
import torch
import torch.nn.functional as F

from kclip.eval.retrieval import caption_retrieval, retrieval_recall


def _basis(idx, dim):
    return F.one_hot(torch.tensor(idx), dim).float()


def test_perfect_and_shifted_recall():
    # 3 images on the axes; 6 captions, two per image, identical to their image
    img = _basis([0, 1, 2], 3)  # (3, 3)
    t2i = [0, 0, 1, 1, 2, 2]
    txt = img[t2i]  # (6, 3)
    r = retrieval_recall(img, txt, t2i, ks=(1, 2))
    assert r["i2t_r1"] == 100.0 and r["t2i_r1"] == 100.0 and r["n_images"] == 3 and r["n_texts"] == 6
    # every caption points at the next image: all R@1 fail; with 3 images t2i R@2 succeeds iff the true
    # image is second: caption of image j = e_{j+1}; image j scores 0 like image j+2 -> tie -> pessimistic rank 2
    wrong = img[[(j + 1) % 3 for j in t2i]]
    r = retrieval_recall(img, wrong, t2i, ks=(1, 2, 3))
    assert r["i2t_r1"] == 0.0 and r["t2i_r1"] == 0.0
    assert r["t2i_r2"] == 0.0 and r["t2i_r3"] == 100.0
    # i2t: image j's own captions score 0, the two captions of image j-1 score 1, two others tie at 0 -> rank 4
    assert r["i2t_r3"] == 0.0


def test_partial_recall_exact_values():
    # 4 images, 1 caption each; captions 0 and 1 are right, caption 2 is nearest image 3, caption 3 nearest image 2
    img = _basis([0, 1, 2, 3], 4)
    txt = torch.stack([
        torch.tensor([1.0, 0, 0, 0]),
        torch.tensor([0, 1.0, 0, 0]),
        torch.tensor([0, 0, 0.6, 0.8]),  # own image second
        torch.tensor([0, 0, 0.8, 0.6]),  # own image second
    ])
    r = retrieval_recall(img, txt, [0, 1, 2, 3], ks=(1, 2))
    assert r["t2i_r1"] == pytest.approx(50.0) and r["t2i_r2"] == pytest.approx(100.0)
    # image 2: captions scores [0,0,0.6,0.8] -> own (0.6) second; image 3: [0,0,0.8,0.6] -> own second
    assert r["i2t_r1"] == pytest.approx(50.0) and r["i2t_r2"] == pytest.approx(100.0)


def test_any_caption_counts_for_i2t():
    img = _basis([0, 1], 2)
    # image 0 has two captions: one bad, one perfect -> i2t hit; t2i for the bad caption misses
    txt = torch.stack([torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])])
    r = retrieval_recall(img, txt, [0, 0, 1], ks=(1,))
    assert r["i2t_r1"] == pytest.approx(50.0)  # image 1 ties its caption with image 0's bad caption -> pessimistic miss
    assert r["t2i_r1"] == pytest.approx(200 / 3)  # the bad caption of image 0 points at image 1; the others hit


def test_constant_embeddings_score_zero_not_hundred():
    img = torch.ones(5, 4)
    txt = torch.ones(10, 4)
    r = retrieval_recall(img, txt, [i // 2 for i in range(10)], ks=(1, 5))
    assert r["i2t_r1"] == 0.0 and r["t2i_r1"] == 0.0 and r["t2i_r5"] == 100.0


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="text_to_image has 2 entries"):
        retrieval_recall(torch.eye(3), torch.eye(3), [0, 1])
    with pytest.raises(ValueError, match="index images 0..2"):
        retrieval_recall(torch.eye(3), torch.eye(3), [0, 1, 3])


def test_caption_retrieval_known_answers():
    # image 0: captions 0, 1 identical; image 1: captions 2, 3 far apart but each closest to image 0's captions
    e = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0.6, 0.8, 0], [0.6, 0, 0.8]])
    r = caption_retrieval(e, [0, 0, 1, 1], ks=(1, 3))
    # caption 0 -> 1 first (hit); 1 -> 0 (hit); 2: scores [0.6, 0.6, -, 0.36] -> own third (miss at 1, hit at 3); 3 same
    assert r["r1"] == pytest.approx(50.0) and r["r3"] == pytest.approx(100.0) and r["n_queries"] == 4
    # a singleton caption is not a query
    r = caption_retrieval(torch.eye(3), [0, 1, 1], ks=(1,))
    assert r["n_queries"] == 2 and r["r1"] == 0.0  # e1 vs e2 orthogonal: ties with image 0's caption -> miss


def test_chunking_matches_single_block(monkeypatch):
    import kclip.eval.retrieval as mod

    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(37, 8, generator=g), dim=-1)
    t2i = [i % 37 for i in range(61)]
    txt = F.normalize(img[t2i] + 0.7 * torch.randn(61, 8, generator=g), dim=-1)
    full = retrieval_recall(img, txt, t2i)
    cap = caption_retrieval(txt, t2i)
    monkeypatch.setattr(mod, "_CHUNK", 5)
    assert retrieval_recall(img, txt, t2i) == full
    assert caption_retrieval(txt, t2i) == cap
    assert 0 < full["i2t_r1"] < 100 and 0 < full["t2i_r5"] < 100
