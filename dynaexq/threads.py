"""Thread counts per thread, without touching torch's process-wide default.

In torch a thread's `torch.set_num_threads(n)` also becomes the default of every thread started after it, so a
background worker that limits itself that way puts the server's decode thread (started later) on n cores too.
`limit_this_thread(n)` sets only the calling thread's OpenMP team size: it lets torch initialize the thread, then
calls `omp_set_num_threads` of the OpenMP runtime torch itself loaded (a per-thread setting in OpenMP). Where that
runtime cannot be found (no libgomp/libiomp mapped, not Linux) it does nothing and says so once: the worker's
parallel torch ops then use torch's default team, which is correct, only busier.
`check_wait_policy()` (at load) names an OpenMP setting that makes every native call wake its threads.
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading

import torch

_lock = threading.Lock()
_omp: list = []  # [the OpenMP library or None], found once


def _openmp():
    with _lock:
        if not _omp:
            lib = None
            try:
                with open("/proc/self/maps") as fh:
                    paths = sorted({line.split()[-1] for line in fh if "libgomp" in line or "libiomp" in line})
                torch_own = [p for p in paths if "torch" in p] or paths
                lib = ctypes.CDLL(torch_own[0]) if torch_own else None
            except (OSError, IndexError):
                lib = None
            if lib is None:
                print("dynaexq: torch's OpenMP runtime was not found; background workers use torch's default thread "
                      "count", file=sys.stderr)
            _omp.append(lib)
        return _omp[0]


def limit_this_thread(n: int) -> None:
    """The calling thread's torch ops use at most n threads from now on; other threads are not affected."""
    torch.get_num_threads()  # torch initializes this thread's OpenMP setting from its default first
    lib = _openmp()
    if lib is not None:
        lib.omp_set_num_threads(int(n))


_warned: list = []


def check_wait_policy(env=os.environ) -> bool:
    """Say once (stderr) when OpenMP threads are told to sleep between parallel regions: every native kernel call
    then wakes its team (~25 us a call here), which made a batch-1 decode step of a 16-layer Qwen3-30B-A3B-shaped
    model 1.5x slower (51.6 -> 76.4 ms) and one of a small model 5x. -> whether it warned."""
    if env.get("OMP_WAIT_POLICY", "").strip().lower() != "passive" or _warned:
        return False
    _warned.append(True)
    print("dynaexq: OMP_WAIT_POLICY=passive makes every native kernel call wake its threads: decode runs up to "
          "several times slower (a 16-layer model 1.5x, a small one 5x); unset it for dynaexq", file=sys.stderr)
    return True
