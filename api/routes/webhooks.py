"""Inbound acks from carriers and links: Twilio SMS replies and status callbacks, Telegram
and Slack button presses, the signed email link. Each one is authenticated before it can
ack."""

from __future__ import annotations

import html
import logging
import time
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Form, Header, HTTPException, Request, Response
from fastapi.responses import HTMLResponse

from api.deps import Runtime, RuntimeDep, context
from api.json_body import StrictJsonRoute
from escalation.channels.base import DeliveryResult
from escalation.channels.signing import verify_ack
from escalation.channels.slack import (
    SlackWebApi,
    closed_blocks,
    outcome_line,
    parse_slack_interaction,
    verify_slack_request,
)
from escalation.channels.sms import (
    parse_inbound_sms,
    parse_sms_status_callback,
    validate_twilio_signature,
)
from escalation.channels.telegram import check_telegram_secret, parse_telegram_update
from storage.models import Alert, AlertState

log = logging.getLogger(__name__)
router = APIRouter(route_class=StrictJsonRoute, prefix="/v1", tags=["webhooks"])
TELEGRAM_CHANNELS = ("telegram", "telegram_voice")
SLACK_CHANNELS = ("slack",)


async def _twilio_form(request: Request, runtime: RuntimeDep) -> dict[str, str]:
    """The form Twilio posted for the Messaging account (TWILIO_AUTH_TOKEN), verified."""
    token = runtime.settings.twilio_auth_token
    if not token:
        raise HTTPException(404, "Twilio webhooks are not configured")
    return await verified_twilio_form(request, runtime, token)


async def verified_twilio_form(request: Request, runtime: Runtime, token: str) -> dict[str, str]:
    """The form Twilio posted, after checking X-Twilio-Signature against our public URL."""
    form = {k: str(v) for k, v in (await request.form()).items()}
    url = str(request.url)
    if runtime.settings.public_url:
        query = f"?{request.url.query}" if request.url.query else ""
        url = runtime.settings.public_url.rstrip("/") + request.url.path + query
    if not validate_twilio_signature(url, form, request.headers.get("x-twilio-signature"), token):
        raise HTTPException(403, "invalid Twilio signature")
    return form


def _twiml(message: str | None) -> Response:
    body = f"<Message>{html.escape(message)}</Message>" if message else ""
    xml = f'<?xml version="1.0" encoding="UTF-8"?><Response>{body}</Response>'
    return Response(xml, media_type="application/xml")


@router.post("/webhooks/twilio/sms", response_class=Response)
async def twilio_sms(request: Request, runtime: RuntimeDep) -> Response:
    """Inbound SMS: "1", "ACK" or "ACK <short id>" acknowledges an alert paged to the sender."""
    form = await _twilio_form(request, runtime)
    inbound = parse_inbound_sms(form)
    if not inbound.is_ack:
        return _twiml("Reply 1 or ACK <id> to acknowledge.")
    ctx = context(request, f"sms:{inbound.phone}")
    alert = await runtime.engine.ack_by_address(
        inbound.phone, ("sms", "voice"), inbound.short_id, ctx
    )
    if alert is None:
        return _twiml("No open alert to acknowledge.")
    return _twiml(f"Acknowledged {alert.short_id}: {alert.title}")


@router.post("/webhooks/twilio/status", status_code=204, response_class=Response)
async def twilio_status(request: Request, runtime: RuntimeDep) -> Response:
    """Delivery reports: a late "undelivered"/"failed" moves the chain to retry/fallback."""
    form = await _twilio_form(request, runtime)
    update = parse_sms_status_callback(form)
    if update is not None:
        ctx = context(request, "twilio")
        await runtime.engine.provider_update(update.message_sid, update.result, ctx)
    return Response(status_code=204)


