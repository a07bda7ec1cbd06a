"""RFC 3261 §17 transactions, with the RFC 6026 "Accepted" state for 2xx to INVITE.

Sans-IO state machines in the h11 style: the caller feeds in received messages, timer
ticks and transport errors together with the current monotonic time ``now``, then drains
``messages_to_send()`` and ``next_event()``. Nothing here touches sockets or clocks, so a
whole call flow (including 32-second timeouts) can be replayed in microseconds in tests.

Once its final response is in, a transaction only lingers (timers D, I, J, K, L, M: up to
32 s over UDP) to absorb retransmissions. Lingering, it keeps its key and, where it has
something to re-send (our ACK for a non-2xx, our last response), that message's bytes:
never a parsed message. At 200 calls per second thousands of transactions linger, and
parsed messages kept for them were most of what each full collection had to walk.
"""

from __future__ import annotations

import abc
import enum
from collections import deque
from dataclasses import dataclass
from typing import TypeAlias

from sipmessage import CSeq, Request, Response

from gateway.sip.message import BRANCH_MAGIC, to_wire, top_via

__all__ = [
    "AckReceived",
    "ClientInviteTransaction",
    "ClientNonInviteTransaction",
    "Event",
    "ResponseReceived",
    "ServerInviteTransaction",
    "ServerNonInviteTransaction",
    "TimerSettings",
    "TransactionError",
    "TransactionState",
    "TransactionTerminated",
    "TransactionTimeout",
    "TransportFailure",
    "transaction_key",
]


class TransactionError(RuntimeError):
    """The transaction user asked for something the state machine cannot do (a TU bug)."""


@dataclass(frozen=True)
class TimerSettings:
    """RFC 3261 Table 4 base values; every other timer derives from them.

    The ``timer_*`` properties give the unreliable-transport value; transactions zero
    D, I, J and K themselves when the transport is reliable (TCP/TLS).
    """

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0

    def __post_init__(self) -> None:
        # Zero or negative intervals would make retransmission loops spin forever.
        if self.t1 <= 0 or self.t2 < self.t1 or self.t4 <= 0:
            raise ValueError(f"invalid SIP timer settings: {self}")

    @property
    def timer_b(self) -> float:
        return 64 * self.t1

    @property
    def timer_d(self) -> float:
        return 32.0

    @property
    def timer_f(self) -> float:
        return 64 * self.t1

    @property
    def timer_h(self) -> float:
        return 64 * self.t1

    @property
    def timer_i(self) -> float:
        return self.t4

    @property
    def timer_j(self) -> float:
        return 64 * self.t1

    @property
    def timer_k(self) -> float:
        return self.t4

    @property
    def timer_l(self) -> float:
        return 64 * self.t1

    @property
    def timer_m(self) -> float:
        return 64 * self.t1


class TransactionState(enum.Enum):
    CALLING = "calling"
    TRYING = "trying"
    PROCEEDING = "proceeding"
    COMPLETED = "completed"
    CONFIRMED = "confirmed"
    ACCEPTED = "accepted"
    TERMINATED = "terminated"


@dataclass(frozen=True)
class ResponseReceived:
    """A response the TU must see: provisionals, the first final, and 2xx retransmissions.

    2xx retransmissions are passed up (RFC 6026) because the UAC core, not the
    transaction, acknowledges 2xx responses and must re-send its ACK for each.
    """

    response: Response


@dataclass(frozen=True)
class AckReceived:
    """Server INVITE: the ACK matching this transaction arrived.

    Normally this is the ACK for our non-2xx final; in the Accepted state it is an ACK
    for the 2xx that reused the INVITE's branch, which RFC 6026 §8.7 hands to the TU.
    """

    request: Request


@dataclass(frozen=True)
class TransactionTimeout:
    """Timer ``"B"``/``"F"`` (no final response), ``"H"`` (no ACK) or ``"cancel"`` (no final
    response within 64*T1 of our CANCEL, RFC 3261 9.1) expired."""

    timer: str


@dataclass(frozen=True)
class TransportFailure:
    """The TU reported that the transport could not deliver one of our messages."""


@dataclass(frozen=True)
class TransactionTerminated:
    """Emitted exactly once, when the state becomes TERMINATED, so the TU can forget it."""


Event: TypeAlias = (
    ResponseReceived | AckReceived | TransactionTimeout | TransportFailure | TransactionTerminated
)


