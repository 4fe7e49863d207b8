"""The streaming feature engine: handbook equality, label timing, checkpoint round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.financial_risk.check_features import check
from pipelines.financial_risk.data import epoch, event_stream, load_transactions
from services.financial_risk import feature_state
from services.financial_risk.features import (
    DAY,
    DuplicateTransactionError,
    FeatureEngine,
    OutOfOrderError,
    Transaction,
)
from services.financial_risk.features_reference import ReferenceFeatureEngine
from services.financial_risk.state_log import PartitionLog


@pytest.mark.parametrize(
    ("batch_size", "reference"),
    [(None, False), (200, False), (None, True)],
    ids=["one_by_one", "batch_path", "reference_engine"],
)
def test_financial_risk_handbook_features_match_reference_sample(
    fr_data_dir: Path, batch_size: int | None, reference: bool
) -> None:
    # seeded sample (the full 201,295-row check is `python -m pipelines.financial_risk.check_features`);
    # batch_path: the stream worker's path (FeatureEngine.process_batch); reference_engine: the plain-Python
    # engine the compiled one is compared with below
    result = check(
        fr_data_dir,
        customers=150,
        terminals=300,
        seed=1,
        progress=False,
        batch_size=batch_size,
        reference=reference,
    )
    assert result["rows"] > 10_000
    assert result["missing"] == 0
    assert result["mismatches"] == 0, result.get("first_mismatches")
    assert result["max_abs_diff"] <= 1e-6
    assert result["ok"]


def test_financial_risk_engine_has_200_named_features() -> None:
    eng = FeatureEngine()
    assert len(eng.feature_names) >= 200
    assert len(set(eng.feature_names)) == len(eng.feature_names)
    row = eng.process(Transaction(1, 7, 9, epoch("2018-08-01") + 3600, 12.5))
    assert row is not None and row.shape == (len(eng.feature_names),)
    names = eng.feature_names
    assert row[names.index("cust_nb_tx_1d")] == 1
    assert row[names.index("TX_AMOUNT")] == 12.5
    assert np.isnan(row[names.index("cust_secs_since_prev")])


def test_financial_risk_labels_only_after_known_time() -> None:
    """A terminal's fraud label enters its risk only once event time reaches the known-at time."""
    eng = FeatureEngine()
    t0 = epoch("2018-08-01")
    eng.process(Transaction(1, 1, 5, t0, 100.0), mode="none")
    eng.add_feedback(1, 1, known_at=t0 + 7 * DAY)  # label known 7 days later
    risk = eng.feature_names.index("TERMINAL_ID_RISK_1DAY_WINDOW")
    early = eng.process(Transaction(2, 2, 5, t0 + 7 * DAY - 1, 10.0))
    assert early is not None and early[risk] == 0.0  # not yet known (and not yet delayed enough)
    assert eng.n_labels_applied == 0
    late = eng.process(Transaction(3, 3, 5, t0 + 7 * DAY, 10.0))
    assert late is not None and late[risk] == 1.0  # exactly 7 days: known, inside (t-8d, t-7d]
    assert late[eng.feature_names.index("TERMINAL_ID_NB_TX_1DAY_WINDOW")] == 1.0
    with pytest.raises(OutOfOrderError):
        eng.process(Transaction(4, 3, 5, t0, 10.0))


def test_financial_risk_partition_snapshot_round_trip(fr_data_dir: Path, tmp_path: Path) -> None:
    """A partition checkpoint (npz, no pickle) restores every customer's state exactly."""
    df = load_transactions(fr_data_dir, end="2018-05-25")
    df = df[df["CUSTOMER_ID"] < 60].reset_index(drop=True)
    eng = FeatureEngine()
    for ev in event_stream(df):
        if ev.kind == "label":
            eng.add_feedback(ev.transaction_id, ev.label, ev.ts)
        else:
            eng.process(ev.tx, mode="none")
    ids = set(eng.customers)
    saved = eng.export_customers(ids)
    feature_state.save(tmp_path / "p0.npz", saved)
    restored = FeatureEngine()
    assert restored.import_customers(feature_state.load(tmp_path / "p0.npz")) == ids
    again = restored.export_customers(ids)
    assert saved.keys() == again.keys()
    for key, value in saved.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)
    assert restored.pending == eng.pending and restored.watermark == eng.watermark
    # with the labels read again (as the worker re-reads the feedback topic), the restored state gives the
    # customer features of what follows exactly as the original (derived state such as the distinct
    # terminals of a window included); terminal state is not part of a partition's snapshot
    for ev in event_stream(df):
        if ev.kind == "label":
            restored.add_feedback(ev.transaction_id, ev.label, ev.ts)
    after = load_transactions(fr_data_dir, end="2018-06-10")
    after = after[(after["CUSTOMER_ID"] < 60) & (after["ts"] >= epoch("2018-05-25"))]
    txs = [
        Transaction(int(a), int(b), int(c), int(d), float(e))
        for a, b, c, d, e in zip(
            after.TRANSACTION_ID, after.CUSTOMER_ID, after.TERMINAL_ID, after.ts, after.TX_AMOUNT, strict=True
        )
    ]
    assert len(txs) > 500
    x_eng, _ = eng.process_batch(txs)
    x_restored, _ = restored.process_batch(txs)
    cust_cols = [i for i, n in enumerate(eng.feature_names) if not n.lower().startswith("term")]
    assert len(cust_cols) > 150
    np.testing.assert_array_equal(x_restored[:, cust_cols], x_eng[:, cust_cols])


