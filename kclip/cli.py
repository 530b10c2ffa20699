"""Command line: ``kclip run|teach|concepts|train|eval|config|bench|compare`` (and ``deepspeed train.py``, which is
``run``). ``kclip compare --out DIR ...`` is ``python -m kclip.experiments.comparison`` (the paper's comparison).

Every command takes ``--config FILE|PRESET`` (``tiny``, ``paper``, or a YAML path) and ``key.sub=value``
overrides; without ``--config`` the embedded default (configs/tiny.yaml, the defaults of
kclip.config.Config) is used. ``kclip config`` prints the resolved config and runs nothing.
``--rebuild STAGE[,STAGE]`` (or ``all``) discards and rebuilds those stages and what depends on them
(see kclip.pipeline for which changed inputs rebuild by themselves and which stop and ask).
"""
from __future__ import annotations

import argparse
import os
import sys

COMMANDS = {
    "run": ("teach", "concepts", "train", "eval"),
    "teach": ("teach",),
    "concepts": ("concepts",),
    "train": ("train",),
    "eval": ("eval",),
}


def build_parser(prog: str = "kclip", with_command: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Knowledge-CLIP trainer: teach -> concepts -> train -> eval")
    if with_command:
        p.add_argument("command", choices=sorted(COMMANDS) + ["bench", "config"],
                       help="run = every stage that is not up to date; or one stage alone; config = print the "
                            "resolved config; bench NAME runs a benchmark")
    p.add_argument("--config", default=None,
                   help="a preset (tiny, paper) or a YAML file (default: the embedded tiny config)")
    p.add_argument("--rebuild", action="append", default=[], metavar="STAGES",
                   help="discard and rebuild these stages (comma list of teach,concepts,train,eval, or all) and "
                        "every stage after them; needed when an expensive stage's inputs changed")
    p.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="continue training from the latest checkpoint in run_dir (the default)")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="train from scratch even if checkpoints exist in run_dir")
    p.add_argument("--stop-after", type=int, default=0, metavar="STEP",
                   help="stop training after this optimizer step (checkpointed), e.g. to test resume")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    # what the DeepSpeed launcher and its users pass
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--deepspeed_config", default=None, help="DeepSpeed JSON (same as train.deepspeed_config=...)")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value, e.g. train.epochs=2")
    return p


def config_from_args(args):
    """The resolved Config of ``--config`` + overrides; a config error exits 2 with a message naming the key."""
    from kclip.config import ConfigError, load_config

    overrides = list(args.overrides)
    if args.deepspeed_config:
        overrides.append(f"train.deepspeed_config={args.deepspeed_config}")
    try:
        return load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"kclip: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def run_from_args(args, stages) -> dict:
    from kclip import pipeline
    from kclip.errors import UserError

    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    cfg = config_from_args(args)
    try:
        names = pipeline.rebuild_names(args.rebuild, stages)
    except ValueError as exc:
        print(f"kclip: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if names - set(stages):
        print(f"kclip: --rebuild {','.join(sorted(names - set(stages)))} is not a stage of this command "
              f"({', '.join(stages)}); use `kclip run --rebuild ...`", file=sys.stderr)
        raise SystemExit(2)
    try:
        return pipeline.run(cfg, stages=stages, resume=args.resume, progress=args.progress,
                            stop_after=args.stop_after, rebuild=args.rebuild)
    except UserError as exc:  # the user's to fix: one line, no traceback (a bug keeps its traceback)
        if os.environ.get("RANK", "0") == "0":  # every rank raises it; one says it
            print(f"kclip: {exc}", file=sys.stderr)
        stale = isinstance(exc, (pipeline.StaleOutputError, pipeline.MissingInputError))
        raise SystemExit(3 if stale else 2) from None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return bench_main(argv[1:])
    if argv[:1] == ["compare"]:  # the paper's comparison (kclip.experiments.comparison), its own arguments
        from kclip.experiments.comparison import main as compare_main
        return compare_main(argv[1:])
    args = build_parser().parse_intermixed_args(argv)
    if args.command == "config":
        from kclip.config import to_yaml
        print(to_yaml(config_from_args(args)), end="")
        return 0
    run_from_args(args, COMMANDS[args.command])
    return 0


def bench_main(argv) -> int:
    """``kclip bench NAME [args]`` runs ``python -m bench.bench_NAME`` in the kclip checkout (bench/ ships with the
    repository, not the wheel); ``kclip bench suite`` runs bench.gpu_suite (every GPU measurement in priority
    order inside one time budget)."""
    import subprocess
    from pathlib import Path

    checkout = Path(__file__).resolve().parent.parent  # kclip/ sits at the top of the repository
    bench_dir = checkout / "bench"
    modules = {p.stem[len("bench_"):]: p.stem for p in bench_dir.glob("bench_*.py")}
    if (bench_dir / "gpu_suite.py").exists():
        modules["suite"] = "gpu_suite"
    if not argv or argv[0] not in modules:
        found = ", ".join(sorted(modules)) or f"none: {bench_dir} does not exist (bench/ comes with a git checkout)"
        print(f"usage: kclip bench NAME [args]; NAME is one of {found}", file=sys.stderr)
        return 2
    # the checkout on the child's path (bench is not installed); the user's working directory is kept, so
    # relative --out paths land where they were typed
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")])))
    return subprocess.call([sys.executable, "-m", f"bench.{modules[argv[0]]}", *argv[1:]], env=env)


if __name__ == "__main__":
    raise SystemExit(main())
