"""The webphone's signalling API with aiortc standing in for the browser: refusals, limits,
hang-up while ringing (CANCEL to SIPp), and a browser that goes away mid-call (BYE).

These are the paths a QA engineer rarely clicks through but that must not leak calls or
peer connections; the Chromium test covers the happy path with a real browser.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from fastapi import FastAPI

from api import webphone as webphone_module
from api.webphone import SipAudioTrack, Webphone, WebphoneConfig, loopback_offer
from api.webphone_page import PAGE
from gateway.call import Gateway, GatewayConfig
from gateway.softphone import Softphone
from tests.integration.peers import sipp

pytestmark = pytest.mark.interop

LOCAL = ("127.0.0.1", 40000)


class Browser:
    """An aiortc peer connection that offers audio like the page does."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.mic = SipAudioTrack()  # silence, paced like a microphone
        self.pc.addTrack(self.mic)
        self._tasks: set[asyncio.Task[None]] = set()

        @self.pc.on("track")
        def _track(track: MediaStreamTrack) -> None:
            task = asyncio.ensure_future(self._drain(track))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _drain(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return str(self.pc.localDescription.sdp)

    async def accept(self, body: dict[str, Any]) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(body["sdp"], body["type"]))

    async def close(self) -> None:
        await self.pc.close()
        for task in list(self._tasks):
            task.cancel()


@contextlib.asynccontextmanager
async def api(
    config: WebphoneConfig | None = None, client: tuple[str, int] = LOCAL, enabled: bool = True
) -> AsyncIterator[tuple[httpx.AsyncClient, Webphone, Gateway]]:
    async with Gateway(GatewayConfig(host="127.0.0.1")) as gateway:
        app = FastAPI()
        app.include_router(webphone_module.router)
        webphone = Webphone(gateway, config)
        if enabled:
            app.state.webphone = webphone
        transport = httpx.ASGITransport(app=app, client=client)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            try:
                yield http, webphone, gateway
            finally:
                await webphone.close()


async def until_state(http: httpx.AsyncClient, call_id: str, *states: str) -> dict[str, Any]:
    for _ in range(200):
        body: dict[str, Any] = (await http.get(f"/v1/webphone/calls/{call_id}")).json()
        if body["state"] in states:
            return body
        await asyncio.sleep(0.05)
    raise TimeoutError(f"call never reached {states}: {body}")


def test_page_is_self_contained() -> None:
    assert "://" not in PAGE  # no external host, no CDN
    for part in ('id="target"', 'id="call"', 'id="hangup"', 'data-key="#"', "<audio"):
        assert part in PAGE


def test_offer_keeps_loopback_host_candidates_only() -> None:
    sdp = "\r\n".join(
        [
            "v=0",
            "a=candidate:1 1 udp 2122260223 192.0.2.2 50000 typ host generation 0",
            "a=candidate:2 1 udp 2122194687 127.0.0.1 50001 typ host generation 0",
            "a=candidate:3 1 udp 2122129151 3f1c2a.local 50002 typ host generation 0",
            "a=candidate:4 1 udp 1686052607 198.51.100.9 50003 typ srflx raddr 0.0.0.0",
            "a=candidate:5 1 udp 2122063615 ::1 50004 typ host generation 0",
            "a=end-of-candidates",
        ]
    )
    filtered, kept = loopback_offer(sdp)
    assert kept == 2
    assert "127.0.0.1 50001" in filtered
    assert "::1 50004" in filtered
    for gone in ("192.0.2.2", ".local", "198.51.100.9"):
        assert gone not in filtered
    assert "a=end-of-candidates" in filtered


async def test_refusals_say_why() -> None:
    offer = {"sdp": "v=0\r\n", "type": "offer", "target": "sip:qa@127.0.0.1:5"}
    async with api(enabled=False) as (http, _, _):
        page = await http.get("/webphone")
        assert page.status_code == 200
        assert "default-src 'none'" in page.headers["content-security-policy"]
        r = await http.post("/v1/webphone/calls", json=offer)
        assert r.status_code == 503
        assert "not enabled" in r.json()["detail"]
    async with api(client=("203.0.113.7", 5555)) as (http, _, _):
        r = await http.post("/v1/webphone/calls", json=offer)
        assert r.status_code == 403
    async with api() as (http, webphone, _):
        r = await http.post("/v1/webphone/calls", json={**offer, "target": "+15550100"})
        assert r.status_code == 400
        assert "SIP URI" in r.json()["detail"]
        r = await http.post("/v1/webphone/calls", json=offer)  # no candidates at all
        assert r.status_code == 400
        assert "loopback" in r.json()["detail"]
        r = await http.post("/v1/webphone/calls", json={**offer, "type": "answer"})
        assert r.status_code == 422
        assert (await http.get("/v1/webphone/calls/nope")).status_code == 404
        assert not webphone.calls


