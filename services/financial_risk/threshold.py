"""Dynamic alert threshold: fixed, alert budget (top share of recent scores) or target precision.

* ``fixed``: the threshold is what an operator set.
* ``budget``: the threshold is the (1 - budget) quantile of the last ``window`` scores, so the
  alert volume follows the configured share (e.g. top 1 %) as the score distribution drifts.
* ``precision``: scores are remembered until their label arrives on the feedback path; the
  threshold is the lowest score whose alerts reached ``target_precision`` among labelled
  recent events (falls back to the budget rule until ``min_alerts`` labelled alerts exist).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge

THRESHOLD = Gauge("fraud_alert_threshold", "Live fraud alert threshold.", ["service"])
ALERTS = Counter("fraud_alerts_total", "Transactions scored at or above the alert threshold.", ["service"])
SCORED = Counter("fraud_scored_total", "Transactions scored.", ["service", "path"])
MODES = ("fixed", "budget", "precision")


@dataclass
class ThresholdState:
    """What the threshold is and how it is set."""

    mode: str
    value: float
    alert_budget: float
    target_precision: float
    window: int
    observed: int
    labelled: int


class ThresholdController:
    """Thread-safe live threshold fed by scores and feedback labels."""

    def __init__(
        self,
        service: str,
        initial: float,
        mode: str = "budget",
        alert_budget: float = 0.01,
        target_precision: float = 0.8,
        window: int = 20_000,
        refresh_every: int = 100,
        min_scores: int = 1000,
        min_alerts: int = 20,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.service = service
        self.mode = mode
        self.value = float(initial)
        self.alert_budget = alert_budget
        self.target_precision = target_precision
        self.window = window
        self.refresh_every = refresh_every
        self.min_scores = min_scores
        self.min_alerts = min_alerts
        # the last ``window`` scores in a ring buffer (the quantile needs them as an array, not a deque)
        self._scores = np.empty(window, dtype=np.float64)
        self._n_scores = 0
        self._awaiting: OrderedDict[int, float] = OrderedDict()  # transaction id -> score
        self._labelled: deque[tuple[float, int]] = deque(maxlen=window)
        self._since = 0
        self.observed = 0
        self._lock = threading.Lock()
        THRESHOLD.labels(service).set(self.value)

    def observe(self, transaction_id: int, score: float) -> bool:
        """Record a score; returns whether it is an alert at the current threshold."""
        with self._lock:
            alert = score >= self.value
            self._scores[self.observed % self.window] = score
            if self._n_scores < self.window:
                self._n_scores += 1
            self._awaiting[transaction_id] = score
            while len(self._awaiting) > 4 * self.window:
                self._awaiting.popitem(last=False)
            self.observed += 1
            self._since += 1
            if self._since >= self.refresh_every:
                self._since = 0
                self._refresh()
        if alert:
            ALERTS.labels(self.service).inc()
        return alert

    def feedback(self, transaction_id: int, label: int) -> None:
        """A label arrived for a transaction scored earlier."""
        with self._lock:
            score = self._awaiting.pop(transaction_id, None)
            if score is not None:
                self._labelled.append((score, int(label)))

    def _budget_value(self) -> float | None:
        if self._n_scores < self.min_scores:
            return None
        return float(np.quantile(self._scores[: self._n_scores], 1.0 - self.alert_budget))

    def _precision_value(self) -> float | None:
        if not self._labelled:
            return None
        arr = np.asarray(self._labelled, dtype=np.float64)
        order = np.argsort(-arr[:, 0], kind="stable")
        s, y = arr[order, 0], arr[order, 1]
        prec = np.cumsum(y) / np.arange(1, len(y) + 1)
        ok = np.nonzero((prec >= self.target_precision) & (np.arange(1, len(y) + 1) >= self.min_alerts))[0]
        if not len(ok):
            return None
        return float(s[ok[-1]])

    def _refresh(self) -> None:
        new: float | None = None
        if self.mode == "budget":
            new = self._budget_value()
        elif self.mode == "precision":
            new = self._precision_value()
            if new is None:
                new = self._budget_value()
        if new is not None:
            self.value = new
            THRESHOLD.labels(self.service).set(new)

    def set(
        self,
        value: float | None = None,
        mode: str | None = None,
        alert_budget: float | None = None,
        target_precision: float | None = None,
    ) -> ThresholdState:
        """Operator change: a value (switches to ``fixed`` unless a mode is given) and/or a mode."""
        with self._lock:
            if mode is not None:
                if mode not in MODES:
                    raise ValueError(f"mode must be one of {MODES}")
                self.mode = mode
            elif value is not None:
                self.mode = "fixed"
            if alert_budget is not None:
                self.alert_budget = alert_budget
            if target_precision is not None:
                self.target_precision = target_precision
            if value is not None:
                self.value = float(value)
                THRESHOLD.labels(self.service).set(self.value)
            else:
                self._refresh()
            return self._state()

    def state(self) -> ThresholdState:
        with self._lock:
            return self._state()

    def _state(self) -> ThresholdState:
        return ThresholdState(
            mode=self.mode,
            value=self.value,
            alert_budget=self.alert_budget,
            target_precision=self.target_precision,
            window=self.window,
            observed=self.observed,
            labelled=len(self._labelled),
        )

    def as_dict(self) -> dict[str, Any]:
        return self.state().__dict__
