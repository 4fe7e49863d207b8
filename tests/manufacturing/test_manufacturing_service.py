"""The inspection service over HTTP (TestClient, lifespan on), on the artifacts of the tiny real training."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from services.manufacturing.app.core.config import Settings
from services.manufacturing.app.main import create_app

KEY = "test-key"


def _settings(model_dir: Path, lines_dir: Path, **kw: object) -> Settings:
    return Settings(model_dir=model_dir, api_key=KEY, lines_dir=str(lines_dir), kafka_bootstrap_servers=None,
                    **kw)


def _files(paths: list[Path], field: str = "files") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def _wait_ready(client: TestClient, line_id: str, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = client.get(f"/v1/lines/{line_id}").json()
        if body["state"] != "building":
            return body
        time.sleep(0.2)
    raise AssertionError(f"line {line_id} still building after {timeout_s}s")


@pytest.fixture(scope="module")
def images(data_dir: Path) -> dict[str, list[Path]]:
    mt = data_dir / "magnetic_tile"
    neu = data_dir / "neu_det" / "IMAGES"
    return {
        "mt_good": sorted((mt / "MT_Free" / "Imgs").glob("*.jpg"))[:2],
        "mt_defect": sorted((mt / "MT_Crack" / "Imgs").glob("*.jpg"))[:2],
        "scratches": sorted(neu.glob("scratches_*.jpg"))[:12],
    }


@pytest.fixture(scope="module")
def client(trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    lines_dir = tmp_path_factory.mktemp("lines")
    with TestClient(create_app(_settings(trained_model_dir, lines_dir, max_image_mb=0.5))) as c:
        yield c


def test_ready_and_default_line(client: TestClient) -> None:
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    lines = client.get("/v1/lines").json()["lines"]
    tile = next(line for line in lines if line["line_id"] == "magnetic_tile")
    assert tile["state"] == "ready" and tile["source"] == "artifact"
    assert tile["threshold"] > 0 and tile["calibration"]["n_good"] > 0 and tile["bank_size"] > 0
    assert tile["position_weight"] == 60.0  # the preset's: tiles are photographed in one pose


def test_inspect_real_images_with_heatmap(client: TestClient, images: dict[str, list[Path]]) -> None:
    paths = images["mt_good"][:1] + images["mt_defect"][:1]
    r = client.post("/v1/inspect", data={"line_id": "magnetic_tile", "heatmap": "true"}, files=_files(paths))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["n_images"] == 2 and body["published"] is False
    assert body["n_failed"] == sum(not x["passed"] for x in body["results"])
    for res, path in zip(body["results"], paths, strict=True):
        assert res["filename"] == path.name
        assert abs(sum(res["probabilities"].values()) - 1.0) < 1e-3
        assert res["predicted_class"] == max(res["probabilities"], key=res["probabilities"].get)
        assert res["passed"] == (res["anomaly_score"] <= res["threshold"])
        png = Image.open(io.BytesIO(base64.b64decode(res["heatmap_png_base64"])))
        with Image.open(path) as orig:
            assert png.format == "PNG" and png.size == orig.size == (res["width"], res["height"])
        # a white frame around the square the score comes from (the preset leaves a 15 % band out of it)
        w, h = png.size
        rgb = png.convert("RGB")
        white = (255, 255, 255)  # the overlay's colours are never pure white: only the frame is
        assert white in [rgb.getpixel((x, h // 2)) for x in range(int(0.1 * w), int(0.2 * w) + 1)]
        assert white in [rgb.getpixel((w // 2, y)) for y in range(int(0.1 * h), int(0.2 * h) + 1)]
        assert white not in [rgb.getpixel((x, h // 2)) for x in range(int(0.25 * w), int(0.75 * w))]


def test_inspect_without_heatmap_omits_it(client: TestClient, images: dict[str, list[Path]]) -> None:
    r = client.post("/v1/inspect", data={"line_id": "magnetic_tile"}, files=_files(images["mt_good"][:1]))
    assert r.status_code == 200 and r.json()["results"][0]["heatmap_png_base64"] is None


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        ((b"just some text", "notes.txt"), 415, "invalid_image"),
        (("TRUNCATED", "broken.jpg"), 415, "invalid_image"),
        ((b"\xff" * 600_000, "huge.jpg"), 413, "payload_too_large"),
        ((b"", "empty.jpg"), 422, "empty_file"),
    ],
)
def test_inspect_bad_files(client: TestClient, images: dict[str, list[Path]], payload: tuple, status: int,
                           code: str) -> None:
    data, name = payload
    if data == "TRUNCATED":
        data = images["mt_good"][0].read_bytes()[:400]
    files = [("files", (name, data, "image/jpeg"))]
    r = client.post("/v1/inspect", data={"line_id": "magnetic_tile"}, files=files)
    assert r.status_code == status, r.text
    assert r.json()["error"] == code
    assert name in json.dumps(r.json()["detail"])


def test_inspect_sixteen_bit_frames_and_oversized_ones(
    client: TestClient, images: dict[str, list[Path]]
) -> None:
    """A 16-bit PNG of a tile, as industrial cameras write them, is scored like its 8-bit original (PIL's own
    conversion would make it a white image); a frame over the pixel limit is refused before decoding."""
    with Image.open(images["mt_defect"][0]) as im:
        grey = np.asarray(im.convert("L"))

    def png(arr: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        return buf.getvalue()

    files = [("files", ("tile8.png", png(grey), "image/png")),
             ("files", ("tile16.png", png(grey.astype(np.uint16) * 257), "image/png"))]  # fmt: skip
    r = client.post("/v1/inspect", data={"line_id": "magnetic_tile"}, files=files)
    assert r.status_code == 200, r.text
    eight, sixteen = r.json()["results"]
    assert sixteen["anomaly_score"] == pytest.approx(eight["anomaly_score"], rel=1e-5)
    assert sixteen["predicted_class"] == eight["predicted_class"]
    huge = png(np.zeros((6500, 6500), dtype=np.uint8))  # 42 M pixels, a few kB compressed
    files = [("files", ("huge.png", huge, "image/png"))]
    r = client.post("/v1/inspect", data={"line_id": "magnetic_tile"}, files=files)
    assert r.status_code == 413 and r.json()["error"] == "image_too_large", r.text


def test_inspect_unknown_line_and_missing_fields(client: TestClient, images: dict[str, list[Path]]) -> None:
    r = client.post("/v1/inspect", data={"line_id": "no-such-line"}, files=_files(images["mt_good"][:1]))
    assert r.status_code == 404 and r.json()["error"] == "unknown_line"
    r = client.post("/v1/inspect", data={"line_id": "magnetic_tile"})
    assert r.status_code == 422 and r.json()["error"] == "validation_error"
    r = client.post("/v1/inspect", files=_files(images["mt_good"][:1]))
    assert r.status_code == 422


def test_register_line_auth_and_validation(client: TestClient, images: dict[str, list[Path]]) -> None:
    good = _files(images["scratches"][:8], "good")
    assert client.post("/v1/lines", data={"line_id": "x1"}, files=good).status_code == 401
    r = client.post("/v1/lines", data={"line_id": "x1"}, files=good, headers={"X-API-Key": "wrong"})
    assert r.status_code == 403
    r = client.post("/v1/lines", data={"line_id": "Bad Id!"}, files=good, headers={"X-API-Key": KEY})
    assert r.status_code == 422 and r.json()["error"] == "invalid_line_id"
    r = client.post("/v1/lines", data={"line_id": "x1"}, files=good[:3], headers={"X-API-Key": KEY})
    assert r.status_code == 422 and r.json()["error"] == "too_few_images"
    bad = good[:6] + [("good", ("junk.jpg", b"nope", "image/jpeg"))]
    r = client.post("/v1/lines", data={"line_id": "x1"}, files=bad, headers={"X-API-Key": KEY})
    assert r.status_code == 415
    for weight in ("-1", "abc", "5000"):
        r = client.post("/v1/lines", data={"line_id": "x1", "position_weight": weight}, files=good,
                        headers={"X-API-Key": KEY})
        assert r.status_code == 422 and "position_weight" in r.text, (weight, r.text)
    assert client.get("/v1/lines/x1").status_code == 404  # nothing half-registered


def test_register_line_then_inspect_and_persist(client: TestClient, images: dict[str, list[Path]],
                                                trained_model_dir: Path) -> None:
    r = client.post(
        "/v1/lines",
        data={"line_id": "steel-scratches", "description": "NEU line", "position_weight": "30"},
        files=_files(images["scratches"][:10], "good") + _files(images["mt_defect"][:2], "defects"),
        headers={"X-API-Key": KEY},
    )
    assert r.status_code == 202, r.text
    assert r.json()["status_url"] == "/v1/lines/steel-scratches"
    line = _wait_ready(client, "steel-scratches")
    assert line["state"] == "ready", line
    assert line["n_good_images"] == 10 and line["n_defect_images"] == 2 and line["bank_size"] > 0
    assert line["position_weight"] == 30.0  # as asked (the default, 0, is PatchCore's search anywhere)
    cal = line["calibration"]
    assert cal["n_defect"] == 2 and cal["threshold"] == line["threshold"]
    # ten good images: 5-fold cross-fitted, each one a calibration score (not only a held-out quarter)
    # (suspects, good images far above the rest, are left out of the calibration)
    assert cal["cross_fit_folds"] == 5 and cal["n_good"] == 10 - len(cal["suspect_good"])
    dup = client.post("/v1/lines", data={"line_id": "steel-scratches"},
                      files=_files(images["scratches"][:8], "good"), headers={"X-API-Key": KEY})
    assert dup.status_code == 409 and dup.json()["error"] == "line_exists"
    r = client.post("/v1/inspect", data={"line_id": "steel-scratches"},
                    files=_files(images["scratches"][10:12] + images["mt_good"][:1]))
    assert r.status_code == 200
    results = r.json()["results"]
    assert {x["threshold"] for x in results} == {line["threshold"]}
    assert client.get("/v1/lines").json()["active_line"] == "steel-scratches"
    # the image score's level term was fitted on the out-of-fold good scores (the preset turns it on) and is
    # listed with the line
    bank = client.app.state.runtime.require_model().lines["steel-scratches"].bank
    assert bank.level is not None
    assert line["image_score"] == pytest.approx(
        {"level_quantile": 0.5, "level_weight": bank.level[1], "level_offset": bank.level[2]})
    # the registered line survives a restart of the service (persisted bank, level term and calibration):
    # the same images get the same scores
    lines_dir = client.app.state.runtime.settings.lines_dir
    with TestClient(create_app(_settings(trained_model_dir, Path(lines_dir)))) as again:
        reloaded = again.get("/v1/lines/steel-scratches").json()
        assert reloaded["state"] == "ready" and reloaded["threshold"] == pytest.approx(line["threshold"])
        assert reloaded["image_score"] == pytest.approx(line["image_score"])
        assert reloaded["position_weight"] == 30.0
        r2 = again.post("/v1/inspect", data={"line_id": "steel-scratches"},
                        files=_files(images["scratches"][10:12] + images["mt_good"][:1]))
        assert [x["anomaly_score"] for x in r2.json()["results"]] == pytest.approx(
            [x["anomaly_score"] for x in results], rel=1e-5)


def test_lines_built_on_other_features_are_stale(trained_model_dir: Path, tmp_path: Path,
                                                images: dict[str, list[Path]]) -> None:
    """A line persisted by the filter-bank detector (same classifier) is listed as stale, not loaded, once the
    service runs the self-supervised base model."""
    from backbone.artifacts import latest_artifact

    an = latest_artifact(trained_model_dir, "manufacturing", "anomaly_magnetic_tile")
    old_pc = {**an.config["patchcore"], "features": "filterbank", "base_versions": []}
    (tmp_path / "old-line").mkdir()
    (tmp_path / "old-line" / "line.json").write_text(json.dumps(
        {"line_id": "old-line", "classifier_version": an.config["classifier_version"], "patchcore": old_pc}))
    with TestClient(create_app(_settings(trained_model_dir, tmp_path))) as c:
        body = c.get("/v1/lines/old-line").json()
        assert body["state"] == "stale" and "filterbank" in body["message"]
        r = c.post("/v1/inspect", data={"line_id": "old-line"}, files=_files(images["mt_good"][:1]))
        assert r.status_code == 409 and r.json()["error"] == "line_not_ready"


def test_onboarding_report_compares_held_out_and_cross_fitted_lines(
    trained_model_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``pipelines.manufacturing.onboarding`` builds lines both ways (held-out quarter, K-fold cross-fitting)
    and measures them on the magnetic-tile test part."""
    from pipelines.manufacturing import onboarding

    argv = ["--n", "8", "--draws", "1", "--model-dir", str(trained_model_dir), "--data-dir", str(data_dir),
            "--report-dir", str(tmp_path), "--no-progress"]  # fmt: skip
    assert onboarding.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["summary"]) == {"n8_hold_out", "n8_cross_fit"} and out["test_good"] == 190
    assert out["position_weight"] == 0.0  # a REST line's default: PatchCore's search anywhere
    for figures in out["summary"].values():
        assert 0.0 <= figures["false_reject_rate_mean"] <= 1.0 and 0.0 <= figures["image_auroc_mean"] <= 1.0
    assert (tmp_path / "onboarding.png").stat().st_size > 1000
    assert len(json.loads((tmp_path / "onboarding.json").read_text())["lines"]) == 2


