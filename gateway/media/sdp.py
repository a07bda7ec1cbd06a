"""SDP (RFC 4566) model and offer/answer (RFC 3264) for one G.711 audio stream plus DTMF events.

The gateway only ever needs one audio stream with PCMU/PCMA and telephone-event, but it must
interoperate with whatever carriers, PBXs and softphones send: extra m= lines, c= at either
level, dynamic telephone-event payload types, RFC 2543 style hold. The model therefore keeps
every line it does not interpret, so a parsed description serialises back without losing
anything, and every malformed input surfaces as :class:`SdpError` (the caller answers 488).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeVar

from gateway.media.srtp import CryptoAttribute, SrtpKeys, parse_crypto_lines

__all__ = [
    "DIRECTIONS",
    "SUPPORTED",
    "TELEPHONE_EVENT_PT",
    "Attribute",
    "Connection",
    "MediaDescription",
    "NegotiatedMedia",
    "Origin",
    "RtpMap",
    "SdpError",
    "SessionDescription",
    "create_answer",
    "create_offer",
    "parse_answer",
]

SUPPORTED: Final[dict[str, int]] = {"PCMU": 0, "PCMA": 8}
TELEPHONE_EVENT_PT: Final = 101
DIRECTIONS: Final = ("sendrecv", "sendonly", "recvonly", "inactive")

_CLOCK_RATE: Final = 8000
_PTIME: Final = 20
_EVENTS: Final = "0-15"
_USERNAME: Final = "ackline"
_RTP_AVP: Final = "RTP/AVP"
_RTP_SAVP: Final = "RTP/SAVP"  # SRTP (RFC 3711); SDES keys in a=crypto (RFC 4568)

# RFC 3551 static payload types, for offers that list them without a=rtpmap.
_STATIC_TYPES: Final = {
    0: ("PCMU", 8000),
    3: ("GSM", 8000),
    4: ("G723", 8000),
    5: ("DVI4", 8000),
    6: ("DVI4", 16000),
    7: ("LPC", 8000),
    8: ("PCMA", 8000),
    9: ("G722", 8000),
    10: ("L16", 44100),
    12: ("QCELP", 8000),
    13: ("CN", 8000),
    15: ("G728", 8000),
    18: ("G729", 8000),
}

_DIGITS_RE: Final = re.compile(r"[0-9]+", re.ASCII)
_NUMBER_RE: Final = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6})?", re.ASCII)


class SdpError(ValueError):
    """The SDP is malformed or cannot be negotiated; SIP answers 488 Not Acceptable Here."""


def _int(text: str, what: str, low: int = 0, high: int | None = None) -> int:
    """Strict ASCII integer parsing so odd input can only ever raise SdpError."""
    if not _DIGITS_RE.fullmatch(text) or len(text) > 20:
        raise SdpError(f"{what}: not a number: {text!r}")
    value = int(text)
    if value < low or (high is not None and value > high):
        raise SdpError(f"{what}: {value} out of range")
    return value


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Origin:
    """The o= line; (username, session_id, address) names the session, version orders it."""

    username: str
    session_id: int
    version: int
    nettype: str
    addrtype: str
    address: str

    @classmethod
    def parse(cls, value: str) -> Origin:
        parts = value.split()
        if len(parts) != 6:
            raise SdpError(f"o= needs 6 fields: {value!r}")
        user, sess_id, version, nettype, addrtype, address = parts
        session_id = _int(sess_id, "o= session id")
        return cls(user, session_id, _int(version, "o= version"), nettype, addrtype, address)

    def __str__(self) -> str:
        return (
            f"{self.username} {self.session_id} {self.version} "
            f"{self.nettype} {self.addrtype} {self.address}"
        )


@dataclass(frozen=True)
class Connection:
    """A c= line. ``host`` drops any multicast TTL/count suffix."""

    nettype: str
    addrtype: str
    address: str

    @classmethod
    def parse(cls, value: str) -> Connection:
        parts = value.split()
        if len(parts) != 3:
            raise SdpError(f"c= needs 3 fields: {value!r}")
        return cls(*parts)

    @classmethod
    def for_host(cls, host: str) -> Connection:
        """Build IN IP4/IP6 for a local address; hostnames are treated as IPv4 (RFC 4566)."""
        return cls("IN", _addrtype(host), _strip_brackets(host))

    @property
    def host(self) -> str:
        return self.address.split("/", 1)[0]

    @property
    def is_hold(self) -> bool:
        """RFC 2543 hold: a null address means 'do not send to me'."""
        try:
            return ipaddress.ip_address(self.host).is_unspecified
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"{self.nettype} {self.addrtype} {self.address}"


@dataclass(frozen=True)
class Attribute:
    """An a= line, either a flag (``value`` None) or ``name:value``; unknown ones are kept."""

    name: str
    value: str | None = None

    @classmethod
    def parse(cls, text: str, *, interpreted: bool = True) -> Attribute:
        """One a= line; `interpreted` checks the ones we act on (see `validate`)."""
        name, sep, value = text.partition(":")
        name = name.strip()
        if not name:
            raise SdpError(f"a= without a name: {text!r}")
        attribute = cls(name, value if sep else None)
        if interpreted:
            attribute.validate()
        return attribute

    def validate(self) -> None:
        """Reject malformed attributes we interpret, so negotiation never trips over them."""
        key = self.name.lower()
        if key == "rtpmap":
            RtpMap.parse(self.value or "")
        elif key == "fmtp":
            fmt = (self.value or "").split(maxsplit=1)
            if not fmt:
                raise SdpError("a=fmtp without a format")
        elif key in ("ptime", "maxptime") and not _NUMBER_RE.fullmatch((self.value or "").strip()):
            raise SdpError(f"a={self.name} needs a number: {self.value!r}")

    def __str__(self) -> str:
        return self.name if self.value is None else f"{self.name}:{self.value}"


@dataclass(frozen=True)
class RtpMap:
    """A payload type's encoding, from a=rtpmap or the RFC 3551 static table."""

    payload_type: int
    encoding: str
    clock_rate: int
    channels: int = 1

    @classmethod
    def parse(cls, value: str) -> RtpMap:
        parts = value.split(maxsplit=1)
        if len(parts) != 2:
            raise SdpError(f"a=rtpmap needs '<pt> <encoding>/<rate>': {value!r}")
        pt = _int(parts[0], "rtpmap payload type", 0, 127)
        spec = parts[1].strip().split("/")
        if len(spec) not in (2, 3) or not spec[0]:
            raise SdpError(f"a=rtpmap encoding malformed: {value!r}")
        rate = _int(spec[1], "rtpmap clock rate", 1)
        channels = _int(spec[2], "rtpmap channels", 1) if len(spec) == 3 else 1
        return cls(pt, spec[0], rate, channels)

    def __str__(self) -> str:
        suffix = f"/{self.channels}" if self.channels != 1 else ""
        return f"{self.payload_type} {self.encoding}/{self.clock_rate}{suffix}"


