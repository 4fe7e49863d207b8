"""Settings of the medical-imaging service (environment variables, see ``ServiceSettings``)."""

from __future__ import annotations

from pathlib import Path

from backbone.service.config import ServiceSettings
from pydantic import Field


class Settings(ServiceSettings):
    """medical_imaging settings; every field is read from the upper-case environment variable."""

    service_name: str = "medical_imaging"
    port: int = 8001
    model_2d_name: str = Field(default="pneumoniamnist", description="artifact name of the 2-D model")
    model_3d_name: str = Field(default="adrenalmnist3d", description="artifact name of the 3-D model")
    mc_samples: int = Field(default=8, ge=1, le=64, description="Monte-Carlo dropout passes per TTA view")
    tta_views: int = Field(default=4, ge=1, le=16, description="test-time augmentation views")
    review_entropy: float = Field(
        default=0.7, description="normalised predictive entropy above which to review"
    )
    review_std: float = Field(default=0.12, description="probability std above which to review")
    max_zip_uncompressed_mb: float = Field(default=512.0, gt=0)
    max_compression_ratio: float = Field(default=200.0, gt=1)
    max_zip_entries: int = Field(default=2000, ge=1)
    max_voxels: int = Field(default=512 * 512 * 1024, ge=1)
    max_jobs: int = Field(default=1000, ge=1, description="finished study jobs kept in memory")
    torch_threads: int = Field(
        default=1,
        ge=1,
        description="intra-op CPU threads (on a shared 2-core host 2 threads are ~50x slower)",
    )
    batch_max_size: int = Field(default=16, ge=1, description="studies per DynamicBatcher batch")
    batch_max_wait_ms: float = Field(default=5.0, ge=0)
    study_root: Path | None = Field(
        default=None, description="root for Kafka 'path' studies (default DATA_DIR)"
    )
    request_topic: str = "imaging-requests"
    report_topic: str = "diagnosis-reports"
    kafka_group_id: str = "medical-imaging"
