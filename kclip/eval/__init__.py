"""Evaluation suite: the paper's tables on any data source (retrieval and the text probe on the validation pairs;
CUB/AWA2 when given; attribute zero-shot, hard negatives and concept NMI on the synthetic set, which has ground truth).

Modules (each one public function + docstring; deterministic given the seed):

- ``retrieval``: image<->text R@K, caption->caption retrieval;
- ``zeroshot``: attribute zero-shot (CUB-200-2011, AWA2, synthetic colour-shape combos);
- ``compositional``: hard negatives (attribute swap / replace, relation replace) + a text-only baseline;
- ``concept_stats`` (module and function of that name): NMI of k-means labels vs the true attributes;
- ``text_em``: exact-match caption reconstruction from a frozen text embedding (Kamath et al.);
- ``run`` / ``report``: ``run_eval`` writes report.json / report.md / report.png; ``format_table``.

The drivers that run the pipeline many times (the paper's comparison, the loss ablation) live above the
pipeline, in :mod:`kclip.experiments`.

Importing ``kclip.eval`` is cheap: the names below load their module on first use.
"""
from importlib import import_module

_LAZY = {
    "run_eval": "run", "format_table": "report", "write_report": "report",
    "retrieval_recall": "retrieval", "caption_retrieval": "retrieval", "zeroshot_accuracy": "zeroshot",
    "compositional_accuracy": "compositional", "text_em_probe": "text_em",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
