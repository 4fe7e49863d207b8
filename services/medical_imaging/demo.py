"""Demo: send a real CT series (zip) and a real chest X-ray (PNG) to the service; print the reports.

``exercise(base_url, data_dir)`` is called by ``make demo`` once the services are up. With
``KAFKA_BOOTSTRAP_SERVERS`` set it also sends the chest X-ray through ``imaging-requests`` and waits for its
report on ``diagnosis-reports``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np

CT_SERIES = "ct_examples/example_ct_dicom"
CXR_NPZ = ("pneumoniamnist/pneumoniamnist.npz", "pneumoniamnist/pneumoniamnist_reconstructed.npz")


def _cxr_png(data_dir: Path, index: int) -> tuple[bytes, int]:
    from PIL import Image

    for name in CXR_NPZ:
        path = data_dir / name
        if path.is_file():
            with np.load(path) as z:
                img, label = z["test_images"][index], int(z["test_labels"][index][0])
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            return buf.getvalue(), label
    raise RuntimeError(f"no PneumoniaMNIST npz under {data_dir / 'pneumoniamnist'}")


def _ct_zip(data_dir: Path) -> tuple[bytes, int]:
    folder = data_dir / CT_SERIES
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not files:
        raise RuntimeError(f"no DICOM files in {folder}")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in files:
            zf.write(p, f"series/{p.name}")
    return buf.getvalue(), len(files)


def _check_report(report: dict[str, Any], what: str, dims: int) -> None:
    p = report["finding"]["probability"]
    if not 0.0 <= p <= 1.0:
        raise RuntimeError(f"{what}: probability {p} outside [0, 1]")
    unc = report.get("uncertainty")
    if unc is None or not unc["interval_95"][0] <= unc["mean"] <= unc["interval_95"][1] + 1e-9:
        raise RuntimeError(f"{what}: missing or inconsistent uncertainty {unc}")
    if report["input"]["dims"] != dims or report["model"]["key"] != f"{dims}d":
        raise RuntimeError(
            f"{what}: routed to the {report['model']['key']} model for a {report['input']['dims']}-D input"
        )


def _line(what: str, r: dict[str, Any], truth: str = "") -> str:
    u = r["uncertainty"]
    lo, hi = u["interval_95"]
    inp = r["input"]
    sp = "x".join(f"{s:.2f}" for s in inp["spacing_mm"]) if inp["spacing_mm"] else "-"
    return (
        f"{what:<26} {inp['modality']:<3} {'x'.join(map(str, inp['size'])):<12} sp {sp:<16} "
        f"-> {r['finding']['label']:<22} p={u['mean']:.3f} +-{u['std']:.3f} 95%[{lo:.2f},{hi:.2f}] "
        f"H={u['predictive_entropy']:.2f} review={'YES' if r['needs_review'] else 'no'}{truth} "
        f"[{r['model']['name']} {r['model']['version']}]"
    )


def _kafka_roundtrip(png: bytes, timeout_s: float = 60.0) -> dict[str, Any] | None:
    servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not servers:
        return None
    from backbone.kafka import make_consumer
    from kafka import KafkaProducer

    request_id = f"demo-{uuid.uuid4().hex[:12]}"
    consumer = make_consumer(
        servers,
        "diagnosis-reports",
        group_id=f"demo-{uuid.uuid4().hex[:8]}",
        consumer_timeout_ms=1000,
    )
    producer = KafkaProducer(bootstrap_servers=servers)
    msg = {
        "request_id": request_id,
        "files": [{"filename": "cxr.png", "content_base64": base64.b64encode(png).decode()}],
    }
    producer.send("imaging-requests", json.dumps(msg).encode(), key=request_id.encode()).get(timeout=30)
    producer.close()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=1000).values():
                for rec in batch:
                    value = json.loads(rec.value)
                    if value.get("request_id") == request_id:
                        return value["report"]
    finally:
        consumer.close()
    raise RuntimeError(f"no diagnosis-reports message for {request_id} within {timeout_s:.0f} s")


def exercise(base_url: str, data_dir: Path) -> list[str]:
    """Send real studies over HTTP (and Kafka when configured); return the report lines."""
    data_dir = Path(data_dir)
    lines: list[str] = []
    with httpx.Client(base_url=base_url, timeout=180.0) as client:
        models = client.get("/v1/models")
        if models.status_code != 200:
            raise RuntimeError(f"/v1/models answered {models.status_code}: {models.text[:300]}")
        for card in models.json()["models"]:
            lines.append(
                f"model {card['key']}: {card['name']} {card['version']} - trained on {card['trained_on']}"
            )

        png, label = _cxr_png(data_dir, 0)
        r = client.post(
            "/v1/diagnose", files=[("files", ("cxr.png", png, "image/png"))], data={"saliency": "true"}
        )
        if r.status_code != 200:
            raise RuntimeError(f"chest X-ray: {r.status_code} {r.text[:300]}")
        cxr = r.json()
        _check_report(cxr, "chest X-ray", 2)
        if not cxr.get("saliency_png_base64"):
            raise RuntimeError("chest X-ray: saliency requested but missing")
        truth = " (label: pneumonia)" if label == 1 else " (label: normal)"
        lines.append(_line("chest X-ray PNG (test #0)", cxr, truth))

        zipped, n = _ct_zip(data_dir)
        job = client.post(
            "/v1/studies",
            files=[("files", ("ct_series.zip", zipped, "application/zip"))],
            data={"dicom_sr": "true"},
        )
        if job.status_code != 202:
            raise RuntimeError(f"CT series job: {job.status_code} {job.text[:300]}")
        url = job.json()["status_url"]
        deadline = time.monotonic() + 180
        while True:
            state = client.get(url).json()
            if state["status"] in ("done", "failed") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if state["status"] != "done":
            raise RuntimeError(f"CT series job ended {state['status']}: {state.get('error')}")
        ct = state["report"]
        _check_report(ct, "CT series", 3)
        if ct["input"]["n_files"] != n or ct["input"]["modality"] != "CT":
            raise RuntimeError(f"CT series: expected {n} CT slices, got {ct['input']}")
        if not ct.get("dicom_sr_base64"):
            raise RuntimeError("CT series: DICOM SR requested but missing")
        lines.append(_line(f"CT series zip ({n} slices)", ct))
        lines.append(
            f"  CT note: {ct['review_reasons'][-1]}" if ct["review_reasons"] else "  CT: no review flag"
        )
        lines.append(
            f"  CT DICOM SR: {len(base64.b64decode(ct['dicom_sr_base64']))} bytes (Comprehensive 3D SR)"
        )

        bad = client.post("/v1/diagnose", files=[("files", ("notes.txt", b"not an image", "text/plain"))])
        if bad.status_code != 415:
            raise RuntimeError(f"a text file should be rejected with 415, got {bad.status_code}")
        lines.append(f"non-image upload -> {bad.status_code} {bad.json()['error']}")

    kafka_report = _kafka_roundtrip(png)
    if kafka_report is not None:
        _check_report(kafka_report, "chest X-ray via Kafka", 2)
        lines.append(_line("chest X-ray via Kafka", kafka_report))
    return lines


if __name__ == "__main__":
    import sys

    base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8001"
    data = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(os.environ.get("DATA_DIR", "../shared/data"))
    print("\n".join(exercise(base, data)))
