"""Kafka stream: ``market-ticks`` -> rolling history per symbol -> ``forecasts`` every N ticks.

Ticks are ``{"timestamp", "symbol", "value"}``. Records that are not JSON, fail validation, or arrive out
of time order for their symbol go to ``market-ticks.dlq`` with the reason (backbone's StreamProcessor).
Every ``stream_every_n``-th valid tick of a symbol whose history covers the model's lookback produces
one forecast record (key = symbol) with point forecasts and the calibrated 90 % interval.

The histories live in memory and are rebuilt from the topic itself: before the first batch of a newly
assigned partition is handled (a start, a restart, a rebalance), the ticks before that batch (at most
``stream_rebuild_records`` of them) are re-read and applied without publishing, so forecasts go on at once
instead of after another lookback of ticks.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pandas as pd
from backbone.kafka import DeadLetter, Message, Output, StreamProcessor, decode_value, read_before
from backbone.service.app import ServiceRuntime
from kafka import TopicPartition
from kafka.errors import KafkaError
from pydantic import AwareDatetime, BaseModel, Field, NaiveDatetime, field_validator

from services.forecasting.app.core.config import Settings
from services.forecasting.ml.data import MAX_ABS_VALUE

log = logging.getLogger(__name__)


class Tick(BaseModel):
    """One market tick."""

    timestamp: AwareDatetime | NaiveDatetime
    symbol: str = Field(..., min_length=1, max_length=64)
    value: float

    @field_validator("value")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("value must be finite")
        if abs(v) > MAX_ABS_VALUE:
            raise ValueError(f"value beyond +-{MAX_ABS_VALUE:g} (the models compute in float32)")
        return v


class ForecastPoint(BaseModel):
    step: int
    timestamp: str
    point: float
    lower: float
    upper: float


class ForecastRecord(BaseModel):
    """A record published to ``forecasts``."""

    symbol: str
    as_of: str
    model: str
    model_version: str
    horizon: int
    interval: float
    history_length: int
    ticks_seen: int
    forecasts: list[ForecastPoint]
    generated_at: str


@dataclass
class SymbolState:
    times: deque = field(default_factory=deque)
    values: deque = field(default_factory=deque)
    ticks: int = 0
    source: tuple[str, int] | None = None  # (topic, partition) its ticks come from


def _naive_utc(ts: datetime) -> pd.Timestamp:
    t = pd.Timestamp(ts)
    return t.tz_convert("UTC").tz_localize(None) if t.tzinfo is not None else t


class TickForecaster:
    """The stream handler: per-symbol rolling history and periodic forecasts (thread-confined state)."""

    def __init__(self, runtime: ServiceRuntime, settings: Settings) -> None:
        self.runtime = runtime
        self.settings = settings
        self.states: dict[str, SymbolState] = {}
        self.applied: dict[tuple[str, int], int] = {}  # (topic, partition) -> last applied offset
        self.rebuilt: set[tuple[str, int]] = set()  # partitions whose history was re-read since assignment
        self.published = 0
        self.rebuilt_ticks = 0

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        """A partition (re)assigned: forget its symbols (another member may have moved them on since) and
        re-read its history before its next batch (:meth:`rebuild`; no broker call here, inside the poll)."""
        for tp in assigned:
            source = (tp.topic, tp.partition)
            for symbol in [s for s, st in self.states.items() if st.source == source]:
                del self.states[symbol]
            self.applied.pop(source, None)
            self.rebuilt.discard(source)

    def rebuild(self, msgs: list[Message[Tick]]) -> None:
        """The history of each partition of ``msgs`` not yet rebuilt: the ticks before the batch's first one
        (at most ``stream_rebuild_records``), applied in order without publishing (invalid or out-of-order
        ones skipped, as they were dead-lettered)."""
        firsts: dict[TopicPartition, int] = {}
        for m in msgs:
            if (m.topic, m.partition) not in self.rebuilt:
                tp = m.topic_partition
                firsts[tp] = min(firsts.get(tp, m.offset), m.offset)
        if not firsts:
            return
        bootstrap = self.settings.kafka_bootstrap_servers or ""
        records: list = []
        try:
            if bootstrap:
                records = read_before(bootstrap, firsts, self.settings.stream_rebuild_records)
        except (KafkaError, TimeoutError, OSError) as exc:  # go on without history rather than fail the ticks
            log.warning("history of %s not re-read (%s): forecasts resume after a look-back of ticks",
                        sorted(map(str, firsts)), exc)  # fmt: skip
        for record in records:
            try:
                tick = decode_value(record.value, Tick)
            except DeadLetter:
                continue
            st = self.states.get(tick.symbol)
            if st is not None and st.times and _naive_utc(tick.timestamp) <= st.times[-1]:
                continue
            self._append(tick, (record.topic, record.partition))
            self.applied[(record.topic, record.partition)] = record.offset
            self.rebuilt_ticks += 1
        for tp in firsts:
            self.rebuilt.add((tp.topic, tp.partition))
        if records:
            log.info("histories of %d partition(s) rebuilt from %d earlier ticks", len(firsts), len(records))

    def _append(self, tick: Tick, source: tuple[str, int]) -> SymbolState:
        st = self.states.setdefault(tick.symbol, SymbolState())
        st.source = source
        st.times.append(_naive_utc(tick.timestamp))
        st.values.append(tick.value)
        while len(st.values) > self.settings.stream_max_history:
            st.times.popleft()
            st.values.popleft()
        st.ticks += 1
        return st

    def _check(self, msgs: list[Message[Tick]]) -> None:
        """Reject (raise) the batch if any tick goes back in time, before any state changes."""
        last: dict[str, pd.Timestamp] = {s: st.times[-1] for s, st in self.states.items() if st.times}
        for msg in msgs:
            if self.applied.get((msg.topic, msg.partition), -1) >= msg.offset:
                continue
            t = _naive_utc(msg.value.timestamp)
            prev = last.get(msg.value.symbol)
            if prev is not None and t <= prev:
                raise ValueError(
                    f"out-of-order tick for {msg.value.symbol}: {t.isoformat()} is not after "
                    f"{prev.isoformat()}"
                )
            last[msg.value.symbol] = t

    def __call__(self, msgs: list[Message[Tick]]) -> list[Output]:
        self.rebuild(msgs)
        self._check(msgs)
        models = self.runtime.model
        if models is None:
            raise RuntimeError("model not loaded")
        f = models.stream_forecaster(self.settings.stream_model)
        outputs: list[Output] = []
        for msg in msgs:
            key = (msg.topic, msg.partition)
            if self.applied.get(key, -1) >= msg.offset:
                continue  # already applied (a batch retried record by record)
            self.applied[key] = msg.offset
            tick = msg.value
            st = self._append(tick, key)
            if st.ticks % self.settings.stream_every_n or len(st.values) < f.lookback:
                continue
            outputs.append((self.settings.forecasts_topic, tick.symbol, self._forecast(f, tick.symbol, st)))
        self.published += len(outputs)
        return outputs

    def _forecast(self, f, symbol: str, st: SymbolState) -> ForecastRecord:  # noqa: ANN001
        horizon = min(self.settings.stream_horizon, f.horizon)
        values = np.asarray(st.values, dtype=np.float32)[:, None]
        point, q = f.forecast(values, horizon, [0.05, 0.95])
        times = list(st.times)
        steps = np.diff(pd.DatetimeIndex(times[-f.lookback :]).as_unit("ns").asi8)
        step = pd.Timedelta(int(np.median(steps)), unit="ns") if len(steps) else pd.Timedelta("1D")
        last = times[-1]
        return ForecastRecord(
            symbol=symbol,
            as_of=last.isoformat(),
            model=f.name,
            model_version=f.artifact.version,
            horizon=horizon,
            interval=0.9,
            history_length=len(values),
            ticks_seen=st.ticks,
            forecasts=[
                ForecastPoint(
                    step=h + 1,
                    timestamp=(last + step * (h + 1)).isoformat(),
                    point=float(point[h, 0]),
                    lower=float(q[0, h, 0]),
                    upper=float(q[1, h, 0]),
                )
                for h in range(horizon)
            ],
            generated_at=datetime.now(UTC).isoformat(),
        )


class StreamWorker:
    """The consumer thread (started in the app's on_startup when KAFKA_BOOTSTRAP_SERVERS is set)."""

    def __init__(self, runtime: ServiceRuntime, settings: Settings) -> None:
        self.handler = TickForecaster(runtime, settings)
        self.processor: StreamProcessor | None = None
        self.thread: threading.Thread | None = None
        self.error: str | None = None
        self._settings = settings
        self._stop = threading.Event()
        self._runner = threading.Thread(target=self._run, name="forecasting-stream", daemon=True)
        self._runner.start()

    def _run(self) -> None:
        s = self._settings
        while not self._stop.is_set():
            try:
                self.processor = StreamProcessor(
                    s.kafka_bootstrap_servers or "",
                    s.ticks_topic,
                    s.stream_group_id,
                    Tick,
                    self.handler,
                    max_batch_size=200,
                    output_topics=[s.forecasts_topic],
                    on_partitions_assigned=self.handler.on_assigned,
                )
                self.error = None
                self.processor.run()
                return
            except Exception as exc:  # broker not up yet: retry, /ready reports Kafka state meanwhile
                self.error = f"{type(exc).__name__}: {exc}"
                log.warning("stream consumer failed (%s); retrying in 5 s", self.error)
                self._stop.wait(5.0)

    def stop(self, timeout_s: float = 15.0) -> None:
        self._stop.set()
        if self.processor is not None:
            self.processor.stop()
        self._runner.join(timeout=timeout_s)


def start_stream_worker(runtime: ServiceRuntime, settings: Settings) -> StreamWorker:
    """Start consuming ``market-ticks`` in a background thread."""
    return StreamWorker(runtime, settings)
