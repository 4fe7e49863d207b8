"""Pydantic models of every medical-imaging request and response."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class FindingOut(BaseModel):
    """The model's finding for the study."""

    label: str = Field(description="predicted class name, e.g. 'pneumonia' or 'normal'")
    positive: bool | None = Field(description="binary tasks: the finding class (class 1) was predicted")
    probability: float = Field(
        description="calibrated probability of the finding class (class 1 for binary tasks)"
    )
    threshold: float
    class_probabilities: dict[str, float]


class UncertaintyOut(BaseModel):
    """Spread of the finding probability over Monte-Carlo dropout x test-time augmentation passes."""

    method: str
    mc_samples: int
    tta_views: int
    n_samples: int
    mean: float
    std: float
    predictive_entropy: float = Field(
        description="entropy of the mean prediction, bits / log2(classes), 0..1"
    )
    mutual_information: float = Field(description="epistemic part of the entropy (same units)")
    interval_95: tuple[float, float]


class ModelRef(BaseModel):
    """Which model produced the report and what it was trained on."""

    key: Literal["2d", "3d"]
    name: str
    version: str
    family: str
    trained_on: str
    test_metrics: dict[str, float] = {}


class InputSummary(BaseModel):
    """The study as received (no patient identifiers)."""

    format: str
    modality: str
    dims: int
    size: list[int]
    spacing_mm: list[float] | None
    n_files: int
    intensity_range: list[float]
    anon_id: str
    notes: list[str] = []


class DiagnosisReport(BaseModel):
    """Structured report returned by ``POST /v1/diagnose`` and by finished study jobs."""

    report_id: str
    study_anon_id: str
    created_at: str
    finding: FindingOut
    uncertainty: UncertaintyOut | None
    needs_review: bool = Field(
        description="true when the result is uncertain or the input is outside the training domain"
    )
    review_reasons: list[str]
    model: ModelRef
    input: InputSummary
    preprocessing: list[str]
    warnings: list[str] = []
    saliency_png_base64: str | None = Field(
        default=None, description="attention-gate heatmap over the model input"
    )
    dicom_sr_base64: str | None = Field(default=None, description="the report as a DICOM Comprehensive 3D SR")
    timings_ms: dict[str, float] = {}
    disclaimer: str = "Decision support only; not a diagnosis. A radiologist must review the study."


class DiagnoseOptions(BaseModel):
    """Options of a diagnosis request (multipart form fields)."""

    model: Literal["auto", "2d", "3d"] = "auto"
    uncertainty: bool = True
    mc_samples: int | None = Field(default=None, ge=1, le=64)
    tta_views: int | None = Field(default=None, ge=1, le=16)
    saliency: bool = False
    dicom_sr: bool = False
    roi_center: tuple[float, float, float] | None = Field(
        default=None, description="(z, y, x) voxel index in the uploaded volume to crop around"
    )
    roi_size_mm: float = Field(default=96.0, gt=4, le=512)


class StudyJob(BaseModel):
    """An asynchronous study job."""

    job_id: str
    status: Literal["queued", "running", "done", "failed"]
    created_at: str
    finished_at: str | None = None
    status_url: str
    report: DiagnosisReport | None = None
    error: dict[str, Any] | None = None


class ModelCard(BaseModel):
    key: Literal["2d", "3d"]
    name: str
    version: str
    family: str
    trained_on: str
    class_names: list[str]
    input_size: list[int]
    handles: str
    temperature: float
    metrics: dict[str, Any]
    created_at: str | None = None


class ModelsResponse(BaseModel):
    models: list[ModelCard]


class KafkaImagingRequest(BaseModel):
    """A message on ``imaging-requests``: the study as base64 ``files`` (a zip or DICOM/NIfTI/PNG/...), or a
    ``path`` relative to the service's study root (``STUDY_ROOT``, default ``DATA_DIR``) for studies larger
    than a Kafka message (a file or a folder holding one series)."""

    request_id: str = Field(min_length=1, max_length=128)
    files: list[KafkaFile] = Field(default_factory=list, max_length=2000)
    path: str | None = Field(default=None, max_length=1024)
    options: DiagnoseOptions = DiagnoseOptions()


class KafkaFile(BaseModel):
    filename: str = Field(default="upload", max_length=512)
    content_base64: str


class KafkaDiagnosisReport(BaseModel):
    """A message on ``diagnosis-reports``."""

    request_id: str
    report: DiagnosisReport


KafkaImagingRequest.model_rebuild()
