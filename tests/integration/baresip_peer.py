"""baresip (v1.0.0) as an independent, headless SIP peer on 127.0.0.1 for interop tests.

Two context managers:

* :func:`baresip_uas` - baresip auto-answers calls to ``.uri`` and presses DTMF once the
  call is established;
* :func:`baresip_uac` - baresip dials a target, presses DTMF once answered and records how
  the call ended (``closed_by_remote`` is True when the far end sent BYE).

baresip is driven and observed only through its ``ctrl_tcp`` module (netstring-framed JSON
on a loopback port): commands go in, ``CALL_*`` events come out.  DTMF is the ``sndcode``
command, one digit per command, which baresip sends as RFC 4733 telephone-events (payload
type 101, volume 10, ~180 ms of tone then three end packets).  ``sndcode`` only exists while
a call is active, which is why it is not in ``/help`` when idle.

Every instance gets a fresh config directory (``-f``) under the caller's workdir, a bounded
lifetime (``-t``) and is stopped in ``finally`` (``quit`` command, then SIGTERM twice, then
SIGKILL).  Audio is headless: source ``ausine`` (a tone), no player module at all (baresip
then skips playback), optional ``sndfile`` recording of both directions.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

BARESIP = "baresip"
MODULE_PATH = Path("/usr/lib/baresip/modules")
LOOPBACK = "127.0.0.1"
DTMF_DIGITS = frozenset("0123456789*#ABCD")

# CALL_CLOSED "param" values baresip 1.0.0 reports (strerror texts of the error it closes with).
REASON_REMOTE_BYE = "Connection reset by peer"  # ECONNRESET: the far end sent BYE
REASON_LOCAL_HANGUP = "Connection reset by user"  # our own hangup command

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TRACE = re.compile(
    r"\x1b\[36;1m#\n(?P<transport>[A-Z]+) (?P<src>\S+) -> (?P<dst>\S+)\n(?P<text>.*?)\x1b\[;m",
    re.DOTALL,
)

Transport = Literal["udp", "tcp", "tls"]


class BaresipError(RuntimeError):
    """baresip could not be started, or did not do what a test waited for."""


@dataclass(frozen=True)
class BaresipEvent:
    """One ``ctrl_tcp`` event, e.g. type CALL_ESTABLISHED / CALL_CLOSED (param = reason)."""

    type: str
    param: str
    call_id: str
    direction: str
    peer_uri: str
    at: float  # time.monotonic() when received
    raw: Mapping[str, Any]


@dataclass(frozen=True)
class SipTrace:
    """One SIP message from baresip's ``-s`` trace (sent when ``src`` is baresip's port)."""

    transport: str
    src: str
    dst: str
    text: str

    @property
    def first_line(self) -> str:
        return self.text.split("\r\n", 1)[0].split("\n", 1)[0]

    @property
    def body(self) -> str:
        text = self.text.replace("\r\n", "\n")
        return text.split("\n\n", 1)[1] if "\n\n" in text else ""


def free_port() -> int:
    """An even port currently free for both UDP and TCP on 127.0.0.1."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((LOOPBACK, 0))
            port = int(s.getsockname()[1])
        if port % 2 or port > 65000:
            continue
        try:
            with (
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t,
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u,
            ):
                t.bind((LOOPBACK, port))
                u.bind((LOOPBACK, port))
        except OSError:
            continue
        return port
    raise BaresipError("no free port on 127.0.0.1")


def _netstring(payload: bytes) -> bytes:
    return str(len(payload)).encode() + b":" + payload + b","


