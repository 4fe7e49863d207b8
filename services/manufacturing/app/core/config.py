"""Manufacturing service settings (environment variables, see ``ServiceSettings``)."""

from __future__ import annotations

from backbone.service.config import ServiceSettings
from pydantic import Field

from pipelines.manufacturing.data import MAX_IMAGE_PIXELS


class Settings(ServiceSettings):
    """Settings of the inspection service on port 8002."""

    service_name: str = "manufacturing"
    port: int = 8002
    max_upload_mb: float = Field(default=32.0, gt=0, description="Whole request body limit.")
    max_image_mb: float = Field(default=8.0, gt=0, description="Per-image upload limit (413 above it).")
    max_image_pixels: int = Field(
        default=MAX_IMAGE_PIXELS, ge=64, description="Per-image pixels, checked before decoding (413 above)."
    )
    max_images_per_request: int = Field(default=32, ge=1)
    max_line_images: int = Field(default=500, ge=1, description="Images accepted by POST /v1/lines.")
    min_line_good_images: int = Field(default=6, ge=4, description="Fewest good images to register a line.")
    lines_dir: str | None = Field(
        default=None, description="Where lines are persisted (default <MODEL_DIR>/manufacturing/lines)."
    )
    default_line: str = "magnetic_tile"
    topic_results: str = "inspection-results"
    topic_alerts: str = "defect-alerts"
    publish_timeout_s: float = Field(
        default=5.0, gt=0, description="wait for Kafka's acknowledgement of an inspection's events"
    )
    publish_backoff_s: float = Field(
        default=30.0, ge=0, description="after a failed publish, answers stop waiting for Kafka this long"
    )
