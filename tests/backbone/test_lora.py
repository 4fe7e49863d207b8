"""LoRA injection, exact merge / unmerge, adapter files, AdapterBank switching and adapter training."""
from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from backbone.lora import (
    AdapterBank,
    LoraConfig,
    LoraConv2d,
    LoraLinear,
    inject_lora,
    load_adapter,
    lora_layers,
    mark_only_lora_trainable,
    merge_lora,
    read_adapter_config,
    save_adapter,
    set_active_adapter,
    unmerge_lora,
)
from safetensors import safe_open
from torch import nn

BLOCK_TARGETS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"



def small_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, depth=2).eval()


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    return small_vit()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_target_selection_regex_fnmatch_suffix(vit: nn.Module) -> None:
    names = inject_lora(copy.deepcopy(vit), LoraConfig(target_modules=BLOCK_TARGETS))
    assert len(names) == 2 * 4 and all(n.startswith("blocks.") for n in names)
    names = inject_lora(copy.deepcopy(vit), LoraConfig(target_modules=["blocks.*.mlp.fc?"]))
    assert names == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    model = copy.deepcopy(vit)
    names = inject_lora(model, LoraConfig(target_modules=["proj"]))  # suffix: also the patch-embed conv
    assert "patch_embed.proj" in names and isinstance(model.patch_embed.proj, LoraConv2d)
    assert isinstance(model.blocks[0].attn.proj, LoraLinear)
    with pytest.raises(ValueError):
        inject_lora(copy.deepcopy(vit), LoraConfig(target_modules=["no_such_layer"]))


def test_state_dict_keys_of_base_unchanged(vit: nn.Module) -> None:
    model = copy.deepcopy(vit)
    inject_lora(model, LoraConfig(target_modules=BLOCK_TARGETS))
    keys = set(model.state_dict())
    assert set(vit.state_dict()) <= keys
    assert {k for k in keys - set(vit.state_dict())} == {
        k for k in keys if ".lora_A." in k or ".lora_B." in k
    }


@pytest.mark.parametrize("targets", [BLOCK_TARGETS, ["qkv", "proj", "fc1", "fc2"]])  # 2nd: + Conv2d
def test_merge_unmerge_exact(vit: nn.Module, images: torch.Tensor, targets) -> None:
    model = copy.deepcopy(vit)
    base_out = run(model, images)
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=targets, init_lora_weights=False))
    before = run(model, images)
    assert (before - base_out).abs().max() > 1e-3  # the adapter does something
    merge_lora(model)
    assert all(layer.merged_adapter == "default" for _, layer in lora_layers(model))
    merged = run(model, images)
    unmerge_lora(model)
    after = run(model, images)
    torch.testing.assert_close(merged, before, atol=1e-5, rtol=0)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    for key, w in vit.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], w, atol=1e-6, rtol=0)
    set_active_adapter(model, None)
    torch.testing.assert_close(run(model, images), base_out, atol=1e-5, rtol=0)


def test_save_load_round_trip_small_file(vit: nn.Module, images: torch.Tensor, tmp_path) -> None:
    model = copy.deepcopy(vit)
    inject_lora(model, LoraConfig(r=8, alpha=16, target_modules=BLOCK_TARGETS, init_lora_weights=False))
    expected = run(model, images)
    path = save_adapter(model, tmp_path / "adapter.safetensors")

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["lora_config"])
    assert keys and all(k.endswith((".lora_A", ".lora_B")) for k in keys)
    assert meta["r"] == 8 and meta["alpha"] == 16 and len(meta["modules"]) == 8
    assert read_adapter_config(path) == meta
    base_bytes = sum(t.numel() * t.element_size() for t in vit.state_dict().values())
    assert path.stat().st_size < base_bytes / 20

    fresh = copy.deepcopy(vit)
    assert load_adapter(fresh, path) == "default"
    assert torch.equal(run(fresh, images), expected)


def test_adapter_bank_switches_to_the_right_adapter(vit: nn.Module, images: torch.Tensor, tmp_path) -> None:
    model = copy.deepcopy(vit)
    base_out = run(model, images)
    bank = AdapterBank(model)
    names = [f"task{i}" for i in range(3)]
    for i, name in enumerate(names):
        torch.manual_seed(10 + i)
        bank.add(name, LoraConfig(r=8, alpha=16, target_modules=BLOCK_TARGETS, init_lora_weights=False))
    assert bank.names == names and bank.active is None
    torch.testing.assert_close(run(model, images), base_out, atol=0, rtol=0)

    references = {}
    for name in names:  # a model holding only this adapter
        single = copy.deepcopy(vit)
        load_adapter(single, bank.save(name, tmp_path / f"{name}.safetensors"))
        references[name] = run(single, images)
    assert (references["task0"] - references["task1"]).abs().max() > 1e-3

    for name in [*names, "task0"]:
        bank.activate(name)
        torch.testing.assert_close(run(model, images), references[name], atol=1e-6, rtol=0)

    bank.set_merged(True)
    for name in ["task2", "task1", "task0"]:
        bank.activate(name)
        assert all(layer.merged_adapter == name for _, layer in lora_layers(model))
        torch.testing.assert_close(run(model, images), references[name], atol=1e-5, rtol=0)
    bank.activate(None)
    torch.testing.assert_close(run(model, images), base_out, atol=1e-5, rtol=0)
    with pytest.raises(KeyError):
        bank.activate("missing")


def test_only_lora_trainable_and_training_keeps_base(vit: nn.Module, images: torch.Tensor) -> None:
    model = copy.deepcopy(vit)
    inject_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=BLOCK_TARGETS))
    base_state = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    start = run(model, images)
    torch.testing.assert_close(start, run(vit, images), atol=0, rtol=0)  # B = 0: identity at init

    n_trainable = mark_only_lora_trainable(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert n_trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randn_like(start)
    model.train()
    for _ in range(3):
        loss = nn.functional.mse_loss(model(images), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert (run(model, images) - start).abs().max() > 1e-3
    for k, v in model.state_dict().items():
        if k in base_state:
            assert torch.equal(v, base_state[k]), k
