"""Loading the fraud handbook transactions and the taiwan_default credit applications."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from services.financial_risk.features import DAY, HANDBOOK_FEATURES, FeatureEngine, Transaction

TX_FILE = "fraud_handbook_sim/transactions_2018-04-01_2018-09-30.parquet"
REF_FILE = "fraud_handbook_sim/reference_features_2018-07-25_2018-08-14.parquet"
CREDIT_FILE = "taiwan_default/UCI_Credit_Card.csv"
CREDIT_TARGET = "default.payment.next.month"
CREDIT_FEATURES: tuple[str, ...] = (
    "LIMIT_BAL", "SEX", "EDUCATION", "MARRIAGE", "AGE",
    "PAY_0", "PAY_2", "PAY_3", "PAY_4", "PAY_5", "PAY_6",
    "BILL_AMT1", "BILL_AMT2", "BILL_AMT3", "BILL_AMT4", "BILL_AMT5", "BILL_AMT6",
    "PAY_AMT1", "PAY_AMT2", "PAY_AMT3", "PAY_AMT4", "PAY_AMT5", "PAY_AMT6",
)  # fmt: skip
LABEL_DELAY_S = 7 * DAY  # labels become known 7 days after the transaction (the handbook's delay)


def default_data_dir() -> Path:
    """``DATA_DIR`` or ``../shared/data`` next to the repository."""
    env = os.environ.get("DATA_DIR")
    if env:
        return Path(env)
    return (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()


def to_epoch_s(ts: pd.Series) -> np.ndarray:
    """datetime64 column -> int64 UTC epoch seconds."""
    return ts.to_numpy(dtype="datetime64[s]").astype(np.int64)


def epoch(day: str) -> int:
    """'2018-07-25' -> epoch seconds at midnight UTC."""
    return int(pd.Timestamp(day).value // 1_000_000_000)


def load_transactions(data_dir: Path, end: str | None = None) -> pd.DataFrame:
    """The transactions in stream order, with an int ``ts`` column (epoch s).

    Stream order is the file's row order (time order; rows at the same second keep the order
    the simulator logged them in, which is also the order the handbook's features assume).
    """
    df = pd.read_parquet(Path(data_dir) / TX_FILE)
    df["ts"] = to_epoch_s(df["TX_DATETIME"])
    if end is not None:
        df = df[df["ts"] < epoch(end)]
    return df.sort_values("ts", kind="stable").reset_index(drop=True)


def load_reference(data_dir: Path) -> pd.DataFrame:
    """The handbook's 14 reference features (2018-07-25..2018-08-14)."""
    return pd.read_parquet(Path(data_dir) / REF_FILE)


@dataclass
class ReplayEvent:
    """One event of the merged stream: a transaction or a label becoming known."""

    kind: str  # "tx" or "label"
    ts: int
    tx: Transaction | None = None
    transaction_id: int = -1
    label: int = 0


def event_stream(df: pd.DataFrame, label_delay_s: int = LABEL_DELAY_S) -> Iterator[ReplayEvent]:
    """Transactions and their labels (``label_delay_s`` later) merged in event-time order.

    A label known at time t is yielded before transactions at time t, so the engine sees it
    when scoring them (the handbook counts a transaction exactly 7 days old as known).
    """
    ts = df["ts"].to_numpy()
    ids = df["TRANSACTION_ID"].to_numpy()
    cust = df["CUSTOMER_ID"].to_numpy()
    term = df["TERMINAL_ID"].to_numpy()
    amt = df["TX_AMOUNT"].to_numpy()
    fraud = df["TX_FRAUD"].to_numpy()
    n = len(df)
    j = 0  # next label to emit (labels are in the same order as transactions)
    for i in range(n):
        t = int(ts[i])
        while j < i and int(ts[j]) + label_delay_s <= t:
            yield ReplayEvent(
                "label", int(ts[j]) + label_delay_s, transaction_id=int(ids[j]), label=int(fraud[j])
            )
            j += 1
        yield ReplayEvent("tx", t, tx=Transaction(int(ids[i]), int(cust[i]), int(term[i]), t, float(amt[i])))


def replay_features(
    df: pd.DataFrame,
    engine: FeatureEngine,
    collect_from: int,
    collect_to: int | None = None,
    mode: str = "all",
    progress: bool = True,
    skip: tuple[int, int] | None = None,
    batch_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Replay ``df`` through ``engine``; return (transaction ids, features) of events in [from, to)
    (except those in the ``skip`` interval, which only update the state).

    ``batch_size``: feed the transactions to :meth:`FeatureEngine.process_batch` (the stream worker's
    path) in batches of that many; labels still enter in stream order (a label is queued until event
    time reaches its known-at time, so queuing it before the batch that holds earlier transactions changes
    nothing). Without it, one :meth:`FeatureEngine.process` call per transaction. ``mode``: ``"all"`` or
    ``"handbook"``."""
    ids: list[int] = []
    rows: list[np.ndarray] = []
    batch: list[Transaction] = []
    wanted: list[bool] = []
    hand = engine.handbook_index

    def flush() -> None:
        if not batch:
            return
        x, errors = engine.process_batch(batch)
        bad = [e for e in errors if e is not None]
        if bad:
            raise bad[0]
        keep = np.flatnonzero(wanted)
        ids.extend(batch[i].transaction_id for i in keep.tolist())
        rows.append(x[keep][:, hand] if mode == "handbook" else x[keep])
        batch.clear()
        wanted.clear()

    bar = tqdm(total=len(df), desc="replay", unit="tx", disable=not progress, mininterval=2.0)
    for ev in event_stream(df):
        if ev.kind == "label":
            engine.add_feedback(ev.transaction_id, ev.label, ev.ts)
            continue
        assert ev.tx is not None
        want = ev.ts >= collect_from and (collect_to is None or ev.ts < collect_to)
        if want and skip is not None and skip[0] <= ev.ts < skip[1]:
            want = False
        if batch_size:
            batch.append(ev.tx)
            wanted.append(want)
            if len(batch) >= batch_size:
                flush()
                bar.update(batch_size)
            continue
        out = engine.process(ev.tx, mode=mode if want else "none")
        if want:
            ids.append(ev.tx.transaction_id)
            rows.append(out[None, :])  # type: ignore[index]
        bar.update(1)
    flush()
    bar.close()
    width = len(engine.feature_names) if mode == "all" else len(HANDBOOK_FEATURES)
    feats = np.vstack(rows) if rows else np.zeros((0, width))
    return np.asarray(ids, dtype=np.int64), feats


def load_credit(data_dir: Path) -> pd.DataFrame:
    """The taiwan_default table."""
    return pd.read_csv(Path(data_dir) / CREDIT_FILE)
