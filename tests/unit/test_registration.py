"""The registration state machine with synthetic time: every branch, no sockets."""

from __future__ import annotations

import secrets

import pytest
from sipmessage import URI, Parameters, Request, Response, Via

from gateway.sip.auth import Credentials, DigestServer, parse_credentials
from gateway.sip.message import create_response
from gateway.sip.registration import (
    MAX_AUTH_ROUNDS,
    Backoff,
    ContactBindings,
    Event,
    Failed,
    Registered,
    Registration,
    RegistrationSettings,
    RegistrationState,
    StateChanged,
    Stopped,
    granted_expires,
)

CONTACT = URI.parse("sip:acme-in@127.0.0.1:5070")
PASSWORD = secrets.token_hex(8)


def via() -> Via:
    return Via(
        transport="UDP",
        host="127.0.0.1",
        port=5070,
        parameters=Parameters(branch="z9hG4bK" + secrets.token_hex(8), rport=None),
    )


def machine(
    *, expires: int = 3600, credentials: bool = True, backoff: Backoff | None = None
) -> Registration:
    settings = RegistrationSettings(
        registrar=URI.parse("sip:127.0.0.1:5060"),
        aor=URI.parse("sip:acme@127.0.0.1"),
        contact=CONTACT,
        call_id="reg-1@127.0.0.1",
        from_tag="ft1",
        expires=expires,
        credentials=Credentials("acme", PASSWORD) if credentials else None,
        backoff=backoff or Backoff(),
    )
    return Registration(settings, new_via=via, draw=lambda: 0.0)


def sent(reg: Registration) -> Request:
    [request] = reg.requests_to_send()
    return request


def state(reg: Registration) -> RegistrationState:
    """`reg.state` read through a call: a type checker keeps an attribute narrowed by an
    earlier assert across the method calls that change it."""
    return reg.state


def stopped(reg: Registration) -> bool:
    """`reg.stopped`, read like `state`."""
    return reg.stopped


def events(reg: Registration) -> list[Event]:
    out = []
    while (event := reg.next_event()) is not None:
        out.append(event)
    return out


def answer(
    request: Request, code: int, *headers: tuple[str, str], contact: bool = True
) -> Response:
    response = create_response(request, code, to_tag="registrar")
    if code == 200 and contact:
        expires = request.headers.get("Expires") or "3600"
        response.headers.set("Contact", f"<{CONTACT}>;expires={expires}")
    for name, value in headers:
        response.headers.add(name, value)
    return response


def challenge(server: DigestServer, request: Request, now: float, stale: bool = False) -> Response:
    return answer(
        request,
        server.status_code,
        (server.challenge_header, str(server.challenge(now, stale=stale))),
    )


def server(proxy: bool = False) -> DigestServer:
    return DigestServer("registrar.test", {"acme": PASSWORD}, proxy=proxy)


def registered(reg: Registration, now: float = 0.0) -> Request:
    """Start and get a 200 straight away; returns the REGISTER."""
    reg.start(now)
    request = sent(reg)
    reg.receive(answer(request, 200), now)
    events(reg)
    return request


# -- the first REGISTER ---------------------------------------------------------------------


def test_first_register_carries_binding_and_identity() -> None:
    reg = machine(expires=600)
    reg.start(10.0)
    request = sent(reg)
    assert request.method == "REGISTER"
    assert str(request.uri) == "sip:127.0.0.1:5060"
    assert request.call_id == "reg-1@127.0.0.1"
    assert (request.cseq.sequence, request.cseq.method) == (1, "REGISTER")
    assert request.from_address.parameters.get("tag") == "ft1"
    assert "tag" not in request.to_address.parameters
    assert str(request.to_address.uri) == "sip:acme@127.0.0.1"
    [contact] = request.contact
    assert contact.uri == CONTACT
    assert contact.parameters.get("expires") == "600"
    assert request.headers.get("Expires") == "600"
    assert request.headers.get("Authorization") is None
    assert reg.state is RegistrationState.UNREGISTERED
    with pytest.raises(RuntimeError):
        reg.start(11.0)


def test_200_registers_and_refreshes_half_way_with_same_call_id() -> None:
    reg = machine(expires=600)
    reg.start(0.0)
    first = sent(reg)
    reg.receive(answer(first, 200), 0.5)
    assert events(reg) == [
        Registered(600, 600.5),
        StateChanged(RegistrationState.UNREGISTERED, RegistrationState.REGISTERED,
                     "registered for 600 s"),
    ]  # fmt: skip
    assert reg.next_timer_at() == 300.5
    reg.handle_timer(300.4)
    assert reg.requests_to_send() == []
    reg.handle_timer(300.5)
    refresh = sent(reg)
    assert refresh.call_id == first.call_id
    assert refresh.cseq.sequence == 2
    assert refresh.from_address.parameters.get("tag") == "ft1"
    assert top_branch(refresh) != top_branch(first)
    reg.receive(answer(refresh, 200), 301.0)
    assert events(reg) == [Registered(600, 901.0)]  # no state change: still registered
    assert reg.state is RegistrationState.REGISTERED


