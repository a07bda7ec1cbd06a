"""The sans-IO decision core: given an alert's chain state and one event, what happens next.

Nothing here touches a clock, a database or a channel: the runner feeds events (start,
step timer, delivery outcome, cap timer, ack/resolve) and applies the returned actions in
one transaction. That keeps every rule of escalation in one place and unit-testable, and
makes the audit trail a direct consequence of decisions.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timedelta
from typing import Any, assert_never

from escalation.channels.base import ContactPoint, DeliveryStatus
from escalation.config import (
    CHANNEL_CONTACT_FIELD,
    CONTACT_FIELDS,
    Policy,
    RateLimit,
    Recipient,
    RetryPolicy,
)
from escalation.schedules import OnCall
from storage.models import AlertState

# ---------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Target:
    recipient_id: str
    channel: str


@dataclass(frozen=True)
class PlanStep:
    targets: tuple[Target, ...]
    delay: float
    # paged on `channels`: whoever is on call when the step fires (resolved by the caller)
    schedules: tuple[str, ...] = ()
    # the step's channels, kept so a reassigned chain pages its new target the same way
    # (snapshots from before they were stored: the channels their targets use)
    channels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """A policy resolved against recipients and groups, snapshotted when the alert starts,
    so an edit to a policy never changes a chain already running."""

    policy: str
    steps: tuple[PlanStep, ...]
    repeat: int
    max_duration: float
    max_notifications: int
    retry: Mapping[str, RetryPolicy]
    contacts: Mapping[str, ContactPoint]
    # bumped when the alert is reassigned: the plan caches key on it (plans are
    # otherwise immutable per alert)
    revision: int = 0
    snooze: float | None = None  # seconds a callee's snooze pauses the chain; None: off

    @property
    def schedules(self) -> tuple[str, ...]:
        """Every schedule a step pages, once each."""
        return tuple(dict.fromkeys(n for s in self.steps for n in s.schedules))

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "steps": [_step_json(s) for s in self.steps],
            "repeat": self.repeat,
            "max_duration": self.max_duration,
            "max_notifications": self.max_notifications,
            "retry": {ch: r.model_dump(mode="json") for ch, r in self.retry.items()},
            # unset contact fields are left out: a release that predates a field can
            # still read the plan during a rolling deploy
            "contacts": {
                rid: {k: v for k, v in asdict(c).items() if v is not None}
                for rid, c in self.contacts.items()
            },
            "revision": self.revision,
            "snooze": self.snooze,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        return cls(
            policy=data["policy"],
            steps=tuple(_step_from_json(s) for s in data["steps"]),
            repeat=int(data["repeat"]),
            max_duration=float(data["max_duration"]),
            max_notifications=int(data["max_notifications"]),
            retry={ch: RetryPolicy.model_validate(r) for ch, r in data["retry"].items()},
            contacts={rid: ContactPoint(**c) for rid, c in data["contacts"].items()},
            revision=int(data.get("revision", 0)),
            snooze=data.get("snooze"),
        )

    def reassigned(self, contacts: Sequence[ContactPoint]) -> Plan:
        """The same steps (channels, delays), repeats, caps and retries for other people."""
        steps = tuple(
            replace(s, targets=tuple(Target(c.recipient_id, ch) for c in contacts
                                     for ch in s.channels))
            for s in self.steps
        )  # fmt: skip
        return replace(
            self,
            steps=steps,
            contacts={c.recipient_id: c for c in contacts},
            revision=self.revision + 1,
        )

    def recipients(self) -> list[str]:
        """Who the plan pages, in order of first appearance."""
        return list(dict.fromkeys(t.recipient_id for s in self.steps for t in s.targets))

    def address(self, recipient_id: str, channel: str) -> str | None:
        contact = self.contacts.get(recipient_id)
        if contact is None or channel not in CHANNEL_CONTACT_FIELD:
            return None
        value = getattr(contact, CHANNEL_CONTACT_FIELD[channel])
        return None if value is None else str(value)


def _step_json(step: PlanStep) -> dict[str, Any]:
    data: dict[str, Any] = {
        "targets": [[t.recipient_id, t.channel] for t in step.targets], "delay": step.delay,
        "channels": list(step.channels),
    }  # fmt: skip
    if step.schedules:  # absent otherwise: plans without schedules read as they always did
        data["schedules"] = list(step.schedules)
    return data


def _step_from_json(data: Mapping[str, Any]) -> PlanStep:
    targets = tuple(Target(r, c) for r, c in data["targets"])
    channels = data.get("channels") or dict.fromkeys(t.channel for t in targets)
    return PlanStep(
        targets, float(data["delay"]), schedules=tuple(data.get("schedules", ())),
        channels=tuple(channels),
    )  # fmt: skip


def build_plan(
    policy: Policy,
    recipients: Mapping[str, Recipient],
    groups: Mapping[str, Sequence[str]],
    channel_defaults: Mapping[str, RetryPolicy],
    rotas: Mapping[str, Sequence[str]] | None = None,
) -> Plan:
    """Expand groups into recipients (in order, without duplicates) for every step.

    `rotas` lists, per schedule, who it may put on call: their contacts go in the snapshot
    so the person on call when a step fires can be reached."""
    steps = []
    used: dict[str, Recipient] = {}
    for step in policy.steps:
        ids: list[str] = []
        for rid in [*step.recipients, *(m for g in step.groups for m in groups.get(g, ()))]:
            if rid in recipients and rid not in ids:
                ids.append(rid)
                used[rid] = recipients[rid]
        for name in step.schedules:
            for rid in (rotas or {}).get(name, ()):
                if rid in recipients:
                    used[rid] = recipients[rid]
        targets = tuple(Target(rid, ch) for rid in ids for ch in step.channels)
        steps.append(PlanStep(targets, step.delay, schedules=tuple(step.schedules),
                              channels=tuple(step.channels)))  # fmt: skip
    return Plan(
        policy=policy.name,
        steps=tuple(steps),
        repeat=policy.repeat,
        max_duration=policy.max_duration,
        max_notifications=policy.max_notifications,
        retry=policy.retry_for(channel_defaults),
        contacts={rid: contact_point(r) for rid, r in used.items()},
        snooze=policy.snooze,
    )


def contact_point(r: Recipient) -> ContactPoint:
    contacts: dict[str, Any] = {name: getattr(r, name) for name in CONTACT_FIELDS}
    return ContactPoint(recipient_id=r.id, name=r.name, **contacts)


# ---------------------------------------------------------------------------- chain state

PENDING = "pending"  # scheduled or in flight
DELIVERED = "delivered"  # handed over; a late failure report may still reopen it
DONE = "done"


@dataclass
class NotifState:
    recipient_id: str
    channel: str
    attempt: int
    round: int
    step: int
    status: str = PENDING


@dataclass
class Chain:
    """Where an alert's escalation stands; stored as JSON on the alert row."""

    next_round: int = 0
    next_step: int = 0
    sent: int = 0  # notifications dispatched so far, for max_notifications
    policy_done: bool = False  # the last step's delay has elapsed
    notifs: dict[str, NotifState] = field(default_factory=dict)
    # set while a callee's snooze holds the chain (ISO time the step fires again)
    snoozed_until: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "next_round": self.next_round,
            "next_step": self.next_step,
            "sent": self.sent,
            "policy_done": self.policy_done,
            "notifs": {k: vars(n).copy() for k, n in self.notifs.items()},
            "snoozed_until": self.snoozed_until,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Chain:
        if not data:
            return cls()
        return cls(
            next_round=data["next_round"],
            next_step=data["next_step"],
            sent=data["sent"],
            policy_done=data["policy_done"],
            notifs={k: NotifState(**v) for k, v in data["notifs"].items()},
            snoozed_until=data.get("snoozed_until"),
        )

    def pending(self) -> bool:
        return any(n.status == PENDING for n in self.notifs.values())

    def copy(self) -> Chain:
        """An independent copy (its states are flat records: copying each is deep enough;
        `copy.deepcopy` cost a tenth of an ingest's CPU)."""
        return replace(self, notifs={k: replace(n) for k, n in self.notifs.items()})


