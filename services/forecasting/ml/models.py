"""Forecasting model families: patch temporal-decay transformer, DLinear and seasonal-naive baselines.

Every model maps an input window ``x`` [B, L, C] to a point forecast [B, H, C] (``forward``); models with
quantile heads also return them from ``forward_quantiles`` ([Q, B, H, C]). Channels are independent
(each variable is its own univariate series; weights shared), so one model serves any number of variables.
All families are registered in ``backbone.registry`` (see :func:`register_all`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from backbone.blocks import BlockConfig, TransformerBlock
from backbone.registry import build_model as _build_registered
from backbone.registry import create_model, is_model, register_model
from torch import nn


class RevIN(nn.Module):
    """Reversible instance normalisation (Kim et al., ICLR 2022): per-window, per-channel mean / std."""

    def __init__(self, n_channels: int = 1, affine: bool = False, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(n_channels))
            self.bias = nn.Parameter(torch.zeros(n_channels))

    def stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = x.mean(dim=1, keepdim=True).detach()
        std = torch.sqrt(x.var(dim=1, keepdim=True, unbiased=False) + self.eps).detach()
        return mean, std

    def normalise(self, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        x = (x - mean) / std
        if self.affine:
            x = x * self.weight.mean() + self.bias.mean()
        return x

    def denormalise(self, y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        if self.affine:
            y = (y - self.bias.mean()) / (self.weight.mean() + self.eps * self.eps)
        return y * std + mean


# ------------------------------------------------------------------------------------------ baselines
@dataclass
class SeasonalNaiveConfig:
    """Repeat the last season (``period`` steps; 1 = last value)."""

    lookback: int = 336
    horizon: int = 96
    period: int = 24


class SeasonalNaive(nn.Module):
    """y[t+h] = y[t+h-period*k] for the smallest k >= 1 (no parameters)."""

    def __init__(self, cfg: SeasonalNaiveConfig) -> None:
        super().__init__()
        if cfg.period < 1 or cfg.period > cfg.lookback:
            raise ValueError(f"period must be in [1, lookback={cfg.lookback}], got {cfg.period}")
        self.cfg = cfg
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, h = self.cfg.period, self.cfg.horizon
        season = x[:, -p:, :]
        reps = math.ceil(h / p)
        return season.repeat(1, reps, 1)[:, :h, :]


@dataclass
class DLinearConfig:
    """DLinear (Zeng et al., AAAI 2023): moving-average trend + remainder, one linear map each."""

    lookback: int = 336
    horizon: int = 96
    kernel_size: int = 25
    revin: bool = True


class DLinear(nn.Module):
    """Decomposition-linear forecaster, channel independent (shared weights), optional RevIN."""

    def __init__(self, cfg: DLinearConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.revin = RevIN() if cfg.revin else None
        self.trend = nn.Linear(cfg.lookback, cfg.horizon)
        self.seasonal = nn.Linear(cfg.lookback, cfg.horizon)
        with torch.no_grad():  # start from "repeat the mean", as in the reference implementation
            self.trend.weight.fill_(1.0 / cfg.lookback)
            self.seasonal.weight.fill_(1.0 / cfg.lookback)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.revin is not None:
            mean, std = self.revin.stats(x)
            x = self.revin.normalise(x, mean, std)
        trend = moving_average(x, self.cfg.kernel_size)
        seasonal = x - trend
        y = self.trend(trend.transpose(1, 2)) + self.seasonal(seasonal.transpose(1, 2))
        y = y.transpose(1, 2)
        if self.revin is not None:
            y = self.revin.denormalise(y, mean, std)
        return y


def moving_average(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Edge-padded centred moving average over time; x [B, L, C]."""
    front = x[:, :1, :].repeat(1, (kernel - 1) // 2, 1)
    back = x[:, -1:, :].repeat(1, kernel // 2, 1)
    padded = torch.cat([front, x, back], dim=1)
    return F.avg_pool1d(padded.transpose(1, 2), kernel, stride=1).transpose(1, 2)


def config_dict(cfg: Any) -> dict[str, Any]:
    """A model config dataclass as a JSON-able dict."""
    return asdict(cfg)


__all__ = [
    "DLinear",
    "DLinearConfig",
    "RevIN",
    "SeasonalNaive",
    "SeasonalNaiveConfig",
    "config_dict",
    "moving_average",
]


# ------------------------------------------------------------------------------- patch decay transformer
@dataclass
class PatchDecayConfig:
    """PatchTST-style forecaster on backbone blocks: patching, channel independence, RevIN,
    temporal-decay attention over patch timestamps and MoE feed-forward layers."""

    lookback: int = 336
    horizon: int = 96
    patch_len: int = 16
    stride: int = 8
    d_model: int = 32
    n_heads: int = 4
    n_layers: int = 3
    dropout: float = 0.2
    head_dropout: float = 0.0
    decay_init: float = 0.05
    n_experts: int = 4
    top_k: int = 2
    n_shared_experts: int = 1
    expert_hidden: int = 64
    moe_balancing: str = "bias"
    ffn: str = "moe"  # "moe" | "mlp" (ablation)
    linear_skip: bool = True  # add a linear lookback->horizon path (RLinear) to the transformer head
    ridge: float = 0.1  # closed-form warm start of the linear path (relative ridge penalty)
    revin: bool = True
    quantiles: tuple[float, ...] = ()  # extra pinball-trained quantile heads (empty = point only)

    @property
    def n_patches(self) -> int:
        return (self.lookback - self.patch_len) // self.stride + 2  # + 1 for the end padding


def make_block(cfg: PatchDecayConfig) -> TransformerBlock:
    """backbone TransformerBlock: temporal-decay attention over patch times + MoE feed-forward."""
    return TransformerBlock(
        BlockConfig(
            dim=cfg.d_model,
            n_heads=cfg.n_heads,
            norm="layernorm",
            dropout=cfg.dropout,
            attn_kind="temporal_decay",
            decay_init=cfg.decay_init,
            ffn=cfg.ffn,  # type: ignore[arg-type]
            mlp_hidden=cfg.expert_hidden * 2,
            n_routed_experts=cfg.n_experts,
            n_shared_experts=cfg.n_shared_experts,
            top_k=cfg.top_k,
            expert_hidden=cfg.expert_hidden,
            balancing=cfg.moe_balancing,  # type: ignore[arg-type]
        )
    )


class PatchDecayForecaster(nn.Module):
    """Univariate patch transformer applied to every channel (weights shared)."""

    def __init__(self, cfg: PatchDecayConfig) -> None:
        super().__init__()
        if cfg.lookback < cfg.patch_len:
            raise ValueError(f"lookback {cfg.lookback} is shorter than patch_len {cfg.patch_len}")
        self.cfg = cfg
        self.revin = RevIN() if cfg.revin else None
        n = cfg.n_patches
        self.embed = nn.Linear(cfg.patch_len, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(1, n, cfg.d_model) * 0.02)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(make_block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head_drop = nn.Dropout(cfg.head_dropout)
        n_out = 1 + len(cfg.quantiles)
        self.head = nn.Linear(n * cfg.d_model, cfg.horizon * n_out)
        self.skip = nn.Linear(cfg.lookback, cfg.horizon * n_out) if cfg.linear_skip else None
        self.register_buffer("patch_times", torch.arange(n, dtype=torch.float32), persistent=False)
        nn.init.zeros_(self.head.weight)  # start as the linear path; the transformer learns the residual
        nn.init.zeros_(self.head.bias)

    @torch.no_grad()
    def warm_start(
        self, x: torch.Tensor, y: torch.Tensor, ridge: float = 0.1, max_rows: int = 400_000
    ) -> None:
        """Closed-form ridge solution of the linear path on RevIN-normalised training windows.

        x [N, L, C], y [N, H, C] (training windows); ``ridge`` is relative to the number of rows.
        """
        if self.skip is None:
            return
        cfg = self.cfg
        xs = x.permute(0, 2, 1).reshape(-1, cfg.lookback).double()
        ys = y.permute(0, 2, 1).reshape(-1, cfg.horizon).double()
        if len(xs) > max_rows:
            idx = torch.randperm(len(xs), generator=torch.Generator().manual_seed(0))[:max_rows]
            xs, ys = xs[idx], ys[idx]
        if self.revin is not None:
            mean = xs.mean(1, keepdim=True)
            std = torch.sqrt(xs.var(1, keepdim=True, unbiased=False) + self.revin.eps)
            xs, ys = (xs - mean) / std, (ys - mean) / std
        else:
            std = torch.ones(len(xs), 1, dtype=xs.dtype)
        # weighted by the window std: the squared error after RevIN's denormalisation, i.e. the training
        # objective, not the error in normalised units (which would overweight flat windows)
        design = torch.cat([xs, torch.ones(len(xs), 1, dtype=xs.dtype)], dim=1) * std
        ys = ys * std
        scale = float((std**2).sum())
        gram = design.T @ design + ridge * scale * torch.eye(design.shape[1], dtype=xs.dtype)
        sol = torch.linalg.solve(gram, design.T @ ys)  # [L + 1, H]
        n_out = 1 + len(cfg.quantiles)
        w = torch.zeros_like(self.skip.weight)
        b = torch.zeros_like(self.skip.bias)
        w.view(n_out, cfg.horizon, cfg.lookback)[0] = sol[:-1].T.float()
        b.view(n_out, cfg.horizon)[0] = sol[-1].float()
        self.skip.weight.copy_(w)
        self.skip.bias.copy_(b)

    def _forward_all(self, x: torch.Tensor, timestamps: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, C] -> [n_out, B, H, C] (point first, then quantile heads), in input units."""
        cfg = self.cfg
        bsz, length, n_ch = x.shape
        if self.revin is not None:
            mean, std = self.revin.stats(x)
            x = self.revin.normalise(x, mean, std)
        series = x.permute(0, 2, 1).reshape(bsz * n_ch, length)  # channel independence
        padded = torch.cat([series, series[:, -1:].expand(-1, cfg.stride)], dim=1)
        patches = padded.unfold(1, cfg.patch_len, cfg.stride)  # [B*C, N, P]
        z = self.drop(self.embed(patches) + self.pos)
        if timestamps is None:
            times = self.patch_times[None]  # [1, N]: one decay bias broadcast over the batch
        else:  # real time per input step [B, L] -> time of each patch's last step, in units of stride steps
            t = timestamps[:, None, :].expand(-1, n_ch, -1).reshape(bsz * n_ch, length)
            t = torch.cat([t, t[:, -1:] + (t[:, -1:] - t[:, -2:-1]) * torch.arange(1, cfg.stride + 1)], dim=1)
            times = t.unfold(1, cfg.patch_len, cfg.stride)[..., -1]
            times = (times - times[:, :1]) / (t[:, 1:2] - t[:, :1]).clamp(min=1e-9) / cfg.stride
        for blk in self.blocks:
            z = blk(z, times)
        z = self.norm(z)
        out = self.head(self.head_drop(z.flatten(1)))  # [B*C, H * n_out]
        if self.skip is not None:
            out = out + self.skip(series)
        n_out = 1 + len(cfg.quantiles)
        out = out.view(bsz, n_ch, n_out, cfg.horizon).permute(2, 0, 3, 1)  # [n_out, B, H, C]
        if n_out > 1:  # quantile heads as offsets from the point forecast
            out = torch.cat([out[:1], out[:1] + out[1:]], dim=0)
        if self.revin is not None:
            out = self.revin.denormalise(out, mean, std)
        return out

    def forward(self, x: torch.Tensor, timestamps: torch.Tensor | None = None) -> torch.Tensor:
        return self._forward_all(x, timestamps)[0]

    def forward_quantiles(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_all(x)[1:]

    def training_loss(self, x: torch.Tensor, y: torch.Tensor, kind: str = "mse") -> torch.Tensor:
        """Point loss + pinball loss of the quantile heads + MoE auxiliary losses."""
        out = self._forward_all(x)
        point = out[0]
        loss = F.huber_loss(point, y, delta=1.0) if kind == "huber" else F.mse_loss(point, y)
        if self.cfg.quantiles:
            _, std = self.revin.stats(x) if self.revin is not None else (None, torch.ones_like(x[:, :1]))
            for i, tau in enumerate(self.cfg.quantiles):
                diff = (y - out[1 + i]) / std  # scale-free pinball
                loss = loss + 0.1 * torch.mean(torch.maximum(tau * diff, (tau - 1) * diff))
        for blk in self.blocks:
            loss = loss + blk.aux_loss
        return loss


# ------------------------------------------------------------------------------------------ families
FAMILIES: dict[str, tuple[type[nn.Module], type]] = {
    "patch_decay_forecaster": (PatchDecayForecaster, PatchDecayConfig),
    "dlinear_forecaster": (DLinear, DLinearConfig),
    "seasonal_naive_forecaster": (SeasonalNaive, SeasonalNaiveConfig),
}


def _register(name: str, cls: type[nn.Module], cfg_cls: type) -> None:
    def preset(**overrides: Any) -> nn.Module:
        if overrides.get("quantiles") is not None:
            overrides = {**overrides, "quantiles": tuple(overrides["quantiles"])}
        return _build_registered(cls, cfg_cls, {}, overrides)

    preset.__name__ = name
    preset.__doc__ = (cls.__doc__ or name).strip().splitlines()[0]
    if not is_model(name):  # idempotent if this module is imported twice
        register_model(preset)


for _name, (_cls, _cfg) in FAMILIES.items():
    _register(_name, _cls, _cfg)


def build_model(family: str, **overrides: Any) -> nn.Module:
    """``backbone.registry.create_model(family, **overrides)`` for a forecasting family."""
    if family not in FAMILIES:
        raise KeyError(f"unknown forecasting model family {family!r}; known: {sorted(FAMILIES)}")
    return create_model(family, **overrides)
