"""Forecasting service speed: one-request latency and throughput with / without the DynamicBatcher.

    python -m benchmarks.forecasting [--model-dir DIR] [--name ETTh1_h96] [--requests 200] [--concurrency 32]

Requests go through the real FastAPI app in-process (httpx ASGI transport: JSON parsing, validation,
regularisation, model, calibrated quantiles), each a 512 x 7 ETTh1 history with horizon 96. Latency:
sequential requests (p50 / p99). Throughput: ``--concurrency`` concurrent clients, once with the app's
DynamicBatcher and once calling the model per request. Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

import httpx
import pandas as pd

from benchmarks.common import emit, progress, setup
from services.forecasting.app.core.config import Settings
from services.forecasting.app.main import create_app

REPO = Path(__file__).resolve().parents[1]


def _payload(data_dir: Path, history: int, horizon: int) -> dict[str, object]:
    df = pd.read_csv(data_dir / "ett" / "ETTh1.csv").iloc[11520 - history : 11520]
    return {
        "timestamps": df["date"].tolist(),
        "series": {c: df[c].astype(float).tolist() for c in df.columns[1:]},
        "horizon": horizon,
        "quantiles": [0.05, 0.5, 0.95],
    }


async def _run(args: argparse.Namespace) -> dict[str, object]:
    settings = Settings(
        model_dir=args.model_dir, default_model=args.name, log_level="WARNING", kafka_bootstrap_servers=None
    )
    app = create_app(settings)
    body = _payload(settings.data_dir, args.history, args.horizon)
    async with app.router.lifespan_context(app):
        model = app.state.runtime.require_model().get(args.name)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=120) as client:

            async def one() -> float:
                t0 = time.perf_counter()
                r = await client.post("/v1/forecast", json=body)
                if r.status_code != 200:
                    raise RuntimeError(f"forecast failed: {r.status_code} {r.text[:200]}")
                return (time.perf_counter() - t0) * 1000

            for _ in range(3):
                await one()
            progress(f"latency: {args.latency_requests} sequential requests")
            lat = sorted([await one() for _ in range(args.latency_requests)])
            p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]

            async def throughput() -> float:
                queue = list(range(args.requests))

                async def worker() -> None:
                    while queue:
                        queue.pop()
                        await one()

                t0 = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(args.concurrency)))
                return args.requests / (time.perf_counter() - t0)

            progress(f"batched: {args.requests} requests, concurrency {args.concurrency}")
            batched = await throughput()
            batcher = app.state.batcher
            stats = {"batches": batcher.batches, "served": batcher.served}
            app.state.batcher = None  # the route then calls the model per request
            progress(f"unbatched: {args.requests} requests, concurrency {args.concurrency}")
            unbatched = await throughput()
            app.state.batcher = batcher
    return {
        "benchmark": "forecasting",
        "model": args.name,
        "family": model.family,
        "version": model.artifact.version,
        "history": args.history,
        "variables": 7,
        "horizon": args.horizon,
        "p50_ms": round(statistics.median(lat), 2),
        "p99_ms": round(p99, 2),
        "batched_rps": round(batched, 2),
        "unbatched_rps": round(unbatched, 2),
        "concurrency": args.concurrency,
        "mean_batch_size": round(stats["served"] / max(stats["batches"], 1), 2),
        "torch_threads": 2,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path(os.environ.get("MODEL_DIR", REPO / "models")))
    p.add_argument("--name", default="ETTh1_h96")
    p.add_argument("--history", type=int, default=512)
    p.add_argument("--horizon", type=int, default=96)
    p.add_argument("--latency-requests", type=int, default=100)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=32)
    args = p.parse_args()
    setup()
    emit(asyncio.run(_run(args)))


if __name__ == "__main__":
    main()
