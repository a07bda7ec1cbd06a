"""RFC 5626 CRLF keep-alive: the state machine on synthetic time, the framer's pong, and
a ping/pong over a real TCP connection on 127.0.0.1."""

from __future__ import annotations

import asyncio

import pytest

from carriers.trunk import RegisterSettings
from gateway.sip.keepalive import (
    FlowFailed,
    FlowFailure,
    KeepAlive,
    KeepAliveSettings,
    KeepAliveState,
)
from gateway.transport import Peer, SipStreamFramer, SipTransport, StreamEvent, TransportError

SETTINGS = KeepAliveSettings(interval=30.0, jitter=0.2, pong_timeout=10.0)


def _state(ka: KeepAlive) -> KeepAliveState:
    """Read through a call: mypy would keep `ka.state` narrowed across the transitions."""
    return ka.state


def _machine(draws: list[float] | None = None) -> KeepAlive:
    values = iter(draws or [0.0] * 100)
    return KeepAlive(SETTINGS, draw=lambda: next(values))


def test_pings_at_the_jittered_interval_while_pongs_come_back() -> None:
    ka = _machine([0.0, 1.0, 0.5])
    ka.start(100.0)
    assert ka.next_timer_at() == 130.0  # draw 0: the full interval
    ka.handle_timer(129.9)
    assert ka.pings_due() == 0
    ka.handle_timer(130.0)
    assert ka.pings_due() == 1
    assert ka.pings_due() == 0  # drained
    assert ka.state is KeepAliveState.AWAITING_PONG
    assert ka.next_timer_at() == 140.0  # the pong is due within 10 s
    ka.pong_received(131.0)
    assert _state(ka) is KeepAliveState.IDLE
    assert ka.next_timer_at() == pytest.approx(131.0 + 24.0)  # draw 1: 80 % of 30 s
    ka.handle_timer(155.0)
    assert ka.pings_due() == 1
    ka.pong_received(155.2)
    assert ka.next_timer_at() == pytest.approx(155.2 + 27.0)  # draw 0.5: 90 %
    assert ka.next_event() is None


def test_no_pong_within_the_bound_fails_the_flow_once() -> None:
    ka = _machine()
    ka.start(0.0)
    ka.handle_timer(30.0)
    assert ka.pings_due() == 1
    ka.handle_timer(39.9)
    assert ka.next_event() is None
    ka.handle_timer(40.0)
    event = ka.next_event()
    assert event == FlowFailed(FlowFailure.NO_PONG, "none 10.0 s after the ping")
    assert event.reason == "keep-alive: no pong (none 10.0 s after the ping)"
    assert ka.state is KeepAliveState.FAILED
    assert ka.next_timer_at() is None
    ka.pong_received(41.0)  # too late: the flow stays failed
    ka.handle_timer(100.0)
    assert ka.state is KeepAliveState.FAILED
    assert ka.next_event() is None
    assert ka.pings_due() == 0


def test_a_late_tick_still_fails_at_once_and_detection_is_bounded() -> None:
    ka = _machine()
    ka.start(0.0)
    ka.handle_timer(30.0)
    ka.pings_due()
    ka.handle_timer(75.0)  # the loop stalled past the pong deadline
    assert isinstance(ka.next_event(), FlowFailed)
    assert SETTINGS.detection_bound == 40.0


def test_a_write_error_fails_the_flow_and_stop_ends_it_quietly() -> None:
    ka = _machine()
    ka.start(0.0)
    ka.handle_timer(30.0)
    ka.pings_due()
    ka.write_failed(30.0, "connection reset")
    assert ka.next_event() == FlowFailed(FlowFailure.WRITE_FAILED, "connection reset")
    stopped = _machine()
    stopped.start(0.0)
    stopped.stop()
    assert stopped.state is KeepAliveState.STOPPED
    assert stopped.next_timer_at() is None
    stopped.handle_timer(60.0)
    stopped.write_failed(60.0, "closed")
    assert stopped.pings_due() == 0
    assert stopped.next_event() is None


@pytest.mark.parametrize(
    "settings",
    [
        {"interval": 0},
        {"interval": -1},
        {"pong_timeout": 0},
        {"jitter": 1.0},
        {"jitter": -0.1},
    ],
)
def test_bad_settings_are_refused(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="invalid keep-alive settings"):
        KeepAliveSettings(**settings)


def test_trunk_register_keepalive_defaults_and_off() -> None:
    default = RegisterSettings()
    assert default.keepalive_settings("tls") == KeepAliveSettings(30.0, 0.2, 10.0)
    assert default.keepalive_settings("tcp") is not None
    assert default.keepalive_settings("udp") is None
    assert RegisterSettings(keepalive=0).keepalive_settings("tls") is None
    tuned = RegisterSettings(keepalive=5, keepalive_timeout=2)
    assert tuned.keepalive_settings("tcp") == KeepAliveSettings(5.0, 0.2, 2.0)
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        RegisterSettings(keepalive=-1)


# -- the framer --------------------------------------------------------------------------


def test_framer_lone_crlf_is_a_pong_only_when_one_is_awaited() -> None:
    framer = SipStreamFramer(65535)
    assert framer.feed(b"\r\n") == []  # could be half a ping: held back
    framer.expect_pong()  # we ping now: that held-back CRLF was a stray, dropped
    assert not framer.partial
    assert framer.feed(b"\r\n") == [StreamEvent.PONG]
    framer.awaiting_pong = False
    assert framer.feed(b"\r\n") == []
    assert framer.feed(b"\r\n") == [StreamEvent.PING]  # the two halves of a peer's ping


# -- over TCP on 127.0.0.1 ---------------------------------------------------------------


async def test_ping_over_tcp_gets_the_peers_pong_and_a_silent_peer_none() -> None:
    pongs: list[str] = []
    answer = asyncio.Event()
    received = bytearray()

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(64):
            received.extend(data)
            if answer.is_set() and data.endswith(b"\r\n\r\n"):
                writer.write(b"\r\n")

    server = await asyncio.start_server(peer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = SipTransport(lambda message, source: None)
    target = Peer("tcp", "127.0.0.1", port)
    try:
        with pytest.raises(TransportError, match="no open connection"):
            transport.ping(target, lambda: pongs.append("early"))
        await transport.connect(target)
        transport.ping(target, lambda: pongs.append("silent"))  # the peer does not answer
        await asyncio.sleep(0.2)
        assert pongs == []
        assert bytes(received) == b"\r\n\r\n"
        answer.set()
        got = asyncio.Event()

        def answered() -> None:
            pongs.append("answered")
            got.set()

        transport.ping(target, answered)
        await asyncio.wait_for(got.wait(), 5.0)
        assert pongs == ["answered"]
        transport.drop(target)
        await asyncio.sleep(0.05)
        with pytest.raises(TransportError):
            transport.ping(target, lambda: None)
    finally:
        await transport.close()
        server.close()
        await server.wait_closed()
