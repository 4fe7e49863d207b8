"""The /v1 routes of the financial_risk service."""

from __future__ import annotations

import asyncio
import threading
import uuid
from datetime import UTC, datetime

from backbone.kafka import JsonProducer
from backbone.service import metrics as m
from backbone.service.app import ServiceRuntime, get_runtime, require_api_key
from backbone.service.batching import submit_batched
from backbone.service.errors import ServiceError
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response

from services.financial_risk.app.model import RiskModels
from services.financial_risk.app.schemas import (
    BatchIn,
    BatchItemOut,
    BatchOut,
    CreditApplication,
    CreditScoreOut,
    FeedbackIn,
    FeedbackOut,
    ModelOut,
    Reason,
    ScoreOut,
    ThresholdIn,
    ThresholdOut,
    TransactionIn,
)
from services.financial_risk.events import ThresholdCommand
from services.financial_risk.explain import ReasonMethod
from services.financial_risk.features import DuplicateTransactionError, OutOfOrderError, Transaction
from services.financial_risk.scoring import FraudScore, FraudScorer, ScoreRequest

router = APIRouter(prefix="/v1", tags=["financial_risk"])
THRESHOLD_KEY = "threshold"  # one key: every change on one partition, in order
PUBLISH_TIMEOUT_S = 10.0
_PRODUCER_LOCK = threading.Lock()


def threshold_producer(app: FastAPI) -> JsonProducer:
    """The service's producer for threshold changes, created on first use (blocks: call it in a thread)."""
    with _PRODUCER_LOCK:
        producer = getattr(app.state, "producer", None)
        if producer is None:
            settings = app.state.runtime.settings
            producer = JsonProducer(settings.kafka_bootstrap_servers, f"{settings.service_name}-threshold")
            app.state.producer = producer
        return producer


EXPLAIN_HELP = (
    "reason codes: 'path' (decision-path contributions, fast) or 'shap' (exact TreeSHAP, ~30x slower); "
    "default: the REASON_METHOD setting"
)


async def get_scorer(request: Request) -> FraudScorer:
    """The app's fraud scorer; 503 while its feature state is still warming up."""
    scorer: FraudScorer = request.app.state.scorer
    if scorer.warm.error:
        raise ServiceError(503, "feature_state_failed", scorer.warm.error)
    if not scorer.warm.done:
        raise ServiceError(
            503, "feature_state_warming", f"replayed {scorer.warm.events}/{scorer.warm.total} transactions"
        )
    return scorer


def _tx(t: TransactionIn) -> Transaction:
    return Transaction(t.transaction_id, t.customer_id, t.terminal_id, t.epoch_s(), float(t.amount))


def _out(s: FraudScore) -> ScoreOut:
    return ScoreOut(
        transaction_id=s.transaction_id,
        score=s.score,
        decision=s.decision,  # type: ignore[arg-type]
        threshold=s.threshold,
        reasons=[Reason(**r) for r in s.reasons],
        reason_method=s.reason_method,  # type: ignore[arg-type]
        model_version=s.model_version,
        latency_ms=s.latency_ms,
    )


def _error(exc: Exception) -> ServiceError:
    if isinstance(exc, DuplicateTransactionError):
        return ServiceError(409, "duplicate_transaction", str(exc))
    if isinstance(exc, OutOfOrderError):
        return ServiceError(409, "out_of_order", str(exc))
    return ServiceError(422, "unscorable", str(exc))


def _method(runtime: ServiceRuntime, explain: ReasonMethod | None) -> ReasonMethod:
    return explain or runtime.settings.reason_method  # type: ignore[attr-defined,no-any-return]


@router.post("/score", response_model=ScoreOut)
async def score(
    request: Request,
    body: TransactionIn,
    explain: ReasonMethod | None = Query(None, description=EXPLAIN_HELP),
) -> Response:
    """Score one transaction: features from the live per-customer/terminal state, LightGBM + MoE
    probability, alert decision at the live threshold, top-5 reason codes. Concurrent calls are
    micro-batched (one model call per batch, features still in arrival order).

    The hot path: runtime and scorer are read directly (no ``Depends``) and the answer, built as a
    ``ScoreOut``, is serialised once (FastAPI would validate it again against ``response_model``)."""
    runtime: ServiceRuntime = request.app.state.runtime
    scorer = await get_scorer(request)
    models: RiskModels = runtime.require_model()
    item = ScoreRequest(models, _tx(body), body.update_state, _method(runtime, explain))
    batcher = getattr(request.app.state, "score_batcher", None)
    result = await submit_batched(batcher, item, scorer.score_requests, "scoring")
    if isinstance(result, Exception):
        raise _error(result)
    m.PREDICTIONS.labels(runtime.settings.service_name, "/v1/score").inc()
    return Response(_out(result).model_dump_json(), media_type="application/json")


