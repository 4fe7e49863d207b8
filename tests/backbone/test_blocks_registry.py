"""Transformer blocks, encoders and the model registry."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from backbone.blocks import BlockConfig, EncoderOutput, TransformerBlock
from backbone.moe import MoE
from backbone.registry import create_model, is_model, list_models, moe_layers, routing_stats, total_aux_loss

PRESETS = ["seq_moe_tiny", "seq_moe_small", "seq_decay_tiny", "patch2d_moe_tiny", "patch3d_moe_tiny"]



def _example_input(name: str) -> tuple[tuple, dict]:
    if name.startswith("seq"):
        return (torch.randn(2, 40, 16),), {"timestamps": torch.rand(2, 40).cumsum(1)}
    if name.startswith("patch2d"):
        return (torch.randn(2, 1, 64, 64),), {}
    return (torch.randn(2, 1, 32, 32, 32),), {}


def test_presets_are_registered() -> None:
    names = list_models()
    for name in PRESETS:
        assert name in names and is_model(name)
    assert {"patch2d_moe_tiny", "patch3d_moe_tiny"} <= set(list_models("patch*"))
    assert all(name.startswith("patch") for name in list_models("patch*"))


@pytest.mark.parametrize("name", PRESETS)
def test_presets_build_and_run(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_outputs=3)
    args, kwargs = _example_input(name)
    out = model(*args, **kwargs)
    assert isinstance(out, EncoderOutput)
    dim = model.cfg.dim
    n_tokens = 40 if name.startswith("seq") else 64
    assert out.pooled.shape == (2, dim) and out.tokens.shape == (2, n_tokens, dim)
    assert out.logits.shape == (2, 3)
    assert model.model_name == name
    layers = moe_layers(model)
    assert layers and all(isinstance(m, MoE) for m in layers.values())
    stats = json.loads(json.dumps(routing_stats(model)))
    assert set(stats) == set(layers)
    assert all(s["tokens_last"] == 2 * (n_tokens + (model.cfg.pool == "cls")) for s in stats.values())


def test_overrides_and_errors() -> None:
    model = create_model("seq_moe_tiny", depth=3, n_routed_experts=4, top_k=1, in_features=5)
    assert len(model.blocks) == 3
    assert all(m.cfg.n_routed_experts == 4 and m.cfg.top_k == 1 for m in moe_layers(model).values())
    assert model(torch.randn(1, 10, 5)).tokens.shape == (1, 10, 64)
    with pytest.raises(TypeError, match="unknown option.*'not_a_field'"):
        create_model("seq_moe_tiny", not_a_field=1)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("no_such_model")
    with pytest.raises(ValueError, match="attn_kind|kind"):
        create_model("seq_moe_tiny", attn_kind="linear")


def test_config_round_trip_rebuilds_same_architecture() -> None:
    model = create_model("patch3d_moe_tiny", img_size=(16, 32, 32), depth=1)
    cfg = json.loads(json.dumps(dataclasses.asdict(model.cfg)))  # as stored next to the weights
    clone = create_model(model.model_name, **cfg)
    clone.load_state_dict(model.state_dict())
    x = torch.randn(1, 1, 16, 32, 32)
    model.eval()
    clone.eval()
    with torch.no_grad():
        assert torch.equal(model(x).pooled, clone(x).pooled)


def test_n_dense_layers_and_layernorm() -> None:
    model = create_model("seq_moe_small", n_dense_layers=2, depth=3, norm="layernorm")
    assert list(moe_layers(model)) == ["blocks.2.ffn"]
    assert isinstance(model.blocks[0].attn_norm, torch.nn.LayerNorm)


@pytest.mark.parametrize("attn_kind", ["dense", "sparse", "temporal_decay"])
@pytest.mark.parametrize("ffn", ["mlp", "moe"])
def test_transformer_block_variants(attn_kind: str, ffn: str) -> None:
    cfg = BlockConfig(dim=32, n_heads=4, attn_kind=attn_kind, ffn=ffn, block_size=8, top_k_blocks=1)
    block = TransformerBlock(cfg)
    x = torch.randn(2, 30, 32, requires_grad=True)
    y = block(x, timestamps=torch.rand(2, 30).cumsum(1))
    y.sum().backward()
    assert y.shape == x.shape and torch.isfinite(x.grad).all()
    assert block.aux_loss.item() == 0.0


def test_block_exposes_moe_aux_loss_and_model_sums_it() -> None:
    model = create_model("seq_moe_tiny", balancing="aux_loss", depth=2)
    model(torch.randn(2, 20, 16))
    per_block = [b.aux_loss for b in model.blocks]
    assert all(a.item() > 0 for a in per_block)
    assert total_aux_loss(model).item() == pytest.approx(sum(a.item() for a in per_block))
    total_aux_loss(model).backward()
    assert model.blocks[0].ffn.gate.weight.grad.abs().sum() > 0


def test_padding_mask_gives_same_pooled_output_as_truncation() -> None:
    torch.manual_seed(0)
    model = create_model("seq_moe_tiny", attn_kind="dense").eval()
    x = torch.randn(2, 24, 16)
    pad = torch.zeros(2, 24, dtype=torch.bool)
    pad[1, 18:] = True
    with torch.no_grad():
        full = model(x, key_padding_mask=pad)
        short = model(x[1:, :18])
    assert (full.pooled[1] - short.pooled[0]).abs().max().item() < 1e-5


def test_patch_encoder_interpolates_position_grid() -> None:
    model = create_model("patch2d_moe_tiny", in_chans=3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 96, 64))
    assert out.tokens.shape == (1, 12 * 8, 64)
