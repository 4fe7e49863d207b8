"""Serving a request through the app's :class:`~backbone.serving.DynamicBatcher` with HTTP errors."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fastapi import FastAPI

from backbone.service.errors import ServiceError
from backbone.serving import BatcherStoppedError, DynamicBatcher, QueueFullError, RequestTimeoutError

Item = TypeVar("Item")
Result = TypeVar("Result")


async def submit_batched(
    batcher: DynamicBatcher[Item, Result] | None,
    item: Item,
    run_batch: Callable[[list[Item]], Sequence[Result]],
    what: str = "request",
) -> Result:
    """``item``'s result from ``batcher`` when it is running, else ``run_batch([item])[0]`` in a thread.

    A full queue becomes HTTP 429 ``overloaded``, a request that waited past the batcher's timeout or a
    batcher stopping under it HTTP 503 ``timeout`` / ``unavailable``; errors of ``run_batch`` propagate.
    """
    if batcher is None or not batcher.running:
        return (await asyncio.to_thread(run_batch, [item]))[0]
    try:
        return await batcher.submit(item)
    except QueueFullError as exc:
        raise ServiceError(429, "overloaded", f"{what} queue is full; retry shortly") from exc
    except RequestTimeoutError as exc:
        raise ServiceError(503, "timeout", f"{what} timed out in the queue: {exc}") from exc
    except BatcherStoppedError as exc:
        raise ServiceError(503, "unavailable", f"{what} batcher stopped: {exc}") from exc


def batcher_hooks(
    attr: str, make: Callable[[], DynamicBatcher[Any, Any]]
) -> tuple[Callable[[FastAPI], Awaitable[None]], Callable[[FastAPI], Awaitable[None]]]:
    """Start / stop hooks for ``create_service_app``: the batcher ``make()`` builds lives in
    ``app.state.<attr>`` while the app runs (stopping drains what is queued)."""

    async def start(app: FastAPI) -> None:
        batcher = make()
        await batcher.start()
        setattr(app.state, attr, batcher)

    async def stop(app: FastAPI) -> None:
        batcher = getattr(app.state, attr, None)
        if batcher is not None:
            await batcher.stop()

    return start, stop
