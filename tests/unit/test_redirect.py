"""Following 3xx redirects: which Contact is next, loops, the hop bound and the screen."""

from __future__ import annotations

import pytest
from sipmessage import URI, Address, CSeq, Request

from gateway.redirect import (
    RedirectPolicy,
    Redirects,
    RedirectScreen,
    RedirectVerdict,
    redirected_invite,
    target_key,
)
from gateway.sip.message import new_branch

FIRST = URI.parse("sip:+14155550101@127.0.0.1:5070")


def allow_all(uri: URI) -> str | None:
    return None


def refuse_900(uri: URI) -> str | None:
    return "premium_rate numbers are refused" if (uri.user or "").startswith("+1900") else None


def contacts(*texts: str) -> list[Address]:
    return [Address.parse(text) for text in texts]


def start(screen: RedirectScreen = allow_all, max_hops: int = 3) -> Redirects:
    return Redirects.start(RedirectPolicy(screen, max_hops), FIRST)


def test_follows_the_contact_and_remembers_it() -> None:
    decision, after = start().decide(contacts("<sip:+14155550102@127.0.0.1:5072>"))
    assert decision.verdict is RedirectVerdict.FOLLOW
    assert str(decision.target) == "sip:+14155550102@127.0.0.1:5072"
    assert after.hops == 1
    assert after.visited[-1] == "sip:+14155550102@127.0.0.1:5072"


def test_highest_q_first_and_equal_q_in_order() -> None:
    decision, _ = start().decide(
        contacts(
            "<sip:+14155550103@127.0.0.1:5073>;q=0.2",
            "<sip:+14155550104@127.0.0.1:5074>",
            "<sip:+14155550105@127.0.0.1:5075>;q=1.0",
        )
    )
    assert decision.target is not None
    assert decision.target.user == "+14155550104"


def test_refused_target_refuses_the_redirect() -> None:
    history = start(refuse_900)
    decision, after = history.decide(
        contacts("<sip:+19005550100@127.0.0.1:5072>", "<sip:+14155550102@127.0.0.1:5072>;q=0.5")
    )
    assert decision.verdict is RedirectVerdict.REFUSED
    assert decision.verdict.refused
    assert decision.target is not None
    assert decision.target.user == "+19005550100"
    assert "premium" in decision.reason
    assert after == history  # nothing was called


def test_a_target_seen_before_is_a_loop() -> None:
    history = start()
    _, history = history.decide(contacts("<sip:+14155550102@127.0.0.1:5072>"))
    decision, _ = history.decide(contacts("<sip:+14155550101@127.0.0.1:5070>"))
    assert decision.verdict is RedirectVerdict.LOOP
    # host case, a default port and URI parameters do not make a target new
    same = contacts("<sip:+14155550102@127.0.0.1:5072;transport=udp>")
    assert history.decide(same)[0].verdict is RedirectVerdict.LOOP
    assert target_key(URI.parse("sip:a@EXAMPLE.test")) == target_key(
        URI.parse("sip:a@example.test:5060")
    )


def test_an_unseen_contact_is_taken_over_a_seen_one() -> None:
    decision, _ = start().decide(
        contacts("<sip:+14155550101@127.0.0.1:5070>", "<sip:+14155550106@127.0.0.1:5076>;q=0.1")
    )
    assert decision.verdict is RedirectVerdict.FOLLOW
    assert decision.target is not None
    assert decision.target.user == "+14155550106"


def test_hops_are_bounded() -> None:
    history = start(max_hops=2)
    verdicts = []
    for port in range(5071, 5075):  # always a new target
        decision, history = history.decide(contacts(f"<sip:+14155550107@127.0.0.1:{port}>"))
        verdicts.append(decision.verdict)
    assert verdicts == [
        RedirectVerdict.FOLLOW,
        RedirectVerdict.FOLLOW,
        RedirectVerdict.TOO_MANY_HOPS,
        RedirectVerdict.TOO_MANY_HOPS,
    ]
    with pytest.raises(ValueError, match="max_hops must be at least 1"):
        RedirectPolicy(allow_all, 0)


@pytest.mark.parametrize("text", ["", "<tel:+14155550102>", "<sips:+14155550102@127.0.0.1>"])
def test_no_callable_contact(text: str) -> None:
    decision, _ = start().decide(contacts(text) if text else [])
    assert decision.verdict is RedirectVerdict.NO_TARGET


def test_redirected_invite_is_the_same_call_with_the_next_cseq() -> None:
    invite = Request("INVITE", FIRST)
    invite.headers.add("Via", f"SIP/2.0/UDP 127.0.0.1:5060;branch={new_branch()};rport")
    invite.headers.add("From", "<sip:ackline@127.0.0.1>;tag=abc")
    invite.headers.add("To", "<sip:+14155550101@127.0.0.1:5070>")
    invite.headers.add("Call-ID", "call-1@127.0.0.1")
    invite.cseq = CSeq(2, "INVITE")
    invite.headers.add("Authorization", 'Digest username="gw"')
    invite.body = b"v=0\r\n"
    target = URI.parse("sip:+14155550102@127.0.0.1:5072")
    via = Request.parse(
        b"OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKnew;rport\r\n"
        b"Content-Length: 0\r\n\r\n"
    ).via[0]
    moved = redirected_invite(invite, target, via, keep_credentials=False)
    assert moved.uri == target
    assert moved.cseq == CSeq(3, "INVITE")
    assert moved.call_id == invite.call_id
    assert moved.headers["From"] == invite.headers["From"]
    assert moved.headers["To"] == invite.headers["To"]
    assert moved.body == invite.body
    assert moved.via[0].parameters.get("branch") == "z9hG4bKnew"
    assert moved.headers.getlist("Authorization") == []
    kept = redirected_invite(invite, target, via, keep_credentials=True)
    assert kept.headers["Authorization"] == 'Digest username="gw"'
    assert invite.uri == FIRST
    assert invite.cseq == CSeq(2, "INVITE")  # the original untouched
