"""Latency per study (with / without the uncertainty passes) and DynamicBatcher throughput.

    python -m benchmarks.medical_imaging [--repeats 7] [--requests 64]

Threads: ``--threads`` (default 1 = the service's default; on the shared 2-core machine 2 threads were
~50x slower from oversubscription). Uses the newest artifacts in MODEL_DIR and real studies from
DATA_DIR: a PneumoniaMNIST test image as PNG (2-D model) and the 20-slice CT DICOM series as a zip
(3-D model). Latency is the whole study path (decode, preprocess, inference, report) in one thread.
Throughput: ``--requests`` concurrent 2-D studies (prepared tensors, single pass) through
``backbone.serving.DynamicBatcher`` with ``max_batch_size`` 16
(batched) vs 1 (unbatched). Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import time
import zipfile
from pathlib import Path

import numpy as np
from backbone.service.config import default_data_dir, default_model_dir
from backbone.serving import DynamicBatcher
from PIL import Image

from benchmarks.common import emit, progress, setup, time_ms
from services.medical_imaging.app.api.routes import diagnose_sync
from services.medical_imaging.app.core.config import Settings
from services.medical_imaging.app.inputs import load_study
from services.medical_imaging.app.model import ImagingModel, InferItem, load_model
from services.medical_imaging.app.schemas import DiagnoseOptions


def _studies(data_dir: Path) -> dict[str, list[tuple[str, bytes]]]:
    npz = data_dir / "pneumoniamnist" / "pneumoniamnist_reconstructed.npz"
    if not npz.is_file():
        npz = data_dir / "pneumoniamnist" / "pneumoniamnist.npz"
    with np.load(npz) as z:
        img = z["test_images"][0]
    png = io.BytesIO()
    Image.fromarray(img).save(png, format="PNG")
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted((data_dir / "ct_examples" / "example_ct_dicom").iterdir()):
            zf.write(p, p.name)
    return {"cxr_2d": [("cxr.png", png.getvalue())], "ct_3d": [("ct.zip", zipped.getvalue())]}


async def _throughput(model: ImagingModel, item: InferItem, n: int, max_batch: int) -> float:
    batcher: DynamicBatcher[InferItem, object] = DynamicBatcher(
        model.infer_batch,
        max_batch_size=max_batch,
        max_wait_ms=5.0,
        max_queue_size=4 * n,
        name=f"bench{max_batch}",
    )
    async with batcher:
        await asyncio.gather(*(batcher.submit(item) for _ in range(4)))  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(batcher.submit(item) for _ in range(n)))
        return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the service's TORCH_THREADS)")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("DATA_DIR", default_data_dir())))
    parser.add_argument(
        "--model-dir", type=Path, default=Path(os.environ.get("MODEL_DIR", default_model_dir()))
    )
    args = parser.parse_args(argv)
    setup(threads=args.threads)
    settings = Settings(model_dir=args.model_dir, data_dir=args.data_dir, torch_threads=args.threads)
    model = load_model(settings)
    progress(f"loaded {model.info.name} {model.info.version}")
    studies = _studies(args.data_dir)
    p50: dict[str, float] = {}
    p99: dict[str, float] = {}
    for key, files in studies.items():
        for label, opts in (
            ("single_pass", DiagnoseOptions(uncertainty=False)),
            ("uncertainty", DiagnoseOptions()),
        ):
            name = f"{key}_{label}"
            progress(f"latency {name}")
            t = time_ms(
                lambda f=files, o=opts: diagnose_sync(model, settings, f, o, "bench"),
                repeats=args.repeats,
                warmup=1,
            )
            p50[name], p99[name] = round(t["median"], 2), round(t["p99"], 2)
    study = load_study(studies["cxr_2d"])
    net, tensor, _ = model.prepare(study, DiagnoseOptions(uncertainty=False))
    item = InferItem(net.key, tensor, 1, 1)
    progress(f"throughput: {args.requests} concurrent 2-D studies, batched vs unbatched")
    batched = asyncio.run(_throughput(model, item, args.requests, settings.batch_max_size))
    unbatched = asyncio.run(_throughput(model, item, args.requests, 1))
    emit(
        {
            "benchmark": "medical_imaging",
            "model": model.info.name,
            "version": model.info.version,
            "threads": args.threads,
            "mc_samples": settings.mc_samples,
            "tta_views": settings.tta_views,
            "p50_ms": p50,
            "p99_ms": p99,
            "batched_rps": round(batched, 2),
            "unbatched_rps": round(unbatched, 2),
            "batch_max_size": settings.batch_max_size,
            "requests": args.requests,
            "repeats": args.repeats,
        }
    )


if __name__ == "__main__":
    main()
