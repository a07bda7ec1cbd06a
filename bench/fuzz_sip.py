"""What the SIP fuzzer sends: a corpus (our request templates and RFC 4475's torture
messages, under bench/fuzz_corpus/), a seeded mutator, and the few messages a well-behaved
peer must send back (ACK, BYE, CANCEL, 200) so that the calls a fuzzed INVITE opens end.

Pure: no sockets and no clock, so the same seed gives the same inputs (the driver is
bench/fuzz_net.py). Corpus files are text with LF line ends, sent with CRLF; a
``<hex>..</hex>`` span stands for the bytes it spells (RFC 4475 section 2.2).
"""

from __future__ import annotations

import enum
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

CORPUS = Path(__file__).with_name("fuzz_corpus")
TEMPLATES = CORPUS / "sip"
TORTURE = CORPUS / "rfc4475"

MAX_UDP = 65507  # the largest IPv4 UDP payload: bigger inputs go over TCP only
_HEX = re.compile(r"<hex>([0-9A-Fa-f]*)</hex>")
_HEADER_END = b"\r\n\r\n"


class Origin(enum.StrEnum):
    TEMPLATE = "template"  # ours, with {{FIELD}} placeholders filled per input
    TORTURE = "rfc4475"  # RFC 4475's messages, byte for byte


@dataclass(frozen=True)
class Seed:
    name: str
    origin: Origin
    text: bytes
    method: str  # the request method, or "response"

    @property
    def in_dialog(self) -> bool:
        """A template naming the far end's tag: sent inside a real dialog when one is open."""
        return b"{{TOTAG}}" in self.text


def decode_corpus_text(text: str) -> bytes:
    """A corpus file's wire bytes: CRLF line ends, ``<hex>`` spans decoded."""
    out = bytearray()
    last = 0
    for match in _HEX.finditer(text):
        out += text[last : match.start()].encode()
        out += bytes.fromhex(match[1])
        last = match.end()
    out += text[last:].encode()
    return bytes(out).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _method(data: bytes) -> str:
    first = data.split(b"\r\n", 1)[0]
    if first.startswith(b"SIP/"):
        return "response"
    return first.split(b" ", 1)[0].decode("utf8", "replace")


def load_seeds(directory: Path, origin: Origin) -> list[Seed]:
    seeds = []
    for path in sorted(directory.glob("*.sip")):
        data = decode_corpus_text(path.read_text(encoding="utf-8"))
        seeds.append(Seed(path.stem, origin, data, _method(data)))
    if not seeds:
        raise FileNotFoundError(f"no *.sip corpus files in {directory}")
    return seeds


@dataclass(frozen=True)
class Route:
    """Where an input goes and where it claims to come from."""

    transport: str  # "udp" | "tcp"
    local: tuple[str, int]
    target: tuple[str, int]


@dataclass
class DialogFields:
    """The identifiers of one request (or of the dialog it belongs to)."""

    call_id: str
    from_tag: str
    to_tag: str
    cseq: int
    branch: str
    user: str = "hotline"


def render(seed: Seed, route: Route, fields: DialogFields, body: bytes = b"") -> bytes:
    """Fill a template's placeholders; Content-Length ({{LEN}}) is the true body length.
    A torture message is returned as it is."""
    if seed.origin is Origin.TORTURE:
        return seed.text
    data = seed.text.replace(b"{{SDP}}", body)
    head, sep, rest = data.partition(_HEADER_END)
    local = f"{route.local[0]}:{route.local[1]}".encode()
    values = {
        b"{{TARGET}}": f"{route.target[0]}:{route.target[1]}".encode(),
        b"{{LOCAL}}": local,
        b"{{LOCAL_HOST}}": route.local[0].encode(),
        b"{{TRANSPORT}}": route.transport.upper().encode(),
        b"{{transport}}": route.transport.encode(),
        b"{{BRANCH}}": fields.branch.encode(),
        b"{{CALLID}}": fields.call_id.encode(),
        b"{{FROMTAG}}": fields.from_tag.encode(),
        b"{{TOTAG}}": fields.to_tag.encode(),
        b"{{CSEQ}}": str(fields.cseq).encode(),
        b"{{USER}}": fields.user.encode(),
        b"{{LEN}}": str(len(rest)).encode(),
    }
    for key, value in values.items():
        head = head.replace(key, value)
    return head + sep + rest


# -- mutations ---------------------------------------------------------------------------


