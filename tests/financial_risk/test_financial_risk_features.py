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
from services.financial_risk.state_log import PartitionLog


@pytest.mark.parametrize("batch_size", [None, 200], ids=["one_by_one", "batch_path"])
def test_financial_risk_handbook_features_match_reference_sample(
    fr_data_dir: Path, batch_size: int | None
) -> None:
    # seeded sample (the full 201,295-row check is `python -m pipelines.financial_risk.check_features`);
    # batch_path: the stream worker's vectorised path (FeatureEngine.process_batch)
    result = check(fr_data_dir, customers=150, terminals=300, seed=1, progress=False, batch_size=batch_size)
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
    for k in ids:
        assert sorted(restored.customers[k].last_use) == sorted(eng.customers[k].last_use)
        assert restored.customers[k].pairs == eng.customers[k].pairs


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


def test_financial_risk_batch_features_equal_one_by_one(fr_data_dir: Path) -> None:
    """``process_batch`` (the worker's vectorised path) gives the values of ``process`` for every event,
    with labels arriving between batches and within a batch's time span, and rejects a duplicate id and
    an out-of-order event without touching the state."""
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
    one, batch = FeatureEngine(), FeatureEngine()
    rng = np.random.default_rng(0)
    rows_one, rows_batch = [], []
    li = start = 0
    while start < len(txs):
        chunk = txs[start : start + int(rng.integers(1, 300))]
        start += len(chunk)
        while li < len(labels) and labels[li][2] <= chunk[-1].ts + 6 * 3600:  # some known inside the chunk
            for eng in (one, batch):
                eng.add_feedback(*labels[li])
            li += 1
        rows_one += [one.process(tx) for tx in chunk]
        x, errors = batch.process_batch(chunk)
        assert errors == [None] * len(chunk)
        rows_batch.append(x)
    a, b = np.vstack(rows_one), np.vstack(rows_batch)
    assert a.shape == b.shape and len(a) > 5_000
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(np.nan_to_num(b), np.nan_to_num(a), rtol=1e-9, atol=1e-9)
    # a duplicate id and an event older than its customer's last one: errors, no row, state unchanged
    last = txs[-1]
    n_events = batch.n_events
    x, errors = batch.process_batch(
        [last, Transaction(10**12, last.customer_id, last.terminal_id, last.ts - 1, 5.0)]
    )
    assert x.shape == (0, len(batch.feature_names)) and batch.n_events == n_events
    assert isinstance(errors[0], DuplicateTransactionError) and isinstance(errors[1], OutOfOrderError)