# ---------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Start:
    pass


@dataclass(frozen=True)
class StepTimer:
    round: int
    step: int


@dataclass(frozen=True)
class CapTimer:
    pass


@dataclass(frozen=True)
class Outcome:
    notification_id: str
    attempt: int
    status: DeliveryStatus
    reason: str


@dataclass(frozen=True)
class Close:
    state: AlertState  # ACKNOWLEDGED or RESOLVED
    actor: str
    reason: str = ""


@dataclass(frozen=True)
class EscalateNow:
    """Someone asked for the next step now (the API; on the phone it is an Outcome)."""

    actor: str
    reason: str = ""


@dataclass(frozen=True)
class Reassign:
    """Hand the alert to other people: `plan` is the alert's plan for them
    (`Plan.reassigned`); `groups` only say, for the audit, how they were asked for."""

    plan: Plan
    actor: str
    groups: tuple[str, ...] = ()


Event = Start | StepTimer | CapTimer | Outcome | Close | EscalateNow | Reassign

# ---------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Dispatch:
    """Create attempt `attempt` of notification `notification_id`, due at `due_at`."""

    notification_id: str
    recipient_id: str
    channel: str
    attempt: int
    round: int
    step: int
    due_at: datetime
    reason: str


@dataclass(frozen=True)
class ScheduleStep:
    round: int
    step: int
    due_at: datetime


