"""The SIP fuzzer's sockets: mutated requests over UDP and TCP at a steady rate, RFC 4475's
messages once each, and INVITEs carrying odd SDP, against a running `ackline serve`.

It behaves as a peer must for what the server sends back, so that fuzzing measures the
server and not a pile-up of calls nobody ends: every final response to an INVITE is
ACKed, every answered call is hung up (some first get mutated in-dialog requests), a
call left at a provisional response is cancelled, and requests from the server (a BYE)
get 200. Single-threaded on a selector; every loop is bounded by a count and a deadline.
"""

from __future__ import annotations

import contextlib
import enum
import heapq
import itertools
import random
import selectors
import socket
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.fuzz_sdp import good_offer, mutate_offer
from bench.fuzz_sip import (
    MAX_UDP,
    TEMPLATES,
    TORTURE,
    DialogFields,
    Head,
    Mutator,
    Origin,
    Route,
    Seed,
    ack_for,
    cancel_for,
    in_dialog_request,
    load_seeds,
    ok_for,
    parse_head,
    render,
    split_frames,
)

LOOPBACK = "127.0.0.1"
BATCH = 32  # inputs between two looks at the sockets
UDP_QUEUE_LIMIT = 64 * 1024  # server socket backlog (bytes) above which sending pauses
UDP_CHECK_BYTES = 48 * 1024  # look at the backlog again after sending this much
UNTRUSTED = "127.0.0.9"  # a source outside the hotline's trusted list: INVITEs get 403
TCP_DEPTH = 8  # chunks queued on one connection before it is flushed first
TCP_POOL = 6  # connections carrying inputs at once
TCP_ABANDONED = 8  # connections left with half a message, waiting for the server to close
TCP_MAX_SIZE = 80_000  # TCP inputs may exceed the server's 64 KiB message limit
TCP_BACKLOG_LIMIT = 4 << 20  # bytes queued on one connection before it counts as stuck
PROBE_INTERVAL = 1.0  # seconds between liveness OPTIONS
PROBE_LOST_AFTER = 5.0  # an OPTIONS unanswered this long counts as lost
PROVISIONAL_LIMIT = 10.0  # an INVITE answered 1xx with no final this long: a hang
INVITES_KEPT = 20_000  # recent INVITEs tracked (their bytes kept when under 16 KiB)
KEPT_BYTES = 16 * 1024
RINGING_KEPT = 10_000  # INVITEs at a provisional response, tracked until their final
TRANSCRIPTS_KEPT = 500  # answered calls whose hang-up is not confirmed: what we sent them


class Kind(enum.StrEnum):
    """Why an INVITE was sent, which decides what happens to its call."""

    FUZZ = "fuzz"  # a mutation input: ended at once
    SDP = "sdp"  # an odd SDP offer: held briefly, then hung up
    TORTURE = "torture"


@dataclass
class CallState:
    kind: Kind
    data: bytes  # the INVITE as sent
    request_uri: str
    sent_at: float
    name: str = ""  # the SDP variant or torture message
    conn: _Conn | None = None  # the TCP connection it went on (its answers come back there)
    provisional_at: float | None = None
    final: int | None = None
    hung_up: bool = False
    ended: bool = False  # our BYE was answered, or the call was refused/cancelled
    outcome: str = ""


@dataclass
class SipStats:
    generated: int = 0  # mutation inputs made (sent, or lost with a closed TCP connection)
    inputs: Counter[str] = field(default_factory=Counter)  # sent, by transport
    origins: Counter[str] = field(default_factory=Counter)  # template / rfc4475
    methods: Counter[str] = field(default_factory=Counter)  # seed method of each input
    mutations: Counter[str] = field(default_factory=Counter)
    unmutated: int = 0
    in_dialog: int = 0  # mutated requests sent inside a real dialog
    responses: Counter[str] = field(default_factory=Counter)  # by class: 1xx .. 6xx
    codes: Counter[int] = field(default_factory=Counter)
    answered: int = 0  # INVITEs answered 2xx (new calls)
    answered_ids: list[str] = field(default_factory=list)
    hangups: int = 0  # BYEs we sent to end them
    hangups_ok: int = 0  # ... answered 200
    hangups_refused: Counter[int] = field(default_factory=Counter)  # ... answered otherwise
    cancels: int = 0
    server_requests: Counter[str] = field(default_factory=Counter)  # BYE etc. the server sent
    tcp_connects: int = 0
    tcp_closed_by_server: int = 0
    tcp_stuck: int = 0  # connections we closed because the server stopped reading
    tcp_unsent: int = 0  # inputs lost with a connection the server closed first
    paused: float = 0.0  # seconds spent waiting for the server's UDP backlog to drain
    per_second: list[int] = field(default_factory=list)  # inputs sent in each second
    probes: int = 0
    probes_lost: int = 0
    probe_max_ms: float = 0.0
    provisional_only: int = 0  # INVITEs left at 1xx with no final response
    reproducers: list[str] = field(default_factory=list)  # files with inputs worth a look
    rtp_bytes_received: int = 0  # media the server sent to our SDP address
    elapsed: float = 0.0
    send_seconds: float = 0.0  # time spent in the sending loop (the rate's denominator)
    transcripts: dict[str, list[bytes]] = field(default_factory=dict)  # unconfirmed hang-ups


