"""Split, PatchCore parts and the trained artifacts (real data, real training of the tiny preset)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from backbone.artifacts import latest_artifact, list_artifacts
from backbone.registry import create_model
from sklearn.metrics import roc_auc_score

from pipelines.manufacturing.data import (
    MT_DEFECTS,
    NEU_CLASSES,
    decode_image,
    mt_split,
    neu_label,
    neu_split,
)
from services.manufacturing.app.model import suspect_images
from services.manufacturing.app.modeling import MODEL_NAME, STUDENT_NAME
from services.manufacturing.app.patchcore import (
    BF16_MIN_BANK,
    PRUNE_CELLS,
    MemoryBank,
    PatchCoreConfig,
    auroc,
    calibrate,
    greedy_coreset,
    make_extractor,
    with_positions,
)


def test_neu_split_is_stratified_60_20_20_and_disjoint(data_dir: Path) -> None:
    split = neu_split(data_dir)
    parts = [split["train"], split["val"], split["test"]]
    assert [len(p) for p in parts] == [1080, 360, 360]
    assert len(set(parts[0]) | set(parts[1]) | set(parts[2])) == 1800
    for part, n in zip(parts, (180, 60, 60), strict=True):
        assert Counter(neu_label(f) for f in part) == {c: n for c in NEU_CLASSES}
    # kept: the committed file is what neu_split returns
    kept_file = Path(__file__).parents[2] / "pipelines/manufacturing/splits/neu_det_split.json"
    kept = json.loads(kept_file.read_text())
    assert kept["test"] == split["test"]


def test_mt_split_good_only_for_bank(data_dir: Path) -> None:
    split = mt_split(data_dir)
    assert len(split["train_good"]) + len(split["calib_good"]) + len(split["test_good"]) == 952
    assert all(f.startswith("MT_Free/") for f in split["train_good"] + split["calib_good"])
    val = [f for v in split["val_defect"].values() for f in v]
    test = [f for v in split["test_defect"].values() for f in v]
    assert len(val) + len(test) == 392 and not set(val) & set(test)  # defects: validation third / test
    assert {d: len(v) for d, v in split["val_defect"].items()} == {
        "Blowhole": 38, "Break": 28, "Crack": 19, "Fray": 11, "Uneven": 34}
    assert not [f for f in val + test if f.startswith("MT_Free/")]


def test_filterbank_features_and_border_band() -> None:
    cfg = PatchCoreConfig(image_size=64, features="filterbank", fb_scales=(1.0, 2.0), fb_stride=4,
                          border=0.125, blur_sigma=1.0)
    ext = make_extractor(cfg)
    g = torch.Generator().manual_seed(0)
    good = torch.randn(6, 1, 64, 64, generator=g)
    feats = ext(good)
    assert feats.shape == (6, 16, 16, 22)  # 11 channels per scale on a stride-4 grid
    # exposure invariance: per-image standardisation makes gain / offset irrelevant
    assert torch.allclose(ext(good * 3.0 + 1.0), feats, atol=1e-4)
    bank = MemoryBank.fit(feats[:4], cfg)
    assert bank.mean is not None and bank.tensors().keys() == {"bank", "mean", "std"}
    again = MemoryBank.from_tensors(bank.tensors(), cfg)
    bad = good[4:].clone()
    bad[0, 0, 30:34, 30:34] += 12.0  # a bright blob in the middle
    bad[1, 0, 0:4, 0:4] += 12.0  # the same blob in a corner: inside the border band, not inspected
    scores, maps = again.score(ext(torch.cat([good[4:5], bad])))
    assert scores[1] > 1.5 * scores[0] and scores[2] < scores[1]
    # the band is left out of the score, not out of the map: the corner blob is where the map is hottest
    assert maps.shape == (3, 64, 64) and again.inspected_box(64) == (8, 56)
    corner = maps[2, :8, :8].max()
    assert corner > 1.5 * maps[0, :8, :8].max() and corner == maps[2].max()
    with pytest.raises(ValueError):
        make_extractor(PatchCoreConfig(features="trunk"))


def test_old_bank_configs_load_as_trunk_features() -> None:
    old = {"image_size": 128, "layers": [1, 2], "blur_sigma": 4.0}
    cfg = PatchCoreConfig.from_dict(old)
    assert cfg.features == "trunk" and not cfg.channel_standardize and cfg.border == 0.0


def test_coreset_covers_every_cluster() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    pts = torch.cat([c + 0.1 * torch.randn(200, 2, generator=g) for c in centres])
    idx = greedy_coreset(pts, 4, projection=0)
    assert len(set(idx.tolist())) == 4
    chosen = pts[idx]
    assert torch.cdist(centres, chosen).min(dim=1).values.max() < 1.0  # one pick per cluster


def test_auroc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + y, 1)
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s))


def test_memory_bank_scores_and_calibration() -> None:
    cfg = PatchCoreConfig(image_size=16, blur_sigma=1.0)
    bank = MemoryBank(torch.zeros(5, 3), cfg)
    feats = torch.zeros(2, 4, 4, 3)
    feats[1, 2, 2] = torch.tensor([3.0, 4.0, 0.0])  # one anomalous patch at distance 5
    scores, maps = bank.score(feats)
    assert scores[0] == pytest.approx(0.0, abs=1e-6) and scores[1] > 0.5
    assert maps.shape == (2, 16, 16) and maps[1].argmax() // 16 >= 8  # the hot spot is in the lower half
    cal = calibrate(torch.tensor([1.0, 1.1, 0.9, 1.2]), 0.99, torch.tensor([3.0, 4.0]))
    assert 1.2 <= cal.threshold < 3.0 and cal.defect_recall == 1.0 and cal.defect_auroc == 1.0
    # out-of-fold good scores far above the rest are reported (here position 5), a flat set reports none
    assert suspect_images(torch.tensor([1.0, 1.1, 0.9, 1.05, 0.95, 4.0, 1.02])) == [5]
    assert suspect_images(torch.ones(6)) == [] and suspect_images(torch.tensor([1.0, 1.2, 0.8, 1.1])) == []
    # near-identical scores: 2 % above the rest is not far above it, however small their spread
    assert suspect_images(torch.tensor([1.0, 1.001, 0.999, 1.0005, 0.9995, 1.02])) == []
    assert suspect_images(torch.tensor([1.0, 1.001, 0.999, 1.0005, 0.9995, 1.3])) == [5]


def test_level_term_catches_diffuse_anomalies_and_travels_with_the_bank() -> None:
    """A diffuse anomaly (every patch a little off: an uneven surface) barely moves the map's maximum but
    lifts its level; with the level term fitted on good images it outscores every good image, a sharp spot
    still does, and the term is saved with the bank. Without a level quantile the score is the maximum."""
    g = torch.Generator().manual_seed(0)
    cfg = PatchCoreConfig(image_size=32, blur_sigma=1.0, channel_standardize=False, level_quantile=0.8)
    entries = torch.randn(400, 8, generator=g)
    bank = MemoryBank(entries, cfg)

    def near(n: int, sd: float) -> torch.Tensor:  # (n, 8, 8, 8) patches near bank entries
        idx = torch.randint(0, 400, (n, 8, 8), generator=g)
        return entries[idx] + sd * torch.randn(n, 8, 8, 8, generator=g)

    good = near(30, 0.3)
    for i in range(30):  # every good image has one patch a little off of its own
        good[i, i % 8, (3 * i) % 8] += (0.3 + 0.3 * i / 30) * torch.randn(8, generator=g).sign()
    diffuse = near(1, 0.4)  # every patch somewhat farther from the bank
    spot = near(1, 0.3)
    spot[0, 4, 4] += 3.0
    peak, level, _ = bank.image_stats(good)
    assert torch.equal(bank.score(good)[0], peak)  # not fitted yet: the maximum alone
    d_peak, d_level, _ = bank.image_stats(diffuse)
    assert float(d_peak[0]) < float(peak.max())  # the maximum alone misses it
    bank.fit_level(peak, level)
    assert bank.level is not None and bank.level[0] == 0.8 and bank.level[1] > 0
    good_scores = bank.score(good)[0]
    assert torch.allclose(good_scores, peak + bank.level[1] * (level - bank.level[2]))
    assert float(bank.score(diffuse)[0][0]) > float(good_scores.max())
    assert float(bank.score(spot)[0][0]) > float(good_scores.max())
    again = MemoryBank.from_tensors(bank.tensors(), cfg)
    assert again.level == pytest.approx(bank.level)
    assert torch.allclose(again.score(diffuse)[0], bank.score(diffuse)[0])
    # the fitted quantile travels with the bank: loaded under a config without one it scores the same
    plain = MemoryBank.from_tensors(bank.tensors(), PatchCoreConfig(image_size=32, blur_sigma=1.0))
    assert torch.allclose(plain.score(diffuse)[0], bank.score(diffuse)[0])
    # banks saved before the level term: the config reads as "no level", the score is the maximum
    old_cfg = PatchCoreConfig.from_dict({"image_size": 32, "blur_sigma": 1.0})
    old = MemoryBank(bank.bank, old_cfg)
    old.fit_level(peak, level)
    assert old.level is None and "level" not in old.tensors()


def test_position_weight_compares_patches_with_those_at_the_same_place() -> None:
    """Parts imaged in the same pose: normal patches look one way in the top half and another in the bottom
    half. A patch of the bottom's kind in the top half is normal to a position-free bank and anomalous to one
    with positions; the weight is saved with the bank, whatever config loads it."""
    g = torch.Generator().manual_seed(0)
    top, bottom = torch.zeros(6), torch.zeros(6)
    top[0], bottom[1] = 4.0, 4.0

    def images(n: int) -> torch.Tensor:  # (n, 8, 8, 6)
        x = torch.empty(n, 8, 8, 6)
        x[:, :4], x[:, 4:] = top, bottom
        return x + 0.2 * torch.randn(n, 8, 8, 6, generator=g)

    train, good = images(12), images(4)
    swapped = images(1)
    swapped[0, 1, 3] = bottom + 0.2 * torch.randn(6, generator=g)  # the bottom's pattern, in the top half
    plain_cfg = PatchCoreConfig(image_size=16, blur_sigma=1.0, channel_standardize=False, coreset_max=400)
    placed_cfg = dataclasses.replace(plain_cfg, position_weight=60.0)
    plain, placed = MemoryBank.fit(train, plain_cfg), MemoryBank.fit(train, placed_cfg)
    assert placed.position == 60.0 and placed.bank.shape[1] == plain.bank.shape[1] + 2
    for bank, flagged in ((plain, False), (placed, True)):
        margin = float(bank.score(swapped)[0][0]) - float(bank.score(good)[0].max())
        assert (margin > 1.0) is flagged, (bank.position, margin)
    again = MemoryBank.from_tensors(placed.tensors(), plain_cfg)  # a config without positions loads it
    assert again.position == 60.0
    assert torch.allclose(again.score(swapped)[0], placed.score(swapped)[0])
    assert "position" not in plain.tensors()
    with pytest.raises(ValueError, match="position weight"):
        MemoryBank(placed.bank, plain_cfg, position=-1.0)


def test_nearest_neighbour_search_paths_agree_with_brute_force() -> None:
    """The fused float32 search and the bfloat16 candidate search with float32 re-ranking both give each
    patch's exact nearest-bank-entry distance (here on clustered data, where near ties are common)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(64, 48, generator=g) * 3
    bank = centres[torch.randint(0, 64, (BF16_MIN_BANK + 500,), generator=g)] + torch.randn(
        BF16_MIN_BANK + 500, 48, generator=g
    )
    feats = (centres[torch.randint(0, 64, (2 * 16 * 16,), generator=g)] + torch.randn(512, 48, generator=g))
    mb = MemoryBank(bank, PatchCoreConfig())
    exact = torch.cdist(feats.double(), bank.double()).min(dim=1).values.float().view(2, 16, 16)
    for bf16 in (False, True):
        got = mb.patch_scores(feats.view(2, 16, 16, 48), chunk=100, bf16=bf16)
        assert torch.allclose(got, exact, atol=1e-3, rtol=1e-4), bf16
    assert torch.allclose(mb.patch_scores(feats.view(2, 16, 16, 48)), exact, atol=1e-3, rtol=1e-4)
    # with positions (weight 60), on a 32 x 32 grid: the pruned search, exact whatever bf16 says
    queries = centres[torch.randint(0, 64, (2048,), generator=g)] + torch.randn(2048, 48, generator=g)
    grid = with_positions(queries.view(2, 32, 32, 48), 60.0).view(-1, 50)
    bank_pos = torch.cat([bank, grid[torch.randint(0, 2048, (len(bank),), generator=g), 48:]], dim=1)
    placed = MemoryBank(bank_pos, PatchCoreConfig(), position=60.0)
    exact = torch.cdist(grid.double(), bank_pos.double()).min(dim=1).values.float().view(2, 32, 32)
    for bf16 in (False, True):
        got = placed.patch_scores(queries.view(2, 32, 32, 48), chunk=100, bf16=bf16)
        assert torch.allclose(got, exact, atol=1e-3, rtol=1e-4), bf16


