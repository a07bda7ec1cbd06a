"""Browser softphone: a page a QA engineer opens in Chromium to call a flow with a keypad.

The browser speaks WebRTC to us (aiortc) and we place an ordinary SIP call with the
application's `Gateway`, bridging the two: browser Opus (48 kHz) is resampled to 8 kHz mono
and queued on the SIP leg's `MediaSession` in 20 ms chunks; audio the SIP leg receives is
paced back to the browser as 8 kHz frames of a `MediaStreamTrack`, which aiortc encodes.
Keys go over HTTP to `Call.send_digits`, so the flow under test sees real RFC 4733 / INFO.

Signalling is plain HTTP with non-trickle ICE: the page POSTs its offer once gathering is
complete and gets the complete answer back. ICE is kept on loopback (our only host
candidate is `WebphoneConfig.ice_host`, non-loopback browser candidates are dropped), as a
QA tool on the gateway's own machine needs nothing else and sends nothing off the box.

The webphone is off unless the process sets `app.state.webphone = Webphone(gateway)`; it
then answers loopback clients only (by default), at most `max_calls` at a time, and every
call's peer connection is closed when its SIP call ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import ipaddress
import json
import logging
import re
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import aioice.ice
import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse
from numpy.typing import NDArray
from pydantic import BaseModel, Field

from api.json_body import StrictJsonRoute
from api.webphone_page import CONTENT_SECURITY_POLICY, PAGE
from gateway.call import Call, CallEnded, Gateway, parse_target
from gateway.media.dtmf import DtmfMethod
from gateway.media.session import MediaSession, MediaSessionClosed
from gateway.result import CallResult

__all__ = [
    "SipAudioTrack",
    "Webphone",
    "WebphoneCall",
    "WebphoneConfig",
    "router",
]

logger = logging.getLogger(__name__)

RATE = 8000
FRAME = 160  # 20 ms at 8 kHz: the SIP leg's frame
_TIME_BASE = fractions.Fraction(1, RATE)
_MAX_REPORT_BYTES = 16384


@dataclass(frozen=True)
class WebphoneConfig:
    """Bounds of the webphone; the defaults suit one QA engineer on the gateway's box."""

    max_calls: int = 4  # concurrent calls (WebRTC setup included)
    ring_timeout: float = 30.0
    connect_timeout: float = 10.0  # browser ICE/DTLS must be up by then, else no SIP call
    max_call_seconds: float = 3600.0
    ice_host: str = "127.0.0.1"  # our only ICE host candidate
    loopback_ice_only: bool = True  # ignore the browser's non-loopback candidates and sources
    loopback_clients_only: bool = True  # refuse HTTP clients that are not on this machine
    uplink_queue_ms: int = 200  # browser audio queued on the SIP leg before chunks are dropped
    downlink_buffer_ms: int = 400  # SIP audio buffered for the browser before dropping the oldest
    keep_ended: int = 32  # ended calls kept for polling ...
    keep_ended_seconds: float = 300.0  # ... for at most this long


# -- ICE on loopback ----------------------------------------------------------------------
# aiortc offers no way to choose host candidates or to refuse sources, so the webphone
# adjusts aioice (which only the webphone uses in this process): its host candidates are
# the configured address (aioice skips 127.0.0.1 by itself), and with `loopback_ice_only`
# STUN and media datagrams from non-loopback sources are dropped, so a browser that also
# has a LAN address cannot pull the pair off loopback.


@dataclass
class _IceScope:
    hosts: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    loopback_only: bool = True
    installed: bool = False


_ice = _IceScope()


def _webphone_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    return list(_ice.hosts)


def _use_ice(host: str, loopback_only: bool) -> None:
    _ice.hosts[:] = [host]
    _ice.loopback_only = loopback_only
    if _ice.installed:
        return
    _ice.installed = True
    aioice.ice.get_host_addresses = _webphone_host_addresses
    protocol = aioice.ice.StunProtocol
    receive = protocol.datagram_received

    def datagram_received(self: aioice.ice.StunProtocol, data: bytes | str, addr: Any) -> None:
        if _ice.loopback_only and not _is_loopback(str(addr[0])):
            return
        receive(self, data, addr)

    protocol.datagram_received = datagram_received  # type: ignore[method-assign]


_CANDIDATE = re.compile(r"^a=candidate:\S+ \d+ \S+ \d+ (\S+) \d+ typ (\S+)", re.IGNORECASE)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # mDNS names (.local) and anything else


