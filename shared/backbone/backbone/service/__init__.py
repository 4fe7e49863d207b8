"""FastAPI conventions shared by every service: settings, logging, metrics, errors, auth, app factory."""

from backbone.service.config import ServiceSettings
from backbone.service.errors import ErrorResponse, ServiceError

__all__ = ["ErrorResponse", "ServiceError", "ServiceSettings"]
