"""DynamicBatcher: result routing, batch formation, back-pressure, timeouts, failures, shutdown, metrics."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
from backbone.serving import (
    BatcherStoppedError,
    DynamicBatcher,
    QueueFullError,
    RequestTimeoutError,
)
from prometheus_client import CollectorRegistry


class Recorder:
    """Sync process_batch that doubles items, records batches, and can be held on a gate."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def __call__(self, items: list[int]) -> list[int]:
        self.started.set()
        self.gate.wait(5)
        if self.delay_s:
            time.sleep(self.delay_s)
        self.batches.append(list(items))
        return [2 * x for x in items]


def sample(registry: CollectorRegistry, metric: str, **labels: str) -> float:
    return registry.get_sample_value(metric, labels) or 0.0


def test_concurrent_submits_get_their_own_results_in_batches() -> None:
    registry = CollectorRegistry()
    rec = Recorder(delay_s=0.005)

    async def main() -> list[int]:
        b = DynamicBatcher(rec, max_batch_size=16, max_wait_ms=10, name="double", registry=registry)
        async with b:
            return await asyncio.gather(*(b.submit(i) for i in range(200)))

    assert asyncio.run(main()) == [2 * i for i in range(200)]
    sizes = [len(batch) for batch in rec.batches]
    assert sum(sizes) == 200 and max(sizes) > 1 and max(sizes) <= 16
    assert all(batch == sorted(batch) for batch in rec.batches)  # FIFO inside a batch
    assert sample(registry, "batcher_batch_size_count", batcher="double") == len(sizes)
    assert sample(registry, "batcher_batch_size_sum", batcher="double") == 200
    assert sample(registry, "batcher_queue_wait_seconds_count", batcher="double") == 200
    assert sample(registry, "batcher_queue_depth", batcher="double") == 0


def test_async_process_batch_and_max_wait_forms_batches() -> None:
    seen: list[int] = []

    async def process(items: list[str]) -> list[str]:
        seen.append(len(items))
        await asyncio.sleep(0)
        return [s.upper() for s in items]

    async def main() -> list[str]:
        b = DynamicBatcher(process, max_batch_size=8, max_wait_ms=200, registry=CollectorRegistry())
        await b.start()
        tasks = []
        for word in ["a", "b", "c"]:  # trickle in: the 200 ms window still groups them
            tasks.append(asyncio.create_task(b.submit(word)))
            await asyncio.sleep(0.005)
        out = await asyncio.gather(*tasks)
        await b.stop()
        return out

    assert asyncio.run(main()) == ["A", "B", "C"]
    assert seen == [3]


def test_queue_full_rejected_immediately() -> None:
    registry = CollectorRegistry()
    rec = Recorder()
    rec.gate.clear()

    async def main() -> None:
        b = DynamicBatcher(
            rec, max_batch_size=1, max_wait_ms=0, max_queue_size=2, name="q", registry=registry
        )
        async with b:
            first = asyncio.create_task(b.submit(1))
            await asyncio.to_thread(rec.started.wait, 5)  # item 1 is being processed, queue empty
            queued = [asyncio.create_task(b.submit(i)) for i in (2, 3)]
            await asyncio.sleep(0.01)
            assert b.queue_depth == 2
            t0 = time.perf_counter()
            with pytest.raises(QueueFullError):
                await b.submit(4)
            assert time.perf_counter() - t0 < 0.5
            rec.gate.set()
            assert await asyncio.gather(first, *queued) == [2, 4, 6]

    asyncio.run(main())
    assert rec.batches == [[1], [2], [3]]
    assert sample(registry, "batcher_rejected_total", batcher="q", reason="queue_full") == 1


