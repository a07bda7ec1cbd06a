"""RTP, RTCP and RFC 4733 packets for a live call: one set up with our own minimal caller
(the packets go to the media port the gateway's answer names), sent from the address our
offer named and from strangers (other loopback hosts, and our host on another port), which
the gateway drops by design (counted in ackline_rtp_dropped_packets_total).

Packets are built by a seeded factory (pure); the caller uses blocking sockets with
timeouts, and every loop is bounded.
"""

from __future__ import annotations

import contextlib
import enum
import random
import re
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.fuzz_sdp import good_offer
from bench.fuzz_sip import Head, ack_for, in_dialog_request, ok_for, parse_head

LOOPBACK = "127.0.0.1"
STRANGERS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")


class Packet(enum.StrEnum):
    AUDIO = "audio"  # a valid PCMU frame
    EVENT = "rfc4733"  # a telephone-event, valid or with odd fields
    MUTATED = "mutated"  # broken RTP: version, lengths, padding, extensions, CSRCs
    RTCP = "rtcp"  # SR/RR/SDES/BYE/APP, some with lying lengths
    GARBAGE = "garbage"  # random bytes of random size, empty included


class Source(enum.StrEnum):
    OFFERED = "offered"  # the address our SDP named: the call's media source
    STRANGER = "stranger"  # another loopback host
    OTHER_PORT = "other_port"  # our host, another port


