"""Shared pytest fixtures.

Kafka: tests marked ``kafka`` use ``kafka_bootstrap`` (the broker started by
``python scripts/local_kafka.py run -- python -m pytest``, i.e. ``make test``) and ``kafka_topic``.
Without a reachable broker these tests fail; they never skip.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable

import pytest

# ----------------------------------------------------------------------------------------------- Kafka
KAFKA_BOOTSTRAP_ENV = "KAFKA_BOOTSTRAP_SERVERS"


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """Bootstrap address of the test broker, from ``$KAFKA_BOOTSTRAP_SERVERS``; fails the test if unset
    or unreachable."""
    bootstrap = os.environ.get(KAFKA_BOOTSTRAP_ENV, "").strip()
    if not bootstrap:
        pytest.fail(
            f"{KAFKA_BOOTSTRAP_ENV} is not set. Kafka tests need the local broker: run them through "
            "`make test` or `python scripts/local_kafka.py run -- python -m pytest ...`.",
            pytrace=False,
        )
    from backbone.kafka import kafka_reachable

    ok, reason = kafka_reachable(bootstrap, timeout_s=10.0)
    if not ok:
        pytest.fail(f"Kafka at {KAFKA_BOOTSTRAP_ENV}={bootstrap} is not reachable: {reason}", pytrace=False)
    return bootstrap


@pytest.fixture
def kafka_topic(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """Factory of topic names unique to the calling test: ``kafka_topic("orders")``."""
    test = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[:80].strip("-")

    def make(prefix: str = "t") -> str:
        return f"{prefix}-{test}-{uuid.uuid4().hex[:10]}"

    return make
