"""A stranger on the network cannot press keys in a call (issue 13, item 3).

SIPp is the far end and presses "1" from its recorded RFC 2833 pcap; meanwhile a stranger on
127.0.0.2, who is neither the call's SDP address nor its signalling peer, floods the call's
media port with RFC 4733 "7" events from before the far end's first packet. Only the "1"
may arrive: a "7" would acknowledge an alert on someone else's behalf.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from gateway.call import Call, Gateway, GatewayConfig
from gateway.media.dtmf import rfc4733_packets
from gateway.media.rtp import RtpPacket
from gateway.media.session import MediaStats
from tests.integration.peers import dtmf_pcap, sipp
from tests.waiting import wait_until

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]

STRANGER = "127.0.0.2"
NAT_PRIVATE = "127.0.0.5"  # what a phone behind NAT puts in its SDP; nothing sends from it
TE = 101  # the telephone-event payload type SIPp's SDP offers and answers


def dropped_foreign() -> float:
    value = REGISTRY.get_sample_value(
        "ackline_rtp_dropped_packets_total", {"reason": "foreign_source"}
    )
    return value or 0.0


@dataclass
class Flood:
    sent: int = 0


@asynccontextmanager
async def stranger_flood(digit: str, port: int) -> AsyncIterator[Flood]:
    """Send complete RFC 4733 key presses of ``digit`` (end bit set, one start timestamp per
    press) from ``STRANGER`` to 127.0.0.1:``port``, one press every 50 ms, while in the block."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=(STRANGER, 0)
    )
    flood = Flood()
    press = rfc4733_packets(digit, duration_ms=100)

    async def run() -> None:
        seq = itertools.count(1000)
        for n in range(2000):  # 100 s at most; the test ends it long before
            for payload, marker, _ in press:
                data = RtpPacket(TE, next(seq) % 65536, n * 1600, 0x5EED, payload, marker)
                transport.sendto(data.serialize(), ("127.0.0.1", port))
                flood.sent += 1
            await asyncio.sleep(0.05)

    task = asyncio.create_task(run())
    try:
        yield flood
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        transport.close()


@dataclass
class Collected:
    first: str  # the first digit collected
    digits: str  # all digits, after half a second more of flood
    stats: MediaStats
    sends_to: tuple[str, int] | None  # where our RTP went by then


async def collect_under_flood(call: Call) -> Collected:
    """What ``call`` collects while the stranger floods it."""
    media = call.media
    assert media is not None
    async with stranger_flood("7", media.local_port) as flood:
        flood_packets = 3 * len(rfc4733_packets("7", duration_ms=100))
        # under way well before SIPp's key press (1.5 s)
        await wait_until(lambda: flood.sent >= flood_packets, 10, "the flood")
        first = await call.collect(max_digits=1, timeout=15)
        await asyncio.sleep(0.5)
    return Collected(first, call.digits, media.stats, media.remote_address)


async def call_under_flood(
    tmp_path: Path, direction: str, uas: str, uac: str, both: dict[str, str], **uas_only: str
) -> tuple[Collected, int, str]:
    """A call with SIPp pressing 1 (from its RFC 2833 pcap), placed by us (SIPp runs
    `uas`) or by SIPp (`uac`), while a stranger floods its media port: what the call
    collected, SIPp's exit status and its logs. `both` fill either scenario, `uas_only`
    the answering one."""
    pcap = str(dtmf_pcap("1"))
    if direction == "outbound":
        with sipp(uas, tmp_path, PAUSE_MS="1500", PCAP=pcap, fields={**both, **uas_only}) as peer:
            async with Gateway(GatewayConfig(host="127.0.0.1")) as gateway:
                call = await gateway.dial(f"sip:+15550140@{peer.address}", ring_timeout=10)
                assert call.answered, call.result
                got = await collect_under_flood(call)
                await asyncio.wait_for(call.hangup(), 10)
            return got, await asyncio.to_thread(peer.wait, 15), peer.logs()
    outcome: list[Collected] = []

    async def on_incoming(call: Call) -> None:
        outcome.append(await collect_under_flood(call))  # then the gateway hangs up

    async with Gateway(GatewayConfig(host="127.0.0.1"), on_incoming=on_incoming) as gateway:
        host, port = gateway.address("udp")
        with sipp(uac, tmp_path, remote=f"{host}:{port}", PAUSE_MS="1500", PCAP=pcap,
                  fields=both) as peer:  # fmt: skip
            status, logs = await asyncio.to_thread(peer.wait, 30), peer.logs()
    [got] = outcome
    return got, status, logs


@pytest.mark.parametrize("direction", ["outbound", "inbound"])
async def test_strangers_rfc4733_flood_presses_no_key(tmp_path: Path, direction: str) -> None:
    before = dropped_foreign()
    got, sipp_status, sipp_logs = await call_under_flood(
        tmp_path, direction, "uas_answer_dtmf.xml", "uac_dtmf.xml", {}, RING_MS="0", CODECS="0"
    )
    assert (got.first, got.digits) == ("1", "1")  # SIPp's key, and no "7" before or after it
    assert got.stats.foreign > 0
    assert sipp_status == 0, sipp_logs  # it saw our answer, and our BYE after its key press
    assert dropped_foreign() - before >= got.stats.foreign


@pytest.mark.parametrize("direction", ["outbound", "inbound"])
async def test_phone_behind_nat_is_latched_by_its_signalling_address(
    tmp_path: Path, direction: str
) -> None:
    """SIPp's SDP names a private address it never sends from; its RTP comes from the
    address of its SIP. The call latches to that (a trusted host) and hears its key, while
    the stranger, who sends first, is still refused."""
    got, sipp_status, sipp_logs = await call_under_flood(
        tmp_path, direction, "uas_nat_answer_dtmf.xml", "uac_nat_dtmf.xml",
        {"SDP_MEDIA_IP": NAT_PRIVATE},
    )  # fmt: skip
    assert (got.first, got.digits) == ("1", "1")
    assert got.sends_to is not None
    assert got.sends_to[0] == "127.0.0.1"  # latched, not the SDP's
    assert got.stats.foreign > 0  # the stranger's flood
    assert sipp_status == 0, sipp_logs
