"""Launcher: ``deepspeed train.py [--config configs/X.yaml] [key.sub=value ...]``.

Runs the Knowledge-CLIP stages (teach -> concepts -> train -> eval); each is skipped when its stamp says its
output was made from the same inputs, rebuilt or stopped (``--rebuild STAGE``) when not. Without --config it
runs the embedded default (configs/tiny.yaml), which finishes on a CPU in minutes. All decisions live in the
kclip library; this file only parses arguments.
"""
import os
import sys

# The repo root holds kernels/ (installed as kclip.kernels). Keep it off sys.path so transformers and
# bitsandbytes, which probe for Hugging Face's `kernels` package, never find this folder instead.
_ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

from kclip.cli import build_parser, run_from_args  # noqa: E402 (after the sys.path fix)
from kclip.pipeline import STAGES  # noqa: E402


def main(argv=None) -> int:
    args = build_parser(prog="train.py", with_command=False).parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    run_from_args(args, STAGES)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
