"""The REST service over a tiny real model and a warmed (sampled) feature state."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pipelines.financial_risk.data import epoch, load_transactions
from services.financial_risk.app.core.config import Settings
from services.financial_risk.app.main import create_app

API_KEY = "test-key"


@pytest.fixture(scope="module")
def client(fr_model_dir: Path, fr_data_dir: Path) -> Iterator[TestClient]:
    settings = Settings(
        model_dir=fr_model_dir,
        data_dir=fr_data_dir,
        warm_from="2018-06-10",
        warm_until="2018-08-08",
        warm_customers=300,  # the customers of the tiny preset
        api_key=API_KEY,
    )
    with TestClient(create_app(settings)) as c:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            r = c.get("/ready")
            if r.status_code == 200:
                break
            time.sleep(0.5)
        assert r.status_code == 200, r.text
        yield c


@pytest.fixture(scope="module")
def stream(fr_data_dir: Path, client: TestClient) -> list[dict]:
    """Real transactions of the warmed customers right after the warm-up cutoff, in stream order."""
    state = client.get("/v1/model").json()["feature_state"]
    df = load_transactions(fr_data_dir, end="2018-08-10")
    df = df[df["ts"] >= epoch("2018-08-08")]
    scorer = client.app.state.scorer  # type: ignore[attr-defined]
    df = df[df["CUSTOMER_ID"].isin(list(scorer.engine.customers))]
    assert state["customers"] > 250
    return [
        {
            "transaction_id": int(r.TRANSACTION_ID),
            "customer_id": int(r.CUSTOMER_ID),
            "terminal_id": int(r.TERMINAL_ID),
            "timestamp": r.TX_DATETIME.isoformat(),
            "amount": float(r.TX_AMOUNT),
            "fraud": int(r.TX_FRAUD),
        }
        for r in df.itertuples()
    ]


def _body(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "fraud"}


def test_financial_risk_score_one_and_batch(client: TestClient, stream: list[dict]) -> None:
    model = client.get("/v1/model").json()
    r = client.post("/v1/score", json=_body(stream[0]))
    assert r.status_code == 200, r.text
    out = r.json()
    assert 0.0 <= out["score"] <= 1.0
    assert out["decision"] in ("alert", "approve")
    assert len(out["reasons"]) == 5
    contribs = [x["contribution"] for x in out["reasons"]]
    assert contribs == sorted(contribs, reverse=True)
    assert out["model_version"] == model["fraud"]["version"]
    # the same transaction again would double-count it in the state: 409
    dup = client.post("/v1/score", json=_body(stream[0]))
    assert dup.status_code == 409 and dup.json()["error"] == "duplicate_transaction"
    # the state moved: the customer's 1-day count includes the scored transaction
    events_before = client.get("/v1/model").json()["feature_state"]["events"]
    batch = client.post("/v1/score/batch", json={"transactions": [_body(x) for x in stream[1:301]]})
    assert batch.status_code == 200, batch.text
    body = batch.json()
    assert body["scored"] == 300 and body["failed"] == 0
    assert client.get("/v1/model").json()["feature_state"]["events"] == events_before + 300
    scores = [x["result"]["score"] for x in body["results"]]
    frauds = [x["fraud"] for x in stream[1:301]]
    if 0 < sum(frauds) < len(frauds):
        mean_f = sum(s for s, f in zip(scores, frauds, strict=True) if f) / sum(frauds)
        mean_l = sum(s for s, f in zip(scores, frauds, strict=True) if not f) / (len(frauds) - sum(frauds))
        assert mean_f > mean_l


def test_financial_risk_concurrent_scores_share_model_calls(client: TestClient, stream: list[dict]) -> None:
    """Concurrent /v1/score calls are micro-batched: fewer model calls than requests, each caller gets
    its own transaction's result, and the state counts every transaction once."""
    from concurrent.futures import ThreadPoolExecutor

    batcher = client.app.state.score_batcher  # type: ignore[attr-defined]
    events_before = client.get("/v1/model").json()["feature_state"]["events"]
    batches_before, served_before = batcher.batches, batcher.served
    rows = stream[301:365]
    by_customer: dict[int, list[dict]] = {}
    for row in rows:  # each customer's transactions stay in order (one thread per customer)
        by_customer.setdefault(row["customer_id"], []).append(row)

    def send(items: list[dict]) -> list[tuple[int, dict]]:
        return [(x["transaction_id"], client.post("/v1/score", json=_body(x)).json()) for x in items]

    with ThreadPoolExecutor(16) as pool:
        answers = [a for part in pool.map(send, by_customer.values()) for a in part]
    assert len(answers) == len(rows)
    assert all(out["transaction_id"] == tid and len(out["reasons"]) == 5 for tid, out in answers)
    assert all(out["reason_method"] == "path" for _, out in answers)
    assert batcher.served - served_before == len(rows)
    assert batcher.batches - batches_before < len(rows)
    assert client.get("/v1/model").json()["feature_state"]["events"] == events_before + len(rows)


