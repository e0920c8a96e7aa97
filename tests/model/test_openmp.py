"""release_openmp_threads frees the calling thread's OpenMP pool, and torch works on afterwards."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from model.openmp import release_openmp_threads

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")


def _threads() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def test_a_thread_gives_back_its_pool_and_can_start_a_new_one() -> None:
    x = torch.randn(256, 256)
    seen: dict[str, set[str]] = {}
    released: list[bool] = []

    def work() -> None:
        before = torch.get_num_threads()
        torch.set_num_threads(3)  # a pool of 3: two worker threads besides this one
        try:
            seen["start"] = _threads()
            expected = x @ x
            seen["pool"] = _threads()
            released.append(release_openmp_threads())
            seen["released"] = _threads()
            torch.testing.assert_close(x @ x, expected)  # a new pool, the same answer
            seen["again"] = _threads()
            release_openmp_threads()
        finally:
            torch.set_num_threads(before)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    if released != [True]:
        pytest.skip("this process's OpenMP runtime has no omp_pause_resource_all")
    # Compared by thread id, so that other threads of the test process coming or going cannot mislead.
    workers = seen["pool"] - seen["start"]
    assert len(workers) >= 2
    assert not workers & seen["released"], "the pool's worker threads are still there"
    assert len(seen["again"] - seen["released"]) >= 2
