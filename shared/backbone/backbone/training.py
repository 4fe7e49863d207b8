"""Generic training loop: AdamW + cosine schedule, bf16 autocast on CPU, activation checkpointing, MoE aux
losses, gradient clipping, early stopping with best-weight restore, tqdm progress.

Batches are ``(inputs, target)`` pairs (any sequence whose first item is the input and last the target);
``inputs`` may be a tensor (``model(x)``), a tuple / list (``model(*x)``) or a dict (``model(**x)``).
Pass ``forward_fn(model, batch) -> (output, target)`` for anything else.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from backbone.blocks import set_activation_checkpointing
from backbone.moe import total_aux_loss

__all__ = ["FitResult", "WeightEMA", "default_forward", "evaluate", "fit", "set_activation_checkpointing"]

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """``history``: one dict per epoch; ``best_state``: state dict of the best epoch (already loaded)."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    best_epoch: int = -1
    best_score: float = math.nan
    monitor: str = "val_loss"
    stopped_early: bool = False
    averaged: bool = False  # validation and best_state used the EMA of the weights (``ema_decay``)


class WeightEMA:
    """Exponential moving average of a model's weights and buffers, updated after every optimizer step.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` so that early averages do not drag the
    random initialisation along. ``module`` is an eval-mode copy; integer buffers are copied as they are.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        src = dict(model.named_parameters()) | dict(model.named_buffers())
        dst = dict(self.module.named_parameters()) | dict(self.module.named_buffers())
        pairs = [(dst[k], v) for k, v in src.items()]
        self._float = [(d, s) for d, s in pairs if d.is_floating_point()]
        self._other = [(d, s) for d, s in pairs if not d.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the model's current weights."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        if self._float:
            torch._foreach_lerp_([d for d, _ in self._float], [s.detach() for _, s in self._float], 1 - decay)
        for d, s in self._other:
            d.copy_(s)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def default_forward(model: nn.Module, batch: Any) -> tuple[Any, Any]:
    """``(inputs, ..., target)`` -> ``(model(inputs), target)``."""
    if not isinstance(batch, Sequence) or len(batch) < 2:
        raise TypeError("default_forward expects (inputs, target) batches; pass forward_fn for other layouts")
    inputs, target = batch[0], batch[-1]
    if isinstance(inputs, Mapping):
        return model(**inputs), target
    if isinstance(inputs, (list, tuple)):
        return model(*inputs), target
    return model(inputs), target


def _detach(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().float().cpu() if obj.is_floating_point() else obj.detach().cpu()
    if isinstance(obj, Mapping):
        return {k: _detach(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_detach(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detach(v) for v in obj)
    return obj


def _concat(items: list[Any]) -> Any:
    first = items[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat([t.reshape(1) if t.dim() == 0 else t for t in items])
    if isinstance(first, Mapping):
        return {k: _concat([it[k] for it in items]) for k in first}
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(_concat([it[i] for it in items]) for i in range(len(first))))
    if isinstance(first, (list, tuple)):
        return type(first)(_concat([it[i] for it in items]) for i in range(len(first)))
    return items


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    metric_fn: Callable[[Any, Any], float] | None = None,
    bf16_autocast: bool = False,
    forward_fn: Callable[[nn.Module, Any], tuple[Any, Any]] = default_forward,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Mean loss (weighted by batch count) and, with ``metric_fn(outputs, targets)``, the metric."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, batches = 0.0, 0
    outputs, targets = [], []
    try:
        for batch in loader:
            batch = _to_device(batch, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_autocast):
                out, target = forward_fn(model, batch)
                loss = loss_fn(out, target)
            total += float(loss)
            batches += 1
            if metric_fn is not None:
                outputs.append(_detach(out))
                targets.append(_detach(target))
    finally:
        model.train(was_training)
    result = {"loss": total / max(batches, 1)}
    if metric_fn is not None and outputs:
        result["metric"] = float(metric_fn(_concat(outputs), _concat(targets)))
    return result


def fit(
    model: nn.Module,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    bf16_autocast: bool = False,
    activation_checkpointing: bool = False,
    early_stopping_patience: int | None = None,
    metric_fn: Callable[[Any, Any], float] | None = None,
    metric_mode: str = "max",
    progress: bool = True,
    max_grad_norm: float | None = 1.0,
    warmup_steps: int = 0,
    forward_fn: Callable[[nn.Module, Any], tuple[Any, Any]] = default_forward,
    device: str | torch.device | None = None,
    ema_decay: float = 0.0,
) -> FitResult:
    """Train ``model`` and return its history and best weights (which are loaded into ``model``).

    The loss is ``loss_fn(output, target) + total_aux_loss(model)`` (MoE layers with ``aux_loss``
    balancing). Each epoch ends with validation: the monitored score is ``metric_fn(outputs, targets)``
    (``metric_mode`` "max" or "min") when given, else the validation loss (lower is better); without
    ``val_loader`` the training loss. Training stops after ``early_stopping_patience`` epochs without
    improvement; the best epoch's weights are restored. Schedule: linear warm-up then cosine decay per step.
    ``ema_decay > 0`` keeps a :class:`WeightEMA` of the weights: validation, early stopping and the
    restored best weights are then those of the average.
    """
    from tqdm.auto import tqdm

    if metric_mode not in ("max", "min"):
        raise ValueError("metric_mode must be 'max' or 'min'")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    set_activation_checkpointing(model, activation_checkpointing)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or name.endswith("bias") else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    try:
        steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = 0
    total_steps = max(1, steps_per_epoch * epochs)

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if not steps_per_epoch:
            return 1.0
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    ema = WeightEMA(model, ema_decay) if ema_decay > 0 else None
    use_metric = metric_fn is not None and val_loader is not None
    monitor = "val_metric" if use_metric else ("val_loss" if val_loader is not None else "train_loss")
    maximize = use_metric and metric_mode == "max"
    result = FitResult(monitor=monitor, averaged=ema is not None)
    validated = ema.module if ema is not None else model
    best = -math.inf if maximize else math.inf
    stale = 0
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        task_sum = aux_sum = 0.0
        batches = 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for batch in bar:
            batch = _to_device(batch, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_autocast):
                out, target = forward_fn(model, batch)
                task_loss = loss_fn(out, target)
            aux = total_aux_loss(model).to(task_loss.device)
            loss = task_loss.float() + aux
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            if ema is not None:
                ema.update()
            scheduler.step()
            task_sum += float(task_loss.detach())
            aux_sum += float(aux.detach())
            batches += 1
            if progress:
                bar.set_postfix(loss=f"{task_sum / batches:.4f}")
        row: dict[str, float] = {
            "epoch": epoch + 1,
            "train_loss": task_sum / max(batches, 1),
            "aux_loss": aux_sum / max(batches, 1),
            "lr": optimizer.param_groups[0]["lr"],
        }
        if val_loader is not None:
            val = evaluate(
                validated,
                val_loader,
                loss_fn,
                metric_fn=metric_fn if use_metric else None,
                bf16_autocast=bf16_autocast,
                forward_fn=forward_fn,
                device=device,
            )
            row["val_loss"] = val["loss"]
            if "metric" in val:
                row["val_metric"] = val["metric"]
        row["seconds"] = time.perf_counter() - t0
        result.history.append(row)
        score = row[monitor]
        improved = score > best if maximize else score < best
        if improved or result.best_epoch < 0:
            best = score
            result.best_epoch, result.best_score = epoch + 1, score
            result.best_state = {k: v.detach().cpu().clone() for k, v in validated.state_dict().items()}
            stale = 0
        else:
            stale += 1
        if progress:
            log.info("epoch %d: %s", epoch + 1, {k: round(v, 5) for k, v in row.items()})
            shown = ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch")
            tqdm.write(f"epoch {epoch + 1}/{epochs}: {shown}", file=sys.stderr)
        if early_stopping_patience is not None and stale >= early_stopping_patience:
            result.stopped_early = True
            break
    if result.best_state:
        model.load_state_dict(result.best_state)
    set_activation_checkpointing(model, False)
    return result
