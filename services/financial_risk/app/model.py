"""Loading the newest fraud and credit artifacts and scoring with reason codes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
from backbone.artifacts import Artifact, latest_artifact, verify_artifact
from backbone.service.app import ModelInfo
from backbone.service.config import ServiceSettings

from services.financial_risk.explain import PathContributions, ReasonMethod, contributions

DOMAIN = "financial_risk"
FRAUD_NAME = "fraud_lgbm"
CREDIT_NAME = "credit_lgbm"


def top_k_indices(contrib: np.ndarray, k: int) -> np.ndarray:
    """``[n, k]`` column indices of each row's ``k`` largest values, largest first, ties by lower index
    (the order of a stable descending argsort, at a fraction of its cost on wide rows)."""
    k = min(k, contrib.shape[1])
    if k == 0:
        return np.zeros((len(contrib), 0), dtype=np.int64)
    kth = -np.partition(-contrib, k - 1, axis=1)[:, k - 1 : k]
    key = np.where(contrib >= kth, -contrib, np.inf)  # only candidates compete in the sort
    return np.argsort(key, axis=1, kind="stable")[:, :k]


def top_reasons(
    names: list[str], x: np.ndarray, contrib: np.ndarray, k: int = 5
) -> list[list[dict[str, Any]]]:
    """Per row of ``x``, the ``k`` features that push the score up the most (``contrib``: per-feature
    contributions to the LightGBM margin, extra columns such as the bias ignored)."""
    x, contrib = np.atleast_2d(x), np.atleast_2d(contrib)
    order = top_k_indices(contrib[:, : len(names)], k)
    values = np.take_along_axis(x, order, axis=1).tolist()
    pushes = np.take_along_axis(contrib, order, axis=1).tolist()
    return [
        [
            {"feature": names[i], "value": v if math.isfinite(v) else None, "contribution": c}
            for i, v, c in zip(idx, vals, cons, strict=True)
        ]
        for idx, vals, cons in zip(order.tolist(), values, pushes, strict=True)
    ]


@dataclass
class LgbmScorer:
    """A LightGBM booster with its feature names, artifact and default threshold."""

    booster: lgb.Booster
    feature_names: list[str]
    artifact: Artifact
    threshold: float
    neural: Any = None  # the backbone MoE network blended with LightGBM (fraud), or None
    blend: tuple[float, float, float] = (1.0, 1.0, 0.0)  # (lgbm weight, platt a, platt b)
    paths: PathContributions | None = None  # decision-path contribution table (built at load)

    @classmethod
    def load(cls, art: Artifact) -> LgbmScorer:
        verify_artifact(art)
        booster = lgb.Booster(model_str=(art.path / "model.txt").read_text())
        cfg = art.config
        names = list(cfg["feature_names"])
        if booster.num_feature() != len(names):
            raise ValueError(f"{art.path}: model has {booster.num_feature()} features, config {len(names)}")
        scorer = cls(booster, names, art, float(cfg.get("threshold", 0.5)), paths=PathContributions(booster))
        scorer._check_additive()
        ncfg = cfg.get("neural")
        if ncfg:
            import torch

            from services.financial_risk import neural

            arch = {k: v for k, v in ncfg["arch"].items() if k != "n_features"}
            net = neural.build(len(names), **arch)
            net.load_state_dict(art.load_tensors())
            net.eval()
            torch.set_num_threads(1)
            scorer.neural = net
            scorer.blend = (float(ncfg["blend_weight_lgbm"]), float(ncfg["platt_a"]), float(ncfg["platt_b"]))
        return scorer

    @property
    def version(self) -> str:
        return self.artifact.version

    def _check_additive(self) -> None:
        """The probability is computed as sigmoid(sum of contributions): check it equals LightGBM's own
        prediction on random rows (fails for a non-logistic objective)."""
        x = np.random.default_rng(0).normal(size=(8, len(self.feature_names)))
        contrib = self.paths.contributions(x) if self.paths is not None else None
        ours = 1.0 / (1.0 + np.exp(-contrib.sum(axis=1))) if contrib is not None else None
        if ours is None or not np.allclose(ours, self.booster.predict(x, num_threads=1), rtol=0, atol=1e-9):
            raise ValueError(f"{self.artifact.path}: model is not a logistic LightGBM (binary objective)")

    def predict(
        self, x: np.ndarray, reasons: int = 5, method: ReasonMethod = "path"
    ) -> tuple[np.ndarray, list[list[dict[str, Any]]]]:
        """Probabilities and the top ``reasons`` contributions of every row (``method``: decision-path
        attribution or exact TreeSHAP, see :mod:`services.financial_risk.explain`). Both are additive,
        so the LightGBM probability is the sigmoid of the contributions' sum: one pass gives both."""
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))
        contrib = contributions(self.booster, x, method, self.paths)
        scores = 1.0 / (1.0 + np.exp(-contrib.sum(axis=1)))
        if self.neural is not None:
            from services.financial_risk import neural

            w = self.blend[0]
            # a blend weight of 1 (chosen on validation) gives the network no say: skip its forward pass
            logits = neural.predict_logits(self.neural, x) if w != 1.0 else np.zeros(len(x))
            scores = neural.blend(scores, logits, *self.blend)
        return scores, top_reasons(self.feature_names, x, contrib, reasons)

    def info_dict(self) -> dict[str, Any]:
        return {
            "name": self.artifact.name,
            "version": self.version,
            "path": str(self.artifact.path),
            "metrics": self.artifact.metrics,
            "created_at": self.artifact.manifest.get("created_at"),
            "n_features": len(self.feature_names),
            "num_trees": self.booster.num_trees(),
            "neural": None
            if self.neural is None
            else {"model": "fraud_tabular_moe", "blend_weight_lgbm": self.blend[0], "calibrated": True},
        }


