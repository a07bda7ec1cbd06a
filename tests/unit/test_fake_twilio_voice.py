"""The Twilio Voice fake against the real twilio SDK and a local webhook app.

These pin the fake to Twilio's wire format (resources, error bodies, signed callbacks,
TwiML execution) so tests of the production trunk built on it can trust what it says.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import pytest
from starlette.responses import Response
from twilio.base.exceptions import TwilioRestException  # type: ignore[import-untyped]
from twilio.http.http_client import TwilioHttpClient  # type: ignore[import-untyped]
from twilio.request_validator import RequestValidator  # type: ignore[import-untyped]
from twilio.rest import Client  # type: ignore[import-untyped]

from tests.fakes import FakeService, RecordedRequest, free_port
from tests.fakes.twilio_server import FakeCall, FakeTwilio, TwilioAccount
from tests.waiting import wait_until

FROM = "+14155550100"
TO = "+14155550123"
ALL_EVENTS = ["initiated", "ringing", "answered", "completed"]
CALL_PARAMS = {
    "Called",
    "ToState",
    "CallerCountry",
    "Direction",
    "CallerState",
    "ToZip",
    "CallSid",
    "To",
    "CallerZip",
    "ToCountry",
    "CalledZip",
    "ApiVersion",
    "CalledCity",
    "CallStatus",
    "From",
    "AccountSid",
    "CalledCountry",
    "CallerCity",
    "ToCity",
    "FromCountry",
    "Caller",
    "FromCity",
    "CalledState",
    "FromZip",
    "FromState",
}
PROGRESS_PARAMS = CALL_PARAMS | {"Timestamp", "CallbackSource", "SequenceNumber"}
FINAL_PARAMS = PROGRESS_PARAMS | {"SipResponseCode", "Duration", "CallDuration"}


class ToFake(TwilioHttpClient):  # type: ignore[misc]
    """Points the SDK at the fake (kept here so these tests do not depend on product code)."""

    def __init__(self, base: str) -> None:
        super().__init__(timeout=5)
        self._netloc = urlsplit(base).netloc

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        target = urlsplit(url)._replace(scheme="http", netloc=self._netloc)
        return super().request(method, urlunsplit(target), *args, **kwargs)


class App(FakeService):
    """Our side of the webhooks: TwiML per path (`twiml`), 204 for anything else."""

    def __init__(self) -> None:
        super().__init__()
        self.twiml: dict[str, str] = {}
        self.status_codes: dict[str, int] = {}

    def script_key(self, request: RecordedRequest) -> str:
        return request.path

    async def handle(self, request: RecordedRequest) -> Response:
        status = self.status_codes.get(request.path)
        if status is not None:
            return Response("boom", status_code=status)
        if request.path in self.twiml:
            return Response(self.twiml[request.path], media_type="application/xml")
        return Response(status_code=204)

    def at(self, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == path]


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilio]:
    async with FakeTwilio() as fake:
        yield fake


@pytest.fixture
async def app() -> AsyncIterator[App]:
    async with App() as server:
        yield server


@pytest.fixture
def account(twilio: FakeTwilio) -> TwilioAccount:
    return twilio.add_account(numbers=(FROM,))


@pytest.fixture
def client(twilio: FakeTwilio, account: TwilioAccount) -> Any:
    return Client(account.sid, account.auth_token, http_client=ToFake(twilio.url))


async def sdk(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The SDK blocks; the fake and the app share this event loop."""
    return await asyncio.to_thread(call, *args, **kwargs)


async def dial(client: Any, app: App, **options: Any) -> Any:
    """calls.create the way the production trunk does."""
    kwargs: dict[str, Any] = {
        "to": TO,
        "from_": FROM,
        "status_callback": f"{app.url}/status",
        "status_callback_event": ALL_EVENTS,
        "status_callback_method": "POST",
        "timeout": 20,
    }
    kwargs.update(options)
    if "twiml" not in kwargs and "url" not in kwargs:
        kwargs["twiml"] = "<Response><Say>Checkout API is down</Say></Response>"
    return await sdk(client.calls.create, **kwargs)


def assert_signed(account: TwilioAccount, app: App, request: RecordedRequest) -> None:
    """With the SDK's own validator, as our webhook server checks it."""
    url = f"{app.url}{request.path}"
    if request.query:
        url += "?" + urlencode(request.query)
    validator = RequestValidator(account.auth_token)
    params = dict(request.form) if request.method == "POST" else {}
    assert validator.validate(url, params, request.headers["x-twilio-signature"])