def test_financial_risk_incremental_snapshots_restore_exact_state(fr_data_dir: Path, tmp_path: Path) -> None:
    """Snapshot chunks written now and then (a few changed customers each, the oldest file retired), then a
    crash: the chunks plus a re-read from the floor, skipping each customer's events below its offset,
    give exactly the state of the uninterrupted engine (the worker's restore, without Kafka)."""
    df = load_transactions(fr_data_dir, end="2018-05-25")
    df = df[df["CUSTOMER_ID"] < 60].reset_index(drop=True)
    events = list(event_stream(df))
    n_tx = sum(ev.kind != "label" for ev in events)
    crash_at = int(n_tx * 0.8)
    rng = np.random.default_rng(0)
    eng, plog = FeatureEngine(), PartitionLog(tmp_path / "p0", 0)

    def stream(engine: FeatureEngine, on_tx) -> None:  # labels into ``engine``; transactions to ``on_tx``
        offset = 0  # the transactions' offsets in their partition
        for ev in events:
            if ev.kind == "label":
                engine.add_feedback(ev.transaction_id, ev.label, ev.ts)
                continue
            if offset == crash_at:
                return
            assert ev.tx is not None
            on_tx(offset, ev.tx)
            offset += 1

    def live(offset: int, tx: Transaction) -> None:
        eng.process(tx, mode="none")
        plog.mark(tx.customer_id, offset)
        if rng.random() < 0.03:  # a snapshot step: the oldest changes, now and then the oldest file
            todo = list(plog.dirty)[: int(rng.integers(1, 15))]
            if len(plog.members) > 6:
                todo += plog.oldest_chunk_members()
            plog.write(eng, todo, offset + 1)

    stream(eng, live)
    assert plog.chunks_written > 20 and plog.dirty  # changes after the last chunk: the floor lags
    files = sorted((tmp_path / "p0").glob("*.npz"))
    assert 1 < len(files) < plog.chunks_written  # superseded chunks were deleted
    fresh, rlog = FeatureEngine(), PartitionLog(tmp_path / "p0", 0)
    assert rlog.restore(fresh)
    assert rlog.floor == plog.floor < crash_at
    skipped: list[int] = []

    def restored(offset: int, tx: Transaction) -> None:
        if offset >= rlog.offset_of.get(tx.customer_id, rlog.floor):
            fresh.process(tx, mode="none")
        else:
            skipped.append(offset)  # already in the restored state

    stream(fresh, restored)
    assert skipped
    ids = set(eng.customers)
    assert set(fresh.customers) == ids
    want, got = eng.export_customers(ids), fresh.export_customers(ids)
    for key, value in want.items():
        if key != "watermark":
            np.testing.assert_array_equal(got[key], value, err_msg=key)
    assert fresh.pending == eng.pending


def test_financial_risk_compiled_engine_equals_reference_engine(fr_data_dir: Path) -> None:
    """The compiled engine (columnar state, one kernel pass per batch) gives the values of the plain-Python
    reference engine for all 214 columns of every event, in batches of random sizes and one by one, with
    labels arriving between batches and within a batch's time span; what-if calls leave the state as it
    was; a duplicate id and an out-of-order event are rejected without touching the state."""
    df = load_transactions(fr_data_dir, end="2018-06-20")
    df = df[df["CUSTOMER_ID"] % 50 == 3].reset_index(drop=True)
    txs = [
        Transaction(int(a), int(b), int(c), int(d), float(e))
        for a, b, c, d, e in zip(
            df.TRANSACTION_ID, df.CUSTOMER_ID, df.TERMINAL_ID, df.ts, df.TX_AMOUNT, strict=True
        )
    ]
    labels = list(
        zip(df.TRANSACTION_ID.tolist(), df.TX_FRAUD.tolist(), (df.ts + 7 * DAY).tolist(), strict=True)
    )
    ref, batch, single = ReferenceFeatureEngine(), FeatureEngine(), FeatureEngine()
    rng = np.random.default_rng(0)
    rows_ref, rows_batch, rows_single, rows_whatif = [], [], [], []
    li = start = 0
    while start < len(txs):
        chunk = txs[start : start + int(rng.integers(1, 300))]
        start += len(chunk)
        while li < len(labels) and labels[li][2] <= chunk[-1].ts + 6 * 3600:  # some known inside the chunk
            for eng in (ref, batch, single):
                eng.add_feedback(*labels[li])
            li += 1
        rows_ref += [ref.process(tx) for tx in chunk]
        x, errors = batch.process_batch(chunk)
        assert errors == [None] * len(chunk)
        rows_batch.append(x)
        for tx in chunk:
            rows_whatif.append(single.process(tx, update=False))
            rows_single.append(single.process(tx))
    a = np.vstack(rows_ref)
    assert len(a) > 5_000
    for b in (np.vstack(rows_batch), np.vstack(rows_single), np.vstack(rows_whatif)):
        assert a.shape == b.shape
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        np.testing.assert_allclose(np.nan_to_num(b), np.nan_to_num(a), rtol=1e-9, atol=1e-9)
    ids = set(batch.customers)
    want, got = batch.export_customers(ids), single.export_customers(ids)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    # a duplicate id and an event older than its customer's last one: errors, no row, state unchanged
    last = txs[-1]
    n_events = batch.n_events
    x, errors = batch.process_batch(
        [last, Transaction(10**12, last.customer_id, last.terminal_id, last.ts - 1, 5.0)]
    )
    assert x.shape == (0, len(batch.feature_names)) and batch.n_events == n_events
    assert isinstance(errors[0], DuplicateTransactionError) and isinstance(errors[1], OutOfOrderError)
    after = batch.export_customers(ids)
    for key, value in want.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)


