"""The neural fraud model: backbone MoE layers over the tabular streaming features.

``fraud_tabular_moe`` (registered with ``backbone.registry``): robust-scaled features plus
missing-value indicators -> linear embedding -> ``depth`` residual pre-norm blocks of
``backbone.moe.MoE`` (routed + shared SwiGLU experts, DeepSeek-style bias balancing) -> logit.
The blend with LightGBM is ``sigmoid(a * (w * logit_lgbm + (1 - w) * logit_moe) + b)``, with ``w``
and the Platt calibration ``a, b`` fitted on held-out days (see ``pipelines.financial_risk.train``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from backbone.moe import MoE, MoEConfig
from backbone.registry import build_model, create_model, is_model, register_model
from torch import nn


@dataclass
class TabularMoEConfig:
    """Architecture of the tabular MoE network."""

    n_features: int = 214
    dim: int = 64
    depth: int = 2
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    top_k: int = 2
    expert_hidden: int = 128
    dropout: float = 0.1
    clip: float = 8.0


class TabularMoE(nn.Module):
    """Feature vector -> fraud logit through MoE blocks."""

    def __init__(self, cfg: TabularMoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n = cfg.n_features
        self.register_buffer("center", torch.zeros(n))
        self.register_buffer("scale", torch.ones(n))
        self.embed = nn.Linear(2 * n, cfg.dim)
        moe_cfg = MoEConfig(
            dim=cfg.dim,
            n_routed_experts=cfg.n_routed_experts,
            n_shared_experts=cfg.n_shared_experts,
            top_k=cfg.top_k,
            expert_hidden=cfg.expert_hidden,
            balancing="bias",
        )
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.dim) for _ in range(cfg.depth))
        self.moes = nn.ModuleList(MoE(moe_cfg) for _ in range(cfg.depth))
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Sequential(nn.LayerNorm(cfg.dim), nn.Linear(cfg.dim, 1))

    def fit_scaler(self, x: np.ndarray) -> None:
        """Median / IQR scaling fitted on training features (NaN ignored)."""
        with np.errstate(all="ignore"):
            med = np.nanmedian(x, axis=0)
            iqr = np.nanpercentile(x, 75, axis=0) - np.nanpercentile(x, 25, axis=0)
            std = np.nanstd(x, axis=0)
        scale = np.where(iqr > 0, iqr, np.where(std > 0, std, 1.0))
        self.center.copy_(torch.as_tensor(np.nan_to_num(med), dtype=torch.float32))
        self.scale.copy_(torch.as_tensor(np.nan_to_num(scale, nan=1.0), dtype=torch.float32))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        missing = torch.isnan(x)
        z = ((x - self.center) / self.scale).masked_fill(missing, 0.0)
        # tame heavy tails: sign(z) log(1 + |z|) (torch's CPU log1p is scalar code, 10x slower than log here;
        # for |z| < 1e-7 the two differ by one float32 rounding)
        z = torch.sign(z) * torch.log(z.abs() + 1.0)
        return torch.cat([z.clamp(-self.cfg.clip, self.cfg.clip), missing.float()], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, n_features] raw features (NaN allowed) -> logits [B]."""
        h = self.embed(self.prepare(x.float()))
        for norm, moe in zip(self.norms, self.moes, strict=True):
            h = h + self.drop(moe(norm(h)))
        return self.head(h).squeeze(-1)


if not is_model("fraud_tabular_moe"):

    @register_model
    def fraud_tabular_moe(**overrides: Any) -> nn.Module:
        """Tabular MoE fraud scorer: dim 64, 2 MoE blocks, 8 routed experts (top-2) + 1 shared."""
        return build_model(TabularMoE, TabularMoEConfig, {}, overrides)


def build(n_features: int, **overrides: Any) -> TabularMoE:
    """``create_model("fraud_tabular_moe", n_features=..., ...)``."""
    return create_model("fraud_tabular_moe", n_features=n_features, **overrides)  # type: ignore[return-value]


@torch.inference_mode()
def predict_logits(model: TabularMoE, x: np.ndarray, batch: int = 8192) -> np.ndarray:
    """Logits of a feature matrix (eval mode, inference mode). ``eval()`` is only called when the model is in
    training mode: it drops the MoE layers' stacked-weight cache and scratch buffers."""
    if model.training:
        model.eval()
    out = [model(torch.as_tensor(x[i : i + batch], dtype=torch.float32)) for i in range(0, len(x), batch)]
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def blend(lgbm_prob: np.ndarray, moe_logit: np.ndarray, w: float, a: float, b: float) -> np.ndarray:
    """Calibrated blend probability."""
    z = a * (w * logit(lgbm_prob) + (1 - w) * moe_logit) + b
    return 1.0 / (1.0 + np.exp(-z))


@dataclass(frozen=True)
class MoETraining:
    """How :func:`train_moe` trains: the defaults are the fraud settings; ``arch`` overrides
    :class:`TabularMoEConfig` fields; ``metric`` ("average_precision" or "auc") drives early stopping;
    ``ema_decay > 0`` validates and keeps an exponential moving average of the weights."""

    lr: float = 2e-3
    weight_decay: float = 0.01
    patience: int = 2
    ema_decay: float = 0.0
    metric: str = "average_precision"
    arch: dict[str, Any] = field(default_factory=dict)


def train_moe(
    x: np.ndarray,
    y: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    epochs: int = 6,
    seed: int = 0,
    progress: bool = True,
    training: MoETraining | None = None,
) -> tuple[TabularMoE, dict[str, Any]]:
    """Train the network with ``backbone.training.fit`` (early stopping on the validation metric)."""
    from backbone.training import fit
    from sklearn.metrics import average_precision_score, roc_auc_score
    from torch.utils.data import DataLoader, TensorDataset

    tr = training or MoETraining()
    torch.manual_seed(seed)
    model = build(x.shape[1], **tr.arch)
    model.fit_scaler(x)
    tx = torch.as_tensor(x, dtype=torch.float32)
    ty = torch.as_tensor(y, dtype=torch.float32)
    train = DataLoader(TensorDataset(tx, ty), batch_size=512, shuffle=True)
    val = DataLoader(
        TensorDataset(
            torch.as_tensor(x_val, dtype=torch.float32), torch.as_tensor(y_val, dtype=torch.float32)
        ),
        batch_size=4096,
    )
    pos = max(float(y.mean()), 1e-4)
    loss = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(min(math.sqrt((1 - pos) / pos), 20.0)))
    score = roc_auc_score if tr.metric == "auc" else average_precision_score

    def metric(out: torch.Tensor, target: torch.Tensor) -> float:
        return float(score(target.numpy(), out.float().numpy()))

    res = fit(
        model, train, val, loss, epochs=epochs, lr=tr.lr, weight_decay=tr.weight_decay,
        early_stopping_patience=tr.patience, metric_fn=metric, metric_mode="max", progress=progress,
        ema_decay=tr.ema_decay,
    )  # fmt: skip
    return model, {
        "best_epoch": res.best_epoch,
        "metric": tr.metric,
        "val_metric": res.best_score,
        "epochs_run": len(res.history),
    }
