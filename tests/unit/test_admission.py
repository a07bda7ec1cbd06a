"""Inbound admission decisions: ACL per trunk, digest per trunk, INVITE flood budget."""

from __future__ import annotations

import pytest
from sipmessage import Request, Response

from gateway.admission import InboundGuard, TrustedTrunk
from gateway.sip.auth import Credentials, DigestClient
from gateway.sip.message import create_response, new_tag, parse_message

INVITE = (
    "INVITE sip:hotline@127.0.0.1:5060 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 127.0.0.2:5062;branch=z9hG4bKadm1;rport\r\n"
    "Max-Forwards: 70\r\n"
    "To: <sip:hotline@127.0.0.1:5060>\r\n"
    "From: <sip:+14155550123@127.0.0.2>;tag=c1\r\n"
    "Call-ID: adm-1@127.0.0.2\r\n"
    "CSeq: 1 INVITE\r\n"
    "Content-Length: 0\r\n"
    "\r\n"
)


def invite() -> Request:
    message = parse_message(INVITE.encode())
    assert isinstance(message, Request)
    return message


def test_acl_admits_trunk_addresses_only() -> None:
    guard = InboundGuard(
        [
            TrustedTrunk.parse("carrier-a", ["127.0.0.2", "2001:db8::/32"]),
            TrustedTrunk.parse("carrier-b", ["10.9.0.0/16"]),
        ]
    )
    assert guard.check(invite(), "127.0.0.2", 0.0).trunk == "carrier-a"
    assert guard.check(invite(), "2001:db8::7", 0.0).admitted
    assert guard.check(invite(), "10.9.3.4", 0.0).trunk == "carrier-b"
    refused = guard.check(invite(), "127.0.0.9", 0.0)
    assert (refused.admitted, refused.code, refused.reason) == (False, 403, "untrusted_source")
    assert not guard.check(invite(), "not-an-address", 0.0).admitted


def test_without_trunks_every_source_is_trusted() -> None:
    assert InboundGuard().check(invite(), "192.0.2.1", 0.0).admitted


def test_flood_gets_503_with_retry_after_then_recovers() -> None:
    guard = InboundGuard(rate=2.0, burst=3)
    decisions = [guard.check(invite(), "127.0.0.2", 0.0) for _ in range(5)]
    assert [d.admitted for d in decisions] == [True, True, True, False, False]
    assert (decisions[3].code, decisions[3].reason, decisions[3].retry_after) == (
        503,
        "invite_flood",
        1,
    )
    assert guard.check(invite(), "127.0.0.3", 0.0).admitted  # budgets are per source
    assert guard.check(invite(), "127.0.0.2", 0.5).admitted  # 0.5 s at 2/s refills one
    assert not guard.check(invite(), "127.0.0.2", 0.5).admitted


def test_untrusted_flood_is_counted_too() -> None:
    guard = InboundGuard([TrustedTrunk.parse("a", ["127.0.0.2"])], rate=1.0, burst=1)
    assert guard.check(invite(), "127.0.0.9", 0.0).code == 403
    assert guard.check(invite(), "127.0.0.9", 0.0).code == 503


def test_source_table_is_bounded() -> None:
    guard = InboundGuard(rate=1.0, burst=1, max_sources=2)
    for host in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
        guard.check(invite(), host, 0.0)
    assert len(guard._buckets) == 2


def test_trunk_with_credentials_challenges_then_admits() -> None:
    trunk = TrustedTrunk.parse("carrier-a", ["127.0.0.2"], users={"carrier-a": "s3cret"})
    guard = InboundGuard([trunk])
    first = invite()
    challenged = guard.check(first, "127.0.0.2", 0.0)
    assert (challenged.admitted, challenged.code, challenged.reason) == (
        False,
        401,
        "authentication_required",
    )
    assert challenged.challenge is not None and challenged.challenge_header == "WWW-Authenticate"
    response = create_response(first, 401, to_tag=new_tag())
    response.headers.set(challenged.challenge_header, str(challenged.challenge))
    parsed = parse_message(bytes(response))
    assert isinstance(parsed, Response)

    good = DigestClient(Credentials("carrier-a", "s3cret")).authorize(first, parsed)
    admitted = guard.check(good, "127.0.0.2", 1.0)
    assert (admitted.admitted, admitted.username, admitted.trunk) == (
        True,
        "carrier-a",
        "carrier-a",
    )

    bad = DigestClient(Credentials("carrier-a", "guess")).authorize(first, parsed)
    assert guard.check(bad, "127.0.0.2", 1.0).code == 401


@pytest.mark.parametrize("sources", [[], ["not-an-ip"], ["127.0.0.300"]])
def test_bad_trunk_sources_are_named(sources: list[str]) -> None:
    with pytest.raises(ValueError, match="carrier-a"):
        TrustedTrunk.parse("carrier-a", sources)


def test_bad_budget_is_refused() -> None:
    with pytest.raises(ValueError):
        InboundGuard(rate=0)