def test_pruned_search_is_exact_and_reads_only_entries_near_each_block(monkeypatch) -> None:
    """A bank with positions is searched block by block, reading only the cells that can hold a nearer entry
    than the ones found around the block: the same distances as the full search, also where the nearest entry
    lies several cells away, for positions off the grid, a part of the image with no entry, another image
    size and a query far from every entry; and far fewer entries read than a full search where the features
    vary with the place."""
    g = torch.Generator().manual_seed(1)
    weight, dim = 60.0, 16

    def places(side: int) -> torch.Tensor:
        ys = torch.linspace(0, weight, side)
        return torch.stack(torch.meshgrid(ys, ys, indexing="xy"), -1).view(side * side, 2)

    def exact(feats: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        return torch.cdist(with_positions(feats, weight).view(-1, dim + 2).double(), bank.double())

    # 1. random features; each of some queries has a twin entry 14 units (7.5 cells) away, nearer in all than
    # any entry around the query
    pos = torch.rand(3000, 2, generator=g) * weight
    pos = pos[pos[:, 0] > 20.0]  # no entry in the left third of the image
    bank = torch.cat([torch.randn(len(pos), dim, generator=g) * 5, pos], 1)
    for side in (32, 20):  # the bank's grid and another image size
        place = places(side)
        feats = torch.randn(side * side, dim, generator=g) * 5
        feats[5] += 60.0  # a defect-like patch, far from every entry
        twins = torch.nonzero(place[:, 0] > 28).squeeze(1)[::7]
        angle = torch.rand(len(twins), generator=g) * 2 * math.pi
        at = (place[twins] + torch.stack([angle.cos(), angle.sin()], 1) * 14.0).clamp(0, weight)
        twin = torch.cat([feats[twins] + 0.1 * torch.randn(len(twins), dim, generator=g), at], 1)
        with_twins = torch.cat([bank, twin])
        dist = exact(feats.view(1, side, side, dim), with_twins)
        assert (dist[twins].argmin(1) >= len(bank)).float().mean() > 0.9  # the twins are the nearest
        placed = MemoryBank(with_twins, PatchCoreConfig(), position=weight)
        got = placed.patch_scores(feats.view(1, side, side, dim))
        assert torch.allclose(got.view(-1), dist.min(dim=1).values.float(), atol=1e-4, rtol=1e-5), side
    # 2. features that vary smoothly with the place (a part photographed in one pose): entries read
    proj = torch.randn(2, dim, generator=g)
    noise = torch.randn(len(pos), dim, generator=g) * 0.3
    smooth = torch.cat([torch.sin(pos @ proj / 10.0) * 4 + noise, pos], 1)
    read: list[int] = []
    search = MemoryBank._search_cells

    def counted(self, q, rect, best, arg):  # type: ignore[no-untyped-def]
        x0, x1, y0, y1 = rect
        if x0 <= x1 and y0 <= y1:
            n, start = PRUNE_CELLS, self._cell_start
            read.append(len(q) * sum(start[y * n + x1 + 1] - start[y * n + x0] for y in range(y0, y1 + 1)))
        return search(self, q, rect, best, arg)

    monkeypatch.setattr(MemoryBank, "_search_cells", counted)
    place = places(32)
    feats = torch.sin(place @ proj / 10.0) * 4 + torch.randn(len(place), dim, generator=g) * 0.3
    feats = feats.view(1, 32, 32, dim)
    got = MemoryBank(smooth, PatchCoreConfig(), position=weight).patch_scores(feats)
    assert torch.allclose(got.view(-1), exact(feats, smooth).min(dim=1).values.float(), atol=1e-4, rtol=1e-5)
    assert sum(read) < 0.35 * len(place) * len(smooth), sum(read) / (len(place) * len(smooth))
    # 3. a small position weight: the bound reaches most of the grid, so the queries search the whole bank
    # (all together, float32 or bfloat16 candidates re-ranked in float32), still exact
    light = smooth.clone()
    light[:, dim:] *= 2.0 / weight
    small = MemoryBank(light, PatchCoreConfig(), position=2.0)
    queries = with_positions(feats, 2.0).view(-1, dim + 2).double()
    truth = torch.cdist(queries, light.double()).min(dim=1).values
    read.clear()
    for bf16 in (False, True):
        got = small.patch_scores(feats, bf16=bf16)
        assert torch.allclose(got.view(-1), truth.float(), atol=1e-4, rtol=1e-5), bf16
    assert sum(read) < 0.2 * 2 * len(place) * len(small.bank)  # the cells around each block only


def test_decode_image_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="not a decodable image"):
        decode_image(b"definitely not an image")


