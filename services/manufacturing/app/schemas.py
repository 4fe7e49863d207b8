"""Pydantic models of every manufacturing request and response."""

from __future__ import annotations

from pydantic import BaseModel, Field


class CalibrationOut(BaseModel):
    """How a line's pass/fail threshold was set and what it means on held-out images."""

    threshold: float
    method: str
    n_good: int = Field(description="held-out (or out-of-fold) defect-free images the threshold rests on")
    good_mean: float
    good_std: float
    good_max: float
    n_defect: int = 0
    defect_auroc: float | None = None
    expected_false_reject_rate: float | None = None
    defect_recall: float | None = None
    cross_fit_folds: int | None = Field(
        default=None, description="K when every good image was scored by a bank built without its fold"
    )
    suspect_good: list[int] | None = Field(
        default=None,
        description="good images (upload order) a bank of the others scores far above the rest: a defect "
        "uploaded as good, or a kind of good part seen only once; left out of the line's bank and threshold",
    )


class ImageScoreOut(BaseModel):
    """How a line turns its anomaly map into one score: the map's maximum inside the inspected band, plus
    ``level_weight`` x (its ``level_quantile`` quantile - ``level_offset``) when the line has a level term."""

    level_quantile: float = Field(description="quantile of the inspected map used as its level (0: none)")
    level_weight: float | None = Field(
        default=None,
        description="std of the maximum / std of the level on held-out good images (None: the maximum alone)",
    )
    level_offset: float | None = Field(default=None, description="mean level of held-out good images")


class LineOut(BaseModel):
    """A production line and its state."""

    line_id: str
    description: str = ""
    state: str = Field(description="building | ready | failed | stale")
    progress: float = Field(ge=0, le=1)
    message: str
    source: str = Field(description="artifact (built at training time) or api (POST /v1/lines)")
    n_good_images: int
    n_defect_images: int
    bank_size: int
    threshold: float | None = None
    calibration: CalibrationOut | None = None
    image_score: ImageScoreOut | None = None
    position_weight: float | None = Field(
        default=None,
        description="weight of the patch position in the nearest-neighbour search (0: a patch is compared "
        "with good patches anywhere in the image; > 0: only with those at about the same place)",
    )
    created_at: str
    build_seconds: float | None = None


class LinesOut(BaseModel):
    lines: list[LineOut]
    active_line: str | None = None


class LineAccepted(BaseModel):
    """Answer of POST /v1/lines: the build runs in the background; poll ``status_url``."""

    line: LineOut
    status_url: str


class InspectionOut(BaseModel):
    """Result for one image."""

    filename: str
    line_id: str
    predicted_class: str = Field(description="NEU defect type the classifier sees")
    confidence: float
    probabilities: dict[str, float]
    anomaly_score: float = Field(
        description="PatchCore score: the maximum of the nearest-neighbour distance map inside the inspected "
        "band, plus the line's level term (GET /v1/lines/{line_id}: image_score)"
    )
    threshold: float = Field(description="the line's calibrated threshold")
    normalized_score: float = Field(description="anomaly_score / threshold (> 1 fails)")
    passed: bool
    width: int
    height: int
    heatmap_png_base64: str | None = Field(
        default=None,
        description="PNG overlay of the anomaly map over the whole image; the square the anomaly score comes "
        "from is framed in white (a line's border band, outside it, is shown but not scored)",
    )


class InspectResponse(BaseModel):
    inspection_id: str
    line_id: str
    model_version: str
    n_images: int
    n_failed: int
    results: list[InspectionOut]
    published: bool = Field(description="whether Kafka acknowledged the results (and alerts)")


class InspectionEvent(BaseModel):
    """Kafka record on ``inspection-results`` (and ``defect-alerts`` for failures); no heat map."""

    inspection_id: str
    line_id: str
    filename: str
    model_version: str
    predicted_class: str
    confidence: float
    anomaly_score: float
    threshold: float
    passed: bool
    timestamp: str
