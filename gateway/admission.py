"""Who may start a call with us, and with what: trusted carrier addresses, optional digest,
flood limits, and an INVITE we can actually serve.

A hotline number is an open door to the escalation engine, so an INVITE is admitted only
from the addresses of a configured trunk (and, when that trunk has credentials, only after
a digest challenge); others get 403, before anything else is spent on them (not even a
flood budget). A trusted source sending new INVITEs faster than its budget gets 503 with
Retry-After. An admitted INVITE must then pass `check_new_invite` before a call or a media
port exists for it. Refusals are reported through `RefusalAggregator`, one line per source
and interval however hard a source pushes. Pure logic: the gateway feeds requests and
times in and sends whatever response the decision names.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from sipmessage import AuthChallenge, Request

from gateway.media.sdp import create_answer
from gateway.media.srtp import KEY_SALT_LENGTH, CryptoAttribute, SrtpMode
from gateway.sip.auth import DigestServer
from gateway.sip.message import Rejection, check_request
from gateway.sip.registration import ContactBindings
from gateway.sip.reliable import OPTION_100REL
from gateway.sip.session_timer import OPTION_TIMER

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class TrustedTrunk:
    """A carrier allowed to send us calls: its addresses and, optionally, a digest login."""

    name: str
    networks: tuple[Network, ...]
    users: Mapping[str, str] = field(default_factory=dict)  # username -> password
    realm: str = "ackline"

    @classmethod
    def parse(cls, name: str, sources: Sequence[str], **kwargs: object) -> TrustedTrunk:
        """`sources` are addresses or CIDR networks; a bad one is a ValueError naming it."""
        networks = []
        for source in sources:
            try:
                networks.append(ipaddress.ip_network(source.strip(), strict=False))
            except ValueError:
                raise ValueError(
                    f"trunk {name!r}: {source!r} is not an address or network"
                ) from None
        if not networks:
            raise ValueError(f"trunk {name!r}: no trusted source addresses")
        return cls(name, tuple(networks), **kwargs)  # type: ignore[arg-type]


class RefusalReason(enum.StrEnum):
    """Why a new INVITE was turned away (the audit's and the logs' ``reason``)."""

    UNTRUSTED_SOURCE = "untrusted_source"
    INVITE_FLOOD = "invite_flood"
    AUTHENTICATION_REQUIRED = "authentication_required"
    STALE_NONCE = "stale_nonce"
    MALFORMED_REQUEST = "malformed_request"  # check_new_invite said no
    NO_HANDLER = "no_handler"  # nothing answers calls here
    SHUTTING_DOWN = "shutting_down"
    TOO_MANY_CALLS = "too_many_calls"  # GatewayConfig.max_inbound_calls in progress
    NO_RTP_PORT = "no_rtp_port"  # every port of GatewayConfig.rtp_ports is taken


@dataclass(frozen=True)
class Decision:
    """What to do with one INVITE: admit it, or answer `code` (403, 503, 401/407)."""

    admitted: bool
    trunk: str | None = None
    code: int = 0
    reason: str = ""
    retry_after: int | None = None
    challenge: AuthChallenge | None = None
    challenge_header: str | None = None
    username: str | None = None


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated


class InboundGuard:
    """Admission control for new INVITEs (in-dialog requests never come here).

    `trunks` empty means no ACL: every source is trusted (a lab or a PBX on loopback).
    `rate`/`burst` bound new INVITEs per source address, trusted or not. `bindings` are
    the contacts we registered: an INVITE for one of them from its registrar is that
    trunk's call, whatever the ACL says (see `ContactBindings`).
    """

    def __init__(
        self,
        trunks: Sequence[TrustedTrunk] = (),
        *,
        rate: float = 10.0,
        burst: int = 20,
        max_sources: int = 10_000,
        bindings: ContactBindings | None = None,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.trunks = list(trunks)
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._digest = {t.name: DigestServer(t.realm, t.users) for t in self.trunks if t.users}
        self.bindings = bindings

    def trunk_for(self, host: str) -> TrustedTrunk | None:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return None
        for trunk in self.trunks:
            if any(address in net for net in trunk.networks):
                return trunk
        return None

    def check(self, request: Request, source_host: str, now: float) -> Decision:
        """ACL, then the flood budget (trusted sources only: an untrusted one costs no
        memory), then digest. A call to a registered contact from its registrar skips
        the ACL and digest (the registrar authenticated us, it does not answer challenges)
        but not the flood budget."""
        registered = (
            self.bindings.trunk_for(request.uri.user, source_host, now)
            if self.bindings is not None
            else None
        )
        if registered is not None:
            if not self._take(source_host, now):
                return Decision(
                    False, registered, 503, RefusalReason.INVITE_FLOOD,
                    retry_after=self._retry_after(),
                )  # fmt: skip
            return Decision(True, registered)
        trunk = self.trunk_for(source_host) if self.trunks else None
        if self.trunks and trunk is None:
            return Decision(False, code=403, reason=RefusalReason.UNTRUSTED_SOURCE)
        name = trunk.name if trunk else None
        if not self._take(source_host, now):
            return Decision(
                False, name, 503, RefusalReason.INVITE_FLOOD, retry_after=self._retry_after()
            )
        digest = self._digest.get(name or "")
        if digest is None:
            return Decision(True, name)
        user = digest.verify(request, now=now)
        if user is not None:
            return Decision(True, name, username=user)
        stale = digest.is_stale(request, now)
        return Decision(
            False,
            name,
            digest.status_code,
            RefusalReason.STALE_NONCE if stale else RefusalReason.AUTHENTICATION_REQUIRED,
            challenge=digest.challenge(now, stale=stale),
            challenge_header=digest.challenge_header,
        )

    def _retry_after(self) -> int:
        return max(1, round(1 / self.rate))

    def _take(self, source: str, now: float) -> bool:
        """Token bucket per source address; the least recently seen sources are forgotten."""
        bucket = self._buckets.get(source)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now)
            self._buckets[source] = bucket
            while len(self._buckets) > self.max_sources:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(source)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True


# -- can we serve this INVITE? ---------------------------------------------------------------

# SIP extensions (option tags) we implement: a Require naming any other gets 420.
SUPPORTED_OPTIONS: frozenset[str] = frozenset({OPTION_100REL, OPTION_TIMER})
_SDP = "application/sdp"


def check_new_invite(
    request: Request, *, secure: bool = False, srtp: SrtpMode = SrtpMode.OFF
) -> Rejection | None:
    """Everything a new INVITE must satisfy before a call or a media port is spent on it.

    Pure and in RFC 3261 8.2 order: the headers every request needs (`check_request`), the
    Request-URI (416 for schemes other than sip, and for sips unless it came over TLS:
    ``secure``), Max-Forwards (483 at 0), a From tag, one
    Contact and a Record-Route to build the dialog from, Require (420), the body's type and
    encoding (415)
    and finally the SDP offer (488 when no stream we can answer is in it, under the
    ``srtp`` mode the call would have). None means the INVITE can be answered.
    """
    rejection = check_request(request)
    if rejection is not None:
        return rejection
    uri = request.uri
    if uri.scheme not in ("sip", "sips") or (uri.scheme == "sips" and not secure):
        return Rejection(416, "Unsupported URI Scheme")
    if not uri.host or (uri.port is not None and not 0 < uri.port < 65536):
        return Rejection(400, "Invalid Request-URI")
    if request.max_forwards == 0:
        return Rejection(483, "Too Many Hops")
    if not request.from_address.parameters.get("tag"):
        return Rejection(400, "Missing From tag")
    try:
        contacts = request.contact
    except ValueError:
        return Rejection(400, "Invalid Contact")
    if len(contacts) != 1:
        return Rejection(400, "Missing Contact" if not contacts else "More than one Contact")
    contact = contacts[0].uri
    if contact.scheme not in ("sip", "sips") or not contact.host:
        return Rejection(400, "Invalid Contact")
    try:
        _ = request.record_route  # the dialog's route set is built from it
    except ValueError:
        return Rejection(400, "Invalid Record-Route")
    unsupported = [tag for tag in request.require if tag.lower() not in SUPPORTED_OPTIONS]
    if unsupported:
        return Rejection(420, "Bad Extension", (("Unsupported", ", ".join(unsupported)),))
    return _check_body(request, srtp)


# Stands in for the call's own key when screening an offer; never sent.
_SCREENING_KEY = CryptoAttribute(1, bytes(KEY_SALT_LENGTH))


def _check_body(request: Request, srtp: SrtpMode) -> Rejection | None:
    encoding = request.headers.get("Content-Encoding")
    if encoding is not None and encoding.strip().lower() not in ("", "identity"):
        return Rejection(415, "Unsupported Content-Encoding", (("Accept-Encoding", "identity"),))
    if not request.body:
        return None  # late offer: we offer in the 200, the ACK answers
    content_type = request.headers.get("Content-Type")
    if content_type is None:
        return Rejection(400, "Missing Content-Type")
    if content_type.split(";", 1)[0].strip().lower() != _SDP:
        return Rejection(415, "Unsupported Media Type", (("Accept", _SDP),))
    try:
        create_answer(  # the same negotiation the call will run
            request.body,
            "127.0.0.1",
            9,
            crypto=None if srtp is SrtpMode.OFF else _SCREENING_KEY,
            srtp_required=srtp is SrtpMode.REQUIRED,
        )
    except ValueError as exc:
        return Rejection(488, f"Not Acceptable Here ({_phrase_safe(str(exc))})")
    return None


def _phrase_safe(text: str, limit: int = 80) -> str:
    """Printable ASCII only: the text ends up in a reason phrase on the wire."""
    cleaned = "".join(ch if " " <= ch <= "~" else "?" for ch in text)
    return cleaned[:limit]


# -- reporting refusals without flooding ---------------------------------------------------


OVERFLOW_SOURCE = "*"  # the folded entry of sources beyond the table's size


@dataclass(frozen=True)
class RefusalReport:
    """One audit (and log) line about refused INVITEs from one source.

    The first refusal of an interval is reported at once (``first``, ``count`` 1, with the
    request's details); the later ones of that interval become one line with their
    ``count`` when it closes. ``source`` is ``OVERFLOW_SOURCE`` for sources folded
    together because too many were refusing at once.
    """

    source: str
    code: int
    reason: str
    count: int
    first: bool
    since: float  # when the interval opened (the aggregator's clock)
    trunk: str | None = None
    caller: str | None = None
    dialed: str | None = None
    call_id: str | None = None


@dataclass
class _Window:
    since: float
    reason: str
    trunk: str | None
    suppressed: int = 0


class RefusalAggregator:
    """Turns refusals into `RefusalReport`s: O(sources per interval) lines, bounded memory.

    Windows are keyed by (source, code) and kept in opening order, which is also closing
    order, so closing the due ones never scans the table. At most ``max_sources`` are open;
    a refusal from a further source goes to the overflow window of its code.
    """

    def __init__(self, interval: float = 60.0, max_sources: int = 1024) -> None:
        if interval <= 0 or max_sources < 1:
            raise ValueError("interval must be positive and max_sources at least 1")
        self.interval = interval
        self.max_sources = max_sources
        self._windows: dict[tuple[str, int], _Window] = {}

    def __len__(self) -> int:
        return len(self._windows)

    def add(
        self,
        source: str,
        code: int,
        reason: str,
        now: float,
        *,
        trunk: str | None = None,
        caller: str | None = None,
        dialed: str | None = None,
        call_id: str | None = None,
    ) -> list[RefusalReport]:
        """Record one refusal; returns the reports to write now (closed windows first).
        The request's details only go into a first report (the caller may also add them
        to it afterwards, to work them out for first reports alone)."""
        reports = self.due(now)
        key = (source, code)
        if key not in self._windows and len(self._windows) >= self.max_sources:
            key = (OVERFLOW_SOURCE, code)
        window = self._windows.get(key)
        if window is not None:
            window.suppressed += 1
            return reports
        self._windows[key] = _Window(now, reason, trunk)
        reports.append(
            RefusalReport(key[0], code, reason, 1, True, now, trunk, caller, dialed, call_id)
        )
        return reports

    def due(self, now: float) -> list[RefusalReport]:
        """Close the windows whose interval has passed at ``now``."""
        reports: list[RefusalReport] = []
        while self._windows:
            key, window = next(iter(self._windows.items()))
            if now < window.since + self.interval:
                break
            del self._windows[key]
            if window.suppressed:
                reports.append(self._summary(key, window))
        return reports

    def flush(self) -> list[RefusalReport]:
        """Close every window (shutdown): nothing counted is left unreported."""
        reports = [self._summary(k, w) for k, w in self._windows.items() if w.suppressed]
        self._windows.clear()
        return reports

    def next_due(self) -> float | None:
        """When the oldest open window closes, or None when none is open."""
        for window in self._windows.values():
            return window.since + self.interval
        return None

    def _summary(self, key: tuple[str, int], window: _Window) -> RefusalReport:
        source, code = key
        return RefusalReport(
            source, code, window.reason, window.suppressed, False, window.since, window.trunk
        )
