"""PatchCore-style anomaly detection: memory bank of locally aware patch features from defect-free images,
greedy coreset subsampling, nearest-neighbour patch scores, an anomaly map and a calibrated threshold.

Reference: Roth et al., "Towards Total Recall in Industrial Anomaly Detection" (CVPR 2022). Three patch
feature extractors (``PatchCoreConfig.features``):

* ``"filterbank"`` (the production-line default): a fixed multi-scale Gaussian-derivative filter bank
  (smoothed intensity, first and second derivatives and their magnitudes at scales 1-8 px), computed with
  torch convs on the per-image standardised image, average-pooled to a patch grid. No weights: a new line's
  images are described exactly like the training line's, and nothing is learned from defects.
* ``"learned"``: maps of a U-Net trained self-supervised (synthetic anomalies) on defect-free tiles only
  (``anomaly_net``), frozen; its decoder maps and segmentation logit, pooled to the same patch grid.
* ``"trunk"``: intermediate maps of any trunk with ``forward_intermediates`` (timm models), here the
  classifier's trunk trained from scratch on NEU-DET (no pretrained weights exist on this machine).

Patch features are standardised per channel with the bank images' statistics (stored with the bank). The image
score ignores a border band (``border``, a fraction of each side): filter and padding responses at the image
edge dominated the maxima of defect-free tiles.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ProgressFn = Callable[[float, str], None]


@dataclass
class PatchCoreConfig:
    """Hyper-parameters of the detector (stored with every memory bank)."""

    image_size: int = 224
    layers: tuple[int, ...] = (1, 2)  # forward_intermediates indices (resnet: layer2, layer3)
    patch_kernel: int = 3  # local neighbourhood aggregation (average pooling)
    feature_dim: int = 0  # 0: keep all channels, else adaptive-average them down to this many
    coreset_ratio: float = 0.1
    coreset_max: int = 4000
    coreset_projection: int = 64
    max_bank_input: int = 60_000  # random subsample of patches before the greedy coreset
    blur_sigma: float = 4.0
    threshold_quantile: float = 0.99  # of held-out good scores; the service default pass/fail line
    normalize: str = "per_image"  # per_image: standardise each image (exposure invariance) | none
    features: str = "filterbank"  # filterbank (fixed filters) | trunk (timm maps) | learned (base net)
    fb_scales: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)  # filter-bank Gaussian sigmas (pixels)
    fb_stride: int = 4  # filter-bank patch grid stride (average pooling)
    channel_standardize: bool = True  # z-score features with the bank images' per-channel mean / std
    border: float = 0.0  # fraction of each side of the map left out of the image score (shown in the map)
    # image score = max of the map + w * (this quantile of the map - its mean on good images), w and the mean
    # fitted on held-out good images (MemoryBank.fit_level); 0: the max alone (banks saved before the field)
    level_quantile: float = 0.0
    # weight of each patch's (x, y) position (0..1 across the map) appended to its standardised features, so
    # a patch is compared with normal patches at about the same place (parts fixtured in the same pose; 0:
    # any place, PatchCore's default). 60 = a whole map width costs a distance of 60 (nearest-neighbour
    # distances of normal patches are about 5-10): a window of a few patches. Saved with each bank
    position_weight: float = 0.0
    learned_parts: tuple[str, ...] = ("dec", "seg")  # features="learned": base-net decoder maps / seg logit
    # features="learned": versions of the self-supervised base model artifacts; with several (an ensemble of
    # base models trained with different seeds) each patch's features are theirs concatenated, in this order
    base_versions: tuple[str, ...] = ()
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        d["fb_scales"] = list(self.fb_scales)
        d["learned_parts"] = list(self.learned_parts)
        d["base_versions"] = list(self.base_versions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PatchCoreConfig:
        d = dict(d)
        d["layers"] = tuple(d.get("layers", (1, 2)))
        d.setdefault("normalize", "none")  # banks saved before the field existed were built without it
        d.setdefault("features", "trunk")  # ... and on the classifier trunk, without channel z-scores
        d.setdefault("channel_standardize", False)
        d.setdefault("level_quantile", 0.0)  # ... and scored by the map's maximum alone
        d.setdefault("position_weight", 0.0)  # ... and searched at any position
        d["fb_scales"] = tuple(d.get("fb_scales", (1.0, 2.0, 4.0, 8.0)))
        d["learned_parts"] = tuple(d.get("learned_parts", ("dec", "seg")))
        legacy = d.pop("base_version", "")  # banks and lines saved with one base model
        d["base_versions"] = tuple(d.get("base_versions", (legacy,) if legacy else ()))
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


class PatchFeatureExtractor(nn.Module):
    """Locally aware patch features from intermediate maps of a timm trunk (frozen, eval mode)."""

    def __init__(self, trunk: nn.Module, config: PatchCoreConfig) -> None:
        super().__init__()
        self.trunk = trunk
        self.config = config

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, h, w, D) patch features at the resolution of the first layer."""
        if self.config.normalize == "per_image":
            x = _standardize(x)
        feats = self.trunk.forward_intermediates(x, indices=list(self.config.layers), intermediates_only=True)
        k = self.config.patch_kernel
        size = feats[0].shape[-2:]
        maps = []
        for f in feats:
            if k > 1:
                f = F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False)
            if f.shape[-2:] != size:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            maps.append(f)
        out = torch.cat(maps, dim=1).permute(0, 2, 3, 1)  # B h w C
        if self.config.feature_dim and out.shape[-1] != self.config.feature_dim:
            b, h, w, c = out.shape
            out = F.adaptive_avg_pool1d(out.reshape(-1, 1, c), self.config.feature_dim).reshape(b, h, w, -1)
        return out.contiguous()


