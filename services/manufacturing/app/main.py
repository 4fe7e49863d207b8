"""Manufacturing inspection service (port 8002): defect classification, anomaly detection with per-line
memory banks and thresholds, heat maps, line registration; results to Kafka."""

from __future__ import annotations

import asyncio
import logging
import os

import torch
from backbone.service.app import create_service_app
from fastapi import FastAPI

from services.manufacturing.app.api.routes import router
from services.manufacturing.app.core.config import Settings
from services.manufacturing.app.model import load_inspection_model

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app for ``settings`` (tests point MODEL_DIR at a temporary directory)."""
    settings = settings or Settings()
    torch.set_num_threads(int(os.environ.get("TORCH_NUM_THREADS", "1")))

    async def start_kafka(app: FastAPI) -> None:
        app.state.line_tasks = set()
        app.state.producer = None
        if settings.kafka_bootstrap_servers:
            from backbone.kafka import JsonProducer

            try:
                app.state.producer = await asyncio.to_thread(
                    JsonProducer, settings.kafka_bootstrap_servers, f"{settings.service_name}-inspect"
                )
            except Exception as exc:  # /ready reports Kafka; inspections still answer (published=false)
                log.error("kafka producer not started: %s", exc)

    async def stop(app: FastAPI) -> None:
        for task in list(getattr(app.state, "line_tasks", ())):
            task.cancel()
        producer = getattr(app.state, "producer", None)
        if producer is not None:
            await asyncio.to_thread(producer.close)

    return create_service_app(
        settings,
        title="manufacturing inspection",
        description=__doc__ or "",
        load_model=load_inspection_model,
        routers=[router],
        needs_kafka=bool(settings.kafka_bootstrap_servers),
        on_startup=[start_kafka],
        on_shutdown=[stop],
    )


app = create_app(Settings())