def top_branch(request: Request) -> str | None:
    return request.via[0].parameters.get("branch")


def test_registrar_grants_less_and_the_refresh_follows_it() -> None:
    reg = machine(expires=3600)
    reg.start(0.0)
    request = sent(reg)
    response = answer(request, 200, contact=False)
    response.headers.set("Contact", f"<{CONTACT};transport=udp>;expires=120;received=x")
    reg.receive(response, 0.0)
    assert Registered(120, 120.0) in events(reg)
    assert reg.next_timer_at() == 60.0


@pytest.mark.parametrize(
    ("contact", "expires_header", "granted"),
    [
        ("<sip:acme-in@127.0.0.1:5070>;expires=90", None, 90),
        ("<sip:ACME-in@127.0.0.1:5070>;expires=90", "45", 45),  # another user: not ours
        ("<sip:acme-in@127.0.0.1:5999>;expires=90", "45", 45),  # another worker's port
        (None, "45", 45),
        (None, None, 3600),
        ("<sip:acme-in@127.0.0.1:5070>;expires=soon", None, 3600),
    ],
)
def test_granted_expires(contact: str | None, expires_header: str | None, granted: int) -> None:
    reg = machine()
    reg.start(0.0)
    response = answer(sent(reg), 200, contact=False)
    if contact:
        response.headers.set("Contact", contact)
    if expires_header:
        response.headers.set("Expires", expires_header)
    assert granted_expires(response, CONTACT, 3600) == granted


def test_200_granting_nothing_is_a_failure() -> None:
    reg = machine()
    reg.start(0.0)
    request = sent(reg)
    response = answer(request, 200, contact=False)
    response.headers.set("Contact", f"<{CONTACT}>;expires=0")
    reg.receive(response, 0.0)
    assert reg.state is RegistrationState.FAILED
    assert isinstance(events(reg)[0], Failed)


def test_responses_not_to_the_pending_register_are_ignored() -> None:
    reg = machine()
    reg.start(0.0)
    request = sent(reg)
    reg.receive(answer(request, 100), 0.0)
    other = answer(request, 200)
    other.headers.set("Call-ID", "someone-else")
    reg.receive(other, 0.0)
    stale = answer(request, 200)
    stale.headers.set("CSeq", "7 REGISTER")
    reg.receive(stale, 0.0)
    assert reg.state is RegistrationState.UNREGISTERED
    assert events(reg) == []
    reg.receive(answer(request, 200), 0.0)
    assert state(reg) is RegistrationState.REGISTERED
    reg.receive(answer(request, 200), 0.0)  # a retransmitted 200: nothing pending
    assert [e for e in events(reg) if isinstance(e, Registered)] == [Registered(3600, 3600.0)]


# -- digest ---------------------------------------------------------------------------------


@pytest.mark.parametrize("proxy", [False, True])
def test_challenge_is_answered_with_next_cseq_and_verifies(proxy: bool) -> None:
    registrar = server(proxy)
    reg = machine()
    reg.start(0.0)
    first = sent(reg)
    reg.receive(challenge(registrar, first, 0.0), 0.1)
    retry = sent(reg)
    assert retry.call_id == first.call_id
    assert retry.cseq.sequence == 2
    assert top_branch(retry) != top_branch(first)
    assert registrar.verify(retry, now=0.2) == "acme"
    reg.receive(answer(retry, 200), 0.2)
    assert reg.state is RegistrationState.REGISTERED


def test_refresh_reuses_the_nonce_with_the_next_nonce_count() -> None:
    registrar = server()
    reg = machine(expires=60)
    reg.start(0.0)
    reg.receive(challenge(registrar, sent(reg), 0.0), 0.0)
    retry = sent(reg)
    reg.receive(answer(retry, 200), 0.0)
    reg.handle_timer(30.0)
    refresh = sent(reg)
    assert refresh.cseq.sequence == 3
    [first_creds] = parse_credentials(retry, "Authorization")
    [reused] = parse_credentials(refresh, "Authorization")
    assert first_creds.parameters is not None
    assert reused.parameters is not None
    assert reused.parameters["nonce"] == first_creds.parameters["nonce"]
    assert (first_creds.parameters["nc"], reused.parameters["nc"]) == ("00000001", "00000002")
    assert registrar.verify(refresh, now=30.0) == "acme"  # one round trip, not two


