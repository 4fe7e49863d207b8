"""Synthetic anomalies, the self-supervised base network and PatchCore on its features (real good tiles)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from backbone.artifacts import Artifact

from pipelines.manufacturing.anomaly_base import segmentation_loss, train_segnet
from pipelines.manufacturing.common import PRESETS, Preset
from pipelines.manufacturing.data import load_mt, mt_split
from services.manufacturing.app.anomaly_net import AnomalySegNet, SegNetConfig, load_base, standardize
from services.manufacturing.app.patchcore import MemoryBank, PatchCoreConfig, make_extractor
from services.manufacturing.app.synthetic import ALL_KINDS, synthesize


def test_synthetic_anomalies_change_only_masked_pixels() -> None:
    g = torch.Generator().manual_seed(0)
    x = standardize(torch.randn(24, 1, 64, 64, generator=g))
    for kind in ALL_KINDS:
        out, masks = synthesize(x, g, p_anomaly=1.0, kinds=(kind,))
        assert out.shape == masks.shape == x.shape and set(masks.unique().tolist()) <= {0.0, 1.0}
        assert int((masks.flatten(1).sum(1) > 0).sum()) >= 20, kind  # (almost) every image got one
        changed = (out - x).abs() > 0.3  # clearly changed (strokes and soft edges fade out beyond the mask)
        assert float((changed & (masks > 0)).sum()) > 0.5 * float(changed.sum()), kind  # mostly where masked
    same, none = synthesize(x, g, p_anomaly=0.0)
    assert torch.equal(same, x) and float(none.sum()) == 0.0


def test_segmentation_loss_prefers_the_right_mask() -> None:
    m = torch.zeros(2, 1, 16, 16)
    m[0, 0, 4:8, 4:8] = 1.0
    good = torch.where(m > 0, 6.0, -6.0)
    assert float(segmentation_loss(good, m)) < 0.05 < float(segmentation_loss(-good, m))


def test_base_net_trains_and_its_bank_flags_a_synthetic_defect(data_dir: Path, tmp_path: Path) -> None:
    """Seconds: a tiny base net trained on 24 real good tiles; the anomaly map of a PatchCore bank of its
    features rises where a pit or crack is drawn into held-out good tiles, and the artifact round-trips."""
    torch.manual_seed(0)
    split = mt_split(data_dir)
    x, _ = load_mt(data_dir, split["train_good"][:24] + split["calib_good"][:8], 64)
    x = standardize(x)
    train, held = x[:24], x[24:]
    preset = Preset(**{**PRESETS["tiny"].__dict__, "base_steps": 40})
    net = AnomalySegNet(SegNetConfig(channels=tuple(preset.base_channels), image_size=64))
    info = train_segnet(net, train, preset, seed=0, progress=False)
    assert info["steps"] == 40 and info["final_loss"] == info["final_loss"]  # finite
    cfg = PatchCoreConfig(image_size=64, features="learned", learned_parts=("dec", "seg"), blur_sigma=1.0,
                          patch_kernel=1, coreset_max=500)
    ext = make_extractor(cfg, base=net)
    feats = ext(train)
    assert feats.shape[:3] == (24, 16, 16) and feats.shape[-1] == 2 * 1 + sum(preset.base_channels[1:3])
    bank = MemoryBank.fit(feats, cfg)
    bad = held.clone()
    region = torch.zeros(8, 64, 64, dtype=torch.bool)
    bad[:4, 0, 28:32, 20:24] -= 4.0  # a dark pit
    region[:4, 28:32, 20:24] = True
    for i in range(4, 8):
        bad[i, 0, 16:48, 31 + i % 2] -= 4.0  # a dark vertical crack
        region[i, 16:48, 31 + i % 2] = True
    _, good_maps = bank.score(ext(held))
    _, maps = bank.score(ext(bad))
    # the anomaly map rises where the defect was added (same tile without it as the reference)
    hotter = [float(maps[i][region[i]].mean()) > float(good_maps[i][region[i]].mean()) for i in range(8)]
    assert sum(hotter) >= 7, hotter
    assert maps.shape == (8, 64, 64)
    with pytest.raises(ValueError, match="base network"):
        make_extractor(cfg)
    # artifact round trip (safetensors + JSON)
    from backbone.artifacts import save_artifact

    art = save_artifact(tmp_path, "manufacturing", "anomaly_base_model", config={"model": net.cfg.to_dict()},
                        metrics=info, tensors=net.state_dict())
    again = load_base(Artifact(art.path, art.manifest))
    assert torch.allclose(make_extractor(cfg, base=again)(held), ext(held), atol=1e-5)
    # an ensemble of base models: each patch's features are those of every base, concatenated in order
    other = AnomalySegNet(SegNetConfig(channels=tuple(preset.base_channels), image_size=64))
    train_segnet(other, train, preset, seed=1, progress=False)
    pair = dataclasses.replace(cfg, base_versions=("a", "b"))
    both = make_extractor(pair, base=[net, other])(held)
    assert both.shape[-1] == 2 * feats.shape[-1]
    assert torch.allclose(both[..., : feats.shape[-1]], ext(held), atol=1e-5)
    assert torch.allclose(both[..., feats.shape[-1] :], make_extractor(cfg, base=other)(held), atol=1e-5)
    with pytest.raises(ValueError, match="names 2 base models, got 1"):
        make_extractor(pair, base=[net])
    # configs saved with one base model read as a one-element ensemble
    legacy = {k: v for k, v in pair.to_dict().items() if k != "base_versions"} | {"base_version": "a"}
    assert PatchCoreConfig.from_dict(legacy).base_versions == ("a",)