# Serialisation order within a section (RFC 4566 §5); unknown line types go last.
_SESSION_ORDER: Final = {"i": 0, "u": 1, "e": 2, "p": 3, "b": 5, "t": 6, "r": 6, "z": 7, "k": 8}
_SESSION_C_RANK: Final = 4
_MEDIA_ORDER: Final = {"i": 0, "b": 2, "k": 3}
_MEDIA_C_RANK: Final = 1
_UNKNOWN_RANK: Final = 9


def _ordered(
    lines: list[tuple[str, str]], order: dict[str, int], connection: Connection | None, c_rank: int
) -> list[str]:
    ranked = [(order.get(kind, _UNKNOWN_RANK), f"{kind}={value}") for kind, value in lines]
    if connection is not None:
        ranked.append((c_rank, f"c={connection}"))
    return [text for _, text in sorted(ranked, key=lambda item: item[0])]


@dataclass
class MediaDescription:
    """One m= section. ``lines`` holds i=/b=/k= (and unknown types) verbatim, in order."""

    media: str
    port: int
    proto: str
    formats: list[str]
    port_count: int | None = None
    connection: Connection | None = None
    attributes: list[Attribute] = field(default_factory=list)
    lines: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def parse_m_line(cls, value: str) -> MediaDescription:
        parts = value.split()
        if len(parts) < 4:
            raise SdpError(f"m= needs media, port, proto and a format: {value!r}")
        media, port_text, proto, *formats = parts
        port_part, sep, count_part = port_text.partition("/")
        port = _int(port_part, "m= port", 0, 65535)
        count = _int(count_part, "m= port count", 1) if sep else None
        if "RTP/" in proto.upper():
            for fmt in formats:
                _int(fmt, "RTP payload type", 0, 127)
        return cls(media, port, proto, formats, count)

    def values(self, name: str) -> list[str]:
        """Values of every ``a=name:...`` (case-insensitive); flags yield an empty string."""
        key = name.lower()
        return [a.value or "" for a in self.attributes if a.name.lower() == key]

    def has(self, name: str) -> bool:
        key = name.lower()
        return any(a.name.lower() == key for a in self.attributes)

    def rtpmaps(self) -> dict[int, RtpMap]:
        """Encoding of each listed payload type (explicit rtpmap first, then static table)."""
        explicit = {m.payload_type: m for m in map(RtpMap.parse, self.values("rtpmap"))}
        result: dict[int, RtpMap] = {}
        for fmt in self.formats:
            if not _DIGITS_RE.fullmatch(fmt) or len(fmt) > 3:
                continue
            pt = int(fmt)
            if pt in explicit:
                result[pt] = explicit[pt]
            elif pt in _STATIC_TYPES:
                encoding, rate = _STATIC_TYPES[pt]
                result[pt] = RtpMap(pt, encoding, rate)
        return result

    def fmtp(self, payload_type: int) -> str | None:
        for value in self.values("fmtp"):
            fmt, _, params = value.partition(" ")
            if fmt.strip() == str(payload_type):
                return params.strip()
        return None

    @property
    def ptime(self) -> int | None:
        values = self.values("ptime")
        return max(1, round(float(values[0].strip()))) if values else None

    @property
    def direction(self) -> str | None:
        """The media-level direction attribute, if any (see SessionDescription.direction_of)."""
        return next((a.name.lower() for a in self.attributes if a.name.lower() in DIRECTIONS), None)

    def set_direction(self, direction: str) -> None:
        _check_direction(direction)
        self.attributes = [a for a in self.attributes if a.name.lower() not in DIRECTIONS]
        self.attributes.append(Attribute(direction))

    def __str__(self) -> str:
        port = f"{self.port}/{self.port_count}" if self.port_count is not None else str(self.port)
        out = [f"m={self.media} {port} {self.proto} {' '.join(self.formats)}"]
        out += _ordered(self.lines, _MEDIA_ORDER, self.connection, _MEDIA_C_RANK)
        out += [f"a={a}" for a in self.attributes]
        return "".join(line + "\r\n" for line in out)


