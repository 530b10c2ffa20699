"""Third-party notices that are expected in a kclip run, dropped where they are expected and nowhere else.

Each is dropped for the duration of a ``with`` block, by logger and text, so every other record passes:

- open_clip's "No pretrained weights loaded for model ..." when ``model.pretrained`` is empty: random
  initialisation is what the config asked for (the embedded default trains from scratch).
- bitsandbytes' "inputs will be cast from float32 to float16", logged for every int8 layer on every call with
  fp32 inputs (by design on CPU).
- bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" and Hugging Face ``kernels``'
  "Skipping publisher trust check" at import: an optional Hub kernel that kclip does not fetch (see
  ``kclip.quantize.import_bitsandbytes``).
- torch's "No CUDA runtime is found" and DeepSpeed's "Setting accelerator to CPU" on a machine with no GPU
  (``kclip.distributed``); the pipeline says the device once instead.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator


class _DropText(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in str(record.msg)


@contextlib.contextmanager
def drop_notice(logger_name: str, text: str) -> Iterator[None]:
    """Within the block, drop the records of logger ``logger_name`` ("" for the root) whose message contains
    ``text``; other records pass, and the filter is removed on exit (also on an exception)."""
    logger = logging.getLogger(logger_name or None)
    dropper = _DropText(text)
    logger.addFilter(dropper)
    try:
        yield
    finally:
        logger.removeFilter(dropper)
