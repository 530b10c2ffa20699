"""Fused Triton kernels for Knowledge-CLIP, installed as ``kclip.kernels``.

Public API (stable, see design.md)::

    from kclip.kernels import clip_contrastive_loss, projected_mse_loss, kmeans_assign, kmeans_update

Each op lives in a module of the same name beside its PyTorch reference (``<op>_reference``). The
functions are bound here after their modules load, so ``kclip.kernels.<op>`` is always the function
(a bare submodule import would otherwise leave the module under that name). Importing this package
imports Triton, but launches and compiles nothing.
"""
if __name__ == "kclip.kernels":
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
else:
    # Run from the repo root, this folder is importable as a top-level `kernels`: the name of a Hugging Face
    # package that transformers and bitsandbytes probe. Expose nothing (and no version), so the probes find
    # no usable `kernels` package instead of loading kclip's kernels under a second name.
    __all__ = []
