"""kclip.distributed: the one-rank group that setup() makes is destroyed, and freed, before shutdown.

A gloo group alive while Python finalises can abort the process after its work is done (see the module
doc of kclip.distributed); the check runs in a fresh interpreter because it is about process exit.
"""
import os
import subprocess
import sys
import textwrap

# An atexit handler registered *before* setup() runs *after* setup()'s teardown (atexit is LIFO) and
# while the interpreter is still whole: it sees whether the group was destroyed and its object freed.
CHILD = textwrap.dedent("""
    import atexit, gc, os, weakref
    import torch.distributed as dist
    from kclip import distributed

    state = {}

    @atexit.register
    def report():
        gc.collect()
        print("initialized-at-exit", dist.is_initialized(), "freed-at-exit", state["group"]() is None, flush=True)

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(var, None)
    info = distributed.setup()
    assert (info.rank, info.world_size) == (0, 1), info
    assert distributed.setup() == info  # idempotent: the same group, one teardown registered
    assert int(os.environ["MASTER_PORT"]) > 0  # the port the store holds, picked by the OS
    state["group"] = weakref.ref(dist.group.WORLD)
    assert distributed.all_reduce_mean(3.0) == 3.0
    print("setup-ok", flush=True)
""")


def test_setup_group_is_destroyed_and_freed_at_exit():
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # gloo, as in CI
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "setup-ok" in proc.stdout, proc.stdout + proc.stderr
    assert "initialized-at-exit False freed-at-exit True" in proc.stdout, proc.stdout + proc.stderr


def test_a_stale_deepspeed_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch, capsys):
    """A build lock left by an interrupted first run would make every later run wait forever; a lock as young as a
    running build is left alone."""
    import os
    import time

    from kclip import distributed

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    distributed._clear_stale_build_locks()
    assert lock.exists()  # young: a build may hold it
    old = time.time() - distributed.STALE_BUILD_LOCK_S - 60
    os.utime(lock, (old, old))
    distributed._clear_stale_build_locks()
    assert not lock.exists() and "left by an interrupted run" in capsys.readouterr().out
