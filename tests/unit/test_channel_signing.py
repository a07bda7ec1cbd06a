"""Signed ack links and webhook signatures: authenticity, expiry, replay window."""

from __future__ import annotations

import hashlib
import hmac
import re

import pytest

from escalation.channels.signing import sign_ack, sign_webhook, verify_ack, verify_webhook

ALERT = "5d0c1e7a-2b44-4f0e-8c61-9a3b7e2f4d10"
SECRET = "s3cret"
EXPIRES = 1_800_000_000


def test_ack_token_round_trips_until_expiry() -> None:
    token = sign_ack(ALERT, SECRET, EXPIRES)

    assert re.fullmatch(r"[A-Za-z0-9_-]+\.\d+\.[A-Za-z0-9_-]+", token)  # safe in a URL path
    assert verify_ack(token, SECRET, now=EXPIRES - 3600) == ALERT
    assert verify_ack(token, SECRET, now=EXPIRES) == ALERT
    assert verify_ack(token, SECRET, now=EXPIRES + 1) is None


def test_ack_token_rejects_other_secret_and_tampering() -> None:
    token = sign_ack(ALERT, SECRET, EXPIRES)
    encoded_id, expiry, mac = token.split(".")
    other_id = sign_ack("another-alert", SECRET, EXPIRES).split(".")[0]

    assert verify_ack(token, b"other", now=0) is None
    assert verify_ack(f"{other_id}.{expiry}.{mac}", SECRET, now=0) is None
    assert verify_ack(f"{encoded_id}.{EXPIRES + 86400}.{mac}", SECRET, now=0) is None
    assert verify_ack(f"{encoded_id}.{expiry}.{mac[:-2]}", SECRET, now=0) is None


@pytest.mark.parametrize(
    "garbage", ["", "abc", "a.b.c", "a.-1.c", "!!.1.!!", "a.1.b.c", "YWxlcnQ.1.%%%"]
)
def test_malformed_ack_tokens_are_rejected(garbage: str) -> None:
    assert verify_ack(garbage, SECRET, now=0) is None


def test_ack_token_never_verifies_as_webhook_signature() -> None:
    body = b"{}"
    mac_hex = sign_webhook(body, SECRET, EXPIRES).split("v1=")[1]
    assert mac_hex not in sign_ack(ALERT, SECRET, EXPIRES)
    assert not verify_webhook(
        f"t={EXPIRES},v1={sign_ack(ALERT, SECRET, EXPIRES)}", body, SECRET, EXPIRES
    )


def test_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        sign_ack(ALERT, "", EXPIRES)


def test_webhook_signature_is_stripe_style_hmac() -> None:
    body = b'{"alert_id":"a"}'

    header = sign_webhook(body, SECRET, 1_700_000_000)

    expected = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"


@pytest.mark.parametrize(
    ("now", "ok"), [(1_700_000_000, True), (1_700_000_300, True), (1_700_000_301, False),
                    (1_699_999_700, True), (1_699_999_699, False)],
)  # fmt: skip
def test_webhook_replay_window(now: int, ok: bool) -> None:
    body = b"{}"
    header = sign_webhook(body, SECRET, 1_700_000_000)

    assert verify_webhook(header, body, SECRET, now=now) is ok


def test_webhook_rejects_tampering_and_wrong_secret() -> None:
    body = b'{"severity":"critical"}'
    header = sign_webhook(body, SECRET, 1_700_000_000)

    assert not verify_webhook(header, b'{"severity":"info"}', SECRET, now=1_700_000_000)
    assert not verify_webhook(header, body, "other", now=1_700_000_000)
    assert not verify_webhook(
        header.replace("t=1700000000", "t=1700000001"), body, SECRET, 1_700_000_000
    )
    assert not verify_webhook(None, body, SECRET, now=1_700_000_000)
    assert not verify_webhook("v1=abc", body, SECRET, now=1_700_000_000)


def test_webhook_accepts_any_of_several_signatures_during_rotation() -> None:
    body = b"{}"
    old = sign_webhook(body, "old-secret", 1_700_000_000)
    new_mac = sign_webhook(body, "new-secret", 1_700_000_000).split(",")[1]

    assert verify_webhook(f"{old},{new_mac}", body, "new-secret", now=1_700_000_000)
    assert verify_webhook(f"{old},{new_mac}", body, "old-secret", now=1_700_000_000)
