"""Calls: the session layer on top of transactions and dialogs, and the API apps use.

``Gateway.dial`` places an outbound call and returns once it is answered or has failed;
an answered ``Call`` can ``play`` prompts, ``collect`` digits and ``hangup``. Incoming
calls are answered and handed to the ``on_incoming`` hook. Every call ends with a
``CallResult``, within a bound known in advance (`call_time_bound`): ringing is cut by
CANCEL, a peer that never answers the CANCEL is given up after 64*T1, an answered call is
hung up after its maximum duration, and a BYE waits no longer than its transaction.

New INVITEs are screened before anything is spent on them (`Gateway._screen`): refused
ones (untrusted, flood, malformed, shutting down) are answered statelessly and reported
through a `RefusalAggregator`, and a call's task, whatever it raises, ends answered for,
with its media socket closed and its entry gone.

Reliable provisionals (RFC 3262, gateway.sip.reliable) and session timers (RFC 4028,
gateway.sip.session_timer) are sans-IO machines; ``Call`` only feeds them and acts on
what they say (PRACK, retransmit the 180, refresh, BYE on expiry).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, assert_never

import numpy as np
from sipmessage import URI, Address, CSeq, Parameters, Request, Response, Via

from gateway.admission import (
    Decision,
    InboundGuard,
    RefusalAggregator,
    RefusalReason,
    RefusalReport,
    check_new_invite,
)
from gateway.aio import weak_method
from gateway.endpoint import CancelReceived, ServerContext, SipEndpoint
from gateway.media.dtmf import DtmfDigit, DtmfMethod, dtmf_tone, parse_info_dtmf
from gateway.media.pacer import Pacer
from gateway.media.sdp import (
    NegotiatedMedia,
    SdpError,
    SessionDescription,
    create_answer,
    create_offer,
    parse_answer,
)
from gateway.media.session import MediaSession, NoFreeRtpPort
from gateway.media.srtp import CryptoAttribute, SrtpKeys, SrtpMode, SrtpPolicy, SrtpStream
from gateway.metrics import CALL_TASK_FAILURES, count_rejection
from gateway.redirect import (
    FOLLOWED_CODES,
    RedirectDecision,
    RedirectPolicy,
    Redirects,
    RedirectVerdict,
    redirected_invite,
)
from gateway.result import (
    CallOutcome,
    CallResult,
    CallTimes,
    FailureCause,
    ReceivedDigit,
    classify_final,
)
from gateway.sip.auth import Credentials, DigestClient, DigestError
from gateway.sip.dialog import USER_AGENT, Dialog, DialogError
from gateway.sip.message import (
    REASON_PHRASES,
    Rejection,
    copy_request,
    create_rejection,
    create_response,
    new_call_id,
    new_tag,
    stateless_tag,
)
from gateway.sip.reliable import (
    OPTION_100REL,
    Pracked,
    ProvisionalTracker,
    ProvisionalVerdict,
    ReliableProvisional,
    ReliableTimeout,
    new_rseq,
    requires_100rel,
)
from gateway.sip.session_timer import (
    MIN_SE_FLOOR,
    OPTION_TIMER,
    RefreshDue,
    Refresher,
    RefreshMethod,
    SessionExpired,
    SessionExpires,
    SessionTimer,
    SessionTimerSettings,
    negotiate_uac,
    negotiate_uas,
    refresh_method,
    request_headers,
    response_headers,
    retry_interval_after_422,
)
from gateway.sip.transaction import (
    AckReceived,
    ClientInviteTransaction,
    Event,
    ResponseReceived,
    TimerSettings,
    TransactionTimeout,
    TransportFailure,
)
from gateway.tls import DEFAULT_SIPS_PORT, TlsClientSettings, TlsServerSettings
from gateway.transport import Peer, TcpLimits, TransportError

logger = logging.getLogger(__name__)

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, PRACK, UPDATE"
# Extensions we implement (RFC 3262 reliable provisionals, RFC 4028 session timers).
SUPPORTED = f"{OPTION_100REL}, {OPTION_TIMER}"
# A 422's Min-SE above this is not retried: a day between refreshes is no timer at all.
MAX_SESSION_EXPIRES = 86400
SDP = "application/sdp"

Prompt = Any  # prompts.cache.Prompt, np.ndarray of int16 samples, or text to speak
IncomingHandler = Callable[["Call"], Awaitable[None]]


# Name resolution of a dial target gives up after this long (it is part of the call bound).
RESOLVE_TIMEOUT = 5.0
# Retry-After of the 503 a draining gateway answers new INVITEs with.
DRAIN_RETRY_AFTER = 30
# Retry-After of the 503 to an INVITE beyond max_inbound_calls: calls end within minutes.
BUSY_RETRY_AFTER = 10
# stop(): after the drain, how long cancelled call tasks and closing media may take.
STOP_GRACE = 1.0


def _dtmf_method(method: DtmfMethod | str) -> DtmfMethod:
    """A method given as a plain string (a script's or a flow's) is checked once, here."""
    try:
        return DtmfMethod(method)
    except ValueError:
        names = ", ".join(m.value for m in DtmfMethod)
        raise ValueError(f"unknown DTMF method {method!r} (one of {names})") from None


class CallEnded(Exception):
    """The operation cannot continue: the call is over."""


class GatewayShuttingDown(OSError):
    """dial() on a gateway that is draining or stopped (an OSError: retry elsewhere/later)."""


def advertised_address(host: str, advertise: str | None) -> str:
    """The address peers are told (Via, Contact, SDP o=/c=) for a gateway bound to ``host``.

    A wildcard bind (0.0.0.0, ::) says nothing a peer can send to, so it needs
    ``advertise``; an advertised address must be an IP literal, as SDP c= wants one."""
    bound = host.strip("[]")
    if advertise is None or not advertise.strip():
        if _is_unspecified(bound):
            raise ValueError(
                f"binding SIP to {host} needs an address to advertise in Via, Contact and "
                "SDP: pass --advertise ADDR (ACKLINE_SIP_ADVERTISE)"
            )
        return bound
    address = advertise.strip().strip("[]")
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"advertised SIP address {advertise!r} is not an IP address") from None
    if parsed.is_unspecified:
        raise ValueError(f"advertised SIP address {advertise!r} is a wildcard")
    return address


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"  # address SIP and RTP bind to
    # What peers are told in Via, Contact and SDP (a NAT's or container's outside address);
    # None: ``host``, which must then not be a wildcard.
    advertise: str | None = None
    udp_port: int | None = 0  # None disables UDP; 0 picks a free port
    tcp_port: int | None = None
    tls_port: int | None = None  # inbound SIP over TLS; needs ``tls`` (our certificate)
    tls: TlsServerSettings | None = None
    # Inbound SRTP: SRTP offers are answered (and REQUIRED refuses plain RTP) over TLS only,
    # unless the policy allows SDES keys over a cleartext transport.
    srtp: SrtpPolicy = field(default_factory=lambda: SrtpPolicy(SrtpMode.OPTIONAL))
    rtp_ports: tuple[int, int] = (20000, 30000)  # RTP binds even ports inside, inclusive
    timers: TimerSettings = field(default_factory=TimerSettings)
    caller: str = "ackline"  # user part of our From
    caller_name: str = "ackline"
    answer_ring_ms: int = 0  # inbound: ring this long before answering
    # Answered calls are hung up (BYE) after this; dial(max_duration=...) and
    # Call.set_max_duration override it per call.
    max_call_duration: float = 3600.0
    drain_timeout: float = 5.0  # stop(): how long hung-up calls may take to end
    tcp_limits: TcpLimits = field(default_factory=TcpLimits)
    refusal_report_interval: float = 60.0  # refusals per source: one line per interval
    refusal_report_sources: int = 1024  # sources tracked at once; more are folded
    # Inbound calls at once; more get 503 with Retry-After before any media port is spent
    # (each holds an RTP socket and a task until it ends, up to max_call_duration).
    max_inbound_calls: int = 500
    # Received audio each call keeps for Call.media.received_audio() (inspection, tests).
    # Off by default: at 8 KB/s it was most of a call's memory (60 s, ~600 KB), and
    # recording and answering-machine detection take the audio live from listeners.
    media_history_seconds: float = 0.0
    # Outgoing RTP from the native sender thread (gateway.media.native) when it is built;
    # False keeps every call on the Python pacer (comparisons, diagnosis).
    media_native_send: bool = True
    # RFC 4028 session timers: the interval our INVITEs ask for (trunks may override it,
    # see carriers.trunk) and the smallest we accept from callers (422 below it).
    session_expires: int = 1800
    min_se: int = MIN_SE_FLOOR
    # The lowest either of the two may be set to. RFC 4028 says 90 s; lower it only in a
    # lab (a test of refreshes that must not take minutes), never towards a real network.
    min_session_expires: int = MIN_SE_FLOOR

    def __post_init__(self) -> None:
        if self.max_call_duration <= 0 or self.drain_timeout < 0:
            raise ValueError("max_call_duration must be positive and drain_timeout not negative")
        if self.max_inbound_calls < 1:
            raise ValueError("max_inbound_calls must be at least 1")
        if self.tls_port is not None and self.tls is None:
            raise ValueError("tls_port needs tls: the certificate and key to listen with")
        if self.media_history_seconds < 0:
            raise ValueError("media_history_seconds must not be negative")
        self.session_timer  # noqa: B018 - raises ValueError for an interval below the floor
        advertised_address(self.host, self.advertise)

    @property
    def session_timer(self) -> SessionTimerSettings:
        """Session timer settings for inbound calls and dials that bring none."""
        return SessionTimerSettings(
            self.session_expires, self.min_se, floor=self.min_session_expires
        )

    @property
    def advertised_host(self) -> str:
        """The address in our Via, Contact, SDP and Call-IDs."""
        return advertised_address(self.host, self.advertise)


def call_time_bound(
    ring_timeout: float, max_duration: float, timers: TimerSettings | None = None
) -> float:
    """The longest an outbound call can take, in seconds, from ``Gateway.dial`` until its
    result is final and ``hangup()`` has returned, whatever the peer does or fails to do.

    Resolving the target (``RESOLVE_TIMEOUT``), then ringing: a call still unanswered at
    ``ring_timeout`` is cancelled, and a peer whose provisional response came as late as
    timer B and which then never answers the CANCEL is given up 64*T1 later (RFC 3261
    9.1), hence twice timer B; then ``max_duration`` after the answer, and timer F for the
    BYE. An inbound call is shorter (ring time + 64*T1 for the ACK + the same tail, and
    64*T1 for the PRACK when the caller requires 100rel). A 422 retry (RFC 4028) and
    PRACKs (RFC 3262) happen within ``ring_timeout``; a session timer only ever ends a
    call sooner.
    Callers keeping their own deadline (a lease, a job timeout) should use this one.
    """
    if ring_timeout < 0 or max_duration < 0:
        raise ValueError("ring_timeout and max_duration must not be negative")
    t = timers or TimerSettings()
    return RESOLVE_TIMEOUT + ring_timeout + 2 * t.timer_b + max_duration + t.timer_f


def parse_target(target: str) -> URI:
    """Parse what a user typed as a call target into a SIP URI, with a clear error."""
    text = target.strip()
    if not text:
        raise ValueError("empty call target")
    if not text.startswith(("sip:", "sips:")):
        if text.startswith("tel:") or text.lstrip("+").replace(" ", "").isdigit():
            raise ValueError(
                f"{target!r} is a phone number; dial a SIP URI such as sip:+15550100@127.0.0.1:5090"
            )
        text = "sip:" + text
    try:
        uri = URI.parse(text)
    except ValueError:
        raise ValueError(f"invalid SIP URI: {target!r}") from None
    if not uri.host:
        raise ValueError(f"SIP URI has no host: {target!r}")
    if uri.port is not None and not 0 < uri.port < 65536:
        raise ValueError(f"port out of range in {target!r}")
    target_transport(uri)
    return uri


TRANSPORTS = ("udp", "tcp", "tls")


def target_transport(uri: URI, transport: str | None = None) -> str:
    """The transport for ``uri``: the one asked for, else its ``transport`` parameter, else
    TLS for ``sips:`` and UDP otherwise. A ``sips:`` URI is only ever reached over TLS
    (RFC 3261 26.2), so asking for anything else is an error rather than a downgrade."""
    kind = (transport or uri.parameters.get("transport") or "").lower()
    if not kind:
        kind = "tls" if uri.scheme == "sips" else "udp"
    if kind not in TRANSPORTS:
        raise ValueError(f"unsupported transport {kind!r} (udp, tcp or tls)")
    if uri.scheme == "sips" and kind != "tls":
        raise ValueError(f"a sips: URI is reached over TLS, not {kind}")
    return kind


async def resolve_target(uri: URI, transport: str) -> Peer:
    """Where to send requests for ``uri`` (IP literal or A/AAAA lookup; no SRV yet).

    A lookup that does not finish within ``RESOLVE_TIMEOUT`` is an OSError (retryable),
    an unknown name a ValueError.
    """
    host = uri.host.strip("[]")
    port = uri.port or (DEFAULT_SIPS_PORT if transport == "tls" else 5060)
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except socket.gaierror as exc:
            raise ValueError(f"cannot resolve host {host!r}: {exc}") from None
        except TimeoutError:
            raise OSError(f"resolving {host!r} took over {RESOLVE_TIMEOUT:g} s") from None
        host = str(infos[0][4][0])
    return Peer(transport, host, port)


class Gateway:
    """A SIP user agent that places and answers calls with media."""

    def __init__(
        self,
        config: GatewayConfig | None = None,
        *,
        prompts: Any = None,
        on_incoming: IncomingHandler | None = None,
        on_call_ended: Callable[[CallResult], None] | None = None,
        guard: InboundGuard | None = None,
        on_refused: Callable[[RefusalReport], None] | None = None,
    ) -> None:
        self.config = config or GatewayConfig()
        self.guard = guard  # admission of new inbound INVITEs (ACL, digest, flood limit)
        # Told about refused INVITEs, aggregated: the first from a source at once, the rest
        # of its interval as one report with a count (see RefusalAggregator).
        self.on_refused = on_refused
        self.on_call_ended = on_call_ended
        self.prompts = prompts  # prompts.cache.PromptCache, used when a prompt is text
        self.on_incoming = on_incoming
        self.endpoint = SipEndpoint(
            host=self.config.host,
            advertise=self.config.advertised_host,
            timers=self.config.timers,
            on_request=self._on_request,
            on_stray_response=self._on_stray_response,
            screen=self._screen,
            tcp_limits=self.config.tcp_limits,
        )
        self.pacer = Pacer(ptime_ms=20)
        self.calls: dict[tuple[str, str], Call] = {}
        self.inbound_calls = 0  # in progress, for max_inbound_calls
        self._tasks: set[asyncio.Task[Any]] = set()
        self._media_closing: set[asyncio.Task[None]] = set()
        self._draining = False
        self._refusals = RefusalAggregator(
            self.config.refusal_report_interval, self.config.refusal_report_sources
        )
        self._refusal_timer: asyncio.TimerHandle | None = None
        # The trunk `_screen_invite` admitted the INVITE in hand as (the screen and the
        # dispatch of one request run back to back, without yielding in between).
        self._admitted: tuple[Request, str | None] | None = None

    async def start(self) -> None:
        config = self.config
        await self.endpoint.listen(
            udp_port=config.udp_port,
            tcp_port=config.tcp_port,
            tls_port=config.tls_port,
            tls=config.tls,
        )

    @property
    def draining(self) -> bool:
        """True once drain() or stop() began: new INVITEs get 503, dial() refuses."""
        return self._draining

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop taking calls and hang up every call at once (BYE when answered, CANCEL while
        ringing, 480 to an inbound call not answered yet); new INVITEs get 503 with
        Retry-After from now on. Waits at most ``timeout`` (default
        ``config.drain_timeout``) and returns True when every hang-up finished in time."""
        self._draining = True
        limit = self.config.drain_timeout if timeout is None else timeout
        hangups = [asyncio.ensure_future(call.hangup()) for call in list(self.calls.values())]
        if not hangups:
            return True
        done, pending = await asyncio.wait(hangups, timeout=limit)
        for task in pending:
            task.cancel()
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                logger.warning("hanging up at drain failed: %r", task.exception())
        if pending:
            logger.warning("drain: %d call(s) still ending after %g s", len(pending), limit)
        return not pending

    async def stop(self, timeout: float | None = None) -> None:
        """Drain (at most ``timeout``, default ``config.drain_timeout``), then end what is
        left, close every media socket and the transports regardless: returns within
        ``timeout`` + ``STOP_GRACE`` + 2 s (the transport's own close bound) whatever the
        peers do, usually within ``timeout``."""
        await self.drain(timeout)
        for call in list(self.calls.values()):
            call._abort("gateway stopped")
        self._flush_refusals()
        for task in list(self._tasks):
            task.cancel()
        # Media sockets are closed at once by close(); this waits for their protocols.
        leftovers = [*self._tasks, *self._media_closing]
        if leftovers:
            await asyncio.wait(leftovers, timeout=STOP_GRACE)
        await self.pacer.stop()
        await self.endpoint.close()

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def address(self, transport: str = "udp") -> tuple[str, int]:
        return self.endpoint.transport.local_address(transport)

    def call_time_bound(self, ring_timeout: float, max_duration: float | None = None) -> float:
        """`call_time_bound` with this gateway's timers and default max call duration."""
        duration = self.config.max_call_duration if max_duration is None else max_duration
        return call_time_bound(ring_timeout, duration, self.config.timers)

    async def dial(
        self,
        target: str | URI,
        *,
        credentials: Credentials | None = None,
        ring_timeout: float = 30.0,
        transport: str | None = None,
        caller: str | None = None,
        on_call: Callable[[Call], None] | None = None,
        max_duration: float | None = None,
        redirects: RedirectPolicy | None = None,
        tls: TlsClientSettings | None = None,
        srtp: SrtpPolicy | None = None,
        session_timer: SessionTimerSettings | None = None,
    ) -> Call:
        """Place a call; returns when it is answered or has ended without answer.

        ``call.answered`` tells which; ``call.result`` is final once ``call.ended``, at the
        latest `call_time_bound` after this was called. ``on_call`` receives the call
        before the INVITE goes out, so the application can hang it up (CANCEL) while it is
        still ringing. ``max_duration`` overrides ``config.max_call_duration``. With
        ``redirects`` a 300/301/302 is followed as the same call (gateway.redirect), all
        within ``ring_timeout``; without, a 3xx is final. ``tls`` says how to verify a TLS
        peer (default: the system's CAs and the target's host name). ``srtp`` offers SDES
        SRTP (ValueError when its keys would go over a transport without TLS).
        ``session_timer`` (a trunk's) replaces the gateway's Session-Expires and Min-SE.
        """
        if self._draining:
            raise GatewayShuttingDown("the gateway is shutting down")
        uri = parse_target(target) if isinstance(target, str) else target
        kind = target_transport(uri, transport)
        policy = srtp or SrtpPolicy()
        policy.check(kind)
        peer = await resolve_target(uri, kind)
        call = Call(self, direction="outbound", transport=kind, peer=peer, target=str(uri))
        call._set_srtp_mode(policy.mode_over(kind))
        call._tls = tls
        if session_timer is not None:
            call._st_settings = session_timer
        call.peer = call._with_tls(peer, uri)
        call.sips = uri.scheme == "sips"
        if redirects is not None:
            call._redirects = Redirects.start(redirects, uri)
        if max_duration is not None:
            call.set_max_duration(max_duration)
        if on_call is not None:
            on_call(call)
        try:
            await call._place(uri, credentials, ring_timeout, caller or self.config.caller)
        except asyncio.CancelledError:
            call._abort("dial cancelled", CallOutcome.CANCELLED)  # CANCEL if it rang
            raise
        except Exception as exc:  # no free RTP port, not listening on that transport, a bug
            call._abort(f"dial failed: {exc}")
            raise
        return call

    async def options(
        self,
        target: str | URI,
        *,
        transport: str | None = None,
        tls: TlsClientSettings | None = None,
    ) -> Response | None:
        """Send an out-of-dialog OPTIONS (health probe); None when no answer came."""
        uri = parse_target(target) if isinstance(target, str) else target
        kind = target_transport(uri, transport)
        peer = tls_peer(await resolve_target(uri, kind), uri, tls)
        try:
            await self.endpoint.reach(peer)
        except OSError as exc:
            logger.info("OPTIONS to %s: %s", peer, exc)
            return None
        request = Request("OPTIONS", uri)
        request.via = [self.endpoint.via(kind, peer)]
        request.max_forwards = 70
        local = self.endpoint.contact(kind, self.config.caller, peer=peer)
        request.from_address = Address(uri=local.uri, parameters=Parameters(tag=new_tag()))
        request.to_address = Address(uri=uri)
        request.call_id = new_call_id(self.config.advertised_host)
        request.cseq = CSeq(1, "OPTIONS")
        request.contact = [local]
        request.headers.set("Accept", SDP)
        request.user_agent = USER_AGENT
        request.content_length = 0
        return await self.endpoint.request(request, peer)

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run ``coro`` in the background; its failure is logged once, never left unread."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("background task failed", exc_info=exc)

    def _close_media(self, media: MediaSession) -> None:
        """Release a call's RTP socket in the background; stop() waits for these."""
        task = asyncio.ensure_future(media.close())
        self._media_closing.add(task)
        task.add_done_callback(self._media_closing.discard)

    # -- incoming requests ----------------------------------------------------------

    def _on_request(self, ctx: ServerContext) -> None:
        request = ctx.request
        local_tag = request.to_address.parameters.get("tag")
        call = self.calls.get((request.call_id, local_tag or ""))
        if call is not None:
            call._on_request(ctx)
            return
        if request.method == "ACK":
            return  # ACK for a call we no longer know: nothing to do
        if request.method == "INVITE" and not local_tag:
            # _screen let it through: trusted, within budget, well-formed, and we are open.
            call = Call(
                self,
                direction="inbound",
                transport=ctx.source.transport,
                peer=ctx.source,
                target=str(request.from_address.uri),
            )
            admitted, self._admitted = self._admitted, None
            call.trunk = admitted[1] if admitted is not None and admitted[0] is request else None
            call.sips = request.uri.scheme == "sips" and ctx.source.transport == "tls"
            call._set_srtp_mode(self.config.srtp.mode_over(ctx.source.transport))
            call._take(ctx)
            self.inbound_calls += 1
            self.spawn(call._answer_incoming(ctx))
            return
        # _screen answered everything else that matches no call, without a transaction
        ctx.respond(481)

    def _screen(self, request: Request, source: Peer) -> Response | None:
        """Answer what needs no transaction before one is made: a request that belongs to
        no call of ours and a plain OPTIONS probe get their final answer at once, from
        anyone, keeping nothing (a transaction would hold ~2 KB for 32 s, timer J: a probe
        flood's cost). A new INVITE is decided on before a call or a media port exists
        for it (`_screen_invite`). None lets the request go its usual way."""
        method = request.method
        local_tag = request.to_address.parameters.get("tag")
        if method in ("ACK", "CANCEL"):
            return None  # no answer of their own / matched against the INVITE's transaction
        if local_tag:
            if (request.call_id, local_tag) in self.calls:
                return None
            return create_rejection(request, Rejection(481, "Call/Transaction Does Not Exist"))
        if method == "INVITE":
            return self._screen_invite(request, source)
        if method == "OPTIONS":
            return create_response(request, 200, to_tag=stateless_tag(request))
        if method in ("BYE", "INFO"):
            return create_rejection(request, Rejection(481, "Call/Transaction Does Not Exist"))
        return create_rejection(request, Rejection(501, "Not Implemented"))

    def _screen_invite(self, request: Request, source: Peer) -> Response | None:
        """Decide on a new INVITE: the ACL, the flood budget and digest (``guard``), the
        calls in progress, then `check_new_invite`. A refusal is answered statelessly and
        reported; None lets the INVITE in."""
        if self._draining:
            retry = (("Retry-After", str(DRAIN_RETRY_AFTER)),)
            refusal = Rejection(503, "Service Unavailable (shutting down)", retry)
            return self._refuse(request, source, refusal, RefusalReason.SHUTTING_DOWN)
        if self.on_incoming is None:
            refusal = Rejection(480, "Temporarily Unavailable")
            return self._refuse(request, source, refusal, RefusalReason.NO_HANDLER)
        trunk: str | None = None
        if self.guard is not None:
            now = asyncio.get_running_loop().time()
            decision = self.guard.check(request, source.host, now)
            if not decision.admitted:
                return self._refuse(
                    request, source, _rejection_of(decision), decision.reason, decision.trunk
                )
            trunk = decision.trunk
        if self.inbound_calls >= self.config.max_inbound_calls:
            retry = (("Retry-After", str(BUSY_RETRY_AFTER)),)
            refusal = Rejection(503, "Service Unavailable (too many calls)", retry)
            return self._refuse(request, source, refusal, RefusalReason.TOO_MANY_CALLS, trunk)
        srtp = self.config.srtp
        if srtp.mode is SrtpMode.REQUIRED and srtp.mode_over(source.transport) is SrtpMode.OFF:
            refusal = Rejection(488, "Not Acceptable Here (SRTP required: call over TLS)")
            return self._refuse(request, source, refusal, RefusalReason.MALFORMED_REQUEST, trunk)
        rejection = check_new_invite(
            request, secure=source.transport == "tls", srtp=srtp.mode_over(source.transport)
        )
        if rejection is not None:
            return self._refuse(request, source, rejection, RefusalReason.MALFORMED_REQUEST, trunk)
        self._admitted = (request, trunk)
        return None

    def _refuse(
        self,
        request: Request,
        source: Peer,
        rejection: Rejection,
        reason: str,
        trunk: str | None = None,
    ) -> Response:
        """Count and report one refused INVITE; returns the stateless answer to send."""
        count_rejection(rejection.code)
        now = asyncio.get_running_loop().time()
        reports = self._refusals.add(source.host, rejection.code, reason, now, trunk=trunk)
        # Only a first report carries the request's details: worked out for it alone, as
        # the rest of a flood is merely counted.
        reports = [
            dataclasses.replace(
                report,
                caller=str(request.from_address.uri),
                dialed=request.uri.user or str(request.uri),
                call_id=request.call_id,
            )
            if report.first
            else report
            for report in reports
        ]
        self._report_refusals(reports)
        self._arm_refusal_flush()
        return create_rejection(request, rejection)

    def _report_refusals(self, reports: list[RefusalReport]) -> None:
        for report in reports:
            if report.first:
                logger.info(
                    "refused INVITE from %s: %s %s", report.source, report.code, report.reason
                )
            else:
                logger.info(
                    "refused %d more INVITEs from %s since %.0f s ago: %s %s",
                    report.count,
                    report.source,
                    asyncio.get_running_loop().time() - report.since,
                    report.code,
                    report.reason,
                )
            if self.on_refused is not None:
                try:
                    self.on_refused(report)
                except Exception:
                    logger.exception("on_refused hook failed")

    def _arm_refusal_flush(self) -> None:
        """Close due refusal intervals on time even when their source went quiet."""
        if self._refusal_timer is not None:
            return
        due = self._refusals.next_due()
        if due is not None:
            loop = asyncio.get_running_loop()
            self._refusal_timer = loop.call_at(due, self._on_refusal_timer)

    def _on_refusal_timer(self) -> None:
        self._refusal_timer = None
        self._report_refusals(self._refusals.due(asyncio.get_running_loop().time()))
        self._arm_refusal_flush()

    def _flush_refusals(self) -> None:
        if self._refusal_timer is not None:
            self._refusal_timer.cancel()
            self._refusal_timer = None
        self._report_refusals(self._refusals.flush())

    def _on_stray_response(self, response: Response, source: Peer) -> None:
        """A 2xx retransmission after the INVITE transaction ended: re-ACK it."""
        if response.code >= 300 or response.cseq.method != "INVITE":
            return
        local_tag = response.from_address.parameters.get("tag") or ""
        call = self.calls.get((response.call_id, local_tag))
        if call is not None:
            call._on_stray_2xx(response)