def _default_port(transport: str) -> int:
    return 5061 if transport.upper() in ("TLS", "WSS") else 5060


def transaction_key(message: Request | Response, *, method: str | None = None) -> str:
    """Return the RFC 3261 §17.1.3/§17.2.3 matching key of ``message``.

    The key is top Via branch + sent-by + method. ACK maps to INVITE so an ACK for a
    non-2xx final finds its INVITE server transaction; CANCEL keeps its own method, so
    to find the INVITE a CANCEL targets pass ``method="INVITE"``. Responses use the CSeq
    method. Requests whose branch lacks the RFC 3261 magic cookie fall back to
    Call-ID/From tag/CSeq number, which is stable across the INVITE and its ACK.
    """
    via = top_via(message)
    if method is None:
        method = message.cseq.method if isinstance(message, Response) else message.method
    if method == "ACK":
        method = "INVITE"
    sent_by = f"{via.host.lower()}:{via.port or _default_port(via.transport)}"
    branch = via.parameters.get("branch")
    if branch and branch.startswith(BRANCH_MAGIC):
        return f"{branch}|{sent_by}|{method}"
    from_tag = message.from_address.parameters.get("tag") or ""
    return f"rfc2543|{message.call_id}|{from_tag}|{message.cseq.sequence}|{sent_by}|{method}"


class _Transaction(abc.ABC):
    """Timer bookkeeping and output queues shared by all four state machines."""

    def __init__(
        self, key: str, *, reliable: bool, timers: TimerSettings, state: TransactionState
    ) -> None:
        self.reliable = reliable
        self.timers = timers
        self.state = state
        self._key = key
        self._deadlines: dict[str, float] = {}
        self._events: deque[Event] = deque()

    @property
    def key(self) -> str:
        return self._key

    @property
    @abc.abstractmethod
    def holds_message(self) -> bool:
        """Whether a parsed request or response is still kept (False once lingering)."""

    def next_timer_at(self) -> float | None:
        """Earliest pending deadline, or None when no timer is armed."""
        return min(self._deadlines.values(), default=None)

    def handle_timer(self, now: float) -> None:
        """Fire every timer due at ``now``, earliest first.

        Rearmed retransmission timers count from ``now``, so a late tick produces one
        retransmission rather than a burst.
        """
        while self.state is not TransactionState.TERMINATED:
            due = [(at, name) for name, at in self._deadlines.items() if at <= now]
            if not due:
                return
            _, name = min(due)
            del self._deadlines[name]
            self._fire(name, now)

    def transport_error(self, now: float) -> None:
        """The TU could not send one of our messages: the transaction is dead."""
        if self.state is TransactionState.TERMINATED:
            return
        self._events.append(TransportFailure())
        self._terminate()

    def next_event(self) -> Event | None:
        """Pop the oldest pending event, or None."""
        return self._events.popleft() if self._events else None

    @abc.abstractmethod
    def _fire(self, name: str, now: float) -> None:
        """React to timer ``name`` expiring at ``now``."""

    @abc.abstractmethod
    def _shed(self) -> None:
        """Let go of parsed messages: the transaction from now on only absorbs or
        re-sends bytes."""

    def _arm(self, name: str, now: float, delay: float) -> None:
        self._deadlines[name] = now + delay

    def _cancel(self, *names: str) -> None:
        for name in names:
            self._deadlines.pop(name, None)

    def _linger(self, state: TransactionState, name: str, now: float, delay: float) -> None:
        """Enter a state that only absorbs retransmissions; skip it when ``delay`` is 0."""
        if self.reliable or delay <= 0:
            self._terminate()
        else:
            self.state = state
            self._arm(name, now, delay)

    def _timeout(self, timer: str) -> None:
        self._events.append(TransactionTimeout(timer))
        self._terminate()

    def _terminate(self) -> None:
        if self.state is TransactionState.TERMINATED:
            return
        self.state = TransactionState.TERMINATED
        self._deadlines.clear()
        self._shed()
        self._events.append(TransactionTerminated())


