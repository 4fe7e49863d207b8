"""Dynamic micro-batching for model serving (asyncio; modelled on the Triton dynamic batcher).

Callers ``await batcher.submit(item)``; a single worker task collects queued requests into a batch until
``max_batch_size`` is reached or ``max_wait_ms`` has passed since the first request of the batch, runs
``process_batch(items) -> results`` (a sync function runs in a one-thread executor so the event loop stays
free; an async function is awaited) and hands ``results[i]`` back to the caller of ``items[i]``.

* bounded queue: ``submit`` raises :class:`QueueFullError` at once when ``max_queue_size`` requests wait;
* per-request timeout: :class:`RequestTimeoutError`; a timed-out request that has not started is skipped,
  one already in a running batch has its result discarded;
* an exception in ``process_batch`` fails that batch's requests only;
* ``stop(drain=True)`` serves what is queued; ``stop(drain=False)`` fails it (:class:`BatcherStoppedError`);
* Prometheus metrics labelled by batcher ``name`` (default registry: ``prometheus_client.REGISTRY``, the one
  ``backbone.service.metrics`` exposes), created once per registry so many batchers coexist.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

__all__ = [
    "BatcherStoppedError",
    "DynamicBatcher",
    "QueueFullError",
    "RequestTimeoutError",
]

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")

DEFAULT_REGISTRY: CollectorRegistry = REGISTRY


class QueueFullError(RuntimeError):
    """The batcher queue is full (map to HTTP 429 / 503)."""


class RequestTimeoutError(TimeoutError):
    """The request was not answered within ``request_timeout_s`` (map to HTTP 504)."""


class BatcherStoppedError(RuntimeError):
    """The batcher is not running, or was stopped before the request was served (map to HTTP 503)."""


@dataclass
class _Metrics:
    batch_size: Histogram
    queue_wait: Histogram
    process_time: Histogram
    queue_depth: Gauge
    rejected: Counter
    failed_batches: Counter


_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = weakref.WeakKeyDictionary()
_METRICS_LOCK = threading.Lock()


def _metrics(registry: CollectorRegistry) -> _Metrics:
    """Metric families of ``registry``, created on first use."""
    with _METRICS_LOCK:
        if registry not in _METRICS:
            sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256)
            seconds = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
            kw: dict[str, Any] = {"labelnames": ["batcher"], "registry": registry}
            _METRICS[registry] = _Metrics(
                batch_size=Histogram("batcher_batch_size", "Requests per batch.", buckets=sizes, **kw),
                queue_wait=Histogram(
                    "batcher_queue_wait_seconds", "Time from submit to batch start.", buckets=seconds, **kw
                ),
                process_time=Histogram(
                    "batcher_process_seconds", "process_batch duration.", buckets=seconds, **kw
                ),
                queue_depth=Gauge("batcher_queue_depth", "Requests waiting in the queue.", **kw),
                rejected=Counter(
                    "batcher_rejected", "Requests not served, by reason.",
                    labelnames=["batcher", "reason"], registry=registry,
                ),
                failed_batches=Counter("batcher_failed_batches", "Batches whose process_batch raised.", **kw),
            )
        return _METRICS[registry]


@dataclass
class _Request:
    item: Any
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


_STOP = object()


class DynamicBatcher(Generic[Item, Result]):
    """Asyncio micro-batcher around ``process_batch(list[Item]) -> list[Result]`` (sync or async)."""

    def __init__(
        self,
        process_batch: Callable[[list[Item]], Sequence[Result] | Awaitable[Sequence[Result]]],
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue_size: int = 1024,
        request_timeout_s: float | None = 30.0,
        name: str = "default",
        registry: CollectorRegistry | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1:
            raise ValueError("max_batch_size and max_queue_size must be >= 1")
        self.process_batch = process_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1e3
        self.max_queue_size = max_queue_size
        self.request_timeout_s = request_timeout_s
        self.name = name
        self._is_async = inspect.iscoroutinefunction(process_batch) or inspect.iscoroutinefunction(
            type(process_batch).__call__  # objects with an ``async def __call__``
        )
        m = _metrics(registry or DEFAULT_REGISTRY)
        self._m_batch_size = m.batch_size.labels(name)
        self._m_queue_wait = m.queue_wait.labels(name)
        self._m_process = m.process_time.labels(name)
        self._m_depth = m.queue_depth.labels(name)
        self._m_rejected = {r: m.rejected.labels(name, r) for r in ("queue_full", "timeout", "stopped")}
        self._m_failed = m.failed_batches.labels(name)
        self._queue: asyncio.Queue[Any] | None = None
        self._pending = 0  # requests in the queue (excluding the stop marker)
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._accepting = False
        self.batches = 0
        self.served = 0

    # ------------------------------------------------------------------ lifecycle
    @property
    def running(self) -> bool:
        return self._accepting

    @property
    def queue_depth(self) -> int:
        return self._pending

    async def start(self) -> None:
        """Start the worker task (idempotent)."""
        if self._accepting:
            return
        self._queue = asyncio.Queue()
        self._pending = 0
        if not self._is_async:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batcher-{self.name}")
        self._worker = asyncio.create_task(self._run(), name=f"batcher-{self.name}")
        self._accepting = True

    async def stop(self, drain: bool = True) -> None:
        """Stop accepting requests; serve the queued ones (``drain``) or fail them with
        :class:`BatcherStoppedError`; wait for the running batch, then end the worker."""
        if self._worker is None or self._queue is None:
            return
        self._accepting = False
        if not drain:
            while not self._queue.empty():
                req = self._queue.get_nowait()
                if req is not _STOP:
                    self._dequeued(req)
                    self._fail(req, BatcherStoppedError(f"batcher {self.name!r} stopped"), "stopped")
        self._queue.put_nowait(_STOP)
        try:
            await self._worker
        finally:
            self._worker = None
            if self._executor is not None:
                self._executor.shutdown(wait=False)
                self._executor = None

    async def __aenter__(self) -> DynamicBatcher[Item, Result]:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ requests
    async def submit(self, item: Item, timeout_s: float | None = None) -> Result:
        """Queue ``item`` and wait for its result.

        Raises :class:`QueueFullError` (queue full, immediately), :class:`RequestTimeoutError`,
        :class:`BatcherStoppedError`, or the exception ``process_batch`` raised for this batch.
        """
        if not self._accepting or self._queue is None:
            self._m_rejected["stopped"].inc()
            raise BatcherStoppedError(f"batcher {self.name!r} is not running")
        if self._pending >= self.max_queue_size:
            self._m_rejected["queue_full"].inc()
            raise QueueFullError(f"batcher {self.name!r}: queue full ({self.max_queue_size} waiting)")
        req = _Request(item, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(req)
        self._pending += 1
        self._m_depth.set(self._pending)
        timeout = self.request_timeout_s if timeout_s is None else timeout_s
        try:
            return await asyncio.wait_for(req.future, timeout)  # cancels the future on timeout
        except TimeoutError:
            self._m_rejected["timeout"].inc()
            raise RequestTimeoutError(f"batcher {self.name!r}: no result within {timeout:.3g} s") from None

    # ------------------------------------------------------------------ worker
    def _dequeued(self, req: _Request) -> None:
        self._pending -= 1
        self._m_depth.set(self._pending)

    def _fail(self, req: _Request, exc: BaseException, reason: str | None = None) -> None:
        if not req.future.done():
            req.future.set_exception(exc)
            if reason:
                self._m_rejected[reason].inc()

    async def _next_batch(self) -> tuple[list[_Request], bool]:
        """Block for a first live request, then gather more until full or ``max_wait`` is over."""
        assert self._queue is not None
        batch: list[_Request] = []
        stop = False
        deadline = None
        loop = asyncio.get_running_loop()
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                req = self._queue.get_nowait()
            elif deadline is None:  # nothing yet: wait as long as it takes
                req = await self._queue.get()
            else:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    req = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if req is _STOP:
                stop = True
                break
            self._dequeued(req)
            if req.future.done():  # timed out or cancelled while queued: never processed
                continue
            batch.append(req)
            if deadline is None:
                deadline = loop.time() + self.max_wait_s
        return batch, stop

    async def _run(self) -> None:
        while True:
            batch, stop = await self._next_batch()
            if batch:
                await self._execute(batch)
            if stop:
                return

    async def _execute(self, batch: list[_Request]) -> None:
        started = time.perf_counter()
        for req in batch:
            self._m_queue_wait.observe(started - req.enqueued)
        self._m_batch_size.observe(len(batch))
        items = [req.item for req in batch]
        try:
            if self._is_async:
                results = await self.process_batch(items)  # type: ignore[misc]
            else:
                loop = asyncio.get_running_loop()
                results = await loop.run_in_executor(self._executor, self.process_batch, items)
            results = list(results)  # type: ignore[arg-type]
            if len(results) != len(batch):
                raise ValueError(f"process_batch returned {len(results)} results for {len(batch)} items")
        except Exception as exc:  # noqa: BLE001 - the batch fails, the batcher goes on
            self._m_failed.inc()
            log.warning("batcher %s: batch of %d failed: %r", self.name, len(batch), exc)
            for req in batch:
                self._fail(req, exc)
            return
        finally:
            self._m_process.observe(time.perf_counter() - started)
            self.batches += 1
        for req, result in zip(batch, results, strict=True):
            if not req.future.done():  # timed-out callers: result discarded
                req.future.set_result(result)
        self.served += len(batch)