def test_a_refused_reused_nonce_is_answered_afresh_not_taken_as_a_wrong_password() -> None:
    registrar = server()
    reg = machine(expires=60)
    registered_with_auth(reg, registrar)
    reg.handle_timer(30.0)
    refresh = sent(reg)
    # The registrar restarted: it knows no nonce of ours and challenges without stale.
    restarted = DigestServer("registrar.test", {"acme": PASSWORD})
    reg.receive(challenge(restarted, refresh, 30.0), 30.0)
    retry = sent(reg)
    assert retry.cseq.sequence == refresh.cseq.sequence + 1
    assert restarted.verify(retry, now=30.0) == "acme"
    reg.receive(answer(retry, 200), 30.1)
    assert reg.state is RegistrationState.REGISTERED


def registered_with_auth(reg: Registration, registrar: DigestServer, now: float = 0.0) -> None:
    reg.start(now)
    reg.receive(challenge(registrar, sent(reg), now), now)
    reg.receive(answer(sent(reg), 200), now)
    events(reg)


def test_stale_nonce_is_answered_again() -> None:
    registrar = server()
    reg = machine()
    reg.start(0.0)
    reg.receive(challenge(registrar, sent(reg), 0.0), 0.0)
    retry = sent(reg)
    reg.receive(challenge(registrar, retry, 0.0, stale=True), 0.0)
    again = sent(reg)
    assert again.cseq.sequence == 3
    reg.receive(answer(again, 200), 0.0)
    assert reg.state is RegistrationState.REGISTERED


def test_wrong_password_fails_and_backs_off_without_looping() -> None:
    registrar = DigestServer("registrar.test", {"acme": "not-" + PASSWORD})
    reg = machine()
    reg.start(0.0)
    reg.receive(challenge(registrar, sent(reg), 0.0), 0.0)
    retry = sent(reg)
    reg.receive(challenge(registrar, retry, 0.0), 0.0)  # rejected, not stale
    assert reg.requests_to_send() == []
    happened = events(reg)
    assert isinstance(happened[0], Failed)
    assert "rejected" in happened[0].reason
    assert reg.state is RegistrationState.FAILED
    assert reg.next_timer_at() == 1.0
    reg.handle_timer(1.0)
    fresh = sent(reg)  # the retry starts over, without the refused nonce
    assert fresh.headers.get("Authorization") is None


def test_challenge_rounds_are_bounded() -> None:
    registrar = server()
    reg = machine()
    reg.start(0.0)
    for _ in range(MAX_AUTH_ROUNDS):
        reg.receive(challenge(registrar, sent(reg), 0.0, stale=True), 0.0)
    reg.receive(challenge(registrar, sent(reg), 0.0, stale=True), 0.0)
    assert reg.requests_to_send() == []
    assert reg.state is RegistrationState.FAILED


def test_challenge_without_credentials_fails() -> None:
    reg = machine(credentials=False)
    reg.start(0.0)
    reg.receive(challenge(server(), sent(reg), 0.0), 0.0)
    [failed, changed] = events(reg)
    assert isinstance(failed, Failed)
    assert "no credentials" in failed.reason
    assert isinstance(changed, StateChanged)
    assert changed.new is RegistrationState.FAILED


def test_unanswerable_challenge_fails() -> None:
    reg = machine()
    reg.start(0.0)
    request = sent(reg)
    reg.receive(answer(request, 401, ("WWW-Authenticate", 'Basic realm="x"')), 0.0)
    assert reg.state is RegistrationState.FAILED


# -- 423 Interval Too Brief -----------------------------------------------------------------


def test_423_retries_at_once_with_min_expires_and_keeps_it() -> None:
    reg = machine(expires=4)
    reg.start(0.0)
    first = sent(reg)
    reg.receive(answer(first, 423, ("Min-Expires", "60")), 0.0)
    retry = sent(reg)
    assert retry.cseq.sequence == 2
    assert retry.call_id == first.call_id
    assert retry.headers.get("Expires") == "60"
    assert retry.contact[0].parameters.get("expires") == "60"
    reg.receive(answer(retry, 200), 0.0)
    assert reg.state is RegistrationState.REGISTERED
    reg.handle_timer(30.0)
    assert sent(reg).headers.get("Expires") == "60"