class _ClientTransaction(_Transaction):
    """Client side: owns the request and its retransmissions until a final response."""

    def __init__(
        self, request: Request, *, reliable: bool, timers: TimerSettings, state: TransactionState
    ) -> None:
        super().__init__(transaction_key(request), reliable=reliable, timers=timers, state=state)
        self._request: Request | None = request
        self._outgoing: list[Request | bytes] = []
        self._started = False
        self._interval = timers.t1

    @property
    def request(self) -> Request:
        """The request, while the transaction still needs it (until a final response)."""
        if self._request is None:
            raise TransactionError("the request was let go when the transaction completed")
        return self._request

    @property
    def holds_message(self) -> bool:
        return self._request is not None

    def messages_to_send(self) -> list[Request | bytes]:
        """Drain requests (original, retransmissions, ACKs) the TU must put on the wire;
        bytes are re-sends of a message already sent once (an ACK for a non-2xx)."""
        out, self._outgoing = self._outgoing, []
        return out

    def _shed(self) -> None:
        self._request = None

    def _start(self, now: float, retransmit_timer: str, timeout_timer: str, timeout: float) -> None:
        if self._started:
            raise TransactionError("client transaction already started")
        self._started = True
        self._outgoing.append(self.request)
        if not self.reliable:
            self._arm(retransmit_timer, now, self.timers.t1)
        self._arm(timeout_timer, now, timeout)

    def _check_response(self, response: Response) -> bool:
        """Reject TU dispatch bugs; return False when the response must be ignored."""
        if not self._started:
            raise TransactionError("response received before start()")
        if transaction_key(response) != self._key:
            raise TransactionError("response does not match this transaction")
        return self.state is not TransactionState.TERMINATED


class ClientInviteTransaction(_ClientTransaction):
    """RFC 3261 §17.1.1 as amended by RFC 6026 (2xx moves to Accepted, timer M)."""

    def __init__(
        self, request: Request, *, reliable: bool, timers: TimerSettings = TimerSettings()
    ) -> None:
        if request.method != "INVITE":
            raise TransactionError(f"{request.method} needs a non-INVITE client transaction")
        super().__init__(request, reliable=reliable, timers=timers, state=TransactionState.CALLING)
        self._ack: bytes | None = None  # our ACK for a non-2xx final, as sent

    def start(self, now: float) -> None:
        """Queue the INVITE and arm timer A (unreliable only) and timer B."""
        self._start(now, "A", "B", self.timers.timer_b)

    def cancel_sent(self, now: float) -> None:
        """The TU sent a CANCEL for this INVITE. A peer that then never answers would keep us
        in Proceeding forever (timer B only runs in Calling), so without a final response
        within 64*T1 the transaction ends with a ``"cancel"`` timeout (RFC 3261 9.1)."""
        if self.state in (TransactionState.CALLING, TransactionState.PROCEEDING):
            self._deadlines.setdefault("cancel", now + self.timers.timer_b)

    def receive_response(self, response: Response, now: float) -> None:
        if not self._check_response(response):
            return
        code = response.code
        state = self.state
        if state in (TransactionState.CALLING, TransactionState.PROCEEDING):
            if code < 200:
                self.state = TransactionState.PROCEEDING
                self._cancel("A", "B")
                self._events.append(ResponseReceived(response))
            elif code < 300:
                self._cancel("A", "B")
                self.state = TransactionState.ACCEPTED
                self._arm("M", now, self.timers.timer_m)
                self._shed()
                self._events.append(ResponseReceived(response))
            else:
                self._cancel("A", "B")
                ack = self._build_ack(response)
                self._outgoing.append(ack)
                self._events.append(ResponseReceived(response))
                self._linger(TransactionState.COMPLETED, "D", now, self.timers.timer_d)
                if self.state is TransactionState.COMPLETED:
                    self._ack = to_wire(ack)
                self._shed()
        elif state is TransactionState.COMPLETED:
            # A retransmitted final means our ACK was lost; the TU already has it.
            if code >= 300 and self._ack is not None:
                self._outgoing.append(self._ack)
        elif state is TransactionState.ACCEPTED and 200 <= code < 300:
            # Retransmitted or forked 2xx: only the UAC core can ACK it.
            self._events.append(ResponseReceived(response))

    def _fire(self, name: str, now: float) -> None:
        if name == "A" and self.state is TransactionState.CALLING:
            self._outgoing.append(self.request)
            self._interval *= 2  # RFC 3261 leaves timer A uncapped; B bounds it.
            self._arm("A", now, self._interval)
        elif name == "B" and self.state is TransactionState.CALLING:
            self._timeout("B")
        elif name == "cancel" and self.state in (
            TransactionState.CALLING,
            TransactionState.PROCEEDING,
        ):
            self._timeout("cancel")
        elif name in ("D", "M"):
            self._terminate()

    def _shed(self) -> None:
        super()._shed()
        if self.state is TransactionState.TERMINATED:
            self._ack = None

    def _build_ack(self, response: Response) -> Request:
        """RFC 3261 §17.1.1.3: the ACK for a non-2xx final belongs to this transaction."""
        invite = self.request
        ack = Request("ACK", invite.uri)
        ack.via = [top_via(invite)]
        max_forwards = invite.max_forwards
        ack.max_forwards = 70 if max_forwards is None else max_forwards
        ack.headers.set("From", invite.headers["From"])
        ack.headers.set("To", response.headers["To"])
        ack.call_id = invite.call_id
        ack.cseq = CSeq(invite.cseq.sequence, "ACK")
        routes = invite.headers.getlist("Route")
        if routes:
            ack.headers.setlist("Route", list(routes))
        ack.content_length = 0
        return ack


