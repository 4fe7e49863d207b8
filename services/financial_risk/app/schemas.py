"""Request and response models of the financial_risk service."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.financial_risk.events import Id, ThresholdSetting, event_time

MAX_AMOUNT = 1e8


class TransactionIn(BaseModel):
    """One card transaction to score."""

    model_config = ConfigDict(extra="forbid")

    transaction_id: Id = Field(description="unique id of the transaction")
    customer_id: Id
    terminal_id: Id
    timestamp: datetime = Field(description="ISO 8601; naive times are UTC; 1970 to a day from now")
    amount: float = Field(ge=0, le=MAX_AMOUNT, allow_inf_nan=False)
    update_state: bool = Field(
        default=True,
        description="add the transaction to the feature state (false: what-if score, state unchanged)",
    )

    @field_validator("timestamp")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        return event_time(v)

    def epoch_s(self) -> int:
        return int(self.timestamp.timestamp())


class Reason(BaseModel):
    """One reason code: a feature and how much it raised the score (log-odds contribution)."""

    feature: str
    value: float | None
    contribution: float


class ScoreOut(BaseModel):
    transaction_id: int
    score: float = Field(description="fraud probability")
    decision: Literal["alert", "approve"]
    threshold: float
    reasons: list[Reason]
    reason_method: Literal["path", "shap"] = Field(description="how the reason codes were computed")
    model_version: str
    latency_ms: float


class BatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    transactions: list[TransactionIn] = Field(min_length=1)


class BatchItemOut(BaseModel):
    """A result, or the reason this transaction could not be scored."""

    transaction_id: int
    result: ScoreOut | None = None
    error: str | None = None
    detail: str | None = None


class BatchOut(BaseModel):
    results: list[BatchItemOut]
    scored: int
    failed: int


class FeedbackIn(BaseModel):
    """A fraud label that became known (chargeback, investigation)."""

    model_config = ConfigDict(extra="forbid")

    transaction_id: Id
    label: Literal[0, 1]
    known_at: datetime | None = Field(default=None, description="when the label became known (default: now)")

    @field_validator("known_at")
    @classmethod
    def _utc(cls, v: datetime | None) -> datetime | None:
        return None if v is None else event_time(v)


class FeedbackOut(BaseModel):
    accepted: bool
    labels_applied: int
    labels_unmatched: int


class CreditApplication(BaseModel):
    """A credit application in the taiwan_default schema (amounts in NT dollars)."""

    model_config = ConfigDict(extra="forbid")

    limit_bal: float = Field(gt=0, le=1e8, allow_inf_nan=False, description="credit limit")
    sex: Literal[1, 2] = Field(description="1 male, 2 female")
    education: int = Field(ge=0, le=6)
    marriage: int = Field(ge=0, le=3)
    age: int = Field(ge=18, le=120)
    pay_0: int = Field(ge=-2, le=9, description="repayment status last month (-2..9)")
    pay_2: int = Field(ge=-2, le=9)
    pay_3: int = Field(ge=-2, le=9)
    pay_4: int = Field(ge=-2, le=9)
    pay_5: int = Field(ge=-2, le=9)
    pay_6: int = Field(ge=-2, le=9)
    bill_amt1: float = Field(ge=-1e8, le=1e8, allow_inf_nan=False)
    bill_amt2: float = Field(ge=-1e8, le=1e8, allow_inf_nan=False)
    bill_amt3: float = Field(ge=-1e8, le=1e8, allow_inf_nan=False)
    bill_amt4: float = Field(ge=-1e8, le=1e8, allow_inf_nan=False)
    bill_amt5: float = Field(ge=-1e8, le=1e8, allow_inf_nan=False)
    bill_amt6: float = Field(ge=-1e8, le=1e8, allow_inf_nan=False)
    pay_amt1: float = Field(ge=0, le=1e8, allow_inf_nan=False)
    pay_amt2: float = Field(ge=0, le=1e8, allow_inf_nan=False)
    pay_amt3: float = Field(ge=0, le=1e8, allow_inf_nan=False)
    pay_amt4: float = Field(ge=0, le=1e8, allow_inf_nan=False)
    pay_amt5: float = Field(ge=0, le=1e8, allow_inf_nan=False)
    pay_amt6: float = Field(ge=0, le=1e8, allow_inf_nan=False)

    def raw(self) -> dict[str, float]:
        return {k.upper(): float(v) for k, v in self.model_dump().items()}


class CreditScoreOut(BaseModel):
    score: float = Field(description="probability of default next month")
    decision: Literal["approve", "decline"]
    threshold: float
    reasons: list[Reason]
    reason_method: Literal["path", "shap"] = Field(description="how the reason codes were computed")
    model_version: str


class ThresholdOut(BaseModel):
    mode: str
    value: float
    alert_budget: float
    target_precision: float
    window: int
    observed: int
    labelled: int
    published_to: str | None = Field(
        default=None,
        description="PUT: the Kafka topic the change was published to, for the stream workers (None: this "
        "service runs without Kafka, the change applies to REST scoring only)",
    )


class ThresholdIn(ThresholdSetting):
    model_config = ConfigDict(extra="forbid")


class ModelOut(BaseModel):
    fraud: dict[str, Any]
    credit: dict[str, Any]
    feature_state: dict[str, Any]
