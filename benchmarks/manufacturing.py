"""Manufacturing inspection speed: classifier fp32 vs INT8 (static trunk + dynamic Linear) throughput,
inspections/s with and without the DynamicBatcher, the cost of switching production lines, and the tile
line's nearest-neighbour search: the pruned search of a bank with positions against reading every entry.

Uses the newest artifacts under MODEL_DIR (run ``python -m pipelines.manufacturing.train`` first) and real
NEU / magnetic-tile images from DATA_DIR.

    python -m benchmarks.manufacturing [--requests 64] [--callers 16]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import torch
from backbone.quantization import model_size_mb
from backbone.serving import DynamicBatcher
from PIL import Image
from prometheus_client import CollectorRegistry

from benchmarks.common import emit, progress, setup, time_interleaved, time_ms
from pipelines.manufacturing.common import default_data_dir, default_model_dir
from pipelines.manufacturing.data import load_grey, load_neu, mt_split, neu_split
from pipelines.manufacturing.edge import calibrated_int8


class _Settings:
    def __init__(self, model_dir: Path, lines_dir: Path) -> None:
        self.model_dir = model_dir
        self.lines_dir = str(lines_dir)
        self.default_line = "magnetic_tile"


def _throughput(model: torch.nn.Module, x: torch.Tensor, batch: int = 32, repeats: int = 3) -> float:
    def run() -> None:
        with torch.inference_mode():
            for i in range(0, x.shape[0], batch):
                model(x[i : i + batch])

    t = time_ms(run, repeats=repeats, warmup=1)["median"]
    return x.shape[0] / (t / 1000.0)


def _search(bank, feats: torch.Tensor) -> dict[str, float | None]:
    """ms per tile of the bank's nearest-neighbour search, pruned (the served one, exact) vs every entry read,
    one tile at a time and 8 together, and the largest difference between their distances."""
    if bank.position <= 0:
        return {}
    out: dict[str, float | None] = {}
    for n in (1, 8):
        runs = {name: (lambda p=prune, k=n: bank.patch_scores(feats[:k], prune=p))
                for name, prune in (("pruned", True), ("full", False))}  # fmt: skip
        for name, t in time_interleaved(runs, repeats=3, warmup=1).items():  # round-robin: same load for both
            out[f"search_ms_per_tile_{name}_batch{n}"] = round(t["median"] / n, 2)
        out[f"search_speedup_batch{n}"] = round(
            out[f"search_ms_per_tile_full_batch{n}"] / out[f"search_ms_per_tile_pruned_batch{n}"], 2
        )
    diff = (bank.patch_scores(feats, prune=True) - bank.patch_scores(feats, prune=False)).abs().max()
    out["search_max_abs_diff"] = float(diff)
    return out


async def _load(model, line: str, images: list[Image.Image], callers: int, max_batch: int) -> float:
    batcher: DynamicBatcher = DynamicBatcher(
        lambda items: model.inspect(items, line), max_batch_size=max_batch, max_wait_ms=5.0,
        name=f"bench-{max_batch}", registry=CollectorRegistry(),
    )
    per_caller = max(1, len(images) // callers)

    async def caller(c: int) -> None:
        for i in range(per_caller):
            await batcher.submit(images[(c * per_caller + i) % len(images)])

    async with batcher:
        await asyncio.gather(*(batcher.submit(im) for im in images[:4]))
        t0 = time.perf_counter()
        await asyncio.gather(*(caller(c) for c in range(callers)))
        return callers * per_caller / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--callers", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    setup(threads=args.threads)
    from services.manufacturing.app.model import load_inspection_model

    data_dir, model_dir = default_data_dir(), default_model_dir()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model = load_inspection_model(_Settings(model_dir, Path(tmp)))
        progress(f"loaded {model.info.version}")
        x = load_neu(data_dir, neu_split(data_dir)["test"][::5], model.image_size).x
        fp32 = model.classifier.eval()
        int8 = calibrated_int8(fp32, data_dir)  # static INT8 trunk + dynamic INT8 Linear layers, as the edge
        ips_fp32 = _throughput(fp32, x)
        ips_int8 = _throughput(int8, x)
        progress(f"classifier fp32 {ips_fp32:.1f} img/s, int8 {ips_int8:.1f} img/s")
        split = mt_split(data_dir)
        root = data_dir / "magnetic_tile"
        images = [load_grey(root / f) for f in split["test_good"][: args.requests]]
        # two more lines built from real tiles (no retraining), to switch between
        for name, files in (("bench-a", split["calib_good"][:12]), ("bench-b", split["calib_good"][12:24])):
            line = model.new_line(name, "benchmark")
            model.build_line(line, [load_grey(root / f) for f in files])
        order = iter(["bench-a", "bench-b"] * 1000)
        switch = time_ms(lambda: model.activate(next(order)), repeats=200, warmup=10)
        single = images[:1]
        per_req = time_ms(lambda: model.inspect(single, "bench-a"), repeats=5, warmup=1)
        alt = iter(["bench-a", "bench-b"] * 100)
        per_req_switching = time_ms(lambda: model.inspect(single, next(alt)), repeats=6, warmup=2)
        progress(f"line switch median {switch['median']:.4f} ms")
        search = _search(model.lines["magnetic_tile"].bank, model.features(images[:8]))
        progress(f"nearest-neighbour search: {search}")
        unbatched = asyncio.run(_load(model, "magnetic_tile", images, args.callers, 1))
        batched = asyncio.run(_load(model, "magnetic_tile", images, args.callers, 16))
        progress(f"inspections/s: unbatched {unbatched:.2f}, batched {batched:.2f}")
    emit({
        "images_per_s_fp32": round(ips_fp32, 2),
        "images_per_s_int8": round(ips_int8, 2),
        "int8_size_ratio": round(model_size_mb(fp32) / model_size_mb(int8), 3),
        "batched_rps": round(batched, 2),
        "unbatched_rps": round(unbatched, 2),
        "line_switch_ms_median": round(switch["median"], 5),
        "line_switch_ms_p99": round(switch["p99"], 5),
        "inspect_one_ms_same_line": round(per_req["median"], 2),
        "inspect_one_ms_alternating_lines": round(per_req_switching["median"], 2),
        "inspect_one_ms_delta": round(statistics.median(per_req_switching["all"]) - per_req["median"], 2),
        **search,
        "model_version": model.info.version,
        "threads": args.threads,
    })


if __name__ == "__main__":
    main()
