"""Telegram helpers that need no network: callback-query acks, the webhook secret and
Bot API error classification."""

from __future__ import annotations

from typing import Any

import pytest

from escalation.channels.base import DeliveryStatus
from escalation.channels.telegram import (
    TelegramAck,
    TelegramUser,
    check_telegram_secret,
    classify_telegram_error,
    parse_telegram_update,
)
from tests.fakes.telegram_server import callback_query_update

ALERT = "5d0c1e7a-2b44-4f0e-8c61-9a3b7e2f4d10"


def test_ack_button_press_is_parsed() -> None:
    update = callback_query_update(f"ack:{ALERT}", user_id=42, username="ada_oncall")

    ack = parse_telegram_update(update)

    assert ack == TelegramAck(
        ALERT, TelegramUser(42, "ada_oncall", "Ada"), update["callback_query"]["id"]
    )


def test_user_without_username_gets_display_name() -> None:
    update = callback_query_update(f"ack:{ALERT}", username=None, first_name="Grace")
    update["callback_query"]["from"]["last_name"] = "Hopper"

    ack = parse_telegram_update(update)

    assert ack is not None
    assert (ack.user.username, ack.user.display_name) == (None, "Grace Hopper")


def _without_sender(update: dict[str, Any]) -> dict[str, Any]:
    del update["callback_query"]["from"]
    return update


@pytest.mark.parametrize(
    "update",
    [
        {"update_id": 1, "message": {"message_id": 1, "text": "ack"}},
        callback_query_update("mute:1h"),
        callback_query_update("ack:"),
        _without_sender(callback_query_update(f"ack:{ALERT}")),
        {"update_id": 1, "callback_query": "ack:x"},
        {},
    ],
)
def test_anything_else_is_not_an_ack(update: dict[str, Any]) -> None:
    assert parse_telegram_update(update) is None


@pytest.mark.parametrize(
    ("header", "expected", "ok"),
    [
        ("tok-3n_s3cret", "tok-3n_s3cret", True),
        ("tok-3n_s3creT", "tok-3n_s3cret", False),
        ("tok-3n_s3cre", "tok-3n_s3cret", False),
        (None, "tok-3n_s3cret", False),
        ("", "", False),
        ("anything", "", False),
    ],
)
def test_webhook_secret_token(header: str | None, expected: str, ok: bool) -> None:
    assert check_telegram_secret(header, expected) is ok


@pytest.mark.parametrize(
    ("status", "payload", "header", "verdict", "details"),
    [
        (
            429,
            {"ok": False, "error_code": 429, "description": "Too Many Requests: retry after 3",
             "parameters": {"retry_after": 3}},
            None,
            DeliveryStatus.FAILED_RETRYABLE,
            {"description": "Too Many Requests: retry after 3", "retry_after": "3"},
        ),
        (429, None, "11", DeliveryStatus.FAILED_RETRYABLE, {"retry_after": "11"}),
        (502, None, None, DeliveryStatus.FAILED_RETRYABLE, {}),
        (
            400,
            {"ok": False, "error_code": 400,
             "description": "Bad Request: group chat was upgraded to a supergroup chat",
             "parameters": {"migrate_to_chat_id": -1001234567890}},
            None,
            DeliveryStatus.FAILED_PERMANENT,
            {"description": "Bad Request: group chat was upgraded to a supergroup chat",
             "migrate_to_chat_id": "-1001234567890"},
        ),
    ],
)  # fmt: skip
def test_error_classification(
    status: int,
    payload: dict[str, Any] | None,
    header: str | None,
    verdict: DeliveryStatus,
    details: dict[str, str],
) -> None:
    result = classify_telegram_error(status, payload, header)

    assert (result.status, result.reason, dict(result.details)) == (
        verdict,
        f"telegram_{status}",
        details,
    )
