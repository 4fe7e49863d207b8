"""Compiled (numba) kernels of the feature engine: columnar state in arenas, one pass per micro-batch.

The state of :class:`~services.financial_risk.features.FeatureEngine` lives in plain numpy arrays:

* a customer table (one row per customer *slot*: first / last time, lifetime count, known frauds, sums);
* four :class:`Arena` s, each a pair of row arrays (``ints [rows, k]``, ``floats [rows, m]``) in which
  every slot owns one contiguous region ``[base + head, base + length)``:

  - ``tx``: the customer's transactions of the last 30 days (time, terminal, superseded flag | amount);
  - ``pairs``: the customer's terminals ever used (terminal, count, last time);
  - ``clabels``: the customer's known labels, sorted by transaction time (time, label, known-at | amount);
  - ``tlabels``: a terminal's known labels, sorted by transaction time (same columns).

A region grows by moving to the arena's free end with twice the room (or by shifting left over rows that
were evicted from its head); when the arena is full the kernel stops and says which arena needs room,
the caller compacts or enlarges that arena (:meth:`Arena.grow`) and calls again from where it stopped.

:func:`process_events` runs a micro-batch event by event: it applies the labels due before each event
(resolved to slots by the caller), checks the customer's time order, computes the event's whole feature
row from the state (the windows of each kind in one scan, newest row first, as the reference engine's
reversed cumulative sums do) and then adds the event to the state. A row is *superseded* once a later
row of the same customer has the same terminal: the distinct terminals of a window are its rows that
are not superseded.
"""

from __future__ import annotations

import math

import numba
import numpy as np

NONE = np.iinfo(np.int64).min  # an absent time (no previous transaction, no known fraud)
DAY = 86400
HOUR = 3600

# customer table columns (int64)
C_FIRST, C_LAST, C_NTOT, C_NKF, C_LASTF = range(5)
N_CUST_INT = 5
# customer float columns
F_SUM, F_SUMSQ = range(2)
# arena slot table columns
S_BASE, S_HEAD, S_LEN, S_CAP = range(4)
# tx arena int columns
TX_T, TX_TERM, TX_SUP = range(3)
# label arenas int columns (float column 0: amount)
L_T, L_Y, L_K = range(3)
# pair arena int columns
P_TERM, P_COUNT, P_LAST = range(3)

# process_events status: done, or which arena must grow before calling again
DONE, NEED_TX, NEED_PAIRS, NEED_CLABELS, NEED_TLABELS = range(5)
# per-event error codes
OK, SKIPPED, OUT_OF_ORDER = range(3)

_JIT = {"cache": True, "nogil": True}


