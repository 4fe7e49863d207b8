"""Self-supervised training of the anomaly detector's base model on defect-free tiles only.

The U-Net (``services.manufacturing.app.anomaly_net``) learns to segment synthetic anomalies
(``services.manufacturing.app.synthetic``) pasted into ``train_good`` tiles: focal + soft-dice loss on random
crops, AdamW with a cosine schedule, a fixed number of steps (no real defect image is ever used, so there is
nothing to early-stop on). Saved as the artifact ``anomaly_base_model`` (safetensors + JSON); PatchCore banks
(the tile line and every registered line) are built on it, frozen.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from backbone.artifacts import Artifact, list_artifacts, save_artifact
from tqdm import tqdm

from pipelines.manufacturing.common import BASE, DOMAIN, Preset
from pipelines.manufacturing.data import MT_SPLIT_FILE, load_mt, mt_split
from services.manufacturing.app.anomaly_net import AnomalySegNet, SegNetConfig, standardize
from services.manufacturing.app.synthetic import synthesize


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (mean over pixels) + soft Dice over the batch's anomalous pixels."""
    bce = F.binary_cross_entropy_with_logits(logits, masks, reduction="none")
    p = torch.sigmoid(logits)
    pt = p * masks + (1 - p) * (1 - masks)
    focal = ((1 - pt) ** gamma * bce).mean()
    if float(masks.sum()) == 0:
        return focal
    dice = 1 - (2 * (p * masks).sum() + 1) / (p.sum() + masks.sum() + 1)
    return focal + dice


def random_crops(x: torch.Tensor, m: torch.Tensor, size: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """The same random ``size`` x ``size`` crop of each image and mask (no crop if ``size`` >= the image)."""
    s = x.shape[-1]
    if size >= s:
        return x, m
    ys = torch.randint(s - size + 1, (x.shape[0],), generator=g)
    xs = torch.randint(s - size + 1, (x.shape[0],), generator=g)
    boxes = list(enumerate(zip(ys.tolist(), xs.tolist(), strict=True)))
    xc = torch.stack([x[i, :, y : y + size, c : c + size] for i, (y, c) in boxes])
    mc = torch.stack([m[i, :, y : y + size, c : c + size] for i, (y, c) in boxes])
    return xc, mc


def train_segnet(net: AnomalySegNet, x: torch.Tensor, preset: Preset, seed: int = 0,
                 progress: bool = True) -> dict:
    """Train ``net`` in place on standardised good images ``x`` (N, 1, S, S) with synthetic anomalies."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    steps, bs = preset.base_steps, preset.base_batch
    opt = torch.optim.AdamW(net.parameters(), lr=preset.base_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(  # 5 % warm-up (at least 3 steps), then cosine
        opt, max_lr=preset.base_lr, total_steps=max(steps, 4), pct_start=max(0.05, 3.0 / max(steps, 4)))
    net.train()
    t0 = time.perf_counter()
    losses: list[float] = []
    bar = tqdm(range(steps), desc="anomaly base", disable=not progress, mininterval=5.0)
    for _ in bar:
        idx = torch.randint(x.shape[0], (bs,), generator=g)
        xb = x[idx]
        flip = torch.rand(bs, generator=g) < 0.5
        xb[flip] = xb[flip].flip(-1)
        flip = torch.rand(bs, generator=g) < 0.5
        xb[flip] = xb[flip].flip(-2)
        xa, m = synthesize(xb, g, p_anomaly=0.5, kinds=tuple(preset.base_kinds))
        xa, m = random_crops(xa, m, preset.base_crop, g)
        loss = segmentation_loss(net(xa), m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}", refresh=False)
    net.eval()
    return {"train_seconds": round(time.perf_counter() - t0, 1), "steps": steps,
            "final_loss": sum(losses[-100:]) / max(1, len(losses[-100:]))}


def base_recipe(preset: Preset, n_train_images: int) -> dict[str, Any]:
    """What a base model artifact records of how it was trained, besides its seed: two artifacts with the
    same recipe differ only by the seed."""
    cfg = SegNetConfig(channels=tuple(preset.base_channels), image_size=preset.anomaly_image_size)
    return {"model": cfg.to_dict(), "dataset": "magnetic_tile", "split_file": MT_SPLIT_FILE.name,
            "train_part": "train_good", "n_train_images": n_train_images, "steps": preset.base_steps,
            "batch": preset.base_batch, "crop": preset.base_crop, "lr": preset.base_lr,
            "kinds": list(preset.base_kinds)}  # fmt: skip


def train_anomaly_base(
    preset: Preset, data_dir: Path, model_dir: Path, seed: int, progress: bool
) -> Artifact:
    """Train the base network on the kept split's ``train_good`` tiles and save it."""
    split = mt_split(data_dir)
    files = split["train_good"][: preset.anomaly_train_limit or None]
    recipe = base_recipe(preset, len(files))
    cfg = SegNetConfig.from_dict(recipe["model"])
    x, _ = load_mt(data_dir, files, cfg.image_size)
    net = AnomalySegNet(cfg)
    info = train_segnet(net, standardize(x), preset, seed, progress)
    print(f"anomaly base: {info['steps']} steps, loss {info['final_loss']:.4f} "
          f"({info['train_seconds']:.0f}s)", file=sys.stderr)
    return save_artifact(
        model_dir, DOMAIN, BASE,
        config={**recipe, "seed": seed},
        metrics=info,
        data_files=[data_dir / "magnetic_tile" / f for f in files],
        tensors=net.state_dict(),
    )


def base_models_for(
    preset: Preset, data_dir: Path, model_dir: Path, seed: int, progress: bool
) -> list[Artifact]:
    """The tile detector's base models: for each seed ``seed``, ``seed + 1``, ... (``preset.anomaly_bases``)
    the newest artifact in ``model_dir`` of this preset's recipe and that seed, trained now if none is."""
    n_train = len(mt_split(data_dir)["train_good"][: preset.anomaly_train_limit or None])
    recipe = base_recipe(preset, n_train)
    found = {}
    for art in list_artifacts(model_dir, DOMAIN, BASE):  # oldest first: the newest of a seed wins
        cfg = art.config
        if {k: cfg.get(k) for k in recipe} == recipe:
            found[cfg.get("seed")] = art
    return [found.get(s) or train_anomaly_base(preset, data_dir, model_dir, s, progress)
            for s in range(seed, seed + preset.anomaly_bases)]  # fmt: skip
