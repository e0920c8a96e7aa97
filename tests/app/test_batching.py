"""MicroBatcher: concurrent requests share one call; a bad one fails alone; the idle hook runs when idle."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from app.batching import MicroBatcher


def test_concurrent_requests_share_one_call_in_order() -> None:
    calls: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        calls.append(list(items))
        return [2 * i for i in items]

    async def main() -> list[int]:
        batcher = MicroBatcher(double, max_size=8, max_wait_s=0.05, name="t")
        await batcher.start()
        try:
            return list(await asyncio.gather(*(batcher.submit(i) for i in range(5))))
        finally:
            await batcher.stop()

    assert asyncio.run(main()) == [0, 2, 4, 6, 8]
    assert calls == [[0, 1, 2, 3, 4]]


def test_a_failing_request_fails_alone() -> None:
    def check(items: list[int]) -> list[int]:
        if 3 in items:
            raise ValueError("three")
        return items

    async def main() -> list[object]:
        batcher = MicroBatcher(check, max_size=8, max_wait_s=0.05, name="t")
        await batcher.start()
        try:
            return list(await asyncio.gather(*(batcher.submit(i) for i in range(5)), return_exceptions=True))
        finally:
            await batcher.stop()

    out = asyncio.run(main())
    assert out[:3] == [0, 1, 2] and out[4] == 4
    assert isinstance(out[3], ValueError)


def test_the_idle_hook_runs_in_the_batch_thread_once_per_idle_spell() -> None:
    batch_threads: set[int] = set()
    idle_threads: list[int] = []

    def echo(items: list[int]) -> list[int]:
        batch_threads.add(threading.get_ident())
        return items

    async def main() -> tuple[int, int, int]:
        batcher = MicroBatcher(
            echo,
            max_size=4,
            max_wait_s=0.0,
            name="t",
            on_idle=lambda: idle_threads.append(threading.get_ident()),
            idle_after_s=0.2,
        )
        await batcher.start()
        try:
            for i in range(10):  # steady traffic, a request every 20 ms: never idle
                assert await batcher.submit(i) == i
                await asyncio.sleep(0.02)
            busy = len(idle_threads)
            await asyncio.sleep(0.7)  # one idle spell, however long, runs the hook once
            first_spell = len(idle_threads)
            await batcher.submit(99)
            await asyncio.sleep(0.4)  # a request ends the spell; the next one runs it again
            return busy, first_spell, len(idle_threads)
        finally:
            await batcher.stop()

    assert asyncio.run(main()) == (0, 1, 2)
    assert set(idle_threads) == batch_threads and len(batch_threads) == 1


def test_a_failing_idle_hook_does_not_stop_the_batcher() -> None:
    def boom() -> None:
        raise RuntimeError("idle hook")

    async def main() -> int:
        batcher = MicroBatcher(lambda xs: xs, max_size=4, max_wait_s=0.0, name="t", on_idle=boom,
                               idle_after_s=0.05)  # fmt: skip
        await batcher.start()
        try:
            await asyncio.sleep(0.2)
            return await batcher.submit(7)
        finally:
            await batcher.stop()

    assert asyncio.run(main()) == 7


@pytest.mark.parametrize("kwargs", [{"max_size": 0}, {"max_wait_s": -1.0}, {"idle_after_s": 0.0}])
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    settings = {"max_size": 4, "max_wait_s": 0.0, **kwargs}
    with pytest.raises(ValueError):
        MicroBatcher(lambda xs: xs, name="t", **settings)  # type: ignore[arg-type]


def test_a_lone_client_does_not_wait_for_company() -> None:
    async def main() -> float:
        batcher = MicroBatcher(lambda xs: xs, max_size=8, max_wait_s=0.5, name="t")
        await batcher.start()
        try:
            started = time.perf_counter()
            for i in range(4):  # one client, one request after another
                assert await batcher.submit(i) == i
            return time.perf_counter() - started
        finally:
            await batcher.stop()

    assert asyncio.run(main()) < 0.5  # waiting for company would take at least 4 x 0.5 s


def test_two_clients_out_of_step_end_up_in_one_batch() -> None:
    sizes: list[int] = []

    def slow(items: list[int]) -> list[int]:
        sizes.append(len(items))
        time.sleep(0.02)
        return items

    async def main() -> None:
        batcher = MicroBatcher(slow, max_size=8, max_wait_s=0.1, name="t")
        await batcher.start()

        async def client(c: int) -> None:
            await asyncio.sleep(0.005 * c)  # out of step: the second comes while the first one's batch runs
            for i in range(6):
                assert await batcher.submit(10 * c + i) == 10 * c + i

        try:
            await asyncio.gather(client(0), client(1))
        finally:
            await batcher.stop()

    asyncio.run(main())
    # The request that came while a batch ran waited for the other client's next one.
    assert sum(sizes) == 12 and sizes.count(2) >= 4