async def wait_status(call: FakeCall, status: str, timeout: float = 2.0) -> None:
    await wait_until(lambda: call.status == status, timeout, status, interval=0.005)


async def test_create_answers_like_twilio_and_sends_signed_progress_callbacks(
    twilio: FakeTwilio, app: App, account: TwilioAccount, client: Any
) -> None:
    created = await dial(client, app)

    assert created.sid.startswith("CA")
    assert len(created.sid) == 34
    assert (created.status, created.direction, created.to, created._from) == (
        "queued",
        "outbound-api",
        TO,
        FROM,
    )
    assert created.to_formatted == "(415) 555-0123"
    assert created.start_time is None
    assert created.duration is None
    assert created.price is None
    call = await twilio.call_finished(created.sid)
    [request] = twilio.requests
    assert request.path == f"/2010-04-01/Accounts/{account.sid}/Calls.json"
    assert call.form_lists["StatusCallbackEvent"] == ALL_EVENTS
    assert call.form["Timeout"] == "20"
    raw = twilio.requests[0].body.decode()
    assert raw.count("StatusCallbackEvent=") == 4

    assert call.statuses == ["initiated", "ringing", "in-progress", "completed"]
    received = app.at("/status")
    assert [r.form["CallStatus"] for r in received] == call.statuses
    assert [r.form["SequenceNumber"] for r in received] == ["0", "1", "2", "3"]
    for r in received:
        assert_signed(account, app, r)
        assert r.headers["content-type"].startswith("application/x-www-form-urlencoded")
        assert r.form["CallSid"] == created.sid
        assert r.form["AccountSid"] == account.sid
        assert r.form["Direction"] == "outbound-api"
        assert r.form["CallbackSource"] == "call-progress-events"
        assert r.form["ToCountry"] == "US"
    assert [set(r.form) for r in received[:3]] == [PROGRESS_PARAMS] * 3
    final = received[-1].form
    assert set(final) == FINAL_PARAMS
    assert final["SipResponseCode"] == "200"
    assert final["CallDuration"] == final["Duration"] == "1"
    assert [cb.status_code for cb in call.callbacks] == [204, 204, 204, 204]
    assert call.verbs == [("say", "Checkout API is down"), ("end",)]
    assert call.ended_by == "twiml"

    fetched = await sdk(client.calls(created.sid).fetch)
    assert (fetched.status, fetched.duration) == ("completed", "1")
    assert fetched.start_time is not None
    assert fetched.end_time is not None


async def test_only_subscribed_events_but_always_the_final_one(
    twilio: FakeTwilio, app: App, client: Any
) -> None:
    created = await dial(client, app, status_callback_event=["answered"])

    call = await twilio.call_finished(created.sid)

    assert call.statuses == ["in-progress", "completed"]
    assert [r.form["SequenceNumber"] for r in app.at("/status")] == ["0", "1"]


async def test_gather_posts_the_scripted_digit_and_runs_the_answer(
    twilio: FakeTwilio, app: App, account: TwilioAccount, client: Any
) -> None:
    app.twiml["/voice"] = (
        '<Response><Gather numDigits="1" action="/ack" timeout="5">'
        "<Say>Press 1 to acknowledge</Say></Gather><Say>No input</Say></Response>"
    )
    app.twiml["/ack"] = "<Response><Say>Acknowledged</Say><Hangup/></Response>"
    twilio.script_call(TO, digits="1")

    created = await dial(client, app, url=f"{app.url}/voice")
    call = await twilio.call_finished(created.sid)

    assert call.verbs == [
        ("say", "Press 1 to acknowledge"),
        ("gather", "1"),
        ("say", "Acknowledged"),
        ("hangup",),
    ]
    [voice] = app.at("/voice")
    assert set(voice.form) == CALL_PARAMS
    assert voice.form["CallStatus"] == "in-progress"
    [ack] = app.at("/ack")
    assert (ack.form["Digits"], ack.form["FinishedOnKey"], ack.form["msg"]) == (
        "1",
        "",
        "Gather End",
    )
    assert ack.form["CallSid"] == created.sid
    assert_signed(account, app, voice)
    assert_signed(account, app, ack)
    assert [cb.kind for cb in call.callbacks] == [
        "status",
        "status",
        "status",
        "voice",
        "gather",
        "status",
    ]


