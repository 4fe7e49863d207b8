"""Incremental event-time feature engine for card transactions.

One engine instance holds per-customer and per-terminal state and is shared by the REST
service, the Kafka worker and the training pipeline, so a model is trained on exactly the
features it is served with.

* Transactions arrive with :meth:`FeatureEngine.process` in event-time order (per customer).
* Fraud labels arrive separately with :meth:`FeatureEngine.add_feedback` (transaction id,
  label, time the label became known). A label only enters the state once the event time of
  the stream has reached the time it became known, so features never see a label from the
  future.
* The 14 features of the Fraud Detection Handbook are reproduced exactly (see
  ``HANDBOOK_FEATURES`` and ``pipelines.financial_risk.check_features``); the full vector has
  200+ features (``FeatureEngine.feature_names``; definitions in docs/financial_risk.md).

Times are integer UTC epoch seconds. State is typed arrays and dicts; a partition's customers
are saved and restored as flat numpy arrays (:meth:`FeatureEngine.export_customers`, no pickle).
:meth:`FeatureEngine.process_batch` computes a whole micro-batch at once (the stream worker's path).
"""

from __future__ import annotations

import heapq
import math
from array import array
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HOUR = 3600
DAY = 86400

HANDBOOK_FEATURES: tuple[str, ...] = (
    "TX_DURING_WEEKEND",
    "TX_DURING_NIGHT",
    "CUSTOMER_ID_NB_TX_1DAY_WINDOW",
    "CUSTOMER_ID_AVG_AMOUNT_1DAY_WINDOW",
    "CUSTOMER_ID_NB_TX_7DAY_WINDOW",
    "CUSTOMER_ID_AVG_AMOUNT_7DAY_WINDOW",
    "CUSTOMER_ID_NB_TX_30DAY_WINDOW",
    "CUSTOMER_ID_AVG_AMOUNT_30DAY_WINDOW",
    "TERMINAL_ID_NB_TX_1DAY_WINDOW",
    "TERMINAL_ID_RISK_1DAY_WINDOW",
    "TERMINAL_ID_NB_TX_7DAY_WINDOW",
    "TERMINAL_ID_RISK_7DAY_WINDOW",
    "TERMINAL_ID_NB_TX_30DAY_WINDOW",
    "TERMINAL_ID_RISK_30DAY_WINDOW",
)


@dataclass(frozen=True)
class Transaction:
    """One card transaction as the engine sees it."""

    transaction_id: int
    customer_id: int
    terminal_id: int
    ts: int  # UTC epoch seconds
    amount: float


@dataclass(frozen=True)
class EngineConfig:
    """Window sizes and delays of the feature engine."""

    customer_windows_s: tuple[int, ...] = (
        HOUR,
        6 * HOUR,
        12 * HOUR,
        DAY,
        3 * DAY,
        7 * DAY,
        14 * DAY,
        30 * DAY,
    )
    terminal_windows_days: tuple[int, ...] = (1, 7, 14, 30)
    customer_label_windows_days: tuple[int, ...] = (7, 14, 30, 60)
    delay_days: int = 7  # the handbook's delay period for terminal risk
    pending_ttl_days: int = 90  # a transaction whose label never arrives is forgotten after this


def _wname(seconds: int) -> str:
    return f"{seconds // DAY}d" if seconds % DAY == 0 else f"{seconds // HOUR}h"


