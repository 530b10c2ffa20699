"""kclip: a performance-first Knowledge-CLIP trainer.

CLIP students (open_clip) distilled from a frozen LLM teacher whose caption embeddings are computed once
and cached; fused Triton losses (``kclip.kernels``); GPU k-means for concept labels; DeepSpeed ZeRO.
Importing kclip has no side effects and imports no heavy dependency.
"""
__version__ = "0.1.0"
