"""What a client sees while PostgreSQL or Redis is down: 202 for what was committed, 503
with Retry-After for what could not be, never a 500; /readyz turns unready and back (for
Redis it only reports itself degraded: the API still serves)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import yaml

from api.app import create_app
from api.settings import Settings
from escalation.channels.base import Channel
from tests.conftest_escalation import PG_ADMIN, REDIS_URL
from tests.integration.fault_proxy import FaultProxy

pytest_plugins = ["tests.conftest_escalation"]

KEY = {"X-API-Key": "k-acme"}
CONFIG = {
    "company": "acme",
    "recipients": [{"id": "alice", "name": "Alice", "phone": "+14155550101"}],
    "policies": [{"name": "page", "steps": [{"recipients": ["alice"], "channels": ["sms"]}]}],
}


def _through(proxy: FaultProxy, url: str) -> str:
    """`url` with its host:port replaced by the proxy's."""
    scheme, rest = url.split("://", 1)
    credentials, _, hostpath = rest.rpartition("@")
    path = hostpath.split("/", 1)[1] if "/" in hostpath else ""
    at = f"{credentials}@" if credentials else ""
    return f"{scheme}://{at}127.0.0.1:{proxy.port}/{path}"


@contextlib.asynccontextmanager
async def api(
    database_url: str, redis_url: str | None, tmp_path: Path
) -> AsyncIterator[httpx.AsyncClient]:
    config = tmp_path / "ackline.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    settings = Settings(
        database_url=database_url,
        redis_url=redis_url,
        redis_prefix="ackline-outage-test",
        config_path=config,
        api_keys={"k-acme": "acme"},
        audit_dir=tmp_path / "audit",
        embedded_worker=False,
    )
    channels: dict[str, Channel] = {}
    app = create_app(settings, channels)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield client


async def _post(client: httpx.AsyncClient, key: str) -> httpx.Response:
    return await client.post(
        "/v1/alerts",
        json={"title": "db down", "policy": "page"},
        headers={**KEY, "Idempotency-Key": key},
    )


def _host_port(url: str) -> tuple[str, int]:
    hostport = url.split("://", 1)[1].rpartition("@")[2].split("/", 1)[0]
    host, _, port = hostport.partition(":")
    return host, int(port)


async def test_redis_down_a_committed_alert_still_answers_202(
    pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis only wakes the workers (they poll the database anyway): an ingest or an ack
    that committed answers success while Redis is away, and says so in the log once,
    not once per request."""
    redis_proxy = FaultProxy(*_host_port(REDIS_URL))
    async with redis_proxy, api(pg_url, _through(redis_proxy, REDIS_URL), tmp_path) as client:
        assert (await _post(client, "before")).status_code == 202
        await redis_proxy.cut()
        with caplog.at_level(logging.WARNING):
            answers = [await _post(client, f"during-{i}") for i in range(20)]
        assert [r.status_code for r in answers] == [202] * 20, answers[0].text
        failures = [r for r in caplog.records if "waking workers" in r.getMessage()]
        assert len(failures) == 1, [r.getMessage() for r in failures]
        alert_id = answers[0].json()["id"]
        got = await client.get(f"/v1/alerts/{alert_id}", headers=KEY)
        assert got.status_code == 200
        assert got.json()["state"] == "triggered"
        ack = await client.post(f"/v1/alerts/{alert_id}/ack", headers=KEY)
        assert ack.status_code == 200
        assert ack.json()["state"] == "acknowledged"
        ready = await client.get("/readyz")
        # still ready: a load balancer keeps sending alerts, which are accepted and paged
        assert ready.status_code == 200
        assert ready.json()["status"] == "degraded"
        assert ready.json()["redis"].startswith("error")
        await redis_proxy.restore()
        assert (await client.get("/readyz")).status_code == 200


async def test_database_down_answers_503_with_retry_after_then_recovers(
    pg_url: str, tmp_path: Path
) -> None:
    host, port = _host_port(PG_ADMIN)
    pg_proxy = FaultProxy(host, port)
    async with pg_proxy, api(_through(pg_proxy, pg_url), None, tmp_path) as client:
        first = await _post(client, "before")
        assert first.status_code == 202
        await pg_proxy.cut()
        for attempt in ("during-1", "during-2"):
            r = await _post(client, attempt)
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "5"
            assert r.json()["unavailable"] == "database"
        r = await client.post(f"/v1/alerts/{first.json()['id']}/ack", headers=KEY)
        assert r.status_code == 503
        assert "retry-after" in r.headers
        r = await client.get(f"/v1/alerts/{first.json()['id']}", headers=KEY)
        assert r.status_code == 503
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["database"].startswith("error")

        await pg_proxy.restore()
        codes = [(await _post(client, "during-1")).status_code for _ in range(3)]
        assert 500 not in codes, codes
        assert codes[-1] == 202, codes
        assert (await client.get("/readyz")).status_code == 200
        listed = await client.get(f"/v1/alerts/{first.json()['id']}", headers=KEY)
        assert listed.status_code == 200