async def test_each_gather_takes_the_next_entry_and_finish_key_is_stripped(
    twilio: FakeTwilio, app: App, client: Any
) -> None:
    gather = '<Response><Gather action="/pin" finishOnKey="#"><Say>PIN</Say></Gather></Response>'
    app.twiml["/voice"] = gather
    app.twiml["/pin"] = gather
    twilio.script_call(TO, digits=["1234#", "9"])

    created = await dial(client, app, url=f"{app.url}/voice")
    call = await twilio.call_finished(created.sid)

    assert [v for v in call.verbs if v[0] == "gather"] == [
        ("gather", "1234"),
        ("gather", "9"),
        ("gather", ""),
    ]
    assert [(r.form["Digits"], r.form["FinishedOnKey"]) for r in app.at("/pin")] == [
        ("1234", "#"),
        ("9", ""),
    ]
    assert call.verbs[-1] == ("end",)


@pytest.mark.parametrize("action_on_empty", [False, True])
async def test_gather_without_input(
    twilio: FakeTwilio, app: App, client: Any, action_on_empty: bool
) -> None:
    flag = ' actionOnEmptyResult="true"' if action_on_empty else ""
    app.twiml["/voice"] = (
        f'<Response><Gather action="/ack"{flag}><Say>Press 1</Say></Gather>'
        "<Say>Goodbye</Say></Response>"
    )
    app.twiml["/ack"] = "<Response><Say>Empty</Say></Response>"

    created = await dial(client, app, url=f"{app.url}/voice")
    call = await twilio.call_finished(created.sid)

    if action_on_empty:
        assert call.verbs == [("say", "Press 1"), ("gather", ""), ("say", "Empty"), ("end",)]
        assert app.at("/ack")[0].form["Digits"] == ""
    else:
        assert call.verbs == [("say", "Press 1"), ("gather", ""), ("say", "Goodbye"), ("end",)]
        assert app.at("/ack") == []


@pytest.mark.parametrize(
    ("outcome", "sip_code", "statuses", "expected_sip"),
    [
        ("busy", None, ["initiated", "ringing", "busy"], "486"),
        ("no-answer", None, ["initiated", "ringing", "no-answer"], "487"),
        ("failed", None, ["initiated", "failed"], "503"),
        ("failed", 404, ["initiated", "failed"], "404"),
    ],
)
async def test_unanswered_calls_end_with_sip_response_code(
    twilio: FakeTwilio,
    app: App,
    account: TwilioAccount,
    client: Any,
    outcome: Any,
    sip_code: int | None,
    statuses: list[str],
    expected_sip: str,
) -> None:
    twilio.script_call(TO, outcome=outcome, sip_code=sip_code, ring=0.01)

    created = await dial(client, app)
    call = await twilio.call_finished(created.sid)

    assert call.statuses == statuses
    final = app.at("/status")[-1]
    assert_signed(account, app, final)
    assert (final.form["SipResponseCode"], final.form["CallDuration"]) == (expected_sip, "0")
    assert call.verbs == []
    assert (call.status, call.resource["duration"], call.ended_by) == (outcome, "0", outcome)


async def test_ringing_longer_than_timeout_is_no_answer_at_timeout(
    twilio: FakeTwilio, app: App, client: Any
) -> None:
    twilio.script_call(TO, ring=30)

    created = await dial(client, app, timeout=1)
    call = await twilio.call_finished(created.sid, timeout=3)

    assert call.statuses[-1] == "no-answer"


async def test_cancel_while_ringing(twilio: FakeTwilio, app: App, client: Any) -> None:
    twilio.script_call(TO, ring=10)
    created = await dial(client, app)
    call = twilio.calls[created.sid]
    await wait_status(call, "ringing")

    updated = await sdk(client.calls(created.sid).update, status="canceled")

    assert updated.status == "canceled"
    await twilio.call_finished(created.sid, timeout=2)
    assert call.statuses == ["initiated", "ringing", "canceled"]
    assert app.at("/status")[-1].form["SipResponseCode"] == "487"
    assert call.verbs == []
    assert call.ended_by == "api"


async def test_cancel_has_no_effect_once_answered_but_completed_hangs_up(
    twilio: FakeTwilio, app: App, client: Any
) -> None:
    long_call = "<Response>" + '<Pause length="5"/>' * 40 + "</Response>"
    created = await dial(client, app, twiml=long_call)
    call = twilio.calls[created.sid]
    await wait_status(call, "in-progress")

    ignored = await sdk(client.calls(created.sid).update, status="canceled")
    assert ignored.status == "in-progress"
    updated = await sdk(client.calls(created.sid).update, status="completed")

    assert updated.status == "completed"
    await twilio.call_finished(created.sid, timeout=2)
    assert call.statuses == ["initiated", "ringing", "in-progress", "completed"]
    assert app.at("/status")[-1].form["SipResponseCode"] == "200"
    assert 0 < len(call.verbs) < 40
    assert call.ended_by == "api"


