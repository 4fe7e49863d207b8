"""The anomaly detector's base model: a small U-Net trained from scratch to segment synthetic anomalies on
defect-free images (DRAEM's discriminative network without the reconstruction branch; NSA / CutPaste-style
self-supervision), and its PatchCore patch-feature extractor.

The network is trained once (``pipelines.manufacturing.train --task anomaly_base``) and then frozen: a
production line is a PatchCore memory bank of its good images' patch features on this network, so new lines
need no retraining. Patch features (``PatchCoreConfig.learned_parts``): ``dec`` = the decoder maps at strides
4 and 2, ``seg`` = the segmentation logit (max- and mean-pooled), pooled to the ``fb_stride`` grid, and
optionally ``fb`` = the fixed filter-bank channels on the same grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from backbone.artifacts import Artifact, verify_artifact
from torch import nn


@dataclass
class SegNetConfig:
    """Shape of the base network (stored in its artifact)."""

    channels: tuple[int, ...] = (16, 32, 64, 96)  # per level, strides 1, 2, 4, 8
    image_size: int = 128

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SegNetConfig:
        known = {f.name for f in fields(cls)}
        out = {k: v for k, v in d.items() if k in known}
        if "channels" in out:
            out["channels"] = tuple(out["channels"])
        return cls(**out)


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class AnomalySegNet(nn.Module):
    """U-Net: per-image standardised grey (B, 1, S, S) -> anomaly logits (B, 1, S, S) and decoder maps."""

    def __init__(self, cfg: SegNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.channels
        self.enc = nn.ModuleList([_block(1, c[0])] + [_block(c[i - 1], c[i], 2) for i in range(1, len(c))])
        self.dec = nn.ModuleList([_block(c[i + 1] + c[i], c[i]) for i in range(len(c) - 1)])
        self.head = nn.Conv2d(c[0], 1, 1)

    def forward_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits (B, 1, S, S) and decoder maps, finest first (strides 1, 2, 4, ...)."""
        skips = []
        for enc in self.enc:
            x = enc(x)
            skips.append(x)
        y = skips[-1]
        decoded: list[torch.Tensor] = []
        for i in range(len(self.dec) - 1, -1, -1):
            y = F.interpolate(y, size=skips[i].shape[-2:], mode="bilinear", align_corners=False)
            y = self.dec[i](torch.cat([y, skips[i]], dim=1))
            decoded.insert(0, y)
        return self.head(y), decoded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_maps(x)[0]


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Per-image zero mean / unit std (exposure invariance); greyscale."""
    x = x.float().mean(dim=1, keepdim=True)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) / x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)


class LearnedExtractor(nn.Module):
    """PatchCore patch features of one or more frozen base networks, on a stride-``fb_stride`` grid.

    ``parts``: ``dec`` (decoder maps at strides 2 and 4), ``seg`` (segmentation logit, max- and mean-pooled),
    ``fb`` (the fixed filter-bank channels: ``filterbank`` returns (B, h, w, C) on the same grid); with
    several networks (an ensemble of base models) each one's parts follow the previous one's, the filter
    bank's channels once per network (computed once); then PatchCore's local neighbourhood average
    (``patch_kernel``). Output (B, h, w, D)."""

    def __init__(self, nets: AnomalySegNet | Sequence[AnomalySegNet], stride: int, patch_kernel: int,
                 parts: tuple[str, ...], filterbank: nn.Module | None = None) -> None:
        super().__init__()
        self.nets = nn.ModuleList([nets] if isinstance(nets, AnomalySegNet) else list(nets)).eval()
        # NHWC weights: oneDNN's convolutions run 20-30 % faster on this CPU (the same features to ~4e-6;
        # docs/manufacturing.md, "Pruned search")
        self.nets.to(memory_format=torch.channels_last)
        self.stride = stride
        self.patch_kernel = patch_kernel
        self.parts = parts
        self.filterbank = filterbank

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        size = (-(-x.shape[-2] // s), -(-x.shape[-1] // s))
        z = standardize(x)
        fb = None
        if "fb" in self.parts and self.filterbank is not None:
            fb = self.filterbank(x).permute(0, 3, 1, 2)
        maps = []
        for net in self.nets:
            logits, decoded = net.forward_maps(z)
            if "dec" in self.parts:
                for f in decoded[1:3]:
                    maps.append(F.adaptive_avg_pool2d(f, size))
            if "seg" in self.parts:
                maps += [F.adaptive_max_pool2d(logits, size), F.adaptive_avg_pool2d(logits, size)]
            if fb is not None:
                maps.append(fb)
        f = torch.cat(maps, dim=1)
        k = self.patch_kernel
        if k > 1:
            f = F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False)
        return f.permute(0, 2, 3, 1).contiguous()


def load_base(artifact: Artifact) -> AnomalySegNet:
    """Rebuild the frozen base network from its artifact (safetensors weights, sha256-checked)."""
    verify_artifact(artifact)
    net = AnomalySegNet(SegNetConfig.from_dict(artifact.config["model"]))
    net.load_state_dict(artifact.load_tensors())
    return net.eval()