class Arena:
    """Rows of variable-length per-slot regions: ``ints [rows, n_int]``, ``floats [rows, n_float]`` and a
    slot table ``[slots, 4]`` (base, head, length, capacity); ``top`` is the first free row."""

    def __init__(self, n_int: int, n_float: int, rows: int = 4096, slots: int = 1024) -> None:
        self.ints = np.zeros((rows, n_int), dtype=np.int64)
        self.floats = np.zeros((rows, n_float), dtype=np.float64)
        self.slots = np.zeros((slots, 4), dtype=np.int64)
        self.top = np.zeros(1, dtype=np.int64)

    def ensure_slots(self, n: int) -> None:
        """Room for slot indices below ``n`` (new slots start empty)."""
        if n > len(self.slots):
            grown = np.zeros((max(n, 2 * len(self.slots)), 4), dtype=np.int64)
            grown[: len(self.slots)] = self.slots
            self.slots = grown

    def grow(self, extra: int = 0) -> None:
        """Compact every region into fresh arrays sized for twice the live rows (plus ``extra``)."""
        live = self.slots[:, S_LEN] - self.slots[:, S_HEAD]
        need = int((live + np.maximum(4, live // 2)).sum()) + extra
        rows = max(len(self.ints), 2 * need, 4096)
        ints = np.zeros((rows, self.ints.shape[1]), dtype=np.int64)
        floats = np.zeros((rows, self.floats.shape[1]), dtype=np.float64)
        _compact(self.ints, self.floats, self.slots, ints, floats, self.top)
        self.ints, self.floats = ints, floats

    def free(self, slot: int) -> None:
        """Forget ``slot``'s rows (their room is reclaimed by the next :meth:`grow`)."""
        self.slots[slot] = 0

    def gather(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The live rows of ``slots`` concatenated: (ints, floats, length per slot)."""
        return _gather(self.ints, self.floats, self.slots, np.asarray(slots, dtype=np.int64))

    def scatter(self, slots: np.ndarray, ints: np.ndarray, floats: np.ndarray, lengths: np.ndarray) -> None:
        """Give each of ``slots`` (empty) the rows of :meth:`gather` output."""
        need = int((lengths + np.maximum(4, lengths // 2)).sum())
        if int(self.top[0]) + need > len(self.ints):
            self.grow(need)
        sel = np.asarray(slots, dtype=np.int64)
        _scatter(self.ints, self.floats, self.slots, self.top, sel, ints, floats, lengths)


@numba.njit(**_JIT)
def _compact(ints, floats, slots, new_ints, new_floats, top):  # type: ignore[no-untyped-def]
    pos = 0
    for s in range(slots.shape[0]):
        base, head, length = slots[s, S_BASE], slots[s, S_HEAD], slots[s, S_LEN]
        live = length - head
        cap = live + max(4, live // 2) if slots[s, S_CAP] > 0 else 0
        for j in range(live):
            new_ints[pos + j, :] = ints[base + head + j, :]
            new_floats[pos + j, :] = floats[base + head + j, :]
        slots[s, S_BASE], slots[s, S_HEAD], slots[s, S_LEN], slots[s, S_CAP] = pos, 0, live, cap
        pos += cap
    top[0] = pos


@numba.njit(**_JIT)
def _gather(ints, floats, slots, sel):  # type: ignore[no-untyped-def]
    lengths = np.empty(len(sel), dtype=np.int64)
    for i in range(len(sel)):
        lengths[i] = slots[sel[i], S_LEN] - slots[sel[i], S_HEAD]
    out_i = np.empty((lengths.sum(), ints.shape[1]), dtype=np.int64)
    out_f = np.empty((lengths.sum(), floats.shape[1]), dtype=np.float64)
    pos = 0
    for i in range(len(sel)):
        first = slots[sel[i], S_BASE] + slots[sel[i], S_HEAD]
        for j in range(lengths[i]):
            out_i[pos + j, :] = ints[first + j, :]
            out_f[pos + j, :] = floats[first + j, :]
        pos += lengths[i]
    return out_i, out_f, lengths


@numba.njit(**_JIT)
def _scatter(ints, floats, slots, top, sel, rows_i, rows_f, lengths):  # type: ignore[no-untyped-def]
    pos = 0
    for i in range(len(sel)):
        n = lengths[i]
        cap = n + max(4, n // 2)
        base = top[0]
        for j in range(n):
            ints[base + j, :] = rows_i[pos + j, :]
            floats[base + j, :] = rows_f[pos + j, :]
        s = sel[i]
        slots[s, S_BASE], slots[s, S_HEAD], slots[s, S_LEN], slots[s, S_CAP] = base, 0, n, cap
        top[0] = base + cap
        pos += n


@numba.njit(**_JIT)
def _reserve(ints, floats, slots, top, s, extra):  # type: ignore[no-untyped-def]
    """Room for ``extra`` more rows at the end of slot ``s``'s region; False when the arena is full."""
    base, head, length, cap = slots[s, S_BASE], slots[s, S_HEAD], slots[s, S_LEN], slots[s, S_CAP]
    if length + extra <= cap:
        return True
    live = length - head
    if head > 0 and live + extra <= cap:  # shift left over the evicted head
        for j in range(live):
            ints[base + j, :] = ints[base + head + j, :]
            floats[base + j, :] = floats[base + head + j, :]
        slots[s, S_HEAD], slots[s, S_LEN] = 0, live
        return True
    new_cap = max(4, 2 * (live + extra))
    new_base = top[0]
    if new_base + new_cap > ints.shape[0]:
        return False
    for j in range(live):
        ints[new_base + j, :] = ints[base + head + j, :]
        floats[new_base + j, :] = floats[base + head + j, :]
    slots[s, S_BASE], slots[s, S_HEAD], slots[s, S_LEN], slots[s, S_CAP] = new_base, 0, live, new_cap
    top[0] = new_base + new_cap
    return True


@numba.njit(**_JIT)
def _insert_label(ints, floats, slots, s, t, y, k, amount):  # type: ignore[no-untyped-def]
    """Insert a label row after the rows of the same or an earlier time (room already reserved)."""
    base, head, length = slots[s, S_BASE], slots[s, S_HEAD], slots[s, S_LEN]
    p = base + length
    while p > base + head and ints[p - 1, L_T] > t:
        p -= 1
    for j in range(base + length, p, -1):
        ints[j, :] = ints[j - 1, :]
        floats[j, :] = floats[j - 1, :]
    ints[p, L_T], ints[p, L_Y], ints[p, L_K] = t, y, k
    floats[p, 0] = amount
    slots[s, S_LEN] = length + 1


@numba.njit(**_JIT)
def evict_labels(ints, slots, sel, keep):  # type: ignore[no-untyped-def]
    """Drop the label rows of ``sel`` with time <= ``keep`` (rows are sorted by time)."""
    for s in sel:
        base, head, length = slots[s, S_BASE], slots[s, S_HEAD], slots[s, S_LEN]
        while head < length and ints[base + head, L_T] <= keep:
            head += 1
        slots[s, S_HEAD] = head


@numba.njit(**_JIT)
def mark_superseded(ints, slots, sel):  # type: ignore[no-untyped-def]
    """Recompute the superseded flags of ``sel``'s transaction rows (after a restore)."""
    for s in sel:
        first, end = slots[s, S_BASE] + slots[s, S_HEAD], slots[s, S_BASE] + slots[s, S_LEN]
        for j in range(end - 1, first - 1, -1):
            ints[j, TX_SUP] = 0
            for q in range(j + 1, end):
                if ints[q, TX_TERM] == ints[j, TX_TERM]:
                    ints[j, TX_SUP] = 1
                    break


@numba.njit(**_JIT)
def _div(a, b):  # type: ignore[no-untyped-def]
    return a / b if b != 0 else np.nan


@numba.njit(**_JIT)
def _apply_label(cust, cl_i, cl_f, cl_s, cl_top, tl_i, tl_f, tl_s, tl_top, cslot, tslot, t, y, k, amount):  # type: ignore[no-untyped-def]  # noqa: E501
    """Add one label to its terminal's and its customer's rows; returns a NEED_* status or DONE."""
    if tslot >= 0 and not _reserve(tl_i, tl_f, tl_s, tl_top, tslot, 1):
        return NEED_TLABELS
    if cslot >= 0 and not _reserve(cl_i, cl_f, cl_s, cl_top, cslot, 1):
        return NEED_CLABELS
    if tslot >= 0:
        _insert_label(tl_i, tl_f, tl_s, tslot, t, y, k, amount)
    if cslot >= 0:
        _insert_label(cl_i, cl_f, cl_s, cslot, t, y, k, amount)
        if y:
            cust[cslot, C_NKF] += 1
            if cust[cslot, C_LASTF] == NONE or t > cust[cslot, C_LASTF]:
                cust[cslot, C_LASTF] = t
    return DONE


@numba.njit(**_JIT)
def _customer_windows(tx_i, tx_f, first, end, ts, amount, term, uw, stats):  # type: ignore[no-untyped-def]
    """Window statistics over the event (virtual newest row) and the customer's rows ``[first, end)``,
    newest first: ``stats[w] = (count, sum, sum of squares, min, max, <= amount, night, weekend,
    same terminal, distinct terminals, sum of hours)`` for each window ``uw[w]`` (ascending, seconds).
    Returns the row index of the previous transaction at ``term`` that is not superseded yet, or -1."""
    hr = (ts % DAY) // HOUR
    wd = ((ts // DAY) + 3) % 7
    cnt, s, sq, mn, mx = 1.0, amount, amount * amount, amount, amount
    le, same, distinct, hsum = 1.0, 1.0, 1.0, float(hr)
    night = 1.0 if hr <= 6 else 0.0
    wkend = 1.0 if wd >= 5 else 0.0
    wi = 0
    prev_same = -1
    for j in range(end - 1, first - 2, -1):
        t = tx_i[j, TX_T] if j >= first else NONE  # past the oldest row: every window closes
        while wi < len(uw) and t <= ts - uw[wi]:
            stats[wi, 0], stats[wi, 1], stats[wi, 2], stats[wi, 3], stats[wi, 4] = cnt, s, sq, mn, mx
            stats[wi, 5], stats[wi, 6], stats[wi, 7], stats[wi, 8] = le, night, wkend, same
            stats[wi, 9], stats[wi, 10] = distinct, hsum
            wi += 1
        if wi == len(uw):
            break
        a = tx_f[j, 0]
        h = (t % DAY) // HOUR
        cnt += 1.0
        s += a
        sq += a * a
        mn = min(mn, a)
        mx = max(mx, a)
        le += 1.0 if a <= amount else 0.0
        night += 1.0 if h <= 6 else 0.0
        wkend += 1.0 if ((t // DAY) + 3) % 7 >= 5 else 0.0
        hsum += h
        if tx_i[j, TX_TERM] == term:
            same += 1.0
            if tx_i[j, TX_SUP] == 0:
                prev_same = j  # superseded by this event: not a distinct terminal any more
        elif tx_i[j, TX_SUP] == 0:
            distinct += 1.0
    return prev_same


@numba.njit(**_JIT)
def _label_windows(cl_i, cl_f, first, end, ts, lw, stats):  # type: ignore[no-untyped-def]
    """The customer's labels known at ``ts`` in each window ``lw[w]`` (ascending): ``stats[w] = (known,
    frauds, fraud amount, known amount)``; returns the time of the newest known fraud in the widest
    window, or NONE."""
    n, fr, famt, kamt = 0.0, 0.0, 0.0, 0.0
    last_fraud = NONE
    wi = 0
    for j in range(end - 1, first - 2, -1):
        t = cl_i[j, L_T] if j >= first else NONE
        while wi < len(lw) and t <= ts - lw[wi]:
            stats[wi, 0], stats[wi, 1], stats[wi, 2], stats[wi, 3] = n, fr, famt, kamt
            wi += 1
        if wi == len(lw):
            break
        if cl_i[j, L_K] <= ts:
            a = cl_f[j, 0]
            n += 1.0
            kamt += a
            if cl_i[j, L_Y] != 0:
                fr += 1.0
                famt += a
                if last_fraud == NONE:
                    last_fraud = t
    return last_fraud


@numba.njit(**_JIT)
def _terminal_windows(tl_i, tl_f, first, end, cut_end, tw, i30, stats):  # type: ignore[no-untyped-def]
    """The terminal's labelled transactions in ``(cut_end - tw[w], cut_end]`` for each window (ascending):
    ``stats[w] = (count, sum, sum of squares, max, frauds, fraud amount)``; returns the time of the newest
    fraud in window ``i30``, or NONE."""
    n, s, sq, mx, fr, famt = 0.0, 0.0, 0.0, -np.inf, 0.0, 0.0
    last_fraud = NONE
    last_fraud_w = NONE
    wi = 0
    newest = end - 1
    while newest >= first and tl_i[newest, L_T] > cut_end:  # labelled less than ``delay`` ago
        newest -= 1
    for j in range(newest, first - 2, -1):
        t = tl_i[j, L_T] if j >= first else NONE
        while wi < len(tw) and t <= cut_end - tw[wi]:
            stats[wi, 0], stats[wi, 1], stats[wi, 2] = n, s, sq
            stats[wi, 3], stats[wi, 4], stats[wi, 5] = mx, fr, famt
            if wi == i30:
                last_fraud_w = last_fraud
            wi += 1
        if wi == len(tw):
            break
        a = tl_f[j, 0]
        n += 1.0
        s += a
        sq += a * a
        mx = max(mx, a)
        if tl_i[j, L_Y] != 0:
            fr += 1.0
            famt += a
            if last_fraud == NONE:
                last_fraud = t
    return last_fraud_w


@numba.njit(**_JIT)
def _write_row(row, ts, amount, cust, custf, cs, pair_count, pair_last, cstats, lstats, last_kf, tstats,
               last_tf, layout, uw_cfg, lw_cfg, tw_cfg):  # type: ignore[no-untyped-def]  # fmt: skip
    """One event's feature row, in ``FeatureEngine.feature_names`` order (the reference engine's ``_all``).
    ``layout``: indices into the window statistics of 1 h (-1 if absent), 1 / 7 / 30 days (customer) and
    1 / 7 / 30 days (terminal)."""
    i_h, i_1, i_7, i_30, t_1, t_7, t_30 = (
        layout[0],
        layout[1],
        layout[2],
        layout[3],
        layout[4],
        layout[5],
        layout[6],
    )
    hr = (ts % DAY) // HOUR
    wd = ((ts // DAY) + 3) % 7
    row[0] = amount
    row[1] = math.log1p(max(amount, 0.0))
    row[2] = float(hr)
    row[3] = float(wd)
    row[4] = math.sin(2 * math.pi * hr / 24)
    row[5] = math.cos(2 * math.pi * hr / 24)
    row[6] = 1.0 if wd >= 5 else 0.0
    row[7] = 1.0 if hr <= 6 else 0.0
    c = 8
    for w in uw_cfg:
        k, s, sq, mn, mx = cstats[w, 0], cstats[w, 1], cstats[w, 2], cstats[w, 3], cstats[w, 4]
        mean = s / k
        var = max(sq / k - mean * mean, 0.0)
        std = math.sqrt(var * k / (k - 1)) if k > 1 else np.nan
        row[c], row[c + 1], row[c + 2], row[c + 3], row[c + 4], row[c + 5] = k, s, mean, std, mn, mx
        row[c + 6] = _div(amount, mean)
        row[c + 7] = (amount - mean) / std if std > 0 else np.nan
        row[c + 8] = _div(amount, mx)
        row[c + 9] = amount - mean
        row[c + 10] = cstats[w, 5] / k
        row[c + 11] = cstats[w, 6] / k
        row[c + 12] = cstats[w, 7] / k
        row[c + 13] = cstats[w, 9]
        row[c + 14] = cstats[w, 8]
        c += 15
    # lifetime and gaps (the counters exclude this event)
    n_tot = float(cust[cs, C_NTOT])
    s_tot, sq_tot = custf[cs, F_SUM], custf[cs, F_SUMSQ]
    mean_tot = s_tot / n_tot if n_tot > 0 else np.nan
    std_tot = math.sqrt(max(sq_tot / n_tot - mean_tot * mean_tot, 0.0)) if n_tot > 1 else np.nan
    mean_hour = cstats[i_30, 10] / cstats[i_30, 0]
    last = cust[cs, C_LAST]
    row[c] = float(ts - last) if last != NONE else np.nan
    row[c + 1] = float(ts - pair_last) if pair_last != NONE else np.nan
    row[c + 2] = (ts - cust[cs, C_FIRST]) / DAY
    row[c + 3] = n_tot
    row[c + 4] = mean_tot
    row[c + 5] = std_tot
    row[c + 6] = _div(amount, mean_tot) if n_tot > 0 else np.nan
    row[c + 7] = (amount - mean_tot) / std_tot if n_tot > 1 and std_tot > 0 else np.nan
    row[c + 8] = float(pair_count)
    row[c + 9] = 1.0 if pair_count == 0 else 0.0
    row[c + 10] = mean_hour
    row[c + 11] = abs(hr - mean_hour)
    c += 12
    # velocity
    cnt_h = cstats[i_h, 0] if i_h >= 0 else 0.0
    tot_h = cstats[i_h, 1] if i_h >= 0 else 0.0
    cnt_1, cnt_7, cnt_30 = cstats[i_1, 0], cstats[i_7, 0], cstats[i_30, 0]
    tot_1, tot_7, tot_30 = cstats[i_1, 1], cstats[i_7, 1], cstats[i_30, 1]
    row[c] = _div(cnt_h * 24, cnt_1)
    row[c + 1] = _div(cnt_1 * 7, cnt_7)
    row[c + 2] = _div(cnt_7 * 30 / 7, cnt_30)
    row[c + 3] = _div(tot_h * 24, tot_1)
    row[c + 4] = _div(tot_1 * 7, tot_7)
    row[c + 5] = _div(tot_7 * 30 / 7, tot_30)
    row[c + 6] = _div(_div(tot_1, cnt_1), _div(tot_30, cnt_30))
    row[c + 7] = _div(_div(tot_7, cnt_7), _div(tot_30, cnt_30))
    c += 8
    # the customer's own labels known at the event's time
    for w in lw_cfg:
        n, fr = lstats[w, 0], lstats[w, 1]
        row[c], row[c + 1], row[c + 2], row[c + 3] = n, fr, fr / n if n > 0 else 0.0, lstats[w, 2]
        c += 4
    big = len(lstats) - 1
    row[c] = _div(lstats[big, 2], lstats[big, 3])
    row[c + 1] = (ts - last_kf) / DAY if last_kf != NONE else np.nan
    c += 2
    # terminal, delayed windows
    for w in tw_cfg:
        n, s, sq, mx, fr, famt = (
            tstats[w, 0],
            tstats[w, 1],
            tstats[w, 2],
            tstats[w, 3],
            tstats[w, 4],
            tstats[w, 5],
        )
        if n > 0:
            mean = s / n
            std = math.sqrt(max(sq / n - mean * mean, 0.0) * n / (n - 1)) if n > 1 else np.nan
            row[c], row[c + 1], row[c + 2], row[c + 3], row[c + 4] = n, fr, fr / n, mean, std
            row[c + 5], row[c + 6], row[c + 7] = mx, famt, _div(amount, mean)
        else:
            row[c], row[c + 1], row[c + 2], row[c + 3], row[c + 4] = 0.0, 0.0, 0.0, np.nan, np.nan
            row[c + 5], row[c + 6], row[c + 7] = np.nan, 0.0, np.nan
        c += 8
    n1, n7, n30 = tstats[t_1, 0], tstats[t_7, 0], tstats[t_30, 0]
    r1 = tstats[t_1, 4] / n1 if n1 > 0 else 0.0
    r7 = tstats[t_7, 4] / n7 if n7 > 0 else 0.0
    r30 = tstats[t_30, 4] / n30 if n30 > 0 else 0.0
    row[c] = (ts - last_tf) / DAY if last_tf != NONE else np.nan
    row[c + 1] = _div(n7 * 30 / 7, n30)
    row[c + 2] = r7 - r30
    row[c + 3] = r1 - r30
    c += 4
    # the handbook's 12 window features
    row[c], row[c + 1] = cnt_1, tot_1 / cnt_1
    row[c + 2], row[c + 3] = cnt_7, tot_7 / cnt_7
    row[c + 4], row[c + 5] = cnt_30, tot_30 / cnt_30
    row[c + 6], row[c + 7], row[c + 8], row[c + 9], row[c + 10], row[c + 11] = n1, r1, n7, r7, n30, r30


@numba.njit(**_JIT)
def process_events(ev_slot, ev_term, ev_tslot, ev_ts, ev_amt, ev_skip, update, start,
                   op_pos, op_cslot, op_tslot, op_t, op_y, op_k, op_amt, op_start,
                   cust, custf, tx_i, tx_f, tx_s, tx_top, pr_i, pr_f, pr_s, pr_top,
                   cl_i, cl_f, cl_s, cl_top, tl_i, tl_f, tl_s, tl_top,
                   uw, lw, tw, delay, layout, uw_cfg, lw_cfg, tw_cfg, out, err, info):  # type: ignore[no-untyped-def]  # fmt: skip
    """Events ``[start, n)`` in order: labels ``op_*`` due at each event first (``op_pos``: the event
    index they precede), then the event's features into ``out[i]`` and (``update``) the event into the
    state. ``err[i]``: OK, SKIPPED (``ev_skip``) or OUT_OF_ORDER (``info[i]``: the customer's latest time).
    Returns ``(next event, next label, status)``: status DONE, or the NEED_* arena to grow before calling
    again from there."""
    n_ops = len(op_pos)
    o = op_start
    cstats = np.empty((len(uw), 11), dtype=np.float64)
    lstats = np.empty((len(lw), 4), dtype=np.float64)
    tstats = np.empty((len(tw), 6), dtype=np.float64)
    max_w = uw[-1]
    for i in range(start, len(ev_slot)):
        while o < n_ops and op_pos[o] <= i:
            status = _apply_label(cust, cl_i, cl_f, cl_s, cl_top, tl_i, tl_f, tl_s, tl_top, op_cslot[o],
                                  op_tslot[o], op_t[o], op_y[o], op_k[o], op_amt[o])  # fmt: skip
            if status != DONE:
                return i, o, status
            o += 1
        if ev_skip[i]:
            err[i] = SKIPPED
            continue
        cs, ts, amount, term = ev_slot[i], ev_ts[i], ev_amt[i], ev_term[i]
        last = cust[cs, C_LAST]
        if last != NONE and ts < last:
            err[i] = OUT_OF_ORDER
            info[i] = last
            continue
        if update:
            base = tx_s[cs, S_BASE]
            head, length = tx_s[cs, S_HEAD], tx_s[cs, S_LEN]
            while head < length and tx_i[base + head, TX_T] <= ts - max_w:
                head += 1
            tx_s[cs, S_HEAD] = head
            if not _reserve(tx_i, tx_f, tx_s, tx_top, cs, 1):
                return i, o, NEED_TX
            if not _reserve(pr_i, pr_f, pr_s, pr_top, cs, 1):
                return i, o, NEED_PAIRS
        first = tx_s[cs, S_BASE] + tx_s[cs, S_HEAD]
        end = tx_s[cs, S_BASE] + tx_s[cs, S_LEN]
        prev_same = _customer_windows(tx_i, tx_f, first, end, ts, amount, term, uw, cstats)
        # this customer's pair with the terminal
        p_first, p_end = pr_s[cs, S_BASE] + pr_s[cs, S_HEAD], pr_s[cs, S_BASE] + pr_s[cs, S_LEN]
        pair = -1
        for p in range(p_first, p_end):
            if pr_i[p, P_TERM] == term:
                pair = p
                break
        pair_count = pr_i[pair, P_COUNT] if pair >= 0 else 0
        pair_last = pr_i[pair, P_LAST] if pair >= 0 else NONE
        l_first, l_end = cl_s[cs, S_BASE] + cl_s[cs, S_HEAD], cl_s[cs, S_BASE] + cl_s[cs, S_LEN]
        last_kf = _label_windows(cl_i, cl_f, l_first, l_end, ts, lw, lstats)
        ts_slot = ev_tslot[i]
        if ts_slot >= 0:
            t_first = tl_s[ts_slot, S_BASE] + tl_s[ts_slot, S_HEAD]
            t_end = tl_s[ts_slot, S_BASE] + tl_s[ts_slot, S_LEN]
        else:
            t_first, t_end = 0, 0
        last_tf = _terminal_windows(tl_i, tl_f, t_first, t_end, ts - delay, tw, layout[6], tstats)
        _write_row(
            out[i], ts, amount, cust, custf, cs, pair_count, pair_last,
            cstats, lstats, last_kf, tstats, last_tf, layout, uw_cfg, lw_cfg, tw_cfg,
        )  # fmt: skip
        err[i] = OK
        if not update:
            continue
        # the event enters the state
        if prev_same >= 0:
            tx_i[prev_same, TX_SUP] = 1
        row = end
        tx_i[row, TX_T], tx_i[row, TX_TERM], tx_i[row, TX_SUP] = ts, term, 0
        tx_f[row, 0] = amount
        tx_s[cs, S_LEN] += 1
        if pair >= 0:
            pr_i[pair, P_COUNT] += 1
            pr_i[pair, P_LAST] = ts
        else:
            pr_i[p_end, P_TERM], pr_i[p_end, P_COUNT], pr_i[p_end, P_LAST] = term, 1, ts
            pr_s[cs, S_LEN] += 1
        cust[cs, C_NTOT] += 1
        custf[cs, F_SUM] += amount
        custf[cs, F_SUMSQ] += amount * amount
        cust[cs, C_LAST] = ts
    while o < n_ops:  # labels due after the last event (a batch split before its next event; ``advance``)
        status = _apply_label(
            cust, cl_i, cl_f, cl_s, cl_top, tl_i, tl_f, tl_s, tl_top,
            op_cslot[o], op_tslot[o], op_t[o], op_y[o], op_k[o], op_amt[o],
        )  # fmt: skip
        if status != DONE:
            return len(ev_slot), o, status
        o += 1
    return len(ev_slot), o, DONE
