"""Training, prediction, conformal calibration and evaluation of forecasters on a :class:`SeriesSplit`."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from services.forecasting.ml import metrics as M
from services.forecasting.ml.data import SeriesSplit, split_windows, step_phase
from services.forecasting.ml.models import point_loss

log = logging.getLogger(__name__)

# Residual quantile levels stored by calibration; any requested level is interpolated between them.
CAL_LEVELS = np.round(np.concatenate([[0.001, 0.0025], np.arange(0.005, 0.9951, 0.005), [0.9975, 0.999]]), 4)
SIGMA_FLOOR = 1e-3
# residuals per horizon step below which neighbouring steps are pooled: the outer levels of a 95 % interval
# (0.025 / 0.975) need ceil((n + 1) * 0.975) <= n, i.e. n >= 39
CAL_MIN_SAMPLES = 39


@dataclass
class TrainConfig:
    """Optimisation settings."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 5
    max_minutes: float = 18.0
    seed: int = 2021
    train_stride: int = 1
    val_stride: int = 1  # windows used for early stopping (1 = all)
    loss: str = "mse"  # mse | huber | l1
    lr_schedule: str = "cosine"  # cosine | constant
    progress: bool = True
    samples_per_epoch: int = 0  # > 0: a fresh random subset of the training windows each epoch
    # keep the closed-form linear path(s) fixed: the transformer learns only the residual
    freeze_linear: bool = False
    # candidate weights of the transformer's correction, picked on the validation MSE after training
    correction_weights: tuple[float, ...] = ()
    # gradient fine-tuning of the closed-form linear path(s) before the transformer (0 epochs = off):
    # Adam (one-cycle schedule) on ``linear_loss`` of the linear forecast, errors in units of the window
    # std (``linear_loss_scale="revin"``) or of the data ("data"); the validation MSE is measured
    # ``linear_evals_per_epoch`` times per epoch and the best point, the closed form included, is kept
    linear_epochs: int = 0
    linear_lr: float = 3e-4
    linear_loss: str = "l1"
    linear_loss_scale: str = "revin"
    linear_batch_size: int = 64
    linear_evals_per_epoch: int = 4


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def cycle_len(model: nn.Module) -> int:
    """The model's cycle length (0: it needs no phase input)."""
    return int(getattr(getattr(model, "cfg", None), "cycle_len", 0) or 0)


def _loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str, phase: torch.Tensor | None = None
) -> torch.Tensor:
    """Point loss plus any auxiliary losses the model exposes (pinball on quantile heads, MoE balance)."""
    if hasattr(model, "training_loss"):
        return model.training_loss(x, y, kind, phase=phase)
    return point_loss(model(x), y, kind)


