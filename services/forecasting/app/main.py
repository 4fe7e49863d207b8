"""Forecasting service (port 8004): REST forecasts / backtests and the market-ticks Kafka stream."""

from __future__ import annotations

from backbone.service.app import create_service_app
from backbone.service.batching import batcher_hooks
from backbone.serving import DynamicBatcher
from fastapi import FastAPI

from services.forecasting.app.api.routes import router, run_batch
from services.forecasting.app.core.config import Settings
from services.forecasting.app.model import load_models


def create_app(settings: Settings) -> FastAPI:
    """Build the app for ``settings`` (tests pass a tmp MODEL_DIR)."""

    start_batcher, stop_batcher = batcher_hooks(
        "batcher",
        lambda: DynamicBatcher(
            run_batch,
            max_batch_size=settings.batch_max_size,
            max_wait_ms=settings.batch_max_wait_ms,
            name="forecasting",
        ),
    )

    async def start_stream(app: FastAPI) -> None:
        from services.forecasting.app.stream import start_stream_worker

        app.state.stream = start_stream_worker(app.state.runtime, settings)

    async def stop_stream(app: FastAPI) -> None:
        worker = getattr(app.state, "stream", None)
        if worker is not None:
            worker.stop()

    use_kafka = bool(settings.kafka_bootstrap_servers)
    return create_service_app(
        settings,
        title="Forecasting",
        description="Multi-horizon forecasts with calibrated intervals (patch temporal-decay transformer).",
        load_model=load_models,
        routers=[router],
        needs_kafka=use_kafka,
        on_startup=[start_batcher, *([start_stream] if use_kafka else [])],
        on_shutdown=[*([stop_stream] if use_kafka else []), stop_batcher],
    )


app = create_app(Settings())
