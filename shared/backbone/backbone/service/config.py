"""Service settings read from environment variables (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[4]


def default_data_dir() -> Path:
    """`../shared/data` next to the repository (the team's read-only data folder)."""
    return (REPO_ROOT / ".." / "shared" / "data").resolve()


def default_model_dir() -> Path:
    """`<repo>/models`: where pipelines write artifacts and services read them."""
    return REPO_ROOT / "models"


class ServiceSettings(BaseSettings):
    """Settings every service shares. Each service subclasses it to add its own fields.

    Every field is read from the environment variable of the same name in upper case,
    e.g. ``KAFKA_BOOTSTRAP_SERVERS``, ``DATA_DIR``, ``MODEL_DIR``, ``API_KEY``.
    """

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    service_name: str = "service"
    kafka_bootstrap_servers: str | None = Field(
        default=None, description="Comma-separated host:port list; unset disables Kafka."
    )
    kafka_required: bool = Field(
        default=True, description="When true, /ready fails while Kafka is unreachable."
    )
    kafka_check_interval_s: float = 5.0
    data_dir: Path = Field(default_factory=default_data_dir)
    model_dir: Path = Field(default_factory=default_model_dir)
    api_key: SecretStr | None = Field(
        default=None, description="Key for state-changing endpoints (header X-API-Key)."
    )
    log_level: str = "INFO"
    max_upload_mb: float = Field(default=32.0, gt=0)
    host: str = "127.0.0.1"
    port: int = 8000

    @property
    def max_upload_bytes(self) -> int:
        """Upload size limit in bytes."""
        return int(self.max_upload_mb * 1024 * 1024)
