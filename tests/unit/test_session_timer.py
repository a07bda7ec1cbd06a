"""RFC 4028 session timer negotiation and clock on synthetic time."""

from __future__ import annotations

import pytest
from sipmessage import Request, Response

from gateway.sip.message import create_response, parse_message
from gateway.sip.session_timer import (
    ExpiryReason,
    RefreshDue,
    Refresher,
    RefreshMethod,
    SessionExpired,
    SessionExpires,
    SessionTimer,
    SessionTimerSettings,
    negotiate_uac,
    negotiate_uas,
    parse_session_expires,
    refresh_method,
    retry_interval_after_422,
)


def _invite(extra: str = "") -> Request:
    raw = (
        "INVITE sip:bob@127.0.0.1 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKst1\r\n"
        "Max-Forwards: 70\r\n"
        "To: <sip:bob@127.0.0.1>\r\n"
        "From: <sip:alice@127.0.0.1>;tag=a1\r\n"
        "Call-ID: st-1@127.0.0.1\r\n"
        "CSeq: 1 INVITE\r\n"
        "Contact: <sip:alice@127.0.0.1>\r\n"
        f"{extra}"
        "Content-Length: 0\r\n\r\n"
    )
    message = parse_message(raw.encode())
    assert isinstance(message, Request)
    return message


def _response(code: int, **headers: str) -> Response:
    response = create_response(_invite(), code, to_tag="b1")
    for name, value in headers.items():
        response.headers.set(name.replace("_", "-"), value)
    return response


def test_parse_session_expires_forms() -> None:
    assert parse_session_expires(_invite("Session-Expires: 1800;refresher=uac\r\n")) == (
        SessionExpires(1800, Refresher.UAC)
    )
    assert parse_session_expires(_invite("x: 600\r\n")) == SessionExpires(600)
    assert parse_session_expires(_invite("Session-Expires: soon\r\n")) is None
    assert parse_session_expires(_invite("Session-Expires: 90;refresher=me\r\n")) is None
    assert str(SessionExpires(90, Refresher.UAS)) == "90;refresher=uas"


def test_422_retry_takes_min_se_once_and_bounded() -> None:
    assert retry_interval_after_422(_response(422, Min_SE="1200"), 600, 7200) == 1200
    assert retry_interval_after_422(_response(422, Min_SE="600"), 600, 7200) is None
    assert retry_interval_after_422(_response(422), 600, 7200) is None
    assert retry_interval_after_422(_response(422, Min_SE="86400"), 600, 7200) is None


def test_uac_negotiation_defaults_refresher_to_uac() -> None:
    assert negotiate_uac(_response(200, Session_Expires="900;refresher=uas")) == (
        SessionExpires(900, Refresher.UAS)
    )
    assert negotiate_uac(_response(200, Session_Expires="900")) == SessionExpires(
        900, Refresher.UAC
    )
    assert negotiate_uac(_response(200)) is None


SETTINGS = SessionTimerSettings()


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ("Session-Expires: 1800;refresher=uas\r\nSupported: timer\r\n", Refresher.UAS),
        ("Session-Expires: 1800;refresher=uac\r\nSupported: timer\r\n", Refresher.UAC),
        ("Session-Expires: 1800\r\nSupported: timer\r\n", Refresher.UAC),
        ("Session-Expires: 1800\r\n", Refresher.UAS),  # the caller cannot refresh
    ],
)
def test_uas_negotiation_table_2(headers: str, expected: Refresher) -> None:
    negotiation = negotiate_uas(_invite(headers), SETTINGS)
    assert negotiation.rejection is None
    assert negotiation.expires == SessionExpires(1800, expected)


def test_uas_refuses_too_small_with_422() -> None:
    negotiation = negotiate_uas(_invite("Session-Expires: 60\r\n"), SETTINGS)
    assert negotiation.rejection is not None
    assert negotiation.rejection.code == 422
    assert dict(negotiation.rejection.headers) == {"Min-SE": "90"}
    assert negotiate_uas(_invite(), SETTINGS).expires is None


def test_settings_floor() -> None:
    with pytest.raises(ValueError, match="min_se must be at least 90 s"):
        SessionTimerSettings(session_expires=60, min_se=60)
    SessionTimerSettings(session_expires=4, min_se=2, floor=2)  # lab use, said explicitly


def _run(timer: SessionTimer, until: float) -> list[tuple[float, object]]:
    """Fire the timer's deadlines up to ``until``; the events with their times."""
    seen: list[tuple[float, object]] = []
    for _ in range(100):
        at = timer.next_timer_at()
        if at is None or at > until:
            break
        timer.handle_timer(at)
        while (event := timer.next_event()) is not None:
            seen.append((at, event))
    return seen


