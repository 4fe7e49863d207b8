"""REST routes: ``POST /v1/inspect``, ``POST /v1/lines``, ``GET /v1/lines``, ``GET /v1/lines/{line_id}``."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from backbone.service.app import ServiceRuntime, require_api_key
from backbone.service.errors import ServiceError
from backbone.service.images import ImageTooLarge
from backbone.service.metrics import LATENCY_BUCKETS, PREDICTIONS
from backbone.service.security import read_upload_limited
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse
from PIL import Image
from prometheus_client import Counter, Histogram

from pipelines.manufacturing.data import decode_image
from services.manufacturing.app.model import LINE_ID_RE, InspectionModel
from services.manufacturing.app.schemas import (
    InspectionEvent,
    InspectionOut,
    InspectResponse,
    LineAccepted,
    LineOut,
    LinesOut,
)

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["manufacturing"])

INSPECTIONS = Counter(
    "manufacturing_inspections_total", "Images inspected.", ["service", "line", "outcome"]
)
INSPECT_LATENCY = Histogram(
    "manufacturing_inspect_seconds", "Inspect model time.", ["service"], buckets=LATENCY_BUCKETS
)
LINE_BUILDS = Counter("manufacturing_line_builds_total", "Line registrations.", ["service", "outcome"])
PUBLISH_FAILURES = Counter(
    "manufacturing_publish_failures_total", "Inspections whose Kafka events were not stored.", ["service"]
)


def _runtime(request: Request) -> ServiceRuntime:
    """The app's runtime (``backbone.service.app.get_runtime`` is now an async FastAPI dependency)."""
    return request.app.state.runtime


def _model(request: Request) -> InspectionModel:
    return _runtime(request).require_model()


async def _read_images(request: Request, files: list[UploadFile], what: str) -> list[tuple[str, Image.Image]]:
    """Read and decode uploads: 413 above the per-image byte or pixel limit, 415 for non-images / corrupt
    images."""
    settings = _runtime(request).settings
    max_bytes = int(settings.max_image_mb * 1024 * 1024)
    out = []
    for i, f in enumerate(files):
        name = f.filename or f"{what}[{i}]"
        data = await read_upload_limited(f, max_bytes)
        if not data:
            raise ServiceError(422, "empty_file", f"{name!r} is empty")
        try:
            img = decode_image(data, max_pixels=settings.max_image_pixels)
        except ImageTooLarge as exc:
            raise ServiceError(413, "image_too_large", f"{name!r}: {exc}") from exc
        except ValueError as exc:
            raise ServiceError(415, "invalid_image", f"{name!r}: {exc}") from exc
        out.append((name, img))
    return out


def _line_out(summary: dict[str, Any]) -> LineOut:
    return LineOut.model_validate(summary)


@router.post("/inspect", response_model=InspectResponse)
async def inspect(
    request: Request,
    files: Annotated[list[UploadFile], File(description="one or more images (JPEG, PNG, BMP, TIFF...)")],
    line_id: Annotated[str, Form(description="production line id (GET /v1/lines)")],
    heatmap: Annotated[bool, Form(description="include a PNG heat-map overlay per image")] = False,
) -> InspectResponse:
    """Classify each image (NEU defect type), score it against the line's memory bank, pass/fail on the
    line's threshold, optionally with a heat map. Every result goes to Kafka ``inspection-results``,
    failures also to ``defect-alerts``."""
    runtime = _runtime(request)
    settings = runtime.settings
    model = _model(request)
    line = model.lines.get(line_id)
    if line is None:
        raise ServiceError(404, "unknown_line", f"no line {line_id!r}; known: {sorted(model.lines)}")
    if line.state != "ready":
        raise ServiceError(409, "line_not_ready", f"line {line_id!r} is {line.state}: {line.message}")
    if len(files) > settings.max_images_per_request:
        raise ServiceError(413, "too_many_images", f"{len(files)} images > {settings.max_images_per_request}")
    images = await _read_images(request, files, "files")
    with INSPECT_LATENCY.labels(settings.service_name).time():
        results = await asyncio.to_thread(model.inspect, [im for _, im in images], line_id, heatmap)
    inspection_id = uuid.uuid4().hex
    outs = [
        InspectionOut(filename=name, line_id=line_id, **r)
        for (name, _), r in zip(images, results, strict=True)
    ]
    for o in outs:
        INSPECTIONS.labels(settings.service_name, line_id, "pass" if o.passed else "fail").inc()
    PREDICTIONS.labels(settings.service_name, "inspect").inc(len(outs))
    published = await _publish(request, inspection_id, model.info.version, outs)
    return InspectResponse(
        inspection_id=inspection_id, line_id=line_id, model_version=model.info.version, n_images=len(outs),
        n_failed=sum(not o.passed for o in outs), results=outs, published=published,
    )


