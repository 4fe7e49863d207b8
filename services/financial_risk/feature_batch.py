"""Vectorised features for a micro-batch of transactions (``FeatureEngine.process_batch``).

:meth:`FeatureEngine.process` computes one vector with a few dozen small numpy calls, and at
thousands of events per second their fixed cost dominates. A batch instead:

1. updates the state event by event in Python, exactly as ``process`` does (labels applied in event
   time, per-customer order checks, lifetime counters), recording for each event where its history
   ends and the state scalars it saw;
2. gathers, for every event, its *segment* of rows: the customer's last 30 days up to and including
   the event, its customer's known labels of the last 60 days and its terminal's labelled
   transactions of the delayed window; segments are concatenated, one array per quantity;
3. computes every window statistic of the whole batch with a constant number of numpy calls. All
   windows of one kind end at the same row (the event, or the delay boundary), so a window is a
   suffix ``[start, end)`` of its segment: sums are ``np.add.reduceat`` over (start, end) pairs,
   counts ``cumsum`` differences, extrema ``minimum/maximum.reduceat``.

Later events of the batch add rows (and labels) that earlier events must not see: customer rows are
bounded by each event's own end row, labels by their known-at time (a label applied after event ``i``
became known after the watermark at ``i``). The result equals ``process`` for every event up to
floating-point rounding of the sums (``tests/financial_risk/test_financial_risk_features.py``).
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_right

import numpy as np

from services.financial_risk.features import (
    FeatureEngine,
    OutOfOrderError,
    Transaction,
    _Customer,
    velocity_features,
)

DAY = 86400
HOUR = 3600


class _Gather:
    """Concatenated per-event slices of typed arrays: event ``i`` owns rows ``[off[i], end[i])``."""

    def __init__(self, n_arrays: int, typecodes: str) -> None:
        self.bufs = [array(tc) for tc in typecodes[:n_arrays]]
        self.off: list[int] = []
        self.size = 0

    def add(self, arrays: tuple[array, ...], lo: int, hi: int) -> None:
        self.off.append(self.size)
        if hi > lo:
            for buf, arr in zip(self.bufs, arrays, strict=True):
                buf.extend(arr[lo:hi])
            self.size += hi - lo

    def numpy(self) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """(arrays, off, end) as numpy."""
        arrs = [np.frombuffer(b, dtype=np.int64 if b.typecode == "q" else np.float64) for b in self.bufs]
        off = np.asarray(self.off, dtype=np.int64)
        end = np.append(off[1:], self.size)
        return arrs, off, end


def _starts(times: np.ndarray, off: np.ndarray, end: np.ndarray, cut: np.ndarray) -> np.ndarray:
    """``[B, K]`` first row of each segment whose time is > ``cut[b, k]`` (segments ascending in time).

    One ``searchsorted`` over composite keys ``segment * span + time``."""
    b = len(off)
    if times.size == 0:
        return np.broadcast_to(end[:, None], cut.shape).copy()
    seg = np.repeat(np.arange(b, dtype=np.int64), end - off)
    base = min(int(times.min()), int(cut.min())) - 1
    span = max(int(times.max()), int(cut.max())) - base + 2
    if span * (b + 1) >= 2**62:
        raise OverflowError("time span too large for a batch")
    keys = seg * span + (times - base)
    q = np.arange(b, dtype=np.int64)[:, None] * span + (cut - base)
    start = np.searchsorted(keys, q.ravel(), side="right").reshape(cut.shape)
    return np.clip(start, off[:, None], end[:, None])


def _pairs(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Interleaved (start, end) indices for ``reduceat``; take every other result."""
    idx = np.empty(2 * start.size, dtype=np.int64)
    idx[0::2] = start.ravel()
    idx[1::2] = np.broadcast_to(end, start.shape).ravel()
    return idx


