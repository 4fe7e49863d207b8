"""The streaming feature engine: handbook equality, label timing, checkpoint round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.financial_risk.check_features import check
from pipelines.financial_risk.data import epoch, event_stream, load_transactions
from services.financial_risk.features import DAY, FeatureEngine, OutOfOrderError, Transaction


def test_financial_risk_handbook_features_match_reference_sample(fr_data_dir: Path) -> None:
    # seeded sample (the full 201,295-row check is `python -m pipelines.financial_risk.check_features`)
    result = check(fr_data_dir, customers=150, terminals=300, seed=1, progress=False)
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


def test_financial_risk_state_roundtrip_equals_uninterrupted(fr_data_dir: Path) -> None:
    """Checkpoint (JSON) in the middle of a replay, restore, continue: same features as one pass."""
    df = load_transactions(fr_data_dir, end="2018-05-25")
    df = df[df["CUSTOMER_ID"] < 60].reset_index(drop=True)
    events = list(event_stream(df))
    cut = len(events) // 2

    def run(engine: FeatureEngine, evs: list) -> list[np.ndarray]:
        out = []
        for ev in evs:
            if ev.kind == "label":
                engine.add_feedback(ev.transaction_id, ev.label, ev.ts)
            else:
                out.append(engine.process(ev.tx))
        return out

    clean = FeatureEngine()
    full = run(clean, events)
    first = FeatureEngine()
    part1 = run(first, events[:cut])
    restored = FeatureEngine.from_state_dict(json.loads(json.dumps(first.state_dict())))
    part2 = run(restored, events[cut:])
    a, b = np.vstack(full), np.vstack(part1 + part2)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(np.nan_to_num(a), np.nan_to_num(b), rtol=0, atol=1e-9)
    assert json.dumps(restored.state_dict(), sort_keys=True) == json.dumps(clean.state_dict(), sort_keys=True)