@dataclass
class SessionDescription:
    """A whole SDP body. ``lines`` holds session-level t=/b=/i=/... lines verbatim, in order."""

    origin: Origin
    session_name: str = "-"
    connection: Connection | None = None
    attributes: list[Attribute] = field(default_factory=list)
    lines: list[tuple[str, str]] = field(default_factory=lambda: [("t", "0 0")])
    media: list[MediaDescription] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str | bytes) -> SessionDescription:
        """Parse an SDP body (CRLF or LF). Raises SdpError, and only SdpError, on bad input."""
        origin: Origin | None = None
        session_name: str | None = None
        connection: Connection | None = None
        attributes: list[Attribute] = []
        lines: list[tuple[str, str]] = []
        media: list[MediaDescription] = []
        current: MediaDescription | None = None
        seen_version = False
        for number, kind, value in _sdp_lines(text):
            if not seen_version:
                if kind != "v" or value.strip() != "0":
                    raise SdpError("SDP must start with v=0")
                seen_version = True
            elif kind == "m":
                current = MediaDescription.parse_m_line(value)
                media.append(current)
            elif kind == "v" or (kind in ("o", "s") and current is not None):
                raise SdpError(f"line {number}: {kind}= not allowed here")
            elif kind == "o":
                if origin is not None:
                    raise SdpError("duplicate o=")
                origin = Origin.parse(value)
            elif kind == "s":
                session_name = _once(session_name, value, "duplicate s=")
            elif kind == "c":
                parsed = Connection.parse(value)
                if current is None:
                    connection = _once(connection, parsed, "duplicate session-level c=")
                else:
                    current.connection = _once(
                        current.connection, parsed, "duplicate c= in a media section"
                    )
            elif kind == "a":
                # Only session attributes and audio streams' are ours to interpret: a
                # video stream's odd rtpmap (RFC 4475's "a=rtpmap:31 LPC") is kept as it
                # is and answered with port 0 like the stream itself.
                ours = current is None or current.media.lower() == "audio"
                (current.attributes if current is not None else attributes).append(
                    Attribute.parse(value, interpreted=ours)
                )
            else:
                (current.lines if current is not None else lines).append((kind, value))
        if not seen_version:
            raise SdpError("empty SDP")
        if origin is None:
            raise SdpError("missing o=")
        return cls(origin, session_name or "-", connection, attributes, lines, media)

    def __str__(self) -> str:
        out = ["v=0", f"o={self.origin}", f"s={self.session_name or ' '}"]
        out += _ordered(self.lines, _SESSION_ORDER, self.connection, _SESSION_C_RANK)
        out += [f"a={a}" for a in self.attributes]
        return "".join(line + "\r\n" for line in out) + "".join(map(str, self.media))

    def to_bytes(self) -> bytes:
        return str(self).encode("utf-8")

    def bump_version(self) -> None:
        """Increment o= version, required whenever a re-offer or re-answer changes the SDP."""
        self.origin = dataclasses.replace(self.origin, version=self.origin.version + 1)

    def connection_of(self, media: MediaDescription) -> Connection | None:
        """Media-level c= overrides the session-level one."""
        return media.connection or self.connection

    def direction_of(self, media: MediaDescription) -> str:
        """Media-level direction, else session-level, else sendrecv (RFC 3264 §5.1)."""
        if media.direction is not None:
            return media.direction
        session = next(
            (a.name.lower() for a in self.attributes if a.name.lower() in DIRECTIONS), None
        )
        return session or "sendrecv"

    def audio_index(self, *, secure: bool = True) -> int | None:
        """Index of the m= line we use: the first enabled RTP (or, when ``secure``, SRTP)
        audio stream."""
        protos = (_RTP_AVP, _RTP_SAVP) if secure else (_RTP_AVP,)
        for index, media in enumerate(self.media):
            if media.media.lower() == "audio" and media.port != 0 and media.proto.upper() in protos:
                return index
        return None