def test_financial_risk_label_of_a_transaction_in_the_same_batch() -> None:
    """A label that becomes due inside a batch and names a transaction earlier in the same batch finds it
    pending (the batch is split there), as one by one; an id repeated inside a batch is a duplicate."""
    t0 = epoch("2018-08-01")
    txs = [
        Transaction(1, 1, 5, t0, 100.0),
        Transaction(2, 2, 6, t0 + 3600, 20.0),
        Transaction(3, 3, 5, t0 + 9 * DAY, 10.0),  # the label of 1 is known from t0 + 1 day
        Transaction(4, 1, 7, t0 + 9 * DAY + 60, 30.0),
    ]
    ref, eng = ReferenceFeatureEngine(), FeatureEngine()
    for e in (ref, eng):
        e.add_feedback(1, 1, known_at=t0 + DAY)
    want = np.vstack([ref.process(tx) for tx in txs])
    got, errors = eng.process_batch(txs)
    assert errors == [None] * 4
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(np.nan_to_num(got), np.nan_to_num(want), rtol=1e-12)
    names = eng.feature_names
    assert got[2, names.index("TERMINAL_ID_RISK_7DAY_WINDOW")] == 1.0  # terminal 5 learned the label
    assert got[3, names.index("cust_known_fraud_14d")] == 1.0  # and customer 1 did
    assert eng.n_labels_applied == 1 and 1 not in eng.pending
    x, errors = eng.process_batch(
        [Transaction(9, 9, 9, t0 + 10 * DAY, 1.0), Transaction(9, 9, 9, t0 + 10 * DAY, 1.0)]
    )
    assert len(x) == 1 and errors[0] is None and isinstance(errors[1], DuplicateTransactionError)


def test_financial_risk_dropped_and_restored_customers_continue_exactly(fr_data_dir: Path) -> None:
    """A rebalance: half the customers are exported, dropped (their slots and rows freed, then reused by new
    customers) and imported back later; the engine then gives the same customer features as one that kept
    them all along (labels re-read, as the worker re-reads the feedback topic)."""
    df = load_transactions(fr_data_dir, end="2018-06-01")
    df = df[df["CUSTOMER_ID"] % 40 == 7].reset_index(drop=True)
    events = list(event_stream(df))
    kept, moved = FeatureEngine(), FeatureEngine()
    cut = len(events) // 2
    for eng in (kept, moved):
        for ev in events[:cut]:
            if ev.kind == "label":
                eng.add_feedback(ev.transaction_id, ev.label, ev.ts)
            else:
                eng.process(ev.tx, mode="none")
    gone = {c for c in moved.customers if c % 2 == 0}
    saved = moved.export_customers(gone)
    moved.drop_customers(gone)
    assert not gone & set(moved.customers) and not gone & set(moved.pending_of)
    rest = events[cut:]
    # other customers arrive meanwhile and take the freed slots
    newcomers = [
        Transaction(10**9 + i, 10**7 + i, 1, ev.ts, 3.0)
        for i, ev in enumerate(rest[:50])
        if ev.kind != "label"
    ]
    moved.process_batch(newcomers)
    kept.process_batch(newcomers)
    assert moved.import_customers(saved) == gone
    for ev in events[:cut]:
        if ev.kind == "label":
            moved.add_feedback(ev.transaction_id, ev.label, ev.ts)
    txs = [ev.tx for ev in rest if ev.kind != "label"]
    for ev in rest:
        if ev.kind == "label":
            for eng in (kept, moved):
                eng.add_feedback(ev.transaction_id, ev.label, ev.ts)
    assert len(txs) > 1_000
    a, errors_a = kept.process_batch(txs)
    b, errors_b = moved.process_batch(txs)
    assert errors_a == errors_b == [None] * len(txs)
    cust_cols = [i for i, n in enumerate(kept.feature_names) if not n.lower().startswith("term")]
    np.testing.assert_array_equal(b[:, cust_cols], a[:, cust_cols])
    ids = set(kept.customers)
    want, got = kept.export_customers(ids), moved.export_customers(ids)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