def test_models_registered_in_backbone_registry() -> None:
    teacher = create_model(MODEL_NAME, image_size=64)
    student = create_model(STUDENT_NAME, image_size=64)
    x = torch.randn(2, 1, 64, 64)
    assert teacher(x).shape == student(x).shape == (2, 6)
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters()) / 3


def test_training_writes_artifacts(trained_model_dir: Path) -> None:
    cls = latest_artifact(trained_model_dir, "manufacturing", "defect_classifier")
    assert (cls.path / "weights.safetensors").is_file()
    assert cls.config["classes"] == list(NEU_CLASSES)
    assert 0.0 <= cls.metrics["test_accuracy"] <= 1.0
    an = latest_artifact(trained_model_dir, "manufacturing", "anomaly_magnetic_tile")
    assert an.config["classifier_version"] == cls.version
    assert an.metrics["calibration"]["threshold"] > 0
    assert an.metrics["bank_size"] > 0
    # the tiny preset, like the full one, builds the tile detector on two base models (seeds 0 and 1)
    bases = list_artifacts(trained_model_dir, "manufacturing", "anomaly_base_model")
    assert len(bases) == 2 and [b.config["seed"] for b in bases] == [0, 1]
    for base in bases:
        assert (base.path / "weights.safetensors").is_file() and base.metrics["steps"] > 0
    pc = an.config["patchcore"]
    assert pc["features"] == "learned" and pc["base_versions"] == [b.version for b in bases]
    assert an.config["base_paths"] == [str(b.path) for b in bases]


