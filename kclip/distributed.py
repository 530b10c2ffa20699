"""Process-group set-up under the DeepSpeed launcher, or alone as a one-rank group.

``deepspeed train.py`` sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; ``python train.py`` (and tests) do not,
so a single-process group is made on a free local port. NCCL with GPUs, gloo on CPU.

The group is destroyed before the interpreter shuts down (:func:`teardown`, registered with ``atexit`` by
:func:`setup`). A group still alive at shutdown keeps its backend threads running while Python finalises;
a gloo worker that then releases a finished collective's tensors needs the GIL, Python ends that thread,
and the process aborts ("terminate called without an active exception", SIGABRT) after the work is done.
Nothing may keep a reference to the group past ``destroy_process_group`` for the same reason (it only
forgets the group; the backend is freed with the last reference).
"""
from __future__ import annotations

import atexit
import contextlib
import os
import socket
from dataclasses import dataclass

import torch

from kclip.notices import drop_notice


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A port free *now* (it may be taken before it is bound): only for a group that already exists."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _quiet_without_cuda():
    """Within the block, on a machine with no CUDA device, drop the notices DeepSpeed's import and start-up make
    there: torch's extension loader warns "No CUDA runtime is found" (when DeepSpeed builds its CPU comm op) and
    DeepSpeed "Setting accelerator to CPU. If you have GPU ..., we were unable to detect it". Both are expected on
    a CPU machine; the pipeline says it once in kclip's words ("device: cpu ..."). With a GPU nothing is dropped.
    """
    if torch.cuda.is_available():
        yield
        return
    with drop_notice("torch.utils.cpp_extension", "No CUDA runtime is found"), \
            drop_notice("DeepSpeed", "Setting accelerator to CPU"):
        yield


STALE_BUILD_LOCK_S = 15 * 60  # DeepSpeed's CPU comm op builds in a minute or two; a lock this old is orphaned


def _clear_stale_build_locks() -> None:
    """Remove the torch-extension build lock of DeepSpeed's CPU comm op when an interrupted run left it behind.

    On a machine with no GPU, DeepSpeed compiles ``deepspeed_shm_comm`` on first use under a lock file that
    torch's extension loader waits on, forever, until it disappears. A run stopped mid-build (Ctrl-C on the
    first ``deepspeed train.py``) leaves it, and every later run, or one with another DeepSpeed version, hangs
    without a word. A lock older than :data:`STALE_BUILD_LOCK_S` belongs to no build still running.
    """
    import time
    from pathlib import Path

    from torch.utils.cpp_extension import get_default_build_root

    roots = [Path(os.environ["TORCH_EXTENSIONS_DIR"])] if os.environ.get("TORCH_EXTENSIONS_DIR") else \
        list(Path(get_default_build_root()).glob("*"))
    for lock in (root / "deepspeed_shm_comm" / "lock" for root in roots):
        try:
            age = time.time() - lock.stat().st_mtime
        except OSError:
            continue
        if age > STALE_BUILD_LOCK_S:
            print(f"[kclip] removing {lock}: a build lock {age / 60:.0f} minutes old, left by an interrupted run "
                  "(DeepSpeed would wait for it forever)", flush=True)
            lock.unlink(missing_ok=True)


def setup(backend: str | None = None) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (idempotent) and return this process's place.

    ``backend``: the process group's (default: nccl with CUDA, else gloo; gloo on a GPU machine keeps a CPU-only
    run off the GPU's communicator). An existing group keeps its own.

    Without a launcher (no ``RANK`` in the environment) the one-rank group's store listens on
    ``MASTER_PORT`` if set, else on a port the OS picks (port 0) and this process holds from the start:
    two runs at once can never race for one port. The launcher's variables are then set to match.
    """
    import torch.distributed as dist

    if not torch.cuda.is_available():
        _clear_stale_build_locks()
    with _quiet_without_cuda():
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        get_accelerator()  # chosen (and announced) on first use
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            store = dist.TCPStore("127.0.0.1", int(os.environ.get("MASTER_PORT") or 0), 1, is_master=True,
                                  wait_for_workers=False)
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(store.port))
            dist.init_process_group(backend, store=store, rank=0, world_size=1)
        with _quiet_without_cuda():
            deepspeed.init_distributed(dist_backend=backend, verbose=False)  # adopts a group made above
    elif "RANK" not in os.environ:  # a group made by the caller: DeepSpeed still checks the launcher's variables
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    _register_teardown()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


_TEARDOWN_REGISTERED = False


def _register_teardown() -> None:
    global _TEARDOWN_REGISTERED
    if not _TEARDOWN_REGISTERED:
        atexit.register(teardown)
        _TEARDOWN_REGISTERED = True


def teardown() -> None:
    """Destroy the default process group if one exists (idempotent; see the module doc for why).

    :func:`setup` registers this with ``atexit``, which runs while the interpreter is still whole;
    call it earlier to release the group sooner.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (a no-op alone)."""
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(value: float) -> float:
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if torch.cuda.is_available():
        t = t.cuda()
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def process_group() -> tuple[int, int] | None:
    """(rank, world_size) of the initialised torch.distributed process group; None without one."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None
