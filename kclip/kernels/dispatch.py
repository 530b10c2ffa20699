"""Where an op runs: the Triton kernel or its PyTorch reference.

CUDA tensors run the Triton kernels. With ``TRITON_INTERPRET=1`` (set before Triton is imported) CPU
tensors run the *same* Triton kernels in the interpreter: this is how CI tests them. Otherwise CPU
tensors use the PyTorch reference that lives beside each kernel.
"""
import os

import torch

# Every kernel launch asks for FP fusion (a * b + c contracted to one FMA, rounded once) explicitly. It is the
# default of Triton 3.0-3.9, the one every test, compile report and GPU measurement of these kernels ran with;
# Triton 3.9 warns (once per process) that 3.10 turns the default off, which would change the fp32 kernels'
# rounding and speed with the Triton version. The interpreter ignores the option.
FP_FUSION = {"enable_fp_fusion": True}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should run for these tensors (all on one device)."""
    devices = {t.device.type for t in tensors if t is not None}
    if devices == {"cuda"}:
        return True
    if devices == {"cpu"}:
        return interpreting()
    return False


def cdiv(a: int, b: int) -> int:
    """Ceiling division of host integers for launch grids and buffer sizes. Plain Python: ``triton.cdiv`` is a
    ``constexpr_function`` in recent Triton, a few microseconds per call, paid several times per launch."""
    return -(-a // b)