CREDIT_RAW = (
    "LIMIT_BAL", "SEX", "EDUCATION", "MARRIAGE", "AGE",
    "PAY_0", "PAY_2", "PAY_3", "PAY_4", "PAY_5", "PAY_6",
    "BILL_AMT1", "BILL_AMT2", "BILL_AMT3", "BILL_AMT4", "BILL_AMT5", "BILL_AMT6",
    "PAY_AMT1", "PAY_AMT2", "PAY_AMT3", "PAY_AMT4", "PAY_AMT5", "PAY_AMT6",
)  # fmt: skip


class RiskModels:
    """The service's model: the fraud scorer and the credit scorer, loaded together."""

    def __init__(self, fraud: LgbmScorer, credit: LgbmScorer) -> None:
        self.fraud = fraud
        self.credit = credit
        self.info = ModelInfo(
            name=f"{FRAUD_NAME}+{CREDIT_NAME}",
            version=fraud.version,
            path=str(fraud.artifact.path),
            metrics={"fraud": fraud.artifact.metrics, "credit": credit.artifact.metrics},
            created_at=fraud.artifact.manifest.get("created_at"),
        )

    def credit_scores(
        self, rows: list[dict[str, float]], method: ReasonMethod = "path"
    ) -> tuple[np.ndarray, list[list[dict[str, Any]]]]:
        """Default probabilities of credit applications given as raw column dicts."""
        from pipelines.financial_risk.common import credit_frame

        frame = credit_frame(pd.DataFrame(rows, columns=list(CREDIT_RAW)))
        return self.credit.predict(frame[self.credit.feature_names].to_numpy(), method=method)


def load_models(settings: ServiceSettings) -> RiskModels:
    """Newest fraud and credit artifacts under ``MODEL_DIR`` (FileNotFoundError names the pipeline)."""
    model_dir = Path(settings.model_dir)
    fraud = LgbmScorer.load(latest_artifact(model_dir, DOMAIN, FRAUD_NAME))
    from services.financial_risk.features import FeatureEngine

    if fraud.feature_names != FeatureEngine().feature_names:
        raise ValueError(
            f"{fraud.artifact.path} was trained on other features than this feature engine computes; "
            "retrain with `python -m pipelines.financial_risk.train --task fraud`"
        )
    credit = LgbmScorer.load(latest_artifact(model_dir, DOMAIN, CREDIT_NAME))
    return RiskModels(fraud, credit)
