"""DTMF by every method a SIP far end may use, with SIPp as that far end.

SIPp passes (exit code 0) only when it saw exactly the messages it expects from us: our
200 to its INFO, our INFOs carrying the right keys, our BYE once the key was collected.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gateway.call import Gateway, GatewayConfig
from tests.integration.pcap import inband_dtmf_pcap, inband_dtmf_pcm, read_rtp_pcap
from tests.integration.peers import PCAPS, ackline_cli, cli_env, sipp

pytestmark = pytest.mark.interop


def run_call(tmp: Path, target: str, *args: str, timeout: float = 20) -> dict[str, Any]:
    proc = subprocess.run(
        [*ackline_cli(), "call", target, "--json", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(tmp),
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# -- receiving SIP INFO ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "body", "digit", "transport"),
    [
        ("application/dtmf-relay", "Signal=7\nDuration=160", "7", "udp"),
        ("application/dtmf", "5", "5", "udp"),
        ("application/dtmf-relay", "Signal=#\nDuration=250", "#", "tcp"),
    ],
)
def test_sip_info_digit_received(
    tmp_path: Path, content_type: str, body: str, digit: str, transport: str
) -> None:
    with sipp(
        "uas_info_dtmf.xml",
        tmp_path,
        transport=transport,
        PAUSE_MS="500",
        CONTENT_TYPE=content_type,
        BODY=body,
    ) as peer:
        result = run_call(
            tmp_path,
            f"sip:+15550200@{peer.address}",
            "--gather",
            "1",
            "--timeout",
            "10",
            "--transport",
            transport,
        )
        assert peer.wait(timeout=15) == 0, peer.logs()  # our 200 to the INFO, then our BYE
    assert result["outcome"] == "answered"
    assert result["digits"] == digit
    assert result["dtmf_method"] == "sip_info"
    assert result["hangup_by"] == "local"
    assert result["codec"] == "PCMU"
    assert 400 <= result["duration_ms"] < 5000  # ended by the digit, not the 10 s timeout


# -- in-band tones --------------------------------------------------------------------


def test_generated_pcap_matches_sipp_sample_layout(tmp_path: Path) -> None:
    """Our pcap has the layout of SIPp's own samples, and RTP timing SIPp replays faithfully."""
    sample_header, sample = read_rtp_pcap(PCAPS / "dtmf_2833_1.pcap")
    header, packets = read_rtp_pcap(inband_dtmf_pcap(tmp_path / "3.pcap", "3"))
    assert header == sample_header  # magic, version 2.4, snaplen, Ethernet link type
    assert (tmp_path / "3.pcap").read_bytes()[:24] == (PCAPS / "dtmf_2833_1.pcap").read_bytes()[:24]
    assert len(packets) * 160 == len(inband_dtmf_pcm("3"))  # 20 ms frames, none short
    assert all(p.ip_checksum_ok and p.udp_checksum_ok for p in sample + packets)
    assert [p.marker for p in packets[:2]] == [True, False]
    assert {p.payload_type for p in packets} == {0}
    assert {len(p.payload) for p in packets} == {160}
    assert len({p.ssrc for p in packets}) == 1
    for before, after in itertools.pairwise(packets):
        assert after.sequence == (before.sequence + 1) & 0xFFFF
        assert after.timestamp - before.timestamp == 160
        assert after.time - before.time == pytest.approx(0.020, abs=1e-6)
    silent = [p for p in packets if p.payload == b"\xff" * 160]
    assert 0 < len(silent) < len(packets)  # silence around the tone, the tone itself is not


@pytest.mark.parametrize(("digits", "transport"), [("3", "udp"), ("9", "udp"), ("0", "tcp")])
def test_inband_digit_received(tmp_path: Path, digits: str, transport: str) -> None:
    pcap = inband_dtmf_pcap(tmp_path / f"inband_{digits}.pcap", digits)
    with sipp(
        "uas_inband_dtmf.xml", tmp_path, transport=transport, PCAP=str(pcap), PAUSE_MS="300"
    ) as peer:
        result = run_call(
            tmp_path,
            f"sip:+15550201@{peer.address}",
            "--gather",
            str(len(digits)),
            "--timeout",
            "10",
            "--transport",
            transport,
        )
        assert peer.wait(timeout=15) == 0, peer.logs()  # our BYE came after the tones
    assert result["outcome"] == "answered"
    assert result["codec"] == "PCMU"
    assert result["digits"] == digits
    assert result["dtmf_method"] == "inband"
    assert result["hangup_by"] == "local"
    assert result["duration_ms"] < 5000  # ended by the digits, not the 10 s timeout


def test_inband_several_digits(tmp_path: Path) -> None:
    pcap = inband_dtmf_pcap(tmp_path / "inband_159.pcap", "159")
    with sipp("uas_inband_dtmf.xml", tmp_path, PCAP=str(pcap), PAUSE_MS="300") as peer:
        result = run_call(
            tmp_path, f"sip:+15550202@{peer.address}", "--gather", "3", "--timeout", "10"
        )
        assert peer.wait(timeout=15) == 0, peer.logs()
    assert result["digits"] == "159"
    assert [d["method"] for d in result["dtmf"]] == ["inband"] * 3
    at = [d["at_ms"] for d in result["dtmf"]]
    assert at == sorted(at)
    assert at[2] - at[0] >= 500  # tones 320 ms apart: not one burst


# -- sending SIP INFO -----------------------------------------------------------------


async def test_send_digits_via_sip_info(tmp_path: Path) -> None:
    with sipp("uas_expect_info_dtmf.xml", tmp_path, FIRST="4", SECOND="2") as peer:
        async with Gateway(GatewayConfig(host="127.0.0.1")) as gateway:
            call = await gateway.dial(f"sip:+15550203@{peer.address}", ring_timeout=5)
            assert call.answered, call.result
            await asyncio.wait_for(call.send_digits("42", method="sip_info"), 5)
            result = await asyncio.wait_for(call.hangup(), 5)
        assert await asyncio.to_thread(peer.wait, 10) == 0, peer.logs()
        infos = [INFO_LOG.match(line) for line in peer.log_lines()]
    assert result.outcome.value == "answered"
    assert result.hangup_by == "local"
    assert result.digits == ""  # sending is not receiving
    sent = [m.groupdict() for m in infos if m is not None]
    assert [(i["signal"], i["duration"], i["type"]) for i in sent] == [
        ("4", "100", "application/dtmf-relay"),
        ("2", "100", "application/dtmf-relay"),
    ], peer.logs()
    assert int(sent[1]["cseq"]) == int(sent[0]["cseq"]) + 1  # in-dialog CSeq keeps counting


INFO_LOG = re.compile(
    r"^INFO[12] signal=(?P<signal>\S*) duration=(?P<duration>\d+) cseq=(?P<cseq>\d+)"
    r" type=\s*(?P<type>\S+)"
)
