"""bitsandbytes quantisation of a frozen teacher: LLM.int8() and NF4, on GPU and on CPU.

``int8`` is LLM.int8() (bitsandbytes ``Linear8bitLt``, outlier threshold 6.0, the rest of the model in fp16 on
GPU / fp32 on CPU); ``nf4`` is bitsandbytes 4-bit NormalFloat (``Linear4bit``, compute dtype bf16 on GPU / fp32
on CPU). Two ways lead there, and both end in the same bitsandbytes modules:

- transformers' ``BitsAndBytesConfig`` at load time (``load_quantized`` tries it first on a GPU). transformers
  refuses it without ``accelerate``, on CPU, and for GGUF checkpoints ("cannot combine quantization and
  loading a model from a GGUF file").
- kclip's own ``quantize_linears``: load in the compute dtype, then replace every ``nn.Linear`` by its
  bitsandbytes counterpart holding the same weights, quantised by bitsandbytes. bitsandbytes >= 0.45 runs
  ``Linear8bitLt`` on CPU, so int8 is tested on CPU too.

``load_quantized`` returns which path ran (``"transformers"`` or ``"kclip"``) so a teacher can record it.

bitsandbytes is imported through ``import_bitsandbytes`` (no Hub download at import); its expected notices
are dropped where they are expected (``kclip.notices``).
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
from torch import nn

from kclip.notices import drop_notice

log = logging.getLogger(__name__)

QUANTIZED = ("int8", "nf4")
INT8_THRESHOLD = 6.0  # LLM.int8() outlier threshold, transformers' default (llm_int8_threshold)


def quiet_bnb_cast_notice():
    """Within the block, drop bitsandbytes' "inputs will be cast" notice (other records pass; undone on exit).

    On CPU the int8 teacher feeds fp32 activations into ``Linear8bitLt``, which casts them to fp16 by design;
    the notice would otherwise be logged for every layer of every batch.
    """
    return drop_notice("bitsandbytes.autograd._functions", "inputs will be cast from")


def import_bitsandbytes():
    """``bitsandbytes``, imported without reaching for the network.

    On CPUs with AVX512-BF16, importing bitsandbytes asks Hugging Face's ``kernels`` for an optional 4-bit CPU
    kernel from the Hub (a download of code). kclip never downloads code implicitly: the import sees the Hub
    as offline (a kernel already in the local cache is still used) and the notices that follow ("Failed to
    load", "Skipping publisher trust check ... offline") are dropped; bitsandbytes' own CPU kernels serve
    otherwise. A later import returns the loaded module.
    """
    import sys

    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    from huggingface_hub import constants

    was = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True  # read by `kernels` when it resolves the Hub repo
    try:
        with drop_notice("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"), \
                drop_notice("kernels._internals.hf_hub", "Skipping publisher trust check"):
            import bitsandbytes
    finally:
        constants.HF_HUB_OFFLINE = was
    return bitsandbytes


def compute_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """The dtype of everything bitsandbytes does not quantise (embeddings, norms, nf4 compute).

    int8 keeps the rest in fp16 on GPU as LLM.int8() does; nf4 computes in bf16 on GPU. On CPU both use fp32,
    where fp16/bf16 kernels are slow or missing.
    """
    if precision not in QUANTIZED:
        raise ValueError(f"compute_dtype: precision must be one of {QUANTIZED}, got {precision!r}")
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.float16 if precision == "int8" else torch.bfloat16


def bnb_config(precision: str, dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` for ``precision`` (int8: LLM.int8() threshold 6.0; nf4 in ``dtype``)."""
    from transformers import BitsAndBytesConfig

    if precision == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD)
    if precision == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    raise ValueError(f"bnb_config: precision must be one of {QUANTIZED}, got {precision!r}")


def load_quantized(load: Callable[..., nn.Module], precision: str, device: torch.device | str,
                   allow_transformers: bool = True) -> tuple[nn.Module, str, str]:
    """Load a model quantised to int8 / nf4 on ``device``.

    Args:
        load: ``load(**kwargs) -> model``, e.g. ``lambda **kw: AutoModel.from_pretrained(folder, **kw)``; called
            with ``dtype=`` (and, for transformers' path, ``quantization_config=`` and ``device_map=``).
        precision: "int8" or "nf4".
        device: where the quantised model lives and runs.
        allow_transformers: try transformers' ``BitsAndBytesConfig`` first on a GPU (False for GGUF
            checkpoints, which transformers cannot combine with it).

    Returns:
        (model, backend, note): backend "transformers" or "kclip" (``quantize_linears``); note says why
        transformers' path was not used ("" when it was).
    """
    device = torch.device(device)
    dtype = compute_dtype(precision, device)
    import_bitsandbytes()  # before transformers' loader imports it
    if device.type == "cuda" and allow_transformers:
        try:
            model = load(quantization_config=bnb_config(precision, dtype), dtype=dtype,
                         device_map={"": device.index or 0})
            return model, "transformers", ""
        except (ImportError, ValueError) as exc:  # e.g. "requires accelerate"
            note = f"transformers BitsAndBytesConfig refused ({type(exc).__name__}: {exc}); kclip quantised"
    elif not allow_transformers:
        note = "transformers cannot combine bitsandbytes with this checkpoint format (GGUF); kclip quantised"
    else:
        note = "CPU: transformers' bitsandbytes loader needs a GPU device_map; kclip quantised"
    log.info("%s", note)
    model = load(dtype=dtype)
    return quantize_linears(model.to(device), precision, device, compute_dtype=dtype), "kclip", note


