"""Presets, dataset building (with an on-disk feature cache) and metrics for both tasks."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.model_selection import train_test_split

from pipelines.financial_risk.data import (
    CREDIT_FEATURES,
    CREDIT_TARGET,
    epoch,
    load_credit,
    load_transactions,
    replay_features,
)
from services.financial_risk.features import DAY, FeatureEngine

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO_ROOT / ".cache" / "financial_risk"
DOMAIN = "financial_risk"
FRAUD_NAME = "fraud_lgbm"
CREDIT_NAME = "credit_lgbm"
CREDIT_SPLIT_SEED = 42
CREDIT_TEST_SIZE = 0.2


@dataclass(frozen=True)
class FraudPreset:
    """What a fraud training run replays, trains on and tests on (dates are [start, end))."""

    name: str
    replay_from: str = "2018-04-01"
    train_start: str = "2018-07-25"
    train_end: str = "2018-08-01"
    test_start: str = "2018-08-08"
    test_end: str = "2018-08-15"
    customers: int | None = None  # a seeded sample of customers (tiny preset, tests)
    n_estimators: int = 600
    learning_rate: float = 0.03
    num_leaves: int = 31
    alert_budget: float = 0.01  # initial threshold: top 1 % of training scores
    neural: bool = True  # also train the backbone MoE network and blend it with LightGBM
    holdout_days: int = 2  # last days of the train period used to fit the blend and calibration
    moe_epochs: int = 6


FRAUD_PRESETS: dict[str, FraudPreset] = {
    # the handbook protocol: train 2018-07-25..31, 7-day gap, test 2018-08-08..14
    "full": FraudPreset("full"),
    # fewer training days and trees, same test week
    "quick": FraudPreset(
        "quick", train_start="2018-07-28", n_estimators=250, learning_rate=0.06, holdout_days=1, moe_epochs=4
    ),
    # seconds: 300 customers, a short replay, for the test suite
    "tiny": FraudPreset(
        "tiny",
        replay_from="2018-06-10",
        customers=300,
        n_estimators=60,
        learning_rate=0.1,
        num_leaves=15,
        test_end="2018-08-11",
        neural=False,  # the network is trained by quick and full (tests check it separately)
    ),
}


@dataclass(frozen=True)
class CreditPreset:
    """Credit training settings."""

    name: str
    n_estimators: int = 2000
    learning_rate: float = 0.01
    num_leaves: int = 15
    max_rows: int | None = None
    neural: bool = True  # also train the backbone MoE network and blend it with LightGBM
    moe_epochs: int = 12


CREDIT_PRESETS: dict[str, CreditPreset] = {
    "full": CreditPreset("full", moe_epochs=20),
    "quick": CreditPreset("quick", n_estimators=600, learning_rate=0.03, moe_epochs=8),
    "tiny": CreditPreset("tiny", n_estimators=60, learning_rate=0.1, max_rows=6000, neural=False),
}


@dataclass
class FraudData:
    """Feature matrices of the train and test periods."""

    feature_names: list[str]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    test_ids: np.ndarray
    test_customers: np.ndarray
    test_days: np.ndarray
    train_ids: np.ndarray
    train_ts: np.ndarray


def _cache_key(preset: FraudPreset, names: list[str], data_dir: Path) -> str:
    blob = json.dumps(
        {"preset": asdict(preset), "names": names, "data": str(Path(data_dir).resolve()), "v": 2}
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_fraud_data(data_dir: Path, preset: FraudPreset, use_cache: bool = True) -> FraudData:
    """Replay the stream through the feature engine and collect the train / test features.

    Labels reach the engine only through the feedback path, 7 days after each transaction.
    Results are cached (``.cache/financial_risk/*.npz``, no pickle) per preset and feature list.
    """
    engine = FeatureEngine()
    names = engine.feature_names
    key = _cache_key(preset, names, data_dir)
    path = CACHE_DIR / f"fraud_{preset.name}_{key}.npz"
    df = load_transactions(data_dir, end=preset.test_end)
    df = df[df["ts"] >= epoch(preset.replay_from)]
    if preset.customers is not None:
        rng = np.random.default_rng(0)
        chosen = rng.choice(np.sort(df["CUSTOMER_ID"].unique()), size=preset.customers, replace=False)
        df = df[df["CUSTOMER_ID"].isin(chosen)]
    df = df.reset_index(drop=True)
    if use_cache and path.is_file():
        z = np.load(path, allow_pickle=False)
        ids, feats = z["ids"], z["feats"]
    else:
        log.info("building fraud features (%s preset, %d transactions)", preset.name, len(df))
        ids, feats = replay_features(
            df,
            engine,
            collect_from=epoch(preset.train_start),
            collect_to=epoch(preset.test_end),
            skip=(epoch(preset.train_end), epoch(preset.test_start)),
            batch_size=1000,
        )
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, ids=ids, feats=feats)
        tmp.rename(path)
    meta = df.set_index("TRANSACTION_ID").loc[ids, ["ts", "TX_FRAUD", "CUSTOMER_ID"]]
    ts = meta["ts"].to_numpy()
    y = meta["TX_FRAUD"].to_numpy().astype(np.int32)
    tr = (ts >= epoch(preset.train_start)) & (ts < epoch(preset.train_end))
    te = (ts >= epoch(preset.test_start)) & (ts < epoch(preset.test_end))
    return FraudData(
        feature_names=list(names),
        x_train=feats[tr],
        y_train=y[tr],
        x_test=feats[te],
        y_test=y[te],
        test_ids=ids[te],
        test_customers=meta["CUSTOMER_ID"].to_numpy()[te],
        test_days=ts[te] // DAY,
        train_ids=ids[tr],
        train_ts=ts[tr],
    )


def card_precision_top_k(
    scores: np.ndarray, labels: np.ndarray, customers: np.ndarray, days: np.ndarray, k: int = 100
) -> float:
    """The handbook's card precision@k: per day, the share of compromised cards among the k cards
    with the highest score; cards found on earlier days are removed; averaged over days."""
    df = pd.DataFrame({"s": scores, "y": labels, "c": customers, "d": days})
    detected: set[int] = set()
    per_day = []
    for _, day in df.groupby("d", sort=True):
        day = day[~day["c"].isin(detected)]
        cards = day.groupby("c").agg(s=("s", "max"), y=("y", "max")).sort_values("s", ascending=False)
        top = cards.head(k)
        hits = top.index[top["y"] == 1].tolist()
        per_day.append(len(hits) / k)
        detected.update(hits)
    return float(np.mean(per_day)) if per_day else float("nan")


def fraud_metrics(scores: np.ndarray, data: FraudData) -> dict[str, float]:
    """AUC, average precision and card precision@100 on the test period."""
    return {
        "auc": float(roc_auc_score(data.y_test, scores)),
        "average_precision": float(average_precision_score(data.y_test, scores)),
        "card_precision_at_100": card_precision_top_k(
            scores, data.y_test, data.test_customers, data.test_days, 100
        ),
        "n_test": int(len(data.y_test)),
        "test_fraud_rate": float(data.y_test.mean()),
    }


# ---------------------------------------------------------------------------------- credit
def credit_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Model inputs of credit applications (same code in training and serving).

    The 23 raw columns plus: utilisation per month, its spread and trends; payment / previous bill
    per month, their mean and minimum, months paid in full and months unpaid despite a bill; payment
    / limit per month; the repayment-status history (PAY_x: -2 no consumption, -1 paid in full,
    0 revolving, k > 0 k months late) as state counts, delay count / sum / recency-weighted sum,
    recent and old maxima and the current streak of late months.
    """
    out = df[list(CREDIT_FEATURES)].astype(np.float64).copy()
    limit = out["LIMIT_BAL"].replace(0, np.nan)
    bills = out[[f"BILL_AMT{i}" for i in range(1, 7)]]
    pays = out[[f"PAY_AMT{i}" for i in range(1, 7)]]
    status = out[["PAY_0", "PAY_2", "PAY_3", "PAY_4", "PAY_5", "PAY_6"]]
    out["UTIL_1"] = out["BILL_AMT1"] / limit
    out["UTIL_MEAN"] = bills.mean(axis=1) / limit
    out["UTIL_MAX"] = bills.max(axis=1) / limit
    for i in range(1, 6):
        prev_bill = out[f"BILL_AMT{i + 1}"].where(out[f"BILL_AMT{i + 1}"] > 0)
        out[f"PAY_RATIO_{i}"] = out[f"PAY_AMT{i}"] / prev_bill
    out["PAY_SUM_OVER_BILL_SUM"] = pays.sum(axis=1) / bills.clip(lower=0).sum(axis=1).replace(0, np.nan)
    out["N_DELAYED"] = (status > 0).sum(axis=1)
    out["MAX_DELAY"] = status.max(axis=1)
    out["DELAY_TREND"] = out["PAY_0"] - out["PAY_6"]
    out["BILL_TREND"] = (out["BILL_AMT1"] - out["BILL_AMT6"]) / limit
    return pd.concat([out, _credit_history_features(out, limit)], axis=1)


def _credit_history_features(out: pd.DataFrame, limit: pd.Series) -> pd.DataFrame:
    """The repayment-history features of :func:`credit_frame` (months 1 = most recent .. 6)."""
    st = out[["PAY_0", "PAY_2", "PAY_3", "PAY_4", "PAY_5", "PAY_6"]].to_numpy()
    bill = out[[f"BILL_AMT{i}" for i in range(1, 7)]].to_numpy()
    pay = out[[f"PAY_AMT{i}" for i in range(1, 7)]].to_numpy()
    lim = limit.to_numpy()
    late = np.clip(st, 0, None)
    prev_bill, paid = bill[:, 1:], pay[:, :5]  # PAY_AMT{k} settles BILL_AMT{k+1}
    has_bill = prev_bill > 0
    ratio = np.clip(paid / np.where(has_bill, prev_bill, 1.0), 0.0, 2.0)
    n_bills = has_bill.sum(axis=1)
    e: dict[str, np.ndarray] = {
        "N_NO_CONSUMPTION": (st == -2).sum(axis=1),
        "N_PAID_FULL_STATUS": (st == -1).sum(axis=1),
        "N_REVOLVING": (st == 0).sum(axis=1),
        "N_DELAYED_2PLUS": (st >= 2).sum(axis=1),
        "DELAY_SUM": late.sum(axis=1),
        "DELAY_WEIGHTED_SUM": (late * np.arange(6, 0, -1)).sum(axis=1),
        "RECENT_MAX_DELAY": st[:, :2].max(axis=1),
        "OLD_MAX_DELAY": st[:, 3:].max(axis=1),
        "DELAY_STREAK": np.cumprod(st > 0, axis=1).sum(axis=1),
    }
    for k in range(1, 6):
        e[f"UTIL_{k + 1}"] = bill[:, k] / lim
    for k in range(6):
        e[f"PAY_OVER_LIMIT_{k + 1}"] = pay[:, k] / lim
    e["N_PAID_FULL"] = ((paid >= prev_bill) & has_bill).sum(axis=1)
    e["N_UNPAID_WITH_BILL"] = ((paid == 0) & has_bill).sum(axis=1)
    e["PAY_RATIO_MEAN"] = np.where(
        n_bills > 0, (ratio * has_bill).sum(axis=1) / np.maximum(n_bills, 1), np.nan
    )
    e["PAY_RATIO_MIN"] = np.where(n_bills > 0, np.where(has_bill, ratio, np.inf).min(axis=1), np.nan)
    e["UTIL_STD"] = bill.std(axis=1) / lim
    e["UTIL_SLOPE_3M"] = (bill[:, 0] - bill[:, 2]) / lim
    e["BILL_GROWTH_1"] = (bill[:, 0] - bill[:, 1]) / lim
    e["AVAILABLE_1"] = (lim - bill[:, 0]) / lim
    e["PAY_MEAN_OVER_LIMIT"] = pay.mean(axis=1) / lim
    e["PAY_RECENT_OVER_OLD"] = pay[:, :3].sum(axis=1) / (pay[:, 3:].sum(axis=1) + 1.0)
    e["SPEND_6M"] = (bill[:, 0] - bill[:, 5] + paid.sum(axis=1)) / lim  # new charges, approx.
    e["SPEND_1"] = (bill[:, 0] - bill[:, 1] + pay[:, 0]) / lim
    e["LOG_LIMIT"] = np.log1p(out["LIMIT_BAL"].to_numpy())
    return pd.DataFrame({k: v.astype(np.float64) for k, v in e.items()}, index=out.index)


def credit_split(data_dir: Path, max_rows: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The fixed split: stratified on the target, 20 % test, random_state 42."""
    df = load_credit(data_dir)
    train, test = train_test_split(
        df, test_size=CREDIT_TEST_SIZE, random_state=CREDIT_SPLIT_SEED, stratify=df[CREDIT_TARGET]
    )
    if max_rows is not None:
        train = train.sample(n=min(max_rows, len(train)), random_state=0)
    return train, test