@dataclass(frozen=True)
class NegotiatedMedia:
    """What the RTP layer needs after offer/answer, from our side's point of view.

    ``payload_type``/``telephone_event_pt`` are the numbers to send with (the peer's);
    ``ptime`` is the packetisation the peer asked for; ``direction`` is ours: "recvonly" or
    "inactive" means the peer has put us on hold and nothing must be sent.

    ``extra_audio``/``extra_events`` are payload types accepted on receive besides the send
    ones: an offerer receives on the numbers it offered (RFC 3264 §5.1), and a compliant
    answerer may send any offered format it listed, so neither must be dropped.
    """

    remote_host: str
    remote_port: int
    payload_type: int
    codec: str
    clock_rate: int
    telephone_event_pt: int | None
    ptime: int
    direction: str
    extra_audio: tuple[tuple[int, str], ...] = ()  # (payload type, codec)
    extra_events: tuple[int, ...] = ()
    srtp: SrtpKeys | None = None  # SDES keys when the stream is SRTP

    @property
    def receive_audio(self) -> dict[int, str]:
        """Every payload type decoded as audio on receive, to its codec name."""
        return {**dict(self.extra_audio), self.payload_type: self.codec}

    @property
    def receive_events(self) -> frozenset[int]:
        """Every payload type taken as telephone-event on receive (empty: none negotiated)."""
        if self.telephone_event_pt is None:
            return frozenset()
        return frozenset((self.telephone_event_pt, *self.extra_events))

    @property
    def can_send(self) -> bool:
        return self.direction in ("sendrecv", "sendonly")

    @property
    def can_receive(self) -> bool:
        return self.direction in ("sendrecv", "recvonly")


