"""financial_risk service settings (environment variables of the same name, upper case)."""

from __future__ import annotations

from typing import Literal

from backbone.service.config import ServiceSettings
from pydantic import Field


class Settings(ServiceSettings):
    """Settings of the financial_risk service."""

    service_name: str = "financial_risk"
    port: int = 8003
    warm_from: str = Field(
        default="2018-04-01",
        description="feature state: replay fraud_handbook_sim from this day at start-up ('' = start empty)",
    )
    warm_until: str = Field(
        default="2018-08-08",
        description="... up to (excluding) this day; live traffic continues from there",
    )
    warm_customers: int | None = Field(
        default=None, description="warm only a seeded sample of this many customers (tests)"
    )
    threshold_mode: str = Field(default="budget", description="fixed | budget | precision")
    alert_budget: float = Field(
        default=0.01, gt=0, lt=1, description="share of events to alert on (budget mode)"
    )
    target_precision: float = Field(default=0.8, gt=0, le=1, description="precision mode target")
    threshold_window: int = Field(
        default=20_000, ge=100, description="recent scores the threshold is set from"
    )
    max_batch: int = Field(default=1000, ge=1, description="largest /v1/score/batch request")
    reason_method: Literal["path", "shap"] = Field(
        default="path",
        description="reason codes: decision-path contributions (fast) or exact TreeSHAP (?explain=)",
    )
    score_batch_size: int = Field(default=64, ge=1, description="/v1/score: most requests per model call")
    score_batch_wait_ms: float = Field(
        default=1.0, ge=0, description="/v1/score: longest wait for more requests to join a model call"
    )
    score_queue_size: int = Field(default=2048, ge=1, description="/v1/score: queued requests before 503")
    # Kafka worker (python -m services.financial_risk.worker)
    transactions_topic: str = "transactions"
    scores_topic: str = "risk-scores"
    alerts_topic: str = "risk-alerts"
    feedback_topic: str = "risk-feedback"
    threshold_topic: str = Field(
        default="risk-threshold",
        description="threshold changes accepted over REST, applied by every stream worker",
    )
    worker_metrics_port: int = Field(
        default=0, ge=0, description="worker: serve Prometheus metrics on this port (0 = off)"
    )
    worker_group_id: str = "risk-scorer"
    checkpoint_every_s: float = Field(
        default=30.0,
        gt=0,
        description="worker: seconds between state checkpoints (a restart re-scores at most this much)",
    )
    checkpoint_dir: str = Field(
        default="", description="worker state checkpoints ('' = MODEL_DIR/../runs/...)"
    )
