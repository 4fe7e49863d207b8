"""Synthetic surface anomalies made from defect-free images only (self-supervised training of the base model).

Every generator takes per-image standardised grey images (B, 1, S, S) and returns the altered images and their
{0, 1} masks. Kinds (DRAEM / NSA / CutPaste-style, sized for tile defects):

* ``texture``: an irregular band-limited-noise region (Perlin-like: low-resolution noise, bicubic upsampled,
  thresholded, cut to a random ellipse) filled with a shifted / flipped patch of another good image, blended.
* ``intensity``: the same kind of region made darker or brighter with a soft edge (uneven surfaces).
* ``stroke``: a thin random curve, dark (sometimes bright), 0.5-2 px wide (cracks); a short wide one is a
  small round pit (blowholes).
* ``edge``: an irregular region touching the top or bottom edge replaced by dark background (breaks, frays).
  Not in the default ``KINDS``: defect-free tiles have dark curved ends of their own, and the first base model
  trained with it flagged them.

Nothing here looks at a real defect image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ALL_KINDS: tuple[str, ...] = ("texture", "intensity", "stroke", "edge")
KINDS: tuple[str, ...] = ("texture", "intensity", "stroke")  # the default mix


def _u(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(1, generator=g))


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    return ys, xs


def noise_field(size: int, res: int, g: torch.Generator) -> torch.Tensor:
    """Smooth random field (size, size) of unit-ish variance: ``res`` x ``res`` noise, bicubic upsampled."""
    n = torch.randn(1, 1, res + 1, res + 1, generator=g)
    return F.interpolate(n, size=(size, size), mode="bicubic", align_corners=True)[0, 0]


def blob_mask(size: int, g: torch.Generator, min_r: float = 2.0, max_frac: float = 0.35,
              center: tuple[float, float] | None = None) -> torch.Tensor:
    """Irregular region (size, size) in {0, 1}: a thresholded noise field cut to a random ellipse."""
    ys, xs = _grid(size)
    for _ in range(8):
        r = math.exp(_u(g, math.log(min_r), math.log(max(min_r + 1, max_frac * size))))
        ry, rx = r * _u(g, 0.5, 1.5), r * _u(g, 0.5, 1.5)
        cy, cx = center if center is not None else (_u(g, 0, size - 1), _u(g, 0, size - 1))
        ell = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2
        res = int(2 ** int(_u(g, 1, 5)))
        field = noise_field(size, res, g) - 0.6 * ell  # noisy ellipse: irregular boundary
        mask = (field > _u(g, -0.6, 0.0)) & (ell < 1.0)
        if int(mask.sum()) >= 3:
            return mask.float()
    return ((ys - size / 2) ** 2 + (xs - size / 2) ** 2 < min_r**2).float()


def stroke(size: int, g: torch.Generator, long: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A random curve's soft profile (size, size) in [0, 1] and its mask: long and thin (crack) or a short,
    wider dot (pit)."""
    ys, xs = _grid(size)
    if long:
        length, width = _u(g, 0.08, 0.5) * size, _u(g, 0.35, 1.0) * size / 128
    else:
        length, width = _u(g, 0.0, 0.03) * size, _u(g, 0.8, 3.0) * size / 128
    n = max(2, int(length))
    y, x = _u(g, 0.05, 0.95) * size, _u(g, 0.05, 0.95) * size
    ang = _u(g, 0, 2 * math.pi)
    turn = _u(g, 0.0, 0.35)
    pts = []
    step = length / n
    for _ in range(n):
        pts.append((y, x))
        ang += turn * float(torch.randn(1, generator=g))
        y, x = y + step * math.sin(ang), x + step * math.cos(ang)
    p = torch.tensor(pts)
    d2 = ((ys[..., None] - p[:, 0]) ** 2 + (xs[..., None] - p[:, 1]) ** 2).min(dim=-1).values
    width = max(width, 0.3)
    profile = torch.exp(-d2 / (2 * width**2))
    mask = (d2 <= (width + 0.5) ** 2).float()
    return profile, mask


def synthesize(x: torch.Tensor, g: torch.Generator, p_anomaly: float = 0.5,
               kinds: tuple[str, ...] = KINDS) -> tuple[torch.Tensor, torch.Tensor]:
    """Add one synthetic anomaly (a random kind) to each image with probability ``p_anomaly``.

    ``x``: (B, 1, S, S) per-image standardised images. Returns (images, masks (B, 1, S, S) in {0, 1})."""
    b, _, s, _ = x.shape
    out = x.clone()
    masks = torch.zeros_like(x)
    for i in range(b):
        if float(torch.rand(1, generator=g)) >= p_anomaly:
            continue
        kind = kinds[int(torch.randint(len(kinds), (1,), generator=g))]
        img = out[i, 0]
        if kind == "texture":
            m = blob_mask(s, g)
            src = x[int(torch.randint(b, (1,), generator=g)), 0]
            if float(torch.rand(1, generator=g)) < 0.5:
                src = src.flip(-1)
            src = torch.roll(src, (int(torch.randint(s, (1,), generator=g)), int(torch.randint(s, (1,),
                                                                                               generator=g))),
                             (0, 1))
            src = src.transpose(0, 1) if float(torch.rand(1, generator=g)) < 0.5 else src
            src = src * _u(g, 0.6, 1.6) + _u(g, -1.0, 1.0)
            beta = _u(g, 0.5, 1.0)
            img = img * (1 - beta * m) + beta * m * src
        elif kind == "intensity":
            m = blob_mask(s, g, max_frac=0.5)
            soft = F.avg_pool2d(m[None, None], 5, 1, 2, count_include_pad=False)[0, 0]
            delta = _u(g, 0.6, 2.0) * (1 if float(torch.rand(1, generator=g)) < 0.3 else -1)
            img = img + delta * soft * (1 + 0.3 * noise_field(s, 8, g))
            m = (soft > 0.5).float()
        elif kind == "stroke":
            long = float(torch.rand(1, generator=g)) < 0.6
            prof, m = stroke(s, g, long)
            sign = -1.0 if float(torch.rand(1, generator=g)) < 0.85 else 1.0
            img = img + sign * _u(g, 0.8, 3.0) * prof
        else:  # edge
            top = float(torch.rand(1, generator=g)) < 0.5
            m = blob_mask(s, g, min_r=3.0, max_frac=0.25, center=(0.0 if top else s - 1.0, _u(g, 0, s - 1)))
            dark = float(torch.quantile(img.flatten(), 0.01)) - _u(g, 0.0, 1.0)
            img = img * (1 - m) + m * (dark + 0.2 * torch.randn(s, s, generator=g))
        out[i, 0] = img
        masks[i, 0] = m
    return out, masks