def test_refresher_refreshes_at_half_then_restarts() -> None:
    timer = SessionTimer(SessionExpires(1800, Refresher.UAC), local_refresher=True, now=0.0)
    assert _run(timer, 899) == []
    assert _run(timer, 900) == [(900.0, RefreshDue())]
    assert timer.next_timer_at() == 1800.0  # in flight: only the expiry is left
    timer.refreshed(SessionExpires(1800, Refresher.UAC), local_refresher=True, now=901.0)
    assert timer.next_timer_at() == 1801.0


@pytest.mark.parametrize("code", [408, 481, None])
def test_refresher_ends_on_fatal_refresh_failure(code: int | None) -> None:
    timer = SessionTimer(SessionExpires(120, Refresher.UAC), local_refresher=True, now=0.0)
    _run(timer, 60)
    timer.refresh_failed(code, 61.0)
    event = timer.next_event()
    assert isinstance(event, SessionExpired)
    assert event.code == code
    assert event.reason in (ExpiryReason.REFRESH_FAILED, ExpiryReason.REFRESH_UNANSWERED)
    assert timer.next_timer_at() is None
    assert "120 s" in event.describe(timer.interval)


def test_refresher_retries_other_failures_then_expires() -> None:
    timer = SessionTimer(SessionExpires(120, Refresher.UAC), local_refresher=True, now=0.0)
    _run(timer, 60)
    timer.refresh_failed(491, 60.0)
    assert timer.next_event() is None
    assert _run(timer, 90) == [(90.0, RefreshDue())]
    timer.refresh_failed(500, 90.0)
    assert _run(timer, 200)[-1] == (120.0, SessionExpired(ExpiryReason.REFRESH_FAILED, 500))


def test_peer_refresher_missing_ends_before_expiry() -> None:
    timer = SessionTimer(SessionExpires(1800, Refresher.UAS), local_refresher=False, now=0.0)
    assert _run(timer, 10_000) == [(1768.0, SessionExpired(ExpiryReason.NO_REFRESH))]
    short = SessionTimer(SessionExpires(90, Refresher.UAS), local_refresher=False, now=0.0)
    assert _run(short, 100) == [(60.0, SessionExpired(ExpiryReason.NO_REFRESH))]


def test_peer_refresh_postpones_expiry() -> None:
    timer = SessionTimer(SessionExpires(90, Refresher.UAC), local_refresher=False, now=0.0)
    assert _run(timer, 50) == []
    timer.refreshed(SessionExpires(90, Refresher.UAC), local_refresher=False, now=50.0)
    assert _run(timer, 100) == []
    assert _run(timer, 110) == [(110.0, SessionExpired(ExpiryReason.NO_REFRESH))]


def test_a_failed_refresh_is_retried_once_however_short_the_interval() -> None:
    timer = SessionTimer(SessionExpires(4, Refresher.UAC), local_refresher=True, now=0.0)
    assert _run(timer, 2) == [(2.0, RefreshDue())]
    timer.refresh_failed(491, 2.1)  # glare: the peer's own re-INVITE crossed ours
    assert _run(timer, 3.05) == [(3.05, RefreshDue())]
    timer.refresh_failed(491, 3.1)
    assert timer.next_timer_at() == 4.0  # no third try: the expiry decides
    assert _run(timer, 5) == [(4.0, SessionExpired(ExpiryReason.REFRESH_FAILED, 491))]


@pytest.mark.parametrize(
    ("allow", "current", "expected"),
    [
        ("Allow: INVITE, ACK, BYE, UPDATE\r\n", RefreshMethod.INVITE, RefreshMethod.UPDATE),
        ("Allow: INVITE, ACK\r\nAllow: bye,update\r\n", RefreshMethod.INVITE,
         RefreshMethod.UPDATE),  # several headers, any case
        ("Allow: INVITE, ACK, BYE\r\n", RefreshMethod.UPDATE, RefreshMethod.INVITE),
        ("Allow: INVITE, ACK, UPDATES\r\n", RefreshMethod.INVITE, RefreshMethod.INVITE),
        ("", RefreshMethod.UPDATE, RefreshMethod.UPDATE),  # no Allow says nothing
        ("", RefreshMethod.INVITE, RefreshMethod.INVITE),
    ],
)  # fmt: skip
def test_refresh_with_update_only_when_the_peer_allows_it(
    allow: str, current: RefreshMethod, expected: RefreshMethod
) -> None:
    assert refresh_method(_invite(allow), current) is expected
