"""INT8 dynamic quantization and bf16 vs fp32 on a stack of 6 backbone blocks (CPU, 2 threads).

Blocks: ``backbone.blocks.TransformerBlock``, dim 384, 6 heads, dense attention, SwiGLU MLP (hidden 4 * dim),
LayerNorm as in ViT-S (``--norm rmsnorm``: the block default); input 32 x 197 tokens (ViT-S/16 at 224 px).
fp32, int8 and bf16 forwards are interleaved repeat by repeat so load from other jobs hits all three alike;
a profiler pass reports the share of time spent in Linear layers. Target: int8 speedup >= 1.8.

    python -m benchmarks.quantization [--norm layernorm|rmsnorm] [--repeats 5] [--engine onednn|fbgemm|x86]
"""
from __future__ import annotations

import argparse
import statistics

import torch
from backbone.blocks import BlockConfig, TransformerBlock
from backbone.quantization import default_int8_engine, model_size_mb, output_diff, quantize_int8, to_bf16
from torch import nn
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import emit, progress, setup, time_ms

DIM, DEPTH, BATCH, TOKENS = 384, 6, 32, 197
LINEAR_OPS = ("aten::linear", "quantized::linear_dynamic")


def linear_profile(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(ms inside Linear ops, ms total) of one profiled forward (fp32 ``aten::linear`` or dynamic int8)."""
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.cpu_time_total for e in events if e.key in LINEAR_OPS) / 1e3, total / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--norm", default="layernorm", choices=["layernorm", "rmsnorm"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--engine", default=None, help="int8 kernels (default: default_int8_engine())")
    args = parser.parse_args()
    setup()
    cfg = BlockConfig(dim=DIM, n_heads=6, attn_kind="dense", ffn="mlp", norm=args.norm)  # mlp 4 * dim
    fp32 = nn.Sequential(*(TransformerBlock(cfg) for _ in range(DEPTH))).eval()
    x = torch.randn(BATCH, TOKENS, DIM)
    progress(f"{DEPTH} blocks dim {DIM} (mlp hidden {4 * DIM}), input {tuple(x.shape)}; quantizing")
    engine = args.engine or default_int8_engine()
    int8 = quantize_int8(fp32, engine=engine)
    bf16 = to_bf16(fp32, "cast")
    models = {"fp32": fp32, "int8": int8, "bf16": bf16}

    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():  # warm-up
            m(x)
        for r in range(args.repeats):
            for name, m in models.items():
                times[name].append(time_ms(lambda m=m: m(x), repeats=1, warmup=0)["median"])
            last = ", ".join(f"{k} {v[-1]:.0f} ms" for k, v in times.items())
            progress(f"repeat {r + 1}/{args.repeats}: {last}")
    ms = {k: statistics.median(v) for k, v in times.items()}

    _, int8_rel = output_diff(fp32, int8, x)
    _, bf16_rel = output_diff(fp32, bf16, x)
    progress("profiling the share of Linear layers")
    (lin_fp32, tot_fp32), (lin_int8, tot_int8) = linear_profile(fp32, x), linear_profile(int8, x)
    size = {k: model_size_mb(m) for k, m in models.items()}

    emit({
        "benchmark": "quantization",
        "model": f"{DEPTH}x TransformerBlock dim {DIM}, dense attention, SwiGLU mlp {4 * DIM}, {args.norm}",
        "input": [BATCH, TOKENS, DIM],
        "int8_engine": engine,
        "fp32_ms": round(ms["fp32"], 1),
        "int8_ms": round(ms["int8"], 1),
        "speedup": round(ms["fp32"] / ms["int8"], 3),
        "max_rel_diff": round(int8_rel, 5),
        "bf16_ms": round(ms["bf16"], 1),
        "bf16_speedup": round(ms["fp32"] / ms["bf16"], 3),
        "bf16_max_rel_diff": round(bf16_rel, 5),
        "size_mb_fp32": round(size["fp32"], 2),
        "size_mb_int8": round(size["int8"], 2),
        "size_ratio": round(size["fp32"] / size["int8"], 3),
        "linear_time_share_fp32": round(lin_fp32 / tot_fp32, 3),
        "linear_time_share_int8": round(lin_int8 / tot_int8, 3),
        "int8_linear_only_speedup": round(lin_fp32 / lin_int8, 3),
        "target_speedup_ge_1_8": ms["fp32"] / ms["int8"] >= 1.8,
    })


if __name__ == "__main__":
    main()