def test_evaluate_a_line_from_a_folder_in_the_mvtec_layout(
    trained_model_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Data the models never saw, laid out as MVTec AD: the line is built from train/good as POST /v1/lines
    builds it, and scored on test/good and the defect folders (pixel AUROC from ground_truth masks)."""
    import shutil

    from pipelines.manufacturing import evaluate

    mt, root = data_dir / "magnetic_tile", tmp_path / "line7"
    layout = {"train/good": sorted((mt / "MT_Free" / "Imgs").glob("*.jpg"))[:8],
              "test/good": sorted((mt / "MT_Free" / "Imgs").glob("*.jpg"))[-4:],
              "test/crack": sorted((mt / "MT_Crack" / "Imgs").glob("*.jpg"))[:3],
              "test/blowhole": sorted((mt / "MT_Blowhole" / "Imgs").glob("*.jpg"))[:3]}  # fmt: skip
    for sub, files in layout.items():
        (root / sub).mkdir(parents=True)
        for f in files:
            shutil.copy(f, root / sub / f.name)
            if sub.startswith("test/") and sub != "test/good":  # the tile masks, renamed as MVTec names them
                (root / "ground_truth" / sub[5:]).mkdir(parents=True, exist_ok=True)
                shutil.copy(f.with_suffix(".png"), root / "ground_truth" / sub[5:] / f"{f.stem}_mask.png")
    argv = ["--task", "anomaly", "--dataset", str(root), "--model-dir", str(trained_model_dir),
            "--report-dir", str(tmp_path / "rep")]  # fmt: skip
    assert evaluate.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["per_defect_image_auroc"]) == {"crack", "blowhole"} and 0.0 <= out["image_auroc"] <= 1.0
    assert out["pixel_auroc"] is not None and out["n_train_good"] == 8 and out["n_test_defect"] == 6
    assert out["calibration"]["cross_fit_folds"] == 5
    assert (tmp_path / "rep" / "anomaly_line7_roc.png").is_file()
    shutil.rmtree(root / "test" / "good")
    with pytest.raises(FileNotFoundError, match="test/good"):  # the command: one line, exit status 2
        evaluate.main(argv)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_good_image_unlike_the_others_is_left_out_of_bank_and_threshold(client: TestClient) -> None:
    """One 'good' upload that a bank of the others finds far more anomalous than the rest (a defect sent as
    good) must not lift the line's threshold above the defect itself, nor sit in the bank as normal."""
    rng = np.random.default_rng(0)
    goods = [rng.normal(128, 12, (96, 96)).clip(0, 255) for _ in range(10)]
    odd = rng.normal(128, 12, (96, 96))
    odd[24:72, 24:72] = 255.0  # a bright block the other ten never show
    files = [("good", (f"g{i}.png", _png(g), "image/png")) for i, g in enumerate([*goods, odd])]
    r = client.post("/v1/lines", data={"line_id": "odd-one"}, files=files, headers={"X-API-Key": KEY})
    assert r.status_code == 202, r.text
    line = _wait_ready(client, "odd-one")
    cal = line["calibration"]
    assert line["state"] == "ready" and 10 in cal["suspect_good"], line
    # (ten near-identical noise images: their own scores spread so little that one more may be listed)
    assert line["n_good_images"] == 11 and cal["n_good"] == 11 - len(cal["suspect_good"])
    assert "left out of the bank and the threshold" in line["message"]
    fresh = rng.normal(128, 12, (96, 96)).clip(0, 255)
    files = [("files", (name, _png(x), "image/png")) for name, x in (("odd.png", odd), ("g.png", fresh))]
    r = client.post("/v1/inspect", data={"line_id": "odd-one"}, files=files)
    assert r.status_code == 200, r.text
    odd_res, good_res = r.json()["results"]
    assert not odd_res["passed"] and odd_res["anomaly_score"] > line["threshold"]
    assert good_res["anomaly_score"] < odd_res["anomaly_score"]
