"""Smoke tests for the baresip peer helper, against SIPp only (no ackline code involved).

UAS mode: SIPp calls baresip with an SDP whose audio port is a UDP socket owned by the test
(SIPp's own media port, ``-mp``, is a different one), so every RTP packet baresip sends -
including the RFC 4733 telephone-events - lands in the test and is decoded here.

UAC mode: baresip calls a SIPp UAS; once with SIPp's built-in ``uas`` scenario (baresip hangs
up on exit) and once with an inline UAS that answers with telephone-event and sends BYE.
"""

from __future__ import annotations

import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.baresip_peer import (
    LOOPBACK,
    REASON_REMOTE_BYE,
    BaresipPeer,
    Transport,
    baresip_uac,
    baresip_uas,
    free_port,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(20)]

DTMF_EVENT = {digit: code for code, digit in enumerate("0123456789*#ABCD")}  # RFC 4733

UAC_SCENARIO = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="call baresip">
  <send retrans="500"><![CDATA[
INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: "sipp" <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
To: <sip:[service]@[remote_ip]:[remote_port]>
Call-ID: [call_id]
CSeq: 1 INVITE
Contact: <sip:sipp@[local_ip]:[local_port];transport=[transport]>
Max-Forwards: 70
Content-Type: application/sdp
Content-Length: [len]

v=0
o=sipp 1 1 IN IP4 127.0.0.1
s=-
c=IN IP4 127.0.0.1
t=0 0
m=audio @RTP_PORT@ RTP/AVP 0 8 101
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-15
a=ptime:20

]]></send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="183" optional="true"/>
  <!-- rrs: without it [next_url] is empty and baresip rejects the ACK as undecodable -->
  <recv response="200" rtd="true" rrs="true"/>
  <send><![CDATA[
ACK [next_url] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: "sipp" <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
[last_To:]
Call-ID: [call_id]
CSeq: 1 ACK
Contact: <sip:sipp@[local_ip]:[local_port];transport=[transport]>
Max-Forwards: 70
Content-Length: 0

]]></send>
  <pause milliseconds="@HOLD_MS@"/>
  <send retrans="500"><![CDATA[
BYE [next_url] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: "sipp" <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
[last_To:]
Call-ID: [call_id]
CSeq: 2 BYE
Contact: <sip:sipp@[local_ip]:[local_port];transport=[transport]>
Max-Forwards: 70
Content-Length: 0

]]></send>
  <recv response="200" crlf="true"/>
</scenario>
"""

UAS_BYE_SCENARIO = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="answer then bye">
  <!-- rrs: remember the caller's Contact so the BYE's [next_url] is filled in -->
  <recv request="INVITE" crlf="true" rrs="true"/>
  <send><![CDATA[
SIP/2.0 180 Ringing
[last_Via:]
[last_From:]
[last_To:];tag=[pid]SIPpTag01[call_number]
[last_Call-ID:]
[last_CSeq:]
Contact: <sip:uas@[local_ip]:[local_port];transport=[transport]>
Content-Length: 0

]]></send>
  <send retrans="500"><![CDATA[
SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:];tag=[pid]SIPpTag01[call_number]
[last_Call-ID:]
[last_CSeq:]
Contact: <sip:uas@[local_ip]:[local_port];transport=[transport]>
Content-Type: application/sdp
Content-Length: [len]

v=0
o=uas 1 1 IN IP4 127.0.0.1
s=-
c=IN IP4 127.0.0.1
t=0 0
m=audio @RTP_PORT@ RTP/AVP 0 101
a=rtpmap:0 PCMU/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-15
a=ptime:20

]]></send>
  <recv request="ACK" crlf="true">
    <action>
      <ereg regexp=".*" search_in="hdr" header="From:" assign_to="caller"/>
      <ereg regexp=".*" search_in="hdr" header="To:" assign_to="callee"/>
    </action>
  </recv>
  <pause milliseconds="@HOLD_MS@"/>
  <send retrans="500"><![CDATA[
BYE [next_url] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: [$callee]
To: [$caller]
[last_Call-ID:]
CSeq: 2 BYE
Contact: <sip:uas@[local_ip]:[local_port];transport=[transport]>
Max-Forwards: 70
Content-Length: 0

]]></send>
  <recv response="200" crlf="true"/>
</scenario>
"""