def _range_reduce(ufunc: np.ufunc, values: np.ndarray, idx: np.ndarray, empty: float) -> np.ndarray:
    """``ufunc.reduce(values[s:e])`` for every (s, e) pair of ``idx``; ``empty`` where s == e."""
    ext = np.concatenate([values, np.full((1,) + values.shape[1:], empty, dtype=values.dtype)])
    out = ufunc.reduceat(ext, idx, axis=0)[0::2]
    blank = idx[0::2] >= idx[1::2]
    if blank.any():
        out[blank] = empty
    return out


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a / b``, NaN where ``b == 0`` (the scalar engine's ``_nan_div``)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b != 0, a / np.where(b != 0, b, 1.0), np.nan)


def process_batch(
    engine: FeatureEngine, txs: list[Transaction], check_duplicates: bool = True
) -> tuple[np.ndarray, list[Exception | None]]:
    """Add ``txs`` (in order) to ``engine``'s state and return ``([n_ok, F] features, per-event error)``.

    An event that cannot be added (out of order for its customer, or an id already in the state when
    ``check_duplicates``) gets its exception and no row; the rows are those of the other events, in
    order."""
    c = engine.config
    max_w = max(c.customer_windows_s)
    label_w = max(c.customer_label_windows_days) * DAY
    delay = c.delay_days * DAY
    term_w = max(engine._term_days) * DAY
    errors: list[Exception | None] = [None] * len(txs)
    ok: list[int] = []
    custs: list[_Customer] = []
    wms: list[int] = []
    cust_rows = _Gather(3, "qdq")
    use_rows = _Gather(1, "q")  # terminals' last-use times as of each event (distinct terminals)
    scalars: list[tuple[float, ...]] = []
    expire_at: int | None = None
    for i, tx in enumerate(txs):
        ts = int(tx.ts)
        if check_duplicates and (dup := engine.duplicate_error(tx.transaction_id)) is not None:
            errors[i] = dup
            continue
        if ts > engine.watermark:
            engine.watermark = ts
        engine.advance(ts)
        cid, tid, amount = int(tx.customer_id), int(tx.terminal_id), float(tx.amount)
        cust = engine.customers.get(cid)
        if cust is None:
            cust = engine.customers[cid] = _Customer(first_ts=ts)
        elif cust.last_ts is not None and ts < cust.last_ts:
            errors[i] = OutOfOrderError(
                f"transaction {tx.transaction_id} at {ts} is older than customer {cid}'s "
                f"latest transaction at {cust.last_ts}"
            )
            continue
        lo = bisect_right(cust.times, ts - max_w, cust.head)
        cust.times.append(ts)
        cust.amounts.append(amount)
        cust.terminals.append(tid)
        cust_rows.add((cust.times, cust.amounts, cust.terminals), lo, len(cust.times))
        pair = cust.pairs.get(tid)
        scalars.append(
            (
                math.nan if cust.last_ts is None else float(ts - cust.last_ts),
                math.nan if pair is None else float(ts - pair[1]),
                (ts - cust.first_ts) / DAY,
                float(cust.n_total),
                cust.sum_total,
                cust.sumsq_total,
                0.0 if pair is None else float(pair[0]),
            )
        )
        # the state update of ``process``
        cust.n_total += 1
        cust.sum_total += amount
        cust.sumsq_total += amount * amount
        cust.last_ts = ts
        cust.use_terminal(tid, ts)
        lu = cust.last_use
        use_rows.add((lu,), bisect_right(lu, ts - max_w), len(lu))
        engine.add_pending(int(tx.transaction_id), cid, tid, ts, amount)
        engine.n_events += 1
        if engine.n_events % 50_000 == 0:
            expire_at = ts
        ok.append(i)
        custs.append(cust)
        wms.append(engine.watermark)
    if not ok:
        return np.zeros((0, len(engine.feature_names))), errors
    ev = [txs[i] for i in ok]
    ts_arr = np.fromiter((int(t.ts) for t in ev), dtype=np.int64, count=len(ev))
    amt = np.fromiter((float(t.amount) for t in ev), dtype=np.float64, count=len(ev))
    term = np.fromiter((int(t.terminal_id) for t in ev), dtype=np.int64, count=len(ev))
    wm = np.asarray(wms, dtype=np.int64)
    # labels: the customer's of the last 60 days, the terminal's of the delayed window
    label_rows = _Gather(4, "qqdq")
    term_rows = _Gather(4, "qqdq")
    for tx, cust in zip(ev, custs, strict=True):
        ts = int(tx.ts)
        lt = cust.l_times
        label_rows.add(
            (lt, cust.l_labels, cust.l_amounts, cust.l_known), bisect_right(lt, ts - label_w), len(lt)
        )
        tm = engine.terminals.get(int(tx.terminal_id))
        if tm is None:
            term_rows.add((), 0, 0)
        else:
            hi = bisect_right(tm.times, ts - delay)
            term_rows.add(
                (tm.times, tm.labels, tm.amounts, tm.known),
                bisect_right(tm.times, ts - delay - term_w, 0, hi),
                hi,
            )
    out = _assemble(engine, ts_arr, amt, term, wm, cust_rows, use_rows, label_rows, term_rows, scalars)
    # deferred housekeeping: eviction and expiry move rows, so they wait until every segment is read
    for cust in custs:
        cust.evict(cust.last_ts - max_w)  # type: ignore[operator]
    if expire_at is not None:
        engine._expire(expire_at)
    return out, errors


def _assemble(
    engine: FeatureEngine,
    ts: np.ndarray,
    amt: np.ndarray,
    term: np.ndarray,
    wm: np.ndarray,
    cust_rows: _Gather,
    use_rows: _Gather,
    label_rows: _Gather,
    term_rows: _Gather,
    scalars: list[tuple[float, ...]],
) -> np.ndarray:
    """The ``[B, F]`` matrix, columns in ``engine.feature_names`` order (see ``FeatureEngine._all``)."""
    c = engine.config
    b = len(ts)
    cols: list[np.ndarray] = []
    # transaction
    days = ts // DAY
    wd = (days + 3) % 7
    hr = (ts % DAY) // HOUR
    cols += [amt, np.log1p(np.maximum(amt, 0.0)), hr.astype(float), wd.astype(float)]
    cols += [
        np.sin(2 * np.pi * hr / 24),
        np.cos(2 * np.pi * hr / 24),
        (wd >= 5).astype(float),
        (hr <= 6).astype(float),
    ]
    # customer windows: rows ascending in time, the event's own row last
    (t_c, a_c, r_c), off, end = cust_rows.numpy()
    n = end - off
    seg = np.repeat(np.arange(b, dtype=np.int64), n)
    windows = engine._cust_window_s
    start = _starts(t_c, off, end, ts[:, None] - windows[None, :])  # [B, W]
    k = (end[:, None] - start).astype(float)
    h_c = (t_c % DAY) // HOUR
    (u_t,), u_off, u_end = use_rows.numpy()
    distinct = u_end[:, None] - _starts(u_t, u_off, u_end, ts[:, None] - windows[None, :])
    vals = np.stack(
        [
            a_c,
            a_c * a_c,
            a_c <= amt[seg],
            h_c <= 6,
            ((t_c // DAY + 3) % 7) >= 5,
            r_c == term[seg],
            h_c,
        ],
        axis=1,
    ).astype(np.float64)
    idx = _pairs(start, end[:, None])
    sums = _range_reduce(np.add, vals, idx, 0.0).reshape(b, len(windows), vals.shape[1])
    mins = _range_reduce(np.minimum, a_c, idx, np.nan).reshape(b, len(windows))
    maxs = _range_reduce(np.maximum, a_c, idx, np.nan).reshape(b, len(windows))
    pos = engine._cust_window_pos
    with np.errstate(divide="ignore", invalid="ignore"):
        # per window (config order): 15 statistics; one [B, W, 15] block, flattened window by window
        sel = [pos[w] for w in c.customer_windows_s]
        kw, s, sq = k[:, sel], sums[:, sel, 0], sums[:, sel, 1]
        mean = s / kw
        var = np.maximum(sq / kw - mean * mean, 0.0)
        std = np.where(kw > 1, np.sqrt(var * kw / np.maximum(kw - 1, 1)), np.nan)
        a2, mx = amt[:, None], maxs[:, sel]
        block = [kw, s, mean, std, mins[:, sel], mx]
        block += [
            _div(a2, mean),
            np.where(std > 0, (a2 - mean) / np.where(std > 0, std, 1.0), np.nan),
            _div(a2, mx),
            a2 - mean,
            sums[:, sel, 2] / kw,
        ]
        block += [sums[:, sel, 3] / kw, sums[:, sel, 4] / kw, distinct[:, sel].astype(float), sums[:, sel, 5]]
        cols.append(np.stack(block, axis=2).reshape(b, -1))
        # lifetime and gaps (counters exclude the current transaction)
        sc = np.asarray(scalars, dtype=np.float64)
        n_tot, s_tot, sq_tot = sc[:, 3], sc[:, 4], sc[:, 5]
        mean_tot = np.where(n_tot > 0, s_tot / np.maximum(n_tot, 1), np.nan)
        std_tot = np.where(
            n_tot > 1, np.sqrt(np.maximum(sq_tot / np.maximum(n_tot, 1) - mean_tot**2, 0.0)), np.nan
        )
        j30 = pos[30 * DAY]
        mean_hour = sums[:, j30, 6] / k[:, j30]
        cols += [
            sc[:, 0],
            sc[:, 1],
            sc[:, 2],
            n_tot,
            mean_tot,
            std_tot,
            np.where(n_tot > 0, _div(amt, mean_tot), np.nan),
            np.where(
                (n_tot > 1) & (std_tot > 0), (amt - mean_tot) / np.where(std_tot > 0, std_tot, 1.0), np.nan
            ),
            sc[:, 6],
            (sc[:, 6] == 0).astype(float),
            mean_hour,
            np.abs(hr - mean_hour),
        ]

        def cnt(w: int) -> np.ndarray:
            return k[:, pos[w]]

        def tot(w: int) -> np.ndarray:
            return sums[:, pos[w], 0]

        cols += velocity_features(cnt, tot, _div)
        hand_cust = []
        for d in (1, 7, 30):
            hand_cust += [cnt(d * DAY), tot(d * DAY) / cnt(d * DAY)]
        # the customer's own labels known at event time (l_known <= ts)
        (lt, ll, la, lk), loff, lend = label_rows.numpy()
        lseg = np.repeat(np.arange(b, dtype=np.int64), lend - loff)
        vis = lk <= ts[lseg]
        fraud = vis & (ll != 0)
        lwin = np.asarray(c.customer_label_windows_days, dtype=np.int64) * DAY
        lstart = _starts(lt, loff, lend, ts[:, None] - lwin[None, :])
        lvals = np.stack([vis, fraud, np.where(fraud, la, 0.0), np.where(vis, la, 0.0)], axis=1).astype(
            np.float64
        )
        lsums = _range_reduce(np.add, lvals, _pairs(lstart, lend[:, None]), 0.0).reshape(b, len(lwin), 4)
        nl, fr = lsums[:, :, 0], lsums[:, :, 1]
        block = [nl, fr, np.where(nl > 0, fr / np.maximum(nl, 1), 0.0), lsums[:, :, 2]]
        cols.append(np.stack(block, axis=2).reshape(b, -1))
        big = int(np.argmax(lwin))  # the widest window = the whole segment
        last_fraud = _range_reduce(
            np.maximum,
            np.where(fraud, lt.astype(float), -np.inf),
            _pairs(loff[:, None], lend[:, None]),
            -np.inf,
        ).ravel()
        has = lend > loff
        cols += [
            np.where(has, _div(lsums[:, big, 2], lsums[:, big, 3]), np.nan),
            np.where(np.isfinite(last_fraud), (ts - last_fraud) / DAY, np.nan),
        ]
        # terminal: labelled transactions in (t - delay - d, t - delay], known by the watermark at the event
        (tt, tl, ta, tk), toff, tend = term_rows.numpy()
        tseg = np.repeat(np.arange(b, dtype=np.int64), tend - toff)
        tvis = tk <= wm[tseg]
        tfraud = tvis & (tl != 0)
        tdays = engine._term_days
        tcut = ts[:, None] - c.delay_days * DAY - np.asarray(tdays, dtype=np.int64)[None, :] * DAY
        tstart = _starts(tt, toff, tend, tcut)
        tidx = _pairs(tstart, tend[:, None])
        tvals = np.stack(
            [tvis, np.where(tvis, ta, 0.0), np.where(tvis, ta * ta, 0.0), tfraud, np.where(tfraud, ta, 0.0)],
            axis=1,
        ).astype(np.float64)
        tsums = _range_reduce(np.add, tvals, tidx, 0.0).reshape(b, len(tdays), 5)
        tmax = _range_reduce(np.maximum, np.where(tvis, ta, -np.inf), tidx, -np.inf).reshape(b, len(tdays))
        tpos = {d: j for j, d in enumerate(tdays)}

        def tn(d: int) -> np.ndarray:
            return tsums[:, tpos[d], 0]

        def risk(d: int) -> np.ndarray:
            return np.where(tn(d) > 0, tsums[:, tpos[d], 3] / np.maximum(tn(d), 1), 0.0)

        tsel = [tpos[d] for d in c.terminal_windows_days]
        nt, s, sq, fr, famt = (tsums[:, tsel, q] for q in range(5))
        some = nt > 0
        ns = np.maximum(nt, 1)
        mean = np.where(some, s / ns, np.nan)
        std = np.where(
            nt > 1, np.sqrt(np.maximum(sq / ns - mean * mean, 0.0) * nt / np.maximum(nt - 1, 1)), np.nan
        )
        block = [nt, fr, np.where(some, fr / ns, 0.0), mean, std, np.where(some, tmax[:, tsel], np.nan), famt]
        block += [np.where(some, _div(a2, mean), np.nan)]
        cols.append(np.stack(block, axis=2).reshape(b, -1))
        last_tf = _range_reduce(
            np.maximum,
            np.where(tfraud, tt.astype(float), -np.inf),
            _pairs(tstart[:, [tpos[30]]], tend[:, None]),
            -np.inf,
        ).ravel()
        cols += [
            np.where(np.isfinite(last_tf), (ts - last_tf) / DAY, np.nan),
            _div(tn(7) * 30 / 7, tn(30)),
            risk(7) - risk(30),
            risk(1) - risk(30),
        ]
        hand_term = []
        for d in (1, 7, 30):
            hand_term += [tn(d), risk(d)]
    cols += hand_cust + hand_term
    out = np.column_stack(cols)
    if out.shape[1] != len(engine.feature_names):
        raise AssertionError(
            f"batch features: {out.shape[1]} columns, engine has {len(engine.feature_names)}"
        )
    return out
