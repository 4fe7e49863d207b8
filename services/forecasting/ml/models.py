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
    # extra linear paths on the last ``l`` steps only (each with its own RevIN statistics), averaged with
    # the full-lookback path: an ensemble of linear forecasters over look-backs
    skip_lookbacks: tuple[int, ...] = ()
    # CycleNet-style residual cycle (Lin et al., NeurIPS 2024): a per-channel profile over ``cycle_len``
    # steps (a day) is removed from the input and added back to the forecast; it needs the phase of the
    # window (``forward(x, phase=...)``) and the trained channels (``cycle_channels``); without them the
    # cycle is skipped
    cycle_len: int = 0
    cycle_channels: int = 0
    # weight of the transformer's correction on top of the linear path(s), picked on validation
    correction_weight: float = 1.0
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
        for extra in cfg.skip_lookbacks:
            if not 1 <= extra < cfg.lookback:
                raise ValueError(
                    f"skip_lookbacks entries must be in [1, lookback={cfg.lookback}), got {extra}"
                )
        self.extra_skips = nn.ModuleList(
            nn.Linear(extra, cfg.horizon * n_out) for extra in (cfg.skip_lookbacks if cfg.linear_skip else ())
        )
        if cfg.cycle_len > 0:
            if cfg.cycle_channels < 1:
                raise ValueError("cycle_len > 0 needs cycle_channels >= 1")
            self.register_buffer("cycle", torch.zeros(cfg.cycle_len, cfg.cycle_channels))
        self.register_buffer("patch_times", torch.arange(n, dtype=torch.float32), persistent=False)
        nn.init.zeros_(self.head.weight)  # start as the linear path; the transformer learns the residual
        nn.init.zeros_(self.head.bias)

    def uses_cycle(self, x: torch.Tensor, phase: torch.Tensor | None) -> bool:
        return self.cfg.cycle_len > 0 and phase is not None and x.shape[-1] == self.cfg.cycle_channels

    def cycle_terms(self, phase: torch.Tensor, length: int, offset: int = 0) -> torch.Tensor:
        """The cycle at steps ``offset .. offset + length - 1`` of windows whose first step has ``phase``
        [B] -> [B, length, cycle_channels]."""
        idx = (phase.long()[:, None] + offset + torch.arange(length)[None]) % self.cfg.cycle_len
        return self.cycle[idx]

    @torch.no_grad()
    def fit_cycle(self, series: torch.Tensor, phase0: int) -> None:
        """The cycle as the centred mean profile of the (scaled) training series [T, C] by phase."""
        cfg = self.cfg
        if cfg.cycle_len <= 0:
            return
        phase = (phase0 + torch.arange(len(series))) % cfg.cycle_len
        q = torch.stack([series[phase == p].double().mean(0) for p in range(cfg.cycle_len)])
        self.cycle.copy_((q - q.mean(0)).float())

    @staticmethod
    def _ridge(xs: torch.Tensor, ys: torch.Tensor, eps: float, revin: bool, ridge: float) -> torch.Tensor:
        """Std-weighted ridge of ys [N, H] on xs [N, l] (+ bias) after RevIN: [l + 1, H]."""
        if revin:
            mean = xs.mean(1, keepdim=True)
            std = torch.sqrt(xs.var(1, keepdim=True, unbiased=False) + eps)
            xs, ys = (xs - mean) / std, (ys - mean) / std
        else:
            std = torch.ones(len(xs), 1, dtype=xs.dtype)
        # weighted by the window std: the squared error after RevIN's denormalisation, i.e. the training
        # objective, not the error in normalised units (which would overweight flat windows)
        design = torch.cat([xs, torch.ones(len(xs), 1, dtype=xs.dtype)], dim=1) * std
        ys = ys * std
        scale = float((std**2).sum())
        gram = design.T @ design + ridge * scale * torch.eye(design.shape[1], dtype=xs.dtype)
        return torch.linalg.solve(gram, design.T @ ys)

    @torch.no_grad()
    def warm_start(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        ridge: float = 0.1,
        max_rows: int = 400_000,
        phase: torch.Tensor | None = None,
    ) -> None:
        """Closed-form ridge solution of the linear path(s) on RevIN-normalised training windows.

        x [N, L, C], y [N, H, C] (training windows, after :meth:`fit_cycle` when the model has a cycle;
        ``phase`` [N] is the phase of each window's first step); ``ridge`` is relative to the number of rows.
        """
        if self.skip is None:
            return
        cfg = self.cfg
        if self.uses_cycle(x, phase):
            x = x - self.cycle_terms(phase, cfg.lookback)
            y = y - self.cycle_terms(phase, cfg.horizon, cfg.lookback)
        xs = x.permute(0, 2, 1).reshape(-1, cfg.lookback).double()
        ys = y.permute(0, 2, 1).reshape(-1, cfg.horizon).double()
        if len(xs) > max_rows:
            idx = torch.randperm(len(xs), generator=torch.Generator().manual_seed(0))[:max_rows]
            xs, ys = xs[idx], ys[idx]
        eps = self.revin.eps if self.revin is not None else 0.0
        n_out = 1 + len(cfg.quantiles)
        for layer, length in [
            (self.skip, cfg.lookback),
            *zip(self.extra_skips, cfg.skip_lookbacks, strict=True),
        ]:
            sol = self._ridge(xs[:, -length:], ys, eps, self.revin is not None, ridge)  # [l + 1, H]
            w = torch.zeros_like(layer.weight)
            b = torch.zeros_like(layer.bias)
            w.view(n_out, cfg.horizon, length)[0] = sol[:-1].T.float()
            b.view(n_out, cfg.horizon)[0] = sol[-1].float()
            layer.weight.copy_(w)
            layer.bias.copy_(b)

    def linear_parameters(self) -> list[nn.Parameter]:
        """Parameters of the closed-form linear path(s) (frozen while the transformer learns the residual)."""
        if self.skip is None:
            return []
        return [*self.skip.parameters(), *self.extra_skips.parameters()]

    def _linear(self, series: torch.Tensor) -> torch.Tensor:
        """Average of the linear paths on RevIN-normalised series [B*C, L] -> [B*C, H * n_out]."""
        out = self.skip(series)
        if not len(self.extra_skips):
            return out
        for layer, length in zip(self.extra_skips, self.cfg.skip_lookbacks, strict=True):
            sub = series[:, -length:]
            if self.revin is not None:  # its own RevIN statistics, mapped back to the full window's
                mean = sub.mean(1, keepdim=True)
                std = torch.sqrt(sub.var(1, keepdim=True, unbiased=False) + self.revin.eps)
                path = layer((sub - mean) / std) * std
                shift = F.pad(mean.expand(-1, self.cfg.horizon), (0, path.shape[1] - self.cfg.horizon))
                out = out + path + shift  # the mean only on the point rows (quantile rows are offsets)
            else:
                out = out + layer(sub)
        return out / (1 + len(self.extra_skips))

    def _forward_all(
        self,
        x: torch.Tensor,
        timestamps: torch.Tensor | None = None,
        phase: torch.Tensor | None = None,
        linear_only: bool = False,
    ) -> torch.Tensor:
        """x [B, L, C] -> [n_out, B, H, C] (point first, then quantile heads), in input units.

        ``phase`` [B]: phase (step within the cycle) of each window's first step, for the cycle.
        ``linear_only``: the linear path(s) (+ cycle) without the transformer's correction.
        """
        cfg = self.cfg
        bsz, length, n_ch = x.shape
        cyc = self.uses_cycle(x, phase)
        if cyc:
            x = x - self.cycle_terms(phase, length)
        mean = std = None
        if self.revin is not None:
            mean, std = self.revin.stats(x)
            x = self.revin.normalise(x, mean, std)
        series = x.permute(0, 2, 1).reshape(bsz * n_ch, length)  # channel independence
        if linear_only and self.skip is not None:
            return self._finish(self._linear(series), bsz, n_ch, length, mean, std, phase, cyc)
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
            out = self._linear(series) + cfg.correction_weight * out
        return self._finish(out, bsz, n_ch, length, mean, std, phase, cyc)

    def _finish(
        self,
        out: torch.Tensor,
        bsz: int,
        n_ch: int,
        length: int,
        mean: torch.Tensor | None,
        std: torch.Tensor | None,
        phase: torch.Tensor | None,
        cyc: bool,
    ) -> torch.Tensor:
        """Head output [B*C, H * n_out] (RevIN units) -> [n_out, B, H, C] in input units."""
        cfg = self.cfg
        n_out = 1 + len(cfg.quantiles)
        out = out.view(bsz, n_ch, n_out, cfg.horizon).permute(2, 0, 3, 1)  # [n_out, B, H, C]
        if n_out > 1:  # quantile heads as offsets from the point forecast
            out = torch.cat([out[:1], out[:1] + out[1:]], dim=0)
        if self.revin is not None:
            out = self.revin.denormalise(out, mean, std)
        if cyc:
            out = out + self.cycle_terms(phase, cfg.horizon, length)[None]
        return out

    def forward_linear(self, x: torch.Tensor, phase: torch.Tensor | None = None) -> torch.Tensor:
        """Point forecast of the linear path(s) (+ cycle) alone, x [B, L, C] -> [B, H, C]."""
        return self._forward_all(x, phase=phase, linear_only=True)[0]

    def linear_training_loss(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        kind: str = "l1",
        phase: torch.Tensor | None = None,
        scale: str = "revin",
    ) -> torch.Tensor:
        """Point loss of the linear path(s) alone; ``scale="revin"`` measures the error in units of each
        window's (de-cycled) input std, ``"data"`` in input units."""
        pred = self.forward_linear(x, phase)
        if scale == "revin":
            xc = x - self.cycle_terms(phase, x.shape[1]) if self.uses_cycle(x, phase) else x
            std = torch.sqrt(xc.var(1, keepdim=True, unbiased=False) + 1e-5)
            pred, y = pred / std, y / std
        elif scale != "data":
            raise ValueError(f"unknown loss scale {scale!r}; use revin or data")
        return point_loss(pred, y, kind)

    def forward(
        self, x: torch.Tensor, timestamps: torch.Tensor | None = None, phase: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._forward_all(x, timestamps, phase)[0]

    def forward_quantiles(self, x: torch.Tensor, phase: torch.Tensor | None = None) -> torch.Tensor:
        return self._forward_all(x, phase=phase)[1:]

    def training_loss(
        self, x: torch.Tensor, y: torch.Tensor, kind: str = "mse", phase: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Point loss (mse | huber | l1) + pinball loss of the quantile heads + MoE auxiliary losses."""
        out = self._forward_all(x, phase=phase)
        point = out[0]
        loss = point_loss(point, y, kind)
        if self.cfg.quantiles:
            _, std = self.revin.stats(x) if self.revin is not None else (None, torch.ones_like(x[:, :1]))
            for i, tau in enumerate(self.cfg.quantiles):
                diff = (y - out[1 + i]) / std  # scale-free pinball
                loss = loss + 0.1 * torch.mean(torch.maximum(tau * diff, (tau - 1) * diff))
        for blk in self.blocks:
            loss = loss + blk.aux_loss
        return loss


def point_loss(pred: torch.Tensor, y: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Training loss of a point forecast: ``mse``, ``huber`` (delta 1) or ``l1``."""
    if kind == "huber":
        return F.huber_loss(pred, y, delta=1.0)
    if kind == "l1":
        return F.l1_loss(pred, y)
    if kind != "mse":
        raise ValueError(f"unknown loss {kind!r}; use mse, huber or l1")
    return F.mse_loss(pred, y)


# ------------------------------------------------------------------------------------------ families
FAMILIES: dict[str, tuple[type[nn.Module], type]] = {
    "patch_decay_forecaster": (PatchDecayForecaster, PatchDecayConfig),
    "dlinear_forecaster": (DLinear, DLinearConfig),
    "seasonal_naive_forecaster": (SeasonalNaive, SeasonalNaiveConfig),
}


def _register(name: str, cls: type[nn.Module], cfg_cls: type) -> None:
    def preset(**overrides: Any) -> nn.Module:
        for key in ("quantiles", "skip_lookbacks"):
            if overrides.get(key) is not None:
                overrides = {**overrides, key: tuple(overrides[key])}
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
