"""Kafka record schemas of the fraud stream (topics transactions, risk-feedback, risk-scores)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: ids are 64-bit in the feature state (larger ones are refused, not overflowed)
Id = Annotated[int, Field(ge=0, le=2**63 - 1)]
#: event times accepted: from the Unix epoch to a day past the wall clock (a transaction or a label from the
#: future would move its customer's clock ahead and reject every later event as out of order)
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
FUTURE_TOLERANCE = timedelta(days=1)


def _utc(v: datetime) -> datetime:
    return v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)


def event_time(v: datetime) -> datetime:
    """``v`` in UTC (naive = UTC); ValueError outside [1970, now + 1 day]."""
    v = _utc(v)
    if v < EARLIEST:
        raise ValueError(f"{v.isoformat()} is before 1970")
    if v > datetime.now(UTC) + FUTURE_TOLERANCE:
        raise ValueError(f"{v.isoformat()} is in the future")
    return v


class TransactionEvent(BaseModel):
    """A card transaction on ``transactions`` (key: customer id)."""

    model_config = ConfigDict(extra="ignore")

    transaction_id: Id
    customer_id: Id
    terminal_id: Id
    timestamp: datetime
    amount: float = Field(ge=0, le=1e8, allow_inf_nan=False)
    produced_at_ms: int | None = Field(default=None, description="wall clock when produced (latency)")

    @field_validator("timestamp")
    @classmethod
    def _ts(cls, v: datetime) -> datetime:
        return event_time(v)


class FeedbackEvent(BaseModel):
    """A fraud label on ``risk-feedback`` (key: customer id). ``terminal_id``, ``tx_timestamp`` and
    ``amount`` let workers that do not own the customer's partition update terminal features."""

    model_config = ConfigDict(extra="ignore")

    transaction_id: Id
    label: Literal[0, 1]
    known_at: datetime
    customer_id: Id | None = None
    terminal_id: Id | None = None
    tx_timestamp: datetime | None = None
    amount: float | None = Field(default=None, ge=0, allow_inf_nan=False)

    @field_validator("known_at", "tx_timestamp")
    @classmethod
    def _ts(cls, v: datetime | None) -> datetime | None:
        return None if v is None else event_time(v)


class ThresholdSetting(BaseModel):
    """A change of the live alert threshold: a value (the mode becomes ``fixed``) and/or the mode, alert
    budget or target precision (see :mod:`services.financial_risk.threshold`)."""

    value: float | None = Field(default=None, ge=0, le=1, description="fixed threshold (sets mode fixed)")
    mode: Literal["fixed", "budget", "precision"] | None = None
    alert_budget: float | None = Field(default=None, gt=0, lt=1)
    target_precision: float | None = Field(default=None, gt=0, le=1)


class ThresholdCommand(ThresholdSetting):
    """A threshold change on ``risk-threshold`` (key ``threshold``: one partition, in order), published by the
    REST service's authorised ``PUT /v1/threshold`` and applied by every stream worker (the latest wins)."""

    model_config = ConfigDict(extra="ignore")

    command_id: str
    issued_at: datetime
    issued_by: str = Field(description="the service that accepted the authorised call")


class ScoreEvent(BaseModel):
    """What the worker writes to ``risk-scores`` (and ``risk-alerts`` above the threshold)."""

    transaction_id: int
    customer_id: int
    terminal_id: int
    timestamp: datetime
    score: float
    decision: str
    threshold: float
    reasons: list[dict[str, Any]]
    reason_method: str = Field(default="path", description="path (decision-path) or shap (TreeSHAP)")
    model_version: str
    latency_ms: float | None = Field(description="produced -> scored, when the producer stamped it")
    scoring_ms: float
    partition: int
    offset: int
