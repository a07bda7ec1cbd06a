"""Classic libpcap files of RTP streams, for SIPp's ``play_pcap_audio``.

The layout copies /usr/share/sip-tester/dtmf_2833_*.pcap: little-endian pcap 2.4 with
microsecond timestamps, link type Ethernet, and per packet Ethernet II / IPv4 / UDP / RTP.
SIPp replays the packets at their recorded pace, rewriting addresses and ports, so only
the RTP header, payload and the relative timestamps matter to the far end.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from gateway.media.dtmf import dtmf_tone
from gateway.media.g711 import alaw_encode, ulaw_encode

PCAP_MAGIC = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1
SAMPLE_RATE = 8000
PCMU = 0
PCMA = 8

_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")
_ETHER = struct.Struct("!6s6sH")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_RTP = struct.Struct("!BBHII")


@dataclass(frozen=True)
class PcapPacket:
    """One captured packet, decoded down to RTP."""

    time: float
    src: tuple[str, int]
    dst: tuple[str, int]
    payload_type: int
    marker: bool
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes
    ip_checksum_ok: bool
    udp_checksum_ok: bool


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _udp_checksum(src: bytes, dst: bytes, udp: bytes) -> int:
    pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_UDP, len(udp))
    value = _checksum(pseudo + udp)
    return value or 0xFFFF  # 0 means "no checksum" in IPv4 UDP


def _frame(rtp: bytes, src: tuple[str, int], dst: tuple[str, int], ident: int) -> bytes:
    src_ip, dst_ip = socket.inet_aton(src[0]), socket.inet_aton(dst[0])
    udp_length = _UDP.size + len(rtp)
    udp = _UDP.pack(src[1], dst[1], udp_length, 0) + rtp
    udp = udp[:6] + struct.pack("!H", _udp_checksum(src_ip, dst_ip, udp)) + udp[8:]
    header = _IPV4.pack(
        0x45,
        0,
        _IPV4.size + udp_length,
        ident & 0xFFFF,
        0,
        64,
        socket.IPPROTO_UDP,
        0,
        src_ip,
        dst_ip,
    )
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    ether = _ETHER.pack(bytes.fromhex("0050bf990336"), bytes.fromhex("000d8714ac24"), 0x0800)
    return ether + header + udp


def write_rtp_pcap(
    path: Path,
    payloads: Sequence[bytes],
    *,
    payload_type: int = PCMU,
    ptime_ms: int = 20,
    ssrc: int = 0x0E05384E,
    first_sequence: int = 7984,
    first_timestamp: int = 13280,
    start_time: float = 1_700_000_000.0,
    src: tuple[str, int] = ("192.168.0.3", 49176),
    dst: tuple[str, int] = ("192.168.0.1", 10000),
) -> Path:
    """Write one RTP stream, a packet every ``ptime_ms``; the first carries the marker bit.

    RTP timestamps advance by the samples in each payload (one byte per sample in G.711).
    """
    out = bytearray(_GLOBAL.pack(PCAP_MAGIC, 2, 4, 0, 0, 65535, LINKTYPE_ETHERNET))
    timestamp = first_timestamp
    for index, payload in enumerate(payloads):
        marker = 0x80 if index == 0 else 0
        rtp = _RTP.pack(
            0x80,  # version 2, no padding, extension or CSRCs
            marker | payload_type,
            (first_sequence + index) & 0xFFFF,
            timestamp & 0xFFFFFFFF,
            ssrc,
        )
        frame = _frame(rtp + payload, src, dst, 0xF699 + index)
        micros = round(start_time * 1_000_000) + index * ptime_ms * 1000
        out += _RECORD.pack(micros // 1_000_000, micros % 1_000_000, len(frame), len(frame))
        out += frame
        timestamp += len(payload)
    path.write_bytes(bytes(out))
    return path


def read_rtp_pcap(path: Path) -> tuple[tuple[int, ...], list[PcapPacket]]:
    """Parse a pcap written like SIPp's samples: (global header fields, packets)."""
    data = path.read_bytes()
    header = _GLOBAL.unpack_from(data)
    if header[0] != PCAP_MAGIC or header[6] != LINKTYPE_ETHERNET:
        raise ValueError(f"not a little-endian Ethernet pcap: {header}")
    packets: list[PcapPacket] = []
    offset = _GLOBAL.size
    while offset < len(data):
        seconds, micros, included, _original = _RECORD.unpack_from(data, offset)
        frame = data[offset + _RECORD.size : offset + _RECORD.size + included]
        offset += _RECORD.size + included
        _dst_mac, _src_mac, ether_type = _ETHER.unpack_from(frame)
        if ether_type != 0x0800:
            raise ValueError(f"not IPv4: ethertype {ether_type:#x}")
        ip = frame[_ETHER.size : _ETHER.size + _IPV4.size]
        fields = _IPV4.unpack(ip)
        if fields[0] != 0x45 or fields[6] != socket.IPPROTO_UDP:
            raise ValueError("not a plain IPv4/UDP packet")
        udp = frame[_ETHER.size + _IPV4.size : _ETHER.size + fields[2]]
        sport, dport, length, _ = _UDP.unpack_from(udp)
        if length != len(udp):
            raise ValueError("UDP length does not match the IP length")
        first, second, sequence, timestamp, ssrc = _RTP.unpack_from(udp, _UDP.size)
        if first >> 6 != 2:
            raise ValueError("not RTP version 2")
        packets.append(
            PcapPacket(
                time=seconds + micros / 1_000_000,
                src=(socket.inet_ntoa(fields[8]), sport),
                dst=(socket.inet_ntoa(fields[9]), dport),
                payload_type=second & 0x7F,
                marker=bool(second & 0x80),
                sequence=sequence,
                timestamp=timestamp,
                ssrc=ssrc,
                payload=udp[_UDP.size + _RTP.size :],
                ip_checksum_ok=_checksum(ip) == 0,
                udp_checksum_ok=_checksum(
                    fields[8]
                    + fields[9]
                    + struct.pack("!BBH", 0, socket.IPPROTO_UDP, len(udp))
                    + udp
                )
                == 0,
            )
        )
    return header, packets


