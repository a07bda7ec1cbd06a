"""`ackline serve` with ``ACKLINE_SIP_SRTP=required``: an inbound call offering plain RTP is
refused with 488 (SIPp over UDP, baresip over TLS), one offering SDES SRTP over TLS
(baresip, ``mediaenc=srtp-mand``) is answered and its digit heard through SRTP."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.ports import free_port, listening
from tests.integration.baresip_peer import baresip_uac
from tests.integration.peers import call_results, serve_gateway, sipp, wait_until
from tests.tls_certs import make_pki

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]


def test_serve_with_srtp_required_refuses_plain_rtp_and_answers_srtp(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls_port = free_port()
    args = ("--tls-cert", str(pki.cert), "--tls-key", str(pki.key), "--tls-port", str(tls_port))
    with serve_gateway(tmp_path, *args, env={"ACKLINE_SIP_SRTP": "required"}) as (port, proc):
        wait_until(lambda: listening(tls_port, "tcp"), 10, "serve to listen on TLS")
        (tmp_path / "sipp").mkdir()
        with sipp(
            "uac_refused.xml", tmp_path / "sipp", remote=f"127.0.0.1:{port}", CODE="488"
        ) as plain:
            assert plain.wait(timeout=20) == 0, plain.logs()

        target = f"sip:hotline@127.0.0.1:{tls_port};transport=tls"
        (tmp_path / "plain-tls").mkdir()
        with baresip_uac(
            tmp_path / "plain-tls", target, transport="tls", certificate=pki.bundle
        ) as rtp_only:
            rtp_only.wait_closed(15.0)
            replies = [m.first_line for m in rtp_only.sip_messages()]
        assert not rtp_only.established, rtp_only.log_text()
        assert any(line.startswith("SIP/2.0 488") for line in replies), replies

        (tmp_path / "srtp").mkdir()
        with baresip_uac(
            tmp_path / "srtp", target, transport="tls", certificate=pki.bundle,
            mediaenc="srtp-mand", dtmf="7", dtmf_delay_s=1.5,
        ) as secure:  # fmt: skip
            secure.wait_established(10.0)
            secure.wait_closed(20.0)
            assert secure.closed_by_remote, secure.log_text()
        proc.terminate()
        proc.wait(timeout=10)
        calls = call_results(proc)
    [call] = calls  # the refused ones never became calls
    assert call["direction"] == "inbound"
    assert call["transport"] == "tls"
    assert call["srtp"] is True
    assert call["digits"] == "7"
    assert call["dtmf_method"] == "rfc4733"


@pytest.mark.parametrize(
    ("in_file", "env", "cli"),
    [("required", {}, ()), ("off", {"ACKLINE_SIP_SRTP": "off"}, ("--srtp", "required"))],
    ids=["file", "cli-over-env-and-file"],
)
def test_serve_takes_its_srtp_policy_from_the_file_or_the_cli(
    tmp_path: Path, in_file: str, env: dict[str, str], cli: tuple[str, ...]
) -> None:
    """The policy comes from ackline.yaml too, and --srtp wins over the environment and
    the file: either way `required` refuses a plain-RTP call over UDP with 488."""
    config = tmp_path / "ackline.yaml"
    config.write_text(f"inbound_srtp: {in_file}\n")
    with serve_gateway(tmp_path, *cli, env={"ACKLINE_CONFIG": str(config), **env}) as (port, _):
        (tmp_path / "sipp").mkdir()
        with sipp(
            "uac_refused.xml", tmp_path / "sipp", remote=f"127.0.0.1:{port}", CODE="488"
        ) as plain:
            assert plain.wait(timeout=20) == 0, plain.logs()