@torch.no_grad()
def predict(
    model: nn.Module, x: torch.Tensor, batch_size: int = 512, phase: torch.Tensor | None = None
) -> torch.Tensor:
    """Point forecasts for windows x [N, L, C] -> [N, H, C] (``phase`` [N] for models with a cycle)."""
    model.eval()
    outs = [
        model(x[i : i + batch_size])
        if phase is None
        else model(x[i : i + batch_size], phase=phase[i : i + batch_size])
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(outs) if outs else torch.zeros(0)


def fit_linear(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    val: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    cfg: TrainConfig,
    start_val: float,
) -> float:
    """Fine-tune the linear path(s) from the closed form (see ``TrainConfig.linear_*``); keeps the
    parameters with the lowest validation MSE (the start included) and returns that MSE."""
    x_tr, y_tr, p_tr = train
    x_va, y_va, p_va = val
    params = list(model.linear_parameters())
    best, best_state = start_val, [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=cfg.linear_lr)
    steps = math.ceil(len(x_tr) / cfg.linear_batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.linear_lr, total_steps=steps * cfg.linear_epochs, pct_start=0.1, anneal_strategy="cos"
    )
    marks = {
        math.ceil(steps * (k + 1) / cfg.linear_evals_per_epoch) - 1 for k in range(cfg.linear_evals_per_epoch)
    }
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    start = time.monotonic()

    @torch.no_grad()
    def val_mse() -> float:
        model.eval()
        pred = torch.cat(
            [
                model.forward_linear(x_va[i : i + 512], None if p_va is None else p_va[i : i + 512])
                for i in range(0, len(x_va), 512)
            ]
        )
        return M.mse(pred, y_va)

    for epoch in range(cfg.linear_epochs):
        model.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        for b in range(steps):
            idx = perm[b * cfg.linear_batch_size : (b + 1) * cfg.linear_batch_size]
            loss = model.linear_training_loss(
                x_tr[idx],
                y_tr[idx],
                cfg.linear_loss,
                None if p_tr is None else p_tr[idx],
                cfg.linear_loss_scale,
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if b in marks:
                val = val_mse()
                log.info("linear fine-tune epoch %.2f val_mse %.4f", epoch + (b + 1) / steps, val)
                if val < best - 1e-5:
                    best, best_state = val, [p.detach().clone() for p in params]
                model.train()
    with torch.no_grad():
        for p, v in zip(params, best_state, strict=True):
            p.copy_(v)
    log.info("linear fine-tune: val_mse %.4f -> %.4f (%.0f s)", start_val, best, time.monotonic() - start)
    return best


def fit(
    model: nn.Module,
    split: SeriesSplit,
    horizon: int,
    cfg: TrainConfig,
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> dict[str, object]:
    """Train with Adam on stride-``train_stride`` windows, early stopping on the validation MSE.

    Keeps the weights of the best validation epoch. Stops early after ``patience`` epochs without
    improvement or when ``max_minutes`` is used up. Returns the training history.
    """
    set_seed(cfg.seed)
    cl = cycle_len(model)
    x_tr, y_tr, p_tr = split_windows(split, "train", horizon, cfg.train_stride, cl)
    x_va, y_va, p_va = split_windows(split, "val", horizon, cfg.val_stride, cl)
    warm_val = math.inf
    if hasattr(model, "warm_start"):
        if cl:
            train_rows = torch.as_tensor(split.part("train"))
            start_row = split.borders["train"][0]
            model.fit_cycle(
                train_rows, int(step_phase(split.frame.index[start_row : start_row + 1], split.freq, cl)[0])
            )
        x_all, y_all, p_all = split_windows(split, "train", horizon, 1, cl)  # every window: cheap
        model.warm_start(x_all, y_all, ridge=getattr(model.cfg, "ridge", 0.1), phase=p_all)
        warm_val = M.mse(predict(model, x_va, phase=p_va), y_va)
        log.info("warm start (closed-form linear path): val_mse %.4f", warm_val)
        if cfg.linear_epochs > 0 and hasattr(model, "linear_training_loss"):
            warm_val = fit_linear(model, (x_all, y_all, p_all), (x_va, y_va, p_va), cfg, warm_val)
    if cfg.freeze_linear and hasattr(model, "linear_parameters"):
        for p in model.linear_parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    history: dict[str, object] = {"train_loss": [], "val_mse": [], "epochs": 0, "stopped": "epochs"}
    if not params or (cfg.epochs == 0 and not hasattr(model, "warm_start")):  # nothing to train
        history["val_mse"] = [M.mse(predict(model, x_va, phase=p_va), y_va)]
        return history
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_epoch = min(cfg.samples_per_epoch, len(x_tr)) if cfg.samples_per_epoch > 0 else len(x_tr)
    steps_per_epoch = math.ceil(n_epoch / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    if cfg.lr_schedule == "cosine" and total > 0:
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=total, pct_start=0.1, anneal_strategy="cos"
        )
    else:
        sched = None
    best, best_state, bad = math.inf, copy.deepcopy(model.state_dict()), 0
    if hasattr(model, "warm_start"):
        best = warm_val
        history["warm_val_mse"] = warm_val
    # a frozen linear path makes the forecast affine in the correction weight w (RevIN and the cycle are
    # affine too): pred(w) = base + w * (pred(1) - base), so every candidate w is scored from one pass
    weights = [float(w) for w in cfg.correction_weights]
    pick = bool(weights) and cfg.freeze_linear and hasattr(getattr(model, "cfg", None), "correction_weight")
    best_w = 0.0
    if pick:
        model.cfg.correction_weight = 0.0
        base = predict(model, x_va, phase=p_va)
        model.cfg.correction_weight = 1.0
    start = time.monotonic()
    gen = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(x_tr), generator=gen)[:n_epoch]
        run, n = 0.0, 0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not cfg.progress,
            leave=False,
        )
        for b in bar:
            idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            loss = _loss(model, x_tr[idx], y_tr[idx], cfg.loss, None if p_tr is None else p_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if sched is not None:
                sched.step()
            run += float(loss.detach()) * len(idx)
            n += len(idx)
            if b % 20 == 0:
                bar.set_postfix(loss=f"{run / max(n, 1):.4f}")
        pred = predict(model, x_va, phase=p_va)
        w_epoch = 1.0
        if pick:
            scores = {w: M.mse(base + w * (pred - base), y_va) for w in weights}
            w_epoch = min(scores, key=scores.__getitem__)
            history.setdefault("correction_val_mse", []).append({str(w): v for w, v in scores.items()})
            val = scores[w_epoch]
        else:
            val = M.mse(pred, y_va)
        history["train_loss"].append(run / max(n, 1))  # type: ignore[union-attr]
        history["val_mse"].append(val)  # type: ignore[union-attr]
        history["epochs"] = epoch + 1
        log.info(
            "epoch %d train %.4f val_mse %.4f (correction weight %.2f)",
            epoch + 1,
            run / max(n, 1),
            val,
            w_epoch,
        )
        if cfg.progress:
            tqdm.write(f"epoch {epoch + 1}: train {run / max(n, 1):.4f} val_mse {val:.4f} (w {w_epoch:.2f})")
        if on_epoch is not None:
            on_epoch(epoch, run / max(n, 1), val)
        if val < best - 1e-5:
            best, best_state, bad, best_w = val, copy.deepcopy(model.state_dict()), 0, w_epoch
        else:
            bad += 1
            if bad >= cfg.patience:
                history["stopped"] = "early_stopping"
                break
        if (time.monotonic() - start) / 60.0 > cfg.max_minutes:
            history["stopped"] = "time_budget"
            break
    model.load_state_dict(best_state)
    history["best_val_mse"] = best
    if pick:  # the weight of the kept epoch (0 when no epoch beat the warm start)
        model.cfg.correction_weight = best_w
        history["correction_weight"] = best_w
    history["train_seconds"] = round(time.monotonic() - start, 1)
    return history


def window_sigma(x: torch.Tensor) -> torch.Tensor:
    """Per-window, per-channel residual scale: input std, floored. x [N, L, C] -> [N, 1, C]."""
    std = x.std(dim=1, keepdim=True, unbiased=False)
    return torch.clamp(std, min=SIGMA_FLOOR)


@torch.no_grad()
def calibrate(model: nn.Module, split: SeriesSplit, horizon: int, stride: int = 1) -> np.ndarray:
    """Split-conformal residual quantiles on the validation part (:func:`conformal_table` of its residuals).

    Residuals are divided by each window's input std (scale-free, so the table applies to any user
    series). Returns an array [len(CAL_LEVELS), horizon].
    """
    x_va, y_va, p_va = split_windows(split, "val", horizon, stride, cycle_len(model))
    pred = predict(model, x_va, phase=p_va)
    z = ((y_va - pred) / window_sigma(x_va)).permute(1, 0, 2).reshape(horizon, -1).numpy()
    return conformal_table(z)


def conformal_table(z: np.ndarray) -> np.ndarray:
    """Quantiles [len(CAL_LEVELS), H] of residuals ``z`` [H, n] per horizon step, by the split-conformal
    finite-sample rule (the ceil((n + 1) tau)-th order statistic for upper levels, the floor((n + 1) tau)-th
    for lower ones, clipped to the sample). Fewer than ``CAL_MIN_SAMPLES`` residuals per step (a short
    validation part) pool each step with its nearest neighbours, as few as reach that count, so that a
    90 % interval is not the range of a handful of residuals."""
    horizon, n = z.shape
    width = min(math.ceil(CAL_MIN_SAMPLES / max(n, 1)), horizon)  # steps pooled per step
    rows = [z[h] for h in range(horizon)]
    if width > 1:
        log.warning("calibration: %d residuals per horizon step; pooling %d neighbouring steps", n, width)
        starts = [min(max(h - width // 2, 0), horizon - width) for h in range(horizon)]
        rows = [z[lo : lo + width].ravel() for lo in starts]
    table = np.empty((len(CAL_LEVELS), horizon), dtype=np.float32)
    upper = CAL_LEVELS >= 0.5
    for h, row in enumerate(rows):
        m = len(row)
        rank = np.where(upper, np.ceil((m + 1) * CAL_LEVELS), np.floor((m + 1) * CAL_LEVELS))
        table[:, h] = np.sort(row)[np.clip(rank.astype(np.int64), 1, m) - 1]
    return table


def quantile_offsets(table: np.ndarray, levels: list[float]) -> np.ndarray:
    """Residual quantiles [len(levels), H] interpolated from a calibration table at any level in (0, 1)."""
    out = np.empty((len(levels), table.shape[1]), dtype=np.float32)
    for i, tau in enumerate(levels):
        for h in range(table.shape[1]):
            out[i, h] = np.interp(tau, CAL_LEVELS, table[:, h])
    return out


def intervals(point: torch.Tensor, x: torch.Tensor, table: np.ndarray, levels: list[float]) -> torch.Tensor:
    """Quantile forecasts [Q, N, H, C]: point + window std x calibrated residual quantile."""
    offsets = torch.as_tensor(quantile_offsets(table[:, : point.shape[1]], levels))[:, None, :, None]
    return point[None] + window_sigma(x)[None] * offsets


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: SeriesSplit,
    horizon: int,
    table: np.ndarray | None,
    part: str = "test",
    stride: int = 1,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Metrics on every stride-1 window of ``part`` (scaled values, all variables).

    Returns (metrics, tensors) with mse, mae, and when a calibration table is given coverage_90,
    coverage_50, mean 90 % width and the pinball loss at 0.05/0.25/0.5/0.75/0.95.
    """
    x, y, phase = split_windows(split, part, horizon, stride, cycle_len(model))
    pred = predict(model, x, phase=phase)
    out: dict[str, float] = {"mse": M.mse(pred, y), "mae": M.mae(pred, y), "n_windows": len(x)}
    tensors = {"x": x, "y": y, "pred": pred}
    if phase is not None:
        tensors["phase"] = phase
    if table is not None:
        levels = [0.05, 0.25, 0.5, 0.75, 0.95]
        q = intervals(pred, x, table, levels)
        out["coverage_90"] = M.coverage(q[0], q[4], y)
        out["coverage_50"] = M.coverage(q[1], q[3], y)
        out["width_90"] = M.interval_width(q[0], q[4])
        out["pinball"] = M.pinball(q, y, levels)
        tensors["q05"], tensors["q95"] = q[0], q[4]
    return out, tensors
