"""Stage stamps: what a stage's output was made from, so a changed input is noticed instead of reused.

A stamp is a small JSON file written beside a stage's output when the stage finishes (the train stage
also writes one, marked incomplete, when it starts, so a resumed training is checked too)::

    {"stage": "concepts",
     "inputs": {"concepts.k": 24, "loss.target_norm": "l2", "teacher.pooling": "mean",
                "data.train:captions_sha256": "9f2c...", ...},
     "upstream": {"concepts": {"sha256": "...", "bytes": 1234}},
     "output": {"sha256": "...", "bytes": 5678},
     "complete": true, "kclip_version": "0.1.0", "created": "2025-...",
     "config": {...the whole resolved config of the invocation that built it...}}

``inputs`` is flat and transitive: a stage's own config keys plus those of every stage it depends on (and
the identity of the data and of the teacher cache), so a difference names the key the user changed,
wherever it entered. ``upstream`` holds the digests of the upstream outputs it consumed, so an upstream
output rebuilt since (e.g. with ``--rebuild concepts``) is noticed too. The pipeline decides what a
difference means for each stage (rebuild automatically, or stop and ask); this module only reads, writes
and compares.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping


def file_digest(path: str | Path, chunk: int = 1 << 23) -> dict:
    """{"sha256", "bytes"} of a file (read in chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return {"sha256": h.hexdigest(), "bytes": Path(path).stat().st_size}


def read_stamp(path: str | Path) -> dict | None:
    """The stamp at ``path``; None when there is none. A damaged stamp is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        stamp = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"stage stamp {path} is not valid JSON ({exc}); delete it and rerun with --rebuild "
                         f"for that stage") from None
    if not isinstance(stamp, dict) or "inputs" not in stamp:
        raise ValueError(f"stage stamp {path} has no 'inputs'; delete it and rerun with --rebuild for that stage")
    return stamp


def make_stamp(stage: str, inputs: Mapping[str, Any], upstream: Mapping[str, Any], config: Mapping, version: str,
               output: dict | None = None, complete: bool = True) -> dict:
    return {"stage": stage, "inputs": dict(inputs), "upstream": dict(upstream), "output": output,
            "complete": complete, "kclip_version": version,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": dict(config)}


def write_stamp(path: str | Path, stamp: Mapping) -> None:
    """Write atomically (``kclip.atomic``)."""
    from kclip.atomic import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(stamp, indent=1, sort_keys=True, default=str) + "\n")


def short(value: Any) -> str:
    """A value for a message: long hashes shortened."""
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"
    if isinstance(value, dict) and "sha256" in value:
        return short(value["sha256"])
    return repr(value)


def input_changes(stamp: Mapping, inputs: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every input that differs from the stamp (keys added or dropped included)."""
    old = stamp.get("inputs", {})
    missing = object()
    out = []
    for key in sorted(set(old) | set(inputs)):
        a, b = old.get(key, missing), inputs.get(key, missing)
        if a != b:
            old_v, new_v = ("(absent)" if v is missing else short(v) for v in (a, b))
            out.append(f"{key}: {old_v} -> {new_v}")
    return out


def upstream_changes(stamp: Mapping, upstream: Mapping[str, Any]) -> list[str]:
    """One line per upstream output that differs from what the stamp consumed."""
    old = stamp.get("upstream", {})
    return [f"the {name} output changed since (sha256 {short(old.get(name))} -> {short(digest)})"
            for name, digest in sorted(upstream.items()) if old.get(name) != digest]


# Where ``.git`` does not travel (a tree copied to a benchmark machine), whoever copied it sets the revision here.
GIT_REV_ENV = "KCLIP_GIT_REV"


def git_revision(folder: str | Path | None = None, mark_dirty: bool = True, from_env: bool = True) -> str:
    """The short git revision of the checkout holding ``folder`` (default: kclip's own); "unknown" outside one.

    Args:
        folder: where to ask git.
        mark_dirty: append ``+dirty`` when tracked files have uncommitted changes.
        from_env: ``KCLIP_GIT_REV``, when set, wins over git (a copied tree's ``.git`` may be absent or stale).
    """
    if from_env and os.environ.get(GIT_REV_ENV):
        return os.environ[GIT_REV_ENV]
    cwd = Path(folder) if folder is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=cwd,
                             timeout=10)
        rev = out.stdout.strip() if out.returncode == 0 else ""
        if rev and mark_dirty:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, cwd=cwd, timeout=10).stdout.strip()
            rev += "+dirty" if dirty else ""
        if rev:
            return rev
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"
