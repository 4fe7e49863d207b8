"""CPU cost of scoring one micro-batch of streamed transactions, part by part (no Kafka).

    python -m benchmarks.financial_risk_scoring [--batch-sizes 1,25,200] [--batches 40]

Fills the feature state from the dataset (``--warm-from`` .. ``--warm-until``), then takes the real
transactions that follow, in stream order and in micro-batches as the worker receives them, and times on
one thread: the features (the engine's batch path, which also updates the state), the reason-code
contributions, the network's forward pass and the whole ``LgbmScorer.predict`` (LightGBM + network + top 5
reasons). Two parts are also timed with a baseline in the same run, which must give the same numbers:
the features with the plain-Python reference engine (``features_reference``, warmed the same way, one
``process`` call per event), and the contributions with the previous method (``baseline``: LightGBM's
``pred_leaf`` plus a sparse product of the rows' leaf-indicator matrix with a per-leaf table) against the
compiled tree walk the service uses (``PathContributions``). Last stdout line: one JSON object; per batch
size, ms per batch of each part, ``features_speedup`` and ``walk_speedup`` (baseline / ours).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import torch
from scipy import sparse
from tqdm import tqdm

from pipelines.financial_risk.data import default_data_dir, epoch, load_transactions
from services.financial_risk import neural
from services.financial_risk.app.core.config import Settings
from services.financial_risk.app.model import load_models
from services.financial_risk.features import FeatureEngine, Transaction
from services.financial_risk.features_reference import ReferenceFeatureEngine
from services.financial_risk.scoring import FraudScorer
from services.financial_risk.threshold import ThresholdController


class LeafTableContributions:
    """The baseline: decision-path contributions tabulated per (tree, leaf) as a sparse matrix; a batch is
    LightGBM's ``pred_leaf`` plus one sparse product (the method the compiled walk replaced)."""

    def __init__(self, booster: lgb.Booster) -> None:
        self.booster = booster
        trees = booster.dump_model()["tree_info"]
        self.n_trees, n_features = len(trees), booster.num_feature()
        per_tree = []
        for tree in trees:
            leaves: dict[int, dict[int, float]] = {}
            _collect(tree["tree_structure"], [], leaves)
            per_tree.append(leaves)
        self.n_leaves = max(len(t) for t in per_tree)
        rows, cols, vals = [], [], []
        for t, leaves in enumerate(per_tree):
            for leaf, deltas in leaves.items():
                rows += [t * self.n_leaves + leaf] * len(deltas)
                cols += deltas.keys()
                vals += deltas.values()
        self.table = sparse.csr_matrix(
            (vals, (rows, cols)), shape=(self.n_trees * self.n_leaves, n_features + 1)
        )
        roots = [t["tree_structure"] for t in trees]
        self.bias = sum(float(r.get("internal_value", r.get("leaf_value", 0.0))) for r in roots)
        self._base = np.arange(self.n_trees, dtype=np.int64)[None, :] * self.n_leaves

    def contributions(self, x: np.ndarray) -> np.ndarray:
        leaves = np.asarray(self.booster.predict(x, pred_leaf=True, num_threads=1), dtype=np.int64)
        cols = (leaves.reshape(len(x), -1) + self._base).ravel()
        indicator = sparse.csr_matrix(
            (np.ones(len(cols)), cols, np.arange(0, len(cols) + 1, self.n_trees)),
            shape=(len(x), self.n_trees * self.n_leaves),
        )
        out = (indicator @ self.table).toarray()
        out[:, -1] = self.bias
        return out


def _collect(
    node: dict[str, Any], path: list[tuple[int, float]], leaves: dict[int, dict[int, float]]
) -> None:
    """Every leaf's path as merged (feature -> sum of value changes)."""
    if "split_feature" not in node:
        merged: dict[int, float] = {}
        for f, d in path:
            merged[f] = merged.get(f, 0.0) + d
        leaves[int(node.get("leaf_index", 0))] = merged
        return
    value, feature = float(node["internal_value"]), int(node["split_feature"])
    for side in ("left_child", "right_child"):
        child = node[side]
        path.append(
            (
                feature,
                float(child["internal_value"] if "split_feature" in child else child["leaf_value"]) - value,
            )
        )
        _collect(child, path, leaves)
        path.pop()


