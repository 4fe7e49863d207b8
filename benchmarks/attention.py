"""Dynamic block-sparse attention vs dense attention (inference, fp32, CPU 2 threads, batch 1).

8 heads x head dim 64; sparse: blocks of 64 keys, 16 routed blocks + 2 local blocks per query block,
bidirectional. For n = 4,096 / 8,192 / 16,384:

* ``sparse_ms``       ``backbone.attention.sparse_attention``.
* ``sdpa_ms``         ``torch.nn.functional.scaled_dot_product_attention`` (dense, fused CPU kernel).
* ``speedup``         ``sdpa_ms / sparse_ms``.
* ``sparse_peak_mb``  peak tensor memory of one sparse call (``benchmarks.common.peak_memory_mb``).
* ``dense_peak_mb``   peak of plain attention that materialises the ``n x n`` scores; the leanest such
  version (softmax done in place, so one ``H x n x n`` fp32 buffer), i.e. a lower bound for any
  implementation that builds the score matrix. When the machine lacks the memory for it, the size of that
  buffer is reported instead and ``dense_peak_source`` says ``"analytic"``.

Targets at n = 16,384: ``speedup >= 3`` and ``sparse_peak_mb <= dense_peak_mb / 4``.
Run: ``python -m benchmarks.attention``; the last stdout line is the JSON result.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from backbone.attention import sparse_attention

from benchmarks.common import emit, peak_memory_mb, progress, setup, time_interleaved

HEADS, HEAD_DIM, BLOCK, TOP_K, LOCAL = 8, 64, 64, 16, 2


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention through an explicit ``[B, H, n, n]`` score matrix (softmax in place)."""
    scores = torch.matmul(q * q.size(-1) ** -0.5, k.transpose(-1, -2))
    scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
    scores.div_(scores.sum(dim=-1, keepdim=True))
    return scores @ v


def _available_mb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_size(n: int, repeats: int) -> dict[str, float | bool | str]:
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM) for _ in range(3))

    def sparse() -> torch.Tensor:
        return sparse_attention(q, k, v, block_size=BLOCK, top_k_blocks=TOP_K, local_blocks=LOCAL)

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    with torch.inference_mode():
        progress(f"n={n}: timing sparse vs sdpa ({repeats} interleaved rounds)")
        t = time_interleaved({"sparse": sparse, "sdpa": sdpa}, repeats=repeats, warmup=1)
        sparse_peak = peak_memory_mb(sparse)
        scores_mb = HEADS * n * n * 4 / 2**20
        if _available_mb() > scores_mb + 4096:
            progress(f"n={n}: measuring plain attention peak (~{scores_mb:.0f} MB)")
            dense_peak, source = peak_memory_mb(lambda: plain_attention(q, k, v)), "measured"
        else:
            progress(f"n={n}: not enough free memory for plain attention; reporting the n x n buffer size")
            dense_peak, source = scores_mb, "analytic"
    sparse_ms, sdpa_ms = t["sparse"]["median"], t["sdpa"]["median"]
    progress(f"n={n}: sparse {sparse_ms:.0f} ms, sdpa {sdpa_ms:.0f} ms")
    progress(f"n={n}: peak memory sparse {sparse_peak:.0f} MB, plain dense {dense_peak:.0f} MB")
    return {
        "sparse_ms": round(sparse_ms, 2),
        "sdpa_ms": round(sdpa_ms, 2),
        "speedup": round(sdpa_ms / sparse_ms, 3),
        "sparse_peak_mb": round(sparse_peak, 1),
        "dense_peak_mb": round(dense_peak, 1),
        "memory_ratio": round(sparse_peak / dense_peak, 4),
        "dense_peak_source": source,
        "sparse_all_ms": t["sparse"]["all"],
        "sdpa_all_ms": t["sdpa"]["all"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    setup()
    load_before = os.getloadavg()[0]
    result: dict[str, object] = {
        "benchmark": "attention",
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "block_size": BLOCK,
        "top_k_blocks": TOP_K,
        "local_blocks": LOCAL,
        "causal": False,
        "threads": torch.get_num_threads(),
    }
    per_n = {str(n): run_size(n, args.repeats) for n in args.sizes}
    result["sizes"] = per_n
    largest = str(max(args.sizes))
    top = per_n[largest]
    for key in ("sparse_ms", "sdpa_ms", "speedup", "sparse_peak_mb", "dense_peak_mb"):
        result[f"{key}_{largest}"] = top[key]
    if largest == "16384":
        result["target_speedup_ge_3"] = top["speedup"] >= 3
        result["target_memory_le_quarter"] = top["sparse_peak_mb"] <= top["dense_peak_mb"] / 4
    result["load_avg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    emit(result)


if __name__ == "__main__":
    main()
