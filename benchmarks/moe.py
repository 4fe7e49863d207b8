"""MoE forward (inference, fp32, CPU 2 threads): grouped dispatch vs its dense FLOP floor vs compute-all.

Shape: 64 routed + 1 shared SwiGLU experts, top-6, dim 512, expert hidden 256, 8,192 tokens.

* ``moe_ms``          ``backbone.moe.MoE`` (sort pairs by expert, one matmul chain per expert, index_add_).
* ``dense_floor_ms``  one dense SwiGLU FFN of hidden 6 * 256 + 256: the same active FLOPs, no routing.
* ``compute_all_ms``  every expert on every token, then weighted by the (mostly zero) routing weights.

Targets: ``ratio_vs_floor = moe_ms / dense_floor_ms <= 1.6``, ``speedup_vs_compute_all >= 5``.
Run: ``python -m benchmarks.moe``; the last stdout line is the JSON result.
"""

from __future__ import annotations

import argparse
import os

import torch
from backbone.moe import Expert, MoE, MoEConfig

from benchmarks.common import emit, progress, setup, time_interleaved


def compute_all(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Baseline: run all experts on all tokens, weight by the dense [T, E] routing matrix."""
    weights, indices, _ = moe.gate(x)
    dense_w = torch.zeros(x.size(0), moe.cfg.n_routed_experts).scatter_(1, indices, weights)
    y = moe.shared_experts(x)
    for e, expert in enumerate(moe.experts):
        y += dense_w[:, e : e + 1] * expert(x)
    return y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--baseline-repeats", type=int, default=3)
    args = parser.parse_args()
    setup()
    load_before = os.getloadavg()[0]
    cfg = MoEConfig(dim=512, n_routed_experts=64, n_shared_experts=1, top_k=6, expert_hidden=256)
    moe = MoE(cfg).eval()
    floor = Expert(cfg.dim, cfg.top_k * cfg.expert_hidden + cfg.n_shared_experts * cfg.expert_hidden).eval()
    x = torch.randn(args.tokens, cfg.dim)
    progress(f"MoE {cfg.n_routed_experts}+{cfg.n_shared_experts} experts, top-{cfg.top_k}, {args.tokens} tok")
    with torch.inference_mode():
        max_diff = (moe(x) - compute_all(moe, x)).abs().max().item()
        progress(f"moe vs compute-all max abs diff {max_diff:.2e}; timing (interleaved)")
        t = time_interleaved(
            {"moe": lambda: moe(x), "floor": lambda: floor(x), "all": lambda: compute_all(moe, x)},
            repeats={"moe": args.repeats, "floor": args.repeats, "all": args.baseline_repeats},
            warmup=1,
        )
    stats = moe.routing_stats()
    moe_ms, floor_ms, all_ms = t["moe"]["median"], t["floor"]["median"], t["all"]["median"]
    ratio, speedup = moe_ms / floor_ms, all_ms / moe_ms
    progress(f"moe {moe_ms:.1f} ms, floor {floor_ms:.1f} ms, compute-all {all_ms:.1f} ms")
    emit(
        {
            "benchmark": "moe",
            "tokens": args.tokens,
            "dim": cfg.dim,
            "n_routed_experts": cfg.n_routed_experts,
            "n_shared_experts": cfg.n_shared_experts,
            "top_k": cfg.top_k,
            "expert_hidden": cfg.expert_hidden,
            "threads": torch.get_num_threads(),
            "moe_ms": round(moe_ms, 2),
            "dense_floor_ms": round(floor_ms, 2),
            "compute_all_ms": round(all_ms, 2),
            "ratio_vs_floor": round(ratio, 3),
            "speedup_vs_compute_all": round(speedup, 2),
            "target_ratio_vs_floor_le_1_6": ratio <= 1.6,
            "target_speedup_vs_compute_all_ge_5": speedup >= 5,
            "moe_p99_ms": round(t["moe"]["p99"], 2),
            "dense_floor_p99_ms": round(t["floor"]["p99"], 2),
            "moe_all_ms": t["moe"]["all"],
            "dense_floor_all_ms": t["floor"]["all"],
            "compute_all_all_ms": t["all"]["all"],
            "max_abs_diff_vs_compute_all": max_diff,
            "routing_max_vio": round(stats["max_vio_total"], 3),
            "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        }
    )


if __name__ == "__main__":
    main()
