"""RTP (RFC 3550) packets, the per-stream sender and the per-stream receiver.

The sender owns one stream's SSRC, sequence number and media clock so audio and
telephone-event packets share them, as RFC 4733 requires. The receiver turns whatever the
network delivers (reordered, duplicated, lost, or from a restarted source) into an in-order
packet sequence plus the RFC 3550 reception statistics.
"""

from __future__ import annotations

import secrets
import struct
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "RtpExtension",
    "RtpPacket",
    "RtpReceiver",
    "RtpReceiverStats",
    "RtpSender",
    "is_rtcp",
]

_HEADER = struct.Struct("!BBHII")
_EXT_HEADER = struct.Struct("!HH")
_SEQ_MOD = 1 << 16
_new_object = object.__new__
_TS_MOD = 1 << 32


@dataclass(frozen=True, slots=True)
class RtpExtension:
    """A header extension: the 16-bit profile word and its data (a multiple of 4 bytes)."""

    profile: int
    data: bytes = b""

    def __post_init__(self) -> None:
        if not 0 <= self.profile <= 0xFFFF:
            raise ValueError("extension profile must fit 16 bits")
        if len(self.data) % 4 or len(self.data) > 0xFFFF * 4:
            raise ValueError("extension data must be a multiple of 4 bytes, at most 262140")