@dataclass(frozen=True)
class ScheduleCap:
    due_at: datetime


@dataclass(frozen=True)
class Transition:
    state: AlertState
    actor: str
    reason: str


class CancelScope(enum.StrEnum):
    """What a CancelAll ends (its value is the cancelled attempts' reason)."""

    ALERT = "alert_closed"  # the alert closed: its sends stop, later ones are not placed
    CHAIN = "reassigned"  # the chain was handed on: only what it had under way stops
    # a callee snoozed: what was under way stops, the cap keeps running (a snooze is no
    # way around max_duration)
    SNOOZE = "snoozed"


@dataclass(frozen=True)
class CancelAll:
    """Cancel every scheduled notification and timer; hang up the in-flight ones."""

    reason: str
    scope: CancelScope = CancelScope.ALERT


@dataclass(frozen=True)
class Audit:
    event: str
    status: str
    reason: str = ""
    notification_id: str | None = None
    channel: str | None = None
    attempt: int | None = None
    recipient_id: str | None = None
    round: int | None = None
    step: int | None = None
    actor: str | None = None
    extra: Mapping[str, Any] | None = None  # fields only some events have

    def record(self) -> dict[str, Any]:
        # flat fields: a plain dict of them (`asdict` copies each value recursively)
        data = {f.name: getattr(self, f.name) for f in _AUDIT_FIELDS}
        data["notification_uuid"] = data.pop("notification_id")
        if self.extra:
            data |= self.extra
        return data


_AUDIT_FIELDS = [f for f in fields(Audit) if f.name != "extra"]

Action = Dispatch | ScheduleStep | ScheduleCap | Transition | CancelAll | Audit


@dataclass
class Decision:
    chain: Chain
    actions: list[Action]
    plan: Plan | None = None  # the alert's new plan, when the event replaced it


# ---------------------------------------------------------------------------- the rules

_FAILED = {
    DeliveryStatus.FAILED_RETRYABLE,
    DeliveryStatus.FAILED_PERMANENT,
    DeliveryStatus.NOT_ACKNOWLEDGED,
}
_OPEN = {AlertState.TRIGGERED}
_CLOSES = {
    DeliveryStatus.ACKNOWLEDGED: AlertState.ACKNOWLEDGED,
    DeliveryStatus.RESOLVED: AlertState.RESOLVED,
}


