"""The hybrid models through the registry, and the uncertainty statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from backbone.attention import Attention
from backbone.blocks import TransformerBlock
from backbone.moe import MoE
from backbone.registry import create_model, list_models
from monai.networks.blocks import ResidualUnit

from services.medical_imaging.app import networks  # noqa: F401
from services.medical_imaging.app.uncertainty import sample_probabilities, summarise, tta_views


@pytest.mark.parametrize("dims", [2, 3])
def test_registry_builds_monai_stem_plus_backbone_blocks(dims: int) -> None:
    assert f"medical_hybrid_{dims}d" in list_models("medical_hybrid_*")
    model = create_model(
        f"medical_hybrid_{dims}d", stem_channels=(8, 16, 16), dim=32, depth=1, expert_hidden=32
    )
    assert any(isinstance(m, ResidualUnit) for m in model.modules())
    blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
    assert blocks and all(isinstance(b.ffn, MoE) for b in blocks)
    attn = [m for m in model.modules() if isinstance(m, Attention)]
    assert attn and all(a.cfg.kind == "sparse" for a in attn)
    # sparse for real: each query block sees fewer blocks than exist
    n_blocks = model.cfg.grid
    assert attn[0].cfg.top_k_blocks + attn[0].cfg.local_blocks < n_blocks
    x = torch.rand(3, 1, *([28] * dims))
    logits = model(x)
    assert logits.shape == (3, 2)
    assert model.last_gate is not None and model.last_gate.shape == (3, 1, *([7] * dims))
    assert float(model.last_gate.min()) >= 0 and float(model.last_gate.max()) <= 1


def test_mc_dropout_gives_spread_and_eval_is_deterministic() -> None:
    torch.manual_seed(0)
    model = create_model(
        "medical_hybrid_2d",
        stem_channels=(8, 16, 16),
        dim=32,
        depth=1,
        expert_hidden=32,
        dropout=0.3,
        head_dropout=0.5,
    )
    x = torch.rand(1, 1, 28, 28)
    probs = sample_probabilities(model, x, mc_samples=8, tta_views_n=1)
    assert probs.shape == (8, 2) and probs[:, 1].std() > 0
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))
    assert not any(m.training for m in model.modules())  # sampling leaves the model in eval mode


def test_tta_views_and_summary_statistics() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    v = tta_views(x, 4)
    assert v.shape == (4, 1, 4, 4)
    torch.testing.assert_close(v[0], x[0])
    torch.testing.assert_close(v[1], torch.flip(x, dims=[3])[0])
    # 2-D: no view is upside down (training flips left-right only); the rest are 1-pixel shifts
    torch.testing.assert_close(v[2], torch.roll(x, 1, dims=3)[0])
    assert not any(torch.equal(view, torch.flip(x, dims=[2])[0]) for view in tta_views(x, 8))
    # 3-D: training flips every axis, and so may the views
    vol = torch.arange(27.0).view(1, 1, 3, 3, 3)
    flips = tta_views(vol, 4)[1:]
    for view, axis in zip(flips, (4, 3, 2), strict=True):
        torch.testing.assert_close(view, torch.flip(vol, dims=[axis])[0])
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.5, 0.5], [0.5, 0.5]])
    s = summarise(probs, 1)
    assert s.mean == pytest.approx(0.5)
    assert s.predictive_entropy == pytest.approx(1.0)  # mean prediction 50/50 -> 1 bit
    assert 0 < s.mutual_information < 1
    assert s.interval_95[0] < 0.2 and s.interval_95[1] > 0.8
    sure = summarise(np.array([[0.01, 0.99]] * 5), 1)
    assert sure.std == pytest.approx(0.0) and sure.predictive_entropy < 0.1


def test_strided_stem_keeps_the_token_grid() -> None:
    """``stem_stride=2`` runs the first conv at half resolution; one fewer ResidualUnit keeps the 7^3 grid."""
    model = create_model(
        "medical_hybrid_3d", stem_channels=(8, 16), stem_stride=2, dim=32, depth=1, expert_hidden=32
    )
    assert model.cfg.grid == 7
    assert sum(isinstance(m, ResidualUnit) for m in model.modules()) == 1
    logits = model(torch.rand(2, 1, 28, 28, 28))
    assert logits.shape == (2, 2) and model.last_gate is not None
    assert model.last_gate.shape == (2, 1, 7, 7, 7)
    # an artifact config without the field (older versions) still builds the stride-1 stem
    old = create_model(
        "medical_hybrid_2d", **{k: v for k, v in model.cfg.to_dict().items() if k != "stem_stride"}
    )
    assert old.cfg.stem_stride == 1


def test_ensemble_samples_are_spread_over_members() -> None:
    """MC x TTA on a DeepEnsemble: sample i goes through member i % K, in the order of the views."""
    from backbone.ensemble import DeepEnsemble

    small = {"stem_channels": (8, 16, 16), "dim": 32, "depth": 1, "expert_hidden": 32}
    torch.manual_seed(0)
    members = [create_model("medical_hybrid_2d", **small) for _ in range(3)]
    ens = DeepEnsemble(members, average_attrs=("last_gate",))
    x = torch.rand(1, 1, 28, 28)
    probs = sample_probabilities(ens, x, mc_samples=2, tta_views_n=3, temperature=1.3)
    assert probs.shape == (6, 2)
    views = tta_views(x, 3)
    assert probs[:, 1].std() > 0
    det = sample_probabilities(ens, x, mc_samples=1, tta_views_n=3, temperature=1.3)
    with torch.no_grad():
        expected = [torch.softmax(members[i % 3](views[i : i + 1]) / 1.3, -1)[0].numpy() for i in range(3)]
    np.testing.assert_allclose(det, np.stack(expected), atol=1e-5)
    assert not any(m.training for m in ens.modules())
