"""The public status page in Chromium, fed by a real carrier trunk: SIPp answers the
trunk's OPTIONS probes; killed, the page shows the trunk's voice component in a major
outage; restarted, operational again. The page passes axe-core and fits 375 px."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from fastapi import FastAPI
from playwright.sync_api import Page

from api.app import create_app
from api.channels import services_for
from api.settings import Settings
from escalation.channels.webhook import WebhookChannel
from gateway.call import Gateway, GatewayConfig
from gateway.sip.transaction import TimerSettings
from tests.browser.conftest import LiveServer, axe_violations, shot
from tests.integration.peers import free_port
from tests.integration.test_carriers_sipp import options_peer

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

COMPONENT = "#component-voice-carrier-a"


def status_app(tmp_path: Path, carrier_port: int) -> FastAPI:
    """`ackline serve` in miniature: the API plus a gateway whose carrier router probes
    one trunk (api.channels.services_for, as serve builds it)."""
    config = tmp_path / "ackline.yaml"
    config.write_text(yaml.safe_dump({
        "company": "acme",
        "carriers": {
            "allowed_countries": ["US"],
            "probe": {"interval": "0.2s", "timeout": "0.2s", "down_after": 2, "up_after": 1},
            "trunks": [{"name": "carrier-a", "host": "127.0.0.1", "port": carrier_port,
                        "trying_timeout": "0.3s"}],
        },
    }))  # fmt: skip
    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/ackline.db",
        config_path=config,
        api_keys={"k-acme": "acme"},
        audit_dir=tmp_path / "audit",
        embedded_worker=False,
        status_sample_interval=1.0,
        public_url="https://status.example.com",
        ack_secret="ack-secret",
    )
    # a webhook channel: the page offers its subscribe form (and axe checks it)
    app = create_app(settings, {"webhook": WebhookChannel("whsec-browser")})
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway_config = GatewayConfig(host="127.0.0.1", udp_port=0, tcp_port=0,
                                       timers=TimerSettings(t1=0.05))  # fmt: skip
        async with (
            inner(app),
            Gateway(gateway_config) as gateway,
            services_for(settings, gateway) as services,
        ):
            app.state.carriers_router = services.router
            yield

    app.router.lifespan_context = lifespan
    return app


def wait_for_state(page: Page, url: str, state: str, timeout: float = 15.0) -> float:
    """Reload until the voice component shows `state`; seconds it took."""
    start = time.monotonic()
    while True:
        page.goto(url)
        if page.get_attribute(COMPONENT, "data-state") == state:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, (
            f"still {page.get_attribute(COMPONENT, 'data-state')}, expected {state}"
        )
        page.wait_for_timeout(250)


def fits(page: Page, width: int) -> bool:
    return bool(page.evaluate("() => document.documentElement.scrollWidth") <= width)


def test_voice_component_follows_its_carrier(
    page: Page, csp_errors: list[str], tmp_path: Path
) -> None:
    port = free_port()
    with (
        options_peer(tmp_path, "carrier-first", port) as carrier,
        LiveServer(status_app(tmp_path, port)) as server,
    ):
        url = f"{server.url}/status"
        wait_for_state(page, url, "operational")
        assert page.text_content("#status-banner strong") == "All systems operational"
        assert page.text_content(f"{COMPONENT} .state") == "Operational"
        assert page.text_content(f"{COMPONENT} .component-name") == "Voice calls via carrier-a"
        main = page.inner_html("main")
        assert "127.0.0.1" not in main
        assert str(port) not in main  # the trunk's host is private
        assert page.is_visible("form[action='/status/subscribe']")
        shot(page, "status-page-desktop")
        page.set_viewport_size({"width": 375, "height": 800})
        page.goto(url)
        assert fits(page, 375)
        assert axe_violations(page) == []
        shot(page, "status-page-375")

        carrier.process.kill()
        carrier.process.wait()
        took = wait_for_state(page, url, "major_outage")
        assert took < 15
        assert page.text_content("#status-banner strong") == "Major outage"
        assert page.text_content(f"{COMPONENT} .state") == "Major outage"
        assert fits(page, 375)
        assert axe_violations(page) == []
        shot(page, "status-page-outage-375")
        page.set_viewport_size({"width": 1280, "height": 800})
        page.goto(url)
        shot(page, "status-page-outage-desktop")

        with options_peer(tmp_path, "carrier-restarted", port):
            wait_for_state(page, url, "operational")
            assert page.text_content("#status-banner strong") == "All systems operational"
        badge = page.request.get(f"{server.url}/status/badge/voice-carrier-a.svg")
        assert badge.ok
        assert "Voice calls via carrier-a" in badge.text()
    assert csp_errors == []
