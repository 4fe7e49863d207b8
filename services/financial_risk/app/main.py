"""financial_risk service: streaming fraud scoring and credit scoring (port 8003)."""

from __future__ import annotations

import asyncio
import threading

from backbone.service.app import create_service_app
from backbone.service.batching import batcher_hooks
from backbone.serving import DynamicBatcher
from fastapi import FastAPI

from services.financial_risk.app.api.routes import router
from services.financial_risk.app.core.config import Settings
from services.financial_risk.app.model import load_models
from services.financial_risk.features import FeatureEngine
from services.financial_risk.scoring import FraudScore, FraudScorer, ScoreRequest
from services.financial_risk.threshold import ThresholdController


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service; the feature state is warmed from the dataset in the background."""
    settings = settings or Settings()
    threshold = ThresholdController(
        settings.service_name,
        initial=0.5,
        mode=settings.threshold_mode,
        alert_budget=settings.alert_budget,
        target_precision=settings.target_precision,
        window=settings.threshold_window,
    )
    scorer = FraudScorer(FeatureEngine(), threshold, settings.service_name)

    async def start(app: FastAPI) -> None:
        runtime = app.state.runtime
        if runtime.model is not None:
            threshold.value = runtime.model.fraud.threshold
            threshold.set(value=threshold.value, mode=settings.threshold_mode)
        if settings.warm_from and settings.warm_until:
            threading.Thread(
                target=scorer.warm_from_dataset,
                args=(settings.data_dir, settings.warm_from, settings.warm_until, settings.warm_customers),
                name="feature-warmup",
                daemon=True,
            ).start()
        else:
            scorer.warm.done = True

    async def score_in_loop(items: list[ScoreRequest]) -> list[FraudScore | Exception]:
        # Scoring runs on the event loop's thread: it holds the GIL for the whole batch either way, and a
        # second thread would make the loop wait up to the interpreter's 5 ms switch interval for it.
        return scorer.score_requests(items)

    start_batcher, stop_batcher = batcher_hooks(
        "score_batcher",
        lambda: DynamicBatcher(
            score_in_loop,
            max_batch_size=settings.score_batch_size,
            max_wait_ms=settings.score_batch_wait_ms,
            max_queue_size=settings.score_queue_size,
            name="financial_risk_score",
        ),
    )

    def warm_check() -> tuple[bool, str]:
        w = scorer.warm
        if w.error:
            return False, f"warm-up failed: {w.error}"
        if not w.done:
            return False, f"warming: {w.events}/{w.total} transactions replayed"
        return True, "ok"

    async def stop_producer(app: FastAPI) -> None:
        producer = getattr(app.state, "producer", None)  # created by the first PUT /v1/threshold
        if producer is not None:
            await asyncio.to_thread(producer.close)

    app = create_service_app(
        settings,
        title="financial_risk",
        description="Card-transaction fraud scoring on streaming features (LightGBM, reason codes, "
        "dynamic threshold) and credit-application scoring.",
        load_model=load_models,
        routers=[router],
        needs_kafka=False,
        on_startup=[start, start_batcher],
        on_shutdown=[stop_batcher, stop_producer],
    )
    app.state.scorer = scorer
    app.state.runtime.extra_checks["feature_state"] = warm_check
    return app


app = create_app(Settings())