@dataclass(frozen=True, slots=True)
class RtpPacket:
    """One RTP packet; ``padding`` is the number of padding bytes (0 = P bit clear)."""

    payload_type: int
    sequence_number: int
    timestamp: int
    ssrc: int
    payload: bytes = b""
    marker: bool = False
    csrc: tuple[int, ...] = ()
    extension: RtpExtension | None = None
    padding: int = 0
    version: int = 2

    def __post_init__(self) -> None:
        if self.version != 2:
            raise ValueError("only RTP version 2 exists")
        if not 0 <= self.payload_type <= 0x7F:
            raise ValueError("payload type must fit 7 bits")
        if not 0 <= self.sequence_number < _SEQ_MOD:
            raise ValueError("sequence number must fit 16 bits")
        if not 0 <= self.timestamp < _TS_MOD:
            raise ValueError("timestamp must fit 32 bits")
        if not 0 <= self.ssrc < _TS_MOD or not all(0 <= c < _TS_MOD for c in self.csrc):
            raise ValueError("SSRC/CSRC identifiers must fit 32 bits")
        if len(self.csrc) > 15:
            raise ValueError("at most 15 CSRC identifiers")
        if not 0 <= self.padding <= 0xFF:
            raise ValueError("padding length must be 0..255")

    @classmethod
    def parse(cls, data: bytes) -> RtpPacket:
        """Parse a datagram; ValueError on anything that is not a well-formed RTP packet."""
        size = len(data)
        if size < _HEADER.size:
            raise ValueError(f"RTP packet too short ({size} bytes)")
        first, second, seq, ts, ssrc = _HEADER.unpack_from(data)
        if first >> 6 != 2:
            raise ValueError(f"RTP version {first >> 6} is not 2")
        end = size
        padding = 0
        if first & 0x20:
            padding = data[-1]
            if padding == 0:
                raise ValueError("RTP padding flag set with zero padding length")
            end -= padding
        offset = _HEADER.size
        cc = first & 0x0F
        if offset + 4 * cc > end:
            raise ValueError("RTP CSRC list exceeds packet")
        csrc = struct.unpack_from(f"!{cc}I", data, offset) if cc else ()
        offset += 4 * cc
        extension = None
        if first & 0x10:
            if offset + _EXT_HEADER.size > end:
                raise ValueError("RTP extension header exceeds packet")
            profile, words = _EXT_HEADER.unpack_from(data, offset)
            offset += _EXT_HEADER.size
            if offset + 4 * words > end:
                raise ValueError("RTP extension data exceeds packet")
            extension = RtpExtension(profile, bytes(data[offset : offset + 4 * words]))
            offset += 4 * words
        if offset > end:
            raise ValueError("RTP padding exceeds packet")
        # Every field is in range by construction, so skip __post_init__ and set the slots
        # through their descriptors (a third of the cost of object.__setattr__): this runs
        # for every received datagram of every call.
        packet = _new_object(cls)
        pt_, seq_, ts_, ssrc_, payload_, marker_, csrc_, ext_, padding_, version_ = _SETTERS
        pt_(packet, second & 0x7F)
        seq_(packet, seq)
        ts_(packet, ts)
        ssrc_(packet, ssrc)
        payload_(packet, bytes(data[offset:end]))
        marker_(packet, second >= 0x80)
        csrc_(packet, tuple(csrc))
        ext_(packet, extension)
        padding_(packet, padding)
        version_(packet, 2)
        return packet

    def serialize(self) -> bytes:
        """Wire form; ``parse(p.serialize()) == p`` for every valid packet."""
        first = 0x80 | len(self.csrc)
        if self.padding:
            first |= 0x20
        if self.extension is not None:
            first |= 0x10
        parts = [
            _HEADER.pack(
                first,
                (0x80 if self.marker else 0) | self.payload_type,
                self.sequence_number,
                self.timestamp,
                self.ssrc,
            )
        ]
        if self.csrc:
            parts.append(struct.pack(f"!{len(self.csrc)}I", *self.csrc))
        if self.extension is not None:
            ext = self.extension
            parts.append(_EXT_HEADER.pack(ext.profile, len(ext.data) // 4))
            parts.append(ext.data)
        parts.append(self.payload)
        if self.padding:
            parts.append(bytes(self.padding - 1) + bytes((self.padding,)))
        return b"".join(parts)


_SETTERS: Final[tuple[Callable[[RtpPacket, Any], None], ...]] = tuple(
    getattr(RtpPacket, name).__set__
    for name in (
        "payload_type",
        "sequence_number",
        "timestamp",
        "ssrc",
        "payload",
        "marker",
        "csrc",
        "extension",
        "padding",
        "version",
    )
)
"""Slot setters of the frozen RtpPacket, in the order ``parse`` fills them."""


def is_rtcp(data: bytes) -> bool:
    """True for an RTCP packet multiplexed onto the RTP port (RFC 5761 section 4)."""
    return len(data) >= 2 and data[0] >> 6 == 2 and 192 <= data[1] <= 223


class RtpSender:
    """Header state for one outgoing stream.

    SSRC, first sequence number and first timestamp are random (RFC 3550 section 5.1) so a
    restarted call is never mistaken for the previous one. The media clock only moves when
    told to, so the caller decides how pauses, DTMF events and holds map onto timestamps.
    """

    def __init__(
        self,
        payload_type: int,
        *,
        event_payload_type: int | None = None,
        ssrc: int | None = None,
        sequence_number: int | None = None,
        timestamp: int | None = None,
    ) -> None:
        self.payload_type = payload_type
        self.event_payload_type = event_payload_type
        self.ssrc = secrets.randbits(32) if ssrc is None else ssrc
        self._seq = secrets.randbits(16) if sequence_number is None else sequence_number
        self._ts = secrets.randbits(32) if timestamp is None else timestamp
        self.packets_sent = 0
        self.octets_sent = 0

    @property
    def sequence_number(self) -> int:
        """Sequence number the next packet will carry."""
        return self._seq

    @property
    def timestamp(self) -> int:
        """Timestamp the next audio packet will carry (also the start of a DTMF event)."""
        return self._ts

    def advance_timestamp(self, samples: int) -> None:
        """Move the media clock without sending, e.g. for time spent on hold or in DTMF."""
        self._ts = (self._ts + samples) % _TS_MOD

    def seek(self, sequence_number: int, timestamp: int) -> None:
        """Set where the next packet starts: packets built elsewhere (the native sender builds
        runs of them) or queued and then dropped unsent move the stream's position."""
        self._seq = sequence_number % _SEQ_MOD
        self._ts = timestamp % _TS_MOD

    def next_packet(
        self, payload: bytes, *, samples: int, marker: bool = False, timestamp_advance: bool = True
    ) -> bytes:
        """Serialise the next audio packet; ``samples`` is how far it moves the media clock."""
        # _pack inlined: this runs for every frame of every call.
        ts, seq = self._ts, self._seq
        data = (
            _HEADER.pack(0x80, (0x80 if marker else 0) | self.payload_type, seq, ts, self.ssrc)
            + payload
        )
        self._seq = (seq + 1) & 0xFFFF
        self.packets_sent += 1
        self.octets_sent += len(payload)
        if timestamp_advance:
            self._ts = (ts + samples) & 0xFFFFFFFF
        return data

    def event_packet(self, payload: bytes, marker: bool, event_start_ts: int) -> bytes:
        """Serialise one RFC 4733 packet; all packets of an event carry its start timestamp."""
        if self.event_payload_type is None:
            raise RuntimeError("no telephone-event payload type negotiated")
        return self._pack(self.event_payload_type, payload, marker, event_start_ts % _TS_MOD)

    def _pack(self, payload_type: int, payload: bytes, marker: bool, timestamp: int) -> bytes:
        header = _HEADER.pack(
            0x80, (0x80 if marker else 0) | payload_type, self._seq, timestamp, self.ssrc
        )
        self._seq = (self._seq + 1) % _SEQ_MOD
        self.packets_sent += 1
        self.octets_sent += len(payload)
        return header + payload


@dataclass(frozen=True, slots=True)
class RtpReceiverStats:
    """Cumulative reception counters; ``jitter`` is in timestamp units (RFC 3550 A.8)."""

    packets_received: int = 0
    duplicates: int = 0
    reordered: int = 0
    late: int = 0
    lost: int = 0
    expected: int = 0
    ssrc_changes: int = 0
    jitter: float = 0.0
    clock_rate: int = 8000

    @property
    def jitter_ms(self) -> float:
        return self.jitter * 1000.0 / self.clock_rate

    @property
    def fraction_lost(self) -> float:
        return self.lost / self.expected if self.expected else 0.0


@dataclass(slots=True)
class _Held:
    packet: RtpPacket
    arrival: float


_SEEN_SLOTS = 1024  # a power of two: slot = extended sequence number & (slots - 1)
_NEVER = -(1 << 62)  # no extended sequence number is this far below zero
_EMPTY_SEEN = array("q", [_NEVER]) * _SEEN_SLOTS


class _SeenRing:
    """Which extended sequence numbers arrived, for the last ``_SEEN_SLOTS`` of them.

    A fixed 8 KiB slot array instead of a set of ints: the set of a live stream held up
    to a thousand int objects and a 32 KiB table, rebuilt every ~20 s, per call. Slot
    ``n & mask`` holds ``n``, so ``n`` is remembered until ``n + 1024`` arrives.
    """

    __slots__ = ("_slots",)

    def __init__(self) -> None:
        self._slots = array("q", _EMPTY_SEEN)

    def __contains__(self, ext: int) -> bool:
        return self._slots[ext & (_SEEN_SLOTS - 1)] == ext

    def add(self, ext: int) -> None:
        self._slots[ext & (_SEEN_SLOTS - 1)] = ext


@dataclass(slots=True)
class _Source:
    """Sequence state of the current SSRC, in extended (cycle-counting) sequence numbers."""

    ssrc: int
    base: int
    highest: int
    next_out: int
    received: int = 0
    probation: int | None = None
    held: dict[int, _Held] = field(default_factory=dict)
    seen: _SeenRing = field(default_factory=_SeenRing)


class RtpReceiver:
    """In-order delivery and statistics for one incoming stream.

    Packets leave as soon as they are in sequence, so the normal path adds no delay; only
    behind a gap are up to ``depth`` packets (or ``max_hold`` seconds) held, waiting for the
    missing one before it is declared lost. Duplicates are dropped, packets arriving after
    their slot was given up are dropped as late, and a new SSRC restarts the sequence state.
    """

    MAX_DROPOUT = 3000  # RFC 3550 A.1: larger jumps may be a sender restart
    MAX_MISORDER = 100

    def __init__(self, clock_rate: int = 8000, *, depth: int = 3, max_hold: float = 0.06) -> None:
        if depth < 0:
            raise ValueError("depth must be non-negative")
        self.clock_rate = clock_rate
        self.depth = depth
        self.max_hold = max_hold
        self._source: _Source | None = None
        self._received = 0
        self._duplicates = 0
        self._reordered = 0
        self._late = 0
        self._ssrc_changes = 0
        self._lost_before = 0
        self._expected_before = 0
        self._jitter = 0.0
        self._last_arrival = 0.0
        self._last_ts: int | None = None

    @property
    def ssrc(self) -> int | None:
        return None if self._source is None else self._source.ssrc

    @property
    def pending(self) -> int:
        """Packets held behind a sequence gap."""
        return 0 if self._source is None else len(self._source.held)

    @property
    def stats(self) -> RtpReceiverStats:
        expected, lost = self._expected_before, self._lost_before
        src = self._source
        if src is not None:
            exp = src.highest - src.base + 1
            expected += exp
            lost += max(0, exp - src.received)
        return RtpReceiverStats(
            packets_received=self._received,
            duplicates=self._duplicates,
            reordered=self._reordered,
            late=self._late,
            lost=lost,
            expected=expected,
            ssrc_changes=self._ssrc_changes,
            jitter=self._jitter,
            clock_rate=self.clock_rate,
        )

    def push(self, packet: RtpPacket, now: float) -> list[RtpPacket]:
        """Accept one packet arriving at ``now`` (seconds); return packets ready, in order."""
        src = self._source
        if src is not None and packet.ssrc == src.ssrc and not src.held:
            # Fast path for the common case, the next packet in sequence with no gap open:
            # it leaves at once, exactly as the general path below would release it.
            ext = self._extend(src, packet.sequence_number)
            if ext == src.next_out and ext not in src.seen:
                if ext < src.highest:
                    self._reordered += 1
                else:
                    src.highest = ext
                src.seen.add(ext)
                src.received += 1
                self._received += 1
                self._update_jitter(packet, now)
                src.next_out = ext + 1
                return [packet]
        out: list[RtpPacket] = []
        if src is None or packet.ssrc != src.ssrc:
            if src is not None:
                self._ssrc_changes += 1
                out.extend(self._retire(src))
            src = self._source = self._new_source(packet)
            ext = src.highest
        else:
            ext = self._extend(src, packet.sequence_number)
            if ext in src.seen:
                self._duplicates += 1
                return out
            if ext - src.next_out > self.MAX_DROPOUT or src.next_out - ext > self.MAX_MISORDER:
                # RFC 3550 A.1: a far jump is a sender restart only if the next packet
                # follows it; a lone stray is dropped.
                if src.probation != packet.sequence_number:
                    src.probation = (packet.sequence_number + 1) % _SEQ_MOD
                    self._late += 1
                    return out
                out.extend(self._retire(src))
                src = self._source = self._new_source(packet)
                ext = src.highest
            elif ext < src.next_out:
                self._late += 1
                src.seen.add(ext)
                return out
            elif ext < src.highest:
                self._reordered += 1
            else:
                src.highest = ext
        src.held[ext] = _Held(packet, now)
        src.seen.add(ext)
        src.received += 1
        self._received += 1
        self._update_jitter(packet, now)
        out.extend(self._release(src, now))
        return out

    def expire(self, now: float) -> list[RtpPacket]:
        """Give up on gaps older than ``max_hold``; called periodically so a lost packet
        at the end of a talkspurt does not hold back the packets behind it forever."""
        src = self._source
        if src is None or not src.held:
            return []
        return self._release(src, now)

    def flush(self) -> list[RtpPacket]:
        """Release everything held, skipping gaps (end of call)."""
        return [] if self._source is None else self._release_all(self._source)

    def _new_source(self, packet: RtpPacket) -> _Source:
        seq = packet.sequence_number
        src = _Source(ssrc=packet.ssrc, base=seq, highest=seq, next_out=seq)
        self._last_ts = None
        return src

    def _retire(self, src: _Source) -> list[RtpPacket]:
        released = self._release_all(src)
        exp = src.highest - src.base + 1
        self._expected_before += exp
        self._lost_before += max(0, exp - src.received)
        return released

    @staticmethod
    def _extend(src: _Source, seq: int) -> int:
        """Map a 16-bit sequence number to the extended number nearest the highest seen."""
        delta = (seq - src.highest) % _SEQ_MOD
        if delta >= _SEQ_MOD // 2:
            delta -= _SEQ_MOD
        return src.highest + delta

    def _update_jitter(self, packet: RtpPacket, now: float) -> None:
        # Packets repeating the previous timestamp (RFC 4733 event updates, retransmitted
        # end packets) were not sampled at their send time; they would inflate jitter.
        ts = packet.timestamp
        if ts == self._last_ts:
            return
        arrival = now * self.clock_rate
        if self._last_ts is not None:
            ts_delta = (ts - self._last_ts) % _TS_MOD
            if ts_delta >= _TS_MOD // 2:
                ts_delta -= _TS_MOD
            # |D(i-1, i)| = difference of the two transit times, in timestamp units.
            d = abs((arrival - self._last_arrival) - ts_delta)
            self._jitter += (d - self._jitter) / 16.0
        self._last_arrival = arrival
        self._last_ts = ts

    def _release(self, src: _Source, now: float) -> list[RtpPacket]:
        out: list[RtpPacket] = []
        held = src.held
        while held:
            item = held.pop(src.next_out, None)
            if item is not None:
                out.append(item.packet)
                src.next_out += 1
                continue
            oldest = min(held)
            if len(held) <= self.depth and now - held[oldest].arrival < self.max_hold:
                break
            src.next_out = oldest  # give up on the gap
        return out

    def _release_all(self, src: _Source) -> list[RtpPacket]:
        out = [src.held[k].packet for k in sorted(src.held)]
        if src.held:
            src.next_out = max(src.held) + 1
            src.held.clear()
        return out
