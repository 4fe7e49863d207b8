"""Monte-Carlo dropout x test-time augmentation, and the summary statistics of the sampled predictions."""

from __future__ import annotations

import hashlib
import math
import sys
import threading
from dataclasses import dataclass

import numpy as np
import torch
from backbone.ensemble import DeepEnsemble
from torch import nn


def enable_mc_dropout(model: nn.Module, enabled: bool) -> None:
    """Put only the dropout layers in train mode (everything else stays in eval)."""
    model.eval()
    if enabled:
        for module in model.modules():
            if isinstance(module, nn.Dropout | nn.Dropout2d | nn.Dropout3d | nn.AlphaDropout):
                module.train()


def tta_flip_axes(x: torch.Tensor) -> list[int]:
    """The axes a test-time view may flip: only the flips the training augmentation applies
    (``pipelines.medical_imaging.data.train_transforms``), so that no view is one the network never saw.
    2-D: left-right only (a chest radiograph is never upside down); 3-D: all three axes."""
    dims = x.dim() - 2
    return [x.dim() - 1] if dims == 2 else list(range(2, 2 + dims))


def tta_views(x: torch.Tensor, n_views: int) -> torch.Tensor:
    """``n_views`` deterministic test-time variants of a (1, C, *spatial) input: identity, the flips of
    ``tta_flip_axes``, then 1-pixel / voxel shifts along each axis (last axis first)."""
    spatial = list(range(2, x.dim()))
    views = [x]
    ops: list[torch.Tensor] = [torch.flip(x, dims=[axis]) for axis in reversed(tta_flip_axes(x))]
    for axis in reversed(spatial):
        ops.append(torch.roll(x, shifts=1, dims=axis))
        ops.append(torch.roll(x, shifts=-1, dims=axis))
    views.extend(ops)
    while len(views) < n_views:
        views.extend(views[1:] or views)
    return torch.cat(views[:n_views], dim=0)


@dataclass
class UncertaintySummary:
    """Statistics of the positive-class (or predicted-class) probability over all stochastic passes."""

    mean: float
    std: float
    predictive_entropy: float  # bits, normalised to [0, 1] by log2(num_classes)
    mutual_information: float  # epistemic part (bits, normalised)
    interval_95: tuple[float, float]
    n_samples: int
    mean_probs: list[float]


def _entropy_bits(p: np.ndarray, axis: int = -1) -> np.ndarray:
    p = np.clip(p, 1e-12, 1.0)
    return -(p * np.log2(p)).sum(axis=axis)


def summarise(probs: np.ndarray, class_index: int) -> UncertaintySummary:
    """probs: (S, num_classes) sampled class probabilities."""
    n_classes = probs.shape[1]
    norm = math.log2(max(n_classes, 2))
    mean_probs = probs.mean(axis=0)
    total = float(_entropy_bits(mean_probs) / norm)
    aleatoric = float(_entropy_bits(probs).mean() / norm)
    p = probs[:, class_index]
    lo, hi = np.percentile(p, [2.5, 97.5]) if len(p) > 1 else (p[0], p[0])
    return UncertaintySummary(
        mean=float(p.mean()),
        std=float(p.std(ddof=1)) if len(p) > 1 else 0.0,
        predictive_entropy=total,
        mutual_information=max(0.0, total - aleatoric),
        interval_95=(float(lo), float(hi)),
        n_samples=int(len(p)),
        mean_probs=[float(v) for v in mean_probs],
    )


def decide(probs: np.ndarray, threshold: float) -> tuple[int, UncertaintySummary]:
    """The service's decision on one study's sampled probabilities (S, classes): the predicted class and the
    summary of the reported probability (binary: the positive class's, compared with ``threshold``;
    multi-class: the mean's argmax)."""
    binary = probs.shape[1] == 2
    cls = 1 if binary else int(probs.mean(axis=0).argmax())
    unc = summarise(probs, cls)
    return (int(unc.mean >= threshold) if binary else cls), unc


