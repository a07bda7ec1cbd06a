"""Twilio Voice webhooks: the call flow of calls placed on `twilio` trunks, and their status.

Twilio fetches TwiML when the callee answers and after every keypress; each answer runs
the policy's ack flow up to the next menu (`ivr.twiml`). What happened (a key, the
call's progress) goes to the process that placed the call through `CallEvents`; that
process reports the outcome to the engine, exactly as for a SIP call. Every request is
checked against X-Twilio-Signature with the auth token of the trunk's account.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, HTTPException, Request, Response

from api.channels import default_ack_flow, policy_flows
from api.deps import Runtime, RuntimeDep
from api.json_body import StrictJsonRoute
from api.routes.webhooks import verified_twilio_form
from api.voice_channel import EARLY_OUTCOMES
from carriers.twilio_voice import CallEvents, voice_webhook_urls
from ivr import twiml
from ivr.flow import Flow
from storage.models import AlertState

router = APIRouter(
    route_class=StrictJsonRoute, prefix="/v1/webhooks/twilio/voice", tags=["webhooks"]
)
CONTEXT_KEYS = ("alert", "notification", "policy")


def _events(request: Request) -> CallEvents:
    events: CallEvents | None = getattr(request.app.state, "twilio_events", None)
    if events is None:
        raise HTTPException(404, "no twilio trunk is configured")
    return events


def _account_token(runtime: Runtime, account_sid: str) -> str | None:
    """The auth token of the trunk whose account Twilio says it is calling for."""
    carriers = runtime.config.carriers
    for trunk in carriers.trunks if carriers else []:
        if trunk.kind == "twilio" and trunk.account_sid == account_sid and trunk.auth_token:
            return trunk.auth_token.get_secret_value()
    return None


async def _form(request: Request, runtime: Runtime) -> dict[str, str]:
    raw = await request.form()
    token = _account_token(runtime, str(raw.get("AccountSid", "")))
    if token is None:
        raise HTTPException(403, "unknown Twilio account")
    return await verified_twilio_form(request, runtime, token)


def _flow(runtime: Runtime, policy: str) -> Flow:
    return policy_flows(runtime.config).get(policy) or default_ack_flow(runtime.settings)


def _xml(step: twiml.TwimlStep) -> Response:
    return Response(step.xml, media_type="application/xml")


def _goodbye(text: str) -> Response:
    return _xml(twiml.TwimlStep(twiml.spoken_goodbye(text)))


async def _variables(runtime: Runtime, alert_id: str) -> dict[str, str] | None:
    """The alert as the flow speaks it; None when it is gone or no longer open."""
    found = await runtime.engine.get_alert(alert_id)
    if found is None or found[0].state != AlertState.TRIGGERED.value:
        return None
    alert = found[0]
    return {
        "alert_severity": alert.severity,
        "alert_title": alert.title,
        "alert_summary": alert.summary,
    }


def _action_url(runtime: Runtime, context: Mapping[str, str]) -> twiml.ActionUrl:
    if not runtime.settings.public_url:
        raise HTTPException(404, "ACKLINE_PUBLIC_URL is not set")
    answer_url, _status = voice_webhook_urls(runtime.settings.public_url)

    def url(state: twiml.MenuState) -> str:
        return f"{answer_url}/gather?{urlencode({**context, **state.query()})}"

    return url


def _context(request: Request) -> dict[str, str]:
    query = request.query_params
    missing = [k for k in CONTEXT_KEYS if not query.get(k)]
    if missing:
        raise HTTPException(400, f"missing query parameter(s): {', '.join(missing)}")
    return {k: query[k] for k in CONTEXT_KEYS}


async def _report(events: CallEvents, form: Mapping[str, str], step: twiml.TwimlStep) -> None:
    """Tell the placing process what the flow decided (a key, acknowledged, machine...)."""
    outcome = next((o for o in step.outcomes if o in EARLY_OUTCOMES), None)
    outcome = outcome or (step.outcomes[-1] if step.outcomes else "")
    if not (step.digit or outcome):
        return
    report: dict[str, Any] = {"kind": "gather", "digit": step.digit or "", "outcome": outcome}
    report["decided"] = "1" if outcome in EARLY_OUTCOMES else ""
    await events.publish(form.get("CallSid", ""), report)


@router.post("", response_class=Response)
async def answered(request: Request, runtime: RuntimeDep) -> Response:
    """The callee picked up: the flow from its start (AMD verdict in AnsweredBy)."""
    events = _events(request)
    form = await _form(request, runtime)
    context = _context(request)
    variables = await _variables(runtime, context["alert"])
    if variables is None:
        return _goodbye("This alert has already been handled. Goodbye.")
    flow = _flow(runtime, context["policy"])
    step = twiml.answer(
        flow, variables, _action_url(runtime, context), answered_by=form.get("AnsweredBy", "")
    )
    await _report(events, form, step)
    return _xml(step)


@router.post("/gather", response_class=Response)
async def gathered(request: Request, runtime: RuntimeDep) -> Response:
    """A menu's key (or none, in time): where the flow goes next."""
    events = _events(request)
    form = await _form(request, runtime)
    context = _context(request)
    try:
        state = twiml.MenuState.parse(request.query_params)
    except (KeyError, ValueError):
        raise HTTPException(400, "missing or malformed menu state") from None
    variables = await _variables(runtime, context["alert"])
    if variables is None:
        return _goodbye("This alert has already been handled. Goodbye.")
    flow = _flow(runtime, context["policy"])
    try:
        step = twiml.gather(
            flow, variables, _action_url(runtime, context), state, form.get("Digits", "")
        )
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    await _report(events, form, step)
    return _xml(step)


@router.post("/status", status_code=204, response_class=Response)
async def status(request: Request, runtime: RuntimeDep) -> Response:
    """Call progress (initiated, ringing, in-progress, completed, busy, no-answer...)."""
    events = _events(request)
    form = await _form(request, runtime)
    if form.get("CallSid"):
        await events.publish(form["CallSid"], form)
    return Response(status_code=204)
