"""Run a test function on P local ranks (gloo on CPU): no port races, no silent hangs, no bare SIGABRT.

``run_ranks(fn, *args, world_size=2)`` spawns ``world_size`` fresh processes, joins them in one gloo
process group and calls ``fn(rank, world_size, *args)`` in each. Asserting inside ``fn`` is the test.

- The rendezvous store is created here, in the test process, on port 0: the OS picks a free port and this
  process holds it for the whole run, so two tests (or two CI jobs) can never race for the same port
  (the old ``free_port()`` route closed its socket before the ranks bound it).
- Each rank runs the Triton interpreter (``TRITON_INTERPRET=1`` before triton is imported), enables
  ``faulthandler`` (a native crash prints every thread's Python stack to stderr, which pytest shows), and
  calls ``destroy_process_group()`` in a ``finally``.
- After that, the rank checks that the process group object is really gone. ``destroy_process_group``
  only forgets the group; if anything still references it (``torch.distributed.nn.functional`` did:
  imported after ``init_process_group``, its functions bind the live group as a default argument),
  gloo's worker threads outlive it into interpreter shutdown. A worker that then drops its last
  reference to a finished collective's tensors needs the GIL, Python makes that thread exit, and the
  forced unwind aborts the process: "terminate called without an active exception", SIGABRT, in a
  fraction of runs. The check turns that race into a deterministic failure naming the referrers.
- The ranks' collectives time out after ``timeout`` seconds and raise in the rank; the test process
  waits ``timeout + 30`` seconds, then dumps the Python stacks of the ranks still running and fails.
- A rank's exception comes back with its traceback; a rank killed by a signal fails with the signal name.
"""
from __future__ import annotations

import datetime
import faulthandler
import gc
import os
import signal
import sys
import time
import traceback
import weakref

import torch.distributed as dist
import torch.multiprocessing as mp

HOST = "127.0.0.1"


def _rank_main(rank: int, world_size: int, port: int, timeout: float, fn, args) -> None:
    """One rank: join the group, run ``fn``, leave the group, prove the group object is freed."""
    os.environ["TRITON_INTERPRET"] = "1"  # the interpreter runs the Triton kernels on CPU tensors
    faulthandler.enable(all_threads=True)  # native crash -> every thread's Python stack on stderr
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # run_ranks' timeout asks for stacks
    wait = datetime.timedelta(seconds=timeout)
    store = dist.TCPStore(HOST, port, world_size=None, is_master=False, timeout=wait)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=wait)
    group = weakref.ref(dist.group.WORLD)
    del store  # the group holds what it needs; only the group may be left to free below
    try:
        fn(rank, world_size, *args)
    except BaseException as exc:
        # the traceback's frames (fn's locals) may reference the group: drop them so it is freed too;
        # the formatted traceback (file, line, code) survives for torch.multiprocessing to report
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        dist.destroy_process_group()
    gc.collect()
    if group() is not None:
        holders = sorted({type(r).__name__ for r in gc.get_referrers(group())})  # tracked containers only
        raise RuntimeError(
            f"rank {rank}: the process group is still referenced after destroy_process_group()"
            f"{f' (by {holders})' if holders else ''}; its gloo threads would run into interpreter shutdown "
            f"and abort the process at random. Keep the group out of module state, default arguments "
            f"(torch.distributed.nn.functional binds it when imported after init_process_group) and "
            f"autograd contexts that outlive the step.")


def run_ranks(fn, *args, world_size: int = 2, timeout: float = 120.0) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks in one gloo group.

    Args:
        fn: a module-level function of the test module (spawned processes import it by name).
        args: picklable arguments passed after ``rank, world_size``.
        world_size: number of ranks.
        timeout: seconds for the ranks' rendezvous and each collective; the whole run is given
            ``timeout + 30`` seconds before it is stopped as a hang.
    Raises:
        AssertionError: a rank raised (its traceback is in the message), died of a signal, or hung.
    """
    store = dist.TCPStore(HOST, 0, world_size=None, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout))
    ctx = mp.start_processes(_rank_main, args=(world_size, store.port, timeout, fn, args), nprocs=world_size,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout + 30.0
    try:
        while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                _stop_hung(ctx)
                raise AssertionError(f"{fn.__name__}: ranks still running after {timeout + 30:.0f} s (a hang); "
                                     f"their Python stacks are in the captured stderr above")
    except mp.ProcessRaisedException as exc:
        raise AssertionError(f"{fn.__name__}: a rank failed:{exc}") from None
    except mp.ProcessExitedException as exc:
        raise AssertionError(
            f"{fn.__name__}: rank {exc.error_index} died with {exc.signal_name or f'exit code {exc.exit_code}'}; "
            f"its stderr (above) has the native message and faulthandler's Python stacks") from None
    finally:
        del store


def _stop_hung(ctx) -> None:
    """Ask each live rank for its Python stacks (faulthandler on SIGUSR1), then kill it."""
    alive = [p for p in ctx.processes if p.is_alive()]
    for p in alive:
        os.kill(p.pid, signal.SIGUSR1)
    time.sleep(2.0)
    sys.stderr.flush()
    for p in alive:
        p.kill()
        p.join()
