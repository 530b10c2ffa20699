"""Experiments: drivers that run the whole pipeline many times and compare the results, a floor above
:mod:`kclip.pipeline` (which they call) and :mod:`kclip.eval` (which measures each run).

- ``comparison``: the paper's comparison (``python -m kclip.experiments.comparison``, ``kclip compare``): arms,
  paired seeds, intervals; its design in ``design``, statistics in ``stats``, the Markdown in ``comparison_report``;
- ``ablation``: the loss ablation over seeds (``python -m kclip.experiments.ablation``).
"""