# ------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class RtpPacket:
    pt: int
    marker: bool
    seq: int
    ts: int
    payload: bytes


@dataclass(frozen=True)
class TelephoneEvent:
    event: int
    ended: bool
    duration: int
    packets: int


@dataclass
class RtpSink:
    """A UDP socket on 127.0.0.1 that records every RTP packet sent to it."""

    sock: socket.socket
    packets: list[RtpPacket] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def run(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                data = self.sock.recv(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            if len(data) >= 12 and data[0] >> 6 == 2:
                seq, ts = struct.unpack("!HI", data[2:8])
                cc = data[0] & 0x0F
                self.packets.append(
                    RtpPacket(data[1] & 0x7F, bool(data[1] & 0x80), seq, ts, data[12 + 4 * cc :])
                )

    def telephone_events(self, pt: int) -> list[TelephoneEvent]:
        """RFC 4733 events of payload type ``pt``, one per RTP timestamp, in arrival order."""
        by_ts: dict[int, list[RtpPacket]] = {}
        for packet in self.packets:
            if packet.pt == pt and len(packet.payload) >= 4:
                by_ts.setdefault(packet.ts, []).append(packet)
        events = []
        for packets in by_ts.values():
            codes = {p.payload[0] for p in packets}
            assert len(codes) == 1, f"one RTP timestamp carries several events {codes}"
            events.append(
                TelephoneEvent(
                    event=packets[0].payload[0],
                    ended=any(p.payload[1] & 0x80 for p in packets),
                    duration=max(struct.unpack("!H", p.payload[2:4])[0] for p in packets),
                    packets=len(packets),
                )
            )
        return events


@pytest.fixture
def rtp_sink() -> Iterator[RtpSink]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))
    sink = RtpSink(sock)
    thread = threading.Thread(target=sink.run, name="rtp-sink", daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        sink.stop.set()
        thread.join(timeout=2)
        sock.close()


def sipp_binary() -> str:
    path = shutil.which("sipp")
    if path is None:
        pytest.fail("sipp is not installed: run `make test` (installs sip-tester)")
    return path


def sipp_cmd(workdir: Path, port: int, transport: str, *args: str) -> list[str]:
    return [
        sipp_binary(),
        "-i",
        LOOPBACK,
        "-p",
        str(port),
        "-mi",
        LOOPBACK,
        "-mp",
        str(free_port()),
        "-t",
        "u1" if transport == "udp" else "t1",
        "-m",
        "1",
        "-nostdin",
        "-timeout",
        "12s",
        "-timeout_error",
        "-trace_err",
        "-trace_msg",
        *args,
    ]


def sipp_logs(workdir: Path) -> str:
    parts = [f"== {p.name}\n{p.read_text(errors='replace')}" for p in sorted(workdir.glob("*"))]
    return "\n".join(p for p in parts if p.split("\n", 1)[0].endswith((".log", ".out")))


def start_sipp(cmd: list[str], workdir: Path) -> subprocess.Popen[bytes]:
    out = (workdir / "sipp_screen.out").open("wb")
    try:
        return subprocess.Popen(cmd, cwd=workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    finally:
        out.close()


def finish(process: subprocess.Popen[bytes], timeout_s: float) -> int:
    """Wait for SIPp to end by itself; killed (rc -9) when it has not after ``timeout_s``."""
    if process.poll() is not None:
        return process.returncode
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return -9


def wait_bound(port: int, transport: str, process: subprocess.Popen[bytes]) -> None:
    """Until SIPp holds ``port`` (our own bind attempt fails), bounded."""
    kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and process.poll() is None:
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                return
        time.sleep(0.05)
    raise AssertionError(f"SIPp did not bind {LOOPBACK}:{port} (rc={process.poll()})")


def sdp_of(message: str) -> dict[str, object]:
    """Payload types offered on m=audio and their rtpmap names (upper-case)."""
    m = re.search(r"^m=audio (\d+) RTP/AVP ([\d ]+)$", message, re.MULTILINE)
    assert m, f"no m=audio line in:\n{message}"
    rtpmap = {
        int(pt): name.upper()
        for pt, name in re.findall(r"^a=rtpmap:(\d+) ([^\s/]+)/", message, re.MULTILINE)
    }
    return {"port": int(m.group(1)), "pts": [int(p) for p in m.group(2).split()], "rtpmap": rtpmap}


def sipp_received_200_sdp(workdir: Path) -> str:
    """The SDP body of the 200 OK SIPp received (from its -trace_msg log)."""
    for log in workdir.glob("*_messages.log"):
        for block in re.split(r"^-{20,}.*$", log.read_text(errors="replace"), flags=re.MULTILINE):
            if "message received" in block and "SIP/2.0 200" in block and "m=audio" in block:
                return block[block.index("v=0") :]
    raise AssertionError(f"SIPp received no 200 OK with SDP\n{sipp_logs(workdir)}")


def telephone_event_pt(sdp: dict[str, object]) -> int:
    rtpmap = sdp["rtpmap"]
    assert isinstance(rtpmap, dict)
    pts = [pt for pt, name in rtpmap.items() if name == "TELEPHONE-EVENT"]
    assert pts, f"no telephone-event in SDP {sdp}"
    return int(pts[0])


def context(peer: BaresipPeer, workdir: Path) -> str:
    return f"{peer.log_text()}\n{sipp_logs(workdir)}"


def assert_offers_g711_and_te(sdp_text: str) -> dict[str, object]:
    sdp = sdp_of(sdp_text)
    rtpmap = sdp["rtpmap"]
    assert isinstance(rtpmap, dict)
    assert {"PCMU", "PCMA", "TELEPHONE-EVENT"} <= set(rtpmap.values()), sdp_text
    assert "a=fmtp:101 0-15" in sdp_text, sdp_text
    return sdp


# ------------------------------------------------------------------------- UAS mode


@pytest.mark.parametrize(
    ("transport", "digits"),
    [("udp", "1"), ("tcp", "9*#")],
)
def test_uas_answers_and_sends_rfc4733_digits(
    tmp_path: Path, rtp_sink: RtpSink, transport: Transport, digits: str
) -> None:
    sipp_dir = tmp_path / "sipp"
    sipp_dir.mkdir()
    hold_ms = 1500 + 400 * len(digits)
    scenario = sipp_dir / "call_baresip.xml"
    scenario.write_text(
        UAC_SCENARIO.replace("@RTP_PORT@", str(rtp_sink.port)).replace("@HOLD_MS@", str(hold_ms))
    )
    with baresip_uas(
        tmp_path, dtmf=digits, dtmf_delay_s=0.5, transport=transport, lifetime_s=15
    ) as peer:
        assert peer.uri == (
            f"sip:bob@127.0.0.1:{peer.sip_port}" + (";transport=tcp" if transport == "tcp" else "")
        )
        cmd = sipp_cmd(sipp_dir, free_port(), transport, "-sf", str(scenario), "-s", "bob")
        sipp = start_sipp([*cmd, peer.address], sipp_dir)
        rc = finish(sipp, 15)
        assert rc == 0, f"SIPp failed (rc={rc})\n{context(peer, sipp_dir)}"
        established = peer.wait_established(1)
        closed = peer.wait_closed(3)
        assert established.direction == "incoming"
        assert closed.param == REASON_REMOTE_BYE, context(peer, sipp_dir)
        assert peer.closed_by_remote, context(peer, sipp_dir)
        assert peer.dtmf_sent == list(digits), context(peer, sipp_dir)
        assert not peer.errors, context(peer, sipp_dir)
    assert peer.exited_cleanly, f"stop={peer.stop_method} rc={peer.returncode}\n{peer.log_text()}"

    answer = assert_offers_g711_and_te(sipp_received_200_sdp(sipp_dir))
    # baresip's own trace (-s) shows the same answer
    assert peer.sent_sdp()
    assert sdp_of(peer.sent_sdp()[0])["pts"] == answer["pts"]
    te_pt = telephone_event_pt(answer)
    events = rtp_sink.telephone_events(te_pt)
    assert [e.event for e in events] == [DTMF_EVENT[d] for d in digits], (events, rtp_sink.packets)
    assert all(e.ended and e.duration >= 160 for e in events), events
    # the ausine tone is flowing too, as G.711 on the negotiated codec
    assert sum(p.pt in (0, 8) for p in rtp_sink.packets) > 20


# ------------------------------------------------------------------------- UAC mode


def test_uac_call_to_sipp_builtin_uas_is_established_and_exits_cleanly(tmp_path: Path) -> None:
    sipp_dir = tmp_path / "sipp"
    sipp_dir.mkdir()
    port = free_port()
    sipp = start_sipp(sipp_cmd(sipp_dir, port, "udp", "-sn", "uas"), sipp_dir)
    try:
        wait_bound(port, "udp", sipp)
        target = f"sip:service@127.0.0.1:{port}"
        with baresip_uac(tmp_path, target, dtmf="", lifetime_s=15) as peer:
            event = peer.wait_established(5)
            assert event.direction == "outgoing"
            assert event.peer_uri == target
            offer = peer.sent_sdp()
            assert offer, peer.log_text()
            assert_offers_g711_and_te(offer[0])
            assert not peer.closed
        # leaving the block quits baresip, which hangs up with BYE: SIPp's uas ends with 0
        rc = finish(sipp, 5)
    finally:
        finish(sipp, 0)
    assert rc == 0, f"SIPp rc={rc}\n{context(peer, sipp_dir)}"
    assert peer.exited_cleanly, f"stop={peer.stop_method} rc={peer.returncode}\n{peer.log_text()}"


def test_uac_sends_dtmf_and_sees_remote_bye(tmp_path: Path, rtp_sink: RtpSink) -> None:
    sipp_dir = tmp_path / "sipp"
    sipp_dir.mkdir()
    scenario = sipp_dir / "answer_then_bye.xml"
    scenario.write_text(
        UAS_BYE_SCENARIO.replace("@RTP_PORT@", str(rtp_sink.port)).replace("@HOLD_MS@", "2000")
    )
    port = free_port()
    sipp = start_sipp(sipp_cmd(sipp_dir, port, "udp", "-sf", str(scenario)), sipp_dir)
    try:
        wait_bound(port, "udp", sipp)
        with baresip_uac(
            tmp_path, f"sip:service@127.0.0.1:{port}", dtmf="5", dtmf_delay_s=0.5, lifetime_s=15
        ) as peer:
            peer.wait_established(5)
            peer.wait_dtmf_sent(3)
            closed = peer.wait_closed(6)
            assert closed.param == REASON_REMOTE_BYE, context(peer, sipp_dir)
            assert peer.established
            assert peer.closed_by_remote
        rc = finish(sipp, 5)
    finally:
        finish(sipp, 0)
    assert rc == 0, f"SIPp rc={rc}\n{context(peer, sipp_dir)}"
    assert peer.exited_cleanly, f"stop={peer.stop_method} rc={peer.returncode}\n{peer.log_text()}"
    events = rtp_sink.telephone_events(101)
    assert [e.event for e in events] == [5], (events, rtp_sink.packets)
    assert events[0].ended
