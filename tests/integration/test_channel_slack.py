"""The slack channel: the real slack_sdk against the local Web API fake."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from api.channels import services_for
from api.settings import Settings
from escalation.channels.base import DeliveryStatus
from escalation.channels.slack import SlackChannel, SlackWebApi
from tests.fakes import free_port, make_notification
from tests.fakes.slack_server import FakeSlack

CHANNEL = "C07OPS0001"
USER = "U07ADA0001"
ALERT_ID = "5d0c1e7a-2b44-4f0e-8c61-9a3b7e2f4d10"
BLOCKS = [
    {
        "type": "section",
        "text": {
            "type": "mrkdwn",
            "text": "*[CRITICAL] Checkout API error rate 12%*\n"
            "5xx ratio above 5% for 10 minutes on checkout-api in eu-west-1.",
        },
    },
    {"type": "context", "elements": [{"type": "mrkdwn", "text": "Alert 7F3K"}]},
    {
        "type": "actions",
        "block_id": "ackline_actions",
        "elements": [
            {
                "type": "button",
                "action_id": "ackline_ack",
                "text": {"type": "plain_text", "text": "Acknowledge"},
                "style": "primary",
                "value": ALERT_ID,
            },
            {
                "type": "button",
                "action_id": "ackline_resolve",
                "text": {"type": "plain_text", "text": "Resolve"},
                "style": "danger",
                "value": ALERT_ID,
            },
        ],
    },
]


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    async with FakeSlack(CHANNEL, USER) as fake:
        yield fake


def _api(slack: FakeSlack, **kwargs: float) -> SlackWebApi:
    return SlackWebApi(slack.token, api_base=f"{slack.url}/api/", **kwargs)


async def test_posts_the_alert_with_acknowledge_and_resolve_buttons(slack: FakeSlack) -> None:
    result = await SlackChannel(_api(slack)).send(make_notification("slack", slack_channel=CHANNEL))

    assert result.status is DeliveryStatus.DELIVERED, result
    [request] = slack.requests
    assert (request.method, request.path) == ("POST", "/api/chat.postMessage")
    assert request.headers["authorization"] == f"Bearer {slack.token}"
    assert request.json["channel"] == CHANNEL
    assert request.json["blocks"] == BLOCKS
    assert request.json["text"] == (
        "[CRITICAL] Checkout API error rate 12%: "
        "5xx ratio above 5% for 10 minutes on checkout-api in eu-west-1."
    )
    [(where, ts)] = slack.messages
    assert (result.provider_id, result.details) == (ts, {"channel": where})
    assert where == CHANNEL


async def test_a_user_id_is_paged_in_the_direct_message_channel(slack: FakeSlack) -> None:
    result = await SlackChannel(_api(slack)).send(make_notification("slack", slack_channel=USER))

    assert result.status is DeliveryStatus.DELIVERED
    assert result.details == {"channel": "D07ADA0001"}  # chat.update needs this, not USER


async def test_alert_text_cannot_mention_or_link(slack: FakeSlack) -> None:
    notification = make_notification("slack", slack_channel=CHANNEL)
    notification = replace(notification, summary="<!channel> see <https://x|here> & go")
    await SlackChannel(_api(slack)).send(notification)

    text = slack.requests[0].json["blocks"][0]["text"]["text"]
    assert text.endswith("&lt;!channel&gt; see &lt;https://x|here&gt; &amp; go")


async def test_rate_limit_is_retryable_with_retry_after(slack: FakeSlack) -> None:
    slack.fail_next("ratelimited", status=429, retry_after=30, match="chat.postMessage")

    result = await SlackChannel(_api(slack)).send(make_notification("slack", slack_channel=CHANNEL))

    assert (result.status, result.reason) == (DeliveryStatus.FAILED_RETRYABLE, "slack_ratelimited")
    assert result.details == {"error": "ratelimited", "retry_after": "30"}
    assert slack.messages == {}


@pytest.mark.parametrize(
    ("error", "status", "verdict"),
    [
        ("internal_error", 200, DeliveryStatus.FAILED_RETRYABLE),
        ("service_unavailable", 503, DeliveryStatus.FAILED_RETRYABLE),
        ("is_archived", 200, DeliveryStatus.FAILED_PERMANENT),
    ],
)
async def test_api_errors_are_classified(
    slack: FakeSlack, error: str, status: int, verdict: DeliveryStatus
) -> None:
    slack.fail_next(error, status=status)

    result = await SlackChannel(_api(slack)).send(make_notification("slack", slack_channel=CHANNEL))

    assert (result.status, result.reason) == (verdict, f"slack_{error}")


async def test_unknown_channel_is_permanent(slack: FakeSlack) -> None:
    result = await SlackChannel(_api(slack)).send(
        make_notification("slack", slack_channel="C07NOWHERE")
    )

    assert (result.status, result.reason) == (
        DeliveryStatus.FAILED_PERMANENT,
        "slack_channel_not_found",
    )


async def test_wrong_token_is_permanent(slack: FakeSlack) -> None:
    api = SlackWebApi("xoxb-not-the-token", api_base=f"{slack.url}/api/")

    result = await SlackChannel(api).send(make_notification("slack", slack_channel=CHANNEL))

    assert (result.status, result.reason) == (DeliveryStatus.FAILED_PERMANENT, "slack_invalid_auth")
    assert "xoxb" not in repr(result)


async def test_timeout_and_unreachable_api_are_retryable(slack: FakeSlack) -> None:
    slack.stall_next(2.5)
    notification = make_notification("slack", slack_channel=CHANNEL)

    timed_out = await SlackChannel(_api(slack, timeout_s=1)).send(notification)
    down = SlackWebApi(slack.token, api_base=f"http://127.0.0.1:{free_port()}/api/")
    refused = await SlackChannel(down).send(notification)

    assert (timed_out.status, timed_out.reason) == (
        DeliveryStatus.FAILED_RETRYABLE,
        "slack_timeout",
    )
    assert (refused.status, refused.reason) == (
        DeliveryStatus.FAILED_RETRYABLE,
        "slack_connection_error",
    )


async def test_cancel_takes_the_buttons_off(slack: FakeSlack) -> None:
    channel = SlackChannel(_api(slack))
    notification = make_notification("slack", slack_channel=CHANNEL)
    await channel.send(notification)

    await channel.cancel(notification.notification_id)
    await channel.cancel(notification.notification_id)  # nothing left the second time

    updates = [r for r in slack.requests if r.path == "/api/chat.update"]
    assert len(updates) == 1
    [message] = slack.messages.values()
    assert message["blocks"] == BLOCKS[:2]


async def test_missing_slack_channel_is_permanent_without_api_call(slack: FakeSlack) -> None:
    result = await SlackChannel(_api(slack)).send(make_notification("slack"))

    assert (result.status, result.reason) == (DeliveryStatus.FAILED_PERMANENT, "no_slack_channel")
    assert slack.requests == []


async def test_the_environment_configures_the_channel(slack: FakeSlack, tmp_path: Path) -> None:
    token_file = tmp_path / "slack_bot_token"
    token_file.write_text(f"{slack.token}\n")
    settings = Settings.from_env(
        {
            "SLACK_BOT_TOKEN_FILE": str(token_file),
            "SLACK_SIGNING_SECRET": "signing",
            "SLACK_API_BASE": f"{slack.url}/api/",
        }
    )
    assert settings.slack_signing_secret == "signing"
    assert "signing" not in repr(settings)
    assert slack.token not in repr(settings)

    async with services_for(settings, None) as services:
        result = await services.channels["slack"].send(
            make_notification("slack", slack_channel=CHANNEL)
        )

    assert result.status is DeliveryStatus.DELIVERED
    assert [r.path for r in slack.requests] == ["/api/chat.postMessage"]
    async with services_for(Settings.from_env({}), None) as services:
        assert "slack" not in services.channels
