"""A local Twilio Programmable Messaging and Voice API for tests, driven by the real SDK.

It checks what api.twilio.com checks for `POST /2010-04-01/Accounts/{Sid}/Messages.json`
(HTTP Basic auth, form fields, E.164 'To', owned 'From', opt-outs) and answers with the same
JSON resources and error bodies `{code, message, more_info, status}`. Failures can be
scripted per account: `fake.fail_next(20429, match=account.sid)`.

Voice: `Calls.json` creates, fetches and updates calls, and each call is simulated in the
background like Twilio's call engine does it: signed status callbacks
(initiated/ringing/answered/completed), TwiML fetched or inline and executed (Say, Play,
Pause, Gather with scripted digits, Redirect, Hangup), Gather actions posted back. The callee
is scripted per number with `fake.script_call(...)`; everything sent is in `fake.callbacks`.
Callbacks only ever go to http://127.0.0.1 (anything else is recorded as not delivered).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import math
import re
import secrets
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, Literal, Self, get_args
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import httpx
from starlette.responses import JSONResponse, Response

from tests.fakes import FakeService, RecordedRequest, Scripted

__all__ = [
    "CallOutcome",
    "CallScript",
    "FakeCall",
    "FakeTwilio",
    "SentCallback",
    "TwilioAccount",
    "inbound_sms_form",
    "twilio_signature",
]

_ACCOUNT_PREFIX = re.compile(r"/2010-04-01/Accounts/(AC[0-9a-f]{32})[/.]")
_MESSAGES_PATH = re.compile(r"/2010-04-01/Accounts/(AC[0-9a-f]{32})/Messages\.json")
_CALLS_PATH = re.compile(r"/2010-04-01/Accounts/(AC[0-9a-f]{32})/Calls\.json")
_CALL_PATH = re.compile(r"/2010-04-01/Accounts/(AC[0-9a-f]{32})/Calls/(CA[0-9a-f]{32})\.json")
_ACCOUNT_PATH = re.compile(r"/2010-04-01/Accounts/(AC[0-9a-f]{32})\.json")
_E164 = re.compile(r"\+[1-9][0-9]{6,14}")
_MAX_BODY = 1600

# Real codes with the status and message Twilio sends for them.
ERRORS: dict[int, tuple[int, str]] = {
    13224: (400, "Invalid phone number"),
    20001: (400, "Invalid parameter"),
    20003: (401, "Authenticate"),
    20404: (404, "The requested resource {path} was not found"),
    20429: (429, "Too Many Requests"),
    20500: (500, "An internal server error has occurred"),
    20503: (503, "Service Unavailable"),
    21201: (400, "No 'To' number is specified"),
    21205: (400, "Url parameter is required."),
    21210: (
        400,
        "The source phone number provided, {from_}, is not yet verified for your account.",
    ),
    21211: (400, "The 'To' number {to} is not a valid phone number."),
    21213: (400, "No 'From' number is specified"),
    21220: (400, "Call is not in-progress. Cannot redirect."),
    21602: (400, "Message body is required."),
    21604: (400, "A 'To' phone number is required."),
    21603: (400, "A 'From' phone number is required."),
    21606: (
        400,
        "The From phone number {from_} is not a valid, SMS-capable inbound phone number "
        "or short code for your account.",
    ),
    21610: (400, "Attempt to send to unsubscribed recipient"),
    21617: (400, "The concatenated message body exceeds the 1600 character limit."),
    21701: (400, "The Messaging Service Sid {service} is invalid."),
}

CallOutcome = Literal["answer", "busy", "no-answer", "failed"]

# Voice simulation bounds: fast enough for unit tests, bounded so TwiML loops stop.
_MAX_VERBS = 50
_MAX_TIMEOUT_S = 600
_INITIATE_DELAY_S = 0.01  # lets the create's 201 reach the client before "initiated"
_SAY_S = 0.01
_MAX_PAUSE_S = 0.05
_APPLICATION_ERROR = "We are sorry, an application error has occurred. Goodbye."
_COUNTRIES = {"+1": "US", "+44": "GB", "+49": "DE", "+33": "FR", "+31": "NL", "+61": "AU"}
# StatusCallbackEvent names for each CallStatus; every final status is the "completed" event.
_EVENT_OF_STATUS = {"initiated": "initiated", "ringing": "ringing", "in-progress": "answered"}


def _sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


def _now() -> str:
    return format_datetime(datetime.now(UTC))


@dataclass(frozen=True)
class TwilioAccount:
    sid: str
    auth_token: str
    numbers: tuple[str, ...]
    messaging_service_sids: tuple[str, ...]


def twilio_signature(url: str, params: Mapping[str, str], auth_token: str) -> str:
    """X-Twilio-Signature as Twilio computes it for webhooks it sends to us: base64
    HMAC-SHA1 of the URL followed by every POST parameter name and value, sorted by name."""
    data = url + "".join(name + params[name] for name in sorted(params))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def inbound_sms_form(account: TwilioAccount, from_: str, body: str) -> dict[str, str]:
    """The form Twilio POSTs to the messaging webhook when a phone texts `account`."""
    sid = _sid("SM")
    return {
        "ToCountry": "US",
        "SmsMessageSid": sid,
        "NumMedia": "0",
        "SmsSid": sid,
        "SmsStatus": "received",
        "Body": body,
        "To": account.numbers[0],
        "NumSegments": "1",
        "MessageSid": sid,
        "AccountSid": account.sid,
        "From": from_,
        "ApiVersion": "2010-04-01",
    }


def _error(code: int, **fields: str) -> JSONResponse:
    status, template = ERRORS[code]
    values = {"to": "", "from_": "", "path": "", "service": "", **fields}
    return JSONResponse(
        {
            "code": code,
            "message": template.format(**values),
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        },
        status_code=status,
    )


@dataclass
class CallScript:
    """How the callee behaves on one call (see `FakeTwilio.script_call`)."""

    outcome: CallOutcome = "answer"
    digits: list[str] = field(default_factory=list)  # one entry per Gather, consumed in order
    ring: float = 0.05
    sip_code: int | None = None
    answered_by: str | None = None
    hangup_after: float | None = None


@dataclass(frozen=True)
class SentCallback:
    """One HTTP request the fake made to the application, and what the app answered.

    kind: "status" (StatusCallback), "voice" (the create's or an update's Url), "gather"
    (a Gather action), "redirect" (a <Redirect>). status_code None: nothing was answered
    (connection failed, timed out, or the URL is not http://127.0.0.1 so it was not sent).
    """

    call_sid: str
    kind: Literal["status", "voice", "gather", "redirect"]
    method: str
    url: str  # exactly as requested and signed (GET: including the query with the params)
    params: Mapping[str, str]
    signature: str
    status_code: int | None
    body: str
    error: str | None = None


@dataclass(eq=False)
class FakeCall:
    """A simulated outbound-api call; `resource` is what GET Calls/{sid}.json returns.

    verbs: executed TwiML in order, tuples of strings: ("say", text), ("play", url),
    ("play_digits", digits), ("pause", seconds), ("gather", digits or ""), ("redirect", url),
    ("hangup",) for <Hangup/>, ("end",) when the document ran out, ("unsupported", tag),
    ("error", code) on an application error, ("limit",) at the verb budget.
    errors: Twilio debugger entries (code, message): 11200/11205/12100/11100 application
    errors that hung the call up, 15003 status callbacks the app did not answer with 2xx.
    ended_by: "twiml", "callee" (hangup_after), "api" (update), "application-error",
    "verb-limit", "busy", "no-answer", "failed", "shutdown" (fake stopped mid-call).
    """

    sid: str
    account: TwilioAccount
    form: Mapping[str, str]  # the create request's form (last value per name)
    form_lists: Mapping[str, list[str]]  # the same with every value per name
    script: CallScript
    resource: dict[str, Any]
    timeout: int
    status_events: frozenset[str]
    verbs: list[tuple[str, ...]] = field(default_factory=list)
    callbacks: list[SentCallback] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)
    ended_by: str | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _stop: str | None = None  # "api" or "callee" once a hangup was requested
    _redirect: tuple[str, str, str] | None = None  # ("twiml", xml, "") or ("url", url, method)
    _answered_at: float | None = None
    _ended_at: float | None = None
    _sequence: int = 0
    _verb_count: int = 0
    _hangup_timer: asyncio.TimerHandle | None = None

    @property
    def status(self) -> str:
        """The resource status: queued, ringing, in-progress, then the final one."""
        return str(self.resource["status"])

    @property
    def statuses(self) -> list[str]:
        """CallStatus of every status callback sent, in order."""
        return [cb.params["CallStatus"] for cb in self.callbacks if cb.kind == "status"]

    @property
    def machine_detection(self) -> bool:
        return bool(self.form.get("MachineDetection"))

    def _stopped(self) -> bool:
        """A method, not an attribute check, so type narrowing does not survive awaits."""
        return self._stop is not None

    def _request_stop(self, reason: str) -> None:
        if self._stop is None:
            self._stop = reason
            self._ended_at = asyncio.get_running_loop().time()
            self._wake.set()


class _AppError(Exception):
    """The application's answer cannot be executed: Twilio apologises and hangs up."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _VerbLimit(Exception):
    pass


@dataclass(frozen=True)
class _Doc:
    root: ET.Element
    url: str | None  # where it was fetched from (relative URLs resolve against it)


def _form_lists(request: RecordedRequest) -> dict[str, list[str]]:
    """Every value of repeated form names (RecordedRequest.form keeps the last one), as the
    SDK sends lists like StatusCallbackEvent as repeated names."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return {key: [value] for key, value in request.form.items()}
    return parse_qs(request.body.decode(), keep_blank_values=True)


def _country(number: str) -> str:
    for prefix in sorted(_COUNTRIES, key=len, reverse=True):
        if number.startswith(prefix):
            return _COUNTRIES[prefix]
    return ""


def _formatted(number: str) -> str:
    """Twilio's national format for NANP numbers, E.164 otherwise."""
    if re.fullmatch(r"\+1[0-9]{10}", number):
        return f"({number[2:5]}) {number[5:8]}-{number[8:]}"
    return number


def _parse_twiml(text: str) -> ET.Element:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise _AppError(12100, f"Document parse failure: {exc}") from exc
    if root.tag != "Response":
        raise _AppError(12100, f"Document parse failure: root element <{root.tag}>")
    return root


def _call_resource(account: TwilioAccount, sid: str, to: str, from_: str) -> dict[str, Any]:
    now = _now()
    uri = f"/2010-04-01/Accounts/{account.sid}/Calls/{sid}.json"
    base = uri.removesuffix(".json")
    return {
        "account_sid": account.sid,
        "annotation": None,
        "answered_by": None,
        "api_version": "2010-04-01",
        "caller_name": None,
        "date_created": now,
        "date_updated": now,
        "direction": "outbound-api",
        "duration": None,
        "end_time": None,
        "forwarded_from": None,
        "from": from_,
        "from_formatted": _formatted(from_),
        "group_sid": None,
        "parent_call_sid": None,
        "phone_number_sid": "PN" + hashlib.sha256(from_.encode()).hexdigest()[:32],
        "price": None,
        "price_unit": "USD",
        "queue_time": "0",
        "sid": sid,
        "start_time": None,
        "status": "queued",
        "subresource_uris": {
            "feedback": f"{base}/Feedback.json",
            "user_defined_messages": f"{base}/UserDefinedMessages.json",
            "notifications": f"{base}/Notifications.json",
            "recordings": f"{base}/Recordings.json",
            "streams": f"{base}/Streams.json",
            "payments": f"{base}/Payments.json",
            "user_defined_message_subscriptions": f"{base}/UserDefinedMessageSubscriptions.json",
            "siprec": f"{base}/Siprec.json",
            "events": f"{base}/Events.json",
            "feedback_summaries": (
                f"/2010-04-01/Accounts/{account.sid}/Calls/FeedbackSummary.json"
            ),
        },
        "to": to,
        "to_formatted": _formatted(to),
        "trunk_sid": None,
        "uri": uri,
    }


class FakeTwilio(FakeService):
    """Scripting keys (`match=`) are account SIDs."""

    def __init__(self) -> None:
        super().__init__()
        self.accounts: dict[str, TwilioAccount] = {}
        self.messages: list[dict[str, Any]] = []  # every message resource created
        self.unsubscribed: set[str] = set()  # numbers that texted STOP
        self.account_status: dict[str, str] = {}  # sid -> "suspended" | "closed" (else active)
        self.calls: dict[str, FakeCall] = {}  # every call created, in creation order
        self.callbacks: list[SentCallback] = []  # every request made to the app, all calls
        self.callback_timeout_s = 5.0
        self._failures: Scripted[int] = Scripted()
        self._call_scripts: dict[str, deque[CallScript]] = {}
        self._call_tasks: set[asyncio.Task[None]] = set()
        self._http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        # trust_env off: a proxy from the environment must never see test callbacks.
        self._http = httpx.AsyncClient(trust_env=False, follow_redirects=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in list(self._call_tasks):
            task.cancel()
        await asyncio.gather(*self._call_tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()
        await super().__aexit__(*exc)

    def add_account(
        self, numbers: tuple[str, ...] = (), messaging_service_sids: tuple[str, ...] = ()
    ) -> TwilioAccount:
        account = TwilioAccount(_sid("AC"), secrets.token_hex(16), numbers, messaging_service_sids)
        self.accounts[account.sid] = account
        return account

    def fail_next(self, code: int, *, count: int = 1, match: str | None = None) -> None:
        """Answer the next `count` API requests (for account `match`) with Twilio error
        `code`: message creates, call creates, call fetches and call updates alike."""
        if code not in ERRORS:
            raise ValueError(f"no canned body for Twilio error {code}; add it to ERRORS")
        self._failures.push(code, count=count, match=match)

    def script_call(
        self,
        to: str,
        *,
        outcome: CallOutcome = "answer",
        digits: str | Sequence[str] = "",
        ring: float = 0.05,
        sip_code: int | None = None,
        answered_by: str | None = None,
        hangup_after: float | None = None,
    ) -> None:
        """Queue how the next call to `to` goes (FIFO per number; unscripted calls answer
        after 0.05 s and press nothing).

        digits: one Gather entry per item; a str gives one character per Gather ("12" →
        "1" then "2"), a sequence gives whole entries (["1234#", "9"]). An entry ending in
        the Gather's finishOnKey is submitted without it, with FinishedOnKey set.
        ring: seconds of ringing before the outcome; an "answer" that rings as long as the
        create's Timeout becomes "no-answer" at Timeout, like Twilio.
        sip_code: SipResponseCode of a "failed" call (default 503).
        answered_by: AnsweredBy when the create asked for MachineDetection (default "human").
        hangup_after: the callee hangs up this many seconds after answering.
        """
        if outcome not in get_args(CallOutcome):
            raise ValueError(f"unknown outcome {outcome!r}")
        entries = list(digits) if isinstance(digits, str) else [str(d) for d in digits]
        script = CallScript(outcome, entries, ring, sip_code, answered_by, hangup_after)
        self._call_scripts.setdefault(to, deque()).append(script)

    async def call_finished(self, sid: str, timeout: float = 5.0) -> FakeCall:
        """Wait until call `sid` is over and its final status callback was answered."""
        call = self.calls[sid]
        await asyncio.wait_for(call.finished.wait(), timeout)
        return call

    def script_key(self, request: RecordedRequest) -> str:
        found = _ACCOUNT_PREFIX.match(request.path)
        return found.group(1) if found else ""

    def _authenticated(self, request: RecordedRequest) -> TwilioAccount | None:
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        account = self.accounts.get(user)
        if account is None or not hmac.compare_digest(account.auth_token, password):
            return None
        return account

    async def handle(self, request: RecordedRequest) -> Response:
        account = self._authenticated(request)
        if account is None:
            return _error(20003)
        owner = self.script_key(request)
        messages = _MESSAGES_PATH.fullmatch(request.path)
        calls = _CALLS_PATH.fullmatch(request.path)
        one_call = _CALL_PATH.fullmatch(request.path)
        the_account = _ACCOUNT_PATH.fullmatch(request.path)
        known = (
            (the_account is not None and request.method == "GET")
            or (messages is not None and request.method == "POST")
            or (calls is not None and request.method == "POST")
            or (one_call is not None and one_call.group(2) in self.calls)
        )
        if owner != account.sid or not known:
            return _error(20404, path=request.path)
        scripted = self._failures.take(account.sid)
        if scripted is not None:
            return _error(
                scripted,
                to=request.form.get("To", ""),
                from_=request.form.get("From", ""),
                path=request.path,
                service=request.form.get("MessagingServiceSid", ""),
            )
        if the_account is not None:
            return JSONResponse(self._account_resource(account))
        if messages is not None:
            return self._create_message(account, request.form)
        if calls is not None:
            return self._create_call(account, request)
        assert one_call is not None
        call = self.calls[one_call.group(2)]
        if request.method == "GET":
            return JSONResponse(call.resource)
        return self._update_call(call, request.form)

    def _account_resource(self, account: TwilioAccount) -> dict[str, Any]:
        """GET /Accounts/{Sid}.json: what a health probe of a twilio trunk reads."""
        uri = f"/2010-04-01/Accounts/{account.sid}.json"
        return {
            "auth_token": account.auth_token,
            "date_created": format_datetime(datetime.now(UTC)),
            "date_updated": format_datetime(datetime.now(UTC)),
            "friendly_name": "test account",
            "owner_account_sid": account.sid,
            "sid": account.sid,
            "status": self.account_status.get(account.sid, "active"),
            "subresource_uris": {"calls": uri.replace(".json", "/Calls.json")},
            "type": "Full",
            "uri": uri,
        }

    def _create_message(self, account: TwilioAccount, form: Mapping[str, str]) -> Response:
        to, body = form.get("To", ""), form.get("Body", "")
        from_, service = form.get("From"), form.get("MessagingServiceSid")
        if not to:
            return _error(21604)
        if not _E164.fullmatch(to):
            return _error(21211, to=to)
        if not body:
            return _error(21602)
        if len(body) > _MAX_BODY:
            return _error(21617)
        if from_ is None and service is None:
            return _error(21603)
        if service is not None and service not in account.messaging_service_sids:
            return _error(21701, service=service)
        if from_ is not None and from_ not in account.numbers:
            return _error(21606, from_=from_)
        if to in self.unsubscribed:
            return _error(21610)
        sid = _sid("SM")
        now = _now()
        uri = f"/2010-04-01/Accounts/{account.sid}/Messages/{sid}.json"
        message = {
            "account_sid": account.sid,
            "api_version": "2010-04-01",
            "body": body,
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": from_,
            "messaging_service_sid": service,
            "num_media": "0",
            "num_segments": "1",
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": "accepted" if from_ is None else "queued",
            "subresource_uris": {"media": uri.replace(".json", "/Media.json")},
            "to": to,
            "uri": uri,
        }
        self.messages.append(message)
        return JSONResponse(message, status_code=201)

    # --- Voice: REST ---------------------------------------------------------------------

    def _create_call(self, account: TwilioAccount, request: RecordedRequest) -> Response:
        form = request.form
        to, from_ = form.get("To", ""), form.get("From", "")
        if not to:
            return _error(21201)
        if not _E164.fullmatch(to):
            return _error(21211, to=to)
        if not from_:
            return _error(21213)
        if from_ not in account.numbers:
            return _error(21210, from_=from_)
        if not form.get("Url") and not form.get("Twiml"):
            return _error(21205)
        try:
            timeout = min(int(form.get("Timeout", "60")), _MAX_TIMEOUT_S)
        except ValueError:
            timeout = 60
        lists = _form_lists(request)
        events = frozenset(
            event for value in lists.get("StatusCallbackEvent", []) for event in value.split()
        )
        queued = self._call_scripts.get(to)
        script = queued.popleft() if queued else CallScript()
        sid = _sid("CA")
        call = FakeCall(
            sid=sid,
            account=account,
            form=dict(form),
            form_lists=lists,
            script=script,
            resource=_call_resource(account, sid, to, from_),
            timeout=timeout,
            status_events=events,
        )
        self.calls[sid] = call
        task = asyncio.create_task(self._simulate(call), name=f"fake-twilio-call-{sid}")
        self._call_tasks.add(task)
        task.add_done_callback(self._call_tasks.discard)
        return JSONResponse(call.resource, status_code=201)

    def _update_call(self, call: FakeCall, form: Mapping[str, str]) -> Response:
        status = form.get("Status")
        if status is not None:
            if status not in ("canceled", "completed"):
                return _error(20001)
            if call.status in ("queued", "ringing"):
                call._request_stop("api")
                self._finalize(call, "canceled")
            elif call.status == "in-progress" and status == "completed":
                call._request_stop("api")
                self._finalize(call, "completed")
            return JSONResponse(call.resource)
        if form.get("Twiml") or form.get("Url"):
            if call.status not in ("queued", "ringing", "in-progress") or call._stopped():
                return _error(21220)
            if form.get("Twiml"):
                call._redirect = ("twiml", form["Twiml"], "")
            else:
                call._redirect = ("url", form["Url"], form.get("Method", "POST").upper())
            call._wake.set()
        return JSONResponse(call.resource)

    def _set_status(self, call: FakeCall, status: str) -> None:
        call.resource["status"] = status
        call.resource["date_updated"] = _now()

    def _finalize(self, call: FakeCall, status: str) -> None:
        """Final resource fields; the first final status wins (an API cancel beats the
        simulation noticing it)."""
        if call.resource["end_time"] is not None:
            return
        now = asyncio.get_running_loop().time()
        if call._ended_at is None:
            call._ended_at = now
        call.resource.update(
            status=status,
            end_time=_now(),
            duration=str(self._duration(call)),
            date_updated=_now(),
        )
        if call.resource["start_time"] is None:
            call.resource["start_time"] = call.resource["end_time"]

    @staticmethod
    def _duration(call: FakeCall) -> int:
        """Seconds from answer to hangup, rounded up (an answered call lasts >= 1 s)."""
        if call._answered_at is None or call._ended_at is None:
            return 0
        return max(1, math.ceil(call._ended_at - call._answered_at))

    # --- Voice: call progress ------------------------------------------------------------

    async def _simulate(self, call: FakeCall) -> None:
        try:
            await self._progress(call)
        except asyncio.CancelledError:
            call.ended_by = call.ended_by or "shutdown"
            raise
        finally:
            call.finished.set()

    async def _progress(self, call: FakeCall) -> None:
        script = call.script
        await self._pause(call, _INITIATE_DELAY_S)
        if call._stopped():
            return await self._end(call, "canceled", 487, "api")
        call.resource["start_time"] = _now()
        await self._status_callback(call, "initiated")
        if call._stopped():
            return await self._end(call, "canceled", 487, "api")
        if script.outcome == "failed":
            return await self._end(call, "failed", script.sip_code or 503, "failed")
        self._set_status(call, "ringing")
        await self._status_callback(call, "ringing")
        outcome, ring = script.outcome, script.ring
        if outcome == "answer" and ring >= call.timeout:
            outcome, ring = "no-answer", float(call.timeout)
        await self._pause(call, ring)
        if call._stopped():
            return await self._end(call, "canceled", 487, "api")
        if outcome == "busy":
            return await self._end(call, "busy", 486, "busy")
        if outcome == "no-answer":
            return await self._end(call, "no-answer", 487, "no-answer")
        loop = asyncio.get_running_loop()
        call._answered_at = loop.time()
        if call.machine_detection:
            call.resource["answered_by"] = script.answered_by or "human"
        self._set_status(call, "in-progress")
        await self._status_callback(call, "in-progress")
        if script.hangup_after is not None:
            call._hangup_timer = loop.call_later(script.hangup_after, call._request_stop, "callee")
        if not call._stopped():
            await self._execute(call)
        await self._end(call, "completed", 200, call._stop or call.ended_by or "twiml")

    async def _end(self, call: FakeCall, status: str, sip_code: int, ended_by: str) -> None:
        call._request_stop(call._stop or ended_by)
        if call._hangup_timer is not None:
            call._hangup_timer.cancel()
        call.ended_by = call.ended_by or ended_by
        self._finalize(call, status)
        await self._status_callback(call, call.status, sip_code=sip_code)

    async def _pause(self, call: FakeCall, seconds: float, *, redirectable: bool = False) -> None:
        """Sleep, waking early when the call is hung up (or redirected, if `redirectable`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not call._stopped() and not (redirectable and call._redirect):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            call._wake.clear()
            try:
                await asyncio.wait_for(call._wake.wait(), remaining)
            except TimeoutError:
                return

    def _call_params(self, call: FakeCall, call_status: str) -> dict[str, str]:
        """What Twilio sends about the call on every webhook (voice URL and callbacks)."""
        to, from_ = call.resource["to"], call.resource["from"]
        params = {
            "Called": to,
            "ToState": "",
            "CallerCountry": _country(from_),
            "Direction": "outbound-api",
            "CallerState": "",
            "ToZip": "",
            "CallSid": call.sid,
            "To": to,
            "CallerZip": "",
            "ToCountry": _country(to),
            "CalledZip": "",
            "ApiVersion": "2010-04-01",
            "CalledCity": "",
            "CallStatus": call_status,
            "From": from_,
            "AccountSid": call.account.sid,
            "CalledCountry": _country(to),
            "CallerCity": "",
            "ToCity": "",
            "FromCountry": _country(from_),
            "Caller": from_,
            "FromCity": "",
            "CalledState": "",
            "FromZip": "",
            "FromState": "",
        }
        if call.resource["answered_by"] is not None:
            params["AnsweredBy"] = call.resource["answered_by"]
        return params

    async def _status_callback(
        self, call: FakeCall, call_status: str, *, sip_code: int | None = None
    ) -> None:
        url = call.form.get("StatusCallback")
        final = sip_code is not None
        event = "completed" if final else _EVENT_OF_STATUS[call_status]
        if not url or (not final and event not in call.status_events):
            return
        params = self._call_params(call, call_status)
        params.update(
            Timestamp=_now(),
            CallbackSource="call-progress-events",
            SequenceNumber=str(call._sequence),
        )
        call._sequence += 1
        if final:
            duration = str(self._duration(call))
            params.update(SipResponseCode=str(sip_code), Duration=duration, CallDuration=duration)
        method = call.form.get("StatusCallbackMethod", "POST").upper()
        sent = await self._send(call, "status", url, method, params)
        if sent.status_code is None or not 200 <= sent.status_code < 300:
            got = sent.error if sent.status_code is None else f"HTTP {sent.status_code}"
            call.errors.append((15003, f"Call Progress: Warning: Got {got} response to {url}"))

    async def _send(
        self,
        call: FakeCall,
        kind: Literal["status", "voice", "gather", "redirect"],
        url: str,
        method: str,
        params: Mapping[str, str],
    ) -> SentCallback:
        """One signed webhook request, recorded whatever happens."""
        token = call.account.auth_token
        if method == "GET":
            url = url + ("&" if "?" in url else "?") + urlencode(params)
            signature, data = twilio_signature(url, {}, token), None
        else:
            signature, data = twilio_signature(url, params, token), dict(params)
        status: int | None = None
        body, error = "", None
        target = urlsplit(url)
        if target.scheme != "http" or target.hostname != "127.0.0.1":
            error = "not sent: the fake only calls http://127.0.0.1"
        else:
            assert self._http is not None
            headers = {
                "X-Twilio-Signature": signature,
                "User-Agent": "TwilioProxy/1.1",
                "Accept": "*/*",
                "I-Twilio-Idempotency-Token": secrets.token_hex(16),
            }
            try:
                answer = await self._http.request(
                    method, url, data=data, headers=headers, timeout=self.callback_timeout_s
                )
                status, body = answer.status_code, answer.text
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
        sent = SentCallback(
            call.sid, kind, method, url, dict(params), signature, status, body, error
        )
        self.callbacks.append(sent)
        call.callbacks.append(sent)
        return sent

    # --- Voice: TwiML --------------------------------------------------------------------

    async def _execute(self, call: FakeCall) -> None:
        """Run the call's TwiML until it hangs up; application errors end the call."""
        try:
            doc: _Doc | None
            if call._redirect:
                doc = await self._take_redirect(call)
            elif call.form.get("Twiml"):
                doc = _Doc(_parse_twiml(call.form["Twiml"]), None)
            else:
                method = call.form.get("Method", "POST").upper()
                doc = await self._fetch(call, "voice", call.form["Url"], method, {})
            while doc is not None and not call._stopped():
                doc = await self._run_document(call, doc)
        except _AppError as err:
            call.errors.append((err.code, err.message))
            call.verbs.append(("error", str(err.code)))
            call.verbs.append(("say", _APPLICATION_ERROR))
            call.ended_by = "application-error"
        except _VerbLimit:
            call.verbs.append(("limit",))
            call.ended_by = "verb-limit"

    async def _take_redirect(self, call: FakeCall) -> _Doc:
        assert call._redirect is not None
        kind, value, method = call._redirect
        call._redirect = None
        if kind == "twiml":
            return _Doc(_parse_twiml(value), None)
        return await self._fetch(call, "voice", value, method, {})

    async def _fetch(
        self,
        call: FakeCall,
        kind: Literal["voice", "gather", "redirect"],
        url: str,
        method: str,
        extra: Mapping[str, str],
    ) -> _Doc:
        if not urlsplit(url).scheme:
            raise _AppError(11100, f"Invalid URL format: {url!r}")
        params = {**self._call_params(call, call.status), **extra}
        sent = await self._send(call, kind, url, method, params)
        if sent.status_code is None:
            raise _AppError(11205, f"HTTP connection failure: {sent.error} ({url})")
        if not 200 <= sent.status_code < 300:
            raise _AppError(11200, f"HTTP retrieval failure: HTTP {sent.status_code} ({url})")
        return _Doc(_parse_twiml(sent.body), url)

    def _count_verb(self, call: FakeCall) -> None:
        call._verb_count += 1
        if call._verb_count > _MAX_VERBS:
            raise _VerbLimit

    async def _run_document(self, call: FakeCall, doc: _Doc) -> _Doc | None:
        """Execute verbs in order; returns the next document (Gather action, Redirect, an
        update's redirect) or None when the call is over."""
        for verb in doc.root:
            if call._stopped():
                return None
            if call._redirect:
                return await self._take_redirect(call)
            self._count_verb(call)
            if verb.tag in ("Say", "Play", "Pause"):
                await self._media(call, verb)
            elif verb.tag == "Gather":
                next_doc = await self._gather(call, doc, verb)
                if next_doc is not None:
                    return next_doc
            elif verb.tag == "Redirect":
                url = urljoin(doc.url or "", (verb.text or "").strip())
                call.verbs.append(("redirect", url))
                return await self._fetch(
                    call, "redirect", url, verb.get("method", "POST").upper(), {}
                )
            elif verb.tag == "Hangup":
                call.verbs.append(("hangup",))
                call.ended_by = "twiml"
                return None
            else:
                call.verbs.append(("unsupported", verb.tag))
        if call._stopped():
            return None
        if call._redirect:
            return await self._take_redirect(call)
        call.verbs.append(("end",))
        call.ended_by = "twiml"
        return None

    async def _media(self, call: FakeCall, verb: ET.Element) -> None:
        if verb.tag == "Say":
            call.verbs.append(("say", "".join(verb.itertext()).strip()))
            await self._pause(call, _SAY_S, redirectable=True)
        elif verb.tag == "Play":
            if verb.get("digits"):
                call.verbs.append(("play_digits", verb.get("digits", "")))
            else:
                call.verbs.append(("play", (verb.text or "").strip()))
            await self._pause(call, _SAY_S, redirectable=True)
        else:
            try:
                length = int(verb.get("length", "1"))
            except ValueError:
                length = 1
            call.verbs.append(("pause", str(length)))
            await self._pause(call, min(length, _MAX_PAUSE_S), redirectable=True)

    async def _gather(self, call: FakeCall, doc: _Doc, verb: ET.Element) -> _Doc | None:
        """Nested prompts, then the next scripted entry; None continues with the next verb."""
        for child in verb:
            if call._stopped() or call._redirect:
                return None
            if child.tag in ("Say", "Play", "Pause"):
                self._count_verb(call)
                await self._media(call, child)
        if call._stopped() or call._redirect:
            return None
        entry = call.script.digits.pop(0) if call.script.digits else ""
        finish_key, finished = verb.get("finishOnKey", "#"), ""
        if finish_key and entry.endswith(finish_key):
            entry, finished = entry[: -len(finish_key)], finish_key
        num_digits = verb.get("numDigits", "")
        if num_digits.isdigit() and int(num_digits) > 0:
            entry = entry[: int(num_digits)]
        call.verbs.append(("gather", entry))
        if not entry and verb.get("actionOnEmptyResult", "false").lower() != "true":
            return None
        action = verb.get("action")
        if action:
            target = urljoin(doc.url, action) if doc.url else action
        elif doc.url:
            target = doc.url
        else:
            return None  # inline TwiML without an action: nothing to post to
        extra = {"Digits": entry, "FinishedOnKey": finished, "msg": "Gather End"}
        return await self._fetch(call, "gather", target, verb.get("method", "POST").upper(), extra)
