"""Atomic file writes: a reader (or a rerun after a crash) sees the old file or the new one, never half of one.

Every writer follows the same four steps: write a temporary file in the destination's own folder (so the rename
never crosses a filesystem), ``fsync`` it (its bytes are on disk before its name is), ``os.replace`` it onto
the destination (atomic on POSIX and Windows), then ``fsync`` the folder (the rename itself survives a power
loss). On any error the temporary file is removed and the destination is left as it was.

    atomic_write_bytes(path, data)          bytes
    atomic_write_text(path, text)           str (UTF-8 by default)
    atomic_write_json(path, obj)            JSON (indent 2, sorted keys, trailing newline by default)
    with atomic_path(path) as tmp: ...      any writer that takes a file name: safetensors ``save_file``,
                                            ``np.save``, matplotlib ``savefig``, ``torch.save``

The temporary name is ``.<name>.tmp-<pid>-<thread>-<n><suffix>``: hidden, unique per process, thread and call,
and ending in the destination's suffix, so writers that pick a format (or append an extension) from the file
name do the same as for the destination (``np.save`` would otherwise append ``.npy``).
"""
from __future__ import annotations

import itertools
import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "fsync_dir"]

_counter = itertools.count()


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}-{next(_counter)}{path.suffix}")


def _fsync_file(path: Path) -> None:
    # fsync through a new descriptor flushes the file's pages whoever wrote them (the writer has closed it).
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or a new file in ``folder`` durable (a no-op where folders cannot be opened: Windows)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block exits cleanly, that file becomes ``path``.

    The block must create the file at the yielded path (and close it). On an exception inside the block, or
    if the block wrote nothing, the temporary file is removed, ``path`` is untouched and the error propagates.

    Example::

        with atomic_path(out / "concepts.safetensors") as tmp:
            save_file(tensors, str(tmp))
    """
    path = Path(path)
    tmp = _temp_name(path)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"atomic_path: nothing was written to the temporary file {tmp} for {path}; "
                                    "write the file at the path the context manager yields")
        _fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        try:
            tmp.unlink()  # only still there on failure
        except FileNotFoundError:
            pass


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring). Returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically, encoded with ``encoding``. Returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2, sort_keys: bool = True,
                      **dumps_kwargs) -> Path:
    """Write ``obj`` as JSON (``json.dumps(obj, indent, sort_keys, **dumps_kwargs)`` + newline) atomically.

    Serialisation happens before anything touches the disk, so an object that cannot be encoded leaves no file.
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, **dumps_kwargs) + "\n"
    return atomic_write_text(path, text)