async def test_callee_hangs_up_after_answering(twilio: FakeTwilio, app: App, client: Any) -> None:
    twilio.script_call(TO, hangup_after=0.1)
    long_call = "<Response>" + '<Pause length="5"/>' * 40 + "</Response>"

    created = await dial(client, app, twiml=long_call)
    call = await twilio.call_finished(created.sid)

    assert call.statuses[-1] == "completed"
    assert call.ended_by == "callee"
    assert 0 < len(call.verbs) < 40


async def test_update_with_twiml_redirects_the_live_call(
    twilio: FakeTwilio, app: App, client: Any
) -> None:
    long_call = "<Response>" + '<Pause length="5"/>' * 40 + "</Response>"
    created = await dial(client, app, twiml=long_call)
    call = twilio.calls[created.sid]
    await wait_status(call, "in-progress")

    await sdk(client.calls(created.sid).update, twiml="<Response><Say>Moved</Say></Response>")
    await twilio.call_finished(created.sid)

    assert call.verbs[-2:] == [("say", "Moved"), ("end",)]


async def test_machine_detection_reports_answered_by(
    twilio: FakeTwilio, app: App, client: Any
) -> None:
    twilio.script_call(TO, answered_by="machine_start")

    created = await dial(client, app, machine_detection="Enable")
    call = await twilio.call_finished(created.sid)

    answered = [r.form.get("AnsweredBy") for r in app.at("/status")]
    assert answered == [None, None, "machine_start", "machine_start"]
    assert call.resource["answered_by"] == "machine_start"


async def test_scripts_are_fifo_per_number(twilio: FakeTwilio, app: App, client: Any) -> None:
    twilio.script_call(TO, outcome="busy", ring=0.01)
    twilio.script_call(TO, outcome="failed")

    first = await twilio.call_finished((await dial(client, app)).sid)
    second = await twilio.call_finished((await dial(client, app)).sid)
    third = await twilio.call_finished((await dial(client, app)).sid)

    assert [c.status for c in (first, second, third)] == ["busy", "failed", "completed"]


@pytest.mark.parametrize(
    ("body", "code"),
    [("<Response><Say>x</Say>", 12100), ("not xml", 12100), ("<Say>x</Say>", 12100)],
)
async def test_unparseable_twiml_is_an_application_error(
    twilio: FakeTwilio, app: App, client: Any, body: str, code: int
) -> None:
    app.twiml["/voice"] = body

    created = await dial(client, app, url=f"{app.url}/voice")
    call = await twilio.call_finished(created.sid)

    assert call.verbs[0] == ("error", str(code))
    assert call.ended_by == "application-error"
    assert call.errors[0][0] == code
    assert call.statuses[-1] == "completed"


async def test_http_error_from_the_app_hangs_up_with_11200(
    twilio: FakeTwilio, app: App, client: Any
) -> None:
    app.twiml["/voice"] = '<Response><Gather action="/ack"/></Response>'
    app.status_codes["/ack"] = 500
    twilio.script_call(TO, digits="1")

    created = await dial(client, app, url=f"{app.url}/voice")
    call = await twilio.call_finished(created.sid)

    assert call.verbs[:2] == [("gather", "1"), ("error", "11200")]
    assert call.errors[0][0] == 11200
    assert call.statuses[-1] == "completed"


async def test_unreachable_voice_url_is_11205(twilio: FakeTwilio, app: App, client: Any) -> None:
    created = await dial(client, app, url=f"http://127.0.0.1:{free_port()}/voice")
    call = await twilio.call_finished(created.sid)

    assert call.errors[0][0] == 11205
    assert call.statuses[-1] == "completed"


async def test_redirect_loops_stop_at_the_verb_budget(
    twilio: FakeTwilio, app: App, client: Any
) -> None:
    app.twiml["/loop"] = "<Response><Redirect>/loop</Redirect></Response>"

    created = await dial(client, app, url=f"{app.url}/loop")
    call = await twilio.call_finished(created.sid)

    assert call.verbs[-1] == ("limit",)
    assert call.ended_by == "verb-limit"
    assert len(app.at("/loop")) == 51  # the first fetch plus 50 redirects


