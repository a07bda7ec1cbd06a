"""Inbound admission decisions: ACL per trunk, digest per trunk, INVITE flood budget."""

from __future__ import annotations

import pytest
from sipmessage import Request, Response

from gateway.admission import (
    OVERFLOW_SOURCE,
    InboundGuard,
    RefusalAggregator,
    TrustedTrunk,
    check_new_invite,
)
from gateway.sip.auth import Credentials, DigestClient
from gateway.sip.message import Rejection, create_response, new_tag, parse_message

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


def test_untrusted_flood_gets_403_and_costs_no_budget() -> None:
    """ACL first: an untrusted source is told 403 however fast it sends (a 503 would invite
    it to retry), and it never gets a token bucket, so spread-out sources cost no memory."""
    guard = InboundGuard([TrustedTrunk.parse("a", ["127.0.0.2"])], rate=1.0, burst=1)
    codes = {guard.check(invite(), f"127.0.{n // 250}.{n % 250 + 3}", 0.0).code for n in range(500)}
    assert codes == {403}
    assert [guard.check(invite(), "127.0.0.9", 0.0).code for _ in range(3)] == [403] * 3
    assert len(guard._buckets) == 0
    assert guard.check(invite(), "127.0.0.2", 0.0).admitted
    assert guard.check(invite(), "127.0.0.2", 0.0).code == 503  # trusted: budget applies


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
    assert challenged.challenge is not None
    assert challenged.challenge_header == "WWW-Authenticate"
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
    with pytest.raises(ValueError, match="rate must be positive"):
        InboundGuard(rate=0)


# -- check_new_invite ------------------------------------------------------------------------

SDP_OFFER = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.2\r\ns=-\r\nc=IN IP4 127.0.0.2\r\nt=0 0\r\n"
    "m=audio 40000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\n"
)
GOOD = INVITE.replace(
    "Content-Length: 0\r\n",
    "Contact: <sip:+14155550123@127.0.0.2:5062>\r\nContent-Type: application/sdp\r\n"
    f"Content-Length: {len(SDP_OFFER)}\r\n",
).replace("\r\n\r\n", "\r\n\r\n" + SDP_OFFER)


def parsed(text: str) -> Request:
    message = parse_message(text.encode())
    assert isinstance(message, Request)
    return message


def test_a_well_formed_invite_passes() -> None:
    assert check_new_invite(parsed(GOOD)) is None
    late_offer = GOOD.split("\r\n\r\n")[0].replace(f"Content-Length: {len(SDP_OFFER)}", "l: 0")
    assert check_new_invite(parsed(late_offer + "\r\n\r\n")) is None


@pytest.mark.parametrize(
    ("old", "new", "code", "phrase"),
    [
        ("Contact: <sip:+14155550123@127.0.0.2:5062>\r\n", "", 400, "Missing Contact"),
        ("Contact: <sip:+14155550123@127.0.0.2:5062>", "Contact: *", 400, "Invalid Contact"),
        (
            "Contact: <sip:+14155550123@127.0.0.2:5062>",
            "Contact: <sip:a@127.0.0.2>, <sip:b@127.0.0.2>",
            400,
            "More than one Contact",
        ),
        (
            "Contact: <sip:+14155550123@127.0.0.2:5062>",
            "Contact: <tel:+1555>",
            400,
            "Invalid Contact",
        ),
        (";tag=c1", "", 400, "Missing From tag"),
        (
            "INVITE sip:hotline@127.0.0.1:5060",
            "INVITE tel:+15550100",
            416,
            "Unsupported URI Scheme",
        ),
        (
            "INVITE sip:hotline@127.0.0.1:5060",
            "INVITE sips:hotline@127.0.0.1",
            416,
            "Unsupported URI Scheme",
        ),
        (
            "INVITE sip:hotline@127.0.0.1:5060",
            "INVITE sip:hotline@127.0.0.1:0",
            400,
            "Invalid Request-URI",
        ),
        ("Max-Forwards: 70", "Max-Forwards: 0", 483, "Too Many Hops"),
        ("Max-Forwards: 70", "Max-Forwards: 70\r\nRequire: 100rel, foo", 420, "Bad Extension"),
        (
            "Content-Type: application/sdp",
            "Content-Type: text/plain",
            415,
            "Unsupported Media Type",
        ),
        ("Content-Type: application/sdp\r\n", "", 400, "Missing Content-Type"),
        (
            "Content-Type: application/sdp",
            "Content-Type: application/sdp\r\nContent-Encoding: gzip",
            415,
            "Unsupported Content-Encoding",
        ),
        ("RTP/AVP 0 101", "RTP/AVP 18 101", 488, "Not Acceptable Here (no common codec)"),
        (
            "m=audio",
            "m=video",
            488,
            "Not Acceptable Here (offer has no usable RTP/AVP or RTP/SAVP audio stream)",
        ),
        ("CSeq: 1 INVITE", "CSeq: 1 BYE", 400, "CSeq method does not match the request"),
    ],
)
def test_unservable_invites_get_a_precise_final_response(
    old: str, new: str, code: int, phrase: str
) -> None:
    assert old in GOOD
    text = GOOD.replace(old, new)
    body = text.split("\r\n\r\n", 1)[1]
    text = text.replace(f"Content-Length: {len(SDP_OFFER)}", f"Content-Length: {len(body)}")
    request = Request.parse(text.encode())  # not parse_message: its own checks come first
    assert isinstance(request, Request)
    rejection = check_new_invite(request)
    assert rejection is not None
    assert (rejection.code, rejection.phrase) == (code, phrase)