def _send_events(request: Request, inspection_id: str, version: str, outs: list[InspectionOut]) -> list[Any]:
    """Send every inspection to ``inspection-results`` and every failed one to ``defect-alerts`` too; returns
    the send futures (none without Kafka)."""
    producer = getattr(request.app.state, "producer", None)
    if producer is None:
        return []
    settings = _runtime(request).settings
    now = datetime.now(UTC).isoformat()
    futures = []
    for o in outs:
        event = InspectionEvent(
            inspection_id=inspection_id, line_id=o.line_id, filename=o.filename, model_version=version,
            predicted_class=o.predicted_class, confidence=o.confidence, anomaly_score=o.anomaly_score,
            threshold=o.threshold, passed=o.passed, timestamp=now,
        )
        futures.append(producer.send(settings.topic_results, event, key=o.line_id))
        if not o.passed:
            futures.append(producer.send(settings.topic_alerts, event, key=o.line_id))
    return futures


async def _publish(request: Request, inspection_id: str, version: str, outs: list[InspectionOut]) -> bool:
    """Publish the inspection's events and wait for the broker's acknowledgements (``publish_timeout_s``), so
    that ``published`` in the answer means stored by Kafka. A failure is logged and counted, and the
    inspection itself is still answered (``published: false``). After a failure the answers stop waiting for
    ``publish_backoff_s`` (the events are still sent, and failures counted): during a Kafka outage only one
    request in that interval waits, instead of every inspection of the line."""
    settings = _runtime(request).settings
    state = request.app.state
    failed = PUBLISH_FAILURES.labels(settings.service_name)
    wait = time.monotonic() >= getattr(state, "publish_wait_after", 0.0)

    def send_and_wait() -> bool:
        futures = _send_events(request, inspection_id, version, outs)
        if not futures:
            return False
        if not wait:
            for f in futures:
                f.add_errback(lambda _exc: failed.inc())
            return False
        for f in futures:
            f.get(timeout=settings.publish_timeout_s)
        return True

    try:
        return await asyncio.to_thread(send_and_wait)  # a send may block on metadata: not on the event loop
    except Exception as exc:  # the inspection itself succeeded; report that it was not published
        failed.inc()
        state.publish_wait_after = time.monotonic() + settings.publish_backoff_s
        log.error("inspection %s not published to Kafka: %s: %s", inspection_id, type(exc).__name__, exc)
        return False


@router.get("/lines", response_model=LinesOut)
async def list_lines(request: Request) -> LinesOut:
    """Every line with its state, progress and calibration figures."""
    model = _model(request)
    active = model.active_line.line_id if model.active_line is not None else None
    return LinesOut(lines=[_line_out(line.summary()) for line in model.lines.values()], active_line=active)


@router.get("/lines/{line_id}", response_model=LineOut)
async def get_line(request: Request, line_id: str) -> LineOut:
    """One line (poll this while it builds)."""
    model = _model(request)
    line = model.lines.get(line_id)
    if line is None:
        raise ServiceError(404, "unknown_line", f"no line {line_id!r}")
    return _line_out(line.summary())


@router.post(
    "/lines",
    response_model=LineAccepted,
    status_code=202,
    dependencies=[Depends(require_api_key)],
)
async def register_line(
    request: Request,
    line_id: Annotated[str, Form(description="lower-case id: letters, digits, '-', '_' (max 63)")],
    good: Annotated[list[UploadFile], File(description="defect-free images of the line")],
    defects: Annotated[list[UploadFile] | None, File(description="optional labelled defect images")] = None,
    description: Annotated[str, Form(max_length=500)] = "",
    position_weight: Annotated[
        float,
        Form(
            ge=0, le=1000,
            description="> 0: compare each patch only with good patches at about the same place (parts "
            "imaged in one pose, with enough good images to cover each place; the magnetic_tile line uses "
            "60). 0, the default: with good patches anywhere in the image (PatchCore), for parts at any "
            "place or orientation",
        ),
    ] = 0.0,
) -> JSONResponse:
    """Register a line from defect-free images (and optional defects): memory bank + calibrated threshold,
    built in the background on the frozen base model (no retraining). Requires X-API-Key."""
    settings = _runtime(request).settings
    model = _model(request)
    if not LINE_ID_RE.match(line_id):
        raise ServiceError(422, "invalid_line_id", f"{line_id!r} must match {LINE_ID_RE.pattern}")
    defects = defects or []
    n = len(good) + len(defects)
    if n > settings.max_line_images:
        raise ServiceError(413, "too_many_images", f"{n} images > {settings.max_line_images}")
    if len(good) < settings.min_line_good_images:
        raise ServiceError(
            422, "too_few_images", f"{len(good)} good images; need at least {settings.min_line_good_images}"
        )
    good_imgs = [im for _, im in await _read_images(request, good, "good")]
    defect_imgs = [im for _, im in await _read_images(request, defects, "defects")]
    try:
        line = model.new_line(line_id, description)
    except ValueError as exc:
        raise ServiceError(409, "line_exists", str(exc)) from exc

    async def build() -> None:
        done = await asyncio.to_thread(
            model.build_line, line, good_imgs, defect_imgs, position_weight=position_weight
        )
        LINE_BUILDS.labels(settings.service_name, done.state).inc()

    task = asyncio.create_task(build())
    tasks: set = request.app.state.line_tasks
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    body = LineAccepted(line=_line_out(line.summary()), status_url=f"/v1/lines/{line_id}")
    return JSONResponse(status_code=202, content=body.model_dump())