# --------------------------------------------------------------------------------------------
# Offer / answer
# --------------------------------------------------------------------------------------------


_T = TypeVar("_T")


def _sdp_lines(text: str | bytes) -> Iterator[tuple[int, str, str]]:
    """(line number, type, value) of each non-empty line of an SDP body (CRLF or LF)."""
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SdpError("SDP is not valid UTF-8") from exc
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.rstrip("\r\t ")
        if not line:
            continue
        if len(line) < 2 or line[1] != "=" or not "a" <= line[0] <= "z":
            raise SdpError(f"line {number}: expected <type>=<value>: {line[:40]!r}")
        yield number, line[0], line[2:]


def _once(seen: _T | None, value: _T, duplicate: str) -> _T:
    """`value` for a field given at most once; SdpError(`duplicate`) the second time."""
    if seen is not None:
        raise SdpError(duplicate)
    return value


def _strip_brackets(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _addrtype(host: str) -> str:
    try:
        address = ipaddress.ip_address(_strip_brackets(host))
    except ValueError:
        return "IP4"
    return "IP6" if address.version == 6 else "IP4"


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}: {direction!r}")


def _check_local(host: str, port: int) -> None:
    if not host or any(ch.isspace() for ch in host):
        raise ValueError(f"bad local host: {host!r}")
    if not 0 < port < 65536:
        raise ValueError(f"bad local port: {port}")


def _check_codecs(codecs: Sequence[str]) -> list[str]:
    names = [c.upper() for c in codecs]
    if not names or len(set(names)) != len(names) or any(n not in SUPPORTED for n in names):
        raise ValueError(f"codecs must be distinct names from {sorted(SUPPORTED)}: {codecs!r}")
    return names


def _coerce(sdp: SessionDescription | str | bytes) -> SessionDescription:
    return sdp if isinstance(sdp, SessionDescription) else SessionDescription.parse(sdp)


def _is_audio_codec(rtpmap: RtpMap, names: Sequence[str]) -> bool:
    return (
        rtpmap.encoding.upper() in names
        and rtpmap.clock_rate == _CLOCK_RATE
        and rtpmap.channels == 1
    )


def _is_telephone_event(rtpmap: RtpMap) -> bool:
    return rtpmap.encoding.lower() == "telephone-event" and rtpmap.clock_rate == _CLOCK_RATE


def _sends(direction: str) -> bool:
    return direction in ("sendrecv", "sendonly")


def _receives(direction: str) -> bool:
    return direction in ("sendrecv", "recvonly")


def _direction(send: bool, receive: bool) -> str:
    if send:
        return "sendrecv" if receive else "sendonly"
    return "recvonly" if receive else "inactive"


def _peer_direction(sdp: SessionDescription, media: MediaDescription, conn: Connection) -> str:
    """The peer's direction, treating a null c= address as 'do not send to me'."""
    direction = sdp.direction_of(media)
    if conn.is_hold:
        direction = _direction(_sends(direction), False)
    return direction