class _Conn:
    """One TCP connection carrying inputs, written one chunk per loop turn so that the
    server reads messages split across reads and several in one read."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.local: tuple[str, int] = sock.getsockname()[:2]
        self.buffer = b""
        self.pending: deque[tuple[bytes, bool]] = deque()  # (chunk, ends an input)
        self.queued = 0
        self.abandoned_at: float | None = None
        self.closed = False


class SipDriver:
    """Owns the fuzzer's sockets; ``fuzz``, ``torture`` and ``sdp_calls`` are the phases."""

    def __init__(
        self,
        target: tuple[str, int],
        rng: random.Random,
        workdir: Path,
        *,
        alive: Callable[[], bool],
        tcp_share: float = 0.2,
        catch_port: int | None = 5060,
    ) -> None:
        self.target = target
        self.rng = rng  # the input stream: the same seed sends the same inputs
        # What answers provoke (in-dialog requests) follows timing: a generator of its own.
        self.dialog_rng = random.Random(rng.getrandbits(64))
        self.workdir = workdir
        self.alive = alive
        self.tcp_share = tcp_share
        self.stats = SipStats()
        self.sel = selectors.DefaultSelector()
        self.udp = self._udp_socket(0)
        self.probe = self._udp_socket(0)
        self.sink = self._udp_socket(0)  # the c= address of our offers: the server's RTP
        self.stranger = self._udp_socket(0, UNTRUSTED)
        self.catch: socket.socket | None = None
        if catch_port is not None:  # RFC 4475's Vias name port 5060: catch the answers
            with contextlib.suppress(OSError):
                self.catch = self._udp_socket(catch_port)
        self.conns: list[_Conn] = []
        self.abandoned: deque[_Conn] = deque()
        self.templates = load_seeds(TEMPLATES, Origin.TEMPLATE)
        self.torture_seeds = load_seeds(TORTURE, Origin.TORTURE)
        self.dialog_seeds = [s for s in self.templates if s.in_dialog and s.method != "response"]
        self.calls: OrderedDict[str, CallState] = OrderedDict()
        self.ringing: OrderedDict[str, CallState] = OrderedDict()
        self._watch: dict[str, str] = {}  # Call-ID -> torture message awaiting its answer
        self._seen: dict[str, str] = {}  # torture message -> first status seen
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self._ids = itertools.count(1)  # branches of what we answer with
        self._input_ids = itertools.count(1)
        self._probe_sent: dict[str, float] = {}
        self._next_probe = 0.0
        self._second_start = time.monotonic()
        self._second_count = 0
        self._server_port_hex = f":{target[1]:04X}"
        self._server_drops_at_start = self.server_queue()[1]

    # -- sockets ----------------------------------------------------------------------

    def _udp_socket(self, port: int, host: str = LOOPBACK) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, port))
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sel.register(sock, selectors.EVENT_READ, ("udp", sock))
        return sock

    def close(self) -> None:
        for conn in [*self.conns, *self.abandoned]:
            self._close_conn(conn)
        for sock in (self.udp, self.probe, self.sink, self.stranger, self.catch):
            if sock is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self.sel.unregister(sock)
                sock.close()
        self.sel.close()

    def server_queue(self) -> tuple[int, int]:
        """(bytes waiting, datagrams dropped) on the server's SIP UDP socket, from
        /proc/net/udp of this network namespace."""
        try:
            with open("/proc/net/udp") as f:
                for line in f:
                    fields = line.split()
                    if len(fields) > 12 and fields[1].endswith(self._server_port_hex):
                        return int(fields[4].split(":")[1], 16), int(fields[12])
        except OSError:
            pass
        return 0, 0

    @property
    def kernel_drops(self) -> int:
        """Datagrams the kernel dropped on the server's socket (its backlog was full)."""
        return self.server_queue()[1] - self._server_drops_at_start

    # -- building inputs ----------------------------------------------------------------

    def fields(self, rng: random.Random | None = None) -> DialogFields:
        rng = rng or self.rng
        n = next(self._input_ids)
        bits = rng.getrandbits(48)
        return DialogFields(
            call_id=f"fz{n}-{bits:012x}@{LOOPBACK}",
            from_tag=f"{bits:x}",
            to_tag=f"t{rng.getrandbits(32):x}",
            cseq=rng.randint(1, 60000),
            branch=f"z9hG4bK{n:x}{bits:x}",
        )

    def _body(self, seed: Seed, rng: random.Random) -> bytes:
        if b"{{SDP}}" not in seed.text:
            return b""
        offer = good_offer(LOOPBACK, self.sink.getsockname()[1])
        return mutate_offer(rng, offer) if rng.random() < 0.1 else offer

    def _input(self, route: Route) -> tuple[bytes, Seed, bool]:
        rng = self.rng
        seeds = self.torture_seeds if rng.random() < 0.25 else self.templates
        seed = rng.choice(seeds)
        data = render(seed, route, self.fields(), self._body(seed, rng))
        self.stats.origins[seed.origin] += 1
        self.stats.methods[seed.method] += 1
        if rng.random() < 0.05:
            self.stats.unmutated += 1
            return data, seed, False
        other = rng.choice(self.templates)
        mutator = Mutator(rng, MAX_UDP if route.transport == "udp" else TCP_MAX_SIZE)
        mutated, applied = mutator.mutate(data, render(other, route, self.fields()))
        self.stats.mutations.update(applied)
        return mutated, seed, True

    def _remember_invite(
        self, data: bytes, kind: Kind, name: str = "", conn: _Conn | None = None
    ) -> str:
        """Track an INVITE by the Call-ID it carries (as far as it can be read)."""
        head = parse_head(data)
        call_id = head.call_id if head is not None else ""
        first = data.split(b"\r\n", 1)[0].split(b" ")
        uri = first[1].decode("utf8", "replace") if len(first) > 2 else "sip:invalid"
        if call_id:
            kept = data if len(data) <= KEPT_BYTES else data[:KEPT_BYTES]
            self.calls[call_id] = CallState(kind, kept, uri, time.monotonic(), name, conn)
            self.calls.move_to_end(call_id)
            while len(self.calls) > INVITES_KEPT:
                self.calls.popitem(last=False)
        return call_id

    # -- the mutation phase ----------------------------------------------------------

    def fuzz(self, total: int, deadline: float) -> None:
        """Send ``total`` mutated inputs (fewer if ``deadline`` passes or the server dies)."""
        began = time.monotonic()
        sent = 0
        self._udp_bytes = 0
        while sent < total and time.monotonic() < deadline:
            if not self._tick():
                break
            if self._backlogged():
                continue
            for _ in range(min(BATCH, total - sent)):
                if self.rng.random() < self.tcp_share:
                    self._send_tcp_input()
                else:
                    self._send_udp_input()
                sent += 1
                self.stats.generated += 1
                self._second_count += 1
                if self._udp_bytes > UDP_CHECK_BYTES:
                    break
            self._flush_tcp()
        self.stats.send_seconds += time.monotonic() - began
        self.settle(time.monotonic() + PROVISIONAL_LIMIT + 2)
        self.stats.elapsed += time.monotonic() - began
        if self._second_count:
            self.stats.per_second.append(self._second_count)
            self._second_count = 0

    def _backlogged(self) -> bool:
        """Pause while the server's socket holds more than it can take: a steady rate it
        keeps up with, rather than inputs the kernel throws away unread."""
        self._udp_bytes = 0
        queued, _ = self.server_queue()
        if queued <= UDP_QUEUE_LIMIT:
            return False
        start = time.monotonic()
        self.poll(0.002)
        self.stats.paused += time.monotonic() - start
        return True

    def _send_udp_input(self) -> None:
        sock = self.stranger if self.rng.random() < 0.05 else self.udp
        route = Route("udp", sock.getsockname()[:2], self.target)
        data, seed, _ = self._input(route)
        if seed.method == "INVITE":
            self._remember_invite(data, Kind.FUZZ, seed.name)
        with contextlib.suppress(BlockingIOError, OSError):
            sock.sendto(data, self.target)
        self._udp_bytes += len(data)
        self.stats.inputs["udp"] += 1

    def _send_tcp_input(self) -> None:
        conn = self._tcp_conn()
        if conn is None:
            self._send_udp_input()
            return
        route = Route("tcp", conn.local, self.target)
        data, seed, _ = self._input(route)
        if seed.method == "INVITE":
            self._remember_invite(data, Kind.FUZZ, seed.name, conn)
        rng = self.rng
        if rng.random() < 0.03 and len(self.abandoned) < TCP_ABANDONED:
            # Half a message, then silence: the server must close it (message timeout).
            conn.pending.append((data[: rng.randint(1, max(1, len(data) - 1))], True))
            conn.abandoned_at = time.monotonic()
            self.conns.remove(conn)
            self.abandoned.append(conn)
        else:
            count = min(max(0, len(data) - 1), rng.choice((0, 0, 1, 2, 3)))
            cuts = sorted(rng.sample(range(1, len(data)), count))
            pieces = [data[a:b] for a, b in itertools.pairwise([0, *cuts, len(data)])]
            for i, piece in enumerate(pieces):
                conn.pending.append((piece, i == len(pieces) - 1))
        conn.queued += 1

    def _tcp_conn(self) -> _Conn | None:
        self.conns = [c for c in self.conns if not c.closed]
        if len(self.conns) < TCP_POOL:
            try:
                sock = socket.create_connection(self.target, timeout=2)
            except OSError:
                return self.conns[0] if self.conns else None
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock)
            self.sel.register(sock, selectors.EVENT_READ, ("tcp", conn))
            self.conns.append(conn)
            self.stats.tcp_connects += 1
            return conn
        conn = self.dialog_rng.choice(self.conns)  # which one depends on timing
        if len(conn.pending) > TCP_DEPTH:  # let the server read what it has first
            self._flush_tcp()
            self.poll(0.001)
        return None if conn.closed else conn

    def _flush_tcp(self) -> None:
        """Write at most one chunk per connection (a split input arrives in pieces)."""
        for conn in [*self.conns, *self.abandoned]:
            if conn.closed or not conn.pending:
                continue
            chunk, ends = conn.pending[0]
            try:
                written = conn.sock.send(chunk)
            except BlockingIOError:
                written = 0
            except OSError:
                self._lost_conn(conn)
                continue
            if written < len(chunk):
                conn.pending[0] = (chunk[written:], ends)
                if sum(len(c) for c, _ in conn.pending) > TCP_BACKLOG_LIMIT:
                    self.stats.tcp_stuck += 1
                    self._lost_conn(conn)
                continue
            conn.pending.popleft()
            if ends:
                self.stats.inputs["tcp"] += 1
        now = time.monotonic()
        while self.abandoned and (self.abandoned[0].closed or (
                now - (self.abandoned[0].abandoned_at or now)) > 30):  # fmt: skip
            self._close_conn(self.abandoned.popleft())  # the server never closed it

    def _lost_conn(self, conn: _Conn) -> None:
        self.stats.tcp_unsent += sum(1 for _, ends in conn.pending if ends)
        self._close_conn(conn)

    def _close_conn(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        conn.pending.clear()
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn.sock)
        conn.sock.close()

    # -- receiving and answering ---------------------------------------------------------

    def _tick(self) -> bool:
        """Housekeeping between batches: sockets, timers, the liveness probe, the rate
        record. False when the server is gone."""
        self.poll(0)
        now = time.monotonic()
        if now - self._second_start >= 1.0:
            self.stats.per_second.append(self._second_count)
            self._second_count = 0
            self._second_start = now
            self._judge_ringing(now)
            if not self.alive():
                return False
        if now >= self._next_probe:
            self._send_probe(now)
        return True

    def poll(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            kind, owner = key.data
            if kind == "udp":
                self._read_udp(owner)
            else:
                self._read_tcp(owner)
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, action = heapq.heappop(self.timers)
            action()

    def later(self, delay: float, action: Callable[[], None]) -> None:
        heapq.heappush(self.timers, (time.monotonic() + delay, next(self._ids), action))

    def _read_udp(self, sock: socket.socket) -> None:
        for _ in range(256):
            try:
                data, addr = sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP errors of earlier sends surface here
                continue
            if sock is self.sink:
                self.stats.rtp_bytes_received += len(data)
                continue
            local = sock.getsockname()[:2]

            def reply(message: bytes, sock: socket.socket = sock, addr: Any = addr) -> None:
                with contextlib.suppress(OSError):
                    sock.sendto(message, addr)

            if sock is self.probe:
                self._on_probe_answer(data)
            else:
                self._on_message(data, reply, Route("udp", local, self.target))

    def _read_tcp(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.stats.tcp_closed_by_server += 1
            self._lost_conn(conn)
            return
        frames, conn.buffer = split_frames(conn.buffer + data)
        if len(conn.buffer) > TCP_MAX_SIZE:
            conn.buffer = b""

        def reply(message: bytes) -> None:
            conn.pending.append((message, False))  # after any input begun: framing holds

        for frame in frames:
            self._on_message(frame, reply, Route("tcp", conn.local, self.target))

    def _on_message(self, data: bytes, reply: Callable[[bytes], None], route: Route) -> None:
        head = parse_head(data)
        if head is None:
            return
        if head.is_response and head.call_id in self._watch:
            self._seen.setdefault(self._watch[head.call_id], str(head.code))
        if not head.is_response:
            self.stats.server_requests[head.method] += 1
            if head.method != "ACK":
                reply(ok_for(head))
            return
        code = head.code
        self.stats.responses[f"{code // 100}xx"] += 1
        self.stats.codes[code] += 1
        _, method = head.cseq
        call = self.calls.get(head.call_id)
        if method == "BYE" and code >= 200:
            if code < 300:
                self.stats.hangups_ok += 1
                self.stats.transcripts.pop(head.call_id, None)
            else:
                self.stats.hangups_refused[code] += 1
            if call is not None:
                call.ended = code < 300
            return
        if method != "INVITE":
            return
        via = head.get("via")
        if code < 200:
            if call is not None and call.final is None and call.provisional_at is None:
                call.provisional_at = time.monotonic()
                self.ringing[head.call_id] = call
                while len(self.ringing) > RINGING_KEPT:
                    self.ringing.popitem(last=False)
            return
        self.ringing.pop(head.call_id, None)
        if code == 500 and call is not None:  # the server failed on it: keep the input
            self._reproducer("invite-500", call.data)
        if code >= 300:
            reply(ack_for(head, via, call.request_uri if call else "sip:invalid"))
            if call is not None and call.final is None:
                call.final, call.ended = code, True
                call.outcome = call.outcome or f"refused {code}"
            return
        self._answered(head, reply, route, call)

    def _answered(
        self, head: Head, reply: Callable[[bytes], None], route: Route, call: CallState | None
    ) -> None:
        """A 2xx to an INVITE: ACK it (every retransmission), and end the call once."""
        number, _ = head.cseq
        uri = call.request_uri if call is not None else "sip:invalid"
        if call is not None and (call.hung_up or call.final is not None):
            reply(ack_for(head, self._via(route), uri))
            return
        self.stats.answered += 1
        self.stats.answered_ids.append(head.call_id)
        if call is None:  # a Call-ID changed by mutation: end it all the same
            call = CallState(Kind.FUZZ, b"", uri, time.monotonic())
            self.calls[head.call_id] = call
        reply = self._recorded(head.call_id, call.data, reply)
        late_offer = bool(head.body) and not call.data.partition(b"\r\n\r\n")[2]
        # A 2xx carrying an offer must be answered in the ACK, or the call has no media.
        answer = good_offer(LOOPBACK, self.sink.getsockname()[1]) + b"\r\n" if late_offer else b""
        reply(ack_for(head, self._via(route), uri, answer))
        call.final, call.outcome = head.code, "answered"
        if call.kind is Kind.SDP:
            self.later(0.3, lambda: self._hang_up(head, reply, route, call, number + 1))
            return
        cseq = number + 1
        if call.kind is Kind.FUZZ and self.dialog_rng.random() < 0.3:
            cseq = self._fuzz_in_dialog(head, reply, route, cseq)
        self._hang_up(head, reply, route, call, cseq)

    def _recorded(
        self, call_id: str, invite: bytes, reply: Callable[[bytes], None]
    ) -> Callable[[bytes], None]:
        """``reply`` that also keeps what it sends in the call's transcript (dropped once
        the hang-up is answered 200): the reproducer of a call the server never ends."""
        if len(self.stats.transcripts) >= TRANSCRIPTS_KEPT:
            return reply
        transcript = self.stats.transcripts.setdefault(call_id, [invite])

        def recording(message: bytes) -> None:
            transcript.append(message[:KEPT_BYTES])
            reply(message)

        return recording

    def _fuzz_in_dialog(
        self, head: Head, reply: Callable[[bytes], None], route: Route, cseq: int
    ) -> int:
        """Mutated requests inside a real dialog (re-INVITE, INFO, UPDATE, BYE...)."""
        fields = DialogFields(head.call_id, head.tag("from"), head.tag("to"), cseq, "")
        for _ in range(self.dialog_rng.randint(1, 4)):
            fields.branch = f"z9hG4bKd{next(self._ids):x}"
            seed = self.dialog_rng.choice(self.dialog_seeds)
            data = render(seed, route, fields, self._body(seed, self.dialog_rng))
            if self.dialog_rng.random() < 0.8:
                data, applied = Mutator(self.dialog_rng).mutate(data, data)
                self.stats.mutations.update(applied)
            reply(data)
            self.stats.inputs[route.transport] += 1
            self.stats.in_dialog += 1
            fields.cseq += 1
        return fields.cseq

    def _hang_up(
        self,
        head: Head,
        reply: Callable[[bytes], None],
        route: Route,
        call: CallState,
        cseq: int,
    ) -> None:
        if call.hung_up:
            return
        call.hung_up = True
        reply(in_dialog_request("BYE", head, self._via(route), cseq, call.request_uri))
        self.stats.hangups += 1

    def _via(self, route: Route) -> str:
        host, port = route.local
        branch = f"z9hG4bKa{next(self._ids):x}"
        return f"SIP/2.0/{route.transport.upper()} {host}:{port};branch={branch};rport"

    # -- liveness ---------------------------------------------------------------------

    def _send_probe(self, now: float) -> None:
        self._next_probe = now + PROBE_INTERVAL
        for call_id, sent in list(self._probe_sent.items()):
            if now - sent > PROBE_LOST_AFTER:
                self.stats.probes_lost += 1
                del self._probe_sent[call_id]
        call_id = f"probe-{next(self._ids)}@{LOOPBACK}"
        host, port = self.probe.getsockname()[:2]
        message = (
            f"OPTIONS sip:probe@{self.target[0]}:{self.target[1]} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bKp{next(self._ids):x};rport\r\n"
            f"From: <sip:probe@{host}>;tag=probe\r\nTo: <sip:probe@{self.target[0]}>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
            "Content-Length: 0\r\n\r\n"
        )
        with contextlib.suppress(OSError):
            self.probe.sendto(message.encode(), self.target)
            self._probe_sent[call_id] = now
            self.stats.probes += 1

    def _on_probe_answer(self, data: bytes) -> None:
        head = parse_head(data)
        if head is None:
            return
        sent = self._probe_sent.pop(head.call_id, None)
        if sent is not None:
            took = (time.monotonic() - sent) * 1000
            self.stats.probe_max_ms = max(self.stats.probe_max_ms, took)

    # -- the end of a phase -----------------------------------------------------------

    def settle(self, deadline: float) -> None:
        """Flush TCP and answer what comes back until nothing is pending (INVITEs at a
        provisional response judged, timers run) or ``deadline``."""
        while time.monotonic() < deadline:
            self._flush_tcp()
            self.poll(0.05)
            self._judge_ringing(time.monotonic())
            busy = any(c.pending for c in self.conns)
            if not self.ringing and not busy and not self.timers:
                break

    def _judge_ringing(self, now: float) -> None:
        """An INVITE answered 1xx and then nothing for PROVISIONAL_LIMIT: the server left
        a call half set up (issue 13, item 2). Counted, kept as a reproducer, cancelled."""
        while self.ringing:
            call_id, call = next(iter(self.ringing.items()))
            if call.final is not None or call.outcome:
                del self.ringing[call_id]
                continue
            if call.conn is not None and call.conn.closed:
                del self.ringing[call_id]
                call.outcome = "TCP connection closed"  # its answer had nowhere to go
                continue
            if now - (call.provisional_at or now) < PROVISIONAL_LIMIT:
                break
            del self.ringing[call_id]
            self.stats.provisional_only += 1
            self._reproducer("provisional-only", call.data)
            self._cancel(call, Route("udp", self.udp.getsockname()[:2], self.target))
            call.outcome = "provisional only"

    def _reproducer(self, what: str, data: bytes) -> None:
        if len(self.stats.reproducers) >= 20 or not data:
            return
        path = self.workdir / f"repro-{what}-{len(self.stats.reproducers) + 1}.sip"
        path.write_bytes(data)
        self.stats.reproducers.append(str(path))

    # -- RFC 4475, once each -------------------------------------------------------------

    def torture(self, wait: float = 2.0) -> dict[str, dict[str, str]]:
        """Each torture message once over UDP and once on a fresh TCP connection; what
        came back for each (the first response's status, or "-" for none)."""
        results: dict[str, dict[str, str]] = {}
        for seed in self.torture_seeds:
            head = parse_head(seed.text)
            if head is not None and head.call_id:
                self._watch[head.call_id] = seed.name
            results[seed.name] = {"udp": "-", "tcp": "-"}
            if seed.method == "INVITE":
                self._remember_invite(seed.text, Kind.TORTURE, seed.name)
            with contextlib.suppress(OSError):
                self.udp.sendto(seed.text, self.target)
        self._collect(results, "udp", wait)
        for seed in self.torture_seeds:
            try:
                sock = socket.create_connection(self.target, timeout=2)
            except OSError:
                continue
            conn = _Conn(sock)
            sock.setblocking(False)
            self.sel.register(sock, selectors.EVENT_READ, ("tcp", conn))
            conn.pending.append((seed.text, False))
            self.conns.append(conn)
            self._flush_tcp()
        self._collect(results, "tcp", wait)
        for conn in list(self.conns):
            self._close_conn(conn)
        self.conns.clear()
        self._watch = {}
        return results

    def _collect(self, results: dict[str, dict[str, str]], kind: str, wait: float) -> None:
        self._seen = {}
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            self._flush_tcp()
            self.poll(0.05)
        for name, code in self._seen.items():
            results[name][kind] = code

    # -- SDP offers --------------------------------------------------------------------

    def sdp_calls(self, offers: list[tuple[str, bytes]], window: int = 8) -> list[CallState]:
        """One clean INVITE per offer (a few at a time): answered calls are held 0.3 s and
        hung up, refusals ACKed, a call left ringing cancelled after 5 s; each gets an
        outcome within 15 s."""
        seed = next(s for s in self.templates if s.name == "invite_sdp")
        route = Route("udp", self.udp.getsockname()[:2], self.target)
        todo = deque(offers)
        active: list[CallState] = []
        done: list[CallState] = []
        while todo or active:
            while todo and len(active) < window:
                name, body = todo.popleft()
                data = render(seed, route, self.fields(), body)
                call_id = self._remember_invite(data, Kind.SDP, name)
                call = self.calls[call_id]
                with contextlib.suppress(OSError):
                    self.udp.sendto(data, self.target)
                self.stats.inputs["sdp"] += 1
                active.append(call)
            self.poll(0.02)
            now = time.monotonic()
            for call in list(active):
                age = now - call.sent_at
                if call.outcome == "answered" and call.ended:
                    call.outcome = "answered, hung up"
                if call.final is not None and call.outcome != "answered":
                    active.remove(call)
                    done.append(call)
                elif call.final is None and call.provisional_at is not None and age > 5:
                    if not call.outcome:
                        self._reproducer("sdp-ringing", call.data)
                    self._cancel(call, route)
                elif age > 15:
                    call.outcome = call.outcome or "no final response"
                    if call.outcome == "answered":
                        call.outcome = "answered, BYE unanswered"
                    if call.outcome == "no final response":
                        self._reproducer("sdp-unanswered", call.data)
                    active.remove(call)
                    done.append(call)
            if not self.alive():
                break
        return done

    def _cancel(self, call: CallState, route: Route) -> None:
        if call.outcome:
            return
        head = parse_head(call.data)
        if head is None:
            return
        via = head.get("via")
        message = cancel_for(head, via, call.request_uri)
        with contextlib.suppress(OSError):
            self.udp.sendto(message, self.target)
        call.outcome = "cancelled after 1xx"
        self.stats.cancels += 1