def _standardize(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) / x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)


def _gaussian_derivatives(sigma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """1-D Gaussian, its first and second derivative (radius 3 sigma)."""
    radius = max(1, int(round(3 * sigma)))
    xs = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-(xs**2) / (2 * sigma**2))
    g = g / g.sum()
    return g, -xs / sigma**2 * g, (xs**2 / sigma**4 - 1 / sigma**2) * g


def _separable(x: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
    rx, ry = kx.numel() // 2, ky.numel() // 2
    x = F.conv2d(F.pad(x, (rx, rx, 0, 0), mode="replicate"), kx.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, ry, ry), mode="replicate"), ky.view(1, 1, -1, 1))


class FilterBankExtractor(nn.Module):
    """Fixed multi-scale Gaussian-derivative patch features (no weights, works on any line's images).

    Per scale sigma: smoothed intensity, sigma-normalised first (x, y) and second (xx, yy, xy) derivatives and
    the magnitudes of the five derivatives (11 channels); average-pooled to a grid of stride ``fb_stride``,
    then PatchCore's local neighbourhood average (``patch_kernel``). Input (B, 1, S, S) grey images."""

    def __init__(self, config: PatchCoreConfig) -> None:
        super().__init__()
        self.config = config

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.normalize == "per_image":
            x = _standardize(x)
        x = x.float().mean(dim=1, keepdim=True)  # greyscale
        channels = []
        for sigma in self.config.fb_scales:
            g, d1, d2 = _gaussian_derivatives(float(sigma))
            s1, s2 = float(sigma), float(sigma) ** 2
            deriv = [_separable(x, d1, g) * s1, _separable(x, g, d1) * s1, _separable(x, d2, g) * s2,
                     _separable(x, g, d2) * s2, _separable(x, d1, d1) * s2]
            channels += [_separable(x, g, g), *deriv, *(d.abs() for d in deriv)]
        f = torch.cat(channels, dim=1)
        st = self.config.fb_stride
        if st > 1:
            f = F.avg_pool2d(f, st, st, ceil_mode=True)
        k = self.config.patch_kernel
        if k > 1:
            f = F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False)
        return f.permute(0, 2, 3, 1).contiguous()


def make_extractor(
    config: PatchCoreConfig,
    trunk: nn.Module | None = None,
    base: nn.Module | Sequence[nn.Module] | None = None,
) -> nn.Module:
    """The patch feature extractor a config names (``trunk`` is needed for ``features="trunk"``, the
    self-supervised base network ``base`` for ``features="learned"``, or one per ``config.base_versions``:
    their features follow one another in that order)."""
    if config.features == "learned":
        from services.manufacturing.app.anomaly_net import AnomalySegNet, LearnedExtractor

        nets = list(base) if isinstance(base, Sequence) else [base]
        if not nets or not all(isinstance(n, AnomalySegNet) for n in nets):
            raise ValueError("features='learned' needs the self-supervised base network")
        if config.base_versions and len(nets) != len(config.base_versions):
            raise ValueError(f"the config names {len(config.base_versions)} base models, got {len(nets)}")
        fb = None
        if "fb" in config.learned_parts:
            fb = FilterBankExtractor(PatchCoreConfig(**{**config.to_dict(), "patch_kernel": 1}))
        return LearnedExtractor(nets, config.fb_stride, config.patch_kernel, config.learned_parts, fb).eval()
    if config.features == "filterbank":
        return FilterBankExtractor(config).eval()
    if config.features == "trunk":
        if trunk is None:
            raise ValueError("features='trunk' needs the classifier trunk")
        return PatchFeatureExtractor(trunk, config).eval()
    raise ValueError(f"unknown PatchCore features {config.features!r}")


