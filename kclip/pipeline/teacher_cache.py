"""The teacher cache as the pipeline sees it: where it is, what it must be for a config, and what downstream
stamps record of it. The one place the pipeline compares a cache with a config.

The cache's own format and identity (``manifest.json``: teacher, revision, precision, pooling, max_length,
prompt, caption hashes, count) is :mod:`kclip.embedding_cache`'s; which config fields identify a teacher and
what names its weights is :mod:`kclip.teacher_weights`'s (``identity_options``, ``teacher_identity``). This
module needs no teacher weights: a finished cache is checked from the config alone.
"""
from __future__ import annotations

from pathlib import Path

from kclip.config import Config
from kclip.data import PairIndex
from kclip.stamps import short
from kclip.teacher_weights import DEFAULT_TEACHER, identity_options, teacher_identity


def teacher_cache_dir(cfg: Config, run_dir: Path) -> Path:
    return Path(cfg.teacher.cache_dir) if cfg.teacher.cache_dir else run_dir / "teacher"


def teacher_identity_from_config(cfg: Config) -> dict:
    """The teacher's part of a cache's identity, from the config alone (no weights, no network).

    ``teacher.name`` is compared by the names it can stand for (as given, as an absolute folder path, the
    embedded default's aliases); an empty ``teacher.revision`` matches a cache of any revision of that name
    (the manifest records which). Where the teacher's files are still at hand, :func:`_teacher_files_changed`
    also compares their fingerprint (``kclip.teacher_weights.teacher_identity``).
    """
    return identity_options(cfg.teacher)


def _teacher_names(name: str) -> set[str]:
    """The names a cache manifest may record for the config's ``teacher.name``."""
    names = {name, str(Path(name).expanduser()), str(Path(name).expanduser().resolve())}
    if name.lower().replace("_", "-").endswith("all-minilm-l6-v2"):  # the embedded default and its aliases
        names.add(DEFAULT_TEACHER)
    return names


def _teacher_files_changed(manifest, cfg: Config) -> list[str]:
    """For a teacher that is a local folder / GGUF file or an installed package: ``teacher`` id change when its
    files (fingerprint) or package version differ from the cache's. Nothing when the files are gone (training
    from a finished cache needs no weights) or for a Hub id (its cached commit may be evicted)."""
    try:
        ident = teacher_identity(**teacher_identity_from_config(cfg))
    except (FileNotFoundError, ValueError, OSError):
        return []
    if ident.get("source") not in ("folder", "gguf", "package") or ident["teacher"] == manifest.teacher:
        return []
    return [f"teacher files: {manifest.teacher!r} -> {ident['teacher']!r}"]


def _manifest_name(manifest) -> str:
    name = (manifest.teacher_describe or {}).get("name")
    if name:
        return name
    rev = manifest.revision
    return manifest.teacher[: -len(f"@{rev}")] if rev and manifest.teacher.endswith(f"@{rev}") else manifest.teacher


def cache_changes(manifest, cfg: Config, index: PairIndex, split: str) -> list[str]:
    """``key: cached -> config`` for every way the cache differs from what the config asks for."""
    from kclip.cache import captions_sha256

    ident = teacher_identity_from_config(cfg)
    out = []
    cached_name = _manifest_name(manifest)
    if cached_name not in _teacher_names(ident["name"]):
        out.append(f"teacher.name: {cached_name!r} -> {ident['name']!r}")
    if ident["revision"] is not None and manifest.revision != ident["revision"]:
        out.append(f"teacher.revision: {manifest.revision!r} -> {ident['revision']!r}")
    for key in ("precision", "pooling", "max_length", "prompt"):
        if getattr(manifest, key) != ident[key]:
            out.append(f"teacher.{key}: {getattr(manifest, key)!r} -> {ident[key]!r}")
    if not out:
        out += _teacher_files_changed(manifest, cfg)
    caps = captions_sha256(index.captions)
    if manifest.captions_sha256 != caps or manifest.count != len(index.pairs):
        out.append(f"data.{split} captions: {manifest.count} (sha256 {short(manifest.captions_sha256)}) -> "
                   f"{len(index.pairs)} (sha256 {short(caps)})")
    return out


def teach_identity(manifest, split: str) -> dict:
    """A finished cache's identity as downstream stamps record it (the manifest's fields, config-key named)."""
    return {"teacher.name": _manifest_name(manifest), "teacher.revision": manifest.revision,
            "teacher.precision": manifest.precision, "teacher.pooling": manifest.pooling,
            "teacher.max_length": manifest.max_length, "teacher.prompt": manifest.prompt, "teacher.dim": manifest.dim,
            f"data.{split}:captions_sha256": manifest.captions_sha256, f"data.{split}:count": manifest.count}
