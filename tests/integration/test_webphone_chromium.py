"""Headless Chromium on the browser softphone page calls our QA softphone over the gateway.

Chromium's fake microphone plays a 600 Hz tone from a WAV file; the page runs a scenario
from its URL (call, press 1, hang up after a few seconds, report `getStats()`), and the far
end — `gateway.softphone.Softphone` answering on loopback — plays 440 Hz back. The test
checks each direction of the bridge with what really crossed it: the far end hears 600 Hz
(not a pitch-shifted tone: the resampling is right), the key arrives as RFC 4733, the
browser receives and decodes audio, and the page's hang-up ends the SIP call with BYE.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pytest
import uvicorn
from numpy.typing import NDArray

from api.app import create_app
from api.settings import Settings
from api.webphone import Webphone, WebphoneCall
from gateway.call import CallEnded, Gateway, GatewayConfig
from gateway.result import CallResult
from gateway.softphone import Softphone

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test does)"),
]

MIC_HZ = 600  # not a DTMF frequency, so the far end's in-band detector stays quiet
FAR_HZ = 440


def tone(hz: float, seconds: float, rate: int, amplitude: float = 0.3) -> NDArray[np.int16]:
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * hz * t) * amplitude * 32767).astype(np.int16)


def write_wav(path: Path, pcm: NDArray[np.int16], rate: int) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.astype("<i2").tobytes())
    return path


def dominant_hz(pcm: NDArray[np.int16], rate: int = 8000) -> float:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64) * np.hanning(pcm.size)))
    return float(np.fft.rfftfreq(pcm.size, 1 / rate)[int(np.argmax(spectrum))])


@contextlib.asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """uvicorn in this event loop on a free loopback port, lifespan included."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(500):
            if server.started or task.done():
                break
            await asyncio.sleep(0.02)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)
        sock.close()


@contextlib.asynccontextmanager
async def chromium(url: str, tmp: Path, mic: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """Headless Chromium on `url` with a fake microphone; killed when the block ends."""
    assert CHROMIUM is not None
    log = await asyncio.to_thread((tmp / "chromium.log").open, "wb")  # closed below
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-default-apps",
        "--disable-features=WebRtcHideLocalIpsWithMdns,MediaRouter,OptimizationHints",
        "--allow-loopback-in-peer-connection",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={mic}",
        "--autoplay-policy=no-user-gesture-required",
        "--enable-logging=stderr",
        "--v=0",
        url,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


async def far_end(phone: Softphone) -> tuple[NDArray[np.int16], int, CallResult, str]:
    """Answer, play 440 Hz until the caller hangs up; what it heard and how it ended."""
    async with phone.answer(timeout=30) as leg:
        beep = tone(FAR_HZ, 1.0, 8000)

        async def talk() -> None:
            with contextlib.suppress(CallEnded):
                while not leg.call.ended.is_set():
                    await leg.call.play(beep)

        talker = asyncio.create_task(talk())
        try:
            result = await leg.wait_hangup(40)
        finally:
            talker.cancel()
        return leg.heard(), leg.heard_ms, result, leg.call.digits


async def only_call(webphone: Webphone, timeout: float) -> WebphoneCall:
    for _ in range(int(timeout / 0.05)):
        if webphone.calls:
            [record] = webphone.calls.values()
            return record
        await asyncio.sleep(0.05)
    raise TimeoutError("the page placed no call")


async def test_chromium_calls_presses_a_key_and_hangs_up(tmp_path: Path) -> None:
    mic = write_wav(tmp_path / "mic.wav", tone(MIC_HZ, 30.0, 48000), 48000)
    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/ackline.db",
        audit_dir=tmp_path / "audit",
        embedded_worker=False,
    )
    async with Softphone() as phone, Gateway(GatewayConfig(host="127.0.0.1")) as gateway:
        webphone = Webphone(gateway)
        app = create_app(settings, {})
        app.state.webphone = webphone
        host, port = phone.address
        answering = asyncio.create_task(far_end(phone))
        async with serve(app) as base:
            query = urlencode(
                {
                    "target": f"sip:qa@{host}:{port}",
                    "autocall": "1",
                    "dtmf": "1",
                    "dtmf_after": "1.5",
                    "hangup_after": "5",
                    "report": "1",
                }
            )
            async with chromium(f"{base}/webphone?{query}", tmp_path, mic) as browser:
                try:
                    record = await only_call(webphone, 30)
                    await asyncio.wait_for(record.done.wait(), 40)
                    heard, heard_ms, far, far_digits = await asyncio.wait_for(answering, 15)
                except BaseException:
                    answering.cancel()
                    print((tmp_path / "chromium.log").read_text(errors="replace")[-6000:])
                    raise
                assert browser.returncode is None, "chromium exited early"
        state = record.to_dict()
    print(
        "webphone:",
        {"heard_ms": heard_ms, "mic_hz": dominant_hz(heard[-16000:]), "report": record.report},
        state["media"],
    )

    # The page placed the call and hung it up with BYE; both sides agree.
    ours = record.result
    assert ours is not None, state
    assert (ours.outcome.value, ours.sip_code, ours.hangup_by) == ("answered", 200, "local")
    assert (far.hangup_by, far.reason) == ("remote", "remote hangup")
    assert 4000 <= ours.duration_ms <= 8000, ours

    # The keypad press reached the far end as an RFC 4733 event.
    assert far_digits == "1"
    assert [d.method for d in far.received] == ["rfc4733"]
    assert record.digits_sent == "1"

    # Browser -> SIP: the fake microphone's tone, at its own pitch, for most of the call.
    assert heard_ms >= 2500, (heard_ms, state["media"])
    loud = heard[np.abs(heard) > 500]
    assert loud.size > 8000
    assert abs(dominant_hz(heard[-16000:]) - MIC_HZ) < 15, dominant_hz(heard[-16000:])
    uplink = state["media"]["uplink"]
    assert uplink["chunks_played"] >= 150, uplink
    assert uplink["chunks_dropped"] < 25, uplink

    # SIP -> browser: Chromium received RTP from us and decoded audible audio.
    report = record.report
    assert report is not None, state
    inbound = report["inbound"]
    assert inbound["packetsReceived"] >= 150, report
    assert inbound["totalAudioEnergy"] > 0.01, report
    assert report["outbound"]["packetsSent"] >= 150, report
    assert report["pair"]["local"].startswith("127.0.0.1:"), report
    assert report["pair"]["remote"].startswith("127.0.0.1:"), report
    assert report["keys_sent"] == "1"

    # Nothing left behind: the peer connection is closed, no call remains.
    assert record.state == "ended"
    assert webphone.active == 0
    assert record.pc.connectionState == "closed"
    assert not record.tasks
    assert not gateway.calls