def greedy_coreset(
    features: torch.Tensor, n: int, projection: int = 128, seed: int = 0, progress: ProgressFn | None = None
) -> torch.Tensor:
    """Indices of ``n`` rows chosen by greedy k-center selection on a random projection (PatchCore)."""
    total = features.shape[0]
    if n >= total:
        return torch.arange(total)
    g = torch.Generator().manual_seed(seed)
    x = features
    if projection and features.shape[1] > projection:
        proj = torch.randn(features.shape[1], projection, generator=g) / math.sqrt(projection)
        x = features @ proj
    x = x.contiguous()
    sq = (x * x).sum(1)
    idx = int(torch.randint(total, (1,), generator=g))
    selected = torch.empty(n, dtype=torch.long)
    min_d = torch.full((total,), float("inf"))
    step = max(1, n // 20)
    for i in range(n):
        selected[i] = idx
        d = sq - 2.0 * (x @ x[idx]) + sq[idx]  # squared distances to the newest centre
        torch.minimum(min_d, d, out=min_d)
        idx = int(torch.argmax(min_d))
        if progress is not None and i % step == 0:
            progress(i / n, f"coreset {i}/{n}")
    return selected


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(round(4 * sigma)))
    xs = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(xs**2) / (2 * sigma**2))
    return k / k.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps."""
    if sigma <= 0:
        return maps
    k = _gaussian_kernel(sigma).to(maps.dtype)
    r = k.numel() // 2
    x = maps.unsqueeze(1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return x.squeeze(1)


@dataclass
class Calibration:
    """Threshold and the held-out figures it came from."""

    threshold: float
    method: str
    n_good: int
    good_mean: float
    good_std: float
    good_max: float
    n_defect: int = 0
    defect_auroc: float | None = None
    expected_false_reject_rate: float | None = None
    defect_recall: float | None = None
    cross_fit_folds: int | None = None  # K of K-fold cross-fitted good scores (None: a held-out part)
    suspect_good: list[int] | None = None  # cross-fitted good images scoring far above the others

    def to_dict(self) -> dict:
        return asdict(self)


def with_positions(feats: torch.Tensor, weight: float) -> torch.Tensor:
    """(B, h, w, D) patch features -> (B, h, w, D + 2) with ``weight`` x the patch's (x, y) position in [0, 1]
    appended (unchanged when ``weight`` is 0)."""
    if weight <= 0:
        return feats
    b, h, w, _ = feats.shape
    ys = torch.linspace(0, weight, h, dtype=feats.dtype).view(1, h, 1, 1).expand(b, h, w, 1)
    xs = torch.linspace(0, weight, w, dtype=feats.dtype).view(1, 1, w, 1).expand(b, h, w, 1)
    return torch.cat([feats, xs, ys], dim=-1)


class MemoryBank:
    """A line's memory bank (coreset of normal patch features, in the standardised feature space when the
    config says so, with the channel mean / std it was standardised with, and the patch position appended
    with weight ``position`` when that is > 0) and its threshold."""

    def __init__(
        self,
        bank: torch.Tensor,
        config: PatchCoreConfig,
        calibration: Calibration | None = None,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
        position: float = 0.0,
    ):
        if position < 0:
            raise ValueError(f"position weight must be >= 0, got {position}")
        self.bank = bank.contiguous().float()
        # weight of the (x, y) position columns at the end of each entry (with_positions); 0: none. Like the
        # level term it travels with the bank, whatever config loads it
        self.position = float(position)
        self.config = config
        self.calibration = calibration
        self.mean = mean.float() if mean is not None else None
        self.std = std.float() if std is not None else None
        self._n_feat = self.bank.shape[1] - (2 if self.position > 0 else 0)
        # with positions: the entries sorted by the grid cell of their position, and the first entry of each
        # cell (row-major, PRUNE_CELLS per side), for the pruned search (the order of a bank's entries is
        # immaterial to its scores)
        self._cell_start: list[int] = []
        if self.position > 0:
            self._sort_by_cell()
        self._bank_sq = (self.bank**2).sum(1)
        # (quantile, w, offset) of the image score's level term (fit_level), None: the map's maximum alone;
        # the quantile travels with w and offset: a bank scores as it was calibrated whatever config loads it
        self.level: tuple[float, float, float] | None = None
        # bfloat16 copy of the bank and its squared norms for the candidate search (made on first use)
        self._bank16: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def fit(
        cls, feats: torch.Tensor, config: PatchCoreConfig, progress: ProgressFn | None = None
    ) -> MemoryBank:
        """Bank of (N, h, w, D) defect-free patch features: channel statistics, the positions
        (``config.position_weight``), then the greedy coreset."""
        flat = feats.reshape(-1, feats.shape[-1]).float()
        mean = std = None
        if config.channel_standardize:
            mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
            feats = (feats - mean) / std
        feats = with_positions(feats.float(), config.position_weight)
        return cls(build_bank(feats, config, progress), config, mean=mean, std=std,
                   position=config.position_weight)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What is saved (safetensors): the bank and, when used, the channel statistics."""
        out = {"bank": self.bank.contiguous()}
        if self.mean is not None and self.std is not None:
            out |= {"mean": self.mean.contiguous(), "std": self.std.contiguous()}
        if self.level is not None:
            out["level"] = torch.tensor(self.level, dtype=torch.float64)
        if self.position > 0:
            out["position"] = torch.tensor([self.position], dtype=torch.float64)
        return out

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], config: PatchCoreConfig, calibration: Calibration | None = None
    ) -> MemoryBank:
        position = float(tensors["position"][0]) if "position" in tensors else 0.0
        mb = cls(tensors["bank"], config, calibration, tensors.get("mean"), tensors.get("std"), position)
        if "level" in tensors:
            q, w, offset = tensors["level"].tolist()
            mb.level = (float(q), float(w), float(offset))
        return mb

    @property
    def threshold(self) -> float:
        if self.calibration is None:
            raise RuntimeError("memory bank is not calibrated")
        return self.calibration.threshold

    def patch_scores(
        self, feats: torch.Tensor, chunk: int = 256, bf16: bool | None = None, prune: bool = True
    ) -> torch.Tensor:
        """(B, h, w, D) features -> (B, h, w) distance of each patch to its nearest bank entry.

        A bank with positions (``self.position`` > 0) is searched by :meth:`_pruned_scores`: exact, and it
        reads only the entries near each block of patches (``prune=False``: every entry, in float32, the
        reference the benchmark compares it with). Without positions every entry is read, ``chunk``
        patches at a time (256 x a 4,000-entry bank = a 4 MB distance block: 8 ms per 128-px tile on one
        thread, 20 ms with 4,096-patch blocks of 64 MB; docs/manufacturing.md); ``bf16`` (default: for banks
        of at least ``BF16_MIN_BANK`` entries where this CPU multiplies bfloat16 faster than float32): the
        distances to every entry are computed in bfloat16 only to pick each patch's ``RERANK`` nearest
        candidates, whose distances are then computed exactly in float32, so the result is the float32 nearest
        neighbour unless the true one ranks below ``RERANK`` in bfloat16."""
        b, h, w, _ = feats.shape
        feats = feats.float()
        if self.mean is not None and self.std is not None:
            feats = (feats - self.mean) / self.std
        grid = with_positions(feats, self.position)
        if bf16 is None:
            bf16 = len(self.bank) >= BF16_MIN_BANK and bf16_matmul_is_faster()
        if self.position > 0 and prune:
            return self._pruned_scores(grid, bf16)
        flat = grid.reshape(b * h * w, -1)
        if self.position > 0:  # positions' squared norms (to 2 x weight^2): beyond bfloat16's resolution
            bf16 = False
        out = torch.empty(flat.shape[0])
        if not bf16:
            for s in range(0, flat.shape[0], chunk):  # min_j |q - b_j|^2 = |q|^2 + min_j (|b_j|^2 - 2 q.b_j)
                q = flat[s : s + chunk]
                d2 = torch.addmm(self._bank_sq, q, self.bank.T, alpha=-2).min(dim=1).values + (q**2).sum(1)
                out[s : s + chunk] = d2.clamp_min(0).sqrt()
            return out.view(b, h, w)
        if self._bank16 is None:
            self._bank16 = (self.bank.to(torch.bfloat16), self._bank_sq.to(torch.bfloat16))
        bank16, sq16 = self._bank16
        for s in range(0, flat.shape[0], chunk):
            q = flat[s : s + chunk]
            approx = torch.addmm(sq16, q.to(torch.bfloat16), bank16.T, alpha=-2)
            cand = approx.topk(min(RERANK, len(self.bank)), dim=1, largest=False).indices
            d2 = ((self.bank[cand] - q.unsqueeze(1)) ** 2).sum(-1).min(dim=1).values
            out[s : s + chunk] = d2.clamp_min(0).sqrt()
        return out.view(b, h, w)

    def _sort_by_cell(self) -> None:
        """Sorts the entries by the cell of their position on a ``PRUNE_CELLS`` x ``PRUNE_CELLS`` grid over
        [0, weight]^2 (rows of cells one after the other), so that the entries of a run of cells in one row
        are one slice of the bank; ``_cell_start[k]`` is the first entry of cell k."""
        cells, nf = PRUNE_CELLS, self._n_feat
        col = self._cell_index(self.bank[:, nf])
        row = self._cell_index(self.bank[:, nf + 1])
        key = row * cells + col
        self.bank = self.bank[torch.argsort(key, stable=True)].contiguous()
        start = torch.zeros(cells * cells + 1, dtype=torch.long)
        start[1:] = torch.bincount(key, minlength=cells * cells).cumsum(0)
        self._cell_start = start.tolist()

    def _cell_index(self, v: torch.Tensor) -> torch.Tensor:
        """Grid cell (0 .. PRUNE_CELLS - 1) of position values ``v`` (clamped, which keeps their order)."""
        return (v / (self.position / PRUNE_CELLS)).floor().clamp(0, PRUNE_CELLS - 1).long()

    def _cell_range(self, lo: float, hi: float, margin: float) -> tuple[int, int]:
        """First and last cell holding a position in [lo - margin, hi + margin]."""
        first, last = self._cell_index(torch.tensor([lo - margin, hi + margin], dtype=torch.float64)).tolist()
        return first, last

    def _pruned_scores(self, grid: torch.Tensor, bf16: bool = False) -> torch.Tensor:
        """Exact nearest-entry distances (B, h, w) of the standardised patch features with positions ``grid``
        (B, h, w, D + 2), ``PRUNE_BLOCK`` x ``PRUNE_BLOCK`` patches of the grid at a time (every image's
        together). A query's distance to an entry is at least their position distance, so once the entries in
        and around the block's cells bound each query's distance by d, only the cells within d of the block
        can hold a nearer entry: on the magnetic-tile bank a few per cent of the entries for a defect-free
        tile, against every entry of a search without positions. Queries whose bound is above ``PRUNE_WIDE`` x
        the block's median (a defect) widen the search in a group of their own. Queries that would still
        read cells over ``PRUNE_FULL`` of the grid (a far defect, or a small position weight) are searched
        against the whole bank at the end, all together (:meth:`_search_all`, ``bf16``: bfloat16 candidates).
        """
        b, h, w, dim = grid.shape
        flat = grid.reshape(-1, dim)
        index = torch.arange(b * h * w).view(b, h, w)
        best = torch.full((len(flat),), math.inf)  # |b|^2 - 2 q.b of the nearest entry found so far
        arg = torch.zeros(len(flat), dtype=torch.long)
        full = []
        for r in range(0, h, PRUNE_BLOCK):
            for c in range(0, w, PRUNE_BLOCK):
                idx = index[:, r : r + PRUNE_BLOCK, c : c + PRUNE_BLOCK].reshape(-1)
                sub_best, sub_arg = best[idx], arg[idx]
                rest = self._search_block(flat[idx], sub_best, sub_arg)
                best[idx], arg[idx] = sub_best, sub_arg
                full.append(idx[rest])
        far = torch.cat(full)
        if len(far):
            sub_best, sub_arg = best[far], arg[far]
            self._search_all(flat[far], sub_best, sub_arg, bf16)
            best[far], arg[far] = sub_best, sub_arg
        # the distance to the entry found, computed directly (the expansion |q|^2 + |b|^2 - 2 q.b is accurate
        # enough to choose the entry, not to give its distance to a few digits: the positions' norms are big)
        return (flat - self.bank[arg]).pow(2).sum(1).sqrt().view(b, h, w)

    def _search_all(
        self, q: torch.Tensor, best: torch.Tensor, arg: torch.Tensor, bf16: bool, chunk: int = 256
    ) -> None:
        """Every entry for the queries ``q`` (in their order, ``chunk`` at a time), lowering ``best`` and
        ``arg`` in place. ``bf16``: each query's ``RERANK`` nearest candidates are picked in bfloat16, with
        the positions of the chunk and of the bank centred on the chunk's mean position (the queries come
        block by block, so near entries keep small position values and their precision; the positions'
        squared norms, up to 2 x weight^2, are beyond bfloat16's resolution), then their distances are
        computed in float32."""
        nf = self._n_feat
        if bf16 and self._bank16 is None:
            self._bank16 = (self.bank.to(torch.bfloat16), self._bank_sq.to(torch.bfloat16))
        bank16 = self._bank16[0].clone() if bf16 else None  # its position columns move with each chunk
        places = self.bank[:, nf:]
        for s in range(0, len(q), chunk):
            qc, part = q[s : s + chunk], slice(s, s + chunk)
            if bank16 is None:
                sub_best, sub_arg = best[part], arg[part]
                self._search_span(qc, 0, len(self.bank), sub_best, sub_arg)
                best[part], arg[part] = sub_best, sub_arg
                continue
            centre = qc[:, nf:].mean(0)
            bank16[:, nf:] = (places - centre).to(torch.bfloat16)
            q16 = qc.to(torch.bfloat16)
            q16[:, nf:] = (qc[:, nf:] - centre).to(torch.bfloat16)
            # |b - (0, centre)|^2 from the cached |b|^2: |p - c|^2 - |p|^2 = |c|^2 - 2 p.c
            sq16 = (self._bank_sq - 2 * (places @ centre) + centre @ centre).to(torch.bfloat16)
            approx = torch.addmm(sq16, q16, bank16.T, alpha=-2)
            cand = approx.topk(min(RERANK, len(self.bank)), dim=1, largest=False)
            d2 = ((self.bank[cand.indices] - qc.unsqueeze(1)) ** 2).sum(-1)  # exact, float32
            vals, pick = d2.min(dim=1)
            vals = vals - (qc**2).sum(1)  # in the units of ``best``: |b|^2 - 2 q.b
            better = vals < best[part]
            best[part] = torch.where(better, vals, best[part])
            arg[part] = torch.where(better, cand.indices.gather(1, pick[:, None]).squeeze(1), arg[part])

    def _search_block(self, q: torch.Tensor, best: torch.Tensor, arg: torch.Tensor) -> torch.Tensor:
        """Searches one block's queries (n, D + 2) as :meth:`_pruned_scores` says, lowering ``best`` and
        ``arg`` in place; returns the (local) indices of the queries left to the search of the whole bank."""
        nf, last = self._n_feat, PRUNE_CELLS - 1
        lo, hi = q[:, nf:].min(0).values.tolist(), q[:, nf:].max(0).values.tolist()
        x0, x1 = self._cell_range(lo[0], hi[0], 0.0)
        y0, y1 = self._cell_range(lo[1], hi[1], 0.0)
        inner = (max(x0 - 1, 0), min(x1 + 1, last), max(y0 - 1, 0), min(y1 + 1, last))
        self._search_cells(q, inner, best, arg)
        bound = (best + (q**2).sum(1)).clamp_min(0).sqrt()
        finite = bound[torch.isfinite(bound)]
        if len(finite):
            wide = bound > PRUNE_WIDE * float(finite.median())
        else:  # no entry around the block: every query searches everywhere
            wide = torch.ones(len(q), dtype=torch.bool)
        rest = []
        for group in (~wide, wide):
            idx = group.nonzero().squeeze(1)
            if not len(idx):
                continue
            # the bound comes from |q|^2 + |b|^2 - 2 q.b, which loses digits to the positions' large norms
            radius = float(bound[idx].max()) * 1.001 + 1e-2
            outer = (0, last, 0, last)
            if math.isfinite(radius):
                outer = (*self._cell_range(lo[0], hi[0], radius), *self._cell_range(lo[1], hi[1], radius))
            if (outer[1] - outer[0] + 1) * (outer[3] - outer[2] + 1) > PRUNE_FULL * PRUNE_CELLS**2:
                rest.append(idx)
                continue
            sub_best, sub_arg = best[idx], arg[idx]
            for rect in _rectangles_outside(outer, inner):
                self._search_cells(q[idx], rect, sub_best, sub_arg)
            best[idx], arg[idx] = sub_best, sub_arg
        return torch.cat(rest) if rest else torch.zeros(0, dtype=torch.long)

    def _search_cells(
        self, q: torch.Tensor, rect: tuple[int, int, int, int], best: torch.Tensor, arg: torch.Tensor
    ) -> None:
        """Lowers ``best`` (|b|^2 - 2 q.b of the nearest entry so far) and ``arg`` (its index) in place with
        the entries of the cells ``rect`` = (first column, last column, first row, last row)."""
        x0, x1, y0, y1 = rect
        if x0 > x1 or y0 > y1:
            return
        n, start = PRUNE_CELLS, self._cell_start
        if x0 == 0 and x1 == n - 1:  # whole rows of cells: one slice
            self._search_span(q, start[y0 * n], start[(y1 + 1) * n], best, arg)
            return
        for y in range(y0, y1 + 1):
            self._search_span(q, start[y * n + x0], start[y * n + x1 + 1], best, arg)

    def _search_span(self, q: torch.Tensor, a: int, e: int, best: torch.Tensor, arg: torch.Tensor) -> None:
        """:meth:`_search_cells` for the entries ``a`` .. ``e`` - 1 of the bank."""
        if e > a:
            vals, idx = torch.addmm(self._bank_sq[a:e], q, self.bank[a:e].T, alpha=-2).min(dim=1)
            better = vals < best
            torch.where(better, vals, best, out=best)
            torch.where(better, idx + a, arg, out=arg)

    def inspected_maps(
        self, feats: torch.Tensor, out_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inner, maps): the blurred anomaly maps (B, S, S) of the whole image, and their inspected part (the
        image less the border band, :meth:`inspected_box`) flattened (B, n), from which the image score comes:
        the nearest-neighbour search, done once per image. The band is left out of the score (defect-free
        tiles' maxima sit on their edges) but not out of the map, which localises a defect in the band too
        (magnetic-tile validation pixel AUROC 0.859 with it, 0.584 zeroed; docs/manufacturing.md)."""
        patch = self.patch_scores(feats)
        size = out_size or self.config.image_size
        maps = F.interpolate(patch.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
        maps = gaussian_blur(maps.squeeze(1), self.config.blur_sigma)
        top, bottom = self.inspected_box(size)
        return maps[:, top:bottom, top:bottom].flatten(1), maps

    def inspected_box(self, size: int) -> tuple[int, int]:
        """First and past-the-end row (and column) of the inspected square of a ``size`` x ``size`` map: the
        image less the border band (the whole image without one)."""
        m = int(round(self.config.border * size))
        return (m, size - m) if m > 0 and 2 * m < size else (0, size)

    def image_stats(
        self, feats: torch.Tensor, out_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(maximum, level, maps): :func:`map_stats` of :meth:`inspected_maps` at the level quantile (the
        fitted term's, else the config's), and the maps."""
        inner, maps = self.inspected_maps(feats, out_size)
        q = self.level[0] if self.level is not None else self.config.level_quantile
        return (*map_stats(inner, q), maps)

    def combine(self, peak: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """Image scores from :meth:`image_stats`: the maximum, plus the level term once fitted."""
        if self.level is None:
            return peak
        _, w, offset = self.level
        return peak + w * (level - offset)

    def fit_level(self, peak: torch.Tensor, level: torch.Tensor) -> None:
        """Fit the level term on held-out good images' :meth:`image_stats`: ``w = std(max) / std(level)``, so
        the score is (up to a constant) the sum of both statistics' z-scores on good images: a small defect
        raises the maximum, a diffuse one (uneven surface, a large break) the whole map. Without a
        ``level_quantile`` or with fewer than 3 images the score stays the maximum."""
        self.level = None
        q = self.config.level_quantile
        if q <= 0 or peak.numel() < 3:
            return
        sd_level = float(level.double().std())
        if not sd_level > 1e-12:
            return
        self.level = (q, float(peak.double().std()) / sd_level, float(level.double().mean()))

    def image_score(self) -> dict[str, float | None]:
        """How :meth:`combine` scores an image (for the line listing)."""
        if self.level is None:
            return {"level_quantile": 0.0, "level_weight": None, "level_offset": None}
        q, w, offset = self.level
        return {"level_quantile": q, "level_weight": w, "level_offset": offset}

    def score(self, feats: torch.Tensor, out_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (B,) (:meth:`combine` of :meth:`image_stats`, from the inspected part of each map) and
        the maps (B, S, S) of the whole image."""
        peak, level, maps = self.image_stats(feats, out_size)
        return self.combine(peak, level), maps


def map_stats(inner: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(maximum, level) of each inspected map (B, n): the level is its ``quantile`` (the maximum when 0)."""
    peak = inner.max(dim=1).values
    return peak, (torch.quantile(inner, quantile, dim=1) if quantile > 0 else peak)


BF16_MIN_BANK = 8192  # banks from this size on search candidates in bfloat16 where that is faster
RERANK = 8  # bfloat16 candidates per patch whose distance is then computed exactly
PRUNE_CELLS = 32  # cells per side of the position grid a bank with positions is sorted by
PRUNE_BLOCK = 4  # side of the query blocks (patches) of the pruned search
PRUNE_WIDE = 1.5  # queries bounded above this x the block's median bound are searched in a group of their own
PRUNE_FULL = 0.5  # queries whose search would cover more of the grid than this search the whole bank instead


def _rectangles_outside(
    outer: tuple[int, int, int, int], inner: tuple[int, int, int, int]
) -> list[tuple[int, int, int, int]]:
    """The cells of the rectangle ``outer`` that are not in ``inner`` (each (x0, x1, y0, y1), inclusive) as up
    to four rectangles: the rows above and below ``inner``, then the columns left and right of it."""
    ox0, ox1, oy0, oy1 = outer
    ix0, ix1, iy0, iy1 = inner
    mid0, mid1 = max(oy0, iy0), min(oy1, iy1)
    return [
        (ox0, ox1, oy0, min(oy1, iy0 - 1)),
        (ox0, ox1, max(oy0, iy1 + 1), oy1),
        (ox0, min(ox1, ix0 - 1), mid0, mid1),
        (max(ox0, ix1 + 1), ox1, mid0, mid1),
    ]


@functools.cache
def bf16_matmul_is_faster() -> bool:
    """Whether this CPU multiplies bfloat16 matrices at least 1.3x faster than float32 (timed once per process
    on a bank-search-sized product; CPUs without native bfloat16 emulate it, slowly)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 144, generator=g), torch.randn(144, 8192, generator=g)

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            torch.mm(x, y)
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(a.bfloat16(), b.bfloat16()) * 1.3 < best(a, b)


def build_bank(
    feats: torch.Tensor, config: PatchCoreConfig, progress: ProgressFn | None = None
) -> torch.Tensor:
    """(N, h, w, D) features of defect-free images -> coreset memory bank (M, D)."""
    flat = feats.reshape(-1, feats.shape[-1]).float()
    g = torch.Generator().manual_seed(config.seed)
    if flat.shape[0] > config.max_bank_input:
        flat = flat[torch.randperm(flat.shape[0], generator=g)[: config.max_bank_input]]
    n = min(config.coreset_max, max(1, int(round(config.coreset_ratio * flat.shape[0]))))
    idx = greedy_coreset(flat, n, config.coreset_projection, config.seed, progress)
    return flat[idx].clone()


def auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve (ties count one half); NaN if only one class is present."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks for ties
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def calibrate(
    good_scores: torch.Tensor,
    quantile: float,
    defect_scores: torch.Tensor | None = None,
) -> Calibration:
    """Pass/fail threshold from held-out good scores: ``max(quantile, mean + 3 std)`` (the second term keeps
    a handful of calibration images from giving a threshold at their own maximum). With labelled defects,
    the candidate (held-out scores and that value) with the best balanced accuracy is chosen instead."""
    good = good_scores.double()
    if good.numel() > 1:
        q_thr = max(float(torch.quantile(good, quantile)), float(good.mean() + 3.0 * good.std()))
    else:
        q_thr = float(good.max()) * 1.25
    method = f"max(quantile_{quantile:g}, mean+3std)_of_held_out_good"
    thr = q_thr
    n_def = 0
    auc = None
    recall = None
    if defect_scores is not None and defect_scores.numel() > 0:
        bad = defect_scores.double()
        n_def = int(bad.numel())
        auc = auroc([0] * good.numel() + [1] * n_def, torch.cat([good, bad]).numpy())
        candidates = torch.cat([good, bad, torch.tensor([q_thr], dtype=torch.float64)]).unique()
        best = -1.0
        for c in candidates.tolist():
            bal = 0.5 * float((good <= c).double().mean()) + 0.5 * float((bad > c).double().mean())
            if bal > best + 1e-12:
                best, thr = bal, c
        method = "balanced_accuracy_on_held_out_good_and_labelled_defects"
        recall = float((bad > thr).double().mean())
    return Calibration(
        threshold=float(thr),
        method=method,
        n_good=int(good.numel()),
        good_mean=float(good.mean()),
        good_std=float(good.std()) if good.numel() > 1 else 0.0,
        good_max=float(good.max()),
        n_defect=n_def,
        defect_auroc=auc,
        expected_false_reject_rate=float((good > thr).double().mean()),
        defect_recall=recall,
    )
