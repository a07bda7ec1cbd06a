"""The native paced RTP sender: order, headers, 20 ms spacing, flush, close, counters.

Timing bounds are loose on purpose: the box running the suite is shared and loaded.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator

import numpy as np
import pytest

from gateway.media import _rtpsend
from gateway.media.native import NativeStream, available, stats

HEADER = struct.Struct("!BBHII")


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(sender, receiver) UDP sockets on 127.0.0.1."""
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind(("127.0.0.1", 0))
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(2.0)
    yield tx, rx
    tx.close()
    rx.close()


def receive(rx: socket.socket, count: int) -> list[tuple[bytes, float]]:
    return [(rx.recv(2048), time.monotonic()) for _ in range(count)]


def nothing_arrives(rx: socket.socket, seconds: float) -> bool:
    rx.settimeout(seconds)
    try:
        rx.recv(2048)
    except TimeoutError:
        return True
    return False


def test_built_and_enabled() -> None:
    assert available()


def test_rtp_run_arrives_in_order_with_headers_every_20_ms(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    tx, rx = pair
    stream = NativeStream(tx.fileno(), rx.getsockname())
    frames = 25
    payload = bytes(range(160)) * frames
    # Sequence number and timestamp both wrap inside the run.
    pushed = stream.push_rtp(
        payload,
        frame_size=160,
        sequence_number=65530,
        timestamp=2**32 - 480,
        ssrc=0xDEADBEEF,
        payload_type=8,
        marker=True,
    )
    assert pushed == frames
    got = receive(rx, frames)
    headers = [HEADER.unpack(data[:12]) for data, _ in got]
    assert [h[2] for h in headers] == [(65530 + i) % 65536 for i in range(frames)]
    assert [h[3] for h in headers] == [(2**32 - 480 + 160 * i) % 2**32 for i in range(frames)]
    assert {h[4] for h in headers} == {0xDEADBEEF}
    assert {h[0] for h in headers} == {0x80}
    assert [h[1] for h in headers] == [0x80 | 8] + [8] * (frames - 1)  # marker on the first
    assert all(data[12:] == bytes(range(160)) for data, _ in got)
    gaps = np.diff([t for _, t in got]) * 1000
    assert 15 < float(np.median(gaps)) < 25
    span = got[-1][1] - got[0][1]
    assert 0.3 < span < 1.5  # 24 intervals of 20 ms, whatever the box is doing
    counters = stream.stats()
    assert (counters.pushed, counters.sent, counters.queued) == (frames, frames, 0)
    stream.close()


def test_ready_packets_go_out_verbatim(pair: tuple[socket.socket, socket.socket]) -> None:
    tx, rx = pair
    stream = NativeStream(tx.fileno(), rx.getsockname())
    packets = [bytes([i]) * (20 + i) for i in range(5)] + [b"x" * 300]  # the slot widens
    for packet in packets:
        assert stream.push(packet)
    assert [data for data, _ in receive(rx, len(packets))] == packets
    stream.close()


def test_period_two_sends_every_40_ms(pair: tuple[socket.socket, socket.socket]) -> None:
    tx, rx = pair
    stream = NativeStream(tx.fileno(), rx.getsockname(), period=2)
    stream.push_rtp(
        bytes(320 * 8), frame_size=320, sequence_number=1, timestamp=0, ssrc=1, payload_type=0
    )
    gaps = np.diff([t for _, t in receive(rx, 8)]) * 1000
    assert 32 < float(np.median(gaps)) < 48
    stream.close()


def test_flush_drops_what_is_queued(pair: tuple[socket.socket, socket.socket]) -> None:
    tx, rx = pair
    stream = NativeStream(tx.fileno(), rx.getsockname())
    stream.push_rtp(
        bytes(160 * 100), frame_size=160, sequence_number=0, timestamp=0, ssrc=7, payload_type=0
    )
    receive(rx, 3)
    before = stats().dropped
    dropped = stream.flush()
    assert 80 <= dropped <= 97
    assert stream.queued() == 0
    received = 0
    while not nothing_arrives(rx, 0.3):
        received += 1
    assert received <= 1  # at most the one in flight during the flush
    counters = stream.stats()
    assert counters.dropped == dropped
    assert counters.sent + counters.dropped == 100
    assert stats().dropped - before >= dropped
    stream.close()


def test_full_queue_refuses_and_counts(pair: tuple[socket.socket, socket.socket]) -> None:
    tx, rx = pair
    stream = NativeStream(tx.fileno(), rx.getsockname())
    fitted = stream.push_rtp(
        bytes(160 * 140), frame_size=160, sequence_number=0, timestamp=0, ssrc=7, payload_type=0
    )
    assert _rtpsend.RING - 2 <= fitted <= _rtpsend.RING  # one or two may have gone already
    while stream.queued() < _rtpsend.RING:
        stream.push(b"\x80" * 20)
    assert not stream.push(b"\x80" * 20)
    assert stream.stats().dropped == 1
    stream.close()


def test_underrun_counted_once_per_dry_spell(pair: tuple[socket.socket, socket.socket]) -> None:
    tx, rx = pair
    stream = NativeStream(tx.fileno(), rx.getsockname())
    assert stream.stats().underruns == 0
    time.sleep(0.1)  # never fed: not an underrun
    assert stream.stats().underruns == 0
    stream.push(b"a" * 12)
    receive(rx, 1)
    time.sleep(0.15)
    assert stream.stats().underruns == 1
    stream.close()


def test_close_frees_the_slot(pair: tuple[socket.socket, socket.socket]) -> None:
    tx, rx = pair
    open_before = stats().streams
    stream = NativeStream(tx.fileno(), rx.getsockname())
    sid = stream._sid
    assert stats().streams == open_before + 1
    stream.push_rtp(
        bytes(160 * 50), frame_size=160, sequence_number=0, timestamp=0, ssrc=7, payload_type=0
    )
    stream.close()
    assert stream.closed
    assert stats().streams == open_before
    with pytest.raises(ValueError, match="native stream is closed"):
        stream.push(b"x")
    with pytest.raises(ValueError, match="no open stream"):
        _rtpsend.queued(sid if sid is not None else -1)
    while not nothing_arrives(rx, 0.2):
        pass
    assert nothing_arrives(rx, 0.2)  # nothing queued is sent after close
    # The slot is reused, and the sender's dup of the fd was closed (tx still works).
    again = NativeStream(tx.fileno(), rx.getsockname())
    assert again._sid == sid
    again.push(b"after")
    rx.settimeout(2.0)
    assert rx.recv(64) == b"after"
    again.close()


def test_dropping_the_object_closes_it(pair: tuple[socket.socket, socket.socket]) -> None:
    tx, rx = pair
    open_before = stats().streams
    stream = NativeStream(tx.fileno(), rx.getsockname())
    assert stats().streams == open_before + 1
    del stream
    assert stats().streams == open_before


def test_sender_counts_and_times_ticks(pair: tuple[socket.socket, socket.socket]) -> None:
    tx, rx = pair
    stream = NativeStream(tx.fileno(), rx.getsockname())
    before = stats()
    stream.push_rtp(
        bytes(160 * 10), frame_size=160, sequence_number=0, timestamp=0, ssrc=7, payload_type=0
    )
    receive(rx, 10)
    after = stats()
    assert after.running
    assert after.sent - before.sent >= 10
    assert after.ticks - before.ticks >= 9
    assert 0 <= after.lateness_ms["p50"] < 20
    assert after.lateness_ms["p50"] <= after.lateness_ms["p99"] <= after.lateness_ms["max"]
    stream.close()


def test_ipv6_and_bad_addresses() -> None:
    tx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    rx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        tx.bind(("::1", 0))
        rx.bind(("::1", 0))
        rx.settimeout(2.0)
        stream = NativeStream(tx.fileno(), rx.getsockname())
        stream.push(b"six")
        assert rx.recv(16) == b"six"
        stream.close()
        with pytest.raises(ValueError, match="not an IP address"):
            NativeStream(tx.fileno(), ("example.invalid", 5000))
        with pytest.raises(OSError, match="Bad file descriptor"):
            NativeStream(-1, ("::1", 5000))
    finally:
        tx.close()
        rx.close()


def test_a_forked_child_does_not_send_the_parents_streams(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    tx, rx = pair
    stream = NativeStream(tx.fileno(), rx.getsockname())
    pid = os.fork()
    if pid == 0:  # the child: no stream of the parent's is open here
        os._exit(0 if stats().streams == 0 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    stream.push(b"parent")  # the parent's sender is unaffected
    assert rx.recv(64) == b"parent"
    stream.close()
