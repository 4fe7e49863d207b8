"""Demo of the inspection service with real data: two lines registered over HTTP (magnetic tile
defect-free images; NEU steel images of five known classes), real images inspected, Kafka checked."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx

from pipelines.manufacturing.data import MT_DEFECTS, mt_split, neu_label, neu_split


def _files(paths: list[Path], field: str) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def _register(
    client: httpx.Client, line_id: str, good: list[Path], description: str, key: str, **fields: str
) -> dict:
    r = client.post("/v1/lines", data={"line_id": line_id, "description": description, **fields},
                    files=_files(good, "good"), headers={"X-API-Key": key})
    if r.status_code not in (202, 409):  # 409: registered by an earlier demo run (persisted)
        raise RuntimeError(f"POST /v1/lines {line_id}: {r.status_code} {r.text[:300]}")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = client.get(f"/v1/lines/{line_id}").json()
        if line["state"] == "ready":
            return line
        if line["state"] in ("failed", "stale"):
            raise RuntimeError(f"line {line_id} {line['state']}: {line['message']}")
        time.sleep(0.5)
    raise RuntimeError(f"line {line_id} not ready after 300 s")


def _inspect(
    client: httpx.Client, line_id: str, paths: list[Path], truth: list[str]
) -> tuple[dict, list[str]]:
    r = client.post("/v1/inspect", data={"line_id": line_id, "heatmap": "true"}, files=_files(paths, "files"))
    if r.status_code != 200:
        raise RuntimeError(f"POST /v1/inspect {line_id}: {r.status_code} {r.text[:300]}")
    body = r.json()
    if body["n_images"] != len(paths):
        raise RuntimeError(f"asked for {len(paths)} inspections, got {body['n_images']}")
    rows = []
    for res, t in zip(body["results"], truth, strict=True):
        if abs(sum(res["probabilities"].values()) - 1) > 1e-3 or not res["heatmap_png_base64"]:
            raise RuntimeError(f"malformed result for {res['filename']}")
        if res["passed"] != (res["anomaly_score"] <= res["threshold"]):
            raise RuntimeError(f"pass/fail inconsistent with the threshold for {res['filename']}")
        verdict = "PASS" if res["passed"] else "FAIL"
        rows.append(f"  {line_id:<14} {res['filename'][:24]:<24} {t:<16} {res['predicted_class']:<16} "
                    f"{res['anomaly_score']:7.3f} {res['threshold']:7.3f} {verdict}")
    return body, rows


def _kafka_count(inspection_ids: set[str], topic: str) -> int | None:
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        return None
    from backbone.kafka import make_consumer

    consumer = make_consumer(bootstrap, topic, consumer_timeout_ms=8000)
    n = 0
    try:
        for record in consumer:
            if json.loads(record.value).get("inspection_id") in inspection_ids:
                n += 1
    finally:
        consumer.close()
    return n


def exercise(base_url: str, data_dir: Path) -> list[str]:
    """Register two lines from real images, inspect real images on three lines, return a result table."""
    key = os.environ.get("API_KEY", "")
    mt_root, neu_root = data_dir / "magnetic_tile", data_dir / "neu_det"
    mt, neu = mt_split(data_dir), neu_split(data_dir)
    out = ["manufacturing: line / image / truth / predicted NEU class / anomaly score / threshold / verdict"]
    with httpx.Client(base_url=base_url, timeout=300) as client:
        lines = {line["line_id"]: line for line in client.get("/v1/lines").json()["lines"]}
        if "magnetic_tile" not in lines:
            raise RuntimeError(f"default line magnetic_tile missing: {sorted(lines)}")
        # line 1: magnetic tiles, from 24 held-out defect-free tiles the base model never saw
        tile_line = _register(client, "tile-line-2", [mt_root / f for f in mt["test_good"][:24]],
                              "magnetic tile, second press (demo)", key)
        # line 2: steel strip whose normal surface shows five NEU textures; 'scratches' never seen there
        known = [c for c in ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale")]
        steel_good = [neu_root / f for c in known for f in [x for x in neu["train"] if neu_label(x) == c][:6]]
        # steel surface textures have no fixed place in the image: compare patches at any position
        steel_line = _register(client, "steel-line-1", steel_good, "NEU steel, scratches unseen (demo)", key,
                               position_weight="0")
        out.append(f"  registered tile-line-2 ({tile_line['n_good_images']} good, threshold "
                   f"{tile_line['threshold']:.3f}) and steel-line-1 ({steel_line['n_good_images']} good, "
                   f"threshold {steel_line['threshold']:.3f}) without retraining")
        for line in (tile_line, steel_line):
            if (line.get("calibration") or {}).get("suspect_good"):
                out.append(f"  {line['line_id']}: {line['message']}")
        ids: set[str] = set()
        failed = 0
        # default line: 2 held-out good tiles + one of each defect type
        paths = [mt_root / f for f in mt["test_good"][-2:]]
        paths += [mt_root / mt["test_defect"][d][0] for d in MT_DEFECTS]
        truth = ["good", "good", *MT_DEFECTS]
        body, rows = _inspect(client, "magnetic_tile", paths, truth)
        ids.add(body["inspection_id"])
        failed += body["n_failed"]
        out += rows
        paths = [mt_root / f for f in mt["test_good"][30:32]] + [mt_root / mt["test_defect"][d][1] for d in
                                                                  ("Blowhole", "Break")]
        body, rows = _inspect(client, "tile-line-2", paths, ["good", "good", "Blowhole", "Break"])
        ids.add(body["inspection_id"])
        failed += body["n_failed"]
        out += rows
        test_known = [x for x in neu["test"] if neu_label(x) in known][::60][:3]
        test_novel = [x for x in neu["test"] if neu_label(x) == "scratches"][:3]
        paths = [neu_root / f for f in test_known + test_novel]
        truth = [f"{neu_label(f)} (known)" for f in test_known] + ["scratches (new)"] * 3
        body, rows = _inspect(client, "steel-line-1", paths, truth)
        ids.add(body["inspection_id"])
        failed += body["n_failed"]
        out += rows
        published = _kafka_count(ids, os.environ.get("TOPIC_RESULTS", "inspection-results"))
        if published is not None:
            n_total = 7 + 4 + 6
            out.append(f"  kafka inspection-results: {published} of {n_total} records of this run seen")
        out.append(f"  {failed} of 17 images failed inspection")
    return out
