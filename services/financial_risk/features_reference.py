"""The feature engine written plainly in Python: the definition the compiled engine is held to.

:class:`ReferenceFeatureEngine` keeps per-customer Python objects (typed arrays, dicts) and computes one
event at a time with a few dozen small numpy calls: easy to read and check against the handbook, about
ten times slower than :class:`services.financial_risk.features.FeatureEngine` (columnar state, one
compiled pass per micro-batch). ``tests/financial_risk/test_financial_risk_features.py`` checks that both
give the same value for every one of the 214 columns of real events, labels arriving in between.
Same semantics as the compiled engine: windows ``(t - w, t]`` include the transaction itself; labels
enter the state when event time reaches their known-at time; customer label features count only labels
known at the event's time; terminal features use labelled transactions in ``(t - 7 - D, t - 7]`` days.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.financial_risk.features import (
    DAY,
    HANDBOOK_FEATURES,
    HOUR,
    DuplicateTransactionError,
    EngineConfig,
    LabelQueue,
    OutOfOrderError,
    Transaction,
    build_feature_names,
    weekday_hour,
)


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


class ReferenceFeatureEngine(LabelQueue):
    """Per-customer / per-terminal incremental feature state in event time (plain Python)."""

    apply_due_at_once = True

    def __init__(self, config: EngineConfig | None = None) -> None:
        super().__init__()
        self.config = config or EngineConfig()
        self.customers: dict[int, _Customer] = {}
        self.terminals: dict[int, _Labelled] = {}
        self.feature_names: list[str] = build_feature_names(self.config)
        self.handbook_index = [self.feature_names.index(n) for n in HANDBOOK_FEATURES]
        # customer windows plus the handbook's 1/7/30 days, one searchsorted call per event
        cust_windows = sorted(set(self.config.customer_windows_s) | {DAY, 7 * DAY, 30 * DAY})
        self._cust_window_s = np.asarray(cust_windows, dtype=np.int64)
        self._cust_window_pos = {w: i for i, w in enumerate(cust_windows)}
        self._term_days = tuple(sorted(set(self.config.terminal_windows_days) | {1, 7, 30}))

    # --------------------------------------------------------------- feedback
    def advance(self, now: int) -> None:
        """Apply every queued label known at or before ``now`` (event time)."""
        for item in self._pop_due(now):
            target = self._match(item)
            if target is None:
                continue
            known_at, label = item[0], item[3]
            cust_id, term_id, ts, amount = target
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
        """One :meth:`process` call per transaction, behind the compiled engine's batch interface."""
        rows: list[np.ndarray] = []
        errors: list[Exception | None] = []
        for tx in txs:
            if check_duplicates and tx.transaction_id in self.pending:
                errors.append(DuplicateTransactionError(f"transaction {tx.transaction_id} is in the state"))
                continue
            try:
                rows.append(self.process(tx))  # type: ignore[arg-type]
            except OutOfOrderError as exc:
                errors.append(exc)
                continue
            errors.append(None)
        return (np.vstack(rows) if rows else np.zeros((0, len(self.feature_names)))), errors

    def _expire(self, now: int) -> None:
        """Forget pending transactions whose label is overdue and evict old labelled entries."""
        c = self.config
        self._expire_queues(now, c)
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