def test_timeout_and_queued_timed_out_request_is_never_processed() -> None:
    registry = CollectorRegistry()
    rec = Recorder()
    rec.gate.clear()

    async def main() -> None:
        b = DynamicBatcher(
            rec, max_batch_size=1, max_wait_ms=0, request_timeout_s=5, name="t", registry=registry
        )
        async with b:
            running = asyncio.create_task(b.submit(1, timeout_s=0.1))
            await asyncio.to_thread(rec.started.wait, 5)
            with pytest.raises(RequestTimeoutError):  # waits in the queue behind the held batch
                await b.submit(2, timeout_s=0.05)
            with pytest.raises(RequestTimeoutError):  # started, result discarded
                await running
            rec.gate.set()
            assert await b.submit(3) == 6

    asyncio.run(main())
    assert rec.batches == [[1], [3]]  # 2 timed out before starting: never processed
    assert sample(registry, "batcher_rejected_total", batcher="t", reason="timeout") == 2


def test_exception_fails_only_its_batch() -> None:
    registry = CollectorRegistry()

    def process(items: list[int]) -> list[int]:
        if any(x < 0 for x in items):
            raise ValueError("negative input")
        return [x + 1 for x in items]

    async def main() -> None:
        b = DynamicBatcher(process, max_batch_size=4, max_wait_ms=20, name="e", registry=registry)
        async with b:
            bad = await asyncio.gather(b.submit(1), b.submit(-1), b.submit(2), return_exceptions=True)
            assert all(isinstance(r, ValueError) for r in bad)
            assert await asyncio.gather(b.submit(5), b.submit(6)) == [6, 7]

    asyncio.run(main())
    assert sample(registry, "batcher_failed_batches_total", batcher="e") == 1


def test_wrong_number_of_results_fails_the_batch() -> None:
    async def main() -> None:
        async with DynamicBatcher(lambda xs: xs[:-1], max_batch_size=2, registry=CollectorRegistry()) as b:
            with pytest.raises(ValueError, match="results"):
                await b.submit(1)

    asyncio.run(main())


def test_stop_drains_or_fails_pending_requests() -> None:
    async def run(drain: bool) -> tuple[list, Recorder]:
        rec = Recorder()
        rec.gate.clear()
        b = DynamicBatcher(rec, max_batch_size=2, max_wait_ms=0, registry=CollectorRegistry())
        await b.start()
        tasks = [asyncio.create_task(b.submit(i)) for i in range(5)]
        await asyncio.to_thread(rec.started.wait, 5)
        stopping = asyncio.create_task(b.stop(drain=drain))
        await asyncio.sleep(0.01)
        with pytest.raises(BatcherStoppedError):  # no new requests once stopping
            await b.submit(99)
        rec.gate.set()
        await stopping
        assert not b.running
        return await asyncio.gather(*tasks, return_exceptions=True), rec

    drained, rec = asyncio.run(run(drain=True))
    assert drained == [0, 2, 4, 6, 8] and sum(map(len, rec.batches)) == 5

    failed, rec = asyncio.run(run(drain=False))
    assert failed[:2] == [0, 2]  # the running batch completes
    assert all(isinstance(r, BatcherStoppedError) for r in failed[2:])
    assert rec.batches == [[0, 1]]


def test_not_started_and_restart() -> None:
    async def main() -> None:
        b = DynamicBatcher(lambda xs: xs, registry=CollectorRegistry())
        with pytest.raises(BatcherStoppedError):
            await b.submit(1)
        async with b:
            assert await b.submit(1) == 1
        async with b:
            assert await b.submit(2) == 2

    asyncio.run(main())


def test_many_batchers_share_a_registry() -> None:
    registry = CollectorRegistry()

    async def main() -> None:
        batchers = [DynamicBatcher(lambda xs: xs, name=f"m{i}", registry=registry) for i in range(3)]
        batchers.append(DynamicBatcher(lambda xs: xs, name="m0", registry=registry))  # same series
        DynamicBatcher(lambda xs: xs, name="on-default-registry")
        DynamicBatcher(lambda xs: xs, name="on-default-registry")
        for b in batchers:
            async with b:
                await b.submit(0)

    asyncio.run(main())
    assert sample(registry, "batcher_batch_size_count", batcher="m0") == 2
    assert sample(registry, "batcher_batch_size_count", batcher="m2") == 1