class _Decider:
    def __init__(
        self,
        state: AlertState,
        plan: Plan,
        chain: Chain,
        now: datetime,
        new_id: Callable[[], str],
        oncall: Mapping[str, OnCall],
    ) -> None:
        self.state = state
        self.plan = plan
        self.new_plan: Plan | None = None
        self.chain = chain.copy()
        self.now = now
        self.new_id = new_id
        self.oncall = oncall
        self.actions: list[Action] = []

    # -- helpers

    def _after(self, round_: int, step: int) -> tuple[int, int]:
        if step + 1 < len(self.plan.steps):
            return round_, step + 1
        return round_ + 1, 0

    def _ended(self, round_: int) -> bool:
        return round_ > self.plan.repeat

    def _exhaust(self, reason: str) -> None:
        self.actions += [
            Transition(AlertState.EXHAUSTED, "engine", reason),
            CancelAll(reason),
            Audit("exhausted", AlertState.EXHAUSTED.value, reason, actor="engine"),
        ]
        self.state = AlertState.EXHAUSTED
        for n in self.chain.notifs.values():
            if n.status == PENDING:
                n.status = DONE

    def _maybe_finish(self) -> None:
        if self.state in _OPEN and self.chain.policy_done and not self.chain.pending():
            self._exhaust("policy_end")

    def _dispatch(self, nid: str, n: NotifState, delay: float, reason: str) -> None:
        if self.chain.sent >= self.plan.max_notifications:
            self._exhaust("cap_notifications")
            return
        self.chain.sent += 1
        self.chain.notifs[nid] = n
        due = self.now + timedelta(seconds=delay)
        self.actions.append(
            Dispatch(nid, n.recipient_id, n.channel, n.attempt, n.round, n.step, due, reason)
        )
        self.actions.append(
            Audit(
                "scheduled", "scheduled", reason, nid, n.channel, n.attempt,
                n.recipient_id, n.round, n.step,
            )
        )  # fmt: skip

    def _fire(self, round_: int, step: int, why: str) -> None:
        """Notify every target of the step at once, then arm the timer for what follows."""
        if self._ended(round_):
            self.chain.policy_done = True
            self.actions.append(Audit("policy_end", "policy_end", why, round=round_))
            self._maybe_finish()
            return
        plan_step = self.plan.steps[step]
        if self.chain.snoozed_until is not None:  # any step that fires ends a snooze
            self.chain.snoozed_until = None
            why = f"{why}:snooze_over" if why == "timer" else why
        self.actions.append(Audit("step", "fired", why, round=round_, step=step))
        nxt = self._after(round_, step)
        self.chain.next_round, self.chain.next_step = nxt
        for t in self._targets(plan_step, round_, step):
            if self.state not in _OPEN:
                return
            if self.plan.address(t.recipient_id, t.channel) is None:
                self.actions.append(
                    Audit("skipped", "skipped", "no_contact", channel=t.channel,
                          recipient_id=t.recipient_id, round=round_, step=step)
                )  # fmt: skip
                continue
            n = NotifState(t.recipient_id, t.channel, 1, round_, step)
            self._dispatch(self.new_id(), n, 0.0, f"step:{round_}.{step}")
        if self.state in _OPEN:
            self.actions.append(
                ScheduleStep(nxt[0], nxt[1], self.now + timedelta(seconds=plan_step.delay))
            )

    def _targets(self, plan_step: PlanStep, round_: int, step: int) -> list[Target]:
        """`step_targets`, with who the schedules chose audited (schedule, layer and
        override that chose them)."""
        for name in plan_step.schedules:
            on = self.oncall.get(name, OnCall((), None))
            self.actions.append(
                Audit("oncall", "chosen" if on.recipients else "nobody", f"schedule:{name}",
                      recipient_id=on.recipients[0] if on.recipients else None,
                      round=round_, step=step,
                      extra={"schedule": name, "layer": on.layer,
                             "override": on.override.id if on.override else None})
            )  # fmt: skip
        return step_targets(plan_step, self.oncall)

    def _fallback(self, nid: str, n: NotifState, why: str) -> None:
        n.status = DONE
        policy = self.plan.retry.get(n.channel)
        fb = policy.fallback_channel if policy else None
        while fb is not None and self.plan.address(n.recipient_id, fb) is None:
            self.actions.append(
                Audit("fallback_skipped", "skipped", f"no_contact:{fb}", nid, fb,
                      recipient_id=n.recipient_id, round=n.round, step=n.step)
            )  # fmt: skip
            nxt = self.plan.retry.get(fb)
            fb = nxt.fallback_channel if nxt else None
        if fb is None:
            self.actions.append(
                Audit("channel_exhausted", "gave_up", why, nid, n.channel, n.attempt,
                      n.recipient_id, n.round, n.step)
            )  # fmt: skip
            self._maybe_finish()
            return
        new = NotifState(n.recipient_id, fb, 1, n.round, n.step)
        new_id = self.new_id()
        self.actions.append(
            Audit("fallback", "fallback", f"{n.channel}->{fb}:{why}", nid, n.channel,
                  n.attempt, n.recipient_id, n.round, n.step)
        )  # fmt: skip
        self._dispatch(new_id, new, 0.0, f"fallback:{n.channel}:{why}")

    # -- events

    def start(self, why: str = "start") -> None:
        self.actions.append(ScheduleCap(self.now + timedelta(seconds=self.plan.max_duration)))
        self._fire(0, 0, why)

    def escalate(self, audit: Audit) -> None:
        """Fire the next step now; its timer, already armed, then finds itself stale."""
        self.actions.append(audit)
        self._fire(self.chain.next_round, self.chain.next_step, "escalate")

    def reassign(self, ev: Reassign) -> None:
        """End the running chain (its late outcomes then match nothing) and start the
        new plan's from its first step, with its own caps and timers."""
        extra = {"from": self.plan.recipients(), "to": ev.plan.recipients(),
                 "groups": list(ev.groups)}  # fmt: skip
        self.actions += [
            CancelAll(CancelScope.CHAIN.value, CancelScope.CHAIN),
            Audit("reassigned", "reassigned", CancelScope.CHAIN.value, actor=ev.actor,
                  extra=extra),
        ]  # fmt: skip
        self.plan = self.new_plan = ev.plan
        self.chain = Chain()
        self.start("reassign")

    def snooze(self, n: NotifState, audit: Audit) -> None:
        """Pause the chain: what is pending stops, and the snoozer's step fires again
        (the same targets, then the steps after it) once the snooze is over. The alert
        stays open; an ack, a resolve or an escalation still acts at once."""
        seconds = self.plan.snooze
        assert seconds is not None
        until = self.now + timedelta(seconds=seconds)
        self.actions += [
            CancelAll(CancelScope.SNOOZE.value, CancelScope.SNOOZE),
            replace(audit, extra={"until": until.isoformat(), "seconds": seconds}),
            ScheduleStep(n.round, n.step, until),
        ]
        for other in self.chain.notifs.values():
            if other.status == PENDING:
                other.status = DONE
        self.chain.next_round, self.chain.next_step = n.round, n.step
        self.chain.policy_done = False
        self.chain.snoozed_until = until.isoformat()

    def step_timer(self, ev: StepTimer) -> None:
        if (ev.round, ev.step) != (self.chain.next_round, self.chain.next_step):
            return  # an escalation already fired this step: the timer is stale
        self._fire(ev.round, ev.step, "timer")

    def outcome(self, ev: Outcome) -> None:
        n = self.chain.notifs.get(ev.notification_id)
        if n is None or n.attempt != ev.attempt:
            return
        late_failure = n.status == DELIVERED and ev.status in _FAILED
        if n.status != PENDING and not late_failure:
            return
        where = (ev.notification_id, n.channel, n.attempt, n.recipient_id, n.round, n.step)
        nid = ev.notification_id
        actor = f"{n.channel}:{n.recipient_id}"
        match ev.status:
            case DeliveryStatus.ACKNOWLEDGED | DeliveryStatus.RESOLVED:
                n.status = DONE
                self.close(Close(_CLOSES[ev.status], actor, ev.reason))
            case DeliveryStatus.DELIVERED:
                n.status = DELIVERED
                self._maybe_finish()
            case DeliveryStatus.ESCALATE:
                n.status = DONE
                self.escalate(Audit("escalate", "escalate", ev.reason, *where))
            case DeliveryStatus.SNOOZE if self.plan.snooze is not None:
                n.status = DONE
                self.snooze(n, Audit("snoozed", "snoozed", ev.reason, *where, actor=actor))
            case DeliveryStatus.CANCELLED:
                n.status = DONE
                self._maybe_finish()
            case DeliveryStatus.FAILED_PERMANENT:
                self._fallback(nid, n, ev.reason)
            case (
                DeliveryStatus.FAILED_RETRYABLE
                | DeliveryStatus.NOT_ACKNOWLEDGED
                | DeliveryStatus.SNOOZE  # the policy no longer snoozes: keep paging
            ):
                self._retry(nid, n, ev, where)
            case _:
                assert_never(ev.status)

    def _retry(self, nid: str, n: NotifState, ev: Outcome, where: tuple[Any, ...]) -> None:
        """Try the same channel again after its delay, or fall back when it is used up."""
        policy = self.plan.retry.get(n.channel)
        retryable = policy is not None and n.attempt < policy.attempts
        if retryable and ev.status is DeliveryStatus.FAILED_RETRYABLE and policy:
            retryable = policy.retries(ev.reason)
        if not retryable or policy is None:
            self._fallback(nid, n, ev.reason)
            return
        n.status = DONE
        delay = policy.delay(n.attempt)
        self.actions.append(Audit("retry", "retry", f"{ev.reason}:in_{delay:g}s", *where))
        retry = NotifState(n.recipient_id, n.channel, n.attempt + 1, n.round, n.step)
        self._dispatch(nid, retry, delay, f"retry:{ev.reason}")

    def cap(self) -> None:
        self._exhaust("cap_duration")

    def close(self, ev: Close) -> None:
        allowed = {
            AlertState.ACKNOWLEDGED: {AlertState.TRIGGERED, AlertState.EXHAUSTED},
            AlertState.RESOLVED: {
                AlertState.TRIGGERED, AlertState.ACKNOWLEDGED, AlertState.EXHAUSTED,
            },
        }[ev.state]  # fmt: skip
        if self.state not in allowed:
            self.actions.append(
                Audit("ignored", ev.state.value, f"already_{self.state.value}", actor=ev.actor)
            )
            return
        was_open = self.state in _OPEN
        self.state = ev.state
        self.actions.append(Transition(ev.state, ev.actor, ev.reason))
        if was_open:
            self.chain.snoozed_until = None
            self.actions.append(CancelAll(ev.state.value))
            for n in self.chain.notifs.values():
                if n.status == PENDING:
                    n.status = DONE
        event = "ack" if ev.state is AlertState.ACKNOWLEDGED else "resolve"
        self.actions.append(Audit(event, ev.state.value, ev.reason, actor=ev.actor))


