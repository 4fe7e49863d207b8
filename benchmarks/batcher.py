"""DynamicBatcher throughput: a backbone encoder behind the batcher, 32 concurrent async callers.

Same model, same callers, same request count; candidate ``max_batch_size=32`` vs baseline ``max_batch_size=1``
(every request its own forward). Each caller submits its requests one after another (closed loop) and
records the latency of every request. Baseline and candidate alternate for ``--rounds`` rounds (the machine is
shared); throughput is the median over rounds, latency percentiles pool all requests. Target: speedup >= 3.

    python -m benchmarks.batcher [--model seq_moe_tiny] [--requests-per-caller 16] [--rounds 3]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch
from backbone.registry import create_model
from backbone.serving import DynamicBatcher
from prometheus_client import CollectorRegistry

from benchmarks.common import emit, progress, setup

CALLERS = 32


def make_process(model: torch.nn.Module):
    """process_batch: stack the requests' sequences, one forward, one pooled vector per request."""

    def process(items: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode():
            return list(model(torch.stack(items)).pooled.unbind(0))

    return process


async def load_test(
    batcher: DynamicBatcher, inputs: list[torch.Tensor], per_caller: int, latencies: list[float]
) -> dict[str, float]:
    """One closed-loop run; appends per-request latencies (ms) to ``latencies``."""
    start = len(latencies)

    async def caller(c: int) -> None:
        for i in range(per_caller):
            t0 = time.perf_counter()
            await batcher.submit(inputs[(c * per_caller + i) % len(inputs)])
            latencies.append((time.perf_counter() - t0) * 1e3)

    async with batcher:
        await asyncio.gather(*(batcher.submit(x) for x in inputs[:CALLERS]))  # warm-up
        batches0, served0 = batcher.batches, batcher.served
        t0 = time.perf_counter()
        await asyncio.gather(*(caller(c) for c in range(CALLERS)))
        elapsed = time.perf_counter() - t0
        batches, served = batcher.batches - batches0, batcher.served - served0
    return {"throughput": (len(latencies) - start) / elapsed, "batches": batches, "served": served}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="seq_moe_tiny")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--requests-per-caller", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    setup()
    model = create_model(args.model).eval()
    in_features = model.cfg.in_features
    inputs = [torch.randn(args.seq_len, in_features) for _ in range(256)]
    total = CALLERS * args.requests_per_caller
    progress(f"{args.model}: {CALLERS} callers x {args.requests_per_caller} requests, "
             f"input {args.seq_len}x{in_features}")

    registry = CollectorRegistry()
    process = make_process(model)
    modes = {"unbatched": 1, "batched": CALLERS}
    throughput: dict[str, list[float]] = {m: [] for m in modes}
    latencies: dict[str, list[float]] = {m: [] for m in modes}
    batch_sizes: dict[str, list[float]] = {m: [] for m in modes}
    for rnd in range(args.rounds):
        for label, max_batch in modes.items():
            batcher = DynamicBatcher(
                process, max_batch_size=max_batch, max_wait_ms=2.0, max_queue_size=4 * CALLERS,
                request_timeout_s=120.0, name=label, registry=registry,
            )
            r = asyncio.run(load_test(batcher, inputs, args.requests_per_caller, latencies[label]))
            throughput[label].append(r["throughput"])
            batch_sizes[label].append(r["served"] / r["batches"])
            progress(f"round {rnd + 1}/{args.rounds} {label}: {r['throughput']:.1f} req/s, "
                     f"mean batch {batch_sizes[label][-1]:.1f}")

    tp = {m: statistics.median(v) for m, v in throughput.items()}
    b, u = latencies["batched"], latencies["unbatched"]
    speedup = tp["batched"] / tp["unbatched"]
    emit({
        "benchmark": "batcher",
        "model": args.model,
        "callers": CALLERS,
        "requests_per_round": total,
        "rounds": args.rounds,
        "throughput_batched": round(tp["batched"], 1),
        "throughput_unbatched": round(tp["unbatched"], 1),
        "speedup": round(speedup, 2),
        "p50_ms_batched": round(percentile(b, 0.5), 2),
        "p50_ms_unbatched": round(percentile(u, 0.5), 2),
        "p99_ms_batched": round(percentile(b, 0.99), 2),
        "p99_ms_unbatched": round(percentile(u, 0.99), 2),
        "mean_batch_size": round(statistics.mean(batch_sizes["batched"]), 2),
        "target_speedup_ge_3": speedup >= 3,
    })


if __name__ == "__main__":
    main()