async def test_hangup_while_ringing_cancels_and_limit_holds(tmp_path: Path) -> None:
    with sipp("uas_ring_cancel.xml", tmp_path) as peer:
        async with api(WebphoneConfig(max_calls=1)) as (http, webphone, gateway):
            browser = Browser()
            other = Browser()
            try:
                r = await http.post(
                    "/v1/webphone/calls",
                    json={
                        "sdp": await browser.offer(),
                        "type": "offer",
                        "target": f"sip:qa@{peer.address}",
                    },
                )
                assert r.status_code == 201, r.text
                body = r.json()
                assert body["type"] == "answer"
                assert "a=candidate:" in body["sdp"]
                for line in body["sdp"].splitlines():
                    if line.startswith("a=candidate:"):
                        assert " 127.0.0.1 " in line, line
                await browser.accept(body)
                call_id = body["id"]
                await until_state(http, call_id, "ringing")

                # One call is the limit: a second browser is turned away, nothing is dialled.
                r = await http.post(
                    "/v1/webphone/calls",
                    json={
                        "sdp": await other.offer(),
                        "type": "offer",
                        "target": f"sip:qa@{peer.address}",
                    },
                )
                assert r.status_code == 503
                assert r.headers["retry-after"] == "5"

                r = await http.post(f"/v1/webphone/calls/{call_id}/dtmf", json={"digits": "1"})
                assert r.status_code == 409  # not answered yet

                r = await http.delete(f"/v1/webphone/calls/{call_id}")
                assert r.status_code == 200
                ended = r.json()
            finally:
                await browser.close()
                await other.close()
            assert ended["state"] == "ended", ended
            assert (ended["outcome"], ended["sip_code"]) == ("cancelled", 487), ended
            assert ended["connection_state"] == "closed"
            assert webphone.active == 0
            assert not gateway.calls
        assert peer.wait(10) == 0, peer.logs()
        assert any("CANCEL CSeq" in line for line in peer.log_lines())


async def test_browser_going_away_hangs_up_the_sip_call() -> None:
    config = WebphoneConfig(max_calls=2)
    async with Softphone() as phone, api(config) as (http, webphone, gateway):
        host, port = phone.address

        async def callee() -> tuple[str | None, str]:
            async with phone.answer(timeout=10) as leg:
                result = await leg.wait_hangup(30)
                return result.hangup_by, result.reason

        answering = asyncio.create_task(callee())
        browser = Browser()
        try:
            r = await http.post(
                "/v1/webphone/calls",
                json={
                    "sdp": await browser.offer(),
                    "type": "offer",
                    "target": f"sip:qa@{host}:{port}",
                },
            )
            assert r.status_code == 201, r.text
            await browser.accept(r.json())
            call_id = r.json()["id"]
            answered = await until_state(http, call_id, "answered", "ended")
            assert answered["state"] == "answered", answered
            r = await http.post(f"/v1/webphone/calls/{call_id}/dtmf", json={"digits": "42#"})
            assert r.status_code == 202, r.text
        finally:
            await browser.close()  # the tab is gone: DTLS closes, no DELETE ever comes
        hangup_by, reason = await asyncio.wait_for(answering, 30)
        ended = await until_state(http, call_id, "ended")
    assert (hangup_by, reason) == ("remote", "remote hangup")  # our BYE
    assert ended["hangup_by"] == "local", ended
    assert ended["error"] == "the browser went away", ended
    assert ended["digits_sent"] == "42#"
    assert ended["connection_state"] == "closed"
    assert webphone.active == 0
    assert not gateway.calls


async def test_concurrent_offers_respect_the_limit_and_a_silent_browser_times_out() -> None:
    config = WebphoneConfig(max_calls=1, connect_timeout=1.0)
    async with api(config) as (http, webphone, gateway):
        browsers = [Browser(), Browser()]
        try:
            offers = [await b.offer() for b in browsers]
            responses = await asyncio.gather(
                *(
                    http.post(
                        "/v1/webphone/calls",
                        json={"sdp": sdp, "type": "offer", "target": "sip:qa@127.0.0.1:9"},
                    )
                    for sdp in offers
                )
            )
            assert sorted(r.status_code for r in responses) == [201, 503]
            [winner] = [r.json() for r in responses if r.status_code == 201]
            # The browser never applies the answer: no ICE, so no SIP call is placed.
            ended = await until_state(http, winner["id"], "ended")
        finally:
            for browser in browsers:
                await browser.close()
        assert ended["error"] == "the browser's WebRTC connection did not come up", ended
        assert ended["result"] is None
        assert ended["connection_state"] == "closed"
        assert webphone.active == 0
        assert not gateway.calls


async def test_an_offer_aiortc_cannot_take_is_a_400() -> None:
    sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=candidate:1 1 udp 1 127.0.0.1 5 typ host\r\n"
    async with api() as (http, webphone, _):
        r = await http.post(
            "/v1/webphone/calls", json={"sdp": sdp, "type": "offer", "target": "sip:qa@127.0.0.1:9"}
        )
        assert r.status_code == 400, r.text
        assert "ICE username" in r.json()["detail"], r.text  # aiortc's own word for it
        assert not webphone.calls
