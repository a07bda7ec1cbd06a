"""Thin helpers over ``sipmessage``: safe parsing, identifiers and response building.

All SIP parsing and serialisation goes through ``sipmessage``; this module only adds the
small pieces every layer needs (branch/tag generation, copying headers into a response,
transport framing checks) so no layer re-implements them.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

import sipmessage.address
import sipmessage.mediatype
import sipmessage.via
from sipmessage import URI, Address, CSeq, Message, Request, Response, Via

__all__ = [
    "BRANCH_MAGIC",
    "REASON_PHRASES",
    "Address",
    "BadRequest",
    "CSeq",
    "Message",
    "Rejection",
    "Request",
    "Response",
    "Via",
    "check_request",
    "create_rejection",
    "create_response",
    "new_branch",
    "new_call_id",
    "new_tag",
    "parse_message",
    "stateless_tag",
    "to_wire",
    "top_via",
]

BRANCH_MAGIC = "z9hG4bK"


def _fresh_exceptions() -> None:
    """sipmessage 0.7.1 raises one shared ValueError instance for every bad Address, Via
    and media type. Each raise adds its frames to that instance's traceback and keeps them
    alive: 30,000 bad From headers from a stranger grew the process by 300 MB, never given
    back. Raising a class creates a new instance each time, so each module-level instance
    is swapped for a ValueError subclass carrying the same message."""
    for module, name in (
        (sipmessage.address, "ADDRESS_EXCEPTION"),
        (sipmessage.via, "VIA_EXCEPTION"),
        (sipmessage.mediatype, "MEDIATYPE_EXCEPTION"),
    ):
        shared = getattr(module, name)
        if isinstance(shared, BaseException):
            message = str(shared)

            def __init__(self: ValueError, *args: object, _message: str = message) -> None:
                ValueError.__init__(self, *(args or (_message,)))

            fresh = type(f"{name.title().replace('_', '')}", (ValueError,), {"__init__": __init__})
            setattr(module, name, fresh)


_fresh_exceptions()

REASON_PHRASES: dict[int, str] = {
    100: "Trying",
    180: "Ringing",
    181: "Call Is Being Forwarded",
    182: "Queued",
    183: "Session Progress",
    200: "OK",
    202: "Accepted",
    300: "Multiple Choices",
    301: "Moved Permanently",
    302: "Moved Temporarily",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    486: "Busy Here",
    483: "Too Many Hops",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    491: "Request Pending",
    500: "Server Internal Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    504: "Server Time-out",
    600: "Busy Everywhere",
    603: "Decline",
}


def new_branch() -> str:
    """Return an RFC 3261 branch parameter (magic cookie + 64 random bits)."""
    return BRANCH_MAGIC + secrets.token_hex(8)


def new_tag() -> str:
    """Return a From/To tag with enough randomness to be globally unique."""
    return secrets.token_hex(6)


def new_call_id(host: str) -> str:
    """Return a Call-ID unique in space and time."""
    return f"{secrets.token_hex(12)}@{host}"


@dataclass(frozen=True)
class Rejection:
    """Why a request cannot be served: the final response's code, a reason phrase that says
    what is wrong (the peer's logs show it), and headers the RFC asks for with that code."""

    code: int
    phrase: str
    headers: tuple[tuple[str, str], ...] = ()


class BadRequest(ValueError):
    """A request that cannot be served but can be answered: its top Via is usable, so a
    final response (``rejection``) reaches the sender instead of it retransmitting."""

    def __init__(self, request: Request, rejection: Rejection) -> None:
        super().__init__(f"{rejection.code} {rejection.phrase}")
        self.request = request
        self.rejection = rejection


_PLACEHOLDER_URI = URI(scheme="sip", host="invalid")
_MAX_CSEQ = 2**31  # RFC 3261 8.1.1.5: the sequence number is below 2**31


def parse_message(data: bytes) -> Request | Response:
    """Parse ``data`` and check the headers every layer relies on.

    Raises ``ValueError`` for anything that is not a usable SIP message, so callers can
    log and drop with a single ``except ValueError``; the subclass ``BadRequest`` marks a
    request that should get a final response (it names which) rather than silence.
    """
    try:
        message = _parse(data)
        top_via(message)  # without it nothing can be answered or matched
        if isinstance(message, Request):
            rejection = check_request(message)
            if rejection is not None:
                raise BadRequest(message, rejection)
            return message
        # Touch the mandatory headers so a malformed one fails here, not deep in a layer.
        _ = message.call_id
        _ = message.cseq
        _ = message.from_address
        _ = message.to_address
        _ = message.via
    except ValueError:
        raise
    except (KeyError, IndexError, TypeError) as exc:
        raise ValueError(f"malformed SIP message: {exc!r}") from exc
    if not 100 <= message.code <= 699:
        raise ValueError(f"SIP status code out of range: {message.code}")
    return message


# A header line continued on the next (RFC 3261 7.3.1: a line starting with whitespace
# belongs to the header above it), which sipmessage does not take.
_FOLDED = re.compile(rb"\r\n[ \t]+")


def _unfold(data: bytes) -> bytes:
    """The header block with every continuation line joined to its header by one space."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if b"\r\n " not in head and b"\r\n\t" not in head:
        return data
    return _FOLDED.sub(b" ", head) + sep + body


def _parse(data: bytes) -> Request | Response:
    """sipmessage's parse, except that folded header lines are joined first and a request
    whose only fault is its Request-URI comes back as ``BadRequest`` (400) instead of an
    unanswerable ValueError."""
    data = _unfold(data)
    try:
        return Message.parse(data)
    except ValueError as exc:
        first, _, rest = data.partition(b"\r\n")
        bits = first.split(b" ", 2)
        if len(bits) != 3 or bits[2] != b"SIP/2.0" or bits[0] == b"SIP/2.0":
            raise
        try:
            URI.parse(bits[1].decode("utf8"))
        except ValueError:
            pass  # the URI is the fault: parse the rest to be able to answer
        else:
            raise  # the fault is elsewhere
        request = Message.parse(
            bits[0] + b" " + str(_PLACEHOLDER_URI).encode() + b" SIP/2.0\r\n" + rest
        )
        if not isinstance(request, Request):
            raise
        top_via(request)
        raise BadRequest(request, Rejection(400, "Invalid Request-URI")) from exc


def check_request(request: Request) -> Rejection | None:
    """The headers every request needs before a transaction or dialog may use it
    (RFC 3261 8.1.1): Via, Call-ID, From, To, a CSeq that names the request's method, and a
    sane Max-Forwards. Pure; None when the request is usable."""
    headers = request.headers
    try:
        _ = request.via
    except ValueError:
        return Rejection(400, "Invalid Via header")
    call_id = headers.get("Call-ID")
    if call_id is None or not call_id.strip():
        return Rejection(400, "Missing Call-ID")
    for name in ("From", "To"):
        value = headers.get(name)
        if value is None:
            return Rejection(400, f"Missing {name} header")
        try:
            Address.parse(value)
        except ValueError:
            return Rejection(400, f"Invalid {name} header")
    raw_cseq = headers.get("CSeq")
    if raw_cseq is None:
        return Rejection(400, "Missing CSeq")
    try:
        cseq = CSeq.parse(raw_cseq)
    except ValueError:
        return Rejection(400, "Invalid CSeq")
    if cseq.sequence >= _MAX_CSEQ:
        return Rejection(400, "Invalid CSeq")
    if cseq.method != request.method:
        return Rejection(400, "CSeq method does not match the request")
    max_forwards = headers.get("Max-Forwards")
    if max_forwards is not None and not (
        max_forwards.isascii() and max_forwards.isdigit() and int(max_forwards) <= 255
    ):
        return Rejection(400, "Invalid Max-Forwards")
    return None


def copy_request(request: Request) -> Request:
    """A copy to modify for a follow-up request (digest retry, redirect): every header."""
    copy = Request(request.method, request.uri, body=request.body)
    names = request.headers.keys()  # Headers is not iterable itself
    for name in names:
        for value in request.headers.getlist(name):
            copy.headers.add(name, value)
    return copy


def top_via(message: Message) -> Via:
    """The topmost Via: the first value of the first Via header. ValueError when there is
    none (an empty or garbled first Via header counts as none)."""
    raw = message.headers.getlist("Via")
    vias = Via.parse_many(raw[0]) if raw else []
    if not vias:
        raise ValueError("SIP message has no usable Via header")
    return vias[0]


def stateless_tag(request: Request) -> str:
    """A To tag that is the same for every retransmission of ``request``, so a response
    sent without a transaction still looks like one answer (RFC 3261 8.2.7)."""
    key = "|".join(request.headers.get(name) or "" for name in ("Via", "Call-ID", "From", "CSeq"))
    return hashlib.blake2s(key.encode(), digest_size=6).hexdigest()


def create_rejection(request: Request, rejection: Rejection) -> Response:
    """The final response a stateless refusal sends: ``rejection`` with a stable To tag."""
    response = create_response(
        request, rejection.code, rejection.phrase, to_tag=stateless_tag(request)
    )
    for name, value in rejection.headers:
        response.headers.set(name, value)
    return response


def create_response(
    request: Request,
    code: int,
    phrase: str | None = None,
    *,
    to_tag: str | None = None,
    body: bytes = b"",
    content_type: str | None = None,
) -> Response:
    """Build a response that copies Via, From, To, Call-ID and CSeq from ``request``.

    ``to_tag`` is added to the To header when the request's To has none (RFC 3261 8.2.6.2).
    Headers the request lacks or garbled are copied as they are or left out, so a request
    refused for a broken header can still be answered.
    """
    response = Response(code, phrase or REASON_PHRASES.get(code, "Unknown"))
    headers = request.headers
    response.headers.setlist("Via", list(headers.getlist("Via")))
    for name in ("From", "To", "Call-ID", "CSeq"):
        value = headers.get(name)
        if value is None:
            continue
        if name == "To" and to_tag is not None:
            value = _with_tag(value, to_tag)
        response.headers.set(name, value)
    if request.method == "INVITE" and 101 <= code < 300:
        record_route = request.headers.getlist("Record-Route")
        if record_route:
            response.headers.setlist("Record-Route", record_route)
    if content_type is not None:
        response.headers.set("Content-Type", content_type)
    response.body = body
    response.content_length = len(body)
    return response


def _with_tag(to: str, tag: str) -> str:
    try:
        address = Address.parse(to)
    except ValueError:
        return to
    if "tag" in address.parameters:
        return to
    return str(
        Address(uri=address.uri, name=address.name, parameters=address.parameters.replace(tag=tag))
    )


def to_wire(message: Request | Response) -> bytes:
    """Serialise ``message`` as it goes on the wire, Content-Length fixed to the body.

    Kept by lingering transactions instead of the parsed message: a retransmission needs
    the bytes, and the bytes are one object to the cyclic collector instead of dozens.
    """
    message.content_length = len(message.body)
    return bytes(message)
