"""Inbound integrations end to end: the payloads Alertmanager and Grafana document, posted
to the in-process API on SQLite and PostgreSQL, paging through scripted channels."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from api.app import create_app
from api.settings import Settings
from escalation.channels.base import Channel, DeliveryStatus
from storage.db import Database
from tests.conftest_escalation import ScriptedChannel, reply
from tests.waiting import wait_until

pytest_plugins = ["tests.conftest_escalation"]

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "integrations"
PUBLIC = "https://ackline.example.com"
KEY = {"X-API-Key": "k-acme"}
PROM_TOKEN = "prom-token-0123456789abcdef"
GRAFANA_TOKEN = "grafana-token-0123456789abcdef"
HOOK_TOKEN = "hook-token-0123456789abcdef"
CONFIG = {
    "company": "acme",
    "recipients": [
        {"id": "alice", "name": "Alice", "phone": "+14155550101"},
        {"id": "bob", "name": "Bob", "phone": "+14155550102"},
    ],
    "policies": [
        # alice first; bob two seconds later if nobody acknowledged or resolved
        {"name": "page", "steps": [{"recipients": ["alice"], "channels": ["sms"], "delay": "2s"},
                                   {"recipients": ["bob"], "channels": ["sms"]}]},
        {"name": "db", "steps": [{"recipients": ["bob"], "channels": ["sms"], "delay": "10m"}]},
    ],
    "integrations": [
        {"name": "prom", "format": "alertmanager", "token_env": "ACKLINE_TEST_PROM_TOKEN",
         "policy": "page",
         "routes": [{"match": {"team": "db"}, "severity": "medium", "policy": "db"}]},
        {"name": "grafana", "format": "grafana", "token": GRAFANA_TOKEN, "policy": "page",
         "routes": [{"match": {"zone": "eu-1"}, "policy": "db"}]},
        {"name": "hook", "format": "generic", "token": HOOK_TOKEN, "policy": "page",
         "routes": [{"match": {"check.service": "db"}, "policy": "db"}],
         "mapping": {"title": "check.name", "summary": "check.output",
                     "severity": "check.level", "dedup_key": "check.id", "status": "state",
                     "resolved_values": ["ok", "recovered"]}},
    ],
}  # fmt: skip


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


class Api:
    def __init__(self, client: httpx.AsyncClient, settings: Settings, sms: ScriptedChannel):
        self.client = client
        self.settings = settings
        self.sms = sms

    async def send(
        self, name: str, payload: object, token: str = PROM_TOKEN, **kw: Any
    ) -> httpx.Response:
        return await self.client.post(
            f"/v1/integrations/{name}", json=payload, params={"token": token}, **kw
        )

    async def alert(self, alert_id: str) -> dict[str, Any]:
        r = await self.client.get(f"/v1/alerts/{alert_id}", headers=KEY)
        assert r.status_code == 200, r.text
        data: dict[str, Any] = r.json()
        return data

    async def sql(self, query: str) -> list[Any]:
        db = Database(self.settings.database_url)
        try:
            async with db.engine.connect() as conn:
                return list((await conn.exec_driver_sql(query)).all())
        finally:
            await db.dispose()

    async def execute(self, statement: str) -> None:
        db = Database(self.settings.database_url)
        try:
            async with db.engine.begin() as conn:
                await conn.exec_driver_sql(statement)
        finally:
            await db.dispose()

    async def counts(self) -> tuple[int, int]:
        (alerts,) = await self.sql("SELECT count(*) FROM alerts")
        (jobs,) = await self.sql("SELECT count(*) FROM jobs")
        return int(alerts[0]), int(jobs[0])

    def audit(self) -> list[dict[str, Any]]:
        path = self.settings.audit_dir / "acme.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(line) for line in lines]

    def payload_audit(self) -> list[dict[str, Any]]:
        return [r for r in self.audit() if r.get("event") == "integration_payload"]

    def paged(self) -> list[tuple[str, str]]:
        return [(s.notification.alert_id, s.notification.contact.recipient_id)
                for s in self.sms.sent]  # fmt: skip

    async def until_paged(self, count: int, timeout: float = 5.0) -> None:
        await wait_until(lambda: len(self.sms.sent) >= count, timeout, f"{count} pages")


@contextlib.asynccontextmanager
async def running(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Api]:
    monkeypatch.setenv("ACKLINE_TEST_PROM_TOKEN", PROM_TOKEN)
    config = tmp_path / "ackline.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    settings = Settings(
        database_url=db_url,
        config_path=config,
        api_keys={"k-acme": "acme"},
        audit_dir=tmp_path / "audit",
        public_url=PUBLIC,
        ack_secret="ack-secret",
        poll_interval=0.1,
    )
    sms = ScriptedChannel("sms", reply(DeliveryStatus.DELIVERED))
    channels: dict[str, Channel] = {"sms": sms}
    app = create_app(settings, channels)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 5555))
        async with httpx.AsyncClient(transport=transport, base_url=PUBLIC) as client:
            yield Api(client, settings, sms)


async def test_alertmanager_alerts_are_created_per_fingerprint_routed_and_deduplicated(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(db_url, tmp_path, monkeypatch) as api:
        r = await api.send("prom", fixture("alertmanager_firing.json"))
        assert r.status_code == 200, r.text
        got = r.json()
        assert (got["created"], got["deduplicated"], got["resolved"]) == (2, 0, 0)
        db1, db2 = [await api.alert(i) for i in got["alerts"]]
        assert db1["dedup_key"] == "3c2c3d2e5a7f4b10"
        assert db1["title"] == "PostgresDown: PostgreSQL on db1 is down"
        assert db1["summary"].startswith("pg_up has been 0 on db1")
        # critical matches no route (it wants medium): the integration's default policy
        assert (db1["severity"], db1["policy"]) == ("critical", "page")
        # severity=warning is ackline's medium, with team=db: the route's policy
        assert (db2["severity"], db2["policy"]) == ("medium", "db")
        assert db2["details"]["labels"]["instance"] == "db2.example.com:9187"
        assert db2["details"]["source"] == "integration:prom"

        again = await api.send("prom", fixture("alertmanager_firing.json"))
        assert again.status_code == 200, again.text
        assert (again.json()["created"], again.json()["deduplicated"]) == (0, 2)
        assert again.json()["alerts"] == got["alerts"]
        assert (await api.counts())[0] == 2
        assert (await api.alert(db1["id"]))["dup_count"] == 1

        audit = api.payload_audit()
        assert [(a["status"], a["created"], a["deduplicated"]) for a in audit] == [
            ("received", 2, 0), ("received", 0, 2),
        ]  # fmt: skip
        assert {(a["integration"], a["format"], a["actor"]) for a in audit} == {
            ("prom", "alertmanager", "integration:prom")
        }
        created = [r for r in api.audit() if r.get("event") == "created"]
        assert {r["actor"] for r in created} == {"integration:prom"}
        assert {r["alert_id"] for r in created} == set(got["alerts"])


async def test_resolved_resolves_the_alert_and_nothing_more_is_sent(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(db_url, tmp_path, monkeypatch) as api:
        r = await api.send("prom", fixture("alertmanager_firing.json"))
        db1 = r.json()["alerts"][0]
        await api.until_paged(2)  # db1's first step (alice), db2's (bob)
        assert sorted(api.paged()) == sorted([(db1, "alice"), (r.json()["alerts"][1], "bob")])

        resolved = await api.send("prom", fixture("alertmanager_resolved.json"))
        assert resolved.status_code == 200, resolved.text
        assert resolved.json() == {
            "created": 0, "deduplicated": 0, "resolved": 1, "unmatched": 0, "alerts": [db1],
        }  # fmt: skip
        alert = await api.alert(db1)
        assert (alert["state"], alert["resolved_by"]) == ("resolved", "integration:prom")
        pending = await api.sql(f"SELECT count(*) FROM jobs WHERE alert_id = '{db1}' AND NOT done")
        assert pending[0][0] == 0
        # step 2 (bob) was due two seconds after step 1: it never comes
        await asyncio.sleep(3)
        assert (db1, "bob") not in api.paged()
        assert len(api.sms.sent) == 2

        # once resolved, the same fingerprint firing again is a new alert
        refire = await api.send("prom", fixture("alertmanager_firing.json"))
        assert (refire.json()["created"], refire.json()["deduplicated"]) == (1, 1)
        # and a resolve for a fingerprint with nothing open changes nothing
        stale = fixture("alertmanager_resolved.json")
        stale["alerts"][0]["fingerprint"] = "0000000000000000"
        nothing = await api.send("prom", stale)
        assert (nothing.json()["resolved"], nothing.json()["unmatched"]) == (0, 1)
        assert [a["resolved"] for a in api.payload_audit()] == [0, 1, 0, 0]


async def test_grafana_example_routes_by_label(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(db_url, tmp_path, monkeypatch) as api:
        headers = {"Authorization": f"Bearer {GRAFANA_TOKEN}"}
        r = await api.client.post(
            "/v1/integrations/grafana", json=fixture("grafana_firing.json"), headers=headers
        )
        assert r.status_code == 200, r.text
        memory, cpu = [await api.alert(i) for i in r.json()["alerts"]]
        assert (memory["dedup_key"], memory["policy"]) == ("c6eadffa33fcdf37", "page")
        assert (cpu["dedup_key"], cpu["policy"]) == ("bc97ff14869b13e3", "db")
        assert memory["title"] == "High memory usage: This alert was triggered for zone us-1"
        assert memory["details"]["silence_url"].startswith("https://play.grafana.org/")

        resolved = fixture("grafana_firing.json")
        resolved["status"] = "resolved"
        for alert in resolved["alerts"]:
            alert["status"] = "resolved"
        r = await api.client.post("/v1/integrations/grafana", json=resolved, headers=headers)
        assert r.json()["resolved"] == 2
        assert {(await api.alert(i))["state"] for i in r.json()["alerts"]} == {"resolved"}
        assert [a["format"] for a in api.payload_audit()] == ["grafana", "grafana"]


async def test_generic_json_through_its_mapping(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    check = {"id": "chk-42", "name": "api latency", "output": "p99 2.1s", "level": "warning",
             "service": "db"}  # fmt: skip
    async with running(db_url, tmp_path, monkeypatch) as api:
        r = await api.send("hook", {"state": "alerting", "check": check}, token=HOOK_TOKEN)
        assert r.status_code == 200, r.text
        (alert_id,) = r.json()["alerts"]
        alert = await api.alert(alert_id)
        assert (alert["title"], alert["summary"]) == ("api latency", "p99 2.1s")
        assert (alert["severity"], alert["policy"], alert["dedup_key"]) == (
            "medium", "db", "chk-42",
        )  # fmt: skip
        r = await api.send("hook", {"state": "recovered", "check": check}, token=HOOK_TOKEN)
        assert r.json()["resolved"] == 1
        assert (await api.alert(alert_id))["state"] == "resolved"

        missing = await api.send("hook", {"state": "ok", "check": {"id": "x"}}, token=HOOK_TOKEN)
        assert missing.status_code == 422
        assert missing.json()["detail"] == ["check.name: missing (mapping.title)"]


@pytest.mark.parametrize("how", ["query", "bearer", "header"])
async def test_the_token_may_come_in_the_url_or_a_header(
    how: str, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(db_url, tmp_path, monkeypatch) as api:
        params = {"token": PROM_TOKEN} if how == "query" else {}
        headers = {
            "query": {}, "bearer": {"Authorization": f"Bearer {PROM_TOKEN}"},
            "header": {"X-Integration-Token": PROM_TOKEN},
        }[how]  # fmt: skip
        r = await api.client.post(
            "/v1/integrations/prom", json=fixture("alertmanager_firing.json"),
            params=params, headers=headers,
        )  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["created"] == 2


async def test_a_wrong_token_or_name_is_401_and_says_not_which(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = fixture("alertmanager_firing.json")
    async with running(db_url, tmp_path, monkeypatch) as api:
        wrong = await api.send("prom", payload, token=PROM_TOKEN + "x")
        other = await api.send("prom", payload, token=GRAFANA_TOKEN)  # grafana's token
        unknown = await api.send("nagios", payload)
        bare = await api.client.post("/v1/integrations/prom", json=payload)
        empty_env = await api.send("prom", payload, token="")
        for r in (wrong, other, unknown, bare, empty_env):
            assert r.status_code == 401, r.text
            assert r.json() == {"detail": "unknown integration or wrong token"}
        assert await api.counts() == (0, 0)
        assert api.payload_audit() == []


async def test_a_bad_payload_changes_nothing_and_names_the_field(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(db_url, tmp_path, monkeypatch) as api:
        # the first alert is fine, the second has no fingerprint: neither is ingested
        payload = fixture("alertmanager_firing.json")
        del payload["alerts"][1]["fingerprint"]
        r = await api.send("prom", payload)
        assert r.status_code == 422, r.text
        assert r.json()["detail"] == ["alerts[1].fingerprint: Field required"]

        wrong_version = {**fixture("alertmanager_firing.json"), "version": "3"}
        r = await api.send("prom", wrong_version)
        assert r.status_code == 422
        assert r.json()["detail"] == ["version: Input should be '4'"]

        huge = copy.deepcopy(fixture("alertmanager_firing.json"))
        huge["alerts"][1]["annotations"]["description"] = "x" * 20_000
        r = await api.send("prom", huge)
        assert r.status_code == 422
        assert r.json()["detail"][0].startswith("alerts[1].details: ")

        r = await api.client.post(
            "/v1/integrations/prom", content=b"{not json", params={"token": PROM_TOKEN}
        )
        assert r.status_code == 400
        assert r.json()["detail"].startswith("the body is not JSON")
        deep = await api.client.post(
            "/v1/integrations/hook", content=b"[" * 100_000 + b"]" * 100_000,
            params={"token": HOOK_TOKEN},
        )  # fmt: skip
        assert deep.status_code == 400, deep.text
        nested: Any = {"state": "alerting", "check": {"id": "n", "name": "deep"}}
        for _ in range(500):
            nested = {"n": nested, "check": {"id": "n", "name": "deep"}}
        r = await api.send("hook", {"state": "x", "check": {"name": "t", "id": "d"}, "n": nested},
                           token=HOOK_TOKEN)  # fmt: skip
        assert r.status_code == 422, r.text  # 16 KiB of details at most
        assert r.json()["detail"][0].startswith("alerts[0].details: ")

        assert await api.counts() == (0, 0)
        assert api.sms.sent == []
        # audited once authenticated, whatever was wrong with the payload after that
        audit = [(a["integration"], a["status"], a["errors"][0]) for a in api.payload_audit()]
        too_big = "details: details must serialise to at most 16384 bytes"
        assert audit == [
            ("prom", "rejected", "alerts[1].fingerprint: Field required"),
            ("prom", "rejected", "version: Input should be '4'"),
            ("prom", "rejected", f"alerts[1].{too_big}"),
            ("hook", "rejected", f"alerts[0].{too_big}"),
        ]


async def test_integrations_are_managed_through_the_api(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = {"name": "am2", "format": "alertmanager", "token": "am2-token-0123456789",
            "policy": "db"}  # fmt: skip
    async with running(db_url, tmp_path, monkeypatch) as api:
        assert (await api.client.post("/v1/integrations", json=body)).status_code == 401
        r = await api.client.post("/v1/integrations", json=body, headers=KEY)
        assert r.status_code == 201, r.text
        assert "token" not in r.json()
        listed = (await api.client.get("/v1/integrations", headers=KEY)).json()
        assert [i["name"] for i in listed] == ["am2", "grafana", "hook", "prom"]
        assert all("token" not in i for i in listed)
        assert listed[3]["token_env"] == "ACKLINE_TEST_PROM_TOKEN"
        dup = await api.client.post("/v1/integrations", json=body, headers=KEY)
        assert dup.status_code == 409

        r = await api.send("am2", fixture("alertmanager_firing.json"), token=body["token"])
        assert r.json()["created"] == 2
        assert {(await api.alert(i))["policy"] for i in r.json()["alerts"]} == {"db"}

        bad = {**body, "policy": "nope"}
        r = await api.client.put("/v1/integrations/am2", json=bad, headers=KEY)
        assert (r.status_code, r.json()["detail"]) == (422, ["policy: unknown policy 'nope'"])
        r = await api.client.delete("/v1/policies/db", headers=KEY)
        assert r.status_code == 409
        assert "integration am2" in r.json()["detail"]

        rotated = {**body, "token": "am2-new-token-0123456789"}
        r = await api.client.put("/v1/integrations/am2", json=rotated, headers=KEY)
        assert r.status_code == 200, r.text
        old = await api.send("am2", fixture("alertmanager_firing.json"), token=body["token"])
        assert old.status_code == 401

        assert (await api.client.delete("/v1/integrations/am2", headers=KEY)).status_code == 204
        gone = await api.send("am2", fixture("alertmanager_firing.json"), token=rotated["token"])
        assert gone.status_code == 401
        r = await api.client.get("/v1/integrations/am2", headers=KEY)
        assert r.status_code == 404


async def test_a_policy_gone_from_under_an_integration_is_a_conflict_not_a_half_ingest(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(db_url, tmp_path, monkeypatch) as api:
        first = await api.send("prom", fixture("alertmanager_firing.json"))
        db1, db2 = first.json()["alerts"]
        # the API refuses to delete it (integration prom routes to it); a hand edit did not
        await api.execute("DELETE FROM policies WHERE name = 'db'")
        fresh = fixture("alertmanager_firing.json")
        for alert in fresh["alerts"]:
            alert["fingerprint"] += "-new"
        r = await api.send("prom", fresh)
        assert r.status_code == 409, r.text
        assert r.json()["detail"] == "the integration routes to unknown policy 'db'"
        assert (await api.counts())[0] == 2
        # resolving needs no policy: the alert paged through the deleted one still closes
        resolved = fixture("alertmanager_resolved.json")
        resolved["alerts"][0]["fingerprint"] = "9a0e4f6b1c2d3e4f"
        r = await api.send("prom", resolved)
        assert (r.status_code, r.json()["alerts"]) == (200, [db2]), r.text
        assert (await api.alert(db1))["state"] == "triggered"
        assert [a["status"] for a in api.payload_audit()] == ["received", "rejected", "received"]