def tls_peer(peer: Peer, uri: URI, tls: TlsClientSettings | None) -> Peer:
    """``peer`` carrying the TLS settings to verify it with; the name checked against its
    certificate is ``tls.server_name``, else the URI's host (the peer's host is already an
    address by now)."""
    if peer.transport != "tls":
        return peer
    settings = tls or TlsClientSettings()
    name = settings.server_name or uri.host.strip("[]")
    return dataclasses.replace(peer, tls=dataclasses.replace(settings, server_name=name))


def _rejection_of(decision: Decision) -> Rejection:
    """The response a guard decision names, with its Retry-After or challenge."""
    headers: list[tuple[str, str]] = []
    if decision.retry_after is not None:
        headers.append(("Retry-After", str(decision.retry_after)))
    if decision.challenge is not None and decision.challenge_header is not None:
        headers.append((decision.challenge_header, str(decision.challenge)))
    return Rejection(decision.code, REASON_PHRASES.get(decision.code, "Refused"), tuple(headers))


class Call:
    """One call leg: SIP dialog plus RTP media."""

    def __init__(
        self, gateway: Gateway, *, direction: str, transport: str, peer: Peer, target: str
    ) -> None:
        self.gateway = gateway
        self.direction = direction
        self.transport = transport
        self.peer = peer
        self.target = target
        self.loop = asyncio.get_running_loop()
        self.dialog: Dialog | None = None
        self.media: MediaSession | None = None
        self.answered = False
        self.ended = asyncio.Event()
        self.result: CallResult | None = None
        self.call_id = ""
        self.local_tag = new_tag()
        self._times = CallTimes()
        self._final: asyncio.Future[None] = self.loop.create_future()
        self._invite: Request | None = None
        self._invite_code: int | None = None
        self._invite_reason = ""
        self._ack: Request | None = None
        self._offer: Any = None
        self._sdp_version = 0
        self._sdp_session_id: int | None = None  # kept for every later offer/answer (RFC 3264 §8)
        self._provisional = False
        # Set by the first response to our INVITE, 100 Trying included (carrier failover
        # gives up on a trunk that stays silent: carriers.router).
        self.responded = asyncio.Event()
        self._cancel_reason: str | None = None  # "ring_timeout" | "hangup"
        self._cancel_sent = False
        self._invite_transaction: ClientInviteTransaction | None = None
        self._max_duration = gateway.config.max_call_duration
        self._duration_timer: asyncio.TimerHandle | None = None
        self._digest: DigestClient | None = None
        self._authenticated = False
        self._digits: list[ReceivedDigit] = []
        self._digit_listeners: list[Callable[[ReceivedDigit], None]] = []
        self._pending: deque[str] = deque()
        self._digit_arrived = asyncio.Event()
        self._rfc4733_seen = False
        self._acked = asyncio.Event()
        self._invite_ctx: ServerContext | None = None
        self._digit_task: asyncio.Task[None] | None = None
        self._hangup_by: str | None = None
        self._codec: str | None = None
        self.terminated_by: str | None = None  # terminator digit that ended the last collect
        self.trunk: str | None = None  # inbound: the trunk the guard admitted the call as
        self._redirects: Redirects | None = None  # following 3xx (Gateway.dial(redirects=))
        self.redirect: RedirectDecision | None = None  # the last 3xx's verdict, if any
        self._tls: TlsClientSettings | None = None  # Gateway.dial(tls=)
        self._srtp_mode = SrtpMode.OFF  # what this call offers/accepts (see SrtpPolicy)
        self._crypto: CryptoAttribute | None = None  # our SDES key, one per call
        self._srtp: SrtpStream | None = None
        self._sdp_error = ""
        self.sips = False  # a sips: dialog: our Contact is sips: too (RFC 3261 8.1.1.8)
        # RFC 3262 (100rel): outbound, which reliable 1xx were PRACKed, the early dialogs
        # PRACKs go in, and the last challenge (PRACKs carry credentials too); inbound,
        # our reliable 180 while it waits for its PRACK.
        self._provisionals = ProvisionalTracker()
        self._early_dialogs: dict[str, Dialog] = {}
        self._early_answer = False  # a reliable 1xx carried the SDP answer
        self._challenge: Response | None = None
        self._prack_failure: str | None = None
        self._reliable: ReliableProvisional | None = None
        self._reliable_timer: asyncio.TimerHandle | None = None
        self._reliable_outcome: asyncio.Future[bool] = self.loop.create_future()
        self._remote_cseq = 0  # inbound: the highest CSeq the caller used before the dialog
        # RFC 4028 session timer: what we ask for, the running timer, one 422 retry.
        self._st_settings = gateway.config.session_timer
        self._session_timer: SessionTimer | None = None
        self._session_timer_handle: asyncio.TimerHandle | None = None
        self._session_422_retried = False
        self._local_sdp = b""  # the SDP we last sent, re-sent by session refreshes
        self._refresh_ack: Request | None = None  # ACK for our refresh re-INVITE's 2xx
        self._refresh_method = RefreshMethod.INVITE  # UPDATE once the peer allows it
        self.session_refreshes = 0  # session refreshes that succeeded, either way
        self._session_expired = False
        self._reinviting = False  # our re-INVITE awaits its final response (glare: 491)

    # -- public API ---------------------------------------------------------------

    @property
    def dialed(self) -> str:
        """What the caller dialed (inbound: the user part of the INVITE's Request-URI, e.g.
        the DID +14155550100; outbound: our target), so a hotline can pick the flow."""
        if self._invite_ctx is not None:
            uri = self._invite_ctx.request.uri
            return uri.user or str(uri)
        return self.target

    @property
    def source_host(self) -> str:
        """The address the other side's signalling comes from."""
        return self.peer.host

    @property
    def digits(self) -> str:
        """Every digit received so far, in order, whatever the method."""
        return "".join(d.digit for d in self._digits)

    def add_digit_listener(self, listener: Callable[[ReceivedDigit], None]) -> Callable[[], None]:
        """Hand each digit to ``listener`` as it arrives (after the in-band duplicates of
        out-of-band digits are dropped), besides queueing it for `collect`. Returns a
        function that removes the listener; one that raises is logged and removed."""
        self._digit_listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._digit_listeners.remove(listener)

        return remove

    @property
    def dtmf_method(self) -> DtmfMethod:
        """How `send_digits` should reach this peer: RFC 4733 events when it negotiated
        telephone-event, else SIP INFO."""
        negotiated = self.media.media if self.media is not None else None
        if negotiated and negotiated.telephone_event_pt is not None:
            return DtmfMethod.RFC4733
        return DtmfMethod.SIP_INFO

    async def play(self, prompt: Prompt, *, barge_in: bool = False) -> bool:
        """Play a prompt; returns True if it played to the end.

        With ``barge_in`` a digit stops the prompt (the digit stays queued for collect).
        """
        media = self._require_media()
        pcm = await self._pcm(prompt)
        if barge_in and self._pending:
            return False
        done = media.play(pcm)
        waiters: set[asyncio.Future[Any]] = {done, asyncio.ensure_future(self.ended.wait())}
        digit_waiter: asyncio.Future[Any] | None = None
        if barge_in:
            self._digit_arrived.clear()
            digit_waiter = asyncio.ensure_future(self._digit_arrived.wait())
            waiters.add(digit_waiter)
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                if waiter is not done:
                    waiter.cancel()
        if not done.done():
            media.stop_playback()
            return False
        return not done.cancelled()

    async def collect(
        self, max_digits: int = 1, timeout: float = 5.0, terminators: str = "#"
    ) -> str:
        """Collect up to ``max_digits`` (digits pressed earlier, e.g. during a prompt, count).

        Stops early on a terminator (not included), on timeout, or when the call ends.
        """
        deadline = self.loop.time() + timeout
        collected = ""
        self.terminated_by = None
        while len(collected) < max_digits:
            if not self._pending:
                remaining = deadline - self.loop.time()
                if remaining <= 0 or self.ended.is_set():
                    break
                self._digit_arrived.clear()
                waiter = asyncio.ensure_future(self._digit_arrived.wait())
                ender = asyncio.ensure_future(self.ended.wait())
                try:
                    await asyncio.wait(
                        {waiter, ender}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    waiter.cancel()
                    ender.cancel()
                continue
            digit = self._pending.popleft()
            if digit in terminators:
                self.terminated_by = digit
                break
            collected += digit
        return collected

    async def gather(
        self,
        prompt: Prompt,
        *,
        max_digits: int = 1,
        timeout: float = 30.0,
        terminators: str = "#",
        pause: float = 2.0,
    ) -> str:
        """Speak ``prompt`` and repeat it until ``max_digits`` arrive or ``timeout`` passes."""
        deadline = self.loop.time() + timeout
        collected = ""
        while len(collected) < max_digits and not self.ended.is_set():
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                break
            if not self._pending:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.play(prompt, barge_in=True), remaining)
            remaining = deadline - self.loop.time()
            part = await self.collect(
                max_digits - len(collected), max(0.0, min(pause, remaining)), terminators
            )
            collected += part
            if self.terminated_by is not None:
                break
        return collected

    async def send_digits(
        self, digits: str, *, duration_ms: int = 100, method: DtmfMethod | str = DtmfMethod.RFC4733
    ) -> None:
        """Send DTMF to the far end: RFC 4733 events, SIP INFO, or in-band tones (for peers
        that only listen to the audio)."""
        method = _dtmf_method(method)
        media = self._require_media()
        for digit in digits:
            match method:
                case DtmfMethod.SIP_INFO:
                    await self._send_info_digit(digit, duration_ms)
                case DtmfMethod.INBAND:
                    await media.play(dtmf_tone(digit, duration_ms))
                case DtmfMethod.RFC4733:
                    await media.send_digit(digit, duration_ms)
                case DtmfMethod.TWILIO_GATHER:
                    raise ValueError("twilio_gather names how a digit was heard; it cannot send")
                case unreachable:
                    assert_never(unreachable)
            await asyncio.sleep(0.05)

    async def hangup(self) -> CallResult:
        """End the call politely: BYE when answered, CANCEL while it is ringing, 480 to an
        inbound call not answered yet. Never waits longer than the BYE's transaction
        (timer F) or, while ringing, 64*T1 for the peer to answer the CANCEL."""
        return await self._hang_up("local hangup")

    def set_max_duration(self, seconds: float) -> None:
        """Hang up (BYE) ``seconds`` after the answer, instead of after
        ``GatewayConfig.max_call_duration``; an answered call is re-armed at once."""
        if seconds <= 0:
            raise ValueError("max duration must be positive")
        self._max_duration = seconds
        self._arm_duration_limit()

    @property
    def max_duration(self) -> float:
        return self._max_duration

    @property
    def session_expires(self) -> SessionExpires | None:
        """The negotiated RFC 4028 session timer (interval, refresher) while it runs."""
        timer = self._session_timer
        return None if timer is None or timer.over else timer.expires

    async def _hang_up(self, reason: str) -> CallResult:
        if self.ended.is_set():
            assert self.result is not None
            return self.result
        timers = self.gateway.config.timers
        if self.answered and self.dialog is not None:
            self._hangup_by = "local"
            bye = self.dialog.create_request("BYE", self._via())
            peer = self._dialog_peer()
            self._finish(CallOutcome.ANSWERED, 200, reason)
            response = await self.gateway.endpoint.request(bye, peer)
            if response is None:
                logger.info("call %s: no answer to BYE", self.call_id)
        elif self.direction == "outbound" and not self._final.done():
            self._cancel("hangup")
            await self._await_final(2 * timers.timer_b)
        elif self._invite_ctx is not None and not self._invite_ctx.final_sent:
            self._invite_ctx.respond(480, to_tag=self.local_tag)
            self._finish(CallOutcome.CANCELLED, 480, "hung up before answer")
        if not self.ended.is_set():  # every wait above is bounded; so is this one
            outcome = (
                self._cancel_outcome() if self.direction == "outbound" else CallOutcome.CANCELLED
            )
            self._fail(outcome, None, f"{reason}: no final response")
        assert self.result is not None
        return self.result

    async def wait_ended(self, timeout: float | None = None) -> CallResult:
        await asyncio.wait_for(self.ended.wait(), timeout)
        assert self.result is not None
        return self.result

    # -- outbound ---------------------------------------------------------------------

    async def _place(
        self, uri: URI, credentials: Credentials | None, ring_timeout: float, caller: str
    ) -> None:
        endpoint = self.gateway.endpoint
        config = self.gateway.config
        self.call_id = new_call_id(config.advertised_host)
        rtp_port = await self._open_media()
        self._offer = self._create_offer(rtp_port)
        self._sdp_session_id = self._offer.origin.session_id
        if not await self._connect_first():
            return
        contact = endpoint.contact(self.transport, caller, sips=self.sips, peer=self.peer)
        from_uri = URI(scheme="sip", user=caller, host=contact.uri.host)
        request = Request("INVITE", uri)
        request.via = [self._via()]
        request.max_forwards = 70
        request.from_address = Address(
            uri=from_uri, name=config.caller_name, parameters=Parameters(tag=self.local_tag)
        )
        request.to_address = Address(
            uri=URI(scheme="sip", user=uri.user, host=uri.host, port=uri.port)
        )
        request.call_id = self.call_id
        request.cseq = CSeq(1, "INVITE")
        request.contact = [contact]
        request.headers.set("Allow", ALLOW)
        request.headers.set("Supported", SUPPORTED)
        settings = self._st_settings
        for name, value in request_headers(
            SessionExpires(settings.session_expires), settings.min_se
        ):
            request.headers.set(name, value)
        request.user_agent = USER_AGENT
        request.headers.set("Content-Type", SDP)
        request.body = self._local_sdp = str(self._offer).encode()
        request.content_length = len(request.body)
        if credentials is not None:
            self._digest = DigestClient(credentials)
        self.gateway.calls[(self.call_id, self.local_tag)] = self
        if self._cancel_reason is not None:  # hung up (via on_call) before the INVITE left
            self._fail(CallOutcome.CANCELLED, None, "cancelled before the INVITE was sent")
            return
        if self.gateway.draining:
            self._fail(CallOutcome.FAILED, None, "the gateway is shutting down")
            return
        self._send_invite(request)
        try:
            await asyncio.wait_for(asyncio.shield(self._final), ring_timeout)
        except TimeoutError:
            self._cancel("ring_timeout")
            # The INVITE transaction ends by itself (timer B, or 64*T1 after the CANCEL,
            # which may wait for a provisional as late as timer B); this only backs it up.
            await self._await_final(2 * config.timers.timer_b)
            if not self._final.done():
                self._fail(self._cancel_outcome(), 408, "no final response after CANCEL")

    async def _connect_first(self) -> bool:
        """A stream transport we do not listen on (TLS without a certificate of ours) is
        reached over a connection opened before the INVITE, whose local port our Via and
        Contact name. False, with the call failed for the reason, when it cannot be opened."""
        try:
            await self.gateway.endpoint.reach(self.peer)
        except OSError as exc:
            cause = exc.cause if isinstance(exc, TransportError) else None
            self._fail(
                CallOutcome.FAILED, 503, f"transport error: {exc}",
                failure=cause or FailureCause.CONNECT,
            )  # fmt: skip
            return False
        return True

    async def _await_final(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._final), timeout)

    def _send_invite(self, request: Request) -> None:
        self._invite = request
        # RSeq numbering and early dialogs belong to one INVITE transaction (RFC 3262 3);
        # a retry after 401/407, 422 or a redirect starts them afresh.
        self._provisionals = ProvisionalTracker()
        self._early_dialogs.clear()
        self._early_answer = False
        self._times.start(self.loop.time())
        transaction = self.gateway.endpoint.start_client_transaction(
            request, self.peer, weak_method(self._on_invite_event)
        )
        assert isinstance(transaction, ClientInviteTransaction)
        self._invite_transaction = transaction

    def _on_invite_event(self, event: Event) -> None:
        try:
            self._on_invite_transaction_event(event)
        except Exception:
            logger.exception("call %s: handling an INVITE response failed", self.call_id)
            CALL_TASK_FAILURES.labels(direction=self.direction).inc()
            self._abort()

    def _on_invite_transaction_event(self, event: Event) -> None:
        if isinstance(event, ResponseReceived):
            self._on_invite_response(event.response)
        elif isinstance(event, TransactionTimeout):
            if self._final.done():
                return
            if event.timer == "cancel":
                # RFC 3261 9.1: the peer never answered our CANCEL; the call is over anyway.
                reason = "cancelled: no final response to CANCEL within 64*T1"
                self._fail(self._cancel_outcome(), 408, reason)
            elif self._cancel_reason is not None:
                self._fail(self._cancel_outcome(), 408, f"no response (timer {event.timer})")
            else:
                self._fail(
                    CallOutcome.FAILED, 408, f"no response (timer {event.timer})",
                    failure=FailureCause.NO_RESPONSE,
                )  # fmt: skip
        elif isinstance(event, TransportFailure) and not self._final.done():
            transport = self.gateway.endpoint.transport
            why = transport.connect_error(self.peer) or "peer unreachable"
            cause = transport.connect_failure(self.peer) or FailureCause.CONNECT
            self._fail(CallOutcome.FAILED, 503, f"transport error: {why}", failure=cause)

    def _on_invite_response(self, response: Response) -> None:
        self.responded.set()
        code = response.code
        if code < 200:
            self._on_invite_provisional(response)
            return
        self._times.respond(self.loop.time())
        if code < 300:
            self._on_invite_2xx(response)
            return
        if code in (401, 407) and self._cancel_reason is not None:
            self._fail(self._cancel_outcome(), code, "cancelled while challenged")
            return
        if code in (401, 407) and self._digest is not None and self._invite is not None:
            try:
                retry = self._digest.authorize(self._invite, response)
            except DigestError as exc:
                self._fail(CallOutcome.REJECTED, code, f"authentication failed: {exc}")
                return
            self._authenticated = True
            self._challenge = response
            self._send_invite(retry)
            return
        retry_422 = code == 422 and self._cancel_reason is None and self._invite is not None
        if retry_422 and self._retry_after_422(response):
            return
        if code == 487 and self._cancel_reason is not None:
            self._fail(self._cancel_outcome(), code, "cancelled: " + self._cancel_reason)
            return
        if code in FOLLOWED_CODES and self._redirects is not None:
            self._on_redirect(response)
            return
        self._fail(classify_final(code), code, response.phrase)

    def _on_invite_provisional(self, response: Response) -> None:
        """A 1xx to our INVITE: early media, its PRACK (RFC 3262), a pending CANCEL."""
        code = response.code
        verdict = self._provisionals.receive(response)
        if verdict in (
            ProvisionalVerdict.RETRANSMISSION,
            ProvisionalVerdict.OUT_OF_ORDER,
            ProvisionalVerdict.INVALID,
        ):
            # RFC 3262 4: seen already (its PRACK went out), or the UAS must first
            # resend the one we missed: nothing to process, nothing to acknowledge.
            logger.debug("call %s: %s %s ignored", self.call_id, code, verdict.value)
            return
        self._provisional = True  # any 1xx, 100 included, allows a CANCEL (RFC 3261 9.1)
        if code > 100:
            self._times.respond(self.loop.time())
        if code > 100 and response.body and self.media is not None and self._offer:
            configured = self._configure_from_answer(response.body, early=True)
            if configured and verdict is ProvisionalVerdict.PRACK:
                self._early_answer = True  # the answer: the 2xx may come without SDP
        if verdict is ProvisionalVerdict.PRACK and self._cancel_reason is None:
            self._send_prack(response)
        if self._cancel_reason is not None and not self._cancel_sent:
            self._send_cancel()

    def _retry_after_422(self, response: Response) -> bool:
        """RFC 4028 7.4: INVITE once more, as the same call, with the 422's Min-SE as the
        interval. False (the 422 is final) after one retry or for a Min-SE we refuse."""
        invite = self._invite
        assert invite is not None
        asked = self._st_settings.session_expires
        interval = retry_interval_after_422(response, asked, MAX_SESSION_EXPIRES)
        if self._session_422_retried or interval is None:
            return False
        self._session_422_retried = True
        logger.info("call %s: 422, retrying with Session-Expires %d", self.call_id, interval)
        self._st_settings = dataclasses.replace(
            self._st_settings, session_expires=interval, min_se=interval
        )
        retry = copy_request(invite)
        retry.via = [self._via()]
        retry.cseq = CSeq(invite.cseq.sequence + 1, "INVITE")
        for name, value in request_headers(SessionExpires(interval), interval):
            retry.headers.set(name, value)
        if self._digest is not None and self._challenge is not None:
            retry = self._with_credentials(retry)
        self._send_invite(retry)
        return True

    def _with_credentials(self, request: Request) -> Request:
        """``request`` answering the INVITE's last challenge (a PRACK, a retried INVITE:
        the proxy that challenged the INVITE challenges them too)."""
        assert self._digest is not None
        assert self._challenge is not None
        for name in ("Authorization", "Proxy-Authorization"):
            request.headers.remove(name)
        try:
            return self._digest.with_credentials(request, self._challenge)
        except DigestError as exc:
            logger.info("call %s: no credentials for %s: %s", self.call_id, request.method, exc)
            return request

    def _send_prack(self, response: Response) -> None:
        """RFC 3262 4: acknowledge a reliable provisional in its early dialog."""
        assert self._invite is not None
        tag = response.to_address.parameters.get("tag") or ""
        dialog = self._early_dialogs.get(tag)
        if dialog is None:
            try:
                dialog = Dialog.from_uac_response(self._invite, response)
            except DialogError as exc:
                self._prack_failed(f"no early dialog to PRACK in: {exc}")
                return
            self._early_dialogs[tag] = dialog
        else:
            dialog.refresh_target(response)
        prack = dialog.create_request("PRACK", self._via())
        rseq = (response.headers.get("RSeq") or "").strip()
        prack.headers.set("RAck", f"{rseq} {self._invite.cseq.sequence} INVITE")
        if self._digest is not None and self._challenge is not None:
            prack = self._with_credentials(prack)
        self.gateway.spawn(self._await_prack(prack, self._peer_of(dialog)))

    async def _await_prack(self, prack: Request, peer: Peer) -> None:
        """The PRACK's own outcome: a non-2xx or no answer (its transaction bounds the
        wait) ends the attempt, since the UAS would hold the INVITE forever."""
        response = await self.gateway.endpoint.request(prack, peer)
        if response is not None and response.code < 300:
            return
        why = f"{response.code} {response.phrase}" if response is not None else "no answer"
        self._prack_failed(f"PRACK failed: {why}")

    def _prack_failed(self, reason: str) -> None:
        if self._final.done():
            return  # answered (or over) meanwhile: the call goes on
        logger.info("call %s: %s; cancelling", self.call_id, reason)
        self._prack_failure = reason
        self._cancel(reason)

    def _on_redirect(self, response: Response) -> None:
        """A 3xx (ACKed by its transaction): INVITE the next target, or end the call with
        the reason it may not be followed."""
        assert self._redirects is not None
        try:
            contacts = response.contact
        except ValueError:
            contacts = []
        decision, self._redirects = self._redirects.decide(contacts)
        self.redirect = decision
        code = response.code
        if decision.verdict is not RedirectVerdict.FOLLOW or decision.target is None:
            logger.info("call %s: %s not followed: %s", self.call_id, code, decision.reason)
            outcome = CallOutcome.REJECTED if decision.verdict.refused else CallOutcome.FAILED
            self._fail(outcome, code, f"redirect {decision.verdict.value}: {decision.reason}")
        elif self._cancel_reason is not None or self.gateway.draining:
            self._fail(self._cancel_outcome(), code, "redirected after cancel; not followed")
        else:
            logger.info("call %s: %s, following to %s", self.call_id, code, decision.target)
            # What allowed a CANCEL was the finished INVITE's: the next one earns its own.
            self._provisional = False
            self._cancel_sent = False
            self.gateway.spawn(self._follow_redirect(decision.target))

    async def _follow_redirect(self, target: URI) -> None:
        """INVITE ``target`` as the same call: same dialog identifiers and offer."""
        assert self._invite is not None
        try:
            peer = self._with_tls(await resolve_target(target, self.transport), target)
        except (OSError, ValueError) as exc:
            self._fail(CallOutcome.FAILED, None, f"redirect target unreachable: {exc}")
            return
        if self._final.done() or self._cancel_reason is not None:
            self._fail(self._cancel_outcome(), None, "cancelled while redirecting")
            return
        same_host = (peer.host, peer.port) == (self.peer.host, self.peer.port)
        if not same_host:
            self._digest = None  # our trunk's credentials are not the new host's business
        via = self._via()
        request = redirected_invite(self._invite, target, via, keep_credentials=same_host)
        self.peer = peer
        self._send_invite(request)

    def _on_stray_2xx(self, response: Response) -> None:
        """A 2xx retransmission after its INVITE transaction ended: ACK it again (the
        first INVITE's, or our last session refresh's)."""
        refresh = self._refresh_ack
        if refresh is not None and response.cseq.sequence == refresh.cseq.sequence:
            self.gateway.endpoint.send_stateless(refresh, self._dialog_peer())
        elif self.direction == "outbound":
            self._on_invite_2xx(response)

    def _on_invite_2xx(self, response: Response) -> None:
        endpoint = self.gateway.endpoint
        if self._ack is not None:
            endpoint.send_stateless(self._ack, self._dialog_peer())  # 2xx retransmission
            return
        assert self._invite is not None
        try:
            self.dialog = Dialog.from_uac_response(self._invite, response)
        except DialogError as exc:
            logger.warning("call %s: unusable 2xx: %s", self.call_id, exc)
            self._fail(CallOutcome.FAILED, response.code, f"invalid 2xx: {exc}")
            return
        early = self._early_dialogs.get(self.dialog.remote_tag)
        if early is not None:  # PRACKs went out in this dialog: CSeq goes on from there
            self.dialog.local_cseq = max(self.dialog.local_cseq, early.local_cseq)
        self._ack = self.dialog.create_ack(self._via())
        endpoint.send_stateless(self._ack, self._dialog_peer())
        if self._cancel_reason is not None or self._final.done():
            # Answered after we gave up (CANCEL/200 race): release it straight away.
            bye = self.dialog.create_request("BYE", self._via())
            self.gateway.spawn(endpoint.request(bye, self._dialog_peer()))
            if not self._final.done():
                self._fail(self._cancel_outcome(), 487, "answered after cancel; released")
            return
        answered_early = self._early_answer and not response.body
        if not answered_early and not self._configure_from_answer(response.body, early=False):
            bye = self.dialog.create_request("BYE", self._via())
            self.gateway.spawn(endpoint.request(bye, self._dialog_peer()))
            reason = f"unusable SDP answer: {self._sdp_error}"
            self._fail(CallOutcome.FAILED, response.code, reason)
            return
        self._invite_code = response.code
        self._invite_reason = response.phrase
        self._mark_answered()
        self._refresh_method = refresh_method(response, self._refresh_method)
        expires = negotiate_uac(response)
        if expires is not None:
            self._start_session_timer(expires, local=expires.refresher is Refresher.UAC)
        self._final.set_result(None)

    def _configure_from_answer(self, body: bytes, *, early: bool) -> bool:
        assert self.media is not None
        if not body:
            return early
        try:
            negotiated = parse_answer(body, self._offer)
        except SdpError as exc:
            logger.info("call %s: SDP answer rejected: %s", self.call_id, exc)
            self._sdp_error = str(exc)
            return False
        self._configure_media(negotiated)
        return True

    def _configure_media(self, negotiated: NegotiatedMedia) -> None:
        assert self.media is not None
        self.media.configure(negotiated)
        self._codec = negotiated.codec
        self._apply_srtp(negotiated.srtp)

    def _set_srtp_mode(self, mode: SrtpMode) -> None:
        """Whether this call offers/accepts SRTP; a fresh key when it may."""
        self._srtp_mode = mode
        self._crypto = CryptoAttribute.generate() if mode is not SrtpMode.OFF else None

    def _apply_srtp(self, keys: SrtpKeys | None) -> None:
        """Key the media session as negotiated; unchanged keys keep their libsrtp state
        (rollover counter, replay window) across re-INVITEs."""
        assert self.media is not None
        if keys == (self._srtp.keys if self._srtp is not None else None):
            return
        self._srtp = SrtpStream(keys) if keys is not None else None
        self.media.set_srtp(self._srtp)

    def _create_offer(self, port: int, **kwargs: Any) -> SessionDescription:
        """Our offer (first, late or re-offer), with our SDES key when SRTP may be used."""
        return create_offer(
            self.gateway.config.advertised_host,
            port,
            crypto=self._crypto,
            srtp_required=self._srtp_mode is SrtpMode.REQUIRED,
            **kwargs,
        )

    def _create_answer(
        self, offer: bytes, port: int, **kwargs: Any
    ) -> tuple[SessionDescription, NegotiatedMedia]:
        return create_answer(
            offer,
            self.gateway.config.advertised_host,
            port,
            crypto=self._crypto,
            srtp_required=self._srtp_mode is SrtpMode.REQUIRED,
            **kwargs,
        )

    def _cancel(self, reason: str) -> None:
        if self._cancel_reason is None:
            self._cancel_reason = reason
        if self._provisional and not self._cancel_sent:
            self._send_cancel()

    def _cancel_outcome(self) -> CallOutcome:
        if self._prack_failure is not None:
            return CallOutcome.FAILED
        return (
            CallOutcome.NO_ANSWER
            if self._cancel_reason == "ring_timeout"
            else CallOutcome.CANCELLED
        )

    def _send_cancel(self) -> None:
        """CANCEL matches the INVITE's branch, Call-ID, From, To and CSeq number (§9.1)."""
        invite = self._invite
        assert invite is not None
        self._cancel_sent = True
        cancel = Request("CANCEL", invite.uri)
        cancel.headers.set("Via", invite.headers.getlist("Via")[0])
        cancel.max_forwards = 70
        cancel.headers.set("From", invite.headers["From"])
        cancel.headers.set("To", invite.headers["To"])
        cancel.call_id = invite.call_id
        cancel.cseq = CSeq(invite.cseq.sequence, "CANCEL")
        if invite.headers.getlist("Route"):
            cancel.headers.setlist("Route", invite.headers.getlist("Route"))
        cancel.user_agent = USER_AGENT
        cancel.content_length = 0
        assert self._invite_transaction is not None
        endpoint = self.gateway.endpoint
        self.gateway.spawn(endpoint.cancel(self._invite_transaction, cancel, self.peer))

    # -- inbound --------------------------------------------------------------------

    async def _answer_incoming(self, ctx: ServerContext) -> None:
        """The whole life of an inbound call. Whatever it raises, the call ends answered
        for (500 if nothing final was sent, BYE if answered), its media socket closed and
        its entry gone, with one log line."""
        try:
            await self._run_incoming(ctx)
        except CallEnded:
            pass
        except asyncio.CancelledError:
            self._abort("gateway stopped")
            raise
        except Exception:
            logger.exception("call %s: inbound call failed", self.call_id)
            CALL_TASK_FAILURES.labels(direction=self.direction).inc()
            self._abort()

    def _refuse_without_media(self, ctx: ServerContext, exc: NoFreeRtpPort) -> None:
        """Every RTP port is taken: 503 with Retry-After (ports free up as calls end, and
        another node of the cluster may take the call meanwhile), reported as a refusal."""
        logger.warning("call %s: refused: %s", self.call_id, exc)
        retry = (("Retry-After", str(BUSY_RETRY_AFTER)),)
        rejection = Rejection(503, "Service Unavailable (no free RTP port)", retry)
        ctx.send(self.gateway._refuse(ctx.request, self.peer, rejection, RefusalReason.NO_RTP_PORT))
        self._fail(CallOutcome.FAILED, 503, str(exc))

    def _take(self, ctx: ServerContext) -> None:
        """Own the INVITE at once, before the call's task runs: a CANCEL arriving first
        must find the call (and end it), not a transaction nobody answers for."""
        self._invite_ctx = ctx
        self.call_id = ctx.request.call_id
        self.gateway.calls[(self.call_id, self.local_tag)] = self
        ctx.on_event = weak_method(self._on_server_invite_event)

    async def _run_incoming(self, ctx: ServerContext) -> None:
        request = ctx.request  # passed Gateway._screen: check_new_invite found it usable
        if self.ended.is_set():
            return  # cancelled before this task ran
        ctx.respond(100)
        config = self.gateway.config
        try:
            rtp_port = await self._open_media()
        except NoFreeRtpPort as exc:
            self._refuse_without_media(ctx, exc)
            return
        if request.body:
            answer, negotiated = self._create_answer(request.body, rtp_port)
            self._sdp_session_id = answer.origin.session_id
            self._configure_media(negotiated)
            answer_body = str(answer).encode()
        else:
            # late offer: the answer comes in the ACK
            self._offer = self._create_offer(rtp_port)
            self._sdp_session_id = self._offer.origin.session_id
            answer_body = str(self._offer).encode()
        self._local_sdp = answer_body
        if self._session_rejection(ctx):
            self._fail(CallOutcome.FAILED, 422, "Session-Expires below our Min-SE")
            return
        if requires_100rel(request):
            if not await self._ring_reliably(ctx):
                return
        else:
            ctx.respond(180, to_tag=self.local_tag)
        if config.answer_ring_ms:  # a CANCEL ends the call, and so the ringing, at once
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ended.wait(), config.answer_ring_ms / 1000)
        if ctx.cancelled or self.ended.is_set():
            return
        contact = self._local_contact()
        self.dialog = Dialog.from_uas_request(request, self.local_tag, contact)
        # PRACKs already moved the caller's CSeq on; later requests must be above them.
        self.dialog.remote_cseq = max(self.dialog.remote_cseq or 0, self._remote_cseq)
        ok = create_response(
            request, 200, to_tag=self.local_tag, body=answer_body, content_type=SDP
        )
        ok.contact = [contact]
        ok.headers.set("Allow", ALLOW)
        ok.headers.set("Supported", SUPPORTED)
        ok.user_agent = USER_AGENT
        self._answer_session_timer(request, ok)
        if not ctx.send(ok):  # the INVITE transaction is over: nobody to answer
            self._finish(CallOutcome.CANCELLED, None, "INVITE ended before the answer")
            return
        self._mark_answered()
        if not await self._await_ack(ctx, ok):
            return
        if self.gateway.on_incoming is not None:
            try:
                await self.gateway.on_incoming(self)
            except CallEnded:
                pass
            except Exception:
                logger.exception("incoming call handler failed")
        if not self.ended.is_set():
            await self.hangup()

    async def _await_ack(self, ctx: ServerContext, ok: Response) -> bool:
        """Retransmit the 2xx until the ACK arrives (RFC 3261 §13.3.1.4, RFC 6026); hang up
        after 64*T1 without one, or when the transaction can no longer carry the 2xx."""
        timers = self.gateway.config.timers
        interval = timers.t1
        deadline = self.loop.time() + 64 * timers.t1
        reliable = self.transport != "udp"
        while not self._acked.is_set() and not self.ended.is_set():
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acked.wait(), min(interval, remaining))
            if not self._acked.is_set() and not reliable and not ctx.send(ok):
                break
            interval = min(interval * 2, timers.t2)
        if self._acked.is_set() or self.ended.is_set():
            return not self.ended.is_set()
        logger.info("call %s: no ACK for 2xx, hanging up", self.call_id)
        await self._hang_up("no ACK for the 2xx")
        return False

    def _on_server_invite_event(self, event: Any) -> None:
        if isinstance(event, CancelReceived) and not self.answered:
            if self._invite_ctx is not None:
                self._invite_ctx.respond(487, to_tag=self.local_tag)
            self._finish(CallOutcome.CANCELLED, 487, "caller cancelled")
        elif isinstance(event, AckReceived) and self.answered:
            # An ACK for our 2xx that reused the INVITE's branch (RFC 6026 8.7: the
            # transaction hands it up) is the ACK all the same.
            self._on_ack(event.request)

    # -- in-dialog requests --------------------------------------------------------------

    def _on_request(self, ctx: ServerContext) -> None:
        request = ctx.request
        method = request.method
        if method == "ACK":
            self._on_ack(request)
            return
        if method == "PRACK":
            self._on_prack(ctx)
            return
        dialog = self.dialog
        if dialog is None:
            ctx.respond(481)
            return
        if not dialog.receive_request(request):
            ctx.respond(500, "CSeq out of order")
            return
        if method == "BYE":
            ctx.respond(200)
            self._hangup_by = "remote"
            self._finish(CallOutcome.ANSWERED, self._invite_code or 200, "remote hangup")
        elif method == "INFO":
            self._on_info(ctx)
        elif method == "INVITE":
            self._on_reinvite(ctx)
        elif method == "UPDATE":
            self._on_update(ctx)
        elif method == "OPTIONS":
            ctx.respond(200)
        else:
            ctx.respond(501)

    def _on_ack(self, ack: Request) -> None:
        media = self.media
        if self._offer is not None and ack.body and media is not None:
            self._configure_from_answer(ack.body, early=False)  # late offer: the answer
        self._acked.set()
        if self.direction == "inbound" and media is not None and media.media is None:
            # Our 2xx carried the offer (the INVITE had none) and this ACK brought no
            # usable answer: no media can ever flow, and a flow waiting for its prompt
            # to play would hold the call until its maximum duration (RFC 3261 13.3.1.4).
            self.gateway.spawn(self._hang_up("no SDP answer in the ACK"))

    def _on_info(self, ctx: ServerContext) -> None:
        request = ctx.request
        content_type = request.headers.get("Content-Type", "") or ""
        parsed = parse_info_dtmf(content_type, request.body)
        ctx.respond(200)
        if parsed is not None:
            digit, duration_ms = parsed
            self._on_digit(DtmfDigit(digit, DtmfMethod.SIP_INFO, self.loop.time(), duration_ms))

    def _on_reinvite(self, ctx: ServerContext) -> None:
        """Answer a re-INVITE (hold, resume, session refresh) on the same media session."""
        assert self.dialog is not None
        assert self.media is not None
        request = ctx.request
        if self._reinviting:  # RFC 3261 14.2: both sides re-INVITEd at once
            ctx.respond(491)
            return
        if self._session_rejection(ctx):
            return
        try:
            self.dialog.refresh_target(request)
        except ValueError:  # a garbled Contact: refuse the re-INVITE, keep the call
            ctx.respond(400, "Invalid Contact")
            return
        self._sdp_version += 1
        try:
            if request.body:
                answer, negotiated = self._create_answer(
                    request.body,
                    self.media.local_port,
                    session_id=self._sdp_session_id,
                    version=self._sdp_version,
                )
                self._configure_media(negotiated)
                body = str(answer).encode()
            else:
                self._offer = self._create_offer(
                    self.media.local_port,
                    session_id=self._sdp_session_id,
                    version=self._sdp_version,
                )
                body = str(self._offer).encode()
        except ValueError:  # SdpError, or an odd offer the parser let through
            ctx.respond(488)
            return
        self._local_sdp = body
        ok = create_response(request, 200, body=body, content_type=SDP)
        ok.contact = [self.dialog.contact]
        ok.headers.set("Supported", SUPPORTED)
        self._answer_session_timer(request, ok)
        self._acked.clear()
        if ctx.send(ok):
            self.gateway.spawn(self._await_ack(ctx, ok))

    def _on_update(self, ctx: ServerContext) -> None:
        """UPDATE (RFC 3311), taken as a session refresh: an offer in it is answered on
        the same media session; without one the 200 carries no SDP."""
        assert self.dialog is not None
        assert self.media is not None
        request = ctx.request
        if self._session_rejection(ctx):
            return
        body = b""
        if request.body:
            self._sdp_version += 1
            try:
                answer, negotiated = self._create_answer(
                    request.body,
                    self.media.local_port,
                    session_id=self._sdp_session_id,
                    version=self._sdp_version,
                )
            except ValueError:
                ctx.respond(488)
                return
            self._configure_media(negotiated)
            body = self._local_sdp = str(answer).encode()
        ok = create_response(request, 200, body=body, content_type=SDP if body else None)
        ok.contact = [self.dialog.contact]
        ok.headers.set("Supported", SUPPORTED)
        self._answer_session_timer(request, ok)
        ctx.send(ok)

    def _on_prack(self, ctx: ServerContext) -> None:
        """RFC 3262 3: 200 to the PRACK of our reliable 180, 481 to any other."""
        reliable = self._reliable
        request = ctx.request
        if reliable is None or not reliable.receive(request, self.loop.time()):
            ctx.respond(481)
            return
        self._remote_cseq = max(self._remote_cseq, request.cseq.sequence)
        ctx.respond(200)
        self._pump_reliable()

    # -- reliable provisionals, inbound (RFC 3262) ------------------------------------

    async def _ring_reliably(self, ctx: ServerContext) -> bool:
        """Send 180 with Require: 100rel and wait for its PRACK, retransmitting it (T1,
        doubling) meanwhile; after 64*T1 without one, 500 ends the call (RFC 3262 3).
        True once PRACKed."""
        ringing = create_response(ctx.request, 180, to_tag=self.local_tag)
        ringing.contact = [self._local_contact()]
        ringing.headers.set("Require", OPTION_100REL)
        ringing.headers.set("RSeq", str(new_rseq()))
        ringing.headers.set("Allow", ALLOW)
        self._reliable = ReliableProvisional(ringing, self.gateway.config.timers)
        self._reliable.start(self.loop.time())
        self._pump_reliable()
        if not await self._reliable_outcome:
            if not self.ended.is_set():
                reason = "no PRACK for the reliable 180 within 64*T1"
                ctx.respond(500, "No PRACK received", to_tag=self.local_tag)
                self._fail(CallOutcome.FAILED, 500, reason)
            return False
        return not self.ended.is_set()

    def _pump_reliable(self) -> None:
        reliable = self._reliable
        ctx = self._invite_ctx
        if reliable is None or ctx is None:
            return
        if self._reliable_timer is not None:
            self._reliable_timer.cancel()
            self._reliable_timer = None
        for response in reliable.messages_to_send():
            if not ctx.send(response):  # the INVITE transaction is over (cancelled)
                reliable.done = True
        while (event := reliable.next_event()) is not None:
            if not self._reliable_outcome.done():
                match event:
                    case Pracked():
                        self._reliable_outcome.set_result(True)
                    case ReliableTimeout():
                        self._reliable_outcome.set_result(False)
                    case _:
                        assert_never(event)
        at = reliable.next_timer_at()
        if at is not None and not self.ended.is_set():
            self._reliable_timer = self.loop.call_at(at, self._on_reliable_timer)
        elif reliable.done and not self._reliable_outcome.done():
            self._reliable_outcome.set_result(False)

    def _on_reliable_timer(self) -> None:
        self._reliable_timer = None
        if self._reliable is not None:
            self._reliable.handle_timer(self.loop.time())
        self._pump_reliable()

    def _local_contact(self) -> Address:
        """Our listener, or (a TLS call arriving over the connection we opened to register,
        with no TLS listener) our end of that connection."""
        return self.gateway.endpoint.contact(
            self.transport, self.gateway.config.caller, sips=self.sips, peer=self.peer
        )

    # -- session timers (RFC 4028) ---------------------------------------------------

    def _start_session_timer(self, expires: SessionExpires, *, local: bool) -> None:
        """Run (or restart, after a refresh either way) the session timer; ``local``: we
        are the refresher."""
        now = self.loop.time()
        if self._session_timer is None:
            self._session_timer = SessionTimer(expires, local_refresher=local, now=now)
            logger.info(
                "call %s: session timer %d s, refresher %s",
                self.call_id,
                expires.interval,
                "us" if local else "peer",
            )
        else:
            self._session_timer.refreshed(expires, local_refresher=local, now=now)
            self.session_refreshes += 1
        self._pump_session_timer()

    def _pump_session_timer(self) -> None:
        """Act on the timer's events and re-arm it at its next deadline."""
        timer = self._session_timer
        if self._session_timer_handle is not None:
            self._session_timer_handle.cancel()
            self._session_timer_handle = None
        if timer is None or self.ended.is_set():
            return
        while (event := timer.next_event()) is not None:
            match event:
                case RefreshDue():
                    self.gateway.spawn(self._refresh_session())
                case SessionExpired():
                    reason = event.describe(timer.interval)
                    logger.info("call %s: %s, hanging up", self.call_id, reason)
                    self._session_expired = True
                    self.gateway.spawn(self._hang_up(reason))
                    return
                case _:
                    assert_never(event)
        at = timer.next_timer_at()
        if at is not None:
            self._session_timer_handle = self.loop.call_at(at, self._on_session_timer)

    def _on_session_timer(self) -> None:
        self._session_timer_handle = None
        if self._session_timer is not None:
            self._session_timer.handle_timer(self.loop.time())
        self._pump_session_timer()

    async def _refresh_session(self) -> None:
        """Refresh with UPDATE (no offer) when the peer said it allows it, as RFC 4028 9
        prefers: nothing about the media is renegotiated. Otherwise, or when the peer
        refuses the UPDATE after all (405, 501), with a re-INVITE carrying the SDP we last
        sent, unchanged: every SIP peer must take INVITE."""
        timer = self._session_timer
        if self.dialog is None or timer is None or self.ended.is_set():
            return
        timer.refresh_sent()
        us = Refresher.UAC  # we send the refresh: we are its UAC (RFC 4028 7.4)
        response = await self._send_refresh(self._refresh_method, timer.interval)
        if (
            self._refresh_method is RefreshMethod.UPDATE
            and response is not None
            and response.code in (405, 501)
            and not self.ended.is_set()
        ):
            logger.info("call %s: UPDATE refused (%d); refreshing with re-INVITEs",
                        self.call_id, response.code)  # fmt: skip
            self._refresh_method = RefreshMethod.INVITE
            response = await self._send_refresh(RefreshMethod.INVITE, timer.interval)
        if self.ended.is_set():
            return
        if response is not None and response.code < 300:
            self.dialog.refresh_target(response)
            self._apply_refresh_answer(response.body)
            expires = negotiate_uac(response)
            if expires is None:
                logger.info("call %s: the refresh's 2xx dropped the session timer", self.call_id)
                timer.stop()
            else:
                self.session_refreshes += 1
                timer.refreshed(
                    expires, local_refresher=expires.refresher is us, now=self.loop.time()
                )
        else:
            code = response.code if response is not None else None
            logger.info("call %s: session refresh failed: %s", self.call_id, code)
            timer.refresh_failed(code, self.loop.time())
        self._pump_session_timer()

    async def _send_refresh(self, method: RefreshMethod, interval: int) -> Response | None:
        """One session refresh request (answering a digest challenge once); its final
        response, None when none came."""
        dialog = self._require_dialog()
        us = Refresher.UAC
        if method is RefreshMethod.INVITE:
            request = dialog.create_request(
                "INVITE", self._via(), body=self._local_sdp, content_type=SDP
            )
        else:
            request = dialog.create_request("UPDATE", self._via())
        request.headers.set("Allow", ALLOW)
        request.headers.set("Supported", SUPPORTED)
        min_se = min(self._st_settings.min_se, interval)
        for name, value in request_headers(SessionExpires(interval, us), min_se):
            request.headers.set(name, value)
        response = await self._send_in_dialog(request)
        if (
            response is not None
            and response.code in (401, 407)
            and self._digest is not None
            and not self.ended.is_set()
        ):
            self._challenge = response
            retry = copy_request(request)
            retry.via = [self._via()]
            dialog.local_cseq += 1
            retry.cseq = CSeq(dialog.local_cseq, method.value)
            if method is RefreshMethod.INVITE:
                dialog.invite_cseq = dialog.local_cseq
            response = await self._send_in_dialog(self._with_credentials(retry))
        return response

    async def _send_in_dialog(self, request: Request) -> Response | None:
        if request.method == "INVITE":
            return await self._send_reinvite(request)
        return await self.gateway.endpoint.request(request, self._dialog_peer())

    def _apply_refresh_answer(self, body: bytes) -> None:
        """The answer to our refresh's offer (the SDP we last sent): usually what the peer
        said before, but a peer may move its media on any offer/answer (RFC 3264 8). An
        unusable one is logged and the media stays as it was: the session itself was
        refreshed."""
        if not body or self.media is None:
            return
        try:
            negotiated = parse_answer(body, SessionDescription.parse(self._local_sdp))
        except ValueError as exc:  # SdpError, or an odd answer the parser let through
            logger.info("call %s: refresh answer not applied: %s", self.call_id, exc)
            return
        self._configure_media(negotiated)

    async def _send_reinvite(self, request: Request) -> Response | None:
        """Send an in-dialog re-INVITE, ACK its 2xx (and every retransmission of it), and
        return its final response; None when none came within timer B."""
        endpoint = self.gateway.endpoint
        dialog = self._require_dialog()
        future: asyncio.Future[Response | None] = self.loop.create_future()
        cseq = request.cseq.sequence

        def on_event(event: Event) -> None:
            if isinstance(event, ResponseReceived) and event.response.code >= 200:
                response = event.response
                if response.code < 300:
                    if self._refresh_ack is None or self._refresh_ack.cseq.sequence != cseq:
                        self._refresh_ack = dialog.create_ack(self._via(), cseq=cseq)
                    endpoint.send_stateless(self._refresh_ack, self._dialog_peer())
                if not future.done():
                    future.set_result(response)
            elif isinstance(event, TransactionTimeout | TransportFailure) and not future.done():
                future.set_result(None)

        endpoint.start_client_transaction(request, self._dialog_peer(), on_event)
        bound = self.gateway.config.timers.timer_b + endpoint.transport.connect_timeout
        self._reinviting = True
        try:
            return await asyncio.wait_for(future, bound)
        except TimeoutError:
            return None
        finally:
            self._reinviting = False

    def _session_rejection(self, ctx: ServerContext) -> bool:
        """RFC 4028 9: answer 422 with our Min-SE to a Session-Expires below it; True
        when that was sent (the request goes no further)."""
        rejection = negotiate_uas(ctx.request, self._st_settings).rejection
        if rejection is None:
            return False
        refusal = create_response(
            ctx.request, rejection.code, rejection.phrase, to_tag=self.local_tag
        )
        for name, value in rejection.headers:
            refusal.headers.set(name, value)
        ctx.send(refusal)
        return True

    def _answer_session_timer(self, request: Request, response: Response) -> None:
        """Session-timer part of our 2xx to the peer's INVITE, re-INVITE or UPDATE (RFC
        4028 9): the negotiated Session-Expires goes into ``response`` and the timer
        (re)starts; a refresh without Session-Expires turns the timer off."""
        self._refresh_method = refresh_method(request, self._refresh_method)
        expires = negotiate_uas(request, self._st_settings).expires
        if expires is None:
            if self._session_timer is not None:
                self._session_timer.stop()
                self._pump_session_timer()
            return
        for name, value in response_headers(request, expires):
            response.headers.set(name, value)
        self._start_session_timer(expires, local=expires.refresher is Refresher.UAS)

    # -- shared -----------------------------------------------------------------------

    def _mark_answered(self) -> None:
        self.answered = True
        self._times.answer(self.loop.time())
        media = self.media
        assert media is not None
        self._digit_task = self.gateway.spawn(self._read_digits(media))
        self._arm_duration_limit()

    def _arm_duration_limit(self) -> None:
        """(Re)schedule the hang-up at answer + max duration."""
        if self._duration_timer is not None:
            self._duration_timer.cancel()
            self._duration_timer = None
        answered = self._times.answered
        if answered is None or self.ended.is_set():
            return
        at = answered + self._max_duration
        self._duration_timer = self.loop.call_at(at, self._on_max_duration)

    def _on_max_duration(self) -> None:
        self._duration_timer = None
        if self.ended.is_set():
            return
        logger.info(
            "call %s: max duration %g s reached, hanging up", self.call_id, self._max_duration
        )
        self.gateway.spawn(self._hang_up(f"max duration ({self._max_duration:g} s) reached"))

    async def _open_media(self) -> int:
        """Bind the call's RTP socket. The session becomes the call's only once it is open,
        so a call ended meanwhile (CANCEL, stop) never leaves a socket behind."""
        config = self.gateway.config
        media = MediaSession(
            local_host=config.host,
            pacer=self.gateway.pacer,
            port_range=config.rtp_ports,
            trusted_hosts=[self.peer.host],  # NAT: RTP from where the SIP comes from
            history_seconds=config.media_history_seconds,
            native_send=config.media_native_send,
        )
        opening = asyncio.ensure_future(media.open())
        try:
            port = await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(lambda _: self.gateway._close_media(media))
            raise
        if self.ended.is_set():
            self.gateway._close_media(media)
            raise CallEnded("the call ended while its media port was opening")
        self.media = media
        return port

    def _abort(
        self, reason: str = "internal error", outcome: CallOutcome = CallOutcome.FAILED
    ) -> None:
        """End the call after a failure or at stop, answering for it: 500 to an inbound
        INVITE with nothing final sent, BYE when answered, CANCEL while ringing."""
        if self.ended.is_set():
            return
        endpoint = self.gateway.endpoint
        ctx = self._invite_ctx
        code: int | None = None
        if ctx is not None and not ctx.final_sent:
            ctx.respond(500, reason.capitalize(), to_tag=self.local_tag)
            code = 500
        if self.answered and self.dialog is not None:
            self._hangup_by = "local"
            bye = self.dialog.create_request("BYE", self._via())
            self.gateway.spawn(endpoint.request(bye, self._dialog_peer()))
        elif self.direction == "outbound" and self._invite is not None:
            self._cancel("error")
        self._fail(outcome, code, reason)

    async def _read_digits(self, media: MediaSession) -> None:
        while True:
            digit = await media.digits.get()
            self._on_digit(digit)

    def _on_digit(self, digit: DtmfDigit) -> None:
        if digit.method == DtmfMethod.RFC4733:
            self._rfc4733_seen = True
        elif digit.method == DtmfMethod.INBAND and self._rfc4733_seen:
            return  # the far end signals out of band; tones it also plays are not new digits
        at_ms = self._times.since_answer_ms(self.loop.time())
        received = ReceivedDigit(digit.digit, digit.method, at_ms)
        self._digits.append(received)
        self._pending.append(digit.digit)
        self._digit_arrived.set()
        for listener in list(self._digit_listeners):
            try:
                listener(received)
            except Exception:
                logger.exception("call %s: digit listener failed; removing it", self.call_id)
                with contextlib.suppress(ValueError):
                    self._digit_listeners.remove(listener)
        logger.info("call %s: digit %s via %s", self.call_id, digit.digit, digit.method.value)

    def _fail(
        self,
        outcome: CallOutcome,
        code: int | None,
        reason: str,
        *,
        failure: FailureCause | None = None,
    ) -> None:
        self._finish(outcome, code, reason, failure)
        if not self._final.done():
            self._final.set_result(None)

    def _finish(
        self,
        outcome: CallOutcome,
        code: int | None,
        reason: str,
        failure: FailureCause | None = None,
    ) -> None:
        if self.ended.is_set():
            return
        now = self.loop.time()
        self.result = CallResult(
            outcome=outcome,
            sip_code=code,
            reason=reason,
            direction=self.direction,
            target=self.target,
            call_id=self.call_id,
            transport=self.transport,
            codec=self._codec,
            **self._times.timings(now),
            hangup_by=self._hangup_by,
            received=list(self._digits),
            authenticated=self._authenticated,
            redirected_to=[] if self._redirects is None else list(self._redirects.visited[1:]),
            srtp=self._srtp is not None,
            session_expired=self._session_expired,
            failure=failure,
        )
        self.ended.set()
        if self._duration_timer is not None:
            self._duration_timer.cancel()
            self._duration_timer = None
        for handle in (self._session_timer_handle, self._reliable_timer):
            if handle is not None:
                handle.cancel()
        self._session_timer_handle = self._reliable_timer = None
        if not self._reliable_outcome.done():
            self._reliable_outcome.set_result(False)
        self.gateway.calls.pop((self.call_id, self.local_tag), None)
        if self.direction == "inbound":
            self.gateway.inbound_calls -= 1
        if self.gateway.on_call_ended is not None:
            try:
                self.gateway.on_call_ended(self.result)
            except Exception:
                logger.exception("on_call_ended hook failed")
        if self._digit_task is not None:
            self._digit_task.cancel()
            # a cancelled task keeps its CancelledError, whose traceback holds our frame
            self._digit_task = None
        if self.media is not None:
            self.gateway._close_media(self.media)
        logger.info("call %s ended: %s %s %s", self.call_id, outcome.value, code, reason)

    async def _send_info_digit(self, digit: str, duration_ms: int) -> None:
        from gateway.media.dtmf import info_dtmf_body

        dialog = self._require_dialog()
        content_type, body = info_dtmf_body(digit, duration_ms)
        info = dialog.create_request("INFO", self._via(), body=body, content_type=content_type)
        await self.gateway.endpoint.request(info, self._dialog_peer())

    def _dialog_peer(self) -> Peer:
        """Where in-dialog requests go: the remote target (or first route), same transport;
        an inbound TCP call reuses the caller's connection while it is open."""
        assert self.dialog is not None
        return self._peer_of(self.dialog)

    def _peer_of(self, dialog: Dialog) -> Peer:
        """`_dialog_peer` for ``dialog`` (an early dialog's PRACK goes the same way)."""
        transport = self.gateway.endpoint.transport
        if self.direction == "inbound" and transport.has_connection(self.peer):
            return self.peer
        uri = dialog.destination()
        kind = (uri.parameters.get("transport") or self.transport).lower()
        if uri.scheme == "sips":
            kind = "tls"
        port = uri.port or (DEFAULT_SIPS_PORT if kind == "tls" else 5060)
        return Peer(kind, uri.host.strip("[]"), port, self.peer.tls)

    def _via(self) -> Via:
        return self.gateway.endpoint.via(self.transport, self.peer)

    def _with_tls(self, peer: Peer, uri: URI) -> Peer:
        return tls_peer(peer, uri, self._tls)

    def _require_media(self) -> MediaSession:
        if self.ended.is_set() or not self.answered or self.media is None:
            raise CallEnded("the call is not active")
        return self.media

    def _require_dialog(self) -> Dialog:
        if self.dialog is None or self.ended.is_set():
            raise CallEnded("the call is not active")
        return self.dialog

    async def _pcm(self, prompt: Prompt) -> np.ndarray[Any, np.dtype[np.int16]]:
        if isinstance(prompt, np.ndarray):
            return prompt.astype(np.int16, copy=False)
        if isinstance(prompt, str):
            if self.gateway.prompts is None:
                raise ValueError("text prompts need a prompt cache (Gateway(prompts=...))")
            prompt = await self.gateway.prompts.render(prompt)
        pcm = prompt.pcm
        assert isinstance(pcm, np.ndarray)
        return pcm.astype(np.int16, copy=False)