def test_tile_detector_finds_its_base_models_by_recipe_and_seed(
    trained_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """``train --task anomaly`` without ``--base`` reuses the newest base model of the preset's recipe for
    each seed and trains only what is missing: a base model of another recipe is never mixed in."""
    import dataclasses
    import shutil

    from pipelines.manufacturing.anomaly_base import base_models_for
    from pipelines.manufacturing.common import PRESETS

    tiny = PRESETS["tiny"]
    bases = list_artifacts(trained_model_dir, "manufacturing", "anomaly_base_model")
    found = base_models_for(tiny, data_dir, trained_model_dir, seed=0, progress=False)
    assert [a.version for a in found] == [b.version for b in bases]  # nothing trained
    root = tmp_path / "manufacturing" / "anomaly_base_model"
    for b in bases:
        shutil.copytree(b.path, root / b.path.name)
    other = dataclasses.replace(tiny, base_steps=3, anomaly_bases=1)  # another recipe: trained anew
    (new,) = base_models_for(other, data_dir, tmp_path, seed=1, progress=False)
    assert new.version not in {b.version for b in bases}
    assert new.config["steps"] == 3 and new.config["seed"] == 1
    assert [a.version for a in base_models_for(tiny, data_dir, tmp_path, seed=1, progress=False)[:1]] == [
        bases[1].version
    ]


def test_classifier_refit_on_train_and_val(data_dir: Path, tmp_path: Path) -> None:
    """``refit_train_val``: the epoch count comes from the selection run, then a fresh model trains on train +
    val; the artifact records both parts as its training data and the selection run's val accuracy."""
    import dataclasses

    from pipelines.manufacturing.common import PRESETS
    from pipelines.manufacturing.train import train_classify

    preset = dataclasses.replace(PRESETS["tiny"], epochs=2, per_class_limit=4, refit_train_val=True)
    art = train_classify(preset, data_dir, tmp_path, seed=0, progress=False)
    m = art.metrics
    assert m["refit_train_val"] is True and 1 <= m["best_epoch"] <= 2 and m["members"] == 2
    assert m["n_train"] == 2 * 4 * len(NEU_CLASSES)  # 4 train + 4 val images per class
    assert len(art.manifest["data_fingerprint"]) == m["n_train"]
    assert m["val_accuracy"] == max(h["val_accuracy"] for h in m["history"])  # of the selection run
    assert 0.0 <= m["test_accuracy"] <= 1.0


def test_classifier_members_are_averaged_as_one_model(trained_model_dir: Path, data_dir: Path) -> None:
    """The tiny preset trains two members (seeds 0 and 1) like the full preset: the artifact loads as a
    ``DefectNetEnsemble`` whose softmax is the mean of its members' class distributions, whose INT8 copy
    quantizes every member, and whose metrics list each member's test accuracy."""
    from pipelines.manufacturing.data import load_neu, neu_split
    from services.manufacturing.app.model import CLASSIFIER, load_classifier
    from services.manufacturing.app.modeling import DefectNetEnsemble, quantize_defectnet

    art = latest_artifact(trained_model_dir, "manufacturing", CLASSIFIER)
    model, config = load_classifier(art)
    assert config["members"] == 2 and art.metrics["members"] == 2
    assert isinstance(model, DefectNetEnsemble) and len(model.members) == 2
    assert len(art.metrics["member_test_accuracy"]) == 2
    x = load_neu(data_dir, neu_split(data_dir)["test"][::30], model.cfg.image_size).x
    with torch.no_grad():
        each = torch.stack([m(x).softmax(1) for m in model.members])
        out = model(x)
    assert not torch.allclose(each[0], each[1], atol=1e-3)  # different seeds, different members
    torch.testing.assert_close(out.softmax(1), each.mean(0), atol=1e-5, rtol=1e-4)
    assert model.trunk is model.members[0].trunk
    int8 = quantize_defectnet(model, x)
    assert isinstance(int8, DefectNetEnsemble) and len(int8.members) == 2
    with torch.no_grad():
        assert (int8(x).softmax(1) - each.mean(0)).abs().max() < 0.2


def test_evaluate_classify_prints_json_and_plots(trained_model_dir: Path, data_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.manufacturing.evaluate import main

    assert main(["--task", "classify", "--json", "--limit", "10", "--model-dir", str(trained_model_dir),
                 "--data-dir", str(data_dir), "--report-dir", str(tmp_path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert result["n_test"] == 60 and 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["macro_f1"] <= 1.0
    assert np.array(result["confusion_matrix"]).sum() == 60
    assert (tmp_path / "classify_confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_anomaly_magnetic_tile(trained_model_dir: Path, data_dir: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.manufacturing.evaluate import main

    assert main(["--task", "anomaly", "--dataset", "magnetic_tile", "--json", "--limit", "6",
                 "--model-dir", str(trained_model_dir), "--data-dir", str(data_dir),
                 "--report-dir", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= result["image_auroc"] <= 1.0 and 0.0 <= result["pixel_auroc"] <= 1.0
    assert result["n_test_good"] == 6 and result["n_test_defect"] == 30
    assert result["split"] == "test" and result["features"] == "learned"
    assert (tmp_path / "anomaly_magnetic_tile_roc.png").is_file()
    assert main(["--task", "anomaly", "--dataset", "magnetic_tile", "--json", "--limit", "6",
                 "--split", "val", "--model-dir", str(trained_model_dir), "--data-dir", str(data_dir),
                 "--report-dir", str(tmp_path)]) == 0
    val = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert val["split"] == "val" and val["n_test_defect"] == 30
    assert (tmp_path / "anomaly_magnetic_tile_val_roc.png").is_file()


def test_score_sweep_reports_each_level_quantile_on_validation(
    trained_model_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipelines.manufacturing.score_sweep import main

    assert main(["--quantiles", "0,0.8", "--model-dir", str(trained_model_dir), "--data-dir", str(data_dir),
                 "--report-dir", str(tmp_path), "--no-progress"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["split"] == "val" and result["n_good"] == 191 and result["n_defect"] == 130
    off, on = result["quantiles"]["q0"], result["quantiles"]["q0.8"]
    assert off["level_weight"] is None and on["level_weight"] > 0  # fitted on calib_good
    for r in (off, on):
        assert 0.0 <= r["image_auroc"] <= 1.0 and set(r["per_defect_image_auroc"]) == set(MT_DEFECTS)
    assert json.loads((tmp_path / "score_sweep_val.json").read_text()) == result
    assert (tmp_path / "score_sweep_val.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="quantiles"):
        main(["--quantiles", "1.5", "--model-dir", str(trained_model_dir), "--data-dir", str(data_dir)])


def test_position_sweep_builds_a_bank_per_weight_on_validation(
    trained_model_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipelines.manufacturing.position_sweep import main

    assert main(["--weights", "0,60", "--quantiles", "0,0.5", "--coreset", "300", "--bank-input", "5000",
                 "--preset", "tiny", "--model-dir", str(trained_model_dir), "--data-dir", str(data_dir),
                 "--report-dir", str(tmp_path), "--no-progress"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["split"] == "val" and result["n_good"] == 191 and result["n_defect"] == 130
    assert set(result["weights"]) == {"0", "60"} and result["coreset"] == 300
    for row in result["weights"].values():
        assert row["q0"]["level_weight"] is None and row["q0.5"]["level_weight"] > 0
        assert 0.0 <= row["q0.5"]["image_auroc"] <= 1.0 and set(row["q0.5"]["per_defect_image_auroc"]) == set(
            MT_DEFECTS)
    # a different search: the two weights do not rank the images identically
    assert result["weights"]["0"]["q0"] != result["weights"]["60"]["q0"]
    assert json.loads((tmp_path / "position_sweep.json").read_text()) == result
    assert (tmp_path / "position_sweep.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="weights"):
        main(["--weights", "-1", "--model-dir", str(trained_model_dir), "--data-dir", str(data_dir)])


def test_edge_student_distilled_and_quantized(trained_model_dir: Path, data_dir: Path, tmp_path: Path):
    from pipelines.manufacturing.common import PRESETS, Preset
    from pipelines.manufacturing.edge import calibrated_int8, eval_edge, load_student, train_edge

    teacher = latest_artifact(trained_model_dir, "manufacturing", "defect_classifier")
    preset = Preset(**{**PRESETS["tiny"].__dict__, "student_epochs": 1})
    art = train_edge(preset, data_dir, trained_model_dir, teacher, seed=0, progress=False)
    m = art.metrics
    assert m["int8_size_mb"] < m["student_size_mb"] < m["teacher_size_mb"]
    assert 0.0 <= m["int8_test_accuracy"] <= 1.0 and m["size_ratio"] > 1.0
    student = load_student(art)
    x = torch.randn(4, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    assert student(x).shape == (4, 6)
    int8 = calibrated_int8(student, data_dir, per_class_limit=preset.per_class_limit)
    kinds = {type(mod).__module__ for mod in int8.modules()}
    assert "torch.ao.nn.intrinsic.quantized.modules.conv_relu" in kinds  # the trunk: static int8 conv+relu
    assert "torch.ao.nn.quantized.dynamic.modules.linear" in kinds  # the token stage / head: dynamic int8
    with torch.no_grad():
        agree = (int8(x).argmax(1) == student(x).argmax(1)).float().mean()
    assert int8(x).shape == (4, 6) and torch.isfinite(int8(x)).all() and agree >= 0.5
    assert art.config["teacher_version"] == teacher.version
    result = eval_edge(data_dir, trained_model_dir, tmp_path)
    assert result["size_ratio"] > 1.0 and (tmp_path / "edge.json").is_file()


def test_evaluate_open_set_neu_reports_novel_auroc(data_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.manufacturing.evaluate import main

    assert main(["--task", "anomaly", "--dataset", "neu", "--preset", "tiny", "--no-progress", "--json",
                 "--data-dir", str(data_dir), "--report-dir", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["per_held_out_class"]) == set(NEU_CLASSES)
    assert 0.0 <= result["novel_auroc"] <= 1.0 and 0.0 <= result["novel_auroc_msp_mean"] <= 1.0
    assert (tmp_path / "anomaly_neu_open_set.png").is_file()


def test_classifier_cv_pools_train_and_val_and_never_reads_test(data_dir: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """``classifier_cv``: class-stratified folds of train + val, one model per seed and fold scored on the
    held-out fold only, and the seeds' mean distribution scored like the served ensemble."""
    from pipelines.manufacturing.classifier_cv import main, stratified_folds

    labels = np.repeat(np.arange(3), 10)
    folds = stratified_folds(labels, 4)
    assert all(sorted(Counter(folds[labels == c]).values()) == [2, 2, 3, 3] for c in range(3))
    np.testing.assert_array_equal(folds, stratified_folds(labels, 4))  # seeded
    assert main(["--preset", "tiny", "--folds", "2", "--run-folds", "1", "--seeds", "0,1", "--no-progress",
                 "--data-dir", str(data_dir), "--report-dir", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 12 * len(NEU_CLASSES) and result["run_folds"] == [1]  # half of 12 train + 12 val
    test_stems = {Path(f).stem for f in neu_split(data_dir)["test"]}
    for row in [*result["seeds"].values(), result["ensemble"]]:
        assert row["errors"] == sum(row["errors_per_fold"]) == len(row["misclassified"])
        assert math.isclose(row["accuracy"], 1 - row["errors"] / result["n"], abs_tol=1e-4)
        assert not {m.split(" -> ")[0] for m in row["misclassified"]} & test_stems
    assert set(result["seeds"]) == {"0", "1"}
    assert (tmp_path / "classifier_cv.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "classifier_cv.json").read_text())["n"] == result["n"]
