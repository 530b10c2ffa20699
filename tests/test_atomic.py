"""kclip.atomic: temp file in the same folder, fsync, os.replace, fsync of the folder; nothing half-written."""
import json
import os
import threading

import numpy as np
import pytest

from kclip import atomic
from kclip.atomic import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


def test_writes_bytes_text_json_and_fsyncs_file_and_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
                        or real(fd))
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    if os.path.isdir("/proc/self/fd"):
        assert any(".a.bin.tmp-" in p for p in synced)  # the data, under its temporary name
        assert os.path.realpath(tmp_path) in synced  # the folder, after the rename
    atomic_write_text(tmp_path / "b.txt", "héllo")
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo"
    atomic_write_json(tmp_path / "c.json", {"b": 1, "a": [1, 2]})
    text = (tmp_path / "c.json").read_text()
    assert json.loads(text) == {"a": [1, 2], "b": 1} and text.endswith("\n") and text.index('"a"') < text.index('"b"')
    atomic_write_bytes(tmp_path / "a.bin", b"new")  # replaces
    assert (tmp_path / "a.bin").read_bytes() == b"new"
    assert not _leftovers(tmp_path)


def test_failure_keeps_the_old_file_and_cleans_up(tmp_path):
    dest = tmp_path / "report.json"
    atomic_write_json(dest, {"v": 1})
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer died")
    with pytest.raises(TypeError):
        atomic_write_json(dest, {"v": object()})  # not serialisable: nothing touches the disk
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_path(dest):
            pass
    assert json.loads(dest.read_text()) == {"v": 1}
    assert not _leftovers(tmp_path)


def test_temp_name_keeps_the_suffix_for_format_picking_writers(tmp_path):
    dest = tmp_path / "arr.npy"
    with atomic_path(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".npy" and tmp.name.startswith(".arr.npy.tmp-")
        np.save(tmp, np.arange(3))  # np.save appends .npy to names without it
    np.testing.assert_array_equal(np.load(dest), np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arr.npy"]


def test_concurrent_writers_never_leave_a_mixed_file(tmp_path):
    dest = tmp_path / "shared.bin"
    payloads = [bytes([i]) * 100_000 for i in range(8)]
    threads = [threading.Thread(target=atomic_write_bytes, args=(dest, p)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert dest.read_bytes() in payloads
    assert not _leftovers(tmp_path)
