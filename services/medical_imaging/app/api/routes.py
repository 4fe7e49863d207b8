"""``/v1`` routes: synchronous diagnosis, asynchronous study jobs, model cards."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Annotated, Any

from backbone.service.app import ServiceRuntime, get_runtime
from backbone.service.batching import submit_batched
from backbone.service.errors import ServiceError
from backbone.service.metrics import PREDICTIONS
from backbone.service.security import read_upload_limited
from backbone.serving import DynamicBatcher
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from services.medical_imaging.app.core.config import Settings
from services.medical_imaging.app.inputs import InputError, InputLimits, load_study
from services.medical_imaging.app.model import ImagingModel, InferItem, InferResult
from services.medical_imaging.app.schemas import (
    DiagnoseOptions,
    DiagnosisReport,
    ModelCard,
    ModelsResponse,
    StudyJob,
)

log = logging.getLogger("services.medical_imaging")
router = APIRouter(prefix="/v1", tags=["medical_imaging"])


def limits_from(settings: Settings) -> InputLimits:
    return InputLimits(
        max_total_uncompressed_bytes=int(settings.max_zip_uncompressed_mb * 1024 * 1024),
        max_compression_ratio=settings.max_compression_ratio,
        max_zip_entries=settings.max_zip_entries,
        max_pixels=settings.max_voxels,
    )


def make_batcher(runtime: ServiceRuntime[Any], settings: Settings) -> DynamicBatcher[InferItem, InferResult]:
    """Micro-batches prepared studies across concurrent requests into one model call."""

    def process(items: list[InferItem]) -> list[InferResult]:
        model: ImagingModel = runtime.require_model()
        return model.infer_batch(items)

    return DynamicBatcher(
        process,
        max_batch_size=settings.batch_max_size,
        max_wait_ms=settings.batch_max_wait_ms,
        request_timeout_s=120.0,
        name="medical_imaging",
    )


def diagnose_sync(
    model: ImagingModel,
    settings: Settings,
    files: list[tuple[str, bytes]],
    options: DiagnoseOptions,
    endpoint: str,
) -> dict[str, Any]:
    """The whole pipeline in the calling thread (Kafka worker, benchmarks)."""
    t0 = time.perf_counter()
    study = load_study(files, limits_from(settings))
    t1 = time.perf_counter()
    net, tensor, steps = model.prepare(study, options)
    t2 = time.perf_counter()
    mc, tta = (options.mc_samples or settings.mc_samples, options.tta_views or settings.tta_views)
    if not options.uncertainty:
        mc, tta = 1, 1
    result = model.infer_batch([InferItem(net.key, tensor, mc, tta)])[0]
    t3 = time.perf_counter()
    timings = {"decode": (t1 - t0) * 1000, "preprocess": (t2 - t1) * 1000, "inference": (t3 - t2) * 1000}
    report = model.build_report(study, net, tensor, steps, result, options, timings)
    report["timings_ms"]["total"] = (time.perf_counter() - t0) * 1000
    PREDICTIONS.labels(settings.service_name, endpoint).inc()
    _log_report(study.anon_id, report, endpoint)
    return report


def _log_report(anon_id: str, report: dict[str, Any], endpoint: str) -> None:
    # anonymous ids only: never file names, UIDs or patient attributes
    log.info(
        "study diagnosed",
        extra={
            "anon_id": anon_id,
            "report_id": report["report_id"],
            "model_key": report["model"]["key"],
            "finding": report["finding"]["label"],
            "needs_review": report["needs_review"],
            "endpoint": endpoint,
        },
    )


async def diagnose_files(
    app_state: Any, files: list[tuple[str, bytes]], options: DiagnoseOptions, endpoint: str
) -> dict[str, Any]:
    """Decode, route, preprocess, infer (through the batcher) and build the report."""
    runtime: ServiceRuntime[Any] = app_state.runtime
    settings: Settings = runtime.settings  # type: ignore[assignment]
    model: ImagingModel = runtime.require_model()
    t0 = time.perf_counter()
    study = await asyncio.to_thread(load_study, files, limits_from(settings))
    t1 = time.perf_counter()
    net, tensor, steps = await asyncio.to_thread(model.prepare, study, options)
    t2 = time.perf_counter()
    mc = options.mc_samples or settings.mc_samples
    tta = options.tta_views or settings.tta_views
    if not options.uncertainty:
        mc, tta = 1, 1
    item = InferItem(net.key, tensor, mc, tta)
    batcher: DynamicBatcher[InferItem, InferResult] | None = getattr(app_state, "batcher", None)
    result = await submit_batched(batcher, item, model.infer_batch, "inference")
    t3 = time.perf_counter()
    timings = {"decode": (t1 - t0) * 1000, "preprocess": (t2 - t1) * 1000, "inference": (t3 - t2) * 1000}
    report = await asyncio.to_thread(model.build_report, study, net, tensor, steps, result, options, timings)
    report["timings_ms"]["total"] = (time.perf_counter() - t0) * 1000
    PREDICTIONS.labels(settings.service_name, endpoint).inc()
    _log_report(study.anon_id, report, endpoint)
    return report


def parse_options(
    model: Annotated[str, Form(description="auto | 2d | 3d")] = "auto",
    uncertainty: Annotated[bool, Form()] = True,
    mc_samples: Annotated[int | None, Form()] = None,
    tta_views: Annotated[int | None, Form()] = None,
    saliency: Annotated[bool, Form()] = False,
    dicom_sr: Annotated[bool, Form()] = False,
    roi_center: Annotated[str | None, Form(description="z,y,x voxel index to crop around (3-D)")] = None,
    roi_size_mm: Annotated[float, Form()] = 96.0,
) -> DiagnoseOptions:
    """Multipart form fields -> validated options (422 with the reason otherwise)."""
    center = None
    if roi_center:
        try:
            parts = [float(v) for v in roi_center.replace(";", ",").split(",")]
        except ValueError as exc:
            raise ServiceError(422, "invalid_roi", "roi_center must be 'z,y,x' numbers") from exc
        if len(parts) != 3:
            raise ServiceError(422, "invalid_roi", "roi_center must have exactly 3 values z,y,x")
        center = (parts[0], parts[1], parts[2])
    try:
        return DiagnoseOptions(
            model=model,  # type: ignore[arg-type]
            uncertainty=uncertainty,
            mc_samples=mc_samples,
            tta_views=tta_views,
            saliency=saliency,
            dicom_sr=dicom_sr,
            roi_center=center,
            roi_size_mm=roi_size_mm,
        )
    except ValidationError as exc:
        raise ServiceError(
            422, "validation_error", json.loads(exc.json(include_url=False, include_input=False))
        ) from exc


async def read_files(uploads: list[UploadFile], settings: Settings) -> list[tuple[str, bytes]]:
    files = []
    budget = settings.max_upload_bytes
    for up in uploads:
        blob = await read_upload_limited(up, budget)
        budget -= len(blob)
        files.append((up.filename or "upload", blob))
    return files


@router.post("/diagnose", response_model=DiagnosisReport)
async def diagnose(
    request: Request,
    files: Annotated[
        list[UploadFile], File(description="one image, a zip, or the DICOM files of one series")
    ],
    options: Annotated[DiagnoseOptions, Depends(parse_options)],
    runtime: Annotated[ServiceRuntime[Any], Depends(get_runtime)],
) -> dict[str, Any]:
    """Synchronous diagnosis of one study: structured report with uncertainty."""
    runtime.require_model()
    data = await read_files(files, runtime.settings)  # type: ignore[arg-type]
    return await diagnose_files(request.app.state, data, options, "diagnose")


class JobStore:
    """In-memory job table (bounded: the oldest finished jobs are evicted)."""

    def __init__(self, max_jobs: int) -> None:
        self.max_jobs = max_jobs
        self.jobs: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.tasks: set[asyncio.Task[Any]] = set()

    def add(self, job: dict[str, Any]) -> None:
        self.jobs[job["job_id"]] = job
        while len(self.jobs) > self.max_jobs:
            oldest = next((k for k, v in self.jobs.items() if v["status"] in ("done", "failed")), None)
            if oldest is None:
                break
            self.jobs.pop(oldest)


async def _run_job(
    app_state: Any, job: dict[str, Any], files: list[tuple[str, bytes]], options: DiagnoseOptions
) -> None:
    job["status"] = "running"
    try:
        job["report"] = await diagnose_files(app_state, files, options, "studies")
        job["status"] = "done"
    except ServiceError as exc:
        job["status"] = "failed"
        job["error"] = {"error": exc.error, "detail": exc.detail, "status_code": exc.status_code}
    except Exception as exc:  # a job never crashes the service; the reason is kept on the job
        log.exception("study job failed", extra={"job_id": job["job_id"]})
        job["status"] = "failed"
        job["error"] = {"error": "internal_error", "detail": type(exc).__name__, "status_code": 500}
    job["finished_at"] = datetime.now(UTC).isoformat()


@router.post("/studies", response_model=StudyJob, status_code=202)
async def submit_study(
    request: Request,
    files: Annotated[
        list[UploadFile], File(description="one image, a zip, or the DICOM files of one series")
    ],
    options: Annotated[DiagnoseOptions, Depends(parse_options)],
    runtime: Annotated[ServiceRuntime[Any], Depends(get_runtime)],
) -> JSONResponse:
    """Queue a study; poll ``GET /v1/studies/{job_id}`` for the report."""
    runtime.require_model()
    data = await read_files(files, runtime.settings)  # type: ignore[arg-type]
    store: JobStore = request.app.state.jobs
    job_id = uuid.uuid4().hex
    job = {
        "job_id": job_id,
        "status": "queued",
        "created_at": datetime.now(UTC).isoformat(),
        "finished_at": None,
        "status_url": f"/v1/studies/{job_id}",
        "report": None,
        "error": None,
    }
    store.add(job)
    task = asyncio.create_task(_run_job(request.app.state, job, data, options))
    store.tasks.add(task)
    task.add_done_callback(store.tasks.discard)
    return JSONResponse(status_code=202, content=StudyJob(**job).model_dump(mode="json"))


@router.get("/studies/{job_id}", response_model=StudyJob)
async def get_study(job_id: str, request: Request) -> StudyJob:
    """Status of a study job, with the report once done (or the error if it failed)."""
    job = request.app.state.jobs.jobs.get(job_id)
    if job is None:
        raise ServiceError(404, "job_not_found", f"no study job {job_id!r}")
    return StudyJob(**job)


@router.get("/models", response_model=ModelsResponse)
async def list_models(runtime: Annotated[ServiceRuntime[Any], Depends(get_runtime)]) -> ModelsResponse:
    """The loaded models, what they were trained on and which inputs they handle."""
    model: ImagingModel = runtime.require_model()
    cards = []
    for key, net in sorted(model.nets.items()):
        size = [net.img_size] * (2 if key == "2d" else 3)
        cards.append(
            ModelCard(
                key=key,  # type: ignore[arg-type]
                name=net.artifact.name,
                version=net.artifact.version,
                family=net.config["family"],
                trained_on=net.trained_on,
                class_names=net.class_names,
                input_size=size,
                handles="2-D images (PNG/JPEG, single DICOM images, 2-D .npy)"
                if key == "2d"
                else "3-D volumes (DICOM series / zip, NIfTI, 3-D .npy)",
                temperature=net.temperature,
                metrics=net.artifact.metrics.get("test", {}),
                created_at=net.artifact.manifest.get("created_at"),
            )
        )
    return ModelsResponse(models=cards)


__all__ = ["InputError", "JobStore", "diagnose_files", "diagnose_sync", "make_batcher", "router"]
