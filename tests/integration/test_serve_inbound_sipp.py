"""SIPp as the caller (`uac`) into `ackline serve`: answer, greet, hear a digit, hang up."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.integration.peers import call_results, dtmf_pcap, serve_gateway, sipp

pytestmark = pytest.mark.interop


@pytest.mark.parametrize(("transport", "digit"), [("udp", "1"), ("tcp", "9"), ("udp", "*")])
def test_sipp_calls_serve_and_presses_digit(tmp_path: Path, transport: str, digit: str) -> None:
    with serve_gateway(tmp_path) as (port, proc):
        started = time.monotonic()
        with sipp(
            "uac_dtmf.xml",
            tmp_path,
            transport=transport,
            remote=f"127.0.0.1:{port}",
            PCAP=str(dtmf_pcap(digit)),
            PAUSE_MS="1000",
        ) as peer:
            # SIPp only succeeds if we answered, and then sent BYE after collecting the digit.
            assert peer.wait(timeout=30) == 0, peer.logs()
        elapsed = time.monotonic() - started
        time.sleep(0.3)
        proc.terminate()
        proc.wait(timeout=10)
        calls = call_results(proc)
    assert elapsed < 10, "the gateway hung up because of the digit, not the 10 s timeout"
    assert len(calls) == 1, calls
    call = calls[0]
    assert call["direction"] == "inbound"
    assert call["outcome"] == "answered"
    assert call["digits"] == digit
    assert call["dtmf_method"] == "rfc4733"
    assert call["hangup_by"] == "local"
    assert call["transport"] == transport


def test_serve_answers_options_and_survives_garbage(tmp_path: Path) -> None:
    import socket

    with serve_gateway(tmp_path) as (port, proc):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(2)
            sock.sendto(b"\x00\xffnot sip at all\r\n\r\n", ("127.0.0.1", port))
            sock.sendto(b"INVITE sip:x SIP/2.0\r\nVia: broken\r\n\r\n", ("127.0.0.1", port))
            local = sock.getsockname()[1]
            options = (
                f"OPTIONS sip:hotline@127.0.0.1:{port} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{local};branch=z9hG4bKprobe1;rport\r\n"
                "From: <sip:probe@127.0.0.1>;tag=p1\r\n"
                f"To: <sip:hotline@127.0.0.1:{port}>\r\n"
                "Call-ID: probe-1@127.0.0.1\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
                "Content-Length: 0\r\n\r\n"
            ).encode()
            sock.sendto(options, ("127.0.0.1", port))
            data, _ = sock.recvfrom(65535)
        assert data.startswith(b"SIP/2.0 200 OK\r\n"), data
        assert b"probe-1@127.0.0.1" in data
        assert f"rport={local}".encode() in data
        assert proc.poll() is None