def _remote_connection(sdp: SessionDescription, media: MediaDescription) -> Connection:
    conn = sdp.connection_of(media)
    if conn is None:
        raise SdpError("no c= line for the audio stream")
    if conn.nettype.upper() != "IN" or conn.addrtype.upper() not in ("IP4", "IP6"):
        raise SdpError(f"unsupported connection address: {conn}")
    try:
        ipaddress.ip_address(_strip_brackets(conn.host))
    except ValueError:
        # RTP goes straight to this address from the media clock's tick: a host name
        # would need a lookup there (and one that is not even ASCII broke the clock).
        raise SdpError(f"connection address is not an IP address: {conn.host!r}") from None
    return conn


def _audio_section(
    port: int, proto: str, codec: RtpMap, event_pt: int | None, direction: str
) -> MediaDescription:
    pt = codec.payload_type
    formats = [str(pt)]
    attributes = [Attribute("rtpmap", str(RtpMap(pt, codec.encoding.upper(), _CLOCK_RATE)))]
    if event_pt is not None:
        formats.append(str(event_pt))
        attributes.append(Attribute("rtpmap", f"{event_pt} telephone-event/{_CLOCK_RATE}"))
        attributes.append(Attribute("fmtp", f"{event_pt} {_EVENTS}"))
    attributes += [Attribute("ptime", str(_PTIME)), Attribute(direction)]
    return MediaDescription("audio", port, proto, formats, attributes=attributes)


def create_offer(
    local_host: str,
    local_port: int,
    *,
    codecs: Sequence[str] = ("PCMU", "PCMA"),
    telephone_event: bool = True,
    session_id: int | None = None,
    version: int = 0,
    direction: str = "sendrecv",
    crypto: CryptoAttribute | None = None,
    srtp_required: bool = False,
) -> SessionDescription:
    """Build our offer. For a re-offer (hold, resume, new port) pass the same ``session_id``
    and the previous version + 1; ``direction="sendonly"`` puts the peer on hold.

    With ``crypto`` the offer carries our SDES key: on RTP/SAVP when ``srtp_required``,
    else on RTP/AVP ("best effort" SRTP, RFC 4568 section 7.1: a peer without SRTP
    ignores the attribute and answers plain RTP)."""
    if srtp_required and crypto is None:
        raise ValueError("an SRTP offer needs a crypto attribute")
    _check_local(local_host, local_port)
    names = _check_codecs(codecs)
    _check_direction(direction)
    if version < 0 or (session_id is not None and session_id < 0):
        raise ValueError("session_id and version must not be negative")
    conn = Connection.for_host(local_host)
    sid = session_id if session_id is not None else secrets.randbelow(2**62) + 1
    proto = _RTP_SAVP if srtp_required else _RTP_AVP
    media = MediaDescription("audio", local_port, proto, [])
    for name in names:
        media.formats.append(str(SUPPORTED[name]))
        media.attributes.append(Attribute("rtpmap", f"{SUPPORTED[name]} {name}/{_CLOCK_RATE}"))
    if telephone_event:
        media.formats.append(str(TELEPHONE_EVENT_PT))
        media.attributes.append(
            Attribute("rtpmap", f"{TELEPHONE_EVENT_PT} telephone-event/{_CLOCK_RATE}")
        )
        media.attributes.append(Attribute("fmtp", f"{TELEPHONE_EVENT_PT} {_EVENTS}"))
    media.attributes += [Attribute("ptime", str(_PTIME)), Attribute(direction)]
    if crypto is not None:
        media.attributes.append(Attribute("crypto", crypto.value))
    origin = Origin(_USERNAME, sid, version, conn.nettype, conn.addrtype, conn.address)
    return SessionDescription(origin, _USERNAME, conn, media=[media])


