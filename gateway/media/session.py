"""The per-call RTP endpoint: one UDP socket, paced sending, reception and DTMF.

Sending is driven by the shared :class:`~gateway.media.pacer.Pacer` tick, never by a timer
of its own, so hundreds of calls cost one wake-up per 20 ms. Like a real phone the session
sends a continuous stream (silence between prompts), which keeps NAT bindings and the far
end's jitter buffer alive and makes the far end's echo of our stream measurable.

When the native sender (:mod:`gateway.media.native`) is built, the packets themselves go out
from its C thread instead: the session keeps ~160 ms queued there (topped up every few
ticks) and, whenever what is to be sent changes (a prompt, barge-in, a DTMF event, hold, a
codec, address or SRTP change), drops what is queued and rewinds its position to the first
packet not sent, so the wire stays one contiguous stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import ipaddress
import itertools
import logging
import secrets
import socket
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gateway.media import native
from gateway.media.dtmf import (
    DtmfDigit,
    GoertzelDetector,
    Rfc4733Receiver,
    feed_all,
    rfc4733_packets,
)
from gateway.media.g711 import SILENCE, Decoder, Encoder, decoder_for, encoder_for
from gateway.media.pacer import Pacer
from gateway.media.rtp import RtpPacket, RtpReceiver, RtpSender, is_rtcp
from gateway.media.sdp import NegotiatedMedia
from gateway.media.source import (
    Address,
    RtpSourceFilter,
    SourceVerdict,
    is_hold_address,
    normalize_host,
)
from gateway.media.srtp import SrtpError, SrtpStream
from gateway.metrics import RTP_DROPPED_BY_REASON, RtpDropReason

__all__ = ["AudioListener", "MediaSession", "MediaSessionClosed", "MediaStats", "NoFreeRtpPort"]

logger = logging.getLogger(__name__)

AudioListener = Callable[[NDArray[np.int16]], None]
# NegotiatedMedia.direction is our side's: "recvonly"/"inactive" mean we are on hold.
_SENDING_DIRECTIONS = frozenset({"sendrecv", "sendonly"})
_DROPPED_FOREIGN = RTP_DROPPED_BY_REASON[RtpDropReason.FOREIGN_SOURCE]
_DROPPED_MALFORMED = RTP_DROPPED_BY_REASON[RtpDropReason.MALFORMED]
# Enum member lookup costs ~120 ns on Python 3.11; the verdicts are tested per datagram.
_DROP, _LEARN = SourceVerdict.DROP, SourceVerdict.LEARN
_MAX_GAP_FILL = 8000  # samples of silence inserted for a timestamp gap (1 s at 8 kHz)
# In-band detection runs on 400 ms batches: the detector's cost is almost all per call
# (~150 us), so per 20 ms packet it would dominate the receive path of hundreds of calls.
# The batches of all sessions on one pacer are then classified together on the next tick
# (see _InbandScanner). A key press is still recognised well under a second after it starts.
_INBAND_BATCH = 3200
_INBAND_MAX_AGE = 0.6
# Sessions whose batches one tick classifies, the oldest first; the rest wait for the next
# tick. Calls set up together fill their batches together: a thousand scanned in one tick
# took ~100 ms on this 2-core box, five ticks late for every call. A thousand calls hand
# over 2,500 batches a second, 50 a tick, so 64 keeps up while bounding a tick's scan
# to ~6 ms; a backlog (a burst of aligned batches) delays digits by a few ticks at most.
_INBAND_SESSIONS_PER_TICK = 64
_HOUSEKEEPING_TICKS = 3
_ENCODE_CHUNK = 8000  # samples of a prompt encoded at a time
# Native sending: packets kept queued in the sender thread, topped up every tenth tick (the
# per-call cost is per top-up, not per packet): at least 8 x 20 ms = 160 ms just before a
# top-up, plus three times as many as the pacer's ticks have lately been late, so a busy
# loop (a collection, a burst of setups, a loaded box) does not leave the wire without
# packets. Anything queued that should change is dropped and rewound anyway, so a deeper
# queue delays nothing.
_NATIVE_AHEAD = 8
_NATIVE_TOPUP_TICKS = 10
_NATIVE_MAX_AHEAD = 100  # 2 s, within the sender's ring of 128
# Longer frames (ptime 80 ms and up) stay on the Python pacer.
_NATIVE_MAX_TICKS_PER_FRAME = 3


class MediaSessionClosed(RuntimeError):
    """The session closed before the requested media was sent."""


class NoFreeRtpPort(OSError):
    """Every RTP port of the configured range is taken: a new call cannot have media.

    Its own type, so an inbound INVITE can be turned away with 503 + Retry-After (calls
    end and free ports) instead of a 500, and a dial names the exhausted range."""

    def __init__(self, port_range: tuple[int, int]) -> None:
        low, high = port_range
        super().__init__(errno.EADDRINUSE, f"no free RTP port in {low}-{high}")
        self.port_range = port_range

    def __str__(self) -> str:
        return str(self.strerror)


@dataclass(frozen=True, slots=True)
class MediaStats:
    """Counters of one session; ``jitter`` is the RFC 3550 interarrival jitter in ms."""

    packets_sent: int = 0
    packets_received: int = 0
    duplicates: int = 0
    ssrc_changes: int = 0
    reordered: int = 0
    jitter: float = 0.0
    lost: int = 0
    late: int = 0
    malformed: int = 0
    foreign: int = 0
    rtcp: int = 0
    unconfigured: int = 0
    other_payload: int = 0
    send_dropped: int = 0
    send_errors: int = 0


@dataclass(eq=False, slots=True)
class _PlayItem:
    pcm: NDArray[np.int16]
    future: asyncio.Future[None]
    # A window of pcm encoded with the current codec, starting at sample ``data_start``:
    # encoding a second at a time amortises numpy overhead without a second full copy.
    data: bytes | None = None
    data_start: int = 0
    pos: int = 0  # samples (= bytes, G.711 is one byte per sample) already sent


@dataclass(eq=False, slots=True)
class _DtmfJob:
    packets: list[tuple[bytes, bool, int]]
    future: asyncio.Future[None]
    index: int = 0
    start_ts: int | None = None


class _RunKind(enum.Enum):
    AUDIO = "audio"
    SILENCE = "silence"
    EVENT = "event"


@dataclass(eq=False, slots=True)
class _Run:
    """Packets handed to the native sender in one go, with the session's position before
    them: enough to rewind to any of them if they are dropped unsent, and to know what has
    really gone out (``final``: the last packet of a prompt or DTMF event)."""

    kind: _RunKind
    start: int  # index of the first packet among all pushed to the stream
    count: int
    seq: int
    ts: int
    marker_pending: bool
    talking: bool
    protected: bool  # SRTP: these sequence numbers are spent even if never sent
    item: _PlayItem | None = None
    samples: int = 160  # per packet
    pos: int = 0  # the item's sample position, or the job's packet index, before the run
    job: _DtmfJob | None = None
    job_start_ts: int | None = None
    final: bool = False


@dataclass(slots=True)
class _Counters:
    malformed: int = 0
    foreign: int = 0
    rtcp: int = 0
    unconfigured: int = 0
    other_payload: int = 0
    send_dropped: int = 0
    send_errors: int = 0
    packets_sent: int = 0
    # What of foreign/malformed Prometheus has been told (see MediaSession._report_drops).
    foreign_reported: int = 0
    malformed_reported: int = 0


@dataclass(slots=True)
class _Segment:
    decoder: Decoder
    codes: bytearray = field(default_factory=bytearray)


class _AudioHistory:
    """Received audio kept as G.711 codes (half the memory of PCM), decoded on demand.

    Trimming to ``capacity`` happens only once a quarter of slack has built up, so the
    front-of-buffer copy is paid every ~15 s of audio, not on every packet.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._segments: deque[_Segment] = deque()
        self._size = 0

    def append(self, decoder: Decoder, codes: bytes) -> None:
        if not self.capacity:
            return  # no history kept (the gateway's default: listeners get the audio)
        if not self._segments or self._segments[-1].decoder is not decoder:
            self._segments.append(_Segment(decoder))
        self._segments[-1].codes += codes
        self._size += len(codes)
        if self._size > self.capacity + self.capacity // 4:
            self._trim()

    def _trim(self) -> None:
        excess = self._size - self.capacity
        while excess > 0:
            first = self._segments[0]
            if len(first.codes) <= excess:
                self._segments.popleft()
                excess -= len(first.codes)
                self._size -= len(first.codes)
            else:
                del first.codes[:excess]
                self._size -= excess
                excess = 0

    def pcm(self) -> NDArray[np.int16]:
        parts = [seg.decoder(bytes(seg.codes)) for seg in self._segments]
        pcm = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)
        return pcm[-self.capacity :] if self.capacity else pcm[:0]


