"""API-key protection for endpoints that change state, and upload size limits."""

from __future__ import annotations

import secrets

from fastapi import Request, UploadFile
from fastapi.security import APIKeyHeader

from backbone.service.errors import ServiceError

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)


def check_api_key(request: Request, supplied: str | None) -> None:
    """Raise 401/403/503 unless ``supplied`` matches the service's configured API key."""
    settings = request.app.state.runtime.settings
    if settings.api_key is None or not settings.api_key.get_secret_value():
        raise ServiceError(503, "api_key_not_configured", "set API_KEY to enable this endpoint")
    if not supplied:
        raise ServiceError(401, "missing_api_key", "send the key in the X-API-Key header")
    if not secrets.compare_digest(supplied.encode(), settings.api_key.get_secret_value().encode()):
        raise ServiceError(403, "invalid_api_key", "the X-API-Key header does not match")


async def read_upload_limited(upload: UploadFile, max_bytes: int) -> bytes:
    """Read an uploaded file, failing with 413 as soon as it exceeds ``max_bytes``."""
    chunks: list[bytes] = []
    total = 0
    while chunk := await upload.read(1024 * 1024):
        total += len(chunk)
        if total > max_bytes:
            raise ServiceError(
                413, "payload_too_large", f"{upload.filename!r} exceeds the limit of {max_bytes} bytes"
            )
        chunks.append(chunk)
    return b"".join(chunks)
