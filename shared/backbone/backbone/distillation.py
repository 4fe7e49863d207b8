"""Knowledge distillation (Hinton et al. 2015): KD loss, a teacher -> student step, a training loop."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["agreement", "distill", "distill_step", "kd_loss"]

log = logging.getLogger(__name__)

Batch = torch.Tensor | tuple | list | dict


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, targets)``.

    Logits are (..., C), flattened to rows; KL is averaged over rows (``batchmean``). Without ``targets``
    only the soft term is returned (``alpha`` is ignored).
    """
    c = student_logits.shape[-1]
    s, t = student_logits.reshape(-1, c), teacher_logits.detach().reshape(-1, c)
    soft = F.kl_div(
        F.log_softmax(s / temperature, dim=-1),
        F.log_softmax(t / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * temperature**2
    if targets is None:
        return soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(s, targets.reshape(-1))


def _split(batch: Batch) -> tuple[Any, torch.Tensor | None]:
    """(inputs, targets) from a tensor, an (inputs, targets) pair or a dict with ``inputs`` / ``targets``."""
    if isinstance(batch, dict):
        return batch["inputs"], batch.get("targets")
    if isinstance(batch, tuple | list):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def _forward(model: nn.Module, inputs: Any) -> torch.Tensor:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def distill_step(
    teacher: nn.Module,
    student: nn.Module,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    temperature: float = 4.0,
    alpha: float = 0.9,
    max_grad_norm: float | None = 1.0,
) -> float:
    """One step of ``student`` on :func:`kd_loss` against the frozen ``teacher``; returns the loss."""
    inputs, targets = _split(batch)
    teacher.eval()
    student.train()
    with torch.no_grad():
        teacher_logits = _forward(teacher, inputs)
    loss = kd_loss(_forward(student, inputs), teacher_logits, targets, temperature, alpha)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm is not None:
        nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm)
    optimizer.step()
    return float(loss.detach())


def distill(
    teacher: nn.Module,
    student: nn.Module,
    loader: Iterable[Batch],
    epochs: int = 1,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-3,
    temperature: float = 4.0,
    alpha: float = 0.9,
    log_every: int = 50,
    on_epoch_end: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Distil ``teacher`` into ``student`` for ``epochs`` over ``loader``; returns the mean loss per epoch.

    Progress is logged (``backbone.distillation`` logger) every ``log_every`` steps and at each epoch end.
    """
    optimizer = optimizer or torch.optim.AdamW(student.parameters(), lr=lr)
    history = []
    for epoch in range(epochs):
        t0, total, n = time.perf_counter(), 0.0, 0
        for step, batch in enumerate(loader, 1):
            total += distill_step(teacher, student, batch, optimizer, temperature, alpha)
            n += 1
            if log_every and step % log_every == 0:
                log.info("distill epoch %d step %d loss %.4f", epoch + 1, step, total / n)
        mean = total / max(n, 1)
        history.append(mean)
        log.info("distill epoch %d/%d loss %.4f (%.1fs)", epoch + 1, epochs, mean, time.perf_counter() - t0)
        if on_epoch_end is not None:
            on_epoch_end(epoch, mean)
    student.eval()
    return history


@torch.no_grad()
def agreement(teacher: nn.Module, student: nn.Module, loader: Iterable[Batch]) -> float:
    """Fraction of rows where the student's arg-max class equals the teacher's."""
    teacher.eval()
    student.eval()
    same = total = 0
    for batch in loader:
        inputs, _ = _split(batch)
        t = _forward(teacher, inputs).argmax(-1)
        s = _forward(student, inputs).argmax(-1)
        same += int((t == s).sum())
        total += t.numel()
    return same / max(total, 1)
