"""Forecasting service settings (environment variables of the same name, upper case)."""

from __future__ import annotations

from backbone.service.config import ServiceSettings
from pydantic import Field


class Settings(ServiceSettings):
    """Settings of the forecasting service."""

    service_name: str = "forecasting"
    port: int = 8004
    default_model: str = Field(
        default="ETTh1_h96", description="artifact name served when a request names none"
    )
    stream_model: str | None = Field(
        default=None,
        description="artifact used for the Kafka stream (default: CSI300_h* if present, else default)",
    )
    max_history: int = Field(default=20_000, description="longest accepted history (time steps)")
    max_variables: int = 64
    max_gap_fraction: float = Field(
        default=0.2, description="share of missing grid steps above which a history is rejected"
    )
    batch_max_size: int = 32
    batch_max_wait_ms: float = 2.0
    # Kafka stream
    ticks_topic: str = "market-ticks"
    forecasts_topic: str = "forecasts"
    stream_group_id: str = "forecasting-stream"
    stream_every_n: int = Field(default=5, ge=1, description="publish a forecast every N ticks per symbol")
    stream_horizon: int = Field(default=5, ge=1)
    stream_max_history: int = 2048
    stream_rebuild_records: int = Field(
        default=100_000, ge=0, description="ticks re-read per newly assigned partition (its histories)"
    )
