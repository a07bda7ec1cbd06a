"""Loopback ports for the SIP peers (SIPp, baresip) that benchmarks and tests start."""

from __future__ import annotations

import contextlib
import random
import socket
from pathlib import Path

_PICK = random.SystemRandom()  # not the per-test seeded `random`: ports differ per test


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (even, as RTP likes).

    Picked below the kernel's ephemeral range: a port from there can be taken, between
    our check and the server's bind, as the source port of any outbound connection (a
    health probe, a database client) and the server then fails with EADDRINUSE."""
    high = _ephemeral_low()
    for _ in range(500):
        port = _PICK.randrange(10000, high) & ~1
        try:
            with (
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t,
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u,
            ):
                t.bind(("127.0.0.1", port))
                u.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port")


def free_media_port(avoid: int) -> int:
    """An even port whose next three (RTCP, video RTP/RTCP: SIPp binds all four) are free
    too and clear of ``avoid`` (the SIP port), so SIPp never trips over its own sockets."""
    for _ in range(200):
        base = free_port()
        if avoid in range(base - 3, base + 4):
            continue
        try:
            with contextlib.ExitStack() as stack:
                for offset in range(1, 4):
                    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                    sock.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        return base
    raise RuntimeError("no free media port block")


def listening(port: int, proto: str) -> bool:
    """True when something is bound to 127.0.0.1:port (TCP: in LISTEN state), read from
    /proc: a peer is ready when its socket is, without sending it anything."""
    path = "/proc/net/udp" if proto == "udp" else "/proc/net/tcp"
    needle = f":{port:04X}"
    with open(path) as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1].endswith(needle) and (proto == "udp" or fields[3] == "0A"):
                return True
    return False