def uncertainty_review_reasons(
    unc: UncertaintySummary, threshold: float, binary: bool, max_entropy: float, max_std: float
) -> list[str]:
    """Why a sampled prediction needs a radiologist's review (empty: it does not): the 95 % interval spans
    the decision threshold, or the predictive entropy or the probability std is above its limit."""
    reasons = []
    lo, hi = unc.interval_95
    if binary and lo < threshold <= hi:
        reasons.append(f"95% interval [{lo:.2f}, {hi:.2f}] spans the decision threshold {threshold}")
    if unc.predictive_entropy > max_entropy:
        reasons.append(f"predictive entropy {unc.predictive_entropy:.2f} > {max_entropy}")
    if unc.std > max_std:
        reasons.append(f"probability std {unc.std:.2f} > {max_std}")
    return reasons


_RNG_LOCK = threading.Lock()


def study_seed(x: torch.Tensor) -> int:
    """A dropout seed derived from a study's model input: the same study always gets the same report."""
    data = x.detach().as_subclass(torch.Tensor).contiguous().float().numpy().tobytes()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") >> 1


@torch.no_grad()
def sample_probabilities(
    model: nn.Module,
    x: torch.Tensor,
    *,
    mc_samples: int,
    tta_views_n: int,
    temperature: float = 1.0,
    chunk: int = 64,
    seed: int | None = None,
) -> np.ndarray:
    """(mc_samples * tta_views_n, num_classes) probabilities from MC dropout over TTA views, batched.

    For a ``DeepEnsemble`` each sample goes through one member (sample ``i`` through member ``i % K``): the
    samples are drawn from the mixture of the members' MC-dropout predictives, at the cost of a single
    network however many members there are. ``seed``: draw the dropout masks from it (under a lock, the
    global RNG restored afterwards), so that the result is reproducible.
    """
    if seed is not None:
        with _RNG_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return sample_probabilities(
                model, x, mc_samples=mc_samples, tta_views_n=tta_views_n, temperature=temperature, chunk=chunk
            )
    enable_mc_dropout(model, mc_samples > 1)
    views = tta_views(x, max(1, tta_views_n))
    batch = views.repeat(max(1, mc_samples), *([1] * (x.dim() - 1)))
    nets = list(model.members) if isinstance(model, DeepEnsemble) else [model]
    order = torch.cat([torch.arange(k, batch.shape[0], len(nets)) for k in range(len(nets))])
    out = []
    for k, net in enumerate(nets):
        part = batch[k :: len(nets)]
        for start in range(0, part.shape[0], chunk):
            logits = net(part[start : start + chunk])
            out.append(torch.softmax(logits.float() / temperature, dim=-1))
    model.eval()
    probs = torch.empty_like(torch.cat(out))
    probs[order] = torch.cat(out)
    return probs.cpu().numpy()


def served_samples(
    model: nn.Module,
    x: np.ndarray,
    temperature: float,
    mc_samples: int,
    tta_views: int,
    draw: int = 0,
) -> list[np.ndarray]:
    """Per study of ``x`` (N, C, *spatial), the (mc_samples * tta_views, classes) sampled probabilities the
    service draws for it: MC dropout over TTA views at ``temperature``, with the service's per-study dropout
    seed (``study_seed``). ``draw`` > 0 shifts every seed: another MC draw."""
    from tqdm import tqdm

    out = []
    for i in tqdm(range(len(x)), desc=f"MC dropout {mc_samples} x TTA {tta_views}", file=sys.stderr):
        study = torch.from_numpy(x[i : i + 1])
        out.append(
            sample_probabilities(
                model,
                study,
                mc_samples=mc_samples,
                tta_views_n=tta_views,
                temperature=temperature,
                seed=(study_seed(study) + draw) % 2**63,
            )
        )
    return out


def served_probabilities(
    model: nn.Module,
    x: np.ndarray,
    temperature: float,
    mc_samples: int,
    tta_views: int,
    draw: int = 0,
) -> np.ndarray:
    """(N, classes): what the service reports for each study of ``x`` (N, C, *spatial): the mean of
    ``served_samples``; a single deterministic pass when both counts are 1. ``draw`` > 0: another MC draw,
    to measure how much the metrics depend on it."""
    if mc_samples * tta_views == 1:
        model.eval()
        with torch.no_grad():
            chunks = [model(torch.from_numpy(x[i : i + 256])).float() for i in range(0, len(x), 256)]
        return torch.softmax(torch.cat(chunks) / temperature, dim=-1).numpy()
    samples = served_samples(model, x, temperature, mc_samples, tta_views, draw)
    return np.stack([s.mean(axis=0) for s in samples])
