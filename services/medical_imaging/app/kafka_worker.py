"""Kafka: ``imaging-requests`` -> ``diagnosis-reports``; bad requests go to ``imaging-requests.dlq``
with the reason.

Runs as a background thread of the service (started when ``KAFKA_BOOTSTRAP_SERVERS`` is set).
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backbone.kafka import Message, StreamProcessor

from services.medical_imaging.app.core.config import Settings
from services.medical_imaging.app.inputs import InputError
from services.medical_imaging.app.schemas import KafkaDiagnosisReport, KafkaImagingRequest

log = logging.getLogger("services.medical_imaging.kafka")


def request_files(req: KafkaImagingRequest, settings: Settings) -> list[tuple[str, bytes]]:
    """The study bytes of a request: inline base64 files or a file / folder under the study root."""
    if req.files and req.path:
        raise InputError("ambiguous_request", "send either files or path, not both", 400)
    if req.files:
        out = []
        for f in req.files:
            try:
                out.append((f.filename, base64.b64decode(f.content_base64, validate=True)))
            except (binascii.Error, ValueError) as exc:
                raise InputError("invalid_base64", f"file {f.filename!r} is not valid base64", 400) from exc
        return out
    if not req.path:
        raise InputError("no_file", "the request has neither files nor path", 400)
    root = Path(settings.study_root or settings.data_dir).resolve()
    target = (root / req.path).resolve()
    if not target.is_relative_to(root):
        raise InputError("path_traversal", "path points outside the study root", 400)
    if target.is_file():
        paths = [target]
    elif target.is_dir():
        paths = sorted(p for p in target.iterdir() if p.is_file() and not p.name.startswith("."))
    else:
        raise InputError("study_not_found", f"no study at {req.path!r}", 404)
    total = 0
    files = []
    for p in paths:
        total += p.stat().st_size
        if total > settings.max_upload_bytes:
            raise InputError("payload_too_large", f"study at {req.path!r} exceeds the upload limit", 413)
        files.append((p.name, p.read_bytes()))
    return files


def make_handler(
    get_model: Callable[[], Any], settings: Settings
) -> Callable[[list[Message[Any]]], list[Any]]:
    """Handler for the StreamProcessor: one report per valid request (errors raise -> DLQ with the reason)."""
    from services.medical_imaging.app.api.routes import diagnose_sync

    def handle(messages: list[Message[Any]]) -> list[Any]:
        outputs = []
        for msg in messages:
            req: KafkaImagingRequest = msg.value
            # file names can carry patient names and errors get logged by the DLQ path: use positions instead
            files = [(f"file-{i + 1:04d}", blob) for i, (_, blob) in enumerate(request_files(req, settings))]
            report = diagnose_sync(get_model(), settings, files, req.options, "kafka")
            out = KafkaDiagnosisReport(request_id=req.request_id, report=report)
            outputs.append((settings.report_topic, req.request_id, out.model_dump(mode="json")))
        return outputs

    return handle


def make_processor(get_model: Callable[[], Any], settings: Settings) -> StreamProcessor[KafkaImagingRequest]:
    assert settings.kafka_bootstrap_servers
    return StreamProcessor(
        settings.kafka_bootstrap_servers,
        settings.request_topic,
        settings.kafka_group_id,
        KafkaImagingRequest,
        make_handler(get_model, settings),
        max_batch_size=4,
        session_timeout_ms=30000,
        output_topics=[settings.report_topic],
    )
