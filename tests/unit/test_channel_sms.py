"""SMS helpers that need no network: message text, inbound replies, status callbacks,
Twilio webhook signatures and error classification."""

from __future__ import annotations

import pytest

from escalation.channels.base import DeliveryStatus
from escalation.channels.sms import (
    InboundSms,
    TwilioSender,
    classify_twilio_error,
    parse_inbound_sms,
    parse_sms_status_callback,
    sms_body,
    validate_twilio_signature,
)
from tests.fakes import make_notification
from tests.fakes.twilio_server import TwilioAccount, inbound_sms_form, twilio_signature

PHONE = "+14155550142"
ACCOUNT = TwilioAccount("AC" + "1" * 32, "f" * 32, ("+15005550006",), ())
WEBHOOK_URL = "https://ackline.example/v1/webhooks/twilio/sms?tenant=acme"


def test_body_names_severity_title_and_how_to_ack() -> None:
    assert sms_body(make_notification("sms")) == (
        "[CRITICAL] Checkout API error rate 12% — reply 1 or ACK 7F3K to acknowledge"
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("1", InboundSms(PHONE, None, True)),
        (" 1 ", InboundSms(PHONE, None, True)),
        ("ACK 7F3K", InboundSms(PHONE, "7F3K", True)),
        ("ack 7f3k", InboundSms(PHONE, "7F3K", True)),
        ("Ack #7f3k!", InboundSms(PHONE, "7F3K", True)),
        ("ACK", InboundSms(PHONE, None, True)),
        ("2", InboundSms(PHONE, None, False)),
        ("11", InboundSms(PHONE, None, False)),
        ("acknowledged?", InboundSms(PHONE, None, False)),
        ("ACK 7F3K please", InboundSms(PHONE, None, False)),
        ("", InboundSms(PHONE, None, False)),
    ],
)
def test_inbound_reply_parsing(body: str, expected: InboundSms) -> None:
    assert parse_inbound_sms(inbound_sms_form(ACCOUNT, PHONE, body)) == expected


def test_signature_of_a_real_twilio_request_validates() -> None:
    form = inbound_sms_form(ACCOUNT, PHONE, "ACK 7F3K")
    signature = twilio_signature(WEBHOOK_URL, form, ACCOUNT.auth_token)

    assert validate_twilio_signature(WEBHOOK_URL, form, signature, ACCOUNT.auth_token)


def test_signature_rejects_forgeries() -> None:
    form = inbound_sms_form(ACCOUNT, PHONE, "ACK 7F3K")
    signature = twilio_signature(WEBHOOK_URL, form, ACCOUNT.auth_token)

    assert not validate_twilio_signature(WEBHOOK_URL, form, signature, "0" * 32)
    assert not validate_twilio_signature(
        WEBHOOK_URL, {**form, "From": "+14155550199"}, signature, ACCOUNT.auth_token
    )
    assert not validate_twilio_signature(
        WEBHOOK_URL.replace("acme", "evil"), form, signature, ACCOUNT.auth_token
    )
    assert not validate_twilio_signature(WEBHOOK_URL, form, None, ACCOUNT.auth_token)
    assert not validate_twilio_signature(WEBHOOK_URL, form, "", ACCOUNT.auth_token)


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (429, 20429, (DeliveryStatus.FAILED_RETRYABLE, True)),
        (503, 20503, (DeliveryStatus.FAILED_RETRYABLE, True)),
        (500, None, (DeliveryStatus.FAILED_RETRYABLE, True)),
        (401, 20003, (DeliveryStatus.FAILED_PERMANENT, True)),
        (400, 21606, (DeliveryStatus.FAILED_PERMANENT, True)),
        (400, 21211, (DeliveryStatus.FAILED_PERMANENT, False)),
        (400, 21610, (DeliveryStatus.FAILED_PERMANENT, False)),
        (400, 21614, (DeliveryStatus.FAILED_PERMANENT, False)),
    ],
)
def test_error_classification(
    status: int, code: int | None, expected: tuple[DeliveryStatus, bool]
) -> None:
    assert classify_twilio_error(status, code) == expected


@pytest.mark.parametrize(
    ("form", "expected"),
    [
        ({"MessageStatus": "delivered"}, (DeliveryStatus.DELIVERED, "delivered")),
        (
            {"MessageStatus": "undelivered", "ErrorCode": "30003"},
            (DeliveryStatus.FAILED_RETRYABLE, "twilio_30003"),
        ),
        (
            {"MessageStatus": "undelivered", "ErrorCode": "30006"},
            (DeliveryStatus.FAILED_PERMANENT, "twilio_30006"),
        ),
        ({"MessageStatus": "failed"}, (DeliveryStatus.FAILED_PERMANENT, "twilio_failed")),
    ],
)
def test_status_callback_final_states(
    form: dict[str, str], expected: tuple[DeliveryStatus, str]
) -> None:
    update = parse_sms_status_callback({"MessageSid": "SM" + "a" * 32, **form})

    assert update is not None
    assert update.message_sid == "SM" + "a" * 32
    assert (update.result.status, update.result.reason) == expected
    assert update.result.provider_id == update.message_sid


@pytest.mark.parametrize("status", ["queued", "sending", "sent"])
def test_status_callback_intermediate_states_are_ignored(status: str) -> None:
    assert parse_sms_status_callback({"MessageSid": "SM1", "MessageStatus": status}) is None


def test_sender_needs_exactly_one_origin() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        TwilioSender("AC1", "t")
    with pytest.raises(ValueError, match="exactly one"):
        TwilioSender("AC1", "t", from_number="+15005550006", messaging_service_sid="MG1")