def quantize_linears(model: nn.Module, precision: str, device: torch.device | str,
                     compute_dtype: torch.dtype = torch.float32, skip: Sequence[str] = ("lm_head",)) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` by its bitsandbytes int8 / nf4 counterpart, in place.

    Works on weights living on the CPU or already on ``device`` (layer by layer, so a bf16 7B model on a GPU
    is quantised without a second full copy).

    Args:
        model: the loaded model (any dtype).
        precision: "int8" (``Linear8bitLt``, LLM.int8() threshold 6.0) or "nf4" (``Linear4bit``).
        device: where the quantised weights live and run.
        compute_dtype: nf4 compute dtype (and its bias dtype).
        skip: child names left in full precision (the LM head, as transformers does).

    Returns:
        ``model`` (modified in place).

    Limits: on CPU, bitsandbytes' 4-bit kernels need ``out_features % 32 == 0``; other layers stay unquantised
    (a warning names them). Real teachers (Llama 2: 4096 / 11008, MiniLM: 384 / 1536, SmolLM2: 576 / 1536 /
    192) satisfy it.
    """
    bnb = import_bitsandbytes()
    from bitsandbytes.functional import int8_vectorwise_quant

    device = torch.device(device)
    if precision not in QUANTIZED:
        raise ValueError(f"quantize_linears: precision must be one of {QUANTIZED}, got {precision!r}")
    for parent in list(model.modules()):
        for cname, child in list(parent.named_children()):
            if type(child) is not nn.Linear or cname in skip:
                continue
            if precision == "nf4" and device.type == "cpu" and child.out_features % 32:
                # bitsandbytes' CPU 4-bit kernels pack weights in blocks of 32 output rows.
                log.warning("nf4 on CPU: %s (out_features %d, not a multiple of 32) stays unquantised",
                            cname, child.out_features)
                continue
            has_bias = child.bias is not None
            w = child.weight.data  # (out, in)
            if precision == "int8":
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=has_bias,
                                          has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta")
                param = bnb.nn.Int8Params(w.to(torch.float16), requires_grad=False, has_fp16_weights=False)
                if w.device.type == "cpu":
                    param = param.to(device)  # bitsandbytes quantises on the move off the CPU (or onto it)
                else:
                    # Already on the accelerator: quantise in place, exactly as Int8Params does on .to().
                    cb, scb, _ = int8_vectorwise_quant(param.data.to(device).contiguous())
                    param.data, param.CB, param.SCB = cb, cb, scb
            else:
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=has_bias,
                                        compute_dtype=compute_dtype, quant_type="nf4", device="meta")
                param = bnb.nn.Params4bit(w.to(compute_dtype), requires_grad=False, quant_type="nf4")
                param = param.to(device)
            new.weight = param
            if has_bias:
                bias_dtype = compute_dtype if precision == "nf4" else child.bias.dtype
                new.bias = nn.Parameter(child.bias.data.to(device=device, dtype=bias_dtype), requires_grad=False)
            setattr(parent, cname, new)
            del child, w
    return model


def count_quantized(model: nn.Module) -> dict:
    """How many Linear layers are bitsandbytes int8 / 4-bit / plain (for checks and ``Teacher.describe()``)."""
    try:
        bnb = import_bitsandbytes()
        int8_cls, nf4_cls = bnb.nn.Linear8bitLt, bnb.nn.Linear4bit
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        int8_cls = nf4_cls = ()
    counts = {"int8": 0, "nf4": 0, "linear": 0}
    for m in model.modules():
        if int8_cls and isinstance(m, int8_cls):
            counts["int8"] += 1
        elif nf4_cls and isinstance(m, nf4_cls):
            counts["nf4"] += 1
        elif isinstance(m, nn.Linear):
            counts["linear"] += 1
    return counts


__all__ = ["INT8_THRESHOLD", "QUANTIZED", "bnb_config", "compute_dtype", "count_quantized", "import_bitsandbytes",
           "load_quantized", "quantize_linears", "quiet_bnb_cast_notice"]
