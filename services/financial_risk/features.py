"""Incremental event-time feature engine for card transactions.

One engine instance holds per-customer and per-terminal state and is shared by the REST
service, the Kafka worker and the training pipeline, so a model is trained on exactly the
features it is served with.

* Transactions arrive with :meth:`FeatureEngine.process_batch` (the stream worker's micro-batches) or
  :meth:`FeatureEngine.process` (one), in event-time order per customer.
* Fraud labels arrive separately with :meth:`FeatureEngine.add_feedback` (transaction id,
  label, time the label became known). A label only enters the state once the event time of
  the stream has reached the time it became known, so features never see a label from the
  future.
* The 14 features of the Fraud Detection Handbook are reproduced exactly (see
  ``HANDBOOK_FEATURES`` and ``pipelines.financial_risk.check_features``); the full vector has
  200+ features (``FeatureEngine.feature_names``; definitions in docs/financial_risk.md).

Times are integer UTC epoch seconds. The state is columnar (numpy arrays, see
:mod:`services.financial_risk.feature_kernel`) and a micro-batch is one compiled pass over it;
:mod:`services.financial_risk.features_reference` is the same engine written plainly in Python, the
definition the tests hold this one to. A partition's customers are saved and restored as flat
numpy arrays (:meth:`FeatureEngine.export_customers`, no pickle).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.financial_risk import feature_kernel as fk

HOUR = 3600
DAY = 86400
EXPIRE_EVERY = 50_000  # events between two passes that forget overdue pending transactions and old labels

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


def build_feature_names(c: EngineConfig) -> list[str]:
    """The feature vector's column names, in order (definitions in docs/financial_risk.md)."""
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


def old_prefix(d: dict[int, Any], old: Callable[[Any], bool]) -> list[int]:
    """Keys of ``d``'s leading entries (insertion order) whose value is ``old``, up to the first one not."""
    keys = []
    for k, v in d.items():
        if not old(v):
            break
        keys.append(k)
    return keys


class OutOfOrderError(ValueError):
    """A transaction older than the customer's latest one (the stream must be ordered per customer)."""


class DuplicateTransactionError(ValueError):
    """The transaction id was already added to the feature state."""


# a queued label: (known_at, seq, tx_id, label, terminal_id, tx_ts, amount); -1 = not given
_Feedback = tuple[int, int, int, int, int, int, float]


