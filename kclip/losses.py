"""The Knowledge-CLIP objective: alpha * L_emb + beta * L_conc + gamma * L_cont.

- L_emb = || W_e(E_T(x_C)) - L(x_C) ||^2 (mean over elements): ``kclip.kernels.projected_mse_loss``, the
  projection GEMM with the squared error and its gradient fused.
- L_conc = CE(C(W_e(E_I(x_I))), s): the frozen classifier C over the projected image embedding.
- L_cont = symmetric InfoNCE over the *global* batch: ``kclip.kernels.clip_contrastive_loss``.

Data parallelism: DeepSpeed averages parameter gradients over ranks. That is right for the per-rank means
(L_emb, L_conc). L_cont is one loss over the global batch; the fused kernel returns its exact gradient
for this rank's rows, so the averaging would shrink the encoders' share by the world size P. The features
therefore pass through :class:`_ScaleGrad` (x P in backward only) before the kernel; the logit-scale
gradient is already exact on every rank and is left alone. The reference impl takes the same path: its
all-gather keeps this rank's slice in the graph (exact local gradient, no collective in backward).
``tests/test_losses.py`` checks 2-rank encoder gradients equal 1-rank full-batch ones for both impls.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
                     group=None, world_size: int = 1) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch, with gradients ready for DeepSpeed's averaging (see module doc).

    Both impls all-gather without autograd and keep the local rows in the graph, so no collective runs in
    backward; the x P of :class:`_ScaleGrad` undoes the engine's average over P ranks.
    """
    from kclip import kernels

    loss_fn = kernels.clip_contrastive_loss if impl == "triton" else kernels.clip_contrastive_loss_reference
    if world_size == 1:
        return loss_fn(image, text, logit_scale)
    if group is None:
        import torch.distributed as dist
        group = dist.group.WORLD
    image, text = _ScaleGrad.apply(image, float(world_size)), _ScaleGrad.apply(text, float(world_size))
    return loss_fn(image, text, logit_scale, process_group=group)


class KnowledgeClipLoss(torch.nn.Module):
    """alpha * L_emb + beta * L_conc + gamma * L_cont; returns the total and each term (detached)."""

    def __init__(self, alpha: float = 1.0, beta: float = 0.01, gamma: float = 1.0, contrastive_impl: str = "triton",
                 distill_impl: str = "triton", group=None, world_size: int = 1):
        super().__init__()
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.contrastive_impl, self.distill_impl = contrastive_impl, distill_impl
        self.group, self.world_size = group, world_size

    def forward(self, model, out: dict, teacher: torch.Tensor | None, concept: torch.Tensor | None) -> tuple:
        """
        Args:
            model: the KnowledgeClip module (for W_e and C).
            out: the model's outputs ``image`` (B, d), ``text`` (B, d), ``logit_scale`` (0-d).
            teacher: (B, d') teacher targets of the captions, already normalised as configured
                (``kclip.targets.TeacherTargets``); needed when alpha > 0.
            concept: (B,) int64 concept labels (needed when beta > 0).
        """
        from kclip import kernels

        terms = {}
        total = out["image"].new_zeros(())
        if self.gamma > 0:
            terms["contrastive"] = contrastive_loss(out["image"], out["text"], out["logit_scale"],
                                                    self.contrastive_impl, self.group, self.world_size)
            total = total + self.gamma * terms["contrastive"]
        proj = model.projector
        if self.alpha > 0:
            target = teacher.to(out["text"].dtype)                             # (B, d')
            mse = kernels.projected_mse_loss if self.distill_impl == "triton" else kernels.projected_mse_loss_reference
            terms["distill"] = mse(out["text"], proj.weight, target, proj.bias)
            total = total + self.alpha * terms["distill"]
        if self.beta > 0:
            logits = model.concept_classifier(proj(out["image"]))         # (B, K)
            terms["concept"] = F.cross_entropy(logits.float(), concept)
            total = total + self.beta * terms["concept"]
        return total, {k: v.detach() for k, v in terms.items()}


class KnowledgeClipObjective(torch.nn.Module):
    """Student forward + objective as ONE module forward: what the DeepSpeed engine wraps.

    Under ZeRO-3 a parameter is gathered only inside the forward of a module that owns it (or has it
    registered as external). The fused L_emb takes W_e's weight as a GEMM operand instead of calling
    W_e's forward, so the objective runs inside this forward and :meth:`register_for_zero3` registers
    W_e's parameters with it.
    """

    def __init__(self, model, loss_fn: KnowledgeClipLoss):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def register_for_zero3(self) -> None:
        import deepspeed
        for p in self.model.projector.parameters():
            deepspeed.zero.register_external_parameter(self, p)

    def forward(self, images, tokens, teacher=None, concept=None) -> tuple:
        """Returns (total loss, detached terms incl. ``logit_scale``)."""
        out = self.model(images, tokens)
        total, terms = self.loss_fn(self.model, out, teacher, concept)
        terms["logit_scale"] = out["logit_scale"].detach()
        return total, terms