async def test_status_callback_answer_is_recorded_and_non_2xx_logged_as_15003(
    twilio: FakeTwilio, app: App, client: Any
) -> None:
    app.status_codes["/status"] = 503

    created = await dial(client, app)
    call = await twilio.call_finished(created.sid)

    assert {cb.status_code for cb in call.callbacks} == {503}
    assert [code for code, _ in call.errors] == [15003] * 4
    assert twilio.callbacks == call.callbacks


async def test_callbacks_never_leave_127_0_0_1(twilio: FakeTwilio, client: Any) -> None:
    created = await sdk(
        client.calls.create,
        to=TO,
        from_=FROM,
        twiml="<Response><Hangup/></Response>",
        status_callback="https://ackline.example/v1/webhooks/twilio/voice-status",
    )
    call = await twilio.call_finished(created.sid)

    [final] = call.callbacks
    assert final.status_code is None
    assert final.error is not None
    assert final.params["CallStatus"] == "completed"
    assert call.verbs == [("hangup",)]


async def test_get_status_callback_is_signed_over_the_query(
    twilio: FakeTwilio, app: App, account: TwilioAccount, client: Any
) -> None:
    created = await dial(client, app, status_callback_method="GET")
    await twilio.call_finished(created.sid)

    received = app.at("/status")
    assert [r.method for r in received] == ["GET"] * 4
    assert received[-1].query["CallStatus"] == "completed"
    for r in received:
        assert_signed(account, app, r)


@pytest.mark.parametrize(
    ("options", "code", "message"),
    [
        ({"to": ""}, 21201, "No 'To' number is specified"),
        ({"to": "555-0123"}, 21211, "The 'To' number 555-0123 is not a valid phone number."),
        ({"from_": ""}, 21213, "No 'From' number is specified"),
        (
            {"from_": "+14155550199"},
            21210,
            "The source phone number provided, +14155550199, is not yet verified for your account.",
        ),
        ({"twiml": None}, 21205, "Url parameter is required."),
    ],
)
async def test_invalid_creates_raise_twilio_errors(
    twilio: FakeTwilio, client: Any, options: dict[str, Any], code: int, message: str
) -> None:
    kwargs: dict[str, Any] = {"to": TO, "from_": FROM, "twiml": "<Response/>", **options}
    if kwargs["twiml"] is None:
        del kwargs["twiml"]

    with pytest.raises(TwilioRestException) as raised:
        await sdk(client.calls.create, **kwargs)

    assert (raised.value.status, raised.value.code) == (400, code)
    assert raised.value.msg == f"Unable to create record: {message}"
    assert twilio.calls == {}


@pytest.mark.parametrize(("code", "status"), [(20429, 429), (13224, 400), (20500, 500)])
async def test_fail_next_applies_to_call_creates(
    twilio: FakeTwilio, account: TwilioAccount, client: Any, code: int, status: int
) -> None:
    twilio.fail_next(code, match=account.sid)

    with pytest.raises(TwilioRestException) as raised:
        await sdk(client.calls.create, to=TO, from_=FROM, twiml="<Response/>")

    assert (raised.value.status, raised.value.code) == (status, code)
    assert twilio.calls == {}
    created = await sdk(client.calls.create, to=TO, from_=FROM, twiml="<Response/>")
    assert created.status == "queued"


async def test_unknown_call_and_wrong_credentials(
    twilio: FakeTwilio, account: TwilioAccount, client: Any
) -> None:
    with pytest.raises(TwilioRestException) as raised:
        await sdk(client.calls("CA" + "0" * 32).fetch)
    assert (raised.value.status, raised.value.code) == (404, 20404)

    intruder = Client(account.sid, "wrong", http_client=ToFake(twilio.url))
    with pytest.raises(TwilioRestException) as raised:
        await sdk(intruder.calls.create, to=TO, from_=FROM, twiml="<Response/>")
    assert (raised.value.status, raised.value.code) == (401, 20003)


async def test_redirect_of_a_finished_call_is_21220(
    twilio: FakeTwilio, app: App, client: Any
) -> None:
    created = await dial(client, app)
    await twilio.call_finished(created.sid)

    with pytest.raises(TwilioRestException) as raised:
        await sdk(client.calls(created.sid).update, twiml="<Response/>")
    assert raised.value.code == 21220
    finished = await sdk(client.calls(created.sid).update, status="completed")
    assert finished.status == "completed"
