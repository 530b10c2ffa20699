"""Launcher: ``deepspeed train.py [--config configs/X.yaml] [key.sub=value ...]``.

Runs the Knowledge-CLIP stages (teach -> concepts -> train -> eval); each is skipped when its stamp says its
output was made from the same inputs, rebuilt or stopped (``--rebuild STAGE``) when not. Without --config it
runs the embedded default (configs/tiny.yaml), which finishes on a CPU in minutes. All decisions live in the
kclip library; this file only parses arguments.
"""
import sys

from kclip.cli import build_parser, run_from_args
from kclip.pipeline import STAGES


def main(argv=None) -> int:
    args = build_parser(prog="train.py", with_command=False).parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    run_from_args(args, STAGES)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