class LabelQueue:
    """Labels waiting for event time, and transactions waiting for their label (both engines' bookkeeping).

    A label enters the state when event time reaches its known-at time; :meth:`_match` then says what it
    updates: its own transaction (pending here) or, for another partition's transaction, only the terminal
    named in the feedback (terminal features see every partition's labels, see docs/financial_risk.md)."""

    apply_due_at_once = False  # True: a label already due when queued is applied at once

    def __init__(self) -> None:
        # transaction id -> (customer, terminal, ts, amount), waiting for its label
        self.pending: dict[int, tuple[int, int, int, float]] = {}
        # customer id -> ids of its pending transactions (a partition snapshot exports only its customers')
        self.pending_of: dict[int, set[int]] = {}
        self._feedback: list[_Feedback] = []  # heap by known_at
        self._seq = 0
        self.watermark: int = 0  # largest event time processed
        self.n_events = 0
        self.n_labels_applied = 0
        self.n_labels_unmatched = 0
        self.n_labels_foreign = 0
        self.applied_labels: dict[int, int] = {}  # tx id -> tx time of every applied label (dedup)

    def add_feedback(
        self,
        transaction_id: int,
        label: int,
        known_at: int,
        terminal_id: int | None = None,
        tx_ts: int | None = None,
        amount: float | None = None,
    ) -> None:
        """Queue a label; it becomes visible when event time reaches ``known_at`` (a label already due is
        applied before the state is next read). ``terminal_id``, ``tx_ts`` and ``amount`` let a label of a
        transaction this engine has not seen (another partition's customer) update the terminal's state."""
        extra = (
            (int(terminal_id), int(tx_ts), float(amount if amount is not None else -1.0))
            if terminal_id is not None and tx_ts is not None
            else (-1, -1, -1.0)
        )
        heapq.heappush(self._feedback, (int(known_at), self._seq, int(transaction_id), int(label), *extra))
        self._seq += 1
        if self.apply_due_at_once and known_at <= self.watermark:
            self.advance(self.watermark)

    def advance(self, now: int) -> None:
        """Apply every queued label known at or before ``now`` (event time)."""
        raise NotImplementedError

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

    def _pop_due(self, now: int) -> list[_Feedback]:
        """The queued labels known at or before ``now``, in known-at order."""
        fb, due = self._feedback, []
        while fb and fb[0][0] <= now:
            due.append(heapq.heappop(fb))
        return due

    def _match(self, item: _Feedback) -> tuple[int, int, int, float] | None:
        """What a due label updates: (customer id, or -1 for the terminal only; terminal id; transaction time;
        amount), or None (a label of an unknown or already labelled transaction)."""
        _, _, tx_id, _, f_term, f_ts, f_amount = item
        info = self.pending.pop(tx_id, None)
        if info is not None:
            cust_id, term_id, ts, amount = info
            self.pending_of[cust_id].discard(tx_id)
            self.applied_labels[tx_id] = ts
            self.n_labels_applied += 1
            return cust_id, term_id, ts, amount
        if f_term >= 0 and tx_id not in self.applied_labels:
            self.applied_labels[tx_id] = f_ts
            self.n_labels_foreign += 1
            return -1, f_term, f_ts, f_amount
        self.n_labels_unmatched += 1
        return None

    def _expire_queues(self, now: int, config: EngineConfig) -> None:
        """Forget pending transactions whose label is overdue, and old applied-label ids. Both dicts are in
        insertion order, which follows event time (pending: processing order; applied labels: known-at
        order), so only their old prefix is read, not every entry. An entry behind a younger one stays until
        a later pass: harmless (no window reaches back that far)."""
        horizon = now - config.pending_ttl_days * DAY
        for k in old_prefix(self.pending, lambda v: v[2] < horizon):
            self.pending_of[self.pending.pop(k)[0]].discard(k)
        l_horizon = now - (max(config.customer_label_windows_days) + config.delay_days) * DAY
        for k in old_prefix(self.applied_labels, lambda t: t < l_horizon):
            del self.applied_labels[k]


_compiled = False


def _compile_kernels() -> None:
    """Run every kernel once on a tiny state, so that compiling (or loading from numba's cache) happens
    when the first engine is created, not on a live event or the first snapshot step."""
    global _compiled
    _compiled = True
    t0 = 10 * DAY
    eng = FeatureEngine()
    eng.add_feedback(1, 1, t0 + DAY)
    eng.add_feedback(7, 0, t0 + DAY, terminal_id=3, tx_ts=t0 - DAY, amount=2.0)
    eng.process_batch([Transaction(1, 1, 1, t0, 5.0), Transaction(2, 1, 2, t0 + 8 * DAY, 7.0)])
    eng.process(Transaction(3, 2, 1, t0 + 8 * DAY, 1.0), update=False)
    FeatureEngine().import_customers(eng.export_customers({1}))
    for arena in (eng._tx, eng._pairs, eng._clabels, eng._tlabels):
        arena.grow()
    eng._expire(t0 + 400 * DAY)