def _zero() -> int:
    return 0


_silence_runs: dict[bytes, bytes] = {}


def _silence_run(frame: bytes, frames: int) -> memoryview:
    """``frames`` frames of silence, sliced from one block per codec and frame size."""
    block = _silence_runs.get(frame)
    if block is None:
        block = _silence_runs[frame] = frame * _NATIVE_MAX_AHEAD
    return memoryview(block)[: len(frame) * frames]


def _address_family(host: str) -> socket.AddressFamily:
    """Socket family for binding ``host`` (an IP literal, or a name to resolve)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)[0][0]
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


class _InbandScanner:
    """Runs the in-band DTMF detection of the sessions on one pacer in one vectorised pass
    (``feed_all``) per tick, rather than one detector pass per session per batch, at most
    ``_INBAND_SESSIONS_PER_TICK`` of them per tick, first submitted first.

    It is a paced stream itself, registered only while some session has a batch waiting,
    so an idle gateway's pacer still stops.
    """

    def __init__(self, pacer: Pacer) -> None:
        self._pacer = pacer
        self._waiting: dict[int, MediaSession] = {}

    def submit(self, session: MediaSession) -> None:
        if not self._waiting:
            self._pacer.register(self)
        self._waiting[id(session)] = session

    def discard(self, session: MediaSession) -> None:
        self._waiting.pop(id(session), None)

    def on_tick(self, now: float) -> None:
        waiting = self._waiting
        if len(waiting) <= _INBAND_SESSIONS_PER_TICK:
            self._waiting = {}
            self._pacer.unregister(self)
            _scan(list(waiting.values()))
            return
        # Oldest first (dicts keep insertion order; a resubmitting session keeps its place).
        keys = list(itertools.islice(waiting, _INBAND_SESSIONS_PER_TICK))
        _scan([waiting.pop(key) for key in keys])


_scanners: weakref.WeakKeyDictionary[Pacer, _InbandScanner] = weakref.WeakKeyDictionary()


def _scanner_for(pacer: Pacer) -> _InbandScanner:
    scanner = _scanners.get(pacer)
    if scanner is None:
        scanner = _scanners[pacer] = _InbandScanner(pacer)
    return scanner


def _scan(sessions: list[MediaSession]) -> None:
    """Detect in-band digits in the submitted audio of ``sessions`` and deliver them."""
    jobs = []
    owners = []
    for session in sessions:
        job = session._take_inband()
        if job is not None:
            jobs.append(job)
            owners.append(session)
    for session, digits in zip(owners, feed_all(jobs), strict=True):
        session._push_all(digits)


class _RtpProtocol(asyncio.DatagramProtocol):
    def __init__(self, session: MediaSession) -> None:
        self._session = session

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            self._session._on_datagram(data, addr)
        except Exception:
            # Whatever arrives from the network must not take down the receive path.
            self._session._count_malformed()
            logger.exception("RTP datagram from %s could not be handled", addr)

    def error_received(self, exc: Exception) -> None:
        self._session._protocol_error(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._session._on_connection_lost()


class MediaSession:
    """The RTP endpoint of one call leg.

    ``open`` binds the socket; ``configure`` (again on every re-INVITE) says where to send
    and with which codec; from then on every pacer tick sends one frame: queued audio,
    a DTMF event packet, or silence. Received RTP is reordered, kept for recording, and
    scanned for RFC 4733 and in-band digits, which land in ``digits``. In-band detection
    works on 400 ms batches (see ``_INBAND_BATCH``), so those digits arrive up to ~0.5 s
    after the tone; ``inband_dtmf=False`` skips it where the far end is known to use
    RFC 4733.

    RTP is accepted only from the far end's media source (see
    :mod:`gateway.media.source`): the SDP address or, for NAT, one source latched before
    that address is heard, on the SDP's IP or on one of ``trusted_hosts`` (the call's
    signalling peer); our stream then goes there too. Anything else is dropped unparsed and
    counted (``MediaStats.foreign``, ``ackline_rtp_dropped_packets_total``).
    ``latch_any_source`` latches to whoever sends first, for media from an unrelated
    address; it is off because that whoever may be a stranger pressing keys.
    """

    def __init__(
        self,
        *,
        local_host: str,
        pacer: Pacer,
        port_range: tuple[int, int] = (20000, 30000),
        clock: Callable[[], float] | None = None,
        history_seconds: float = 60.0,
        jitter_depth: int = 3,
        inband_dtmf: bool = True,
        trusted_hosts: Iterable[str] = (),
        latch_any_source: bool = False,
        native_send: bool | None = None,
    ) -> None:
        self.local_host = local_host
        self.pacer = pacer
        self.port_range = port_range
        if not 0 < port_range[0] <= port_range[1] <= 65535 or not self._candidate_ports():
            raise ValueError(f"no even RTP port in range {port_range}")
        self.local_port = 0
        self.digits: asyncio.Queue[DtmfDigit] = asyncio.Queue()
        self._clock = clock
        self._transport: asyncio.DatagramTransport | None = None
        self._sock: socket.socket | None = None
        self._buffered: Callable[[], int] = _zero
        self._lost_waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._counters = _Counters()

        self._media: NegotiatedMedia | None = None
        self._source_filter = RtpSourceFilter(trusted_hosts, latch_any_source=latch_any_source)
        self._send_to: Address | None = None  # the filter's, kept here for the send path
        self._sending = False
        self._srtp: SrtpStream | None = None

        self._sender: RtpSender | None = None
        self._codec = ""
        self._encode: Encoder | None = None
        # What we take on receive: audio payload types to (codec, decoder), and the
        # telephone-event ones (the offer's and the answer's numbers, see NegotiatedMedia).
        self._decoders: dict[int, tuple[str, Decoder]] = {}
        self._event_pts: frozenset[int] = frozenset()
        self._silence = b""
        self._frame_samples = 160
        self._ticks_per_frame = 1
        self._tick_phase = 0
        self._last_tick: float | None = None
        self._housekeeping = 0
        self._marker_pending = True  # first packet of the stream starts a talkspurt
        self._talking = False
        self._max_buffered = 0

        self._queue: deque[_PlayItem] = deque()
        self._dtmf: deque[_DtmfJob] = deque()
        # Native sending (None: not built or switched off; see the module docstring).
        self._native_send = native.available() and native_send is not False
        self._native_period = 1
        self._native: native.NativeStream | None = None
        self._native_runs: deque[_Run] = deque()
        self._native_pushed = 0  # packets pushed to the current stream, the runs' index
        # Loop times of the last top-up and of the next one due.
        self._native_topped = 0.0
        self._native_due = 0.0
        self._native_sent = 0  # packets and errors of streams already closed
        self._native_errors = 0

        self._receiver = RtpReceiver(8000, depth=jitter_depth)
        self._events = Rfc4733Receiver(8000)
        self._events_seen = False
        self._inband = GoertzelDetector(8000) if inband_dtmf else None
        self._inband_batch: list[bytes] = []  # payloads, decoded once per batch
        self._inband_decode: Decoder | None = None  # the batch's codec
        self._inband_samples = 0
        self._inband_since = 0.0  # arrival time of the batch's first packet
        # Decoded batches handed to the scanner, with the arrival time of their first sample.
        self._inband_pending: list[NDArray[np.int16]] = []
        self._inband_pending_since = 0.0
        self._scanner = _scanner_for(pacer)
        self._sources: dict[tuple[str | Any, int], Address] = {}
        self._history = _AudioHistory(int(history_seconds * 8000))
        self._rx_ssrc: int | None = None
        self._rx_next_ts = 0
        self._listeners: list[AudioListener] = []

    # -- lifecycle ------------------------------------------------------------------

    async def open(self) -> int:
        """Bind an even UDP port in ``port_range`` (RTCP convention) and start ticking."""
        if self._transport is not None or self._closed:
            raise RuntimeError("media session already opened")
        loop = asyncio.get_running_loop()
        candidates = self._candidate_ports()
        offset = secrets.randbelow(len(candidates))
        last_error: OSError | None = None
        family = _address_family(self.local_host)
        for port in candidates[offset:] + candidates[:offset]:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.bind((self.local_host, port))
            except OSError as exc:
                sock.close()
                if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                    raise
                last_error = exc
                continue
            sock.setblocking(False)
            # We keep the socket object itself: frames go out with a direct sendto while
            # the transport has nothing queued (see _transmit), reception stays asyncio's.
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _RtpProtocol(self), sock=sock
            )
            self._sock = sock
            self._transport = transport
            # Selector transports queue unsent datagrams without limit; typeshed does not
            # declare the size query on DatagramTransport.
            self._buffered = getattr(transport, "get_write_buffer_size", _zero)
            self._lost_waiter = loop.create_future()
            self.local_port = port
            if self._clock is None:
                self._clock = loop.time
            self.pacer.register(self)
            return port
        raise NoFreeRtpPort(self.port_range) from last_error

    def _candidate_ports(self) -> list[int]:
        """Even ports, leaving port + 1 inside the range free for RTCP by convention."""
        low, high = self.port_range
        first = low + (low % 2)
        return list(range(first, high, 2)) or ([first] if first <= high else [])

    async def close(self) -> None:
        """Stop sending, fail pending DTMF, cancel playback and release the socket."""
        if self._closed:
            return
        self._closed = True
        self.pacer.unregister(self)
        self._native_close()
        self.stop_playback()
        while self._dtmf:
            job = self._dtmf.popleft()
            if not job.future.done():
                job.future.set_exception(MediaSessionClosed("media session closed"))
        if self._clock is not None:
            now = self._clock()
            for packet in self._receiver.flush():
                self._handle(packet, now)
            self._detect_inband()
            self._scanner.discard(self)
            _scan([self])  # what is left, now rather than on a tick that never comes
            self._push_all(self._events.flush(now + self._events.timeout))
        self._report_drops()
        transport, self._transport = self._transport, None
        self._sock = None  # the transport closes it
        if transport is not None:
            transport.close()
            if self._lost_waiter is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._lost_waiter), 1.0)

    def _on_connection_lost(self) -> None:
        if self._lost_waiter is not None and not self._lost_waiter.done():
            self._lost_waiter.set_result(None)

    # -- negotiation ------------------------------------------------------------------

    def configure(self, media: NegotiatedMedia) -> None:
        """Apply a (re-)negotiated stream; a held stream keeps its clock but sends nothing."""
        codec = media.codec.upper()
        encode = encoder_for(codec)
        remote = (normalize_host(media.remote_host), media.remote_port)
        if self._source_filter.set_remote(remote):
            self._send_to = self._source_filter.send_to
        self._sending = media.direction in _SENDING_DIRECTIONS and not is_hold_address(remote)
        tick_ms = self.pacer.ptime_ms
        self._ticks_per_frame = max(1, round(media.ptime / tick_ms)) if media.ptime else 1
        if self._ticks_per_frame * tick_ms != media.ptime:
            logger.warning(
                "ptime %s ms is not a multiple of the %s ms pacer tick; sending %s ms frames",
                media.ptime,
                tick_ms,
                self._ticks_per_frame * tick_ms,
            )
        self._frame_samples = media.clock_rate * self._ticks_per_frame * tick_ms // 1000
        if codec != self._codec:
            for item in self._queue:
                item.data = None  # re-encode the unsent rest with the new codec
            self._marker_pending = True
        self._codec, self._encode = codec, encode
        self._silence = bytes((SILENCE[codec],)) * self._frame_samples
        self._decoders = {
            pt: (name.upper(), decoder_for(name)) for pt, name in media.receive_audio.items()
        }
        self._event_pts = media.receive_events
        self._receiver.clock_rate = media.clock_rate
        # Datagrams beyond a few frames in the socket's send buffer are stale audio.
        self._max_buffered = 4 * (12 + self._frame_samples)
        if self._sender is None:
            self._sender = RtpSender(
                media.payload_type, event_payload_type=media.telephone_event_pt
            )
        else:
            self._sender.payload_type = media.payload_type
            self._sender.event_payload_type = media.telephone_event_pt
        self._media = media
        self._native_replan()

    def set_srtp(self, stream: SrtpStream | None) -> None:
        """Protect every RTP packet sent and unprotect every one received with ``stream``
        (None: plain RTP). Received packets failing SRTP authentication count as malformed."""
        if self._native is not None:
            self._native_rewind(self._native)  # what is queued was protected with the old key
        self._srtp = stream
        self._native_replan()

    @property
    def media(self) -> NegotiatedMedia | None:
        return self._media

    @property
    def sending(self) -> bool:
        """False before ``configure`` and while on hold."""
        return self._sending and self._sender is not None and not self._closed

    @property
    def remote_address(self) -> Address | None:
        """Where RTP goes: the SDP address, or the latched source address (a hold address
        in SDP leaves it as it was)."""
        return self._send_to

    # -- sending --------------------------------------------------------------------

    def play(self, pcm: NDArray[np.int16]) -> asyncio.Future[None]:
        """Queue 8 kHz int16 audio; the future resolves once its last frame is sent, or is
        cancelled by ``stop_playback``/``close``. On hold, playback pauses rather than
        running on unheard."""
        if pcm.dtype != np.int16 or pcm.ndim != 1:
            raise TypeError("play() takes a 1-D int16 array of 8 kHz samples")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._closed:
            future.cancel()
        elif len(pcm) == 0:
            future.set_result(None)
        else:
            self._queue.append(_PlayItem(pcm, future))
            future.add_done_callback(self._on_play_done)
            self._native_replan()
        return future

    def _on_play_done(self, future: asyncio.Future[None]) -> None:
        # A caller giving up on its prompt (wait_for timing out) takes it off the wire now,
        # not after the ~160 ms already queued in the native sender.
        if not future.cancelled() or self._native is None:
            return
        for item in self._queue:
            if item.future is future:
                self._queue.remove(item)
                break
        # A top-up may have dropped it from the queue already, not what it had queued.
        if any(run.item is not None and run.item.future is future for run in self._native_runs):
            self._native_replan()

    def stop_playback(self) -> None:
        """Barge-in: drop queued audio and cancel the pending play futures."""
        queue, self._queue = self._queue, deque()
        for item in queue:
            item.future.cancel()
        if queue:
            self._native_replan()

    @property
    def playing(self) -> bool:
        """True while queued audio remains (paused audio on hold included)."""
        return any(not item.future.cancelled() for item in self._queue)

    async def send_digit(self, digit: str, duration_ms: int = 100) -> None:
        """Send one RFC 4733 event, one packet per frame on the pacer tick; queued audio
        waits meanwhile. Returns when the last (redundant) end packet was sent."""
        if self._closed:
            raise MediaSessionClosed("media session closed")
        if self._media is None or self._media.telephone_event_pt is None:
            raise RuntimeError("no telephone-event payload type negotiated")
        if not self._sending:
            raise RuntimeError("media is on hold or not sending")
        packets = rfc4733_packets(
            digit, duration_ms=duration_ms, samples_per_packet=self._frame_samples
        )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._dtmf.append(_DtmfJob(packets, future))
        self._native_replan()
        # If the caller is cancelled the job still runs to its end packets, so the far end
        # never sees an event that starts and never stops.
        await future

    def on_tick(self, now: float) -> None:
        """Pacer callback: housekeeping for reception, then at most one frame out."""
        sender = self._sender
        if sender is None or self._transport is None:
            return
        self._housekeeping -= 1
        if self._housekeeping <= 0:
            # Every few ticks is plenty for timeouts of 60 ms and more, and keeps the
            # per-tick cost of hundreds of calls down to sending.
            self._housekeeping = _HOUSEKEEPING_TICKS
            if self._receiver.pending or self._events_seen or self._inband_batch:
                self._poll_receive()
            self._report_drops()
        if self._native is not None:
            # The sender thread sends; this only keeps its queue ahead.
            self._last_tick = now
            if now >= self._native_due:
                # On the loop's clock, not counted in ticks: a loop too busy to run every
                # tick (the pacer skips some) still tops up in time, and deeper.
                gap, self._native_topped = now - self._native_topped, now
                self._native_due = now + _NATIVE_TOPUP_TICKS * self.pacer.period
                self._native_top_up(self._native, gap)
            return
        if self._last_tick is None:
            elapsed = 1
        else:
            elapsed = round((now - self._last_tick) / self.pacer.period)
            if elapsed <= 0:
                return
        self._last_tick = now
        self._tick_phase += elapsed
        if self._tick_phase < self._ticks_per_frame:
            return
        frames, self._tick_phase = divmod(self._tick_phase, self._ticks_per_frame)
        samples = self._frame_samples
        if frames > 1:
            # Ticks the loop could not run: keep the media clock on real time.
            sender.advance_timestamp((frames - 1) * samples)
            self._marker_pending = True
        if not self._sending:
            sender.advance_timestamp(samples)
            self._marker_pending = True
            return
        if self._dtmf:
            self._send_event(sender, samples)
            return
        payload, finished = self._next_audio(samples)
        marker = self._marker_pending or (payload is not self._silence and not self._talking)
        self._talking = payload is not self._silence
        self._marker_pending = False
        self._transmit(sender.next_packet(payload, samples=samples, marker=marker))
        for future in finished:
            if not future.done():
                future.set_result(None)

    def _next_audio(self, samples: int) -> tuple[bytes, Sequence[asyncio.Future[None]]]:
        queue = self._queue
        if not queue:
            return self._silence, ()
        item = queue[0]
        data = item.data
        if data is not None and item.pos + samples < len(item.pcm):
            # Fast path: a whole frame inside the encoded window of an unfinished item.
            offset = item.pos - item.data_start
            if offset + samples <= len(data) and not item.future.cancelled():
                item.pos += samples
                return data[offset : offset + samples], ()
        parts: list[bytes] = []
        finished: list[asyncio.Future[None]] = []
        need = samples
        while need and queue:
            item = queue[0]
            if item.future.cancelled():
                queue.popleft()  # the caller gave up on it (e.g. wait_for timed out)
                continue
            data = item.data
            if data is None or item.pos >= item.data_start + len(data):
                assert self._encode is not None
                item.data_start = item.pos
                data = item.data = self._encode(item.pcm[item.pos : item.pos + _ENCODE_CHUNK])
            offset = item.pos - item.data_start
            chunk = data[offset : offset + need]
            item.pos += len(chunk)
            need -= len(chunk)
            parts.append(chunk)
            if item.pos >= len(item.pcm):
                queue.popleft()
                finished.append(item.future)
        if not parts:
            return self._silence, finished
        if need:
            parts.append(self._silence[:need])
        return b"".join(parts), finished

    def _send_event(self, sender: RtpSender, samples: int) -> None:
        job = self._dtmf[0]
        if job.start_ts is None:
            job.start_ts = sender.timestamp
        payload, marker, offset = job.packets[job.index]
        job.index += 1
        self._transmit(sender.event_packet(payload, marker, job.start_ts + offset))
        sender.advance_timestamp(samples)  # audio resumes at the event's end time
        if job.index >= len(job.packets):
            self._dtmf.popleft()
            self._marker_pending = True
            if not job.future.done():
                job.future.set_result(None)

    def _transmit(self, data: bytes) -> None:
        transport, sock, address = self._transport, self._sock, self._send_to
        if transport is None or sock is None or address is None:
            return
        if self._srtp is not None:
            data = self._srtp.protect(data)
        buffered = self._buffered()
        if buffered == 0:
            # Nothing queued in the transport, so sending directly keeps datagram order and
            # skips asyncio's sendto wrapper (a fifth of the per-frame cost); what it does
            # on errors is repeated here.
            try:
                sock.sendto(data, address)
            except (BlockingIOError, InterruptedError):
                transport.sendto(data, address)  # queued; asyncio writes it when it can
            except OSError as exc:
                self._protocol_error(exc)
                return
        elif buffered > self._max_buffered:
            self._counters.send_dropped += 1
            return
        else:
            transport.sendto(data, address)
        self._counters.packets_sent += 1

    def _protocol_error(self, exc: Exception) -> None:
        # Typically ICMP port unreachable while the far end is not listening yet.
        self._counters.send_errors += 1
        logger.debug("RTP socket error on port %s: %s", self.local_port, exc)

    # -- native sending -------------------------------------------------------------

    def _native_wanted(self) -> bool:
        return (
            self._native_send
            and self._sending
            and not self._closed
            and self._sock is not None
            and self._send_to is not None
            and self._sender is not None
            and self._ticks_per_frame <= _NATIVE_MAX_TICKS_PER_FRAME
        )

    def _native_replan(self) -> None:
        """What is to be sent changed: drop what the sender thread has queued, rewind to the
        first packet not sent and queue afresh (on a new stream when the address or frame
        period changed; on none while on hold, when the pacer tick keeps the media clock)."""
        stream = self._native
        if stream is None and not self._native_send:
            return
        if stream is not None:
            self._native_rewind(stream)
        if not self._native_wanted():
            self._native_close()
            return
        sock, address = self._sock, self._send_to
        assert sock is not None
        assert address is not None
        if (
            stream is None
            or stream.address != address
            or self._native_period != self._ticks_per_frame
        ):
            self._native_close()
            try:
                stream = native.NativeStream(sock.fileno(), address, period=self._ticks_per_frame)
            except (ValueError, OSError) as exc:
                # e.g. a host name, not an address, in the SDP: the Python pacer sends instead.
                logger.info("RTP port %s: not using the native sender: %s", self.local_port, exc)
                self._native_send = False
                return
            self._native, self._native_period, self._native_pushed = (
                stream,
                self._ticks_per_frame,
                0,
            )
        # This is a top-up; the next comes at a random phase so calls replanned together
        # (one prompt started on all of them) do not top up on the same tick ever after.
        now = self._now()
        self._native_topped = now
        self._native_due = now + (1 + secrets.randbelow(_NATIVE_TOPUP_TICKS)) * self.pacer.period
        self._native_fill(stream, 0)

    def _native_close(self) -> None:
        stream, self._native = self._native, None
        if stream is None:
            return
        self._native_rewind(stream)
        counters = stream.stats()
        self._native_sent += counters.sent
        self._native_errors += counters.errors
        stream.close()

    def _native_top_up(self, stream: native.NativeStream, gap: float) -> None:
        queued = stream.queued()
        self._native_reap(self._native_pushed - queued)
        self._native_fill(stream, queued, gap)

    def _native_reap(self, sent: int) -> None:
        """Forget the runs sent in full; a prompt or DTMF event whose last packet has gone
        out is complete."""
        runs = self._native_runs
        while runs and runs[0].start + runs[0].count <= sent:
            run = runs.popleft()
            if not run.final:
                continue
            done: asyncio.Future[None] | None = None
            if run.item is not None:
                with contextlib.suppress(ValueError):
                    self._queue.remove(run.item)
                done = run.item.future
            elif run.job is not None:
                with contextlib.suppress(ValueError):
                    self._dtmf.remove(run.job)
                done = run.job.future
            if done is not None and not done.done():
                done.set_result(None)

    def _native_rewind(self, stream: native.NativeStream) -> None:
        """Drop the queued packets and put prompts, DTMF events, sequence number and media
        clock back where the first of them started. Under SRTP the sequence numbers already
        protected are never used again (an SRTP index must not repeat): the stream skips
        them, with the marker bit set."""
        dropped = stream.flush()
        sent = self._native_pushed - dropped
        self._native_reap(sent)
        self._native_pushed = sent
        runs = self._native_runs
        sender = self._sender
        if not runs or sender is None:
            runs.clear()
            return
        first = runs[0]
        offset = sent - first.start
        restored: set[int] = set()
        for run in runs:
            skip = offset if run is first else 0
            if run.item is not None and id(run.item) not in restored:
                restored.add(id(run.item))
                run.item.pos = run.pos + skip * run.samples
            elif run.job is not None and id(run.job) not in restored:
                restored.add(id(run.job))
                run.job.index = run.pos + skip
                run.job.start_ts = run.job_start_ts
        seq = first.seq + offset
        if any(run.protected for run in runs):
            seq = sender.sequence_number
            self._marker_pending = True
        else:
            self._marker_pending = first.marker_pending if offset == 0 else False
        self._talking = first.talking if offset == 0 else first.kind is _RunKind.AUDIO
        sender.seek(seq, first.ts + offset * first.samples)
        runs.clear()

    def _native_fill(self, stream: native.NativeStream, queued: int, gap: float = 0.0) -> None:
        """Queue what comes next (DTMF events first, then prompts, else silence) until
        enough packets wait (see ``_NATIVE_AHEAD``)."""
        sender = self._sender
        if sender is None:
            return
        samples = self._frame_samples
        period = self.pacer.period
        # Enough for the interval between top-ups (the last one's, if longer than planned)
        # plus 160 ms, plus three times the pacer's recent lateness.
        interval = max(_NATIVE_TOPUP_TICKS, round(gap / period))
        late = int(3 * self.pacer.recent_lateness / period)
        need = min(_NATIVE_MAX_AHEAD, _NATIVE_AHEAD + interval + late) - queued
        while need > 0:
            job = None
            if self._dtmf:
                job = next((j for j in self._dtmf if j.index < len(j.packets)), None)
            if job is not None:
                pushed = self._native_event(stream, sender, job, samples)
            else:
                pushed = self._native_audio(stream, sender, self._next_item(), need, samples)
            if not pushed:
                return
            need -= pushed

    def _next_item(self) -> _PlayItem | None:
        """The first prompt with audio not yet queued (cancelled ones dropped on the way)."""
        queue = self._queue
        while queue:
            for item in queue:
                if item.future.cancelled():
                    queue.remove(item)
                    break  # the deque changed: look again
                if item.pos < len(item.pcm):
                    return item
            else:
                return None
        return None

    def _encoded(self, item: _PlayItem, count: int) -> bytes:
        """``count`` samples of ``item`` from ``pos`` in the current codec, from its window."""
        data = item.data
        if (
            data is None
            or item.pos < item.data_start
            or item.pos + count > item.data_start + len(data)
        ):
            assert self._encode is not None
            item.data_start = item.pos
            data = item.data = self._encode(
                item.pcm[item.pos : item.pos + max(_ENCODE_CHUNK, count)]
            )
        offset = item.pos - item.data_start
        return data[offset : offset + count]

    def _native_audio(
        self,
        stream: native.NativeStream,
        sender: RtpSender,
        item: _PlayItem | None,
        frames: int,
        samples: int,
    ) -> int:
        """Queue up to ``frames`` packets of ``item`` (silence without one) as one run."""
        if item is None:
            kind, count, final = _RunKind.SILENCE, frames, False
            payload: bytes | memoryview = _silence_run(self._silence, frames)
        else:
            kind = _RunKind.AUDIO
            remaining = len(item.pcm) - item.pos
            count = min(frames, remaining // samples)
            if count:
                payload = self._encoded(item, count * samples)
                final = count * samples == remaining
            else:  # the prompt's last, partial frame, padded with silence
                payload = self._encoded(item, remaining) + self._silence[: samples - remaining]
                count, final = 1, True
        audio = kind is _RunKind.AUDIO
        seq, ts, pos = sender.sequence_number, sender.timestamp, item.pos if item else 0
        marker_pending, talking = self._marker_pending, self._talking
        protected = self._srtp is not None
        marker = marker_pending or (audio and not talking)
        if self._srtp is None:
            done = stream.push_rtp(
                payload,
                frame_size=samples,
                sequence_number=seq,
                timestamp=ts,
                ssrc=sender.ssrc,
                payload_type=sender.payload_type,
                marker=marker,
            )
            sender.seek(seq + done, ts + done * samples)
        else:
            done = 0
            for i in range(count):
                frame = payload[i * samples : (i + 1) * samples]
                packet = sender.next_packet(bytes(frame), samples=samples, marker=marker and not i)
                if not stream.push(self._srtp.protect(packet)):
                    sender.seek(sender.sequence_number, sender.timestamp - samples)
                    break
                done += 1
        if not done:
            return 0
        if item is not None:
            item.pos = min(len(item.pcm), pos + done * samples)
        self._marker_pending = False
        self._talking = audio
        runs = self._native_runs
        last = runs[-1] if runs else None
        if (
            last is not None
            and not marker
            and last.kind is kind
            and last.item is item
            and not last.final
            and last.protected == protected
            and last.samples == samples
            and last.start + last.count == self._native_pushed
        ):
            # The same stream of frames continued: one run, still linear in seq/ts/pos.
            last.count += done
            last.final = final and done == count
        else:
            run = _Run(kind, self._native_pushed, done, seq, ts, marker_pending, talking, protected)
            run.item, run.pos, run.samples = item, pos, samples
            run.final = final and done == count
            runs.append(run)
        self._native_pushed += done
        return done

    def _native_event(
        self, stream: native.NativeStream, sender: RtpSender, job: _DtmfJob, samples: int
    ) -> int:
        """Queue the next packet of a DTMF event (one run each: events are rare)."""
        run = _Run(
            _RunKind.EVENT,
            self._native_pushed,
            1,
            sender.sequence_number,
            sender.timestamp,
            self._marker_pending,
            self._talking,
            self._srtp is not None,
            samples=samples,
            pos=job.index,
            job=job,
            job_start_ts=job.start_ts,
        )
        if job.start_ts is None:
            job.start_ts = sender.timestamp
        payload, marker, offset = job.packets[job.index]
        packet = sender.event_packet(payload, marker, job.start_ts + offset)
        sender.advance_timestamp(samples)  # audio resumes at the event's end time
        if self._srtp is not None:
            packet = self._srtp.protect(packet)
        if not stream.push(packet):
            if self._srtp is None:
                sender.seek(run.seq, run.ts)
            else:
                sender.seek(sender.sequence_number, run.ts)
            job.start_ts = run.job_start_ts
            return 0
        job.index += 1
        if job.index >= len(job.packets):
            self._marker_pending = True
            run.final = True
        self._native_pushed += 1
        self._native_runs.append(run)
        return 1

    # -- receiving ------------------------------------------------------------------

    def push_digit(self, digit: DtmfDigit) -> None:
        """Deliver a digit that arrived outside RTP (SIP INFO) through the same queue."""
        self.digits.put_nowait(digit)

    def received_audio(self) -> NDArray[np.int16]:
        """Decoded audio received so far (the last ``history_seconds``), gaps as silence."""
        return self._history.pcm()

    def add_audio_listener(self, listener: AudioListener) -> Callable[[], None]:
        """Hand each chunk of received audio, decoded, to ``listener`` as it is stored.

        For consumers that need audio as it happens (recording, answering-machine detection)
        rather than the history snapshot of ``received_audio``. Chunks follow the history
        exactly, timestamp gaps filled with silence. Returns a function that removes the
        listener; a listener that raises is logged and removed.
        """
        self._listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return remove

    def _notify(self, decode: Decoder, codes: bytes) -> None:
        pcm = decode(codes)
        for listener in list(self._listeners):
            try:
                listener(pcm)
            except Exception:
                logger.exception("audio listener failed; removing it")
                with contextlib.suppress(ValueError):
                    self._listeners.remove(listener)

    def _now(self) -> float:
        assert self._clock is not None
        return self._clock()

    def _on_datagram(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if self._media is None or self._closed:
            self._counters.unconfigured += 1
            return
        source = self._sources.get(addr)
        if source is None:
            if len(self._sources) >= 8:
                self._sources.clear()  # bounded; a flood of sources just recomputes
            source = self._sources[addr] = (normalize_host(str(addr[0])), int(addr[1]))
        verdict = self._source_filter.check(source)
        if verdict is _DROP:
            self._count_foreign(source)
            return
        if is_rtcp(data):
            self._counters.rtcp += 1
            return
        if self._srtp is not None:
            try:
                data = self._srtp.unprotect(data)
            except SrtpError:
                self._count_malformed()
                return
        try:
            packet = RtpPacket.parse(data)
        except ValueError:
            self._count_malformed()
            return
        if verdict is _LEARN and self._source_filter.learn(source):
            self._send_to = self._source_filter.send_to
            self._log_send_to_changed(source)
            if self._native is not None:
                self._native_replan()  # a stream to the new address
        now = self._now()
        for ready in self._receiver.push(packet, now):
            self._handle(ready, now)

    def _count_foreign(self, source: Address) -> None:
        self._counters.foreign += 1
        if self._counters.foreign == 1:  # once per session: a flood must not flood the log
            logger.info(
                "RTP port %s: dropping packets from %s:%s, not this call's media source",
                self.local_port,
                *source,
            )

    def _count_malformed(self) -> None:
        self._counters.malformed += 1

    def _report_drops(self) -> None:
        """Add the drops since the last report to ackline_rtp_dropped_packets_total, on the
        housekeeping tick and at close: an increment per datagram (it takes a lock) would make
        dropping a flood several times dearer than the drop itself."""
        c = self._counters
        if c.foreign != c.foreign_reported:
            _DROPPED_FOREIGN.inc(c.foreign - c.foreign_reported)
            c.foreign_reported = c.foreign
        if c.malformed != c.malformed_reported:
            _DROPPED_MALFORMED.inc(c.malformed - c.malformed_reported)
            c.malformed_reported = c.malformed

    def _log_send_to_changed(self, source: Address) -> None:
        remote = self._source_filter.remote or ("?", 0)
        if self._source_filter.latched == source:
            # Symmetric RTP: the SDP address is unreachable or NATed; answer the real source.
            logger.info(
                "RTP port %s: latched to %s:%s (SDP said %s:%s)", self.local_port, *source, *remote
            )
        else:
            logger.info(
                "RTP port %s: SDP address %s:%s heard, latch dropped", self.local_port, *remote
            )

    def _handle(self, packet: RtpPacket, now: float) -> None:
        pt = packet.payload_type
        if pt in self._event_pts:
            self._events_seen = True
            digit = self._events.receive(
                packet.payload, packet.timestamp, packet.ssrc, packet.marker, now
            )
            if digit is not None:
                self.digits.put_nowait(digit)
        elif (audio := self._decoders.get(pt)) is not None:
            codec, decode = audio
            self._store_audio(packet, codec, decode)
            if self._inband is not None:
                if decode is not self._inband_decode:
                    self._detect_inband()  # the batch holds another codec's codes
                    self._inband_decode = decode
                if not self._inband_batch:
                    self._inband_since = now
                self._inband_batch.append(packet.payload)
                self._inband_samples += len(packet.payload)
                if self._inband_samples >= _INBAND_BATCH:
                    self._detect_inband()
        else:
            self._counters.other_payload += 1

    def _store_audio(self, packet: RtpPacket, codec: str, decode: Decoder) -> None:
        """Append to the history, filling timestamp gaps (loss, DTMF, hold) with silence
        so recordings and answering-machine detection keep real-time alignment."""
        if packet.ssrc == self._rx_ssrc:
            gap = (packet.timestamp - self._rx_next_ts) % (1 << 32)
            if 0 < gap <= _MAX_GAP_FILL:
                fill = bytes((SILENCE[codec],)) * gap
                self._history.append(decode, fill)
                if self._listeners:
                    self._notify(decode, fill)
        self._rx_ssrc = packet.ssrc
        self._rx_next_ts = (packet.timestamp + len(packet.payload)) % (1 << 32)
        self._history.append(decode, packet.payload)
        if self._listeners:
            self._notify(decode, packet.payload)

    def _detect_inband(self) -> None:
        """Decode the batch (with the codec it arrived in) and hand it to the scanner."""
        decode = self._inband_decode
        if self._inband is None or not self._inband_batch or decode is None:
            return
        if not self._inband_pending:
            self._inband_pending_since = self._inband_since
        self._inband_pending.append(decode(b"".join(self._inband_batch)))
        self._inband_batch = []
        self._inband_samples = 0
        self._scanner.submit(self)

    def _take_inband(self) -> tuple[GoertzelDetector, NDArray[np.int16], float] | None:
        """The scanner's job for this session: all audio submitted since its last pass."""
        pending, self._inband_pending = self._inband_pending, []
        if self._inband is None or not pending:
            return None
        pcm = pending[0] if len(pending) == 1 else np.concatenate(pending)
        return self._inband, pcm, self._inband_pending_since

    def _poll_receive(self) -> None:
        now = self._now()
        for packet in self._receiver.expire(now):
            self._handle(packet, now)
        if self._events_seen:
            self._push_all(self._events.flush(now))
        if self._inband_batch and now - self._inband_since > _INBAND_MAX_AGE:
            self._detect_inband()  # the far end went quiet mid-batch

    def _push_all(self, digits: list[DtmfDigit]) -> None:
        for digit in digits:
            self.digits.put_nowait(digit)

    # -- statistics -----------------------------------------------------------------

    @property
    def stats(self) -> MediaStats:
        rx = self._receiver.stats
        c = self._counters
        sent, errors = self._native_sent, self._native_errors
        if self._native is not None:
            live = self._native.stats()
            sent, errors = sent + live.sent, errors + live.errors
        return MediaStats(
            packets_sent=c.packets_sent + sent,
            packets_received=rx.packets_received,
            duplicates=rx.duplicates,
            ssrc_changes=rx.ssrc_changes,
            reordered=rx.reordered,
            jitter=rx.jitter_ms,
            lost=rx.lost,
            late=rx.late,
            malformed=c.malformed,
            foreign=c.foreign,
            rtcp=c.rtcp,
            unconfigured=c.unconfigured,
            other_payload=c.other_payload,
            send_dropped=c.send_dropped,
            send_errors=c.send_errors + errors,
        )
