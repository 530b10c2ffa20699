"""The Knowledge-CLIP objective: alpha * L_emb + beta * L_conc + gamma * L_cont.

- L_emb = || W_e(E_T(x_C)) - L(x_C) ||^2, summed over d' per caption and averaged over the batch (the
  paper's Eq. 1): ``kclip.kernels.projected_mse_loss``, computed in :class:`kclip.model.KnowledgeHead`.
- L_conc = CE(C(P(E_I(x_I))), s): the frozen classifier C over the image embedding projected into the
  teacher space (``loss.concept_path`` chooses P), also in the head.
- L_cont = symmetric InfoNCE over the *global* batch: ``kclip.kernels.clip_contrastive_loss``, here.

Data parallelism: DeepSpeed averages parameter gradients over ranks. That is right for the per-rank means
(L_emb, L_conc). L_cont is one loss over the global batch; the fused kernel returns its exact gradient
for this rank's rows, so the averaging would shrink the encoders' share by the world size P. The features
therefore pass through :class:`_ScaleGrad` (x P in backward only) before the kernel; the logit-scale
gradient is already exact on every rank and is left alone. The reference impl takes the same path: its
all-gather keeps this rank's slice in the graph (exact local gradient, no collective in backward).
``tests/test_losses.py`` checks 2-rank encoder gradients equal 1-rank full-batch ones for both impls.
"""
from __future__ import annotations

import functools

import torch


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``factor``."""

    @staticmethod
    def forward(ctx, x, factor: float):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, impl: str = "triton",
                     group=None, world_size: int = 1, memory_budget_gb: float = 0.0) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch, with gradients ready for DeepSpeed's averaging (see module doc).

    Both impls all-gather without autograd and keep the local rows in the graph, so no collective runs in
    backward; the x P of :class:`_ScaleGrad` undoes the engine's average over P ranks. ``memory_budget_gb`` (GB,
    0 = automatic) is the kernel's workspace budget: with ``impl="triton"`` it picks the strategy (and chunk size).
    """
    from kclip import kernels

    if impl == "reference":
        loss_fn = kernels.clip_contrastive_loss_reference
    else:  # triton: the strategy the memory budget plans; resident / chunked / fused: that strategy
        budget = int(memory_budget_gb * 2 ** 30) if memory_budget_gb > 0 else None
        loss_fn = functools.partial(kernels.clip_contrastive_loss, strategy=None if impl == "triton" else impl,
                                    memory_budget=budget)
    if world_size == 1:
        return loss_fn(image, text, logit_scale)
    if group is None:
        import torch.distributed as dist
        group = dist.group.WORLD
    image, text = _ScaleGrad.apply(image, float(world_size)), _ScaleGrad.apply(text, float(world_size))
    return loss_fn(image, text, logit_scale, process_group=group)


class KnowledgeClipLoss(torch.nn.Module):
    """alpha * L_emb + beta * L_conc + gamma * L_cont from the student's outputs; returns the total and the terms.

    L_emb and L_conc are computed inside the student's forward (:class:`kclip.model.KnowledgeHead`, which owns
    W_e and C); this module adds the global-batch contrastive term, which needs the process group.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 0.01, gamma: float = 1.0, contrastive_impl: str = "triton",
                 group=None, world_size: int = 1, contrastive_memory_budget_gb: float = 0.0):
        super().__init__()
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.contrastive_impl = contrastive_impl
        self.contrastive_memory_budget_gb = contrastive_memory_budget_gb  # loss.contrastive_memory_budget_gb
        self.group, self.world_size = group, world_size

    def forward(self, out: dict) -> tuple:
        """
        Args:
            out: the student's outputs: ``image`` (B, d), ``text`` (B, d), ``logit_scale`` (0-d), and the head's
                ``distill`` (needed when alpha > 0) and ``concept`` (needed when beta > 0) terms.
        Returns:
            (total 0-d tensor, {term: detached 0-d tensor}); no host synchronisation.
        """
        terms = {}
        total = out["image"].new_zeros((), dtype=torch.float32)
        if self.gamma > 0:
            terms["contrastive"] = contrastive_loss(out["image"], out["text"], out["logit_scale"],
                                                    self.contrastive_impl, self.group, self.world_size,
                                                    self.contrastive_memory_budget_gb)
            total = total + self.gamma * terms["contrastive"].float()
        for name, weight, needs in (("distill", self.alpha, "teacher targets"), ("concept", self.beta, "concept labels")):
            if weight > 0:
                if name not in out:
                    raise ValueError(f"KnowledgeClipLoss: the {name} term has weight {weight} but the student's "
                                     f"outputs hold no {name!r} term: pass {needs} to the model's forward")
                terms[name] = out[name]
                total = total + weight * out[name]
        return total, {k: v.detach() for k, v in terms.items()}