def decide(
    state: AlertState,
    plan: Plan,
    chain: Chain,
    event: Event,
    now: datetime,
    new_id: Callable[[], str],
    oncall: Mapping[str, OnCall] | None = None,
) -> Decision:
    """Apply one event to an alert; returns the new chain state and what to do.

    Only `Close` acts on a closed alert: a timer or an outcome arriving after the ack
    changes nothing, which is what makes "nothing fires after the ack" hold. `oncall`
    says who the plan's schedules have on call at `now`, for an event that may fire a
    step (`may_fire_step`).
    """
    d = _Decider(state, plan, chain, now, new_id, oncall or {})
    if isinstance(event, Close):
        d.close(event)
    elif state in _OPEN:
        match event:
            case Start():
                d.start()
            case StepTimer():
                d.step_timer(event)
            case CapTimer():
                d.cap()
            case Outcome():
                d.outcome(event)
            case EscalateNow():
                d.escalate(Audit("escalate", "escalate", event.reason, actor=event.actor))
            case Reassign():
                d.reassign(event)
            case _:
                assert_never(event)
    return Decision(d.chain, d.actions, d.new_plan)


def step_targets(plan_step: PlanStep, oncall: Mapping[str, OnCall]) -> list[Target]:
    """Who a step pages: its fixed targets, then whoever its schedules have on call (each
    recipient and channel once)."""
    targets = list(plan_step.targets)
    for name in plan_step.schedules:
        for rid in oncall[name].recipients if name in oncall else ():
            targets += [t for ch in plan_step.channels if (t := Target(rid, ch)) not in targets]
    return targets


def may_fire_step(event: Event) -> bool:
    """Whether the event can fire a step (so its caller should say who is on call)."""
    if isinstance(event, Outcome):
        return event.status is DeliveryStatus.ESCALATE
    return isinstance(event, Start | StepTimer)


def rate_limit_release(
    recent_sends: Sequence[datetime], limit: RateLimit, now: datetime
) -> datetime | None:
    """None if one more notification fits in the window, else when the next slot opens."""
    window = timedelta(seconds=limit.window)
    inside = sorted(t for t in recent_sends if t > now - window)
    if len(inside) < limit.max:
        return None
    return inside[len(inside) - limit.max] + window
