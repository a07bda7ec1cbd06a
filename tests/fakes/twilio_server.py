"""A local Twilio Programmable Messaging API for tests, driven by the real `twilio` SDK.

It checks what api.twilio.com checks for `POST /2010-04-01/Accounts/{Sid}/Messages.json`
(HTTP Basic auth, form fields, E.164 'To', owned 'From', opt-outs) and answers with the same
JSON resources and error bodies `{code, message, more_info, status}`. Failures can be
scripted per account: `fake.fail_next(20429, match=account.sid)`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from starlette.responses import JSONResponse, Response

from tests.fakes import FakeService, RecordedRequest, Scripted

__all__ = ["FakeTwilio", "TwilioAccount", "inbound_sms_form", "twilio_signature"]

_MESSAGES_PATH = re.compile(r"/2010-04-01/Accounts/(AC[0-9a-f]{32})/Messages\.json")
_E164 = re.compile(r"\+[1-9][0-9]{6,14}")
_MAX_BODY = 1600

# Real codes with the status and message Twilio sends for them.
ERRORS: dict[int, tuple[int, str]] = {
    20003: (401, "Authenticate"),
    20404: (404, "The requested resource {path} was not found"),
    20429: (429, "Too Many Requests"),
    20500: (500, "An internal server error has occurred"),
    20503: (503, "Service Unavailable"),
    21211: (400, "The 'To' number {to} is not a valid phone number."),
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


def _sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


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
    return JSONResponse(
        {
            "code": code,
            "message": template.format(**fields),
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        },
        status_code=status,
    )


class FakeTwilio(FakeService):
    """Scripting keys (`match=`) are account SIDs."""

    def __init__(self) -> None:
        super().__init__()
        self.accounts: dict[str, TwilioAccount] = {}
        self.messages: list[dict[str, Any]] = []  # every message resource created
        self.unsubscribed: set[str] = set()  # numbers that texted STOP
        self._failures: Scripted[int] = Scripted()

    def add_account(
        self, numbers: tuple[str, ...] = (), messaging_service_sids: tuple[str, ...] = ()
    ) -> TwilioAccount:
        account = TwilioAccount(_sid("AC"), secrets.token_hex(16), numbers, messaging_service_sids)
        self.accounts[account.sid] = account
        return account

    def fail_next(self, code: int, *, count: int = 1, match: str | None = None) -> None:
        """Answer the next `count` requests (for account `match`) with Twilio error `code`."""
        if code not in ERRORS:
            raise ValueError(f"no canned body for Twilio error {code}; add it to ERRORS")
        self._failures.push(code, count=count, match=match)

    def script_key(self, request: RecordedRequest) -> str:
        found = _MESSAGES_PATH.fullmatch(request.path)
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
        found = _MESSAGES_PATH.fullmatch(request.path)
        if request.method != "POST" or found is None or found.group(1) != account.sid:
            return _error(20404, path=request.path)
        scripted = self._failures.take(account.sid)
        if scripted is not None:
            return _error(scripted, to=request.form.get("To", ""))
        return self._create_message(account, request.form)

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
        now = format_datetime(datetime.now(UTC))
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