class Mutation(enum.StrEnum):
    FLIP = "flip"  # flip bits of a few bytes
    INSERT = "insert"  # random or special bytes at a random place
    DELETE = "delete"  # a random span gone
    DUPLICATE_HEADER = "duplicate_header"
    DROP_HEADER = "drop_header"
    CONTENT_LENGTH = "content_length"  # a lie: too long, too short, negative, not a number
    HUGE_VALUE = "huge_value"  # one header value repeated into kilobytes
    METHOD = "method"  # another (or a made-up) method on the request line
    URI = "uri"  # a strange Request-URI
    TRUNCATE = "truncate"
    SPLICE = "splice"  # the head of this message, the tail of another
    NUMBERS = "numbers"  # CSeq, Max-Forwards, ports, lengths at their limits
    LINE_ENDS = "line_ends"  # CRLF -> LF, CR, or folded continuation lines
    HEADER_CASE = "header_case"  # compact forms and odd capitalisation of names
    SHUFFLE = "shuffle"  # header lines in another order


METHODS = [b"INVITE", b"ACK", b"BYE", b"CANCEL", b"OPTIONS", b"REGISTER", b"INFO", b"PRACK",
           b"UPDATE", b"REFER", b"NOTIFY", b"SUBSCRIBE", b"MESSAGE", b"PUBLISH", b"invite",
           b"INVITE\x00", b"IN VITE", b"", b"X" * 300, b"\xff\xfe", b"SIP/2.0", b"GET",
           b"!interesting-Method0123456789_*+`.%indeed'~"]  # fmt: skip
URIS = [b"sip:", b"sip:@", b"sips:hotline@127.0.0.1", b"tel:+15550100", b"sip:[::1]:5060",
        b"sip:hotline@127.0.0.1:0", b"sip:hotline@127.0.0.1:99999", b"sip:hotline@[::1",
        b"sip:%00@127.0.0.1", b"sip:hotline@127.0.0.1;transport=sctp;lr;maddr=127.0.0.9",
        b"<sip:hotline@127.0.0.1>", b"sip:hotline@127.0.0.1?Route=%3Csip:127.0.0.1%3E",
        b"sip:" + b"a" * 4000 + b"@127.0.0.1", b"*", b"http://127.0.0.1/", b"sip:+15550100@",
        b"sip:hotline@127.0.0.1 ; lr", b"sip:\xc3\xa9t\xc3\xa9@127.0.0.1",
        b"urn:service:sos"]  # fmt: skip
SPECIAL_BYTES = [b"\x00", b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"\t", b" ", b";", b",", b":",
                 b"<", b">", b'"', b"\\", b"%", b"%00", b"\xff", b"\xc3(", b"\xe2\x80\xae",
                 b"=", b"@", b"[", b"]", b"/", b"?"]  # fmt: skip
NUMBERS = [b"0", b"-1", b"1", b"65535", b"65536", b"2147483647", b"2147483648", b"4294967296",
           b"99999999999999999999999999", b"00000000000000000001", b"1e3", b"0x10", b"+5",
           b" ", b"", b"\xd9\xa3", b"NaN", b"-0", b"256", b"255"]  # fmt: skip
COMPACT = {b"via": b"v", b"from": b"f", b"to": b"t", b"call-id": b"i", b"contact": b"m",
           b"content-length": b"l", b"content-type": b"c", b"subject": b"s",
           b"supported": b"k"}  # fmt: skip
_NUMBER = re.compile(rb"\d+")


