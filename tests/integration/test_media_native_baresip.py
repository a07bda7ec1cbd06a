"""The native RTP sender against baresip: the prompt reaches a real SIP/RTP stack intact
(baresip decodes and records it), and its RFC 4733 key press comes back while we send.

Run with the native sender on and with the Python pacer sending (``media_native_send``),
so the fallback keeps working too.
"""

from __future__ import annotations

import asyncio
import wave
from pathlib import Path

import numpy as np
import pytest

from gateway.call import Gateway, GatewayConfig
from gateway.media import native
from tests.integration.baresip_peer import baresip_uas

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]

TONE_HZ = 1000.0


def _tone(seconds: float, hz: float = TONE_HZ) -> np.ndarray:
    t = np.arange(int(8000 * seconds)) / 8000
    return (8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def _loud_and_peak(path: Path) -> tuple[float, float]:
    """RMS and strongest frequency (Hz) of a WAV's first channel."""
    with wave.open(str(path)) as wav:
        rate, channels = wav.getframerate(), wav.getnchannels()
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16)[::channels]
    samples = pcm.astype(np.float64)
    if not len(samples):
        return 0.0, 0.0
    spectrum = np.abs(np.fft.rfft(samples))
    spectrum[0] = 0.0
    peak = float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])
    return float(np.sqrt(np.mean(samples**2))), peak


@pytest.mark.parametrize("native_send", [True, False], ids=["native", "python-pacer"])
async def test_baresip_hears_the_prompt_and_presses_a_key(
    tmp_path: Path, native_send: bool
) -> None:
    with baresip_uas(tmp_path, dtmf="1", dtmf_delay_s=2.5, record=True) as peer:
        config = GatewayConfig(host="127.0.0.1", media_native_send=native_send)
        async with Gateway(config) as gateway:
            call = await gateway.dial(peer.uri, ring_timeout=10)
            assert call.answered, peer.log_text()
            media = call.media
            assert media is not None
            assert (media._native is not None) == native_send
            if native_send:
                assert native.available()
            # The prompt plays to its end (play() completes once its last frame is sent),
            # then the key press pressed during it is collected.
            digits = await call.gather(_tone(2.0), max_digits=1, timeout=15)
            stats = media.stats
            result = await call.hangup()
        await asyncio.to_thread(peer.wait_closed, 10.0)
        assert peer.closed_by_remote, peer.log_text()
        decoded = [p for p in peer.recordings() if "dec" in p.name]
        heard = [_loud_and_peak(p) for p in decoded]
    assert digits == "1"
    assert result.dtmf_method == "rfc4733"
    assert result.outcome.value == "answered"
    assert stats.packets_sent >= 100  # 2 s of prompt at 50 packets a second, and more
    assert stats.send_errors == 0
    assert heard, "baresip recorded nothing"
    rms, peak = max(heard)
    assert rms > 500, "baresip heard no audio"
    assert abs(peak - TONE_HZ) < 20, f"baresip heard {peak:.0f} Hz, not the prompt's tone"