def parse_answer(
    answer: SessionDescription | str | bytes, offer: SessionDescription
) -> NegotiatedMedia:
    """Apply the peer's answer to our offer: send with the answerer's codec choice and its
    telephone-event payload type (which may differ from ours), receive on either numbering
    (``extra_audio``/``extra_events``). SdpError if the audio stream was rejected (port 0)
    or nothing we offered was accepted."""
    sdp = _coerce(answer)
    index = offer.audio_index()
    if index is None:
        raise SdpError("our offer has no audio stream")
    if len(sdp.media) != len(offer.media):
        raise SdpError("answer must have one m= line per offered m= line (RFC 3264 §6)")
    ours, theirs = offer.media[index], sdp.media[index]
    if theirs.media.lower() != "audio" or theirs.proto.upper() != ours.proto.upper():
        raise SdpError("answer's m= line does not match the offered audio stream")
    if theirs.port == 0:
        raise SdpError("audio stream rejected by the answerer")
    conn = _remote_connection(sdp, theirs)
    our_maps = ours.rtpmaps()
    our_codecs = {pt: m for pt, m in our_maps.items() if _is_audio_codec(m, list(SUPPORTED))}
    offered = [m.encoding.upper() for m in our_codecs.values()]
    our_events = [pt for pt, m in our_maps.items() if _is_telephone_event(m)]
    maps = theirs.rtpmaps()
    chosen = next((maps[int(f)] for f in theirs.formats if _accepts(maps, f, offered)), None)
    if chosen is None:
        raise SdpError("answer accepts none of the offered codecs")
    event_pt = None
    if our_events:
        event_pt = next((m.payload_type for m in maps.values() if _is_telephone_event(m)), None)
    ours_direction = offer.direction_of(ours)
    theirs_direction = _peer_direction(sdp, theirs, conn)
    direction = _direction(
        _sends(ours_direction) and _receives(theirs_direction),
        _receives(ours_direction) and _sends(theirs_direction),
    )
    # Receive on what we offered and on the answer's numbers for it (RFC 3264 §5.1, §6.1).
    theirs_codecs = {pt: m for pt, m in maps.items() if _is_audio_codec(m, offered)}
    extra_audio = tuple(
        (pt, m.encoding.upper())
        for pt, m in sorted({**theirs_codecs, **our_codecs}.items())
        if pt != chosen.payload_type
    )
    extra_events: tuple[int, ...] = ()
    if event_pt is not None:
        theirs_events = [pt for pt, m in maps.items() if _is_telephone_event(m)]
        extra_events = tuple(sorted({*our_events, *theirs_events} - {event_pt}))
    negotiated = _negotiated(conn, theirs, chosen, event_pt, direction)
    srtp = _answered_keys(ours, theirs)
    return dataclasses.replace(
        negotiated, extra_audio=extra_audio, extra_events=extra_events, srtp=srtp
    )


def _answered_keys(ours: MediaDescription, theirs: MediaDescription) -> SrtpKeys | None:
    """The SDES keys of an answer to our offer: its a=crypto whose tag is one of ours.
    An RTP/SAVP offer answered without one is unusable; an RTP/AVP one is plain RTP."""
    offered = {c.tag: c for c in parse_crypto_lines(ours.values("crypto"))}
    if not offered:
        return None
    answered = [c for c in parse_crypto_lines(theirs.values("crypto")) if c.tag in offered]
    if answered:
        return SrtpKeys(local=offered[answered[0].tag], remote=answered[0])
    if ours.proto.upper() == _RTP_SAVP:
        raise SdpError("SRTP was offered (RTP/SAVP) but the answer has no matching a=crypto")
    return None


def _answer_keys(
    theirs: MediaDescription, crypto: CryptoAttribute | None, required: bool
) -> SrtpKeys | None:
    """Our SDES answer to an offered stream: the first usable a=crypto offered, answered
    with our key under its tag (RFC 4568 7.1.2). SdpError (488) for an SRTP offer we may
    not or cannot take, or for plain RTP when SRTP is ``required``."""
    offered = parse_crypto_lines(theirs.values("crypto"))
    if crypto is not None and offered:
        return SrtpKeys(local=crypto.with_tag(offered[0].tag), remote=offered[0])
    if theirs.proto.upper() == _RTP_SAVP:
        if crypto is None:
            raise SdpError("SRTP (RTP/SAVP) is not accepted here")
        raise SdpError("no usable a=crypto in the SRTP offer (only AES_CM_128_HMAC_SHA1_80)")
    if required:
        raise SdpError("SRTP is required but the offer has no usable a=crypto")
    return None


