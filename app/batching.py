"""Micro-batching: concurrent requests are collected into one call of a blocking batch function."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

from starlette.concurrency import run_in_threadpool

from app.errors import AppError

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class BatcherClosedError(AppError, RuntimeError):
    """The batcher was stopped (the service is shutting down) before the request ran."""


class MicroBatcher(Generic[T, R]):
    """Runs `fn(items) -> results` (same length, same order) in one dedicated thread, a batch at a time.

    A batch starts with the first waiting request and takes whatever else arrives within `max_wait_s`,
    up to `max_size`. While a batch runs, new requests queue up and form the next one, so under load
    batches fill without waiting. A request that comes alone while nothing runs, after a batch that was
    alone too (one client searching on its own), does not wait at all: nothing suggests company, and
    waiting would only add `max_wait_s` to its latency. `max_size == 1` turns batching off: each request
    then runs on its own in the shared thread pool, as a service without batching would.
    """

    def __init__(
        self,
        fn: Callable[[list[T]], list[R]],
        max_size: int,
        max_wait_s: float,
        name: str,
        *,
        on_idle: Callable[[], object] | None = None,
        idle_after_s: float = 1.0,
    ) -> None:
        """`on_idle` runs in the batch thread once each time no request has come for `idle_after_s`."""
        if max_size < 1 or max_wait_s < 0 or idle_after_s <= 0:
            raise ValueError(
                f"max_size must be >= 1, max_wait_s >= 0 and idle_after_s > 0, got {max_size}, {max_wait_s}, "
                f"{idle_after_s}"
            )
        self._fn = fn
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self._name = name
        self._on_idle = on_idle
        self.idle_after_s = idle_after_s
        self._pending: collections.deque[tuple[T, asyncio.Future[R]]] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self._running = False  # a batch is in the thread now
        self._company = False  # a request arrived while one ran: others are searching too

    @property
    def enabled(self) -> bool:
        return self.max_size > 1

    async def start(self) -> None:
        """Start the collecting task on the running event loop (called from the app's lifespan)."""
        if not self.enabled or self._task is not None:
            return
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=self._name)
        self._task = asyncio.create_task(self._collect(), name=f"{self._name}-collector")

    async def stop(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._pending:
            _, fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(BatcherClosedError("the service is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def submit(self, item: T) -> R:
        if self._closed:
            raise BatcherClosedError("the service is shutting down")
        if not self.enabled:
            return (await run_in_threadpool(self._fn, [item]))[0]
        if self._task is None or self._arrived is None:
            raise BatcherClosedError("the batcher was not started; call start() inside the app lifespan")
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._company |= self._running
        self._pending.append((item, fut))
        self._arrived.set()
        return await fut

    async def _collect(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        idle = False
        last_size = 0
        while True:
            while not self._pending:
                self._arrived.clear()
                if idle or self._on_idle is None:
                    await self._arrived.wait()
                    continue
                try:
                    await asyncio.wait_for(self._arrived.wait(), self.idle_after_s)
                except TimeoutError:
                    idle = True
                    await self._idle(loop)
            idle = False
            alone = len(self._pending) == 1 and last_size <= 1 and not self._company
            deadline = loop.time() + (0.0 if alone else self.max_wait_s)
            while len(self._pending) < self.max_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    # An Event, not queue.get under wait_for: a timed-out wait can never drop a request.
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
            batch = [self._pending.popleft() for _ in range(min(self.max_size, len(self._pending)))]
            batch = [(item, fut) for item, fut in batch if not fut.done()]  # clients that gave up
            last_size, self._company = len(batch), False
            if batch:
                self._running = True
                try:
                    await self._run(loop, batch)
                finally:
                    self._running = False

    async def _idle(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._on_idle is not None
        try:
            await loop.run_in_executor(self._executor, self._on_idle)
        except Exception:
            logger.exception("the idle hook of %s failed", self._name)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        items = [item for item, _ in batch]
        try:
            results = await loop.run_in_executor(self._executor, self._fn, items)
        except Exception as e:
            if len(batch) == 1:
                _settle(batch[0][1], error=e)
                return
            # One bad request must not fail the others: retry each on its own to find it.
            logger.warning("a batch of %d failed (%s); retrying its requests one by one", len(batch), e)
            for item, fut in batch:
                try:
                    (result,) = await loop.run_in_executor(self._executor, self._fn, [item])
                except Exception as item_error:
                    _settle(fut, error=item_error)
                else:
                    _settle(fut, result=result)
            return
        for (_, fut), result in zip(batch, results, strict=True):
            _settle(fut, result=result)


def _settle(fut: asyncio.Future[R], result: R | None = None, error: BaseException | None = None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)  # type: ignore[arg-type]
