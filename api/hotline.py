"""The inbound hotline: callers on a number (DID) run that number's flow, and its
escalate and bridge nodes go into the same escalation engine as every other alert.

Only trusted carrier addresses may call in (others get 403 and an audit line), INVITE
floods are cut off per source, a recording made by the flow is attached to the alert it
raises, and the caller can be put through to the policy's first responders.

Wiring of the ivr flows' hooks to the escalation engine, so it lives in api: escalation
and ivr do not import each other.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from api.voice_channel import Dialer
from escalation.alert_input import AlertIn
from escalation.audit import AuditLog
from escalation.audit_records import RequestContext
from escalation.config import (
    AcklineConfig,
    HotlineConfig,
    TrustedSource,
    hotline_sources_from_carriers,
)
from escalation.engine import Engine
from escalation.plan_cache import UnknownPolicy
from gateway.admission import InboundGuard, RefusalReport, TrustedTrunk
from gateway.bridge import bridge_calls
from gateway.call import Call, Gateway
from ivr.builtin import hotline_flow
from ivr.flow import Flow, load_flow
from ivr.recordings import expire_recordings
from ivr.runner import FlowContext, FlowRunner

__all__ = ["HOTLINE_API_KEY", "Hotline", "build_guard"]

logger = logging.getLogger(__name__)

HOTLINE_API_KEY = "hotline"  # idempotency namespace of alerts raised by calls


def build_guard(hotline: HotlineConfig, config: AcklineConfig) -> InboundGuard:
    """The ACL (hotline.trusted, or the carriers' IP trunk hosts) and the flood limit."""
    sources: list[TrustedSource] = (
        hotline.trusted if hotline.trusted is not None else hotline_sources_from_carriers(config)
    )
    trunks = []
    for source in sources:
        users: dict[str, str] = {}
        if source.username is not None and source.password_env is not None:
            password = os.environ.get(source.password_env)
            if password is None:
                raise ValueError(f"hotline.trusted {source.name}: {source.password_env} is not set")
            users[source.username] = password
        trunks.append(TrustedTrunk.parse(source.name, source.sources, users=users))
    return InboundGuard(trunks, rate=hotline.invite_rate, burst=hotline.invite_burst)


class Hotline:
    """Answers inbound calls with flows; implements the flows' hooks (ivr.FlowHooks)."""

    def __init__(
        self,
        config: AcklineConfig,
        engine: Engine,
        audit: AuditLog,
        gateway: Gateway,
        *,
        dialer: Dialer | None = None,
    ) -> None:
        if config.hotline is None:
            raise ValueError("no hotline: section in the configuration")
        self.config = config
        self.hotline = config.hotline
        self.engine = engine
        self.audit = audit
        self.gateway = gateway
        self.dialer = dialer
        self.guard = build_guard(self.hotline, config)
        self.recordings = self.hotline.recordings_dir
        self._flows: dict[str, Flow] = {}
        for number in self.hotline.numbers.values():  # a broken flow file fails at start
            self._flow(number.flow)

    def _flow(self, name: str) -> Flow:
        if name not in self._flows:
            self._flows[name] = hotline_flow() if name == "hotline" else load_flow(Path(name))
        return self._flows[name]

    # -- the gateway's hooks -----------------------------------------------------------

    async def on_incoming(self, call: Call) -> None:
        did = call.dialed
        number = self.hotline.number_for(did)
        if number is None:
            logger.info("hotline: no flow for %s; hanging up", did)
            return
        runner = FlowRunner(self._flow(number.flow), self, recordings_dir=self.recordings)
        result = await runner.run(call, {"policy": number.policy, "did": did})
        self.audit.write(
            self.config.company,
            [
                {
                    "event": "hotline_call",
                    "status": result.outcome,
                    "reason": result.ended_by,
                    "alert_id": result.variables.get("alert_id"),
                    "actor": f"hotline:{did}",
                    "ip": call.source_host,
                    "trunk": call.trunk,
                    "caller": result.variables.get("caller"),
                    "call_id": call.call_id,
                    "path": result.path,
                }
            ],
        )

    def on_refused(self, report: RefusalReport) -> None:
        """Refused INVITEs are part of the record (who, from where, why), without letting a
        flood write a line per INVITE: the gateway reports the first refusal of a source
        at once (with the caller, the number and the Call-ID) and the rest of the interval
        as one line whose ``count`` says how many."""
        self.audit.write(
            self.config.company,
            [
                {
                    "event": "inbound_refused",
                    "status": str(report.code),
                    "reason": str(report.reason),
                    "actor": "hotline",
                    "ip": report.source,
                    "trunk": report.trunk,
                    "count": report.count,
                    "caller": report.caller,
                    "dialed": report.dialed,
                    "call_id": report.call_id,
                }
            ],
        )

    # -- recordings ----------------------------------------------------------------------

    def expire_recordings(self, now: float | None = None) -> list[Path]:
        """Apply `recordings_retention` once; every deleted file is an audit line
        (`recording_deleted`, with the path an alert's details name)."""
        retention = self.hotline.recordings_retention
        if retention is None:
            return []

        def audited(path: Path) -> None:
            self.audit.write(self.config.company, [
                {"event": "recording_deleted", "status": "deleted", "reason": "retention",
                 "actor": "hotline", "recording": str(path)}
            ])  # fmt: skip

        at = time.time() if now is None else now
        return expire_recordings(self.recordings, retention, at, audited)

    async def keep_retention(self) -> None:
        """Expire recordings now and then every tenth of the retention period (at least
        every second, at most every hour) until cancelled."""
        retention = self.hotline.recordings_retention
        if retention is None:
            return
        interval = min(max(retention / 10, 1.0), 3600.0)
        while True:
            try:
                await asyncio.to_thread(self.expire_recordings)
            except OSError as exc:  # a full or unreadable disk must not stop the hotline
                logger.warning("hotline: expiring recordings failed: %s", exc)
            await asyncio.sleep(interval)

    # -- the flows' hooks (ivr.FlowHooks) ------------------------------------------------

    async def escalate(
        self, ctx: FlowContext, policy: str, variables: Mapping[str, str]
    ) -> str | None:
        caller = variables.get("caller", "unknown caller")
        did = variables.get("did", ctx.call.dialed)
        details: dict[str, Any] = {"source": "hotline", "caller": caller, "did": did}
        if variables.get("recording"):
            details["recording"] = variables["recording"]
            details["recording_seconds"] = variables.get("recording_seconds", "")
        body = AlertIn(
            title=f"Hotline call from {caller}",
            summary=f"{caller} called {did} and reported an outage.",
            severity="critical",
            policy=policy,
            details=details,
        )
        request = RequestContext(actor=f"hotline:{did}", ip=ctx.call.source_host)
        result = await self.engine.ingest(
            self.config.company, HOTLINE_API_KEY, f"call:{ctx.call.call_id}", body, request
        )
        return result.alert.id

    async def webhook(self, ctx: FlowContext, url: str, variables: Mapping[str, str]) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.post(url, json=dict(variables))
            response.raise_for_status()

    async def bridge(self, ctx: FlowContext, target: str, ring_timeout: float) -> bool:
        """`oncall:<policy>` tries the policy's first responders' phones in turn; a SIP URI
        or a number is dialed as it is."""
        if target.startswith("oncall:"):
            try:
                people = await self.engine.first_responders(self.config.company, target[7:])
            except UnknownPolicy:
                logger.warning("hotline: bridge to unknown policy %s", target)
                return False
            numbers = [p.phone for p in people if p.phone]
        else:
            numbers = [target]
        for number in numbers:
            if ctx.call.ended.is_set():
                return False
            callee = await self._dial(number, ring_timeout)
            if callee is None:
                continue
            if callee.answered and not ctx.call.ended.is_set():
                await bridge_calls(ctx.call, callee)
                return True
            if not callee.ended.is_set():
                await callee.hangup()
        return False

    async def _dial(self, target: str, ring_timeout: float) -> Call | None:
        try:
            if target.lower().startswith(("sip:", "sips:")) or self.dialer is None:
                return await self.gateway.dial(target, ring_timeout=ring_timeout)
            dialed = await self.dialer.dial(
                target, ring_timeout=ring_timeout, on_call=_ignore, needs_media=True
            )
            if not isinstance(dialed.call, Call):  # a dialer ignoring needs_media: refuse it
                await dialed.call.hangup()
                raise OSError("the route gave a call without media; bridging needs SIP")
            return dialed.call
        except (OSError, ValueError) as exc:
            logger.info("hotline: cannot reach %s: %s", target, exc)
            return None


def _ignore(_call: object) -> None:
    return None
