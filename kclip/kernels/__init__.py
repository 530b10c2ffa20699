"""Fused Triton kernels for Knowledge-CLIP: ``kclip.kernels``.

Public API (stable)::

    from kclip.kernels import clip_contrastive_loss, projected_mse_loss, kmeans_assign, kmeans_update

Each op lives in a module of the same name beside its PyTorch reference (``<op>_reference``). The
functions are bound here after their modules load, so ``kclip.kernels.<op>`` is always the function
(a bare submodule import would otherwise leave the module under that name). Importing this package
imports Triton, but launches and compiles nothing.
"""
from .clip_contrastive_loss import clip_contrastive_loss, clip_contrastive_loss_reference
from .kmeans_assign import kmeans_assign, kmeans_assign_reference
from .kmeans_update import kmeans_update, kmeans_update_reference
from .projected_mse_loss import projected_mse_loss, projected_mse_loss_reference

__all__ = [
    "clip_contrastive_loss", "clip_contrastive_loss_reference",
    "kmeans_assign", "kmeans_assign_reference",
    "kmeans_update", "kmeans_update_reference",
    "projected_mse_loss", "projected_mse_loss_reference",
]