def _ms(fn: Any, repeat: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="1,25,200")
    p.add_argument("--batches", type=int, default=40, help="micro-batches per size")
    p.add_argument("--repeat", type=int, default=5, help="timed repetitions of each model part per batch")
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--warm-from", default="2018-04-01")
    p.add_argument("--warm-until", default="2018-08-01")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    models = load_models(Settings())
    fraud = models.fraud
    engine = FeatureEngine()
    scorer = FraudScorer(engine, ThresholdController("bench", initial=fraud.threshold), "bench")
    print(f"warming the feature state {args.warm_from} .. {args.warm_until}", flush=True)
    scorer.warm_from_dataset(args.data_dir, args.warm_from, args.warm_until)
    reference = ReferenceFeatureEngine()
    print("warming the reference engine the same way", flush=True)
    FraudScorer(reference, ThresholdController("bench", initial=fraud.threshold), "bench").warm_from_dataset(
        args.data_dir, args.warm_from, args.warm_until
    )
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    df = load_transactions(args.data_dir, end="2018-08-15")
    df = df[df["ts"] >= epoch(args.warm_until)].head(sum(sizes) * args.batches)
    cols = (df["TRANSACTION_ID"], df["CUSTOMER_ID"], df["TERMINAL_ID"], df["ts"], df["TX_AMOUNT"])
    txs = [
        Transaction(int(i), int(c), int(t), int(ts), float(a)) for i, c, t, ts, a in zip(*cols, strict=True)
    ]
    baseline = LeafTableContributions(fraud.booster)
    paths = fraud.paths
    assert paths is not None
    result: dict[str, Any] = {"model_version": fraud.version, "n_trees": fraud.booster.num_trees(),
                              "n_features": len(fraud.feature_names), "threads": 1}  # fmt: skip
    start = 0
    for bs in sizes:
        parts: dict[str, list[float]] = {
            k: [] for k in ("features", "features_reference", "walk", "baseline", "network", "predict")
        }
        for b in tqdm(range(args.batches), desc=f"batch size {bs}", mininterval=1.0):
            batch = txs[start + b * bs : start + (b + 1) * bs]
            t0 = time.perf_counter()
            x, _ = engine.process_batch(batch)
            parts["features"].append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            x_ref, _ = reference.process_batch(batch)
            parts["features_reference"].append((time.perf_counter() - t0) * 1e3)
            if x.shape != x_ref.shape or not np.allclose(x, x_ref, rtol=1e-9, atol=1e-9, equal_nan=True):
                raise AssertionError("the compiled and the reference feature engines differ")
            ours, ref = paths.contributions(x), baseline.contributions(x)
            if not np.allclose(ours, ref, rtol=0, atol=1e-9):
                raise AssertionError(f"walk and baseline differ by {np.abs(ours - ref).max():.3g}")
            parts["walk"].append(_ms(lambda x=x: paths.contributions(x), args.repeat))
            parts["baseline"].append(_ms(lambda x=x: baseline.contributions(x), args.repeat))
            if fraud.neural is not None:
                parts["network"].append(_ms(lambda x=x: neural.predict_logits(fraud.neural, x), args.repeat))
            parts["predict"].append(_ms(lambda x=x: fraud.predict(x), args.repeat))
        start += bs * args.batches
        med = {f"{k}_ms": round(float(np.median(v)), 3) for k, v in parts.items() if v}
        med["walk_speedup"] = round(med["baseline_ms"] / med["walk_ms"], 2)
        med["features_speedup"] = round(med["features_reference_ms"] / med["features_ms"], 2)
        med["features_plus_predict_us_per_event"] = round(
            (med["features_ms"] + med["predict_ms"]) * 1e3 / bs, 1
        )
        result[f"batch_{bs}"] = med
        print(f"batch size {bs}: {med}", flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