def loopback_offer(sdp: str) -> tuple[str, int]:
    """Drop ICE candidates that are not loopback host candidates; returns (sdp, kept)."""
    lines: list[str] = []
    kept = 0
    for line in sdp.splitlines():
        match = _CANDIDATE.match(line)
        if match is not None:
            if not (_is_loopback(match.group(1)) and match.group(2).lower() == "host"):
                continue
            kept += 1
        lines.append(line)
    return "\r\n".join(lines) + "\r\n", kept


# -- media bridge -------------------------------------------------------------------------


class SipAudioTrack(MediaStreamTrack):
    """What the SIP leg hears, as a WebRTC audio track: 8 kHz s16 mono, 20 ms frames.

    `feed` is the SIP leg's audio listener; `recv` is paced on the loop clock and sends
    silence when nothing arrived, so the browser's jitter buffer sees a steady stream.
    """

    kind = "audio"

    def __init__(self, buffer_ms: int = 400) -> None:
        super().__init__()
        self._capacity = max(FRAME, buffer_ms * RATE // 1000)
        self._chunks: deque[NDArray[np.int16]] = deque()
        self._buffered = 0
        self._pts = 0
        self._start: float | None = None
        self.frames_sent = 0
        self.samples_fed = 0
        self.samples_dropped = 0

    def feed(self, pcm: NDArray[np.int16]) -> None:
        self._chunks.append(pcm)
        self._buffered += len(pcm)
        self.samples_fed += len(pcm)
        while self._buffered > self._capacity and self._chunks:
            old = self._chunks.popleft()  # too far behind real time: drop the oldest
            self._buffered -= len(old)
            self.samples_dropped += len(old)

    def _take(self, count: int) -> NDArray[np.int16]:
        out = np.zeros(count, dtype=np.int16)
        filled = 0
        while filled < count and self._chunks:
            chunk = self._chunks[0]
            n = min(count - filled, len(chunk))
            out[filled : filled + n] = chunk[:n]
            filled += n
            if n == len(chunk):
                self._chunks.popleft()
            else:
                self._chunks[0] = chunk[n:]
            self._buffered -= n
        return out

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._start is None:
            self._start = now
        due = self._start + self._pts / RATE
        if due > now:
            await asyncio.sleep(due - now)
        elif now - due > 0.1:
            self._start = now - self._pts / RATE  # the loop stalled: do not burst to catch up
        frame = av.AudioFrame.from_ndarray(
            self._take(FRAME).reshape(1, FRAME), format="s16", layout="mono"
        )
        frame.sample_rate = RATE
        frame.pts = self._pts
        frame.time_base = _TIME_BASE
        self._pts += FRAME
        self.frames_sent += 1
        return frame


@dataclass
class UplinkStats:
    """Browser → SIP: what arrived from the browser and what was queued on the SIP leg."""

    frames_received: int = 0
    chunks_played: int = 0
    chunks_dropped: int = 0  # the SIP leg fell behind (or is on hold)
    chunks_before_answer: int = 0
    peak: int = 0  # largest absolute sample sent to the SIP leg


class _Uplink:
    """Queues 20 ms chunks with `MediaSession.play`, which plays them back to back; the
    number in flight is bounded so latency cannot build up behind a slow or held leg."""

    def __init__(self, max_chunks: int) -> None:
        self.max_chunks = max(1, max_chunks)
        self.media: MediaSession | None = None
        self.stats = UplinkStats()
        self._in_flight: deque[asyncio.Future[None]] = deque()
        self._pending = np.zeros(0, dtype=np.int16)

    def push(self, pcm: NDArray[np.int16]) -> None:
        data = np.concatenate([self._pending, pcm]) if self._pending.size else pcm
        whole = data.size - data.size % FRAME
        for start in range(0, whole, FRAME):
            self._play(data[start : start + FRAME].copy())
        self._pending = data[whole:].copy()

    def _play(self, chunk: NDArray[np.int16]) -> None:
        media = self.media
        if media is None:
            self.stats.chunks_before_answer += 1
            return
        while self._in_flight and self._in_flight[0].done():
            self._in_flight.popleft()
        if len(self._in_flight) >= self.max_chunks:
            self.stats.chunks_dropped += 1
            return
        self._in_flight.append(media.play(chunk))
        self.stats.chunks_played += 1
        self.stats.peak = max(self.stats.peak, int(np.abs(chunk.astype(np.int32)).max()))

    def stop(self) -> None:
        self.media = None
        for future in self._in_flight:
            future.cancel()
        self._in_flight.clear()


# -- calls --------------------------------------------------------------------------------

State = Literal["connecting", "calling", "ringing", "answered", "ended"]


@dataclass(eq=False)
class WebphoneCall:
    """One browser call: its peer connection, its SIP call and what the page reported."""

    id: str
    target: str
    pc: RTCPeerConnection
    downlink: SipAudioTrack
    uplink: _Uplink
    created: float = field(default_factory=time.monotonic)
    state: State = "connecting"
    call: Call | None = None
    error: str | None = None
    report: dict[str, Any] | None = None
    ended_at: float | None = None
    digits_sent: str = ""
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    call_placed: asyncio.Event = field(default_factory=asyncio.Event)  # `call` is set
    peer_gone: asyncio.Event = field(default_factory=asyncio.Event)
    hangup_requested: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    dtmf_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def result(self) -> CallResult | None:
        return self.call.result if self.call is not None else None

    def to_dict(self) -> dict[str, Any]:
        result = self.result
        return {
            "id": self.id,
            "target": self.target,
            "state": self.state,
            "ice_state": self.pc.iceConnectionState,
            "connection_state": self.pc.connectionState,
            "sip_code": result.sip_code if result else None,
            "outcome": result.outcome.value if result else None,
            "reason": result.reason if result else None,
            "hangup_by": result.hangup_by if result else None,
            "error": self.error,
            "digits_sent": self.digits_sent,
            "result": result.to_dict() if result else None,
            "media": {
                "uplink": self.uplink.stats.__dict__,
                "downlink": {
                    "frames_sent": self.downlink.frames_sent,
                    "samples_from_sip": self.downlink.samples_fed,
                    "samples_dropped": self.downlink.samples_dropped,
                },
            },
            "report": self.report,
        }


class WebphoneBusy(Exception):
    """As many webphone calls are up as the configuration allows."""


class Webphone:
    """Places the browser's calls with `gateway` and keeps their state for the page."""

    def __init__(self, gateway: Gateway, config: WebphoneConfig | None = None) -> None:
        self.gateway = gateway
        self.config = config or WebphoneConfig()
        self.calls: dict[str, WebphoneCall] = {}
        _use_ice(self.config.ice_host, self.config.loopback_ice_only)

    @property
    def active(self) -> int:
        return sum(1 for c in self.calls.values() if c.state != "ended")

    def get(self, call_id: str) -> WebphoneCall | None:
        return self.calls.get(call_id)

    async def start(self, offer_sdp: str, target: str) -> tuple[WebphoneCall, str]:
        """Answer the browser's offer and start placing the SIP call; returns the answer SDP.

        Raises ValueError for a bad target or offer, WebphoneBusy when at the limit.
        """
        uri = parse_target(target)  # ValueError with a message fit for the page
        self._purge()
        if self.active >= self.config.max_calls:
            raise WebphoneBusy(f"{self.config.max_calls} webphone calls are already up")
        if self.config.loopback_ice_only:
            offer_sdp, kept = loopback_offer(offer_sdp)
            if kept == 0:
                raise ValueError(
                    "the offer has no loopback ICE candidate (start Chromium with "
                    "--allow-loopback-in-peer-connection)"
                )
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        record = WebphoneCall(
            id=secrets.token_urlsafe(12),
            target=str(uri),
            pc=pc,
            downlink=SipAudioTrack(self.config.downlink_buffer_ms),
            uplink=_Uplink(self.config.uplink_queue_ms // 20),
        )
        self._watch_peer(record)
        self.calls[record.id] = record  # counted from now on: concurrent offers see the limit
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            if not any(t.kind == "audio" for t in pc.getTransceivers()):
                raise ValueError("the offer has no audio stream")
            pc.addTrack(record.downlink)
            await pc.setLocalDescription(await pc.createAnswer())  # gathers all candidates
        except BaseException as exc:
            self.calls.pop(record.id, None)
            if isinstance(exc, asyncio.CancelledError):  # the client left mid-negotiation
                self.gateway.spawn(self._close_peer(record))
                raise
            await self._close_peer(record)
            if isinstance(exc, ValueError) or not isinstance(exc, Exception):
                raise
            # aiortc raises its own errors for offers it cannot take
            raise ValueError(f"unusable offer: {exc}") from None
        self._spawn(record, self._run(record))
        return record, str(pc.localDescription.sdp)

    def _watch_peer(self, record: WebphoneCall) -> None:
        pc = record.pc

        @pc.on("connectionstatechange")
        def _state() -> None:
            if pc.connectionState == "connected":
                record.connected.set()
            elif pc.connectionState in ("failed", "closed"):
                record.peer_gone.set()

        @pc.on("track")
        def _track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                self._spawn(record, self._pump_uplink(record, track))

    def _spawn(self, record: WebphoneCall, coro: Any) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        record.tasks.add(task)
        task.add_done_callback(record.tasks.discard)

    async def _pump_uplink(self, record: WebphoneCall, track: MediaStreamTrack) -> None:
        """Browser audio → 8 kHz mono int16 → the SIP leg, until the track ends."""
        resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if not isinstance(frame, av.AudioFrame):
                continue
            record.uplink.stats.frames_received += 1
            for out in resampler.resample(frame):
                record.uplink.push(out.to_ndarray().reshape(-1).astype(np.int16, copy=False))

    async def _first(self, *events: asyncio.Event, timeout: float | None) -> None:
        waiters = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _run(self, record: WebphoneCall) -> None:
        """The call's life: WebRTC up, SIP call placed, bridged until either side ends."""
        remove_listener: Callable[[], None] | None = None
        try:
            await self._first(
                record.connected,
                record.peer_gone,
                record.hangup_requested,
                timeout=self.config.connect_timeout,
            )
            if not record.connected.is_set():
                record.error = (
                    "hung up before the browser connected"
                    if record.hangup_requested.is_set()
                    else "the browser's WebRTC connection did not come up"
                )
                return
            record.state = "calling"
            watcher = asyncio.ensure_future(self._ringing(record))
            try:
                call = await self.gateway.dial(
                    record.target,
                    ring_timeout=self.config.ring_timeout,
                    on_call=lambda c: self._on_call(record, c),
                )
            finally:
                watcher.cancel()
            if not call.answered or call.media is None:
                return
            record.state = "answered"
            record.uplink.media = call.media
            remove_listener = call.media.add_audio_listener(record.downlink.feed)
            await self._first(
                call.ended,
                record.peer_gone,
                record.hangup_requested,
                timeout=self.config.max_call_seconds,
            )
            if record.peer_gone.is_set() and not call.ended.is_set():
                record.error = "the browser went away"
        except (ValueError, OSError) as exc:
            record.error = str(exc)
        except Exception as exc:
            logger.exception("webphone call %s failed", record.id)
            record.error = f"internal error: {exc}"
        finally:
            if remove_listener is not None:
                remove_listener()
            call_ = record.call
            if call_ is not None and not call_.ended.is_set():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(call_.hangup(), 35)
            await self._close_peer(record)
            record.state = "ended"
            record.ended_at = time.monotonic()
            record.done.set()

    async def _ringing(self, record: WebphoneCall) -> None:
        """'ringing' once the far end answers the INVITE provisionally (100 included)."""
        await record.call_placed.wait()
        assert record.call is not None
        await record.call.responded.wait()
        if record.state == "calling":
            record.state = "ringing"

    def _on_call(self, record: WebphoneCall, call: Call) -> None:
        record.call = call
        record.call_placed.set()
        if record.hangup_requested.is_set():
            # Hung up before the INVITE left: Call.hangup marks it cancelled at once.
            self.gateway.spawn(call.hangup())

    async def _close_peer(self, record: WebphoneCall) -> None:
        record.uplink.stop()
        record.downlink.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(record.pc.close(), 5)
        for task in list(record.tasks):
            if task is not asyncio.current_task():
                task.cancel()

    async def send_digits(self, record: WebphoneCall, digits: str, method: DtmfMethod) -> None:
        """Send keys on the SIP leg; raises CallEnded when it is not answered (any more)."""
        call = record.call
        if record.state != "answered" or call is None:
            raise CallEnded("the call is not answered")
        async with record.dtmf_lock:  # keys of quick presses go out in order
            try:
                await call.send_digits(digits, method=method)
            except MediaSessionClosed:
                raise CallEnded("the call ended while sending keys") from None
            record.digits_sent += digits

    async def hangup(self, record: WebphoneCall, timeout: float = 40.0) -> None:
        """Hang up (BYE when answered, CANCEL while ringing) and wait for the cleanup."""
        record.hangup_requested.set()
        call = record.call
        if call is not None and not call.answered and not call.ended.is_set():
            # Still ringing: `_run` waits in dial, which this CANCEL ends. The gateway owns
            # the task, so closing the peer connection cannot cut the CANCEL short.
            self.gateway.spawn(call.hangup())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(record.done.wait(), timeout)

    async def close(self) -> None:
        """Hang every call up; for the owner's shutdown."""
        records = [c for c in self.calls.values() if c.state != "ended"]
        await asyncio.gather(*(self.hangup(c, 10.0) for c in records))

    def _purge(self) -> None:
        now = time.monotonic()
        ended = sorted(
            (c for c in self.calls.values() if c.ended_at is not None),
            key=lambda c: c.ended_at or 0.0,
        )
        excess = len(ended) - self.config.keep_ended
        for index, record in enumerate(ended):
            if index < excess or now - (record.ended_at or now) > self.config.keep_ended_seconds:
                self.calls.pop(record.id, None)


# -- HTTP ---------------------------------------------------------------------------------


class OfferIn(BaseModel):
    sdp: str = Field(min_length=1, max_length=20000)
    type: Literal["offer"]
    target: str = Field(min_length=1, max_length=512, description="SIP URI to call")


class DtmfIn(BaseModel):
    digits: str = Field(min_length=1, max_length=32, pattern=r"^[0-9*#A-Da-d]+$")
    method: Literal[DtmfMethod.RFC4733, DtmfMethod.SIP_INFO, DtmfMethod.INBAND] = DtmfMethod.RFC4733


router = APIRouter(route_class=StrictJsonRoute, tags=["webphone"])


async def get_webphone(request: Request) -> Webphone:
    webphone: Webphone | None = getattr(request.app.state, "webphone", None)
    if webphone is None:
        raise HTTPException(503, "the webphone is not enabled on this server")
    host = request.client.host if request.client else ""
    if webphone.config.loopback_clients_only and not _is_loopback(host):
        raise HTTPException(403, "the webphone answers clients on this machine only")
    return webphone


WebphoneDep = Annotated[Webphone, Depends(get_webphone)]


def _record(webphone: Webphone, call_id: str) -> WebphoneCall:
    record = webphone.get(call_id)
    if record is None:
        raise HTTPException(404, "no such webphone call")
    return record


@router.get("/webphone", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(
        PAGE,
        headers={
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "Cache-Control": "no-store",
            "Permissions-Policy": "microphone=(self)",
        },
    )


@router.post("/v1/webphone/calls", status_code=201)
async def create_call(body: OfferIn, webphone: WebphoneDep) -> dict[str, Any]:
    """Answer the browser's offer (complete, non-trickle) and start the SIP call."""
    try:
        record, answer = await webphone.start(body.sdp, body.target)
    except WebphoneBusy as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from None
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    return {"id": record.id, "type": "answer", "sdp": answer, "state": record.state}


@router.get("/v1/webphone/calls/{call_id}")
async def get_call(call_id: str, webphone: WebphoneDep) -> dict[str, Any]:
    return _record(webphone, call_id).to_dict()


@router.post("/v1/webphone/calls/{call_id}/dtmf", status_code=202)
async def send_dtmf(call_id: str, body: DtmfIn, webphone: WebphoneDep) -> dict[str, Any]:
    """Press keys on the SIP leg; answers once they were sent."""
    record = _record(webphone, call_id)
    try:
        await webphone.send_digits(record, body.digits.upper(), body.method)
    except CallEnded as exc:
        raise HTTPException(409, str(exc)) from None
    return {"digits": body.digits.upper(), "method": body.method}


@router.delete("/v1/webphone/calls/{call_id}")
async def delete_call(call_id: str, webphone: WebphoneDep) -> dict[str, Any]:
    """Hang up: BYE when answered, CANCEL while ringing; the peer connection is closed."""
    record = _record(webphone, call_id)
    await webphone.hangup(record)
    return record.to_dict()


@router.post("/v1/webphone/calls/{call_id}/hangup", include_in_schema=False)
async def hangup_beacon(call_id: str, webphone: WebphoneDep) -> dict[str, Any]:
    """`navigator.sendBeacon` can only POST: the page's hang-up when the tab closes."""
    return await delete_call(call_id, webphone)


@router.post("/v1/webphone/calls/{call_id}/report", status_code=204)
async def post_report(call_id: str, request: Request, webphone: WebphoneDep) -> None:
    """What the page measured (getStats), kept with the call for QA tooling to read."""
    record = _record(webphone, call_id)
    body = await request.body()
    if len(body) > _MAX_REPORT_BYTES:
        raise HTTPException(413, f"a report is at most {_MAX_REPORT_BYTES} bytes")
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise HTTPException(400, "the report is not JSON") from None
    if not isinstance(data, dict):
        raise HTTPException(400, "the report must be a JSON object")
    record.report = data
