"""Where a training epoch's time goes: one training step in float32 vs bf16 autocast, and each MONAI
augmentation per sample, for the full-preset model of a dataset.

    TORCH_THREADS=1 python -m pipelines.medical_imaging.profile_step --dataset pneumoniamnist
    TORCH_THREADS=1 python -m pipelines.medical_imaging.profile_step --dataset adrenalmnist3d

Prints one JSON line (milliseconds; median of ``--repeats`` steps after one warm-up step). The numbers
depend on the load of the machine; compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from backbone.registry import create_model
from backbone.service.config import default_data_dir
from monai.data import get_track_meta, set_track_meta

from pipelines.medical_imaging.data import load_npz, resolve_npz, train_transforms
from pipelines.medical_imaging.train import preset_values
from services.medical_imaging.app import networks  # noqa: F401


def step_ms(
    family: str, model_cfg: dict[str, Any], x: torch.Tensor, y: torch.Tensor, bf16: bool, repeats: int
) -> float:
    """Median wall time of forward + backward + AdamW step."""
    torch.manual_seed(0)
    model = create_model(family, **model_cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:  # the first step warms up the kernels
            times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 1)


def transform_ms(spatial_dims: int, sample: torch.Tensor, n: int = 100) -> dict[str, float]:
    """Per-sample cost of each training augmentation (forced to fire)."""
    out: dict[str, float] = {}
    transforms = [*train_transforms(spatial_dims).transforms]
    previous = get_track_meta()
    set_track_meta(False)
    try:
        for t in transforms:
            if hasattr(t, "prob"):
                t.prob = 1.0
            t0 = time.perf_counter()
            for _ in range(n):
                t(sample)
            name = type(t).__name__
            while name in out:
                name += "_"
            out[name] = round((time.perf_counter() - t0) * 1000 / n, 3)
    finally:
        set_track_meta(previous)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="pneumoniamnist")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("DATA_DIR", default_data_dir())))
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), int(os.environ.get("TORCH_THREADS", "1")))))
    data = load_npz(resolve_npz(args.data_dir, args.dataset), args.dataset)
    family = f"medical_hybrid_{data.spatial_dims}d"
    model_cfg = dict(preset_values("full", data.spatial_dims).get("model", {}))
    model_cfg.update(in_channels=data.in_channels, num_classes=data.num_classes, img_size=data.img_size)
    x = torch.from_numpy(data.images["train"][: args.batch_size])
    y = torch.from_numpy(data.labels["train"][: args.batch_size])
    result = {
        "dataset": args.dataset,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "step_ms_float32": step_ms(family, model_cfg, x, y, False, args.repeats),
        "step_ms_bf16_autocast": step_ms(family, model_cfg, x, y, True, args.repeats),
        "augment_ms_per_sample": transform_ms(data.spatial_dims, x[0]),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
