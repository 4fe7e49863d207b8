"""medical_imaging service: DICOM / NIfTI / PNG in, structured report with uncertainty out (port 8001)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from backbone.service.app import create_service_app
from fastapi import FastAPI

from services.medical_imaging.app.api.routes import JobStore, make_batcher, router
from services.medical_imaging.app.core.config import Settings
from services.medical_imaging.app.model import load_model

log = logging.getLogger("services.medical_imaging")
# pydicom may log element values (which can be identifiers) while parsing: keep it quiet
logging.getLogger("pydicom").setLevel(logging.ERROR)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service for ``settings`` (tests point MODEL_DIR at a temporary directory)."""
    settings = settings or Settings()
    state: dict[str, Any] = {}

    async def start(app: FastAPI) -> None:
        app.state.jobs = JobStore(settings.max_jobs)
        batcher = make_batcher(app.state.runtime, settings)
        await batcher.start()
        app.state.batcher = batcher
        if settings.kafka_bootstrap_servers:
            from services.medical_imaging.app.kafka_worker import make_processor

            def current_model() -> Any:
                return app.state.runtime.require_model()

            try:
                processor = await asyncio.to_thread(make_processor, current_model, settings)
            except Exception as exc:  # /ready reports Kafka as unreachable; the REST API keeps working
                log.error("kafka consumer not started: %s", exc)
            else:
                state["processor"] = processor
                state["thread"] = processor.run_in_thread(name="medical-imaging-kafka")

    async def stop(app: FastAPI) -> None:
        processor = state.pop("processor", None)
        if processor is not None:
            processor.stop()
            thread = state.pop("thread", None)
            if thread is not None:
                await asyncio.to_thread(thread.join, 30)
        for task in list(getattr(app.state, "jobs", JobStore(1)).tasks):
            task.cancel()
        batcher = getattr(app.state, "batcher", None)
        if batcher is not None:
            await batcher.stop()

    app = create_service_app(
        settings,
        title="medical_imaging",
        description="Chest X-ray (2-D) and CT-derived (3-D) classification with MONAI + MoE/sparse-attention "
        "hybrids; structured reports with MC-dropout / TTA uncertainty, saliency and DICOM SR.",
        load_model=load_model,
        routers=[router],
        needs_kafka=bool(settings.kafka_bootstrap_servers),
        on_startup=[start],
        on_shutdown=[stop],
    )
    app.state.jobs = JobStore(settings.max_jobs)
    return app


app = create_app(Settings())
