"""The YAML presets (tiny, paper) and the DeepSpeed JSONs (ds/), installed as the data package ``kclip.configs``.

No code: ``kclip.config`` reads these files through ``importlib.resources``, so ``--config paper`` and the
DeepSpeed configs resolve the same way from a checkout, an editable install and a wheel.
"""
