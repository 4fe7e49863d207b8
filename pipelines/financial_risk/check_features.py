"""Check the streaming engine against the handbook's reference features.

Replays ``fraud_handbook_sim`` from 2018-04-01 through :class:`FeatureEngine` (transactions
plus labels arriving 7 days later on the feedback path) and compares the 14 handbook features
with ``reference_features_2018-07-25_2018-08-14.parquet`` for every one of its rows.

    python -m pipelines.financial_risk.check_features [--customers N --terminals M --seed S] [--batch-size B]
        [--reference]

``--batch-size``: the stream worker's batch path (:meth:`FeatureEngine.process_batch`); ``--reference``:
the plain-Python reference engine (:mod:`services.financial_risk.features_reference`) instead of the
compiled one.

The last stdout line is one JSON object (``max_abs_diff``, ``rows``, ``mismatches``, ``ok``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from backbone.cli import run_cli

from pipelines.financial_risk.data import (
    default_data_dir,
    epoch,
    load_reference,
    load_transactions,
    replay_features,
)
from services.financial_risk.features import HANDBOOK_FEATURES, FeatureEngine
from services.financial_risk.features_reference import ReferenceFeatureEngine

START, END = "2018-07-25", "2018-08-15"


def check(
    data_dir: Path,
    customers: int | None = None,
    terminals: int | None = None,
    seed: int = 0,
    tol: float = 1e-6,
    progress: bool = True,
    batch_size: int | None = None,
    reference: bool = False,
) -> dict:
    """Run the comparison over every reference row, or over a seeded sample.

    Customer features depend only on the customer's own stream and terminal features only on
    the terminal's stream, so a sample replays the transactions of ``customers`` random
    customers and ``terminals`` random terminals and compares customer features on the first
    and terminal features on the second (exact, not an approximation). ``batch_size``: compute the
    features with the stream worker's batch path (:meth:`FeatureEngine.process_batch`); ``reference``: with
    the plain-Python reference engine (one by one)."""
    t0 = time.perf_counter()
    df = load_transactions(data_dir, end=END)
    ref = load_reference(data_dir)
    cust_cols = [n for n in HANDBOOK_FEATURES if not n.startswith("TERMINAL_ID")]
    term_cols = [n for n in HANDBOOK_FEATURES if n.startswith("TERMINAL_ID")]
    checks: list[tuple[pd.Series, list[str]]] = []
    if customers is None and terminals is None:
        checks.append((ref["TRANSACTION_ID"], list(HANDBOOK_FEATURES)))
    else:
        rng = np.random.default_rng(seed)
        c_ids = rng.choice(np.sort(df["CUSTOMER_ID"].unique()), size=customers or 0, replace=False)
        t_ids = rng.choice(np.sort(df["TERMINAL_ID"].unique()), size=terminals or 0, replace=False)
        in_c, in_t = df["CUSTOMER_ID"].isin(c_ids), df["TERMINAL_ID"].isin(t_ids)
        checks.append((df.loc[in_c, "TRANSACTION_ID"], cust_cols))
        checks.append((df.loc[in_t, "TRANSACTION_ID"], term_cols))
        df = df[in_c | in_t].reset_index(drop=True)
    if reference and batch_size:
        raise ValueError("the reference engine has no batch path")
    engine = ReferenceFeatureEngine() if reference else FeatureEngine()
    ids, feats = replay_features(
        df, engine, collect_from=epoch(START), collect_to=epoch(END), mode="handbook", progress=progress,
        batch_size=batch_size,
    )  # fmt: skip
    got = pd.DataFrame(feats, columns=list(HANDBOOK_FEATURES))
    got["TRANSACTION_ID"] = ids
    per_feature: dict[str, float] = {}
    rows = missing = mismatches = 0
    first_bad: list[int] = []
    for tx_ids, cols in checks:
        r = ref[ref["TRANSACTION_ID"].isin(tx_ids)]
        merged = r[["TRANSACTION_ID", *cols]].merge(
            got, on="TRANSACTION_ID", how="left", suffixes=("_ref", "")
        )
        rows += len(merged)
        missing += int(merged[cols[0]].isna().sum())
        bad = np.zeros(len(merged), dtype=bool)
        for name in cols:
            diff = np.abs(merged[name].to_numpy(float) - merged[name + "_ref"].to_numpy(float))
            diff = np.nan_to_num(diff, nan=np.inf)
            per_feature[name] = max(per_feature.get(name, 0.0), float(diff.max()) if len(diff) else 0.0)
            bad |= diff > tol
        mismatches += int(bad.sum())
        first_bad += merged.loc[bad, "TRANSACTION_ID"].head(5).tolist()
    result = {
        "rows": rows,
        "missing": missing,
        "mismatches": mismatches,
        "max_abs_diff": max(per_feature.values()) if per_feature else 0.0,
        "per_feature_max_abs_diff": per_feature,
        "tolerance": tol,
        "sample": None
        if customers is None and terminals is None
        else {"customers": customers, "terminals": terminals, "seed": seed},
        "replayed_transactions": int(len(df)),
        "path": f"process_batch({batch_size})" if batch_size else "process",
        "engine": "reference" if reference else "compiled",
        "seconds": round(time.perf_counter() - t0, 1),
        "ok": bool(rows > 0 and missing == 0 and mismatches == 0),
    }
    if first_bad:
        result["first_mismatches"] = first_bad[:5]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--customers", type=int, default=None, help="check a seeded sample of customers only")
    p.add_argument("--terminals", type=int, default=None, help="... and of terminals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None, help="check the worker's batch path instead")
    p.add_argument("--reference", action="store_true", help="check the plain-Python reference engine")
    p.add_argument("--json", action="store_true", help="(the last line is JSON in any case)")
    args = p.parse_args(argv)
    result = check(
        args.data_dir, customers=args.customers, terminals=args.terminals, seed=args.seed,
        batch_size=args.batch_size, reference=args.reference,
    )  # fmt: skip
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    run_cli(main)