@pytest.mark.parametrize("min_expires", [None, "4", "2", "soon"])
def test_423_without_a_higher_min_expires_fails(min_expires: str | None) -> None:
    reg = machine(expires=4)
    reg.start(0.0)
    headers = [("Min-Expires", min_expires)] if min_expires else []
    reg.receive(answer(sent(reg), 423, *headers), 0.0)
    assert reg.requests_to_send() == []
    assert reg.state is RegistrationState.FAILED


def test_423_rounds_are_bounded() -> None:
    reg = machine(expires=1)
    reg.start(0.0)
    for minimum in (10, 20, 30):
        reg.receive(answer(sent(reg), 423, ("Min-Expires", str(minimum))), 0.0)
    reg.receive(answer(sent(reg), 423, ("Min-Expires", "40")), 0.0)
    assert reg.requests_to_send() == []
    assert reg.state is RegistrationState.FAILED


# -- failures and back-off ------------------------------------------------------------------


def test_failures_back_off_doubling_to_the_cap_and_recover() -> None:
    reg = machine(backoff=Backoff(initial=1.0, maximum=5.0))
    now = 0.0
    reg.start(now)
    delays = []
    for _ in range(5):
        reg.receive(answer(sent(reg), 503), now)
        at = reg.next_timer_at()
        assert at is not None
        delays.append(at - now)
        reg.handle_timer(at - 0.01)
        assert reg.requests_to_send() == []
        now = at
        reg.handle_timer(now)
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert reg.failures == 5
    happened = events(reg)
    assert [e.new for e in happened if isinstance(e, StateChanged)] == [RegistrationState.FAILED]
    assert [e.retry_in for e in happened if isinstance(e, Failed)] == delays
    reg.receive(answer(sent(reg), 200), now)
    assert reg.state is RegistrationState.REGISTERED
    assert reg.failures == 0
    assert StateChanged(RegistrationState.FAILED, RegistrationState.REGISTERED,
                        "registered for 3600 s") in events(reg)  # fmt: skip


def test_no_answer_is_a_failure_too() -> None:
    reg = machine()
    reg.start(0.0)
    request = sent(reg)
    reg.no_response(request, 32.0, "no answer (timer F)")
    assert reg.state is RegistrationState.FAILED
    assert reg.next_timer_at() == 33.0
    reg.no_response(request, 32.0, "again")  # nothing pending any more: ignored
    assert reg.failures == 1


def test_retry_after_stretches_the_back_off_within_the_cap() -> None:
    reg = machine(backoff=Backoff(initial=1.0, maximum=60.0))
    reg.start(0.0)
    reg.receive(answer(sent(reg), 503, ("Retry-After", "20;duration=5")), 0.0)
    assert reg.next_timer_at() == 20.0
    reg.handle_timer(20.0)
    reg.receive(answer(sent(reg), 503, ("Retry-After", "3600")), 20.0)
    assert reg.next_timer_at() == 80.0


def test_backoff_jitter_and_bounds() -> None:
    backoff = Backoff(initial=1.0, maximum=300.0, jitter=0.5)
    assert backoff.delay(1, 0.0) == 1.0
    assert backoff.delay(1, 0.999) == pytest.approx(0.5005)
    assert backoff.delay(10, 0.0) == 300.0
    assert backoff.delay(10_000, 0.5) == 225.0
    for bad in (dict(initial=0), dict(initial=5, maximum=1), dict(jitter=1.0)):
        with pytest.raises(ValueError, match="invalid back-off"):
            Backoff(**bad)


def test_binding_expiring_before_the_refresh_is_answered_counts_as_failed() -> None:
    reg = machine(expires=4)
    registered(reg)
    reg.handle_timer(2.0)
    refresh = sent(reg)  # never answered within the binding (timer F is far longer)
    reg.handle_timer(4.0)
    assert reg.state is RegistrationState.FAILED
    assert events(reg)[-1] == StateChanged(
        RegistrationState.REGISTERED, RegistrationState.FAILED, "binding expired before a refresh"
    )
    reg.receive(answer(refresh, 200), 4.5)  # late, but a binding all the same
    assert state(reg) is RegistrationState.REGISTERED


# -- unregister -----------------------------------------------------------------------------


def test_stop_unregisters_with_expires_zero_on_the_same_call_id() -> None:
    reg = machine()
    first = registered(reg)
    reg.stop(100.0, timeout=2.0)
    unregister = sent(reg)
    assert unregister.call_id == first.call_id
    assert unregister.cseq.sequence == first.cseq.sequence + 1
    assert unregister.headers.get("Expires") == "0"
    assert unregister.contact[0].parameters.get("expires") == "0"
    assert reg.next_timer_at() == 102.0  # no refresh any more, only the bound
    reg.receive(answer(unregister, 200, contact=False), 100.1)
    assert events(reg) == [
        StateChanged(RegistrationState.REGISTERED, RegistrationState.UNREGISTERED, "unregistered"),
        Stopped(True, "200 OK"),
    ]
    assert reg.stopped
    assert reg.next_timer_at() is None
    reg.stop(101.0, timeout=2.0)
    assert reg.requests_to_send() == []
    assert events(reg) == []