def test_rejections_carry_the_headers_their_code_needs() -> None:
    require = parsed(
        GOOD.replace("Max-Forwards: 70", "Max-Forwards: 70\r\nRequire: 100rel, timer, foo")
    )
    assert check_new_invite(require) == Rejection(420, "Bad Extension", (("Unsupported", "foo"),))
    ours = parsed(GOOD.replace("Max-Forwards: 70", "Max-Forwards: 70\r\nRequire: 100rel, timer"))
    assert check_new_invite(ours) is None  # RFC 3262 and RFC 4028 are ours
    media = parsed(GOOD.replace("application/sdp", "application/json"))
    rejection = check_new_invite(media)
    assert rejection is not None
    assert rejection.headers == (("Accept", "application/sdp"),)


def test_hostile_sdp_text_never_breaks_the_reason_phrase() -> None:
    body = SDP_OFFER.replace("m=audio 40000 RTP/AVP 0 101", "m=audio x\u00e9\r\n\x7f")
    text = GOOD.split("\r\n\r\n")[0].replace(f"{len(SDP_OFFER)}", str(len(body.encode())))
    rejection = check_new_invite(parsed(text + "\r\n\r\n" + body))
    assert rejection is not None
    assert rejection.code == 488
    assert all(" " <= ch <= "~" for ch in rejection.phrase)
    assert len(rejection.phrase) < 120


# -- RefusalAggregator ----------------------------------------------------------------------


def test_first_refusal_at_once_later_ones_counted_until_the_interval_closes() -> None:
    agg = RefusalAggregator(interval=10.0)
    [first] = agg.add("192.0.2.1", 403, "untrusted_source", 0.0, caller="sip:a@x", call_id="c1")
    assert (first.source, first.count, first.first, first.caller) == (
        "192.0.2.1",
        1,
        True,
        "sip:a@x",
    )
    for at in (1.0, 2.0, 9.9):
        assert agg.add("192.0.2.1", 403, "untrusted_source", at) == []
    # The next refusal after the interval closes it (one line with the count) and opens a
    # new one, written at once.
    summary, reopened = agg.add("192.0.2.1", 403, "untrusted_source", 10.5, call_id="c9")
    assert (summary.count, summary.first, summary.since, summary.call_id) == (3, False, 0.0, None)
    assert (reopened.count, reopened.first, reopened.call_id) == (1, True, "c9")


def test_quiet_sources_are_closed_by_due_and_everything_by_flush() -> None:
    agg = RefusalAggregator(interval=10.0)
    agg.add("192.0.2.1", 403, "untrusted_source", 0.0)
    agg.add("192.0.2.1", 403, "untrusted_source", 1.0)
    agg.add("192.0.2.2", 503, "invite_flood", 5.0)  # alone in its interval: no summary
    agg.add("192.0.2.3", 403, "untrusted_source", 6.0)
    agg.add("192.0.2.3", 403, "untrusted_source", 7.0)
    assert agg.next_due() == 10.0
    assert agg.due(9.9) == []
    [closed] = agg.due(15.0)
    assert (closed.source, closed.count) == ("192.0.2.1", 1)
    assert agg.next_due() == 16.0
    assert len(agg) == 1
    [left] = agg.flush()
    assert (left.source, left.code, left.count) == ("192.0.2.3", 403, 1)
    assert len(agg) == 0
    assert agg.next_due() is None
    assert agg.flush() == []


def test_codes_of_one_source_are_counted_apart() -> None:
    agg = RefusalAggregator(interval=10.0)
    assert len(agg.add("192.0.2.1", 401, "authentication_required", 0.0)) == 1
    assert len(agg.add("192.0.2.1", 503, "invite_flood", 0.1)) == 1
    agg.add("192.0.2.1", 503, "invite_flood", 0.2)
    assert [(r.code, r.count) for r in agg.flush()] == [(503, 1)]


def test_table_is_bounded_and_overflow_folds_into_one_entry() -> None:
    agg = RefusalAggregator(interval=60.0, max_sources=100)
    lines = []
    for n in range(20_000):
        lines += agg.add(
            f"10.{n // 65536}.{n // 256 % 256}.{n % 256}", 403, "untrusted_source", n / 1000
        )
    assert len(agg) == 101  # the 100 sources that came first, and the overflow entry
    lines += agg.flush()
    assert len(lines) == 100 + 2  # one line per tracked source, the overflow's first and rest
    assert sum(line.count for line in lines) == 20_000
    overflow = [line for line in lines if line.source == OVERFLOW_SOURCE]
    assert [line.count for line in overflow] == [1, 20_000 - 101]


def test_bad_aggregator_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="interval must be positive"):
        RefusalAggregator(interval=0)
    with pytest.raises(ValueError, match="max_sources at least 1"):
        RefusalAggregator(max_sources=0)
