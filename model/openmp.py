"""OpenMP thread pools: let a thread that is done with torch for a while give its pool back.

torch's CPU kernels (and faiss's, which share the runtime) run on an OpenMP thread pool that belongs to
the calling thread and lives as long as that thread. With two pools alive in one process, say the
service's search thread and an idle ingest thread or the thread that loaded the model, libgomp counts
more threads than cores and stops spinning at its barriers: every parallel op then waits for a
sleeping worker to wake up (the cost, measured: docs/BENCHMARKS.md, "Search", fault 2).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: release the threads, keep nothing that must survive


@functools.cache
def _pause_resource_all() -> Callable[[int], int] | None:
    """omp_pause_resource_all of the OpenMP runtime torch loaded into the global scope, if it has one."""
    try:
        fn = ctypes.CDLL(None).omp_pause_resource_all  # OpenMP 5.0; libgomp >= 9, LLVM libomp
    except (AttributeError, OSError):
        logger.debug("no omp_pause_resource_all in this process: OpenMP pools are left alone")
        return None
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return fn  # type: ignore[no-any-return]


def release_openmp_threads() -> bool:
    """Free the calling thread's OpenMP pool; its next parallel op starts a new one (well under a ms).

    Call it from a thread that has run torch ops and will now be idle for a while. Returns False when
    the runtime cannot do it (no OpenMP 5.0 pause in this process) or refused (inside a parallel region).
    """
    fn = _pause_resource_all()
    return fn is not None and fn(_OMP_PAUSE_SOFT) == 0
