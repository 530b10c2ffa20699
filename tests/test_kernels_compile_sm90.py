"""Every kernel compiles for an H100/H200 (sm_90) with the launch configs it would use there, as a launch would
specialise it.

CI has no GPU and runs the kernels in the Triton interpreter, which never lowers to PTX. ``bench.compile_sm90``
compiles each kernel to a cubin (ptxas ships with Triton) in a subprocess outside the interpreter, so codegen-only
failures and shared-memory overflows show up here, not on a user's first GPU run; it also reports registers and
spills from ptxas.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_all_kernels_compile_for_sm90(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "bench.compile_sm90", "--out", str(tmp_path / "report.md")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    lines = [line for line in out.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    for op in ("clip_contrastive_loss row_stats", "clip_contrastive_loss grad", "projected_mse_loss fwd",
               "kmeans_assign", "kmeans_update"):
        for dtype in ("bf16", "fp32"):
            assert any(line.startswith(f"ok  {op} {dtype}") for line in lines), (op, dtype, out.stdout)
    # ptxas ran on every compiled kernel: registers and spills are numbers, not "?"
    ok = [line for line in lines if line.startswith("ok")]
    assert ok and all(re.search(r"registers \d+, spill \d+ B", line) for line in ok), out.stdout
    # bf16 contrastive and k-means-assign tiles of >= 64 rows use Hopper tensor cores (wgmma), fp32 does not
    for op in ("clip_contrastive_loss row_stats bf16", "kmeans_assign bf16 N=500000"):
        line = next(x for x in ok if x.startswith(f"ok  {op}") and "[default]" in x)
        assert int(re.search(r"wgmma (\d+)", line).group(1)) > 0, line
    line = next(x for x in ok if x.startswith("ok  clip_contrastive_loss row_stats fp32"))
    assert re.search(r"wgmma 0, mma.sync 0", line), line
    table = (tmp_path / "report.md").read_text()
    assert "| kernel | dtype | shape | role |" in table and table.count("\n| ") == len(lines) + 1


def test_compile_report_specialises_like_a_launch():
    """An argument equal to 1 becomes a constant and multiples of 16 are marked divisible, as Triton's launcher
    does (a generic signature reported spills the real kernels do not have)."""
    pytest.importorskip("triton.backends.nvidia")
    code = (
        "import torch, importlib\n"
        "from bench.compile_sm90 import _specialize\n"
        "m = importlib.import_module('kclip.kernels.kmeans_update')\n"
        "p = torch.empty(8, dtype=torch.bfloat16); q = torch.empty(8, dtype=torch.int64)\n"
        "sig, consts, attrs = _specialize(m._segment_sum_kernel, dict(x_ptr=p, order_ptr=q, offsets_ptr=q,\n"
        "    sums_ptr=torch.empty(8), D=4096, stride_xn=4095, stride_xd=1), dict(BLOCK_R=32, BLOCK_D=128))\n"
        "names = m._segment_sum_kernel.arg_names\n"
        "assert sig['stride_xd'] == 'constexpr' and consts[(names.index('stride_xd'),)] == 1, (sig, consts)\n"
        "assert attrs[(names.index('D'),)] == [['tt.divisibility', 16]], attrs\n"
        "assert (names.index('stride_xn'),) not in attrs and sig['stride_xn'] == 'i32', (sig, attrs)\n"
        "assert attrs[(names.index('x_ptr'),)] == [['tt.divisibility', 16]] and sig['x_ptr'] == '*bf16'\n"
        "print('specialised')\n")
    _run_compiled(code, "specialised")


def test_launch_options_are_options_of_the_cuda_backend():
    """Every launch passes ``FP_FUSION``. A GPU launch raises KeyError for a keyword that is neither a kernel
    argument nor an option of the CUDA backend; the interpreter (CI) drops such keywords silently, so check here
    that the backend of the installed Triton knows each one and keeps its value."""
    pytest.importorskip("triton.backends.nvidia")
    code = (
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler.compiler import make_backend\n"
        "from kclip.kernels.dispatch import FP_FUSION\n"
        "opts = make_backend(GPUTarget('cuda', 90, 32)).parse_options(dict(FP_FUSION, num_warps=4)).__dict__\n"
        "assert all(opts.get(k) == v for k, v in FP_FUSION.items()), (FP_FUSION, opts)\n"
        "print('options ok')\n")
    _run_compiled(code, "options ok")


def _run_compiled(code: str, done: str) -> None:
    """Run ``code`` in a fresh Python without the interpreter (Triton's compile path, as on a GPU); it prints
    ``done`` when every assertion in it held."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0 and done in out.stdout, out.stdout + out.stderr[-3000:]