@router.post("/score/batch", response_model=BatchOut)
async def score_batch(
    body: BatchIn,
    explain: ReasonMethod | None = Query(None, description=EXPLAIN_HELP),
    runtime: ServiceRuntime = Depends(get_runtime),
    scorer: FraudScorer = Depends(get_scorer),
) -> BatchOut:
    """Score several transactions in order (one model call); each item gets a result or an error."""
    limit = runtime.settings.max_batch
    if len(body.transactions) > limit:
        raise ServiceError(
            413, "batch_too_large", f"{len(body.transactions)} transactions > max_batch {limit}"
        )
    models: RiskModels = runtime.require_model()
    txs = [_tx(t) for t in body.transactions]
    update = [t.update_state for t in body.transactions]
    if len(set(update)) > 1:
        raise ServiceError(
            422, "mixed_update_state", "update_state must be the same for all items of a batch"
        )
    results = await asyncio.to_thread(scorer.score, models, txs, update[0], "rest", _method(runtime, explain))
    items = []
    for tx, r in zip(txs, results, strict=True):
        if isinstance(r, Exception):
            err = _error(r)
            items.append(
                BatchItemOut(transaction_id=tx.transaction_id, error=err.error, detail=str(err.detail))
            )
        else:
            items.append(BatchItemOut(transaction_id=tx.transaction_id, result=_out(r)))
    scored = sum(1 for i in items if i.result is not None)
    m.PREDICTIONS.labels(runtime.settings.service_name, "/v1/score/batch").inc(scored)
    return BatchOut(results=items, scored=scored, failed=len(items) - scored)


@router.post("/feedback", response_model=FeedbackOut, dependencies=[Depends(require_api_key)])
async def feedback(body: FeedbackIn, scorer: FraudScorer = Depends(get_scorer)) -> FeedbackOut:
    """A fraud label became known (requires X-API-Key); it enters the features from ``known_at`` on."""
    known = body.known_at or datetime.now(UTC)
    scorer.feedback(body.transaction_id, int(body.label), int(known.timestamp()))
    eng = scorer.engine
    return FeedbackOut(
        accepted=True, labels_applied=eng.n_labels_applied, labels_unmatched=eng.n_labels_unmatched
    )


@router.post("/credit/score", response_model=CreditScoreOut)
async def credit_score(
    body: CreditApplication,
    explain: ReasonMethod | None = Query(None, description=EXPLAIN_HELP),
    runtime: ServiceRuntime = Depends(get_runtime),
) -> CreditScoreOut:
    """Probability of default of one credit application with its top-5 reason codes."""
    models: RiskModels = runtime.require_model()
    method = _method(runtime, explain)
    probs, reasons = await asyncio.to_thread(models.credit_scores, [body.raw()], method)
    thr = models.credit.threshold
    m.PREDICTIONS.labels(runtime.settings.service_name, "/v1/credit/score").inc()
    return CreditScoreOut(
        score=float(probs[0]),
        decision="decline" if probs[0] >= thr else "approve",
        threshold=thr,
        reasons=[Reason(**r) for r in reasons[0]],
        reason_method=method,
        model_version=models.credit.version,
    )


@router.get("/model", response_model=ModelOut)
async def model_info(request: Request, runtime: ServiceRuntime = Depends(get_runtime)) -> ModelOut:
    """Both loaded models (version, metrics, features) and the feature state's size."""
    models: RiskModels = runtime.require_model()
    scorer: FraudScorer = request.app.state.scorer
    eng = scorer.engine
    state = {
        "warm": scorer.warm.__dict__,
        "customers": len(eng.customers),
        "terminals": len(eng.terminals),
        "events": eng.n_events,
        "labels_applied": eng.n_labels_applied,
        "labels_pending": len(eng.pending),
        "watermark": datetime.fromtimestamp(eng.watermark, UTC).isoformat() if eng.watermark else None,
        "n_features": len(eng.feature_names),
    }
    return ModelOut(fraud=models.fraud.info_dict(), credit=models.credit.info_dict(), feature_state=state)


@router.get("/threshold", response_model=ThresholdOut)
async def get_threshold(request: Request) -> ThresholdOut:
    """The live fraud alert threshold and how it is set."""
    return ThresholdOut(**request.app.state.scorer.threshold.as_dict())


@router.put("/threshold", response_model=ThresholdOut, dependencies=[Depends(require_api_key)])
async def put_threshold(body: ThresholdIn, request: Request) -> ThresholdOut:
    """Set the threshold value (mode becomes fixed) and/or the mode, budget or target precision."""
    if body.model_dump(exclude_none=True) == {}:
        raise ServiceError(
            422, "empty_update", "give at least one of value, mode, alert_budget, target_precision"
        )
    settings = request.app.state.runtime.settings
    published_to = None
    if settings.kafka_bootstrap_servers:
        # the stream workers decide the alerts on risk-alerts: they get the change first, and if it cannot be
        # delivered nothing changes (the REST and stream thresholds never disagree because of a failed call)
        command = ThresholdCommand(
            **body.model_dump(),
            command_id=uuid.uuid4().hex,
            issued_at=datetime.now(UTC),
            issued_by=settings.service_name,
        )
        try:
            producer = await asyncio.to_thread(threshold_producer, request.app)
            await asyncio.to_thread(
                producer.send_and_wait, settings.threshold_topic, command, THRESHOLD_KEY, PUBLISH_TIMEOUT_S
            )
        except Exception as exc:
            raise ServiceError(
                503,
                "threshold_not_published",
                f"the change could not be published to {settings.threshold_topic} for the stream workers, so "
                f"it was not applied: {type(exc).__name__}: {exc}",
            ) from exc
        published_to = settings.threshold_topic
    state = request.app.state.scorer.threshold.set(
        value=body.value,
        mode=body.mode,
        alert_budget=body.alert_budget,
        target_precision=body.target_precision,
    )
    return ThresholdOut(**state.__dict__, published_to=published_to)
