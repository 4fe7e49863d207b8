"""Reason codes: decision-path contributions against LightGBM's own prediction and TreeSHAP."""

from __future__ import annotations

from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest

from pipelines.financial_risk.common import credit_frame, credit_split
from pipelines.financial_risk.data import CREDIT_TARGET
from services.financial_risk.explain import PathContributions, contributions, top_k_agreement


@pytest.fixture(scope="module")
def credit_model(fr_data_dir: Path) -> tuple[lgb.Booster, np.ndarray]:
    train, test = credit_split(fr_data_dir, max_rows=4000)
    x = credit_frame(train).to_numpy()
    params = {"objective": "binary", "num_leaves": 15, "learning_rate": 0.1, "verbose": -1, "seed": 0}
    booster = lgb.train(params, lgb.Dataset(x, label=train[CREDIT_TARGET].to_numpy()), num_boost_round=60)
    return booster, credit_frame(test).to_numpy()[:300]


def test_path_contributions_are_additive_and_match_lightgbm(
    credit_model: tuple[lgb.Booster, np.ndarray],
) -> None:
    booster, x = credit_model
    table = PathContributions(booster)
    path = table.contributions(x)
    assert path.shape == (len(x), booster.num_feature() + 1)
    raw = booster.predict(x, raw_score=True)
    np.testing.assert_allclose(path.sum(axis=1), raw, rtol=0, atol=1e-9)  # contributions + bias = margin
    assert np.allclose(path[:, -1], path[0, -1])  # one bias for every row
    shap = contributions(booster, x, "shap")
    np.testing.assert_allclose(shap.sum(axis=1), raw, rtol=0, atol=1e-9)
    # both attribute the margin to the same features for most rows (the credit data's strong signals)
    agreement = top_k_agreement(path, shap, k=5)
    assert agreement["top5_overlap"] > 0.6 and agreement["top1_same"] > 0.6, agreement
    # a row's contributions do not depend on the other rows of its batch; a single row works
    np.testing.assert_allclose(table.contributions(x[3:10]), path[3:10], rtol=0, atol=1e-12)
    np.testing.assert_allclose(table.contributions(x[:1]), path[:1], rtol=0, atol=1e-12)


def test_unknown_reason_method_is_rejected(credit_model: tuple[lgb.Booster, np.ndarray]) -> None:
    booster, x = credit_model
    with pytest.raises(ValueError, match="reason method"):
        contributions(booster, x[:2], "gain")  # type: ignore[arg-type]


def test_trees_without_splits_are_explained(credit_model: tuple[lgb.Booster, np.ndarray]) -> None:
    """A model whose trees cannot split (min_data_in_leaf above the row count) is all bias."""
    _, x = credit_model
    y = (np.arange(len(x)) % 2).astype(float)
    params = {"objective": "binary", "min_data_in_leaf": 10_000, "verbose": -1}
    booster = lgb.train(params, lgb.Dataset(x, label=y), num_boost_round=3)
    path = PathContributions(booster).contributions(x[:5])
    np.testing.assert_allclose(path.sum(axis=1), booster.predict(x[:5], raw_score=True), rtol=0, atol=1e-9)
    assert np.all(path[:, :-1] == 0)


@pytest.mark.parametrize("zero_as_missing", [False, True])
def test_compiled_walk_follows_lightgbm_splits_with_missing_values(
    credit_model: tuple[lgb.Booster, np.ndarray], zero_as_missing: bool
) -> None:
    """The compiled tree walk reaches LightGBM's own leaf in every tree, also for NaN and zero inputs
    (``missing_type`` NaN / Zero / None, both default directions)."""
    _, x = credit_model
    rng = np.random.default_rng(1)
    x = x.copy()
    x[rng.random(x.shape) < 0.15] = np.nan
    x[rng.random(x.shape) < 0.1] = 0.0
    y = (np.nan_to_num(x[:, 5]) + rng.normal(size=len(x)) > 0).astype(float)
    params = {"objective": "binary", "num_leaves": 15, "min_data_in_leaf": 5, "verbose": -1, "seed": 0,
              "zero_as_missing": zero_as_missing}  # fmt: skip
    booster = lgb.train(params, lgb.Dataset(x, label=y), num_boost_round=30)
    trees = booster.dump_model()["tree_info"]
    kinds = {node["missing_type"] for tree in trees for node in _splits(tree["tree_structure"])}
    assert kinds & {"NaN", "Zero"}, kinds  # the model does route missing values
    table = PathContributions(booster)
    probe = np.vstack([x, np.full((1, x.shape[1]), np.nan), np.zeros((1, x.shape[1])), -x[:20]])
    np.testing.assert_array_equal(table.leaves(probe), booster.predict(probe, pred_leaf=True))
    np.testing.assert_allclose(
        table.contributions(probe).sum(axis=1), booster.predict(probe, raw_score=True), rtol=0, atol=1e-9
    )


def _splits(node: dict) -> list[dict]:
    if "split_feature" not in node:
        return []
    return [node, *_splits(node["left_child"]), *_splits(node["right_child"])]
