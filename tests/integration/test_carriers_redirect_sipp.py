"""3xx redirects through `ackline call`, SIPp playing the carriers: the redirected call
proceeds (its key is heard), a redirect to a premium-rate number is refused before any
INVITE reaches it, and two carriers redirecting to each other end the call, bounded."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.integration.peers import SippRun, dtmf_pcap, free_port, sipp
from tests.integration.test_cli_call_carriers import NUMBER, carriers, run

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]


def sub(tmp: Path, name: str) -> Path:
    (tmp / name).mkdir()
    return tmp / name


def dialled(peer: SippRun) -> list[str]:
    """The users SIPp received INVITEs for, in order (from its scenario log)."""
    return [
        m.group(1) for line in peer.log_lines() if (m := re.search(r"INVITE .*?user=(\S+)", line))
    ]


def test_a_302_is_followed_and_the_call_proceeds(tmp_path: Path) -> None:
    with sipp("carrier_answer_dtmf.xml", sub(tmp_path, "b"), RING_MS="0", PAUSE_MS="300",
              PCAP=str(dtmf_pcap("4"))) as moved:  # fmt: skip
        contact = f"sip:+14155550102@127.0.0.1:{moved.port}"
        with sipp("carrier_redirect.xml", sub(tmp_path, "a"), CONTACT=contact) as carrier:
            config = carriers({"name": "a", "host": "127.0.0.1", "port": carrier.port})
            code, result, err = run(tmp_path, config, NUMBER, "--gather", "1", "--timeout", "8")
            assert carrier.wait(10) == 0, carrier.logs()  # it got our ACK to its 302
        assert moved.wait(10) == 0, moved.logs()  # answered, key sent, our BYE received
    assert code == 0, err
    assert (result["outcome"], result["digits"], result["trunk"]) == ("answered", "4", "a")
    assert result["redirected_to"] == [f"sip:+14155550102@127.0.0.1:{moved.port}"]
    assert dialled(carrier) == [NUMBER]
    assert dialled(moved) == ["+14155550102"]


def test_a_redirect_to_a_premium_number_is_refused(tmp_path: Path) -> None:
    with sipp("carrier_answer_dtmf.xml", sub(tmp_path, "b"), RING_MS="0", PAUSE_MS="0",
              PCAP=str(dtmf_pcap("4"))) as premium:  # fmt: skip
        contact = f"sip:+19005550100@127.0.0.1:{premium.port}"
        with sipp("carrier_redirect.xml", sub(tmp_path, "a"), CONTACT=contact) as carrier:
            config = carriers(
                {"name": "a", "host": "127.0.0.1", "port": carrier.port, "priority": 1},
                {"name": "b", "host": "127.0.0.1", "port": premium.port, "priority": 2},
            )
            code, _result, err = run(tmp_path, config, NUMBER)
            assert carrier.wait(10) == 0, carrier.logs()
    assert code == 2, err
    assert "refusing to call +19005550100" in err, err
    assert "premium_rate" in err, err
    assert dialled(premium) == []  # neither followed nor failed over to trunk b


def test_a_redirect_loop_ends_bounded(tmp_path: Path) -> None:
    port_a, port_b = free_port(), free_port()
    with (
        sipp("carrier_redirect.xml", sub(tmp_path, "a"), port=port_a,
             CONTACT=f"sip:+14155550102@127.0.0.1:{port_b}") as a,
        sipp("carrier_redirect.xml", sub(tmp_path, "b"), port=port_b,
             CONTACT=f"sip:{NUMBER}@127.0.0.1:{port_a}") as b,
    ):  # fmt: skip
        config = carriers({"name": "a", "host": "127.0.0.1", "port": a.port})
        code, result, err = run(tmp_path, config, NUMBER)
        assert a.wait(10) == 0, a.logs() + b.logs()
        assert b.wait(10) == 0, a.logs() + b.logs()  # both 302s ACKed
    assert code == 3, err
    assert [(t["trunk"], t["outcome"], t["sip_code"]) for t in result["trunks_tried"]] == [
        ("a", "carrier_error", 302)
    ]
    assert "redirect loop" in result["trunks_tried"][0]["reason"]
    assert dialled(a) == [NUMBER]
    assert dialled(b) == ["+14155550102"]


async def test_a_refused_redirect_is_the_pages_recorded_fraud_refusal(tmp_path: Path) -> None:
    """Through the voice channel (whose result the engine audits): a permanent failure
    named fraud_refused, as for a premium number dialled directly, and counted."""
    from prometheus_client import REGISTRY

    from api.voice_channel import CarrierDialer, VoiceChannel
    from carriers.router import CarrierRouter
    from carriers.trunk import Trunk
    from escalation.channels.base import DeliveryStatus
    from gateway.call import Gateway, GatewayConfig
    from tests.fakes import make_notification

    def refused() -> float:
        sample = "ackline_calls_refused_total"
        return REGISTRY.get_sample_value(sample, {"reason": "redirect"}) or 0.0

    before = refused()
    contact = f"sip:+19005550100@127.0.0.1:{free_port()}"
    with sipp("carrier_redirect.xml", tmp_path, CONTACT=contact) as carrier:
        trunk = Trunk(name="a", host="127.0.0.1", port=carrier.port)
        async with Gateway(GatewayConfig(host="127.0.0.1", udp_port=0)) as gw:
            router = CarrierRouter(gw, [trunk], allowed_countries=["US"])
            try:
                channel = VoiceChannel(CarrierDialer(router))
                result = await channel.send(make_notification("voice", phone=NUMBER))
            finally:
                await router.close()
    assert (result.status, result.reason) == (DeliveryStatus.FAILED_PERMANENT, "fraud_refused")
    assert "+19005550100" in result.details["error"]
    assert "premium_rate" in result.details["error"]
    assert refused() == before + 1