class ClientNonInviteTransaction(_ClientTransaction):
    """RFC 3261 §17.1.2: timers E (capped at T2), F and K."""

    def __init__(
        self, request: Request, *, reliable: bool, timers: TimerSettings = TimerSettings()
    ) -> None:
        if request.method in ("INVITE", "ACK"):
            raise TransactionError(f"{request.method} cannot use a non-INVITE client transaction")
        super().__init__(request, reliable=reliable, timers=timers, state=TransactionState.TRYING)

    def start(self, now: float) -> None:
        """Queue the request and arm timer E (unreliable only) and timer F."""
        self._start(now, "E", "F", self.timers.timer_f)

    def receive_response(self, response: Response, now: float) -> None:
        if not self._check_response(response):
            return
        if self.state not in (TransactionState.TRYING, TransactionState.PROCEEDING):
            return  # Completed absorbs retransmitted finals.
        self._events.append(ResponseReceived(response))
        if response.code < 200:
            self.state = TransactionState.PROCEEDING
        else:
            self._cancel("E", "F")
            self._linger(TransactionState.COMPLETED, "K", now, self.timers.timer_k)
            self._shed()

    def _fire(self, name: str, now: float) -> None:
        if name == "E" and self.state is TransactionState.TRYING:
            self._outgoing.append(self.request)
            self._interval = min(2 * self._interval, self.timers.t2)
            self._arm("E", now, self._interval)
        elif name == "E" and self.state is TransactionState.PROCEEDING:
            self._outgoing.append(self.request)
            self._arm("E", now, self.timers.t2)
        elif name == "F":
            self._timeout("F")
        elif name == "K":
            self._terminate()


class _ServerTransaction(_Transaction):
    """Server side: remembers the last response to answer retransmitted requests.

    The request itself is never kept (its key is all matching needs); a provisional is
    kept as sent, a final one that may have to be re-sent only as its bytes.
    """

    def __init__(
        self, request: Request, *, reliable: bool, timers: TimerSettings, state: TransactionState
    ) -> None:
        super().__init__(transaction_key(request), reliable=reliable, timers=timers, state=state)
        self._outgoing: list[Response | bytes] = []
        self._last: Response | bytes | None = None

    @property
    def holds_message(self) -> bool:
        return isinstance(self._last, Response)

    def messages_to_send(self) -> list[Response | bytes]:
        """Drain responses (TU's and retransmissions) the TU must put on the wire; bytes
        re-send the final response already sent once, to the same destination."""
        out, self._outgoing = self._outgoing, []
        return out

    def _shed(self) -> None:
        if self.state is TransactionState.TERMINATED or self.state is TransactionState.ACCEPTED:
            self._last = None  # nothing left to re-send (the TU re-sends its own 2xx)
        elif isinstance(self._last, Response):
            self._last = to_wire(self._last)

    def _check_response(self, response: Response) -> None:
        if transaction_key(response) != self._key:
            raise TransactionError("response does not match this transaction")

    @abc.abstractmethod
    def can_send(self, code: int) -> bool:
        """Whether ``send_response`` accepts ``code`` now. A TU racing the peer (a CANCEL
        answered with 487 while we were answering, a transaction that timed out) asks
        first instead of catching the TransactionError meant for real bugs."""

    def _send(self, response: Response) -> None:
        self._last = response
        self._outgoing.append(response)

    def _resend_last(self) -> None:
        if self._last is not None:
            self._outgoing.append(self._last)