def test_stop_answers_a_challenge_with_the_cached_nonce_or_afresh() -> None:
    registrar = server()
    reg = machine()
    registered_with_auth(reg, registrar)
    reg.stop(10.0, timeout=2.0)
    unregister = sent(reg)
    assert registrar.verify(unregister, now=10.0) == "acme"  # the nonce is reused
    reg.receive(challenge(registrar, unregister, 10.0, stale=True), 10.0)
    again = sent(reg)
    reg.receive(answer(again, 200, contact=False), 10.1)
    assert reg.stopped
    assert events(reg)[-1] == Stopped(True, "200 OK")


def test_stop_is_bounded_when_the_registrar_is_silent() -> None:
    reg = machine()
    registered(reg)
    reg.stop(50.0, timeout=2.0)
    sent(reg)
    reg.handle_timer(51.9)
    assert not reg.stopped
    reg.handle_timer(52.0)
    assert stopped(reg)
    assert events(reg)[-1] == Stopped(False, "no answer to the unregister in time")
    assert reg.state is RegistrationState.UNREGISTERED


@pytest.mark.parametrize("code", [403, 500])
def test_stop_refused_still_stops(code: int) -> None:
    reg = machine(credentials=False)
    registered(reg)
    reg.stop(5.0, timeout=2.0)
    reg.receive(answer(sent(reg), code), 5.0)
    assert reg.stopped
    assert isinstance(events(reg)[-1], Stopped)


def test_stop_without_a_binding_sends_nothing() -> None:
    never = machine()
    never.stop(0.0, timeout=2.0)
    assert never.requests_to_send() == []
    assert events(never) == [Stopped(False, "was not registered")]
    failed = machine()
    failed.start(0.0)
    failed.receive(answer(sent(failed), 403), 0.0)
    failed.stop(0.5, timeout=2.0)
    assert failed.requests_to_send() == []
    assert failed.stopped


def test_stop_while_a_register_is_in_flight_unregisters_with_a_higher_cseq() -> None:
    reg = machine()
    reg.start(0.0)
    first = sent(reg)
    reg.stop(0.1, timeout=2.0)
    unregister = sent(reg)
    assert unregister.cseq.sequence == 2
    assert unregister.headers.get("Expires") == "0"
    reg.receive(answer(first, 200), 0.2)  # the answer to the old one no longer counts
    assert reg.state is RegistrationState.UNREGISTERED
    assert not reg.stopped
    reg.no_response(unregister, 2.0, "no answer (timer F)")
    assert stopped(reg)
    assert events(reg)[-1] == Stopped(False, "no answer (timer F)")


def test_settings_need_a_positive_expiry() -> None:
    with pytest.raises(ValueError, match="expires must be at least 1 second"):
        machine(expires=0)


# -- contact bindings (inbound admission) ---------------------------------------------------


def test_contact_bindings_match_user_source_and_lifetime() -> None:
    bindings = ContactBindings()
    bindings.bind("acme-in", "carrier-a", {"192.0.2.10"}, until=100.0)
    assert bindings.trunk_for("acme-in", "192.0.2.10", 99.0) == "carrier-a"
    assert bindings.trunk_for("acme-in", "192.0.2.11", 99.0) is None  # not the registrar
    assert bindings.trunk_for("other", "192.0.2.10", 99.0) is None
    assert bindings.trunk_for(None, "192.0.2.10", 99.0) is None
    assert bindings.trunk_for("acme-in", "192.0.2.10", 100.0) is None  # expired
    bindings.bind("acme-in", "carrier-a", {"192.0.2.10"}, until=200.0)
    assert bindings.trunk_for("acme-in", "192.0.2.10", 150.0) == "carrier-a"
    bindings.unbind("acme-in")
    bindings.unbind("acme-in")
    assert bindings.trunk_for("acme-in", "192.0.2.10", 150.0) is None


def test_stop_after_a_failed_refresh_still_removes_the_live_binding() -> None:
    reg = machine(expires=600)
    registered(reg)
    reg.handle_timer(300.0)
    reg.receive(answer(sent(reg), 503), 300.0)  # the registrar still holds the old binding
    assert reg.state is RegistrationState.FAILED
    reg.stop(310.0, timeout=2.0)
    assert sent(reg).headers.get("Expires") == "0"