def weekday_hour(ts: int) -> tuple[int, int]:
    """(weekday Monday=0, hour) of a UTC epoch second (1970-01-01 was a Thursday)."""
    days = ts // DAY
    return int((days + 3) % 7), int((ts % DAY) // HOUR)


def _ints(values: Any = ()) -> array:
    return array("q", values)


def _floats(values: Any = ()) -> array:
    return array("d", values)


def _np(values: array, dtype: type) -> np.ndarray:
    """A numpy copy of a typed array (``frombuffer`` of a slice copy: no list boxing)."""
    return np.frombuffer(values, dtype=dtype) if len(values) else np.zeros(0, dtype=dtype)


@dataclass
class _Customer:
    # typed arrays (not lists): numpy reads them without converting every element
    times: array = field(default_factory=_ints)
    amounts: array = field(default_factory=_floats)
    terminals: array = field(default_factory=_ints)
    head: int = 0
    n_total: int = 0
    sum_total: float = 0.0
    sumsq_total: float = 0.0
    first_ts: int = 0
    last_ts: int | None = None
    pairs: dict[int, list[int]] = field(default_factory=dict)  # terminal -> [count, last_ts]
    # labels known so far for this customer's transactions, sorted by transaction time
    l_times: array = field(default_factory=_ints)
    l_labels: array = field(default_factory=_ints)
    l_amounts: array = field(default_factory=_floats)
    l_known: array = field(default_factory=_ints)  # when each label became known
    n_known_fraud: int = 0
    last_fraud_ts: int | None = None
    # the last-use time of every terminal in ``pairs``, ascending (derived from ``pairs``, not saved):
    # the distinct terminals of a window (t - w, t] are the entries > t - w
    last_use: array = field(default_factory=_ints)

    def use_terminal(self, terminal_id: int, ts: int) -> None:
        """Count a transaction at ``terminal_id`` at ``ts`` (not older than the customer's last one)."""
        pair = self.pairs.get(terminal_id)
        if pair is None:
            self.pairs[terminal_id] = [1, ts]
        else:
            pair[0] += 1
            self.last_use.remove(pair[1])  # any entry of that value: only the values matter
            pair[1] = ts
        self.last_use.append(ts)

    def evict(self, before: int) -> None:
        """Drop transactions with time <= before (amortised O(1))."""
        t, h = self.times, self.head
        n = len(t)
        while h < n and t[h] <= before:
            h += 1
        self.head = h
        if h > 64 and h * 2 > n:
            del self.times[:h], self.amounts[:h], self.terminals[:h]
            self.head = 0


@dataclass
class _Labelled:
    """Labelled transactions of a terminal, sorted by transaction time."""

    times: array = field(default_factory=_ints)
    labels: array = field(default_factory=_ints)
    amounts: array = field(default_factory=_floats)
    known: array = field(default_factory=_ints)  # when each label became known (batch visibility)
    n_total: int = 0
    n_fraud: int = 0
    last_fraud_ts: int | None = None

    def insert(self, ts: int, label: int, amount: float, known_at: int = 0) -> None:
        i = bisect_right(self.times, ts)
        self.times.insert(i, ts)
        self.labels.insert(i, label)
        self.amounts.insert(i, amount)
        self.known.insert(i, known_at)
        self.n_total += 1
        if label:
            self.n_fraud += 1
            if self.last_fraud_ts is None or ts > self.last_fraud_ts:
                self.last_fraud_ts = ts

    def evict(self, before: int) -> None:
        i = bisect_right(self.times, before)
        if i:
            del self.times[:i], self.labels[:i], self.amounts[:i], self.known[:i]


def _old_prefix(d: dict[int, Any], old: Callable[[Any], bool]) -> list[int]:
    """Keys of ``d``'s leading entries (insertion order) whose value is ``old``, up to the first one not."""
    keys = []
    for k, v in d.items():
        if not old(v):
            break
        keys.append(k)
    return keys


def _nan_div(a: float, b: float) -> float:
    return a / b if b else math.nan


def velocity_features(
    cnt: Callable[[int], Any], tot: Callable[[int], Any], div: Callable[[Any, Any], Any]
) -> list:
    """The 8 velocity features from the customer's window counts ``cnt(w)`` and amount sums ``tot(w)``
    (scalars, or arrays for a batch); ``div`` divides with NaN for a zero denominator."""
    return [
        div(cnt(HOUR) * 24, cnt(DAY)),
        div(cnt(DAY) * 7, cnt(7 * DAY)),
        div(cnt(7 * DAY) * 30 / 7, cnt(30 * DAY)),
        div(tot(HOUR) * 24, tot(DAY)),
        div(tot(DAY) * 7, tot(7 * DAY)),
        div(tot(7 * DAY) * 30 / 7, tot(30 * DAY)),
        div(div(tot(DAY), cnt(DAY)), div(tot(30 * DAY), cnt(30 * DAY))),
        div(div(tot(7 * DAY), cnt(7 * DAY)), div(tot(30 * DAY), cnt(30 * DAY))),
    ]


class OutOfOrderError(ValueError):
    """A transaction older than the customer's latest one (the stream must be ordered per customer)."""


class DuplicateTransactionError(ValueError):
    """The transaction id was already added to the feature state."""


class FeatureEngine:
    """Per-customer / per-terminal incremental feature state in event time."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.customers: dict[int, _Customer] = {}
        self.terminals: dict[int, _Labelled] = {}
        # transaction id -> (customer, terminal, ts, amount), waiting for its label
        self.pending: dict[int, tuple[int, int, int, float]] = {}
        # customer id -> ids of its pending transactions (a partition snapshot exports only its customers')
        self.pending_of: dict[int, set[int]] = {}
        # heap of (known_at, seq, tx_id, label, terminal_id, tx_ts, amount); -1 = not given
        self._feedback: list[tuple[int, int, int, int, int, int, float]] = []
        self._seq = 0
        self.watermark: int = 0  # largest event time processed
        self.n_events = 0
        self.n_labels_applied = 0
        self.n_labels_unmatched = 0
        self.n_labels_foreign = 0
        self.applied_labels: dict[int, int] = {}  # tx id -> tx time of every applied label (dedup)
        self.feature_names: list[str] = self._build_names()
        # customer windows plus the handbook's 1/7/30 days, one searchsorted call per event
        cust_windows = sorted(set(self.config.customer_windows_s) | {DAY, 7 * DAY, 30 * DAY})
        self._cust_window_s = np.asarray(cust_windows, dtype=np.int64)
        self._cust_window_pos = {w: i for i, w in enumerate(cust_windows)}
        self._term_days = tuple(sorted(set(self.config.terminal_windows_days) | {1, 7, 30}))
        self.handbook_index = [self.feature_names.index(n) for n in HANDBOOK_FEATURES]

    # ------------------------------------------------------------------ names
    def _build_names(self) -> list[str]:
        c = self.config
        names = ["TX_AMOUNT", "log_amount", "hour", "day_of_week", "hour_sin", "hour_cos"]
        names += ["TX_DURING_WEEKEND", "TX_DURING_NIGHT"]
        for w in c.customer_windows_s:
            s = _wname(w)
            names += [f"cust_{k}_{s}" for k in ("nb_tx", "sum", "mean", "std", "min", "max")]
            names += [
                f"cust_{k}_{s}"
                for k in ("amt_ratio_mean", "amt_zscore", "amt_ratio_max", "amt_minus_mean", "amt_rank")
            ]
            names += [f"cust_{k}_{s}" for k in ("night_frac", "weekend_frac", "n_terminals", "same_term")]
        names += [
            "cust_secs_since_prev",
            "cust_secs_since_prev_same_term",
            "cust_age_days",
            "cust_nb_tx_total",
            "cust_mean_total",
            "cust_std_total",
            "cust_amt_ratio_total",
            "cust_amt_zscore_total",
            "cust_pair_nb_tx_total",
            "cust_new_terminal",
            "cust_mean_hour_30d",
            "cust_hour_dev_30d",
        ]
        names += [
            "cust_velocity_1h_vs_1d",
            "cust_velocity_1d_vs_7d",
            "cust_velocity_7d_vs_30d",
            "cust_spend_1h_vs_1d",
            "cust_spend_1d_vs_7d",
            "cust_spend_7d_vs_30d",
            "cust_mean_1d_vs_30d",
            "cust_mean_7d_vs_30d",
        ]
        for d in c.customer_label_windows_days:
            names += [f"cust_known_{k}_{d}d" for k in ("nb", "fraud", "risk", "fraud_amount")]
        names += ["cust_known_fraud_amount_share_60d", "cust_days_since_known_fraud"]
        for d in c.terminal_windows_days:
            names += [f"term_{k}_{d}d" for k in ("nb_tx", "fraud", "risk", "mean", "std", "max")]
            names += [f"term_fraud_amount_{d}d", f"term_amt_ratio_{d}d"]
        names += [
            "term_days_since_fraud_30d",
            "term_velocity_7d_vs_30d",
            "term_risk_7d_minus_30d",
            "term_risk_1d_minus_30d",
        ]
        # the handbook's names, computed by its exact definitions
        names += [n for n in HANDBOOK_FEATURES if n not in names]
        return names

    # --------------------------------------------------------------- feedback
    def add_feedback(
        self,
        transaction_id: int,
        label: int,
        known_at: int,
        terminal_id: int | None = None,
        tx_ts: int | None = None,
        amount: float | None = None,
    ) -> None:
        """Queue a label; it becomes visible when event time reaches ``known_at``.

        A label of a transaction this engine has not seen (another partition's customer) still
        updates the terminal's state when the feedback names the terminal, time and amount: that
        is how terminal features see every partition's labels (see docs/financial_risk.md).
        """
        extra = (
            (int(terminal_id), int(tx_ts), float(amount if amount is not None else -1.0))
            if terminal_id is not None and tx_ts is not None
            else (-1, -1, -1.0)
        )
        heapq.heappush(self._feedback, (int(known_at), self._seq, int(transaction_id), int(label), *extra))
        self._seq += 1
        if known_at <= self.watermark:
            self.advance(self.watermark)

    def add_pending(
        self, transaction_id: int, customer_id: int, terminal_id: int, ts: int, amount: float
    ) -> None:
        """A transaction of the state waits for its label."""
        self.pending[transaction_id] = (customer_id, terminal_id, ts, amount)
        ids = self.pending_of.get(customer_id)
        if ids is None:
            self.pending_of[customer_id] = {transaction_id}
        else:
            ids.add(transaction_id)

    def duplicate_error(self, transaction_id: int) -> DuplicateTransactionError | None:
        """The error for a transaction id already in the state (scored, label pending), else None."""
        if transaction_id in self.pending:
            return DuplicateTransactionError(
                f"transaction {transaction_id} was already scored into the feature state"
            )
        return None

    def advance(self, now: int) -> None:
        """Apply every queued label known at or before ``now`` (event time)."""
        fb = self._feedback
        while fb and fb[0][0] <= now:
            known_at, _, tx_id, label, f_term, f_ts, f_amount = heapq.heappop(fb)
            info = self.pending.pop(tx_id, None)
            if info is not None:
                self.pending_of[info[0]].discard(tx_id)
            else:
                if f_term >= 0 and tx_id not in self.applied_labels:
                    # another partition's transaction: only the terminal's (global) state learns it
                    self.applied_labels[tx_id] = f_ts
                    term = self.terminals.get(f_term)
                    if term is None:
                        term = self.terminals[f_term] = _Labelled()
                    term.insert(f_ts, label, f_amount, known_at)
                    self.n_labels_foreign += 1
                else:
                    self.n_labels_unmatched += 1
                continue
            cust_id, term_id, ts, amount = info
            self.applied_labels[tx_id] = ts
            term = self.terminals.get(term_id)
            if term is None:
                term = self.terminals[term_id] = _Labelled()
            term.insert(ts, label, amount, known_at)
            cust = self.customers.get(cust_id)
            if cust is not None:
                i = bisect_right(cust.l_times, ts)
                cust.l_times.insert(i, ts)
                cust.l_labels.insert(i, label)
                cust.l_amounts.insert(i, amount)
                cust.l_known.insert(i, known_at)
                if label:
                    cust.n_known_fraud += 1
                    if cust.last_fraud_ts is None or ts > cust.last_fraud_ts:
                        cust.last_fraud_ts = ts
            self.n_labels_applied += 1

    # ------------------------------------------------------------ transactions
    def process(self, tx: Transaction, mode: str = "all", update: bool = True) -> np.ndarray | None:
        """Add a transaction to the state and return its features.

        ``mode``: ``"all"`` (the full vector, ``feature_names`` order), ``"handbook"`` (the 14
        handbook features in ``HANDBOOK_FEATURES`` order) or ``"none"`` (state update only).
        With ``update=False`` the features are computed as if the transaction were added, but
        the state is left unchanged (what-if scoring).
        """
        c = self.config
        ts = int(tx.ts)
        if ts > self.watermark:
            self.watermark = ts
        self.advance(ts)
        cust = self.customers.get(tx.customer_id)
        if cust is not None and cust.last_ts is not None and ts < cust.last_ts:
            raise OutOfOrderError(
                f"transaction {tx.transaction_id} at {ts} is older than customer {tx.customer_id}'s "
                f"latest transaction at {cust.last_ts}"
            )
        if cust is None:
            cust = _Customer(first_ts=ts)
            if update:
                self.customers[tx.customer_id] = cust
        cust.evict(ts - max(c.customer_windows_s))
        prev_ts = cust.last_ts
        pair = cust.pairs.get(tx.terminal_id)
        prev_pair = (pair[0], pair[1]) if pair else (0, None)
        # add the transaction (features include it, as the handbook's rolling windows do)
        cust.times.append(ts)
        cust.amounts.append(float(tx.amount))
        cust.terminals.append(int(tx.terminal_id))
        out: np.ndarray | None = None
        try:
            if mode == "handbook":
                out = self._handbook(tx, cust)
            elif mode == "all":
                out = self._all(tx, cust, prev_ts, prev_pair)
            elif mode != "none":
                raise ValueError(f"unknown mode {mode!r}")
        finally:
            if not update:
                cust.times.pop()
                cust.amounts.pop()
                cust.terminals.pop()
        if update:
            cust.n_total += 1
            cust.sum_total += float(tx.amount)
            cust.sumsq_total += float(tx.amount) ** 2
            cust.last_ts = ts
            cust.use_terminal(int(tx.terminal_id), ts)
            self.add_pending(
                int(tx.transaction_id), int(tx.customer_id), int(tx.terminal_id), ts, float(tx.amount)
            )
            self.n_events += 1
            if self.n_events % 50_000 == 0:
                self._expire(ts)
        return out

    def process_batch(
        self, txs: list[Transaction], check_duplicates: bool = True
    ) -> tuple[np.ndarray, list[Exception | None]]:
        """Add ``txs`` in order and return ``([n_ok, F] features, per-event error or None)``: the same
        values as calling :meth:`process` on each, computed for the whole batch at once
        (:mod:`services.financial_risk.feature_batch`). Events that fail (out of order, or an id
        already in the state) get their exception and no row."""
        from services.financial_risk.feature_batch import process_batch

        return process_batch(self, txs, check_duplicates)

    def _expire(self, now: int) -> None:
        """Forget pending transactions whose label is overdue and evict old labelled entries."""
        c = self.config
        # both dicts are in insertion order, which follows event time (pending: processing order; applied
        # labels: known-at order), so only their old prefix is read, not every entry (this runs inside a
        # batch: a full scan of the applied labels held up the stream for tens of milliseconds). An entry
        # behind a younger one stays until a later pass: harmless (no window reaches back that far).
        horizon = now - c.pending_ttl_days * DAY
        for k in _old_prefix(self.pending, lambda v: v[2] < horizon):
            self.pending_of[self.pending.pop(k)[0]].discard(k)
        l_horizon = now - (max(c.customer_label_windows_days) + c.delay_days) * DAY
        for k in _old_prefix(self.applied_labels, lambda t: t < l_horizon):
            del self.applied_labels[k]
        t_keep = now - (c.delay_days + max(c.terminal_windows_days)) * DAY
        for term in self.terminals.values():
            term.evict(t_keep)
        c_keep = now - (max(c.customer_label_windows_days) + c.delay_days) * DAY
        for cust in self.customers.values():
            i = bisect_right(cust.l_times, c_keep)
            if i:
                del cust.l_times[:i], cust.l_labels[:i], cust.l_amounts[:i], cust.l_known[:i]

    # ------------------------------------------------------------- computing
    def _terminal_window(self, term: _Labelled | None, ts: int, days: int) -> tuple[int, int, int]:
        """(lo, hi) slice of labelled terminal transactions in (t-(delay+w), t-delay], and hi."""
        if term is None:
            return 0, 0, 0
        d = self.config.delay_days * DAY
        lo = bisect_right(term.times, ts - d - days * DAY)
        hi = bisect_right(term.times, ts - d)
        return lo, hi, hi - lo

    def _handbook(self, tx: Transaction, cust: _Customer) -> np.ndarray:
        ts = tx.ts
        wd, hr = weekday_hour(ts)
        out = [float(wd >= 5), float(hr <= 6)]
        times, amounts, h = cust.times, cust.amounts, cust.head
        for days in (1, 7, 30):
            lo = bisect_right(times, ts - days * DAY, h)
            n = len(times) - lo
            out += [float(n), math.fsum(amounts[lo:]) / n]
        term = self.terminals.get(tx.terminal_id)
        for days in (1, 7, 30):
            lo, hi, n = self._terminal_window(term, ts, days)
            frauds = sum(term.labels[lo:hi]) if n else 0
            out += [float(n), frauds / n if n else 0.0]
        return np.asarray(out, dtype=np.float64)

    def _all(
        self, tx: Transaction, cust: _Customer, prev_ts: int | None, prev_pair: tuple[int, int | None]
    ) -> np.ndarray:
        """The full feature vector. Every window of a kind shares one end point (now, or now minus the
        delay), so each kind is one reversed cumulative pass and each window one index into it."""
        ts, amount = int(tx.ts), float(tx.amount)
        wd, hr = weekday_hour(ts)
        out: list[float] = [
            amount,
            math.log1p(max(amount, 0.0)),
            float(hr),
            float(wd),
            math.sin(2 * math.pi * hr / 24),
            math.cos(2 * math.pi * hr / 24),
            float(wd >= 5),
            float(hr <= 6),
        ]
        hand_cust = self._customer_windows(tx, cust, prev_ts, prev_pair, hr, out)
        self._customer_labels(ts, cust, out)
        hand_term = self._terminal_windows(tx, out)
        out += hand_cust + hand_term
        return np.asarray(out, dtype=np.float64)

    def _customer_windows(
        self,
        tx: Transaction,
        cust: _Customer,
        prev_ts: int | None,
        prev_pair: tuple[int, int | None],
        hr: int,
        out: list[float],
    ) -> list[float]:
        """Rolling customer windows (the current transaction included), lifetime, gap and velocity
        features appended to ``out``; returns the handbook's customer features (count, mean of 1/7/30 d)."""
        ts, amount = int(tx.ts), float(tx.amount)
        h = cust.head
        terms = cust.terminals[h:]
        times = _np(cust.times[h:], np.int64)
        r_amt = _np(cust.amounts[h:], np.float64)[::-1]  # newest first
        r_terms = _np(terms, np.int64)[::-1]
        r_times = times[::-1]
        r_hours = (r_times % DAY) // HOUR
        n_all = len(times)
        windows = self._cust_window_s
        sizes_arr = n_all - np.searchsorted(times, ts - windows, side="right")
        # window of size k = the first k entries of the reversed arrays: one cumulative pass per statistic
        cum = np.empty((9, n_all), dtype=np.float64)
        np.cumsum(r_amt, out=cum[0])
        np.cumsum(r_amt * r_amt, out=cum[1])
        np.minimum.accumulate(r_amt, out=cum[2])
        np.maximum.accumulate(r_amt, out=cum[3])
        np.cumsum(r_amt <= amount, out=cum[4])
        np.cumsum(r_hours <= 6, out=cum[5])
        np.cumsum((r_times // DAY + 3) % 7 >= 5, out=cum[6])
        np.cumsum(r_terms == tx.terminal_id, out=cum[7])
        np.cumsum(r_hours, out=cum[8])
        rows = cum[:, sizes_arr - 1].T.tolist()  # one row of statistics per window (k >= 1: tx included)
        # distinct terminals among the newest k = terminals whose last use is at index >= n - k
        last_use = np.sort(np.fromiter({t: i for i, t in enumerate(terms)}.values(), dtype=np.int64))
        distinct_arr = len(last_use) - np.searchsorted(last_use, n_all - sizes_arr, side="left")
        sizes = dict(zip(windows.tolist(), sizes_arr.tolist(), strict=True))
        distincts = distinct_arr.tolist()
        for w in self.config.customer_windows_s:
            k = sizes[w]
            pos = self._cust_window_pos[w]
            s, sq, mn, mx, le, night, weekend, same, _ = rows[pos]
            distinct = float(distincts[pos])
            mean = s / k
            var = max(sq / k - mean * mean, 0.0)
            std = math.sqrt(var * k / (k - 1)) if k > 1 else math.nan
            out += [float(k), s, mean, std, mn, mx]
            out += [
                _nan_div(amount, mean),
                (amount - mean) / std if std and std > 0 else math.nan,
                _nan_div(amount, mx),
                amount - mean,
                le / k,
            ]
            out += [night / k, weekend / k, distinct, same]
        # lifetime and gap features (the lifetime counters exclude the current transaction)
        n_tot, s_tot, sq_tot = cust.n_total, cust.sum_total, cust.sumsq_total
        mean_tot = s_tot / n_tot if n_tot else math.nan
        std_tot = math.sqrt(max(sq_tot / n_tot - mean_tot**2, 0.0)) if n_tot > 1 else math.nan
        mean_hour = rows[self._cust_window_pos[30 * DAY]][8] / sizes[30 * DAY]
        out += [
            float(ts - prev_ts) if prev_ts is not None else math.nan,
            float(ts - prev_pair[1]) if prev_pair[1] is not None else math.nan,
            (ts - cust.first_ts) / DAY,
            float(n_tot),
            mean_tot,
            std_tot,
            _nan_div(amount, mean_tot) if n_tot else math.nan,
            (amount - mean_tot) / std_tot if n_tot > 1 and std_tot > 0 else math.nan,
            float(prev_pair[0]),
            float(prev_pair[0] == 0),
            mean_hour,
            abs(hr - mean_hour),
        ]

        def cnt(w: int) -> float:
            return float(sizes.get(w, 0))

        def tot(w: int) -> float:
            return rows[self._cust_window_pos[w]][0] if sizes.get(w, 0) else 0.0

        out += velocity_features(cnt, tot, _nan_div)
        hand: list[float] = []
        for days in (1, 7, 30):
            k = sizes[days * DAY]
            hand += [float(k), rows[self._cust_window_pos[days * DAY]][0] / k]
        return hand

    def _customer_labels(self, ts: int, cust: _Customer, out: list[float]) -> None:
        """The customer's own labels, only those known at event time (l_known <= ts), so that the value
        does not depend on how other partitions' streams interleave with this one."""
        c = self.config
        l_times = cust.l_times
        lo60 = bisect_right(l_times, ts - max(c.customer_label_windows_days) * DAY)
        m = len(l_times) - lo60
        if m == 0:
            for _ in c.customer_label_windows_days:
                out += [0.0, 0.0, 0.0, 0.0]
            out += [math.nan, math.nan]
            return
        visible = _np(cust.l_known[lo60:], np.int64) <= ts
        fraud = visible & (_np(cust.l_labels[lo60:], np.int64) != 0)
        amounts = _np(cust.l_amounts[lo60:], np.float64)
        # suffix sums (newest first), so a window [lo, end) is entry end - lo - 1
        r_n = np.cumsum(visible[::-1])
        r_fr = np.cumsum(fraud[::-1])
        r_famt = np.cumsum(np.where(fraud, amounts, 0.0)[::-1])
        r_kamt = np.cumsum(np.where(visible, amounts, 0.0)[::-1])
        for d in c.customer_label_windows_days:
            j = m - (bisect_right(l_times, ts - d * DAY) - lo60)  # entries in the window
            if j == 0:
                out += [0.0, 0.0, 0.0, 0.0]
                continue
            n, fr = int(r_n[j - 1]), int(r_fr[j - 1])
            out += [float(n), float(fr), fr / n if n else 0.0, float(r_famt[j - 1])]
        fraud_idx = np.flatnonzero(fraud)
        last_fraud = l_times[lo60 + int(fraud_idx[-1])] if fraud_idx.size else None
        out += [
            _nan_div(float(r_famt[-1]), float(r_kamt[-1])),
            (ts - last_fraud) / DAY if last_fraud is not None else math.nan,
        ]

    def _terminal_windows(self, tx: Transaction, out: list[float]) -> list[float]:
        """Labelled terminal transactions in the delayed windows (t-(delay+w), t-delay]: features
        appended to ``out``; returns the handbook's terminal features (count, risk of 1/7/30 d)."""
        c = self.config
        ts, amount = int(tx.ts), float(tx.amount)
        term = self.terminals.get(tx.terminal_id)
        days_all = self._term_days
        if term is None:
            n_of = dict.fromkeys(days_all, 0)
            stats = {}
        else:
            end = ts - c.delay_days * DAY
            hi = bisect_right(term.times, end)
            los = {d: bisect_right(term.times, end - d * DAY, 0, hi) for d in days_all}
            lo_min = min(los.values())
            n_of = {d: hi - lo for d, lo in los.items()}
            r_amt = _np(term.amounts[lo_min:hi], np.float64)[::-1]
            r_lab = _np(term.labels[lo_min:hi], np.int64)[::-1]
            if r_amt.size:
                cum = np.stack(
                    [
                        np.cumsum(r_amt),
                        np.cumsum(r_amt * r_amt),
                        np.maximum.accumulate(r_amt),
                        np.cumsum(r_lab),
                        np.cumsum(np.where(r_lab != 0, r_amt, 0.0)),
                    ]
                )
                sel = [max(n_of[d], 1) - 1 for d in days_all]
                stats = dict(zip(days_all, cum[:, sel].T.tolist(), strict=True))
                fraud_pos = np.flatnonzero(r_lab[: n_of[30]]) if 30 in n_of else np.zeros(0)
                last_fraud_t = term.times[hi - 1 - int(fraud_pos[0])] if fraud_pos.size else None
            else:
                stats = {}
        if term is None or not stats:
            last_fraud_t = None

        def risk(d: int) -> float:
            n = n_of[d]
            return stats[d][3] / n if n else 0.0

        for d in c.terminal_windows_days:
            n = n_of[d]
            if n:
                s, sq, mx, fr, famt = stats[d]
                mean = s / n
                std = math.sqrt(max(sq / n - mean * mean, 0.0) * n / (n - 1)) if n > 1 else math.nan
                out += [float(n), float(fr), fr / n, mean, std, mx, famt, _nan_div(amount, mean)]
            else:
                out += [0.0, 0.0, 0.0, math.nan, math.nan, math.nan, 0.0, math.nan]
        out += [
            (ts - last_fraud_t) / DAY if last_fraud_t is not None else math.nan,
            _nan_div(n_of[7] * 30 / 7, n_of[30]),
            risk(7) - risk(30),
            risk(1) - risk(30),
        ]
        hand: list[float] = []
        for d in (1, 7, 30):
            hand += [float(n_of[d]), risk(d)]
        return hand

    # ----------------------------------------------------------------- state
    def export_customers(self, ids: set[int]) -> dict[str, np.ndarray]:
        """The per-customer state of ``ids`` (one Kafka partition's customers) and their pending
        transactions, as flat arrays (:mod:`services.financial_risk.feature_state`)."""
        from services.financial_risk.feature_state import export_customers

        return export_customers(self, ids)

    def import_customers(self, arrays: dict[str, np.ndarray]) -> set[int]:
        """Add a partition's customers (from :meth:`export_customers`); returns their ids."""
        from services.financial_risk.feature_state import import_customers

        return import_customers(self, arrays)

    def drop_customers(self, ids: set[int]) -> None:
        """Forget customers (their partition moved to another worker)."""
        for k in ids:
            self.customers.pop(k, None)
            for tx_id in self.pending_of.pop(k, ()):
                del self.pending[tx_id]