class BaresipPeer:
    """A running baresip process plus its ctrl_tcp connection. Build with the context managers."""

    def __init__(
        self,
        workdir: Path,
        *,
        mode: Literal["uas", "uac"],
        user: str,
        transport: Transport,
        dtmf: str,
        dtmf_delay_s: float,
        dtmf_gap_s: float,
        lifetime_s: int,
        tone_hz: int,
        record: bool,
        certificate: Path | None = None,
        mediaenc: str | None = None,
    ) -> None:
        if shutil.which(BARESIP) is None:
            raise BaresipError(
                "baresip is not installed: run `make test` (installs it via "
                "scripts/install-system-deps.sh)"
            )
        bad = set(dtmf) - DTMF_DIGITS
        if bad:
            raise ValueError(f"unsupported DTMF digits {sorted(bad)} in {dtmf!r}")
        if transport not in ("udp", "tcp", "tls"):
            raise ValueError(f"transport must be udp, tcp or tls, not {transport!r}")
        if transport == "tls" and certificate is None:
            raise ValueError("baresip over TLS needs a certificate (PEM: cert then key)")
        self.certificate = certificate  # baresip's own TLS certificate + key, one file
        self.mediaenc = mediaenc  # e.g. "srtp-mand": SDES SRTP, RTP/SAVP, mandatory
        self.mode = mode
        self.user = user
        self.transport: Transport = transport
        self.dtmf = dtmf
        self.dtmf_delay_s = dtmf_delay_s
        self.dtmf_gap_s = dtmf_gap_s
        self.lifetime_s = lifetime_s
        self.tone_hz = tone_hz
        self.record = record
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_dir = Path(tempfile.mkdtemp(prefix=f"baresip-{mode}-", dir=workdir))
        self.log_path = self.config_dir / "baresip.log"
        self.record_dir = self.config_dir / "recordings"
        self.sip_port = 0
        self.ctrl_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.dtmf_sent: list[str] = []
        self.stop_method = ""
        self._sock: socket.socket | None = None
        self._cond = threading.Condition()
        self._events: list[BaresipEvent] = []
        self._responses: dict[str, dict[str, Any]] = {}
        self._token = 0
        self._send_lock = threading.Lock()
        self._stopping = threading.Event()
        self._dtmf_calls: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._errors: list[str] = []

    # ---------------------------------------------------------------- addresses

    @property
    def signalling_port(self) -> int:
        """baresip listens for TLS on its SIP port + 1 (UDP and TCP on the port itself)."""
        return self.sip_port + 1 if self.transport == "tls" else self.sip_port

    @property
    def uri(self) -> str:
        """Where to call this peer, e.g. ``sip:bob@127.0.0.1:40000`` (``;transport=tcp``)."""
        suffix = "" if self.transport == "udp" else f";transport={self.transport}"
        return f"sip:{self.user}@{LOOPBACK}:{self.signalling_port}{suffix}"

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.signalling_port}"

    # ---------------------------------------------------------------- lifecycle

    def _write_config(self) -> None:
        self.record_dir.mkdir(exist_ok=True)
        modules = ["g711.so", "ausine.so"]
        if self.record:
            modules.append("sndfile.so")
        if self.mediaenc is not None:
            modules.append("srtp.so")
        tls = [f"sip_certificate {self.certificate}"] if self.certificate is not None else []
        lines = [
            "poll_method epoll",
            f"sip_listen {LOOPBACK}:{self.sip_port}",
            *tls,
            f"net_interface {LOOPBACK}",  # 'lo' does not work in 1.0.0: use the address
            "dns_server 127.0.0.1:53",  # never ask a real resolver (we only use IPs)
            "call_local_timeout 30",
            "call_max_calls 4",
            # No player/alert module is loaded, so baresip skips playback entirely.
            "audio_player none,none",
            "audio_alert none,none",
            f"audio_source ausine,{self.tone_hz}",
            "ausrc_srate 48000",  # ausine only does 48 kHz stereo; baresip resamples
            "ausrc_channels 2",
            "audio_buffer 20-160",
            "rtp_tos 0",
            "rtcp_mux no",
            "jitter_buffer_delay 5-10",
            "rtp_stats no",
            f"module_path {MODULE_PATH}",
            *(f"module {m}" for m in modules),
            "module_tmp account.so",
            "module_app menu.so",
            "module_app ctrl_tcp.so",
            f"ctrl_tcp_listen {LOOPBACK}:{self.ctrl_port}",
            "statmode_default off",
            "ringback_disabled yes",
            "redial_attempts 0",
            f"snd_path {self.record_dir}",
        ]
        (self.config_dir / "config").write_text("\n".join(lines) + "\n")
        answermode = "auto" if self.mode == "uas" else "manual"
        params = "" if self.transport == "udp" else f";transport={self.transport}"
        mediaenc = f";mediaenc={self.mediaenc}" if self.mediaenc is not None else ""
        account = (
            f"<sip:{self.user}@{LOOPBACK}{params}>;regint=0;answermode={answermode}"
            f";audio_codecs=PCMU,PCMA;mwi=no;call_transfer=no{mediaenc}\n"
        )
        (self.config_dir / "accounts").write_text(account)
        (self.config_dir / "contacts").write_text("")

    def start(self, timeout_s: float = 5.0) -> None:
        """Start baresip (retrying on a port race) and connect to ctrl_tcp."""
        for attempt in range(3):
            self.sip_port = free_port()
            self.ctrl_port = free_port()
            while self.ctrl_port == self.sip_port:
                self.ctrl_port = free_port()
            self._write_config()
            cmd = [BARESIP, "-4", "-s", "-f", str(self.config_dir), "-t", str(self.lifetime_s)]
            if shutil.which("stdbuf"):
                cmd = ["stdbuf", "-oL", "-eL", *cmd]  # keep the log current while running
            with open(self.log_path, "ab") as log:
                log.write(f"==== attempt {attempt + 1}: {' '.join(cmd)}\n".encode())
                log.flush()
                self.process = subprocess.Popen(
                    cmd,
                    cwd=self.config_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            sock = self._connect_ctrl(timeout_s)
            if sock is not None:
                self._sock = sock
                reader = threading.Thread(target=self._reader, name="baresip-ctrl", daemon=True)
                reader.start()
                self._threads.append(reader)
                return
            self._kill()
            if "Address already in use" not in self.log_text():
                break
        raise BaresipError(f"baresip did not come up on {LOOPBACK}:\n{self.log_text()}")

    def _connect_ctrl(self, timeout_s: float) -> socket.socket | None:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return None
            try:
                return socket.create_connection((LOOPBACK, self.ctrl_port), timeout=0.5)
            except OSError:
                time.sleep(0.05)
        return None

    def stop(self, timeout_s: float = 2.5) -> int:
        """Quit baresip (hangs up active calls with BYE); escalate to signals. Returns rc."""
        self._stopping.set()
        proc = self.process
        if proc is None:
            return 0
        if proc.poll() is None and self._sock is not None:
            with contextlib.suppress(BaresipError, OSError):
                self._send("quit", "")
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout_s)
                self.stop_method = self.stop_method or "quit"
        # `quit` (and -t, and the first SIGTERM) wait for open SIP transactions, which can
        # take 32 s on a half-open call; baresip exits at once on its second SIGTERM.
        for wait_s in (0.5, 1.5):
            if proc.poll() is not None:
                break
            self.stop_method = "SIGTERM"
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait_s)
        if proc.poll() is None:
            self._kill()
        self.stop_method = self.stop_method or "exited"
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        for thread in self._threads:
            thread.join(timeout=2)
        return proc.returncode

    def _kill(self) -> None:
        proc = self.process
        if proc is not None and proc.poll() is None:
            self.stop_method = "SIGKILL"
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=5)

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    @property
    def exited_cleanly(self) -> bool:
        """baresip ended by itself (quit / -t) with status 0, without being signalled."""
        return self.returncode == 0 and self.stop_method in ("quit", "exited")

    # ---------------------------------------------------------------- ctrl_tcp

    def _reader(self) -> None:
        assert self._sock is not None
        self._sock.settimeout(0.2)
        buf = b""
        while True:
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                if self.process is not None and self.process.poll() is not None:
                    break
                continue
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
            while True:
                head, colon, rest = buf.partition(b":")
                if not colon:
                    break
                try:
                    size = int(head)
                except ValueError:
                    self._errors.append(f"bad netstring from ctrl_tcp: {buf[:80]!r}")
                    buf = b""
                    break
                if len(rest) < size + 1:
                    break
                payload, buf = rest[:size], rest[size + 1 :]
                self._dispatch(payload)
        with self._cond:
            self._cond.notify_all()

    def _dispatch(self, payload: bytes) -> None:
        try:
            msg = json.loads(payload)
        except ValueError:
            self._errors.append(f"bad JSON from ctrl_tcp: {payload[:120]!r}")
            return
        if msg.get("response"):
            with self._cond:
                self._responses[str(msg.get("token", ""))] = msg
                self._cond.notify_all()
            return
        if not msg.get("event"):
            return
        event = BaresipEvent(
            type=str(msg.get("type", "")),
            param=str(msg.get("param", "")),
            call_id=str(msg.get("id", "")),
            direction=str(msg.get("direction", "")),
            peer_uri=str(msg.get("peeruri", "")),
            at=time.monotonic(),
            raw=msg,
        )
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()
            start_dtmf = (
                event.type == "CALL_ESTABLISHED"
                and bool(self.dtmf)
                and event.call_id not in self._dtmf_calls
            )
            if start_dtmf:
                self._dtmf_calls.add(event.call_id)
        if start_dtmf:
            worker = threading.Thread(
                target=self._auto_dtmf, args=(event.call_id,), name="baresip-dtmf", daemon=True
            )
            worker.start()
            self._threads.append(worker)

    def _send(self, command: str, params: str) -> str:
        if self._sock is None:
            raise BaresipError("ctrl_tcp is not connected")
        with self._send_lock:
            self._token += 1
            token = f"{command}-{self._token}"
            msg = {"command": command, "params": params, "token": token}
            self._sock.sendall(_netstring(json.dumps(msg).encode()))
        return token

    def command(self, command: str, params: str = "", timeout_s: float = 3.0) -> dict[str, Any]:
        """Run a baresip long command (``dial``, ``hangup``, ``sndcode``, ``quit``...)."""
        token = self._send(command, params)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while token not in self._responses:
                left = deadline - time.monotonic()
                if left <= 0 or self.returncode is not None:
                    raise BaresipError(f"no ctrl_tcp response to {command} {params}")
                self._cond.wait(min(left, 0.2))
            response = self._responses.pop(token)
        if not response.get("ok"):
            raise BaresipError(f"baresip {command} {params!r} failed: {response.get('data')!r}")
        return response

    def dial(self, target_uri: str) -> None:
        self.command("dial", target_uri)

    def hangup(self) -> None:
        self.command("hangup")

    def send_dtmf(self, digits: str, gap_s: float | None = None) -> None:
        """Press ``digits`` on the current call: one ``sndcode`` (press+release) per digit.

        ``sndcode "123"`` would start three events without ending the first two, so each
        digit is its own command, spaced so baresip's ~240 ms event has finished.
        """
        gap = self.dtmf_gap_s if gap_s is None else gap_s
        for i, digit in enumerate(digits):
            if digit not in DTMF_DIGITS:
                raise ValueError(f"unsupported DTMF digit {digit!r}")
            if i:
                time.sleep(gap)
            self.command("sndcode", digit)
            self.dtmf_sent.append(digit)

    def _auto_dtmf(self, call_id: str) -> None:
        if self._stopping.wait(self.dtmf_delay_s):
            return
        for i, digit in enumerate(self.dtmf):
            if i and self._stopping.wait(self.dtmf_gap_s):
                return
            if self.call_closed_event(call_id) is not None:
                self._errors.append(f"call {call_id} closed before DTMF {digit!r} was sent")
                return
            try:
                self.send_dtmf(digit)
            except (BaresipError, OSError) as exc:
                self._errors.append(f"sending DTMF {digit!r} failed: {exc}")
                return

    # ---------------------------------------------------------------- observation

    @property
    def events(self) -> list[BaresipEvent]:
        with self._cond:
            return list(self._events)

    def event_types(self) -> list[str]:
        return [e.type for e in self.events]

    def wait_for(
        self,
        event_type: str,
        timeout_s: float,
        predicate: Callable[[BaresipEvent], bool] | None = None,
    ) -> BaresipEvent:
        """First event of ``event_type`` (already received or arriving within the timeout)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for event in self._events:
                    if event.type == event_type and (predicate is None or predicate(event)):
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.2))
        raise BaresipError(
            f"baresip: no {event_type} within {timeout_s}s; events {self.event_types()}\n"
            f"{self.log_text()}"
        )

    def wait_established(self, timeout_s: float = 5.0) -> BaresipEvent:
        return self.wait_for("CALL_ESTABLISHED", timeout_s)

    def wait_closed(self, timeout_s: float = 10.0) -> BaresipEvent:
        return self.wait_for("CALL_CLOSED", timeout_s)

    def wait_dtmf_sent(self, timeout_s: float = 5.0) -> None:
        """Until every configured digit has been accepted by baresip."""
        deadline = time.monotonic() + timeout_s
        while len(self.dtmf_sent) < len(self.dtmf):
            if self._errors or time.monotonic() > deadline:
                raise BaresipError(
                    f"DTMF {self.dtmf!r} not sent (sent {self.dtmf_sent}, errors "
                    f"{self._errors})\n{self.log_text()}"
                )
            time.sleep(0.02)

    def wait_exit(self, timeout_s: float) -> int:
        """Wait for baresip to exit on its own (e.g. its -t lifetime); returns rc."""
        assert self.process is not None
        try:
            rc = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise BaresipError(f"baresip still running after {timeout_s}s") from exc
        self.stop_method = self.stop_method or "exited"
        return rc

    def call_closed_event(self, call_id: str | None = None) -> BaresipEvent | None:
        for event in self.events:
            if event.type == "CALL_CLOSED" and call_id in (None, event.call_id):
                return event
        return None

    @property
    def established(self) -> bool:
        return "CALL_ESTABLISHED" in self.event_types()

    @property
    def closed(self) -> bool:
        return self.call_closed_event() is not None

    @property
    def close_reason(self) -> str | None:
        event = self.call_closed_event()
        return None if event is None else event.param

    @property
    def closed_by_remote(self) -> bool:
        """The (first) call ended because the far end sent BYE."""
        return self.close_reason == REASON_REMOTE_BYE

    @property
    def errors(self) -> list[str]:
        """Problems seen by the helper's threads (bad ctrl data, DTMF failures)."""
        return list(self._errors)

    def raw_log(self) -> str:
        try:
            return self.log_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_text(self) -> str:
        """baresip's console output (with SIP trace) and the ctrl_tcp events, for messages."""
        text = _ANSI.sub("", self.raw_log()).replace("\r", "\n")
        events = "\n".join(
            f"  {e.type} {e.param!r} ({e.direction} {e.peer_uri})" for e in self.events
        )
        extra = f"\n== helper errors\n{self._errors}" if self._errors else ""
        return f"== baresip log {self.log_path}\n{text}\n== ctrl_tcp events\n{events}{extra}"

    def sip_messages(self) -> list[SipTrace]:
        """SIP messages from baresip's ``-s`` trace, both directions, in order."""
        return [
            SipTrace(m["transport"], m["src"], m["dst"], m["text"])
            for m in _TRACE.finditer(self.raw_log())
        ]

    def sent_sdp(self) -> list[str]:
        """SDP bodies baresip sent (offer in INVITE or answer in 200)."""
        own = self.address
        return [
            m.body
            for m in self.sip_messages()
            if m.src == own and "application/sdp" in m.text.lower() and m.body
        ]

    def recordings(self) -> list[Path]:
        """WAV dumps written by ``sndfile`` when ``record=True`` (``*-enc``/``*-dec``)."""
        return sorted(self.record_dir.glob("*.wav"))