def _negotiated(
    conn: Connection, remote: MediaDescription, codec: RtpMap, event_pt: int | None, direction: str
) -> NegotiatedMedia:
    """Peer's address, the peer's payload numbers, the peer's ptime (or 20), our direction."""
    return NegotiatedMedia(
        remote_host=conn.host,
        remote_port=remote.port,
        payload_type=codec.payload_type,
        codec=codec.encoding.upper(),
        clock_rate=codec.clock_rate,
        telephone_event_pt=event_pt,
        ptime=remote.ptime or _PTIME,
        direction=direction,
    )


def _accepts(maps: dict[int, RtpMap], fmt: str, names: Sequence[str]) -> bool:
    return (
        _DIGITS_RE.fullmatch(fmt) is not None
        and int(fmt) in maps
        and _is_audio_codec(maps[int(fmt)], names)
    )


def create_answer(
    offer: SessionDescription | str | bytes,
    local_host: str,
    local_port: int,
    *,
    codecs: Sequence[str] = ("PCMU", "PCMA"),
    session_id: int | None = None,
    version: int = 0,
    crypto: CryptoAttribute | None = None,
    srtp_required: bool = False,
) -> tuple[SessionDescription, NegotiatedMedia]:
    """Answer a peer's offer: the offerer's most preferred codec we support, its own
    telephone-event payload type echoed, the mirrored direction, every other m= line
    rejected with port 0. SdpError when there is no common codec (answer 488).

    Hold is recognised both as a=sendonly/inactive and as c=0.0.0.0 (RFC 2543); either way
    the negotiated direction tells the caller not to send. For an answer to a re-offer pass
    the same ``session_id`` and bump ``version`` when the answer changes.

    ``crypto`` is our SDES key, given when SRTP may be used: an offered a=crypto is then
    answered with it; without it an RTP/SAVP offer is refused. ``srtp_required`` refuses
    an offer without a usable a=crypto.
    """
    _check_local(local_host, local_port)
    names = _check_codecs(codecs)
    sdp = _coerce(offer)
    index = sdp.audio_index(secure=crypto is not None)
    if index is None:
        if sdp.audio_index() is not None:
            raise SdpError("SRTP (RTP/SAVP) is not accepted here")
        raise SdpError("offer has no usable RTP/AVP or RTP/SAVP audio stream")
    theirs = sdp.media[index]
    conn = _remote_connection(sdp, theirs)
    maps = theirs.rtpmaps()
    chosen = next((maps[int(f)] for f in theirs.formats if _accepts(maps, f, names)), None)
    if chosen is None:
        raise SdpError("no common codec")
    event_pt = next(
        (int(f) for f in theirs.formats if int(f) in maps and _is_telephone_event(maps[int(f)])),
        None,
    )
    theirs_direction = _peer_direction(sdp, theirs, conn)
    direction = _direction(_receives(theirs_direction), _sends(theirs_direction))
    srtp = _answer_keys(theirs, crypto, srtp_required)

    local = Connection.for_host(local_host)
    sid = session_id if session_id is not None else secrets.randbelow(2**62) + 1
    origin = Origin(_USERNAME, sid, version, local.nettype, local.addrtype, local.address)
    timing = [(kind, value) for kind, value in sdp.lines if kind in ("t", "r")] or [("t", "0 0")]
    answer = SessionDescription(origin, _USERNAME, local, lines=timing)
    for position, media in enumerate(sdp.media):
        if position == index:
            section = _audio_section(local_port, theirs.proto, chosen, event_pt, direction)
            if srtp is not None:
                section.attributes.append(Attribute("crypto", srtp.local.value))
            answer.media.append(section)
        else:
            answer.media.append(MediaDescription(media.media, 0, media.proto, list(media.formats)))
    negotiated = _negotiated(conn, theirs, chosen, event_pt, direction)
    return answer, dataclasses.replace(negotiated, srtp=srtp)