class ServerInviteTransaction(_ServerTransaction):
    """RFC 3261 §17.2.1 with RFC 6026: the TU, not the transaction, retransmits 2xx.

    No automatic 100 Trying: the TU decides whether to send one.
    """

    def __init__(
        self, request: Request, *, reliable: bool, timers: TimerSettings = TimerSettings()
    ) -> None:
        if request.method != "INVITE":
            raise TransactionError(f"{request.method} needs a non-INVITE server transaction")
        super().__init__(
            request, reliable=reliable, timers=timers, state=TransactionState.PROCEEDING
        )
        self._interval = timers.t1

    def can_send(self, code: int) -> bool:
        return self.state is TransactionState.PROCEEDING or (
            self.state is TransactionState.ACCEPTED and 200 <= code < 300
        )

    def send_response(self, response: Response, now: float) -> None:
        self._check_response(response)
        code = response.code
        if self.state is TransactionState.PROCEEDING:
            self._send(response)
            if 200 <= code < 300:
                self.state = TransactionState.ACCEPTED
                self._arm("L", now, self.timers.timer_l)
                self._shed()
            elif code >= 300:
                self.state = TransactionState.COMPLETED
                if not self.reliable:
                    self._arm("G", now, self.timers.t1)
                self._arm("H", now, self.timers.timer_h)
                self._shed()
        elif self.state is TransactionState.ACCEPTED and 200 <= code < 300:
            self._outgoing.append(response)  # TU-driven 2xx retransmission (RFC 6026 §8.5)
        else:
            raise TransactionError(f"cannot send {code} in state {self.state.name}")

    def receive_request(self, request: Request, now: float) -> None:
        if transaction_key(request) != self._key:
            raise TransactionError("request does not match this transaction")
        if request.method == "ACK":
            if self.state is TransactionState.COMPLETED:
                self._events.append(AckReceived(request))
                self._cancel("G", "H")
                self._linger(TransactionState.CONFIRMED, "I", now, self.timers.timer_i)
            elif self.state is TransactionState.ACCEPTED:
                self._events.append(AckReceived(request))
            # Confirmed absorbs ACK retransmissions; an ACK before any final is bogus.
        elif self.state in (TransactionState.PROCEEDING, TransactionState.COMPLETED):
            self._resend_last()
        # Accepted/Confirmed absorb INVITE retransmissions (RFC 6026 §8.7).

    def _fire(self, name: str, now: float) -> None:
        if name == "G" and self.state is TransactionState.COMPLETED:
            self._resend_last()
            self._interval = min(2 * self._interval, self.timers.t2)
            self._arm("G", now, self._interval)
        elif name == "H" and self.state is TransactionState.COMPLETED:
            self._timeout("H")
        elif name in ("I", "L"):
            self._terminate()


class ServerNonInviteTransaction(_ServerTransaction):
    """RFC 3261 §17.2.2: answers retransmissions from the last response, timer J."""

    def __init__(
        self, request: Request, *, reliable: bool, timers: TimerSettings = TimerSettings()
    ) -> None:
        if request.method in ("INVITE", "ACK"):
            raise TransactionError(f"{request.method} cannot use a non-INVITE server transaction")
        super().__init__(request, reliable=reliable, timers=timers, state=TransactionState.TRYING)

    def can_send(self, code: int) -> bool:
        return self.state in (TransactionState.TRYING, TransactionState.PROCEEDING)

    def send_response(self, response: Response, now: float) -> None:
        self._check_response(response)
        if self.state not in (TransactionState.TRYING, TransactionState.PROCEEDING):
            raise TransactionError(f"cannot send {response.code} in state {self.state.name}")
        self._send(response)
        if response.code < 200:
            self.state = TransactionState.PROCEEDING
        else:
            self._linger(TransactionState.COMPLETED, "J", now, self.timers.timer_j)
            self._shed()

    def receive_request(self, request: Request, now: float) -> None:
        if transaction_key(request) != self._key:
            raise TransactionError("request does not match this transaction")
        # Trying has nothing to resend yet; Proceeding/Completed repeat the last response.
        if self.state in (TransactionState.PROCEEDING, TransactionState.COMPLETED):
            self._resend_last()

    def _fire(self, name: str, now: float) -> None:
        if name == "J":
            self._terminate()
