"""SmsChannel through the real twilio SDK against the local Twilio Messaging fake."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import pytest

from escalation.channels.base import DeliveryStatus
from escalation.channels.sms import SmsChannel, TwilioSender, sms_body
from tests.fakes import free_port, make_notification
from tests.fakes.twilio_server import FakeTwilio, TwilioAccount

TO = "+14155550142"
STATUS_URL = "https://ackline.example/v1/webhooks/twilio/sms-status"


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilio]:
    async with FakeTwilio() as fake:
        yield fake


def sender(account: TwilioAccount) -> TwilioSender:
    if account.numbers:
        return TwilioSender(account.sid, account.auth_token, from_number=account.numbers[0])
    return TwilioSender(
        account.sid, account.auth_token, messaging_service_sid=account.messaging_service_sids[0]
    )


def two_senders(fake: FakeTwilio) -> tuple[TwilioAccount, TwilioAccount, SmsChannel]:
    first = fake.add_account(numbers=("+14155550106",))
    second = fake.add_account(numbers=("+14155550107",))
    channel = SmsChannel([sender(first), sender(second)], api_base=fake.url, timeout_s=2)
    return first, second, channel


def basic_user(header: str) -> str:
    scheme, _, encoded = header.partition(" ")
    assert scheme == "Basic"
    return base64.b64decode(encoded).decode().partition(":")[0]


async def test_sends_exact_twilio_request_and_returns_sid(twilio: FakeTwilio) -> None:
    account = twilio.add_account(numbers=("+14155550106",))
    channel = SmsChannel([sender(account)], api_base=twilio.url, status_callback_url=STATUS_URL)
    notification = make_notification("sms", phone=TO)

    result = await channel.send(notification)

    assert result.status is DeliveryStatus.DELIVERED
    assert result.provider_id == twilio.messages[0]["sid"]
    assert result.provider_id is not None
    assert result.provider_id.startswith("SM")
    [request] = twilio.requests
    assert request.method == "POST"
    assert request.path == f"/2010-04-01/Accounts/{account.sid}/Messages.json"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    expected_auth = base64.b64encode(f"{account.sid}:{account.auth_token}".encode()).decode()
    assert request.headers["authorization"] == f"Basic {expected_auth}"
    assert dict(request.form) == {
        "To": TO,
        "From": "+14155550106",
        "Body": "[CRITICAL] Checkout API error rate 12% — reply 1 or ACK 7F3K to acknowledge",
        "StatusCallback": STATUS_URL,
    }
    assert request.form["Body"] == sms_body(notification)


async def test_messaging_service_sender_sends_service_sid_instead_of_from(
    twilio: FakeTwilio,
) -> None:
    account = twilio.add_account(messaging_service_sids=("MG" + "a" * 32,))
    channel = SmsChannel([sender(account)], api_base=twilio.url)

    result = await channel.send(make_notification("sms", phone=TO))

    assert result.status is DeliveryStatus.DELIVERED
    assert twilio.requests[0].form["MessagingServiceSid"] == "MG" + "a" * 32
    assert "From" not in twilio.requests[0].form


@pytest.mark.parametrize(
    ("phone", "unsubscribe", "reason"),
    [("+1555", False, "twilio_21211"), (TO, True, "twilio_21610")],
)
async def test_recipient_errors_are_permanent_and_not_rotated(
    twilio: FakeTwilio, phone: str, unsubscribe: bool, reason: str
) -> None:
    _, _, channel = two_senders(twilio)
    if unsubscribe:
        twilio.unsubscribed.add(phone)

    result = await channel.send(make_notification("sms", phone=phone))

    assert (result.status, result.reason) == (DeliveryStatus.FAILED_PERMANENT, reason)
    assert len(twilio.requests) == 1


@pytest.mark.parametrize("code", [20429, 20503, 20500])
async def test_retryable_error_rotates_to_next_sender(twilio: FakeTwilio, code: int) -> None:
    first, second, channel = two_senders(twilio)
    twilio.fail_next(code, match=first.sid)

    result = await channel.send(make_notification("sms", phone=TO))

    assert result.status is DeliveryStatus.DELIVERED
    assert [basic_user(r.headers["authorization"]) for r in twilio.requests] == [
        first.sid,
        second.sid,
    ]
    assert twilio.messages[0]["from"] == "+14155550107"


async def test_all_senders_throttled_is_retryable_with_every_reason(twilio: FakeTwilio) -> None:
    first, second, channel = two_senders(twilio)
    twilio.fail_next(20429, match=first.sid)
    twilio.fail_next(20503, match=second.sid)

    result = await channel.send(make_notification("sms", phone=TO))

    assert (result.status, result.reason) == (DeliveryStatus.FAILED_RETRYABLE, "twilio_20503")
    assert result.details["tried"] == (
        f"{first.sid}/+14155550106=twilio_20429;{second.sid}/+14155550107=twilio_20503"
    )
    assert twilio.messages == []


async def test_misconfigured_sender_is_skipped(twilio: FakeTwilio) -> None:
    broken = twilio.add_account(numbers=("+14155550106",))
    good = twilio.add_account(numbers=("+14155550107",))
    not_owned = TwilioSender(broken.sid, broken.auth_token, from_number="+14155550199")
    wrong_token = TwilioSender(good.sid, "0" * 32, from_number="+14155550107")
    channel = SmsChannel([not_owned, wrong_token, sender(good)], api_base=twilio.url)

    result = await channel.send(make_notification("sms", phone=TO))

    assert result.status is DeliveryStatus.DELIVERED
    assert len(twilio.requests) == 3


async def test_only_misconfigured_senders_is_permanent(twilio: FakeTwilio) -> None:
    account = twilio.add_account(numbers=("+14155550106",))
    channel = SmsChannel(
        [TwilioSender(account.sid, "0" * 32, from_number="+14155550106")], api_base=twilio.url
    )

    result = await channel.send(make_notification("sms", phone=TO))

    assert (result.status, result.reason) == (DeliveryStatus.FAILED_PERMANENT, "twilio_20003")


async def test_later_attempt_starts_with_next_sender(twilio: FakeTwilio) -> None:
    _, second, channel = two_senders(twilio)

    result = await channel.send(make_notification("sms", phone=TO, attempt=2))

    assert result.status is DeliveryStatus.DELIVERED
    assert [basic_user(r.headers["authorization"]) for r in twilio.requests] == [second.sid]


async def test_timeout_is_retryable_and_rotates(twilio: FakeTwilio) -> None:
    first = twilio.add_account(numbers=("+14155550106",))
    second = twilio.add_account(numbers=("+14155550107",))
    only_first = SmsChannel([sender(first)], api_base=twilio.url, timeout_s=0.3)
    both = SmsChannel([sender(first), sender(second)], api_base=twilio.url, timeout_s=0.3)
    twilio.stall_next(1.0, count=2, match=first.sid)

    alone = await only_first.send(make_notification("sms", phone=TO))
    rotated = await both.send(make_notification("sms", phone=TO))

    assert (alone.status, alone.reason) == (DeliveryStatus.FAILED_RETRYABLE, "twilio_timeout")
    assert rotated.status is DeliveryStatus.DELIVERED
    assert rotated.details["sender"] == f"{second.sid}/+14155550107"


async def test_unreachable_api_is_retryable() -> None:
    channel = SmsChannel(
        [TwilioSender("AC" + "0" * 32, "t" * 32, from_number="+14155550106")],
        api_base=f"http://127.0.0.1:{free_port()}",
    )

    result = await channel.send(make_notification("sms", phone=TO))

    assert (result.status, result.reason) == (
        DeliveryStatus.FAILED_RETRYABLE,
        "twilio_connection_error",
    )


async def test_missing_phone_is_permanent_without_request(twilio: FakeTwilio) -> None:
    account = twilio.add_account(numbers=("+14155550106",))
    channel = SmsChannel([sender(account)], api_base=twilio.url)

    result = await channel.send(make_notification("sms"))

    assert (result.status, result.reason) == (DeliveryStatus.FAILED_PERMANENT, "no_phone")
    assert twilio.requests == []