def test_financial_risk_shap_reasons_on_request(client: TestClient, stream: list[dict]) -> None:
    row = _body(stream[365])
    path = client.post("/v1/score?explain=path", json={**row, "update_state": False}).json()
    shap = client.post("/v1/score?explain=shap", json={**row, "update_state": False}).json()
    assert path["reason_method"] == "path" and shap["reason_method"] == "shap"
    assert abs(path["score"] - shap["score"]) < 1e-9  # same model, only the attribution differs
    assert len(shap["reasons"]) == 5
    bad = client.post("/v1/score?explain=gain", json=row)
    assert bad.status_code == 422 and "explain" in bad.text


def test_financial_risk_what_if_does_not_change_state(client: TestClient, stream: list[dict]) -> None:
    row = dict(_body(stream[400]), update_state=False)
    before = client.get("/v1/model").json()["feature_state"]["events"]
    a = client.post("/v1/score", json=row).json()
    b = client.post("/v1/score", json=row).json()
    assert a["score"] == b["score"]
    assert client.get("/v1/model").json()["feature_state"]["events"] == before


def test_financial_risk_bad_inputs(client: TestClient, stream: list[dict]) -> None:
    bad = dict(_body(stream[500]), amount=-5)
    r = client.post("/v1/score", json=bad)
    assert r.status_code == 422 and r.json()["error"] == "validation_error"
    assert any(d["loc"][-1] == "amount" for d in r.json()["detail"])
    r = client.post("/v1/score", json={"transaction_id": 1})
    assert r.status_code == 422
    r = client.post("/v1/score", json=dict(_body(stream[500]), timestamp="yesterday"))
    assert r.status_code == 422
    # ids beyond 64 bits, and times that would move a customer's clock decades ahead: refused, not a 500
    # (an id of 2**63 overflowed the feature state) and not a customer whose later transactions all fail
    refused = (("terminal_id", 2**63), ("transaction_id", 2**70), ("timestamp", "2999-01-01T00:00:00"))
    for field, value in refused:
        r = client.post("/v1/score", json=dict(_body(stream[500]), **{field: value}))
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == field, r.text
    # older than the customer's latest transaction: 409 out of order
    old = dict(_body(stream[500]), transaction_id=99_999_999, timestamp="2018-08-01T00:00:00")
    cust = stream[500]["customer_id"]
    if any(x["customer_id"] == cust for x in stream[:301]):
        r = client.post("/v1/score", json=old)
        assert r.status_code == 409 and r.json()["error"] == "out_of_order"
    r = client.post("/v1/score/batch", json={"transactions": []})
    assert r.status_code == 422
    r = client.post("/v1/credit/score", json={"limit_bal": 1000})
    assert r.status_code == 422 and r.json()["error"] == "validation_error"


def test_financial_risk_credit_score(client: TestClient, fr_data_dir: Path) -> None:
    from pipelines.financial_risk.common import credit_split
    from pipelines.financial_risk.data import CREDIT_FEATURES

    _, test = credit_split(fr_data_dir)
    row = test.iloc[0]
    body = {c.lower(): float(row[c]) for c in CREDIT_FEATURES}
    for c in ("SEX", "EDUCATION", "MARRIAGE", "AGE", "PAY_0", "PAY_2", "PAY_3", "PAY_4", "PAY_5", "PAY_6"):
        body[c.lower()] = int(row[c])
    r = client.post("/v1/credit/score", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert 0 < out["score"] < 1 and out["decision"] in ("approve", "decline")
    assert len(out["reasons"]) == 5
    assert out["model_version"] == client.get("/v1/model").json()["credit"]["version"]


def test_financial_risk_threshold_api(client: TestClient) -> None:
    cur = client.get("/v1/threshold")
    assert cur.status_code == 200 and 0 <= cur.json()["value"] <= 1
    assert client.put("/v1/threshold", json={"value": 0.3}).status_code == 401
    assert client.put("/v1/threshold", json={"value": 0.3}, headers={"X-API-Key": "nope"}).status_code == 403
    r = client.put("/v1/threshold", json={"value": 0.3}, headers={"X-API-Key": API_KEY})
    assert r.status_code == 200 and r.json()["value"] == 0.3 and r.json()["mode"] == "fixed"
    assert client.get("/v1/threshold").json()["value"] == 0.3
    assert "fraud_alert_threshold" in client.get("/metrics").text
    r = client.put("/v1/threshold", json={"value": 3}, headers={"X-API-Key": API_KEY})
    assert r.status_code == 422
    r = client.put(
        "/v1/threshold", json={"mode": "budget", "alert_budget": 0.02}, headers={"X-API-Key": API_KEY}
    )
    assert r.status_code == 200 and r.json()["mode"] == "budget"
