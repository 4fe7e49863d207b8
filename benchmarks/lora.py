"""LoRA AdapterBank on timm ViT-small: adapter switch time (pointer swap vs merge / unmerge), file size.

8 resident adapters, rank 8, on every block's attn.qkv, attn.proj, mlp.fc1 and mlp.fc2 (48 layers).
Target: switch_ms_median < 5 ms.

    python -m benchmarks.lora
"""
from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import timm
import torch
from backbone.lora import AdapterBank, LoraConfig
from safetensors.torch import save_file

from benchmarks.common import emit, progress, setup, time_ms

N_ADAPTERS, RANK = 8, 8
TARGETS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"


def main() -> None:
    setup()
    progress("building vit_small_patch16_224 (pretrained=False)")
    model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    x = torch.randn(4, 3, 224, 224)
    tmp = Path(tempfile.mkdtemp(prefix="bench_lora_"))
    base_path = tmp / "base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base_path))

    with torch.inference_mode():
        base_ms = time_ms(lambda: model(x), repeats=3, warmup=1)["median"]

    bank = AdapterBank(model)
    names = [f"adapter{i}" for i in range(N_ADAPTERS)]
    for name in names:
        layers = bank.add(name, LoraConfig(r=RANK, alpha=16, target_modules=TARGETS, init_lora_weights=False))
    progress(f"{N_ADAPTERS} adapters of rank {RANK} on {len(layers)} layers each")
    adapter_path = bank.save(names[0], tmp / "adapter0.safetensors")

    cycle = itertools.cycle(names)
    progress("timing unmerged switches (pointer swap)")
    switch = time_ms(lambda: bank.activate(next(cycle)), repeats=400, warmup=16)

    diffs = []
    with torch.inference_mode():
        bank.activate(names[1])
        unmerged_ms = time_ms(lambda: model(x), repeats=3, warmup=1)["median"]
        unmerged_out = {}
        for n in names[:3]:
            bank.activate(n)
            unmerged_out[n] = model(x)
        progress("timing merged switches (unmerge old + merge new)")
        bank.set_merged(True)
        merged_switch = time_ms(lambda: bank.activate(next(cycle)), repeats=24, warmup=2)
        bank.activate(names[1])
        merged_ms = time_ms(lambda: model(x), repeats=3, warmup=1)["median"]
        for n in names[:3]:
            bank.activate(n)
            diffs.append(float((model(x) - unmerged_out[n]).abs().max()))

    emit({
        "benchmark": "lora",
        "model": "vit_small_patch16_224",
        "n_adapters": N_ADAPTERS,
        "rank": RANK,
        "lora_layers": len(layers),
        "switch_ms_median": round(switch["median"], 4),
        "switch_ms_p99": round(switch["p99"], 4),
        "merged_switch_ms_median": round(merged_switch["median"], 3),
        "merged_switch_ms_p99": round(merged_switch["p99"], 3),
        "merged_vs_unmerged_max_diff": max(diffs),
        "adapter_file_kb": round(adapter_path.stat().st_size / 1024, 1),
        "base_model_mb": round(base_path.stat().st_size / 2**20, 2),
        "forward_ms_batch4_base": round(base_ms, 2),
        "forward_ms_batch4_unmerged": round(unmerged_ms, 2),
        "forward_ms_batch4_merged": round(merged_ms, 2),
        "target_switch_ms_median_lt_5": switch["median"] < 5,
    })


if __name__ == "__main__":
    main()
