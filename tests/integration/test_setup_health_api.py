"""GET /v1/setup/health: the start-up warnings as data, behind the API key; a company
other than the file's sees only the installation-wide ones."""

from __future__ import annotations

from pathlib import Path

import httpx
import yaml

from api.app import create_app
from api.settings import Settings

pytest_plugins = ["tests.conftest_escalation"]

CONFIG = {
    "company": "acme",
    "recipients": [{"id": "alice", "name": "Alice", "phone": "+14155550101"}],
    "policies": [{"name": "critical", "steps": [{"recipients": ["alice"], "channels": ["sms"]}]}],
}


async def test_setup_health_lists_the_warnings_for_the_files_company(
    sqlite_url: str, tmp_path: Path
) -> None:
    config = tmp_path / "ackline.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    settings = Settings(
        database_url=sqlite_url, config_path=config, audit_dir=tmp_path / "audit",
        api_keys={"k-acme": "acme", "k-globex": "globex"},
    )  # fmt: skip
    app = create_app(settings, {})
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert (await c.get("/v1/setup/health")).status_code == 401
            bad = await c.get("/v1/setup/health", headers={"X-API-Key": "nope"})
            assert bad.status_code == 401
            acme = await c.get("/v1/setup/health", headers={"X-API-Key": "k-acme"})
            globex = await c.get("/v1/setup/health", headers={"X-API-Key": "k-globex"})
    assert acme.status_code == 200
    body = acme.json()
    assert body["ok"] is False
    assert [(w["code"], w["subject"]) for w in body["warnings"]] == [
        ("no_voice_route", "voice"),
        ("channel_unavailable", "policy critical"),
    ]
    assert "TWILIO_ACCOUNT_SID" in body["warnings"][1]["message"]
    assert [w["code"] for w in globex.json()["warnings"]] == ["no_voice_route"]