def silence(ms: int) -> NDArray[np.int16]:
    return np.zeros(ms * SAMPLE_RATE // 1000, dtype=np.int16)


def inband_dtmf_pcm(
    digits: str, *, tone_ms: int = 120, gap_ms: int = 200, lead_ms: int = 300, tail_ms: int = 400
) -> NDArray[np.int16]:
    """Silence, then each digit as a ``tone_ms`` dual tone separated by ``gap_ms`` of silence."""
    parts = [silence(lead_ms)]
    for index, digit in enumerate(digits):
        if index:
            parts.append(silence(gap_ms))
        parts.append(dtmf_tone(digit, tone_ms))
    parts.append(silence(tail_ms))
    return np.concatenate(parts).astype(np.int16)


def write_pcmu_pcap(
    path: Path, pcm: NDArray[np.int16], *, ptime_ms: int = 20, payload_type: int = PCMU
) -> Path:
    """Encode 8 kHz audio as PCMU (or PCMA) and write it as ``ptime_ms`` RTP packets."""
    samples = SAMPLE_RATE * ptime_ms // 1000
    padded = np.concatenate((pcm, np.zeros((-len(pcm)) % samples, dtype=np.int16))).astype(np.int16)
    encoded = (alaw_encode if payload_type == PCMA else ulaw_encode)(padded)
    payloads = [encoded[i : i + samples] for i in range(0, len(encoded), samples)]
    return write_rtp_pcap(path, payloads, payload_type=payload_type, ptime_ms=ptime_ms)


def inband_dtmf_pcap(
    path: Path, digits: str, *, tone_ms: int = 120, payload_type: int = PCMU
) -> Path:
    """A PCMU (or PCMA) stream carrying ``digits`` as in-band tones (no telephone-event)."""
    return write_pcmu_pcap(
        path, inband_dtmf_pcm(digits, tone_ms=tone_ms), payload_type=payload_type
    )


def retype_rtp_pcap(source: Path, path: Path, payload_type: int) -> Path:
    """Copy a pcap like SIPp's samples with every RTP packet's payload type changed
    (SIPp replays the type it finds), the UDP checksums recomputed."""
    data = bytearray(source.read_bytes())
    offset = _GLOBAL.size
    while offset < len(data):
        included = _RECORD.unpack_from(data, offset)[2]
        ip = offset + _RECORD.size + _ETHER.size
        udp = ip + _IPV4.size
        length = _UDP.unpack_from(data, udp)[2]
        data[udp + _UDP.size + 1] = (data[udp + _UDP.size + 1] & 0x80) | payload_type
        data[udp + 6 : udp + 8] = b"\0\0"
        checksum = _udp_checksum(
            bytes(data[ip + 12 : ip + 16]), bytes(data[ip + 16 : ip + 20]),
            bytes(data[udp : udp + length]),
        )  # fmt: skip
        data[udp + 6 : udp + 8] = struct.pack("!H", checksum)
        offset += _RECORD.size + included
    path.write_bytes(bytes(data))
    return path