class Mutator:
    """Corrupts messages the ways real peers and attackers do, from a seeded generator.

    Each call applies 1..``max_ops`` mutations; the result never exceeds ``max_size``.
    """

    def __init__(self, rng: random.Random, max_size: int = MAX_UDP, max_ops: int = 4) -> None:
        self.rng = rng
        self.max_size = max_size
        self.max_ops = max_ops
        self._ops = list(Mutation)

    def mutate(self, data: bytes, other: bytes) -> tuple[bytes, list[Mutation]]:
        rng = self.rng
        applied = rng.choices(self._ops, k=rng.randint(1, self.max_ops))
        out = data
        for op in applied:
            out = self._apply(op, out, other)
            if len(out) > self.max_size:
                out = out[: self.max_size]
        return out, applied

    def _apply(self, op: Mutation, data: bytes, other: bytes) -> bytes:
        rng = self.rng
        if not data:
            return rng.choice(SPECIAL_BYTES)
        at = rng.randrange(len(data))
        if op is Mutation.FLIP:
            buf = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
            return bytes(buf)
        if op is Mutation.INSERT:
            piece = rng.choice(SPECIAL_BYTES) if rng.random() < 0.6 else rng.randbytes(
                rng.randint(1, 64))  # fmt: skip
            return data[:at] + piece * rng.choice((1, 1, 2, 50)) + data[at:]
        if op is Mutation.DELETE:
            return data[:at] + data[at + rng.randint(1, 64) :]
        if op is Mutation.TRUNCATE:
            return data[:at]
        if op is Mutation.SPLICE:
            cut = rng.randrange(len(other)) if other else 0
            return data[:at] + other[cut:]
        if op is Mutation.METHOD:
            return _replace_first_token(data, 0, rng.choice(METHODS))
        if op is Mutation.URI:
            return _replace_first_token(data, 1, rng.choice(URIS))
        if op is Mutation.CONTENT_LENGTH:
            return self._content_length(data)
        if op is Mutation.NUMBERS:
            matches = list(_NUMBER.finditer(data))
            if not matches:
                return data
            m = rng.choice(matches)
            return data[: m.start()] + rng.choice(NUMBERS) + data[m.end() :]
        if op is Mutation.LINE_ENDS:
            return data.replace(b"\r\n", rng.choice((b"\n", b"\r", b"\r\n ", b"\r\n\t", b"\n\r")),
                                rng.choice((1, 3, -1)))  # fmt: skip
        return self._mutate_header(op, data)

    def _mutate_header(self, op: Mutation, data: bytes) -> bytes:
        """The mutations of one header line (or of their order), head and body kept apart."""
        rng = self.rng
        head, sep, body = data.partition(_HEADER_END)
        lines = head.split(b"\r\n")
        if len(lines) < 2:
            return data
        start, headers = lines[0], lines[1:]
        index = rng.randrange(len(headers))
        if op is Mutation.DUPLICATE_HEADER:
            headers.insert(index, headers[index] if rng.random() < 0.7 else _retag(headers[index]))
        elif op is Mutation.DROP_HEADER:
            del headers[index]
        elif op is Mutation.HUGE_VALUE:
            name, colon, value = headers[index].partition(b":")
            size = rng.choice((1000, 8000, 30000, self.max_size))
            filler = (value.strip() or b"x") * (size // max(1, len(value.strip() or b"x")))
            headers[index] = name + colon + b" " + filler[:size]
        elif op is Mutation.HEADER_CASE:
            headers[index] = _recase(headers[index], rng)
        elif op is Mutation.SHUFFLE:
            rng.shuffle(headers)
        return b"\r\n".join([start, *headers]) + sep + body

    def _content_length(self, data: bytes) -> bytes:
        rng = self.rng
        head, sep, body = data.partition(_HEADER_END)
        choices = [b"0", b"-1", b"-999", str(len(body) + rng.randint(1, 5000)).encode(),
                   str(max(0, len(body) - rng.randint(1, 50))).encode(), b"99999999999",
                   b"1" * 30, b"abc", b"", b"5, 7", b" 12 ", b"0x20"]  # fmt: skip
        value = rng.choice(choices)
        lines = head.split(b"\r\n")
        for i, line in enumerate(lines):
            name = line.split(b":", 1)[0].strip().lower()
            if name in (b"content-length", b"l"):
                lines[i] = line.split(b":", 1)[0] + b": " + value
                if rng.random() < 0.2:  # and a second one that disagrees
                    lines.insert(i + 1, b"Content-Length: " + rng.choice(choices))
                return b"\r\n".join(lines) + sep + body
        return b"\r\n".join([*lines, b"Content-Length: " + value]) + sep + body


def _replace_first_token(data: bytes, index: int, value: bytes) -> bytes:
    first, sep, rest = data.partition(b"\r\n")
    parts = first.split(b" ", 2)
    if len(parts) < 3 or parts[0].startswith(b"SIP/"):
        return data
    parts[index] = value
    return b" ".join(parts) + sep + rest


def _retag(line: bytes) -> bytes:
    """A second copy of a header that disagrees with the first."""
    return re.sub(rb"(tag|branch)=([^;>\s,]*)", rb"\1=\2x", line) + b";dup"


def _recase(line: bytes, rng: random.Random) -> bytes:
    name, colon, value = line.partition(b":")
    if not colon:
        return line
    key = name.strip().lower()
    if key in COMPACT and rng.random() < 0.5:
        return COMPACT[key] + b":" + value
    return bytes(c ^ 0x20 if 65 <= c | 0x20 <= 122 and rng.random() < 0.5 else c
                 for c in name) + b" " * rng.randint(0, 3) + colon + value  # fmt: skip


# -- what comes back, and the answers that end calls -------------------------------------


_COMPACT_NAMES = {v.decode(): k.decode() for k, v in COMPACT.items()}


@dataclass
class Head:
    """A message as far as the fuzzer needs it (the server's messages are well-formed)."""

    first: str
    headers: dict[str, list[str]] = field(default_factory=dict)
    body: bytes = b""

    @property
    def is_response(self) -> bool:
        return self.first.startswith("SIP/2.0 ")

    @property
    def code(self) -> int:
        try:
            return int(self.first.split(" ", 2)[1])
        except (IndexError, ValueError):
            return 0

    @property
    def method(self) -> str:
        return self.first.split(" ", 1)[0]

    def get(self, name: str) -> str:
        values = self.headers.get(name, [])
        return values[0] if values else ""

    @property
    def call_id(self) -> str:
        return self.get("call-id")

    @property
    def cseq(self) -> tuple[int, str]:
        number, _, method = self.get("cseq").partition(" ")
        # the server echoes a mutated CSeq: a number of 30,000 digits is no CSeq (and more
        # than int() converts)
        usable = number.isascii() and number.isdigit() and len(number) <= 10
        return (int(number) if usable else 0), method.strip()

    def tag(self, header: str) -> str:
        match = re.search(r";\s*tag=([^;>\s,]+)", self.get(header))
        return match[1] if match else ""


def parse_head(data: bytes) -> Head | None:
    head, _, body = data.partition(_HEADER_END)
    lines = head.decode("utf8", "replace").split("\r\n")
    if not lines or not lines[0]:
        return None
    parsed = Head(lines[0], body=body)
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            continue
        key = name.strip().lower()
        key = _COMPACT_NAMES.get(key, key)
        parsed.headers.setdefault(key, []).append(value.strip())
    return parsed


def split_frames(data: bytes) -> tuple[list[bytes], bytes]:
    """Whole messages at the front of a TCP stream (by Content-Length), and the rest."""
    frames: list[bytes] = []
    while True:
        data = data.lstrip(b"\r\n")
        end = data.find(_HEADER_END)
        if end < 0:
            return frames, data
        match = re.search(
            rb"\r\n(?:content-length|l)\s*:\s*(\d{1,10})\b", data[:end], re.IGNORECASE
        )
        total = end + 4 + (int(match[1]) if match else 0)
        if len(data) < total:
            return frames, data
        frames.append(data[:total])
        data = data[total:]


def _uri_of(value: str) -> str:
    match = re.search(r"<([^>]*)>", value)
    return (match[1] if match else value.split(";", 1)[0]).strip()


def _message(first: str, headers: Sequence[tuple[str, str]], body: bytes = b"") -> bytes:
    lines = [first, *(f"{k}: {v}" for k, v in headers), f"Content-Length: {len(body)}", "", ""]
    return "\r\n".join(lines).encode() + body


def ack_for(response: Head, via: str, request_uri: str, answer: bytes = b"") -> bytes:
    """The ACK of an INVITE's final response: a new transaction to the Contact for a 2xx,
    part of the INVITE transaction (same Via) otherwise (RFC 3261 13.2.2.4, 17.1.1.3).
    ``answer``: the SDP answer a 2xx carrying an offer (a late offer) must get."""
    number, _ = response.cseq
    uri = _uri_of(response.get("contact")) if response.code < 300 else request_uri
    typed = [("Content-Type", "application/sdp")] if answer else []
    return _message(f"ACK {uri or request_uri} SIP/2.0", [
        ("Via", via), ("Max-Forwards", "70"), ("From", response.get("from")),
        ("To", response.get("to")), ("Call-ID", response.call_id), ("CSeq", f"{number} ACK"),
        *typed,
    ], answer)  # fmt: skip


def in_dialog_request(
    method: str, response: Head, via: str, cseq: int, request_uri: str, body: bytes = b""
) -> bytes:
    """A request inside the dialog a 2xx established, from the caller's side (BYE...)."""
    uri = _uri_of(response.get("contact")) or request_uri
    return _message(f"{method} {uri} SIP/2.0", [
        ("Via", via), ("Max-Forwards", "70"), ("From", response.get("from")),
        ("To", response.get("to")), ("Call-ID", response.call_id), ("CSeq", f"{cseq} {method}"),
    ], body)  # fmt: skip


def cancel_for(response: Head, via: str, request_uri: str) -> bytes:
    """CANCEL of a pending INVITE: its Via, Request-URI, From, To (without the tag the
    1xx added) and Call-ID (RFC 3261 9.1)."""
    number, _ = response.cseq
    to = re.sub(r";\s*tag=[^;>\s,]+", "", response.get("to"))
    return _message(f"CANCEL {request_uri} SIP/2.0", [
        ("Via", via), ("Max-Forwards", "70"), ("From", response.get("from")), ("To", to),
        ("Call-ID", response.call_id), ("CSeq", f"{number} CANCEL"),
    ])  # fmt: skip


def ok_for(request: Head) -> bytes:
    """200 OK to a request the server sent us (a BYE when it hangs up, an OPTIONS)."""
    return _message("SIP/2.0 200 OK", [
        *(("Via", v) for v in request.headers.get("via", [])), ("From", request.get("from")),
        ("To", request.get("to")), ("Call-ID", request.call_id), ("CSeq", request.get("cseq")),
    ])  # fmt: skip
