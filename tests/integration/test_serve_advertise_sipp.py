"""`ackline serve` bound to one address and advertising another, as in a container (bind
0.0.0.0, advertise the address peers reach), and its RTP port range, with SIPp calling in.

SIPp's message trace shows what a peer receives: every address we put in Via, Contact
and SDP must be the advertised one, never the bound wildcard; and the call must work
through it (SIPp's ACK goes to our Contact, its RTP to our SDP c=)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.integration.peers import (
    SippRun,
    ackline_cli,
    call_results,
    cli_env,
    dtmf_pcap,
    free_port,
    listening,
    serve_gateway,
    sipp,
    wait_until,
)

pytestmark = pytest.mark.interop

ADVERTISED = "127.0.0.2"  # loopback: reaches the wildcard bind like an outside address


def received_messages(peer: SippRun) -> list[str]:
    """The SIP messages SIPp received, in order, from its message trace."""
    messages = []
    for path in peer.workdir.glob("*_messages.log"):
        for section in re.split(r"^-{20,}.*$", path.read_text(errors="replace"), flags=re.M):
            head, _, message = section.strip().partition("\n\n")
            if "message received" in head:
                messages.append(message.strip())
    return messages


def first(messages: list[str], start_line: str) -> str:
    found = [m for m in messages if m.startswith(start_line)]
    assert found, f"no {start_line!r} among {[m.splitlines()[0] for m in messages]}"
    return found[0]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_wildcard_bind_advertises_its_address_in_via_contact_and_sdp(
    tmp_path: Path, transport: str
) -> None:
    with serve_gateway(tmp_path, "--host", "0.0.0.0", "--advertise", ADVERTISED) as (port, proc):
        with sipp(
            "uac_dtmf.xml",
            tmp_path,
            transport=transport,
            remote=f"127.0.0.1:{port}",
            PCAP=str(dtmf_pcap("1")),
            PAUSE_MS="500",
        ) as peer:
            # passes only if its ACK reached our Contact and we heard its digit over RTP
            # sent to our SDP c=, then hung up
            assert peer.wait(timeout=30) == 0, peer.logs()
        messages = received_messages(peer)
        proc.terminate()
        proc.wait(timeout=10)
        [call] = call_results(proc)
        assert proc.stderr is not None
        banner = proc.stderr.read()
    assert call["outcome"] == "answered", call
    assert call["digits"] == "1", call
    ok = first(messages, "SIP/2.0 200 OK")
    bye = first(messages, "BYE ")
    kind = transport.upper()
    assert f"Contact: <sip:ackline@{ADVERTISED}:{port}" in ok
    assert re.search(rf"^o=ackline \d+ \d+ IN IP4 {re.escape(ADVERTISED)}$", ok, re.M), ok
    assert f"\nc=IN IP4 {ADVERTISED}\n" in ok + "\n"
    assert f"\nVia: SIP/2.0/{kind} {ADVERTISED}:{port};" in bye
    assert f"\nContact: <sip:ackline@{ADVERTISED}:{port}" in bye
    assert not any("0.0.0.0" in m for m in messages), messages
    assert f"advertised as {ADVERTISED}" in banner


def test_wildcard_bind_without_advertised_address_is_refused(tmp_path: Path) -> None:
    for args, env, expected in [
        (["--host", "0.0.0.0"], {}, "--advertise"),
        (["--host", "::"], {}, "--advertise"),
        (["--host", "0.0.0.0"], {"ACKLINE_SIP_ADVERTISE": "0.0.0.0"}, "wildcard"),
        (["--host", "127.0.0.1"], {"ACKLINE_RTP_PORTS": "30000-20000"}, "ACKLINE_RTP_PORTS"),
    ]:
        proc = subprocess.run(
            [*ackline_cli(), "serve", "--role", "gateway", "--port", str(free_port()), *args],
            capture_output=True,
            text=True,
            timeout=30,
            env={**cli_env(tmp_path), **env},
        )
        assert proc.returncode == 2, (args, env, proc.stderr)
        assert expected in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_rtp_stays_in_its_range_and_an_exhausted_range_answers_503(tmp_path: Path) -> None:
    """One RTP port in the range: the first call takes it, the second caller is told to
    come back later (503 + Retry-After) instead of a 500 or a port outside the range."""
    rtp = free_port()  # even: the range's only RTP port
    env = {"ACKLINE_RTP_PORTS": f"{rtp}-{rtp + 1}"}
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    with serve_gateway(tmp_path, "--host", "0.0.0.0", "--advertise", ADVERTISED, env=env) as (
        port,
        proc,
    ):
        with sipp(
            "uac_dtmf.xml",
            first_dir,
            remote=f"127.0.0.1:{port}",
            PCAP=str(dtmf_pcap("5")),
            PAUSE_MS="3000",
        ) as holding:
            wait_until(lambda: listening(rtp, "udp"), 10, "the first call's RTP socket")
            with sipp(
                "uac_refused.xml", second_dir, remote=f"127.0.0.1:{port}", CODE="503"
            ) as refused:
                assert refused.wait(timeout=15) == 0, refused.logs()
            assert holding.wait(timeout=30) == 0, holding.logs()
        proc.terminate()
        proc.wait(timeout=10)
        results = call_results(proc)
    ok = first(received_messages(holding), "SIP/2.0 200 OK")
    assert f"\nm=audio {rtp} RTP/AVP" in ok, ok
    busy = first(received_messages(refused), "SIP/2.0 503")
    assert re.search(r"^Retry-After: \d+", busy, re.M | re.I), busy
    assert "no free RTP port" in busy.splitlines()[0]
    by_outcome = sorted((r["sip_code"], r["digits"]) for r in results)
    assert by_outcome == [(200, "5"), (503, "")], results
