"""Thin helpers over ``sipmessage``: safe parsing, identifiers and response building.

All SIP parsing and serialisation goes through ``sipmessage``; this module only adds the
small pieces every layer needs (branch/tag generation, copying headers into a response,
transport framing checks) so no layer re-implements them.
"""

from __future__ import annotations

import secrets

from sipmessage import Address, CSeq, Message, Request, Response, Via

__all__ = [
    "BRANCH_MAGIC",
    "REASON_PHRASES",
    "Address",
    "CSeq",
    "Message",
    "Request",
    "Response",
    "Via",
    "create_response",
    "new_branch",
    "new_call_id",
    "new_tag",
    "parse_message",
    "top_via",
    "validate_request",
]

BRANCH_MAGIC = "z9hG4bK"

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
    420: "Bad Extension",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    486: "Busy Here",
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


def parse_message(data: bytes) -> Request | Response:
    """Parse ``data`` and check the headers every layer relies on.

    Raises ``ValueError`` for anything that is not a usable SIP message, so callers can
    log and drop with a single ``except ValueError``.
    """
    try:
        message = Message.parse(data)
        # Touch the mandatory headers so a malformed one fails here, not deep in a layer.
        _ = message.call_id
        cseq = message.cseq
        _ = message.from_address
        _ = message.to_address
        vias = message.via
    except ValueError:
        raise
    except (KeyError, IndexError, UnicodeDecodeError, TypeError) as exc:
        raise ValueError(f"malformed SIP message: {exc!r}") from exc
    if not vias:
        raise ValueError("SIP message has no Via header")
    if isinstance(message, Request):
        validate_request(message, cseq)
    elif not 100 <= message.code <= 699:
        raise ValueError(f"SIP status code out of range: {message.code}")
    return message


def validate_request(request: Request, cseq: CSeq) -> None:
    """Reject requests whose CSeq method disagrees with the request line."""
    if request.method != "ACK" and cseq.method != request.method:
        raise ValueError("CSeq method does not match request method")
    if request.method == "ACK" and cseq.method != "ACK":
        raise ValueError("ACK must carry CSeq method ACK")


def top_via(message: Message) -> Via:
    """Return the topmost Via; parse_message guarantees there is one."""
    return message.via[0]


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
    """
    response = Response(code, phrase or REASON_PHRASES.get(code, "Unknown"))
    response.headers.setlist("Via", request.headers.getlist("Via"))
    response.headers.set("From", request.headers["From"])
    to = request.to_address
    if to_tag is not None and "tag" not in to.parameters:
        to = Address(uri=to.uri, name=to.name, parameters=to.parameters.replace(tag=to_tag))
    response.to_address = to
    response.headers.set("Call-ID", request.call_id)
    response.headers.set("CSeq", request.headers["CSeq"])
    if request.method == "INVITE" and 101 <= code < 300:
        record_route = request.headers.getlist("Record-Route")
        if record_route:
            response.headers.setlist("Record-Route", record_route)
    if content_type is not None:
        response.headers.set("Content-Type", content_type)
    response.body = body
    response.content_length = len(body)
    return response