class PacketFactory:
    """Seeded packets of one stream (one SSRC, increasing sequence and timestamp)."""

    def __init__(self, rng: random.Random, event_pt: int = 101) -> None:
        self.rng = rng
        self.event_pt = event_pt
        self.seq = rng.randrange(1 << 16)
        self.ts = rng.randrange(1 << 32)
        self.ssrc = rng.randrange(1 << 32)

    def _header(self, pt: int, marker: bool = False, **flags: int) -> bytes:
        self.seq = (self.seq + 1) & 0xFFFF
        first = (flags.get("version", 2) << 6) | (flags.get("padding", 0) << 5)
        first |= (flags.get("extension", 0) << 4) | flags.get("cc", 0)
        return struct.pack("!BBHII", first & 0xFF, (marker << 7) | (pt & 0x7F), self.seq,
                           self.ts & 0xFFFFFFFF, self.ssrc)  # fmt: skip

    def audio(self) -> bytes:
        self.ts += 160
        return self._header(0) + b"\xff" * 160

    def event(self) -> bytes:
        """RFC 4733 section 2.3: event, E|R|volume, duration; sometimes out of range."""
        rng = self.rng
        code = rng.choice((rng.randrange(16), rng.randrange(16), 16, 99, 255))
        end = rng.random() < 0.4
        volume = rng.choice((10, 0, 63))
        duration = rng.choice((160, 800, 0, 65535))
        payload = struct.pack("!BBH", code, (end << 7) | volume, duration)
        if rng.random() < 0.15:
            payload = payload[: rng.randrange(4)] if rng.random() < 0.5 else payload * 3
        return self._header(self.event_pt, marker=rng.random() < 0.3) + payload

    def mutated(self) -> bytes:
        rng = self.rng
        choice = rng.randrange(9)
        if choice == 0:  # RTP version 0, 1 or 3
            return self._header(0, version=rng.choice((0, 1, 3))) + b"\xff" * 160
        if choice == 1:  # 15 CSRCs announced, none there
            return self._header(0, cc=15) + b"\xff" * rng.randrange(8)
        if choice == 2:  # header extension whose length runs past the packet
            ext = struct.pack("!HH", 0xBEDE, rng.choice((0xFFFF, 1, 40)))
            return self._header(0, extension=1) + ext + b"\x00" * rng.randrange(8)
        if choice == 3:  # padding count larger than the packet, or zero
            return self._header(0, padding=1) + b"\xff" * 10 + bytes([rng.choice((0, 255, 11))])
        if choice == 4:  # shorter than a header
            return self._header(0)[: rng.randrange(12)]
        if choice == 5:  # any payload type, dynamic or RTCP's
            return self._header(rng.choice((rng.randrange(128), 72, 73, 76, 127))) + b"\x00" * 20
        if choice == 6:  # a jump in sequence and timestamp
            self.seq = rng.randrange(1 << 16)
            self.ts = rng.randrange(1 << 32)
            return self.audio()
        if choice == 7:  # large: a jumbo frame or near the UDP limit
            return self._header(0) + b"\x7f" * rng.choice((1500, 9000, 65000))
        return self._header(self.event_pt) + b""  # an event with no payload

    def rtcp(self) -> bytes:
        rng = self.rng
        pt = rng.choice((200, 201, 202, 203, 204, 205, 206, 207))
        count = rng.randrange(32)
        body = rng.randbytes(rng.choice((0, 4, 20, 24, 100)))
        length = rng.choice((len(body) // 4 + 1, 0, 0xFFFF, rng.randrange(1 << 16)))
        packet = struct.pack("!BBHI", 0x80 | count, pt, length, self.ssrc) + body
        if rng.random() < 0.3:  # a compound packet
            packet += struct.pack("!BBHI", 0x81, 203, 1, self.ssrc)
        return packet

    def garbage(self) -> bytes:
        return self.rng.randbytes(self.rng.choice((0, 1, 3, 11, 12, 13, 172, 1400)))

    def make(self, kind: Packet) -> bytes:
        if kind is Packet.AUDIO:
            return self.audio()
        if kind is Packet.EVENT:
            return self.event()
        if kind is Packet.MUTATED:
            return self.mutated()
        if kind is Packet.RTCP:
            return self.rtcp()
        return self.garbage()


# Events are few: each may press a key, and the hotline flow ends a call on some of them.
WEIGHTS = {Packet.AUDIO: 35, Packet.EVENT: 5, Packet.MUTATED: 35, Packet.RTCP: 15,
           Packet.GARBAGE: 10}  # fmt: skip
MAX_CALLS = 500


@dataclass(frozen=True)
class Media:
    host: str
    port: int
    event_pt: int


def answer_media(body: bytes) -> Media | None:
    """Where the gateway's answer wants our RTP, and its telephone-event payload type."""
    text = body.decode("utf8", "replace")
    conn = re.search(r"^c=IN IP[46] (\S+)", text, re.MULTILINE)
    audio = re.search(r"^m=audio (\d+) ", text, re.MULTILINE)
    event = re.search(r"^a=rtpmap:(\d+) telephone-event/", text, re.MULTILINE)
    if conn is None or audio is None:
        return None
    return Media(conn[1], int(audio[1]), int(event[1]) if event else 101)


class LiveCall:
    """A minimal caller: INVITE with our offer, ACK, in-dialog OPTIONS to check the call
    is alive, BYE; answers the gateway's BYE with 200."""

    def __init__(self, target: tuple[str, int], rng: random.Random) -> None:
        self.target = target
        self.rng = rng
        self.sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sip.bind((LOOPBACK, 0))
        self.rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rtp.bind((LOOPBACK, 0))
        self.rtp.setblocking(False)
        self.local = self.sip.getsockname()[:2]
        self.answer: Head | None = None
        self.media: Media | None = None
        self.ended = False
        self.call_id = ""
        self.cseq = 1
        self.received_bytes = 0
        self._n = 0

    def close(self) -> None:
        self.sip.close()
        self.rtp.close()

    def _via(self) -> str:
        self._n += 1
        return (f"SIP/2.0/UDP {self.local[0]}:{self.local[1]};branch=z9hG4bKl"
                f"{self.rng.getrandbits(40):x}{self._n};rport")  # fmt: skip

    def start(self, timeout: float = 10.0) -> bool:
        """Call the gateway; True once answered (and ACKed)."""
        body = good_offer(LOOPBACK, self.rtp.getsockname()[1])
        call_id = self.call_id = f"live-{self.rng.getrandbits(48):x}@{LOOPBACK}"
        target = f"{self.target[0]}:{self.target[1]}"
        invite = "\r\n".join([
            f"INVITE sip:hotline@{target} SIP/2.0", f"Via: {self._via()}", "Max-Forwards: 70",
            f"From: <sip:+15550130@{self.local[0]}>;tag={self.rng.getrandbits(32):x}",
            f"To: <sip:hotline@{target}>", f"Call-ID: {call_id}", "CSeq: 1 INVITE",
            f"Contact: <sip:live@{self.local[0]}:{self.local[1]}>",
            "Content-Type: application/sdp", f"Content-Length: {len(body)}", "", "",
        ]).encode() + body  # fmt: skip
        self.sip.sendto(invite, self.target)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            head = self._receive(deadline - time.monotonic())
            if head is None or not head.is_response or head.call_id != call_id:
                continue
            if head.code >= 300:
                self.sip.sendto(ack_for(head, head.get("via"), f"sip:hotline@{target}"),
                                self.target)  # fmt: skip
                return False
            if head.code >= 200:
                self.answer = head
                self.media = answer_media(head.body)
                self.sip.sendto(ack_for(head, self._via(), f"sip:hotline@{target}"), self.target)
                return self.media is not None
        return False

    def _receive(self, timeout: float) -> Head | None:
        self.sip.settimeout(max(0.01, timeout))
        try:
            data, addr = self.sip.recvfrom(65536)
        except (TimeoutError, OSError):
            return None
        head = parse_head(data)
        if head is not None and not head.is_response:
            answer = self.answer
            if head.method == "BYE" and answer is not None and head.call_id == answer.call_id:
                self.ended = True
            if head.method != "ACK":
                self.sip.sendto(ok_for(head), addr)
        return head

    def poll(self) -> None:
        """Answer what the gateway sent (a BYE ends the call) and drain its RTP."""
        while self._receive(0.0) is not None:
            pass
        for _ in range(1000):
            try:
                self.received_bytes += len(self.rtp.recv(65536))
            except (BlockingIOError, OSError):
                break

    def request(self, method: str, timeout: float = 3.0) -> int | None:
        """An in-dialog request; the final status, or None without one."""
        if self.answer is None:
            return None
        self.cseq += 1
        target = f"sip:hotline@{self.target[0]}:{self.target[1]}"
        self.sip.sendto(in_dialog_request(method, self.answer, self._via(), self.cseq, target),
                        self.target)  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            head = self._receive(deadline - time.monotonic())
            if head is None or not head.is_response or head.cseq != (self.cseq, method):
                continue
            if head.code >= 200:
                return head.code
        return None


@dataclass
class RtpStats:
    sent: Counter[str] = field(default_factory=Counter)  # by Packet kind
    sources: Counter[str] = field(default_factory=Counter)  # by Source
    calls: int = 0  # live calls set up
    call_ids: list[str] = field(default_factory=list)
    calls_failed: int = 0  # INVITEs for a live call that were not answered
    ended_by_gateway: int = 0  # calls the gateway hung up while we sent
    alive_checks: int = 0
    alive_failed: int = 0  # in-dialog OPTIONS unanswered on a call we thought alive
    hangups_ok: int = 0
    received_bytes: int = 0
    elapsed: float = 0.0


def _start_call(
    target: tuple[str, int], rng: random.Random, stats: RtpStats
) -> tuple[LiveCall, PacketFactory] | None:
    """A new live call, its packet factory, and 5 audio packets sent from the offered
    address (heard first, it is the source); None (counted) when the call fails."""
    call = LiveCall(target, rng)
    if not call.start():
        stats.calls_failed += 1
        call.close()
        return None
    stats.calls += 1
    stats.call_ids.append(call.call_id)
    assert call.media is not None
    factory = PacketFactory(rng, call.media.event_pt)
    for _ in range(5):
        call.rtp.sendto(factory.audio(), (call.media.host, call.media.port))
        stats.sent[Packet.AUDIO] += 1
        stats.sources[Source.OFFERED] += 1
    return call, factory


def _send_batch(
    call: LiveCall,
    factory: PacketFactory,
    strangers: list[socket.socket],
    rng: random.Random,
    stats: RtpStats,
    count: int,
) -> None:
    """`count` packets of weighted kinds to the call's media port (RTCP to port + 1 half the
    time), mostly from the offered address, else from strangers or another port of ours."""
    media = call.media
    assert media is not None
    for _ in range(count):
        kind = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
        data = factory.make(kind)
        roll = rng.random()
        source = Source.OFFERED if roll < 0.7 else (
            Source.STRANGER if roll < 0.9 else Source.OTHER_PORT)  # fmt: skip
        sock = (
            call.rtp
            if source is Source.OFFERED
            else (rng.choice(strangers[:-1]) if source is Source.STRANGER else strangers[-1])
        )
        port = media.port + 1 if kind is Packet.RTCP and rng.random() < 0.5 else media.port
        with contextlib.suppress(OSError):
            sock.sendto(data, (media.host, port))
        stats.sent[kind] += 1
        stats.sources[source] += 1


def _check_alive(call: LiveCall, stats: RtpStats) -> None:
    """An in-dialog OPTIONS: unanswered while the call is up counts as a failed check."""
    stats.alive_checks += 1
    if call.request("OPTIONS") is None and not call.ended:
        stats.alive_failed += 1


def fuzz_live_call(
    target: tuple[str, int],
    total: int,
    rng: random.Random,
    *,
    alive: Callable[[], bool],
    deadline: float,
    rate: float = 4000.0,
) -> RtpStats:
    """Send ``total`` packets to live calls' media ports at about ``rate`` per second; a
    call the gateway ends is replaced (at most MAX_CALLS). Each call is checked with an
    in-dialog OPTIONS every 2,000 packets and hung up with BYE at the end."""
    stats = RtpStats()
    began = time.monotonic()
    strangers = []
    for host in (*STRANGERS, LOOPBACK):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, 0))
        strangers.append(sock)
    call: LiveCall | None = None
    factory = PacketFactory(rng)
    sent = 0
    try:
        while sent < total and time.monotonic() < deadline and stats.calls < MAX_CALLS:
            if not alive():
                break
            if call is None or call.ended:
                if call is not None:
                    stats.ended_by_gateway += 1
                    stats.received_bytes += call.received_bytes
                    call.close()
                started = _start_call(target, rng, stats)
                if started is None:
                    call = None
                    if stats.calls_failed > 5:
                        break
                    continue
                call, factory = started
            batch_start = time.monotonic()
            batch = min(200, total - sent)
            _send_batch(call, factory, strangers, rng, stats, batch)
            sent += batch
            call.poll()
            if sent % 2000 < 200 and not call.ended:
                _check_alive(call, stats)
            pause = 200 / rate - (time.monotonic() - batch_start)
            if pause > 0:
                time.sleep(pause)
        if call is not None and call.ended:
            stats.ended_by_gateway += 1
        elif call is not None:
            _check_alive(call, stats)
            if call.request("BYE") == 200:
                stats.hangups_ok += 1
    finally:
        if call is not None:
            stats.received_bytes += call.received_bytes
            call.close()
        for sock in strangers:
            sock.close()
    stats.elapsed = time.monotonic() - began
    return stats
