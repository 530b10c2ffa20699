"""The Knowledge-CLIP objective: kernels vs references, and data-parallel gradients.

Under DeepSpeed each rank computes the loss on its rows and the engine *averages* parameter gradients over
ranks. The 2-rank test emulates exactly that (all-reduce, divide by 2) and requires the encoder, W_e and
logit-scale gradients to equal those of one process on the concatenated batch.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from _dist import run_ranks
from conftest import TOL
from kclip.losses import KnowledgeClipLoss
from kclip.model import KnowledgeHead

D_IN, D, D_TEACHER, K, N = 12, 10, 14, 5, 12


class TinyStudent(nn.Module):
    """Stands in for KnowledgeClip: two 'encoders', the logit scale and the real head (W_e, frozen C)."""

    def __init__(self, impl="triton", concept_path="shared"):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.image_enc = nn.Linear(D_IN, D)
        self.text_enc = nn.Linear(D_IN, D)
        self.logit_scale = nn.Parameter(torch.tensor(2.3))
        # "shared": L_conc also trains W_e, so the 2-rank check covers W_e's gradient from both head terms
        self.head = KnowledgeHead(D, D_TEACHER, K, concept_path=concept_path, distill_impl=impl)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            self.head.load_concept_classifier(torch.randn(K, D_TEACHER, generator=g), torch.randn(K, generator=g))

    def forward(self, xi, xt, teacher, concept):
        out = {"image": F.normalize(self.image_enc(xi), dim=-1), "text": F.normalize(self.text_enc(xt), dim=-1),
               "logit_scale": self.logit_scale.exp()}
        out.update(self.head(out["text"], out["image"], teacher, concept))
        return out


def _batch():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(N, D_IN, generator=g), torch.randn(N, D_IN, generator=g),
            F.normalize(torch.randn(N, D_TEACHER, generator=g), dim=-1), torch.randint(0, K, (N,), generator=g))


def _grads(model, impl, rows, world_size=1, contrastive_impl=None):
    xi, xt, teacher, concept = (t[rows] for t in _batch())
    model.head.distill_impl = impl
    loss_fn = KnowledgeClipLoss(1.0, 0.3, 1.0, contrastive_impl=contrastive_impl or impl, world_size=world_size)
    total, terms = loss_fn(model(xi, xt, teacher, concept))
    model.zero_grad()
    total.backward()
    return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("contrastive_impl", ["triton", "chunked", "fused"])
def test_kernel_and_reference_objectives_agree(contrastive_impl):
    loss_t, grads_t = _grads(TinyStudent(), "triton", slice(None), contrastive_impl=contrastive_impl)
    loss_r, grads_r = _grads(TinyStudent(), "reference", slice(None))
    torch.testing.assert_close(loss_t, loss_r, **TOL[torch.float32])
    for name in grads_r:
        torch.testing.assert_close(grads_t[name], grads_r[name], **TOL[torch.float32], msg=name)


def _two_rank_grads_match_full_batch(rank, world_size, impl):
    _, full = _grads(TinyStudent(), impl, slice(None))  # one process, the whole batch
    per = N // world_size
    _, grads = _grads(TinyStudent(), impl, slice(rank * per, (rank + 1) * per), world_size=world_size)
    for g in grads.values():  # what the DeepSpeed engine does with gradients: average over ranks
        dist.all_reduce(g)
        g /= world_size
    for name, g in full.items():
        torch.testing.assert_close(grads[name], g, atol=2e-5, rtol=1e-4, msg=f"rank {rank} {name}")


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_two_rank_gradients_equal_one_rank_full_batch(impl):
    run_ranks(_two_rank_grads_match_full_batch, impl)
