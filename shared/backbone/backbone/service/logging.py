"""JSON structured logging for services, pipelines and workers."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

_CONFIGURED: set[str] = set()


class _ServiceFilter(logging.Filter):
    """Adds the service name to every record."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        return True


def configure_logging(service: str, level: str = "INFO") -> logging.Logger:
    """Send every log record of the process to stderr as one JSON object per line.

    Fields: ``time``, ``level``, ``logger``, ``service``, ``message`` and any ``extra=`` keys.
    Calling it again only changes the level.
    """
    root = logging.getLogger()
    root.setLevel(level.upper())
    if service not in _CONFIGURED:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{service}{message}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
        handler.addFilter(_ServiceFilter(service))
        for old in list(root.handlers):
            root.removeHandler(old)
        root.addHandler(handler)
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            lg = logging.getLogger(name)
            lg.handlers = []
            lg.propagate = True
        logging.getLogger("kafka").setLevel(logging.WARNING)
        _CONFIGURED.clear()
        _CONFIGURED.add(service)
    return logging.getLogger(service)