class FeatureEngine(LabelQueue):
    """Per-customer / per-terminal incremental feature state in event time (columnar, compiled)."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        if not _compiled:
            _compile_kernels()
        super().__init__()
        c = self.config = config or EngineConfig()
        self.feature_names: list[str] = build_feature_names(c)
        self.handbook_index = [self.feature_names.index(n) for n in HANDBOOK_FEATURES]
        self.customers: dict[int, int] = {}  # customer id -> slot in the customer table and arenas
        self.terminals: dict[int, int] = {}  # terminal id -> slot in the terminal label arena
        self._free_slots: list[int] = []
        self._n_slots = 0
        self._cust = np.zeros((1024, fk.N_CUST_INT), dtype=np.int64)
        self._custf = np.zeros((1024, 2), dtype=np.float64)
        self._tx = fk.Arena(3, 1)  # time, terminal, superseded | amount
        self._pairs = fk.Arena(3, 0)  # terminal, count, last time
        self._clabels = fk.Arena(3, 1)  # time, label, known at | amount
        self._tlabels = fk.Arena(3, 1)
        # windows, ascending (the kernel scans each kind once) and where the configured ones sit
        uw = sorted(set(c.customer_windows_s) | {DAY, 7 * DAY, 30 * DAY})
        lw = sorted(c.customer_label_windows_days)
        tw = sorted(set(c.terminal_windows_days) | {1, 7, 30})
        self._uw = np.asarray(uw, dtype=np.int64)
        self._lw = np.asarray(lw, dtype=np.int64) * DAY
        self._tw = np.asarray(tw, dtype=np.int64) * DAY
        self._uw_cfg = np.asarray([uw.index(w) for w in c.customer_windows_s], dtype=np.int64)
        self._lw_cfg = np.asarray([lw.index(d) for d in c.customer_label_windows_days], dtype=np.int64)
        self._tw_cfg = np.asarray([tw.index(d) for d in c.terminal_windows_days], dtype=np.int64)
        self._layout = np.asarray(
            [uw.index(HOUR) if HOUR in uw else -1, uw.index(DAY), uw.index(7 * DAY), uw.index(30 * DAY)]
            + [tw.index(1), tw.index(7), tw.index(30)],
            dtype=np.int64,
        )

    # ----------------------------------------------------------------- slots
    def _new_slot(self, first_ts: int) -> int:
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            slot = self._n_slots
            self._n_slots += 1
            if slot >= len(self._cust):
                self._cust = np.concatenate([self._cust, np.zeros_like(self._cust)])
                self._custf = np.concatenate([self._custf, np.zeros_like(self._custf)])
            for arena in (self._tx, self._pairs, self._clabels):
                arena.ensure_slots(slot + 1)
        self._cust[slot] = (first_ts, fk.NONE, 0, 0, fk.NONE)
        self._custf[slot] = 0.0
        return slot

    def _free_slot(self, slot: int) -> None:
        for arena in (self._tx, self._pairs, self._clabels):
            arena.free(slot)
        self._free_slots.append(slot)

    def _terminal_slot(self, terminal_id: int) -> int:
        slot = self.terminals.get(terminal_id)
        if slot is None:
            slot = self.terminals[terminal_id] = len(self.terminals)
            self._tlabels.ensure_slots(slot + 1)
        return slot

    # --------------------------------------------------------------- feedback
    def advance(self, now: int) -> None:
        """Apply every queued label known at or before ``now`` (event time)."""
        due = self._pop_due(now)
        if due:
            self._apply_labels([op for op in map(self._resolve, due) if op is not None])

    def _resolve(self, item: _Feedback) -> tuple[int, int, int, int, int, float] | None:
        """A due label as a kernel operation (customer slot or -1, terminal slot, tx time, label, known at,
        amount), or None when it updates nothing."""
        target = self._match(item)
        if target is None:
            return None
        cust_id, term_id, ts, amount = target
        cslot = self.customers.get(cust_id, -1) if cust_id >= 0 else -1
        return cslot, self._terminal_slot(term_id), ts, item[3], item[0], amount

    # ------------------------------------------------------------ transactions
    def process(self, tx: Transaction, mode: str = "all", update: bool = True) -> np.ndarray | None:
        """Add a transaction to the state and return its features.

        ``mode``: ``"all"`` (the full vector, ``feature_names`` order), ``"handbook"`` (the 14
        handbook features in ``HANDBOOK_FEATURES`` order) or ``"none"`` (state update only).
        With ``update=False`` the features are computed as if the transaction were added, but
        the state is left unchanged (what-if scoring; due labels are still applied).
        """
        if mode not in ("all", "handbook", "none"):
            raise ValueError(f"unknown mode {mode!r}")
        x, errors = self._batch([tx], check_duplicates=False, update=update)
        if errors[0] is not None:
            raise errors[0]
        if mode == "none":
            return None
        return x[0, self.handbook_index] if mode == "handbook" else x[0]

    def process_batch(
        self, txs: list[Transaction], check_duplicates: bool = True
    ) -> tuple[np.ndarray, list[Exception | None]]:
        """Add ``txs`` in order and return ``([n_ok, F] features, per-event error or None)``: each event
        sees the state the previous ones left. Events that fail (out of order, or an id already in the
        state) get their exception and no row."""
        return self._batch(txs, check_duplicates, update=True)

    def _batch(
        self, txs: list[Transaction], check_duplicates: bool, update: bool
    ) -> tuple[np.ndarray, list[Exception | None]]:
        self.advance(self.watermark)
        n = len(txs)
        out = np.empty((n, len(self.feature_names)), dtype=np.float64)
        errors: list[Exception | None] = [None] * n
        ok = np.zeros(n, dtype=bool)
        start = 0
        while start < n:
            start = self._segment(txs, start, check_duplicates, update, out, errors, ok)
        return (out if ok.all() else out[ok]), errors

    def _segment(
        self,
        txs: list[Transaction],
        start: int,
        check_duplicates: bool,
        update: bool,
        out: np.ndarray,
        errors: list[Exception | None],
        ok: np.ndarray,
    ) -> int:
        """Process ``txs[start:end]`` in one kernel pass and return ``end``. A segment ends before an id
        seen earlier in it, and before a label due inside it that names one of its own transactions
        (that label must find the transaction pending), so the result is exactly that of one by one."""
        seen: dict[int, int] = {}
        end = start
        while end < len(txs) and txs[end].transaction_id not in seen:
            seen[txs[end].transaction_id] = end
            end += 1
        seg = txs[start:end]
        skip = np.zeros(len(seg), dtype=bool)
        if check_duplicates:
            pending = self.pending
            for j, tx in enumerate(seg):
                if tx.transaction_id in pending:
                    skip[j] = True
                    errors[start + j] = DuplicateTransactionError(
                        f"transaction {tx.transaction_id} was already scored into the feature state"
                    )
        ts = np.fromiter((tx.ts for tx in seg), dtype=np.int64, count=len(seg))
        # event time at each event: a skipped (duplicate) event does not move it
        wm = np.maximum.accumulate(np.where(skip, self.watermark, np.maximum(ts, self.watermark)))
        ops: list[tuple[int, int, int, int, int, float]] = []
        pos: list[int] = []
        fb = self._feedback
        live = np.flatnonzero(~skip)
        due: list[_Feedback] = []
        if len(live):
            while fb and fb[0][0] <= wm[live[-1]]:
                due.append(heapq.heappop(fb))
        if due:
            known = np.fromiter((item[0] for item in due), dtype=np.int64, count=len(due))
            # each label is applied before the first event whose event time reaches its known-at time
            at = live[np.searchsorted(wm[live], known, side="left")].tolist()
            for q, (item, k) in enumerate(zip(due, at, strict=True)):
                if seen.get(item[2], end) - start < k:
                    # the label's transaction is in this segment, before the label is due: split here
                    for back in due[q:]:
                        heapq.heappush(fb, back)
                    end = start + k
                    seg, skip, ts, wm = seg[:k], skip[:k], ts[:k], wm[:k]
                    break
                op = self._resolve(item)
                if op is not None:
                    ops.append(op)
                    pos.append(k)
        n = len(seg)
        slots = np.empty(n, dtype=np.int64)
        scratch = []
        for j, tx in enumerate(seg):
            if skip[j]:
                slots[j] = 0
                continue
            slot = self.customers.get(tx.customer_id)
            if slot is None:
                slot = self._new_slot(int(ts[j]))
                if update:
                    self.customers[tx.customer_id] = slot
                else:
                    scratch.append(slot)
            slots[j] = slot
        terms = np.fromiter((tx.terminal_id for tx in seg), dtype=np.int64, count=n)
        tslots = np.fromiter((self.terminals.get(t, -1) for t in terms.tolist()), dtype=np.int64, count=n)
        amts = np.fromiter((tx.amount for tx in seg), dtype=np.float64, count=n)
        err = np.zeros(n, dtype=np.int64)
        info = np.zeros(n, dtype=np.int64)
        self._run_kernel(slots, terms, tslots, ts, amts, skip, update, ops, pos, out[start:end], err, info)
        for slot in scratch:
            self._free_slot(slot)
        if n:
            self.watermark = max(self.watermark, int(wm[-1]))
        for j, tx in enumerate(seg):
            code = err[j]
            if code == fk.OUT_OF_ORDER:
                errors[start + j] = OutOfOrderError(
                    f"transaction {tx.transaction_id} at {tx.ts} is older than customer {tx.customer_id}'s "
                    f"latest transaction at {int(info[j])}"
                )
            elif code == fk.OK:
                ok[start + j] = True
                if update:
                    self.add_pending(tx.transaction_id, tx.customer_id, tx.terminal_id, tx.ts, tx.amount)
                    self.n_events += 1
                    if self.n_events % EXPIRE_EVERY == 0:
                        self._expire(tx.ts)
        return end

    def _apply_labels(self, ops: list) -> None:
        """Apply label operations with no events (``advance``)."""
        no_i, no_f = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
        no_rows = np.zeros((0, len(self.feature_names)))
        no_skip = np.zeros(0, dtype=bool)
        at = [0] * len(ops)
        self._run_kernel(no_i, no_i, no_i, no_i, no_f, no_skip, True, ops, at, no_rows, no_i, no_i)

    def _run_kernel(
        self,
        slots: np.ndarray,
        terms: np.ndarray,
        tslots: np.ndarray,
        ts: np.ndarray,
        amts: np.ndarray,
        skip: np.ndarray,
        update: bool,
        ops: list,
        pos: list[int],
        out: np.ndarray,
        err: np.ndarray,
        info: np.ndarray,
    ) -> None:
        """Call :func:`feature_kernel.process_events` until done, growing the arena it asks for."""
        if ops:
            cs, tsl, ot, oy, ok_, oa = zip(*ops, strict=True)
            op_i = np.asarray([pos, cs, tsl, ot, oy, ok_], dtype=np.int64)
            op_a = np.asarray(oa, dtype=np.float64)
        else:
            op_i, op_a = np.zeros((6, 0), dtype=np.int64), np.zeros(0, dtype=np.float64)
        arenas = {fk.NEED_TX: self._tx, fk.NEED_PAIRS: self._pairs, fk.NEED_CLABELS: self._clabels,
                  fk.NEED_TLABELS: self._tlabels}  # fmt: skip
        i = o = 0
        while True:
            tx, pr, cl, tl = self._tx, self._pairs, self._clabels, self._tlabels
            i, o, status = fk.process_events(
                slots, terms, tslots, ts, amts, skip, update, i,
                op_i[0], op_i[1], op_i[2], op_i[3], op_i[4], op_i[5], op_a, o,
                self._cust, self._custf,
                tx.ints, tx.floats, tx.slots, tx.top, pr.ints, pr.floats, pr.slots, pr.top,
                cl.ints, cl.floats, cl.slots, cl.top, tl.ints, tl.floats, tl.slots, tl.top,
                self._uw, self._lw, self._tw, self.config.delay_days * DAY, self._layout,
                self._uw_cfg, self._lw_cfg, self._tw_cfg, out, err, info,
            )  # fmt: skip
            if status == fk.DONE:
                return
            arenas[status].grow()

    def _expire(self, now: int) -> None:
        """Forget pending transactions whose label is overdue and evict old labelled entries."""
        c = self.config
        self._expire_queues(now, c)
        t_keep = now - (c.delay_days + max(c.terminal_windows_days)) * DAY
        fk.evict_labels(self._tlabels.ints, self._tlabels.slots, np.arange(len(self.terminals)), t_keep)
        c_keep = now - (max(c.customer_label_windows_days) + c.delay_days) * DAY
        fk.evict_labels(self._clabels.ints, self._clabels.slots, np.asarray(list(self.customers.values()),
                        dtype=np.int64), c_keep)  # fmt: skip

    # ----------------------------------------------------------------- state
    def export_customers(self, ids: set[int]) -> dict[str, np.ndarray]:
        """The per-customer state of ``ids`` (one Kafka partition's customers) and their pending
        transactions, as flat arrays (:mod:`services.financial_risk.feature_state`)."""
        from services.financial_risk.feature_state import export_customers

        self.advance(self.watermark)
        return export_customers(self, ids)

    def import_customers(self, arrays: dict[str, np.ndarray]) -> set[int]:
        """Add a partition's customers (from :meth:`export_customers`); returns their ids."""
        from services.financial_risk.feature_state import import_customers

        return import_customers(self, arrays)

    def drop_customers(self, ids: set[int]) -> None:
        """Forget customers (their partition moved to another worker)."""
        self.advance(self.watermark)
        for k in ids:
            slot = self.customers.pop(k, None)
            if slot is not None:
                self._free_slot(slot)
            for tx_id in self.pending_of.pop(k, ()):
                del self.pending[tx_id]