@router.post("/webhooks/telegram")
async def telegram(
    request: Request,
    runtime: RuntimeDep,
    x_telegram_bot_api_secret_token: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    """Bot API updates; the Acknowledge button's callback (data "ack:<alert id>") acks.
    The answer is a webhook reply method, so Telegram shows the result to the presser."""
    expected = runtime.settings.telegram_secret or ""
    if not check_telegram_secret(x_telegram_bot_api_secret_token, expected):
        raise HTTPException(403, "invalid Telegram secret token")
    try:
        update = await request.json()
    except ValueError:
        raise HTTPException(400, "body is not JSON") from None
    ack = parse_telegram_update(update) if isinstance(update, dict) else None
    if ack is None:
        return {}
    text = "This alert was not sent to Telegram."
    actor = f"telegram:{ack.user.username or ack.user.id}"
    alert = await _close_by_button(
        request, runtime, ack.alert_id, TELEGRAM_CHANNELS, actor, AlertState.ACKNOWLEDGED
    )
    if alert is not None:
        text = (
            "Acknowledged."
            if alert.state == AlertState.ACKNOWLEDGED.value
            else f"Alert is already {alert.state}."
        )
    return {"method": "answerCallbackQuery", "callback_query_id": ack.callback_query_id,
            "text": text}  # fmt: skip


async def _close_by_button(
    request: Request,
    runtime: Runtime,
    alert_id: str,
    channels: Sequence[str],
    actor: str,
    state: AlertState,
) -> Alert | None:
    """A chat button acks or resolves only an alert that was paged on its channels: a
    forged or stale button id must not close someone else's alert."""
    if not await runtime.engine.was_notified(alert_id, channels):
        return None
    return await runtime.engine.close(alert_id, state, context(request, actor), reason="button")


@router.post("/webhooks/slack/interactions", response_class=Response)
async def slack_interactions(request: Request, runtime: RuntimeDep) -> Response:
    """Block Kit button presses, signed with the app's signing secret: Acknowledge or
    Resolve closes the alert, then the message is rewritten to say who did."""
    secret = runtime.settings.slack_signing_secret
    if not secret:
        raise HTTPException(404, "Slack interactions are not configured")
    body = await request.body()
    timestamp = request.headers.get("x-slack-request-timestamp")
    if not verify_slack_request(body, timestamp, request.headers.get("x-slack-signature"), secret):
        raise HTTPException(401, "invalid or stale Slack signature")
    press = parse_slack_interaction(body)
    if press is None:
        return Response(status_code=200)
    actor = f"slack:{press.user_id}"
    alert = await _close_by_button(
        request, runtime, press.alert_id, SLACK_CHANNELS, actor, press.action.state
    )
    token = runtime.settings.slack_bot_token
    if alert is None or not token or press.channel is None or press.ts is None:
        return Response(status_code=200)
    state = AlertState(alert.state)
    closer = alert.resolved_by if state is AlertState.RESOLVED else alert.acked_by
    blocks = closed_blocks(press.blocks, alert.id, state, outcome_line(state, closer))
    api = SlackWebApi(token, api_base=runtime.settings.slack_api_base)
    updated = await api.update_message(press.channel, press.ts, press.text, blocks)
    if isinstance(updated, DeliveryResult):  # the alert is closed; only the message is stale
        log.warning("slack: updating the message of alert %s failed: %s", alert.id, updated.reason)
    return Response(status_code=200)


def _verified(token: str, runtime: RuntimeDep) -> str:
    secret = runtime.settings.ack_secret
    alert_id = verify_ack(token, secret, time.time()) if secret else None
    if alert_id is None:
        raise HTTPException(403, "invalid or expired ack link")
    return alert_id


@router.get("/ack", response_class=HTMLResponse)
async def ack_link(token: str, runtime: RuntimeDep) -> HTMLResponse:
    """The email link opens a confirmation page: mail scanners that prefetch links must
    not acknowledge on a person's behalf, so the ack itself is the POST below."""
    _verified(token, runtime)
    page = (
        '<!doctype html><title>Acknowledge alert</title><form method="post" action="ack">'
        f'<input type="hidden" name="token" value="{html.escape(token)}">'
        '<button type="submit">Acknowledge</button></form>'
    )
    return HTMLResponse(page)


@router.post("/ack", response_class=HTMLResponse)
async def ack_link_confirm(
    token: Annotated[str, Form()], request: Request, runtime: RuntimeDep
) -> HTMLResponse:
    alert_id = _verified(token, runtime)
    alert = await runtime.engine.close(
        alert_id, AlertState.ACKNOWLEDGED, context(request, "email-link"), reason="link"
    )
    if alert is None:
        raise HTTPException(404, "alert not found")
    return HTMLResponse(f"<!doctype html><p>Alert {html.escape(alert.short_id)} is "
                        f"{html.escape(alert.state)}.</p>")  # fmt: skip