@contextlib.contextmanager
def _running(peer: BaresipPeer) -> Iterator[BaresipPeer]:
    try:
        peer.start()
        yield peer
    finally:
        peer.stop()


@contextlib.contextmanager
def baresip_uas(
    workdir: Path,
    *,
    dtmf: str = "1",
    dtmf_delay_s: float = 1.0,
    transport: Transport = "udp",
    user: str = "bob",
    dtmf_gap_s: float = 0.3,
    lifetime_s: int = 30,
    tone_hz: int = 440,
    record: bool = False,
    certificate: Path | None = None,
    mediaenc: str | None = None,
) -> Iterator[BaresipPeer]:
    """baresip answering calls to ``peer.uri`` automatically, then pressing ``dtmf``.

    The digits go out ``dtmf_delay_s`` after CALL_ESTABLISHED (per call), ``dtmf_gap_s``
    apart.  Pass ``dtmf=""`` to press nothing.
    """
    peer = BaresipPeer(
        workdir,
        mode="uas",
        user=user,
        transport=transport,
        dtmf=dtmf,
        dtmf_delay_s=dtmf_delay_s,
        dtmf_gap_s=dtmf_gap_s,
        lifetime_s=lifetime_s,
        tone_hz=tone_hz,
        record=record,
        certificate=certificate,
        mediaenc=mediaenc,
    )
    with _running(peer):
        yield peer


@contextlib.contextmanager
def baresip_uac(
    workdir: Path,
    target_uri: str,
    *,
    dtmf: str = "1",
    dtmf_delay_s: float = 1.0,
    transport: Transport = "udp",
    user: str = "alice",
    dtmf_gap_s: float = 0.3,
    lifetime_s: int = 30,
    tone_hz: int = 440,
    record: bool = False,
    certificate: Path | None = None,
    mediaenc: str | None = None,
) -> Iterator[BaresipPeer]:
    """baresip dialling ``target_uri`` (use ``;transport=tcp`` in it for TCP).

    Presses ``dtmf`` after the answer; use ``wait_closed()`` / ``closed_by_remote`` to check
    the far end hung up.  Leaving the block quits baresip (BYE if the call is still up).
    """
    peer = BaresipPeer(
        workdir,
        mode="uac",
        user=user,
        transport=transport,
        dtmf=dtmf,
        dtmf_delay_s=dtmf_delay_s,
        dtmf_gap_s=dtmf_gap_s,
        lifetime_s=lifetime_s,
        tone_hz=tone_hz,
        record=record,
        certificate=certificate,
        mediaenc=mediaenc,
    )
    with _running(peer):
        peer.dial(target_uri)
        yield peer
