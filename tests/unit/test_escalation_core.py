"""The decision core, driven by a tiny discrete-event simulator (no IO, no sleeps)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from escalation.channels.base import DeliveryStatus as S
from escalation.config import Policy, RateLimit, Recipient
from escalation.core import (
    Audit,
    CancelAll,
    CancelScope,
    CapTimer,
    Chain,
    Close,
    Dispatch,
    EscalateNow,
    Event,
    Outcome,
    Plan,
    Reassign,
    ScheduleCap,
    ScheduleStep,
    Start,
    StepTimer,
    Transition,
    build_plan,
    decide,
    rate_limit_release,
)
from storage.models import AlertState

T0 = datetime(2030, 1, 1, tzinfo=UTC)
ALICE = Recipient(id="alice", name="A", phone="+14155550101", telegram_chat_id="42")
BOB = Recipient(id="bob", name="B", phone="+14155550102", email="bob@example.com")


def plan_of(**policy: object) -> Plan:
    spec = {"name": "p", "steps": [{"recipients": ["alice"], "channels": ["voice"]}], **policy}
    return build_plan(
        Policy.model_validate(spec), {"alice": ALICE, "bob": BOB}, {"team": ["alice", "bob"]}, {}
    )


Script = Callable[[Dispatch], tuple[S, str]]


@dataclass
class Sim:
    """Applies actions like the runner would: dispatches and timers go on a time queue."""

    plan: Plan
    script: Script
    now: datetime = T0
    state: AlertState = AlertState.TRIGGERED
    chain: Chain = field(default_factory=Chain)
    sent: list[tuple[float, Dispatch]] = field(default_factory=list)
    audit: list[Audit] = field(default_factory=list)
    queue: list[tuple[datetime, int, object]] = field(default_factory=list)
    cancelled: bool = False
    ids: itertools.count[int] = field(default_factory=itertools.count)
    seq: itertools.count[int] = field(default_factory=itertools.count)

    def feed(self, event: Event) -> None:
        d = decide(self.state, self.plan, self.chain, event, self.now, lambda: f"n{next(self.ids)}")
        self.chain = d.chain
        for a in d.actions:
            if isinstance(a, Dispatch):
                heapq.heappush(self.queue, (a.due_at, next(self.seq), a))
            elif isinstance(a, ScheduleStep):
                heapq.heappush(self.queue, (a.due_at, next(self.seq), StepTimer(a.round, a.step)))
            elif isinstance(a, ScheduleCap):
                heapq.heappush(self.queue, (a.due_at, next(self.seq), CapTimer()))
            elif isinstance(a, Transition):
                self.state = a.state
            elif isinstance(a, CancelAll):
                # a snooze keeps the cap timer: it is no way around max_duration
                keep = [q for q in self.queue if a.scope is CancelScope.SNOOZE
                        and isinstance(q[2], CapTimer)]  # fmt: skip
                self.queue[:] = keep
                heapq.heapify(self.queue)
                self.cancelled = True
            else:
                self.audit.append(a)

    def run(self, limit: int = 500) -> None:
        self.feed(Start())
        for _ in range(limit):
            if not self.queue:
                return
            due, _, item = heapq.heappop(self.queue)
            self.now = due
            if isinstance(item, Dispatch):
                self.sent.append(((due - T0).total_seconds(), item))
                status, reason = self.script(item)
                self.feed(Outcome(item.notification_id, item.attempt, status, reason))
            else:
                assert isinstance(item, StepTimer | CapTimer)
                self.feed(item)
        raise AssertionError("simulation did not finish")

    def path(self) -> list[tuple[float, str, str, int]]:
        return [(t, d.recipient_id, d.channel, d.attempt) for t, d in self.sent]


def always(status: S, reason: str = "x") -> Script:
    return lambda _d: (status, reason)


def test_start_fires_first_step_in_parallel_and_arms_timers() -> None:
    plan = plan_of(steps=[{"groups": ["team"], "channels": ["voice", "sms"], "delay": 60}])
    d = decide(AlertState.TRIGGERED, plan, Chain(), Start(), T0, iter("abcd").__next__)
    dispatches = [a for a in d.actions if isinstance(a, Dispatch)]
    assert [(a.recipient_id, a.channel, a.due_at) for a in dispatches] == [
        ("alice", "voice", T0), ("alice", "sms", T0), ("bob", "voice", T0), ("bob", "sms", T0)
    ]  # fmt: skip
    assert ScheduleCap(T0 + timedelta(hours=4)) in d.actions
    assert ScheduleStep(1, 0, T0 + timedelta(seconds=60)) in d.actions  # end of the only step
    assert d.chain.sent == 4


def test_voice_busy_falls_back_in_order_with_configured_backoff() -> None:
    sim = Sim(plan_of(steps=[{"recipients": ["alice"], "channels": ["voice"], "delay": 3600}]),
              always(S.FAILED_RETRYABLE, "busy"))  # fmt: skip
    sim.run()
    # voice 3x exponential 30s*2^n, then telegram_voice 2x linear 30s, then sms 2x linear 60s
    assert sim.path() == [
        (0, "alice", "voice", 1), (30, "alice", "voice", 2), (90, "alice", "voice", 3),
        (90, "alice", "telegram_voice", 1), (120, "alice", "telegram_voice", 2),
        (120, "alice", "sms", 1), (180, "alice", "sms", 2),
    ]  # fmt: skip
    assert [a.event for a in sim.audit if a.event in ("fallback", "channel_exhausted")] == [
        "fallback", "fallback", "channel_exhausted"
    ]  # fmt: skip
    assert sim.state is AlertState.EXHAUSTED  # the policy ended with nobody reached


def test_permanent_failure_skips_retries_and_missing_contacts() -> None:
    plan = plan_of(steps=[{"recipients": ["bob"], "channels": ["voice"], "delay": 10}])
    sim = Sim(plan, always(S.FAILED_PERMANENT, "sip_404"))
    sim.run()
    # bob has no telegram: telegram_voice is skipped, sms is next; permanent = no retries
    assert sim.path() == [(0, "bob", "voice", 1), (0, "bob", "sms", 1)]
    assert any(a.event == "fallback_skipped" and a.channel == "telegram_voice" for a in sim.audit)


def test_ack_cancels_everything_and_later_events_do_nothing() -> None:
    def script(d: Dispatch) -> tuple[S, str]:
        if d.channel == "sms":
            return S.ACKNOWLEDGED, "sms_reply"
        return S.FAILED_RETRYABLE, "busy"

    plan = plan_of(steps=[{"recipients": ["alice"], "channels": ["voice", "sms"]}], repeat=3)
    sim = Sim(plan, script)
    sim.run()
    assert sim.state is AlertState.ACKNOWLEDGED
    assert sim.cancelled
    assert sim.path() == [(0, "alice", "voice", 1), (0, "alice", "sms", 1)]
    after = decide(sim.state, plan, sim.chain, StepTimer(0, 0), sim.now, lambda: "z")
    assert after.actions == []
    again = decide(sim.state, plan, sim.chain, Close(AlertState.ACKNOWLEDGED, "u"), sim.now,
                   lambda: "z")  # fmt: skip
    assert [type(a) for a in again.actions] == [Audit]


def test_escalate_fires_next_step_now_and_old_timer_is_stale() -> None:
    def script(d: Dispatch) -> tuple[S, str]:
        return (S.ESCALATE, "dtmf_2") if d.recipient_id == "alice" else (S.DELIVERED, "ok")

    plan = plan_of(steps=[
        {"recipients": ["alice"], "channels": ["voice"], "delay": 300},
        {"recipients": ["bob"], "channels": ["sms"], "delay": 300},
    ])  # fmt: skip
    sim = Sim(plan, script)
    sim.run()
    assert sim.path() == [(0, "alice", "voice", 1), (0, "bob", "sms", 1)]
    steps = [(a.round, a.step, a.reason) for a in sim.audit if a.event == "step"]
    assert steps == [(0, 0, "start"), (0, 1, "escalate")]
    assert sim.state is AlertState.EXHAUSTED  # nobody acked by the end of the policy


def test_escalate_now_fires_the_next_step_like_pressing_2() -> None:
    plan = plan_of(steps=[
        {"recipients": ["alice"], "channels": ["voice"], "delay": 300},
        {"recipients": ["bob"], "channels": ["sms"], "delay": 300},
    ])  # fmt: skip
    started = decide(AlertState.TRIGGERED, plan, Chain(), Start(), T0, lambda: "n1")
    d = decide(AlertState.TRIGGERED, plan, started.chain, EscalateNow("carol", "api"), T0,
               lambda: "n2")  # fmt: skip
    audits = [(a.event, a.actor, a.step) for a in d.actions if isinstance(a, Audit)]
    assert audits[:2] == [("escalate", "carol", None), ("step", None, 1)]
    assert [(a.recipient_id, a.step) for a in d.actions if isinstance(a, Dispatch)] == [("bob", 1)]
    # alice's call still runs: escalating adds people, it does not hang up
    assert d.chain.notifs["n1"].status == "pending"
    # the step timer armed for (0, 1) is now stale
    stale = decide(AlertState.TRIGGERED, plan, d.chain, StepTimer(0, 1), T0, lambda: "n3")
    assert not [a for a in stale.actions if isinstance(a, Dispatch)]
    closed = decide(AlertState.ACKNOWLEDGED, plan, d.chain, EscalateNow("carol"), T0, lambda: "x")
    assert closed.actions == []


SNOOZE_PLAN = {
    "steps": [
        {"recipients": ["alice"], "channels": ["voice"], "delay": 300},
        {"recipients": ["bob"], "channels": ["sms"], "delay": 300},
    ],
    "retry": {"voice": {"attempts": 1}},
    "voice": {"snooze": "15m"},
}


def test_resolve_from_the_phone_closes_the_alert_as_the_callee() -> None:
    plan = plan_of(steps=[{"recipients": ["alice"], "channels": ["voice", "sms"]}])
    sim = Sim(plan, always(S.RESOLVED, "pressed_3"))  # fed by hand below, never run
    sim.feed(Start())
    _, _, call = heapq.heappop(sim.queue)
    assert isinstance(call, Dispatch)
    assert call.channel == "voice"
    sim.feed(Outcome(call.notification_id, 1, S.RESOLVED, "pressed_3"))
    assert sim.state is AlertState.RESOLVED
    assert sim.cancelled
    assert not sim.queue
    closes = [(a.event, a.status, a.actor, a.reason) for a in sim.audit if a.event == "resolve"]
    assert closes == [("resolve", "resolved", "voice:alice", "pressed_3")]
    assert all(n.status == "done" for n in sim.chain.notifs.values())  # the sms is stopped


def test_snooze_pauses_the_chain_and_fires_the_step_again_after_n_minutes() -> None:
    calls = itertools.count()

    def script(d: Dispatch) -> tuple[S, str]:
        if d.channel == "sms":
            return S.DELIVERED, "queued"
        return (S.SNOOZE, "pressed_4") if next(calls) == 0 else (S.NOT_ACKNOWLEDGED, "no_key")

    sim = Sim(plan_of(**SNOOZE_PLAN), script)
    sim.run()
    # without the snooze bob would be paged at 300 s; the chain waits 15 minutes instead,
    # then runs alice's step again and the steps after it on their usual delays
    assert sim.path() == [(0, "alice", "voice", 1), (900, "alice", "voice", 1),
                          (1200, "bob", "sms", 1)]  # fmt: skip
    [snoozed] = [a for a in sim.audit if a.event == "snoozed"]
    assert (snoozed.actor, snoozed.reason, snoozed.step) == ("voice:alice", "pressed_4", 0)
    until = (T0 + timedelta(minutes=15)).isoformat()
    assert snoozed.extra == {"until": until, "seconds": 900.0}
    steps = [(a.step, a.reason) for a in sim.audit if a.event == "step"]
    assert steps == [(0, "start"), (0, "timer:snooze_over"), (1, "timer")]
    assert sim.state is AlertState.EXHAUSTED
    assert sim.chain.snoozed_until is None


def test_snooze_cancels_what_is_pending_and_the_alert_stays_open() -> None:
    plan = plan_of(**{**SNOOZE_PLAN, "steps": [
        {"recipients": ["alice"], "channels": ["voice", "sms"], "delay": 300},
        {"recipients": ["bob"], "channels": ["sms"], "delay": 300},
    ]})  # fmt: skip
    started = decide(AlertState.TRIGGERED, plan, Chain(), Start(), T0, iter("ab").__next__)
    d = decide(AlertState.TRIGGERED, plan, started.chain, Outcome("a", 1, S.SNOOZE, "pressed_4"),
               T0, lambda: "z")  # fmt: skip
    until = T0 + timedelta(minutes=15)
    cancel, audit, timer = d.actions
    assert cancel == CancelAll("snoozed", CancelScope.SNOOZE)  # before the new timer
    assert isinstance(audit, Audit)
    assert audit.event == "snoozed"
    assert timer == ScheduleStep(0, 0, until)
    assert not [a for a in d.actions if isinstance(a, Transition)]
    assert {n.status for n in d.chain.notifs.values()} == {"done"}  # the sms to alice too
    assert d.chain.snoozed_until == until.isoformat()
    assert Chain.from_json(d.chain.to_json()) == d.chain
    # the step timer armed before the snooze is stale; late reports change nothing
    assert (
        decide(AlertState.TRIGGERED, plan, d.chain, StepTimer(0, 1), T0, lambda: "z").actions == []
    )
    late = Outcome("b", 1, S.ACKNOWLEDGED, "sms_reply")
    assert decide(AlertState.TRIGGERED, plan, d.chain, late, T0, lambda: "z").actions == []
    # an ack (web, API) during the snooze closes the alert at once
    acked = decide(AlertState.TRIGGERED, plan, d.chain, Close(AlertState.ACKNOWLEDGED, "carol"),
                   T0, lambda: "z")  # fmt: skip
    assert Transition(AlertState.ACKNOWLEDGED, "carol", "") in acked.actions
    assert acked.chain.snoozed_until is None
    # an escalation ends the snooze early: the step it held fires now
    esc = decide(AlertState.TRIGGERED, plan, d.chain, EscalateNow("carol"), T0, lambda: "z")
    assert [
        (a.step, a.reason) for a in esc.actions if isinstance(a, Audit) and a.event == "step"
    ] == [(0, "escalate")]
    assert esc.chain.snoozed_until is None


def test_snooze_does_not_outlive_the_cap() -> None:
    plan = plan_of(**{**SNOOZE_PLAN, "max_duration": "10m"})
    sim = Sim(plan, lambda d: (S.SNOOZE, "pressed_4"))
    sim.run()
    assert sim.path() == [(0, "alice", "voice", 1)]
    assert sim.state is AlertState.EXHAUSTED
    assert sim.now == T0 + timedelta(minutes=10)


def test_snooze_without_it_in_the_plan_keeps_paging() -> None:
    """A plan snapshotted before the policy offered snooze treats 4 as no ack."""
    plan = plan_of(**{**SNOOZE_PLAN, "voice": None})
    assert plan.snooze is None
    started = decide(AlertState.TRIGGERED, plan, Chain(), Start(), T0, lambda: "a")
    d = decide(AlertState.TRIGGERED, plan, started.chain, Outcome("a", 1, S.SNOOZE, "pressed_4"),
               T0, lambda: "z")  # fmt: skip
    assert not [a for a in d.actions if isinstance(a, CancelAll | ScheduleStep)]
    assert [a.event for a in d.actions if isinstance(a, Audit)] == ["channel_exhausted"]


def test_reassign_ends_the_chain_and_starts_the_new_targets_from_step_one() -> None:
    plan = plan_of(steps=[
        {"recipients": ["alice"], "channels": ["voice"], "delay": 300},
        {"recipients": ["alice"], "channels": ["sms", "email"], "delay": 600},
    ], max_notifications=3)  # fmt: skip
    started = decide(AlertState.TRIGGERED, plan, Chain(), Start(), T0, lambda: "n1")
    new_plan = plan.reassigned([plan_of(steps=[
        {"recipients": ["bob"], "channels": ["voice"]}]).contacts["bob"]])  # fmt: skip
    assert new_plan.revision == 1
    assert Plan.from_json(new_plan.to_json()) == new_plan
    ids = iter(["m1", "m2"])
    d = decide(AlertState.TRIGGERED, plan, started.chain, Reassign(new_plan, "carol", ("ops",)),
               T0 + timedelta(seconds=30), ids.__next__)  # fmt: skip
    assert d.plan == new_plan
    kinds = [type(a) for a in d.actions]
    # the old chain is cancelled before anything of the new one is staged
    assert kinds.index(CancelAll) < kinds.index(Dispatch)
    assert kinds.index(CancelAll) == 0
    cancel = d.actions[0]
    assert isinstance(cancel, CancelAll)
    assert cancel.scope is CancelScope.CHAIN
    [moved] = [a for a in d.actions if isinstance(a, Audit) and a.event == "reassigned"]
    assert moved.record()["from"] == ["alice"]
    assert moved.record()["to"] == ["bob"]
    assert moved.record()["groups"] == ["ops"]
    assert moved.actor == "carol"
    [send] = [a for a in d.actions if isinstance(a, Dispatch)]
    assert (send.recipient_id, send.channel, send.step, send.notification_id) == (
        "bob", "voice", 0, "m1"
    )  # fmt: skip
    assert [a.due_at for a in d.actions if isinstance(a, ScheduleStep)] == [
        T0 + timedelta(seconds=330)
    ]
    assert [a.due_at for a in d.actions if isinstance(a, ScheduleCap)] == [
        T0 + timedelta(seconds=30 + plan.max_duration)
    ]
    assert set(d.chain.notifs) == {"m1"}
    assert d.chain.sent == 1
    # a late outcome of the old chain (alice pressed 1 as she was hung up) matches nothing
    late = decide(AlertState.TRIGGERED, new_plan, d.chain,
                  Outcome("n1", 1, S.ACKNOWLEDGED, "pressed_1"), T0, lambda: "x")  # fmt: skip
    assert late.actions == []
    assert late.chain == d.chain
    # the next step of the new chain pages bob on the step's channels
    nxt = decide(AlertState.TRIGGERED, new_plan, d.chain, StepTimer(0, 1), T0, iter("yz").__next__)
    assert [(a.recipient_id, a.channel) for a in nxt.actions if isinstance(a, Dispatch)] == [
        ("bob", "sms"), ("bob", "email")
    ]  # fmt: skip


def test_plans_stored_before_step_channels_were_kept_still_load() -> None:
    plan = plan_of(steps=[{"groups": ["team"], "channels": ["voice", "email"], "delay": 5}])
    old = plan.to_json()
    for step in old["steps"]:
        del step["channels"]
    del old["revision"]
    assert Plan.from_json(old) == plan


def test_stored_plans_leave_unset_contact_fields_out() -> None:
    """The previous release reads plans this one wrote (rolling deploy): a contact field
    it does not know, like slack_channel, must not appear unless it is set."""
    plan = plan_of(steps=[{"groups": ["team"], "channels": ["voice", "email"], "delay": 5}])
    contacts = plan.to_json()["contacts"]
    assert contacts["alice"] == {
        "recipient_id": "alice", "name": "A", "phone": "+14155550101", "telegram_chat_id": "42"
    }  # fmt: skip
    assert Plan.from_json(plan.to_json()) == plan


def test_repeat_runs_the_steps_again() -> None:
    plan = plan_of(steps=[{"recipients": ["bob"], "channels": ["sms"], "delay": 100}], repeat=2)
    sim = Sim(plan, always(S.DELIVERED, "queued"))
    sim.run()
    assert [t for t, _ in sim.sent] == [0, 100, 200]
    assert sim.state is AlertState.EXHAUSTED


def test_caps_end_the_chain() -> None:
    plan = plan_of(steps=[{"recipients": ["alice"], "channels": ["voice"], "delay": 1000}],
                   repeat=20, max_notifications=5)  # fmt: skip
    sim = Sim(plan, always(S.FAILED_RETRYABLE, "no_answer"))
    sim.run()
    assert len(sim.sent) == 5
    assert sim.state is AlertState.EXHAUSTED
    assert [a.reason for a in sim.audit if a.event == "exhausted"] == ["cap_notifications"]

    plan = plan_of(steps=[{"recipients": ["bob"], "channels": ["sms"], "delay": 60}],
                   repeat=20, max_duration=150)  # fmt: skip
    sim = Sim(plan, always(S.DELIVERED, "queued"))
    sim.run()
    assert [t for t, _ in sim.sent] == [0, 60, 120]
    assert [a.reason for a in sim.audit if a.event == "exhausted"] == ["cap_duration"]


def test_email_retries_4xx_only() -> None:
    plan = plan_of(steps=[{"recipients": ["bob"], "channels": ["email"], "delay": 3600}])
    sim = Sim(plan, always(S.FAILED_RETRYABLE, "smtp_421"))
    sim.run()
    assert [d.attempt for _, d in sim.sent] == [1, 2, 3]
    sim = Sim(plan, always(S.FAILED_RETRYABLE, "smtp_connection_refused"))
    sim.run()
    assert [d.attempt for _, d in sim.sent] == [1]


def test_late_failure_after_delivery_reopens_the_notification() -> None:
    plan = plan_of(steps=[{"recipients": ["bob"], "channels": ["sms"], "delay": 3600}])
    d = decide(AlertState.TRIGGERED, plan, Chain(), Start(), T0, lambda: "n1")
    chain = decide(AlertState.TRIGGERED, plan, d.chain, Outcome("n1", 1, S.DELIVERED, "queued"),
                   T0, lambda: "x").chain  # fmt: skip
    failed = Outcome("n1", 1, S.FAILED_RETRYABLE, "twilio_30003")
    late = decide(AlertState.TRIGGERED, plan, chain, failed, T0, lambda: "x")
    assert [a.attempt for a in late.actions if isinstance(a, Dispatch)] == [2]


def test_json_round_trips() -> None:
    plan = plan_of(steps=[{"groups": ["team"], "channels": ["voice", "email"], "delay": 5}])
    assert Plan.from_json(plan.to_json()) == plan
    snoozing = plan_of(voice={"snooze": "15m"})
    assert snoozing.snooze == 900
    assert Plan.from_json(snoozing.to_json()) == snoozing
    old = {k: v for k, v in plan.to_json().items() if k != "snooze"}  # stored before it
    assert Plan.from_json(old).snooze is None
    d = decide(AlertState.TRIGGERED, plan, Chain(), Start(), T0, iter("abcdef").__next__)
    assert Chain.from_json(d.chain.to_json()) == d.chain


def test_decide_leaves_the_chain_it_was_given_untouched() -> None:
    """The engine keeps the stored chain until the transaction commits; a decision works
    on its own copy, down to each notification's state."""
    plan = plan_of(steps=[{"recipients": ["alice"], "channels": ["voice", "sms"]}])
    first = decide(AlertState.TRIGGERED, plan, Chain(), Start(), T0, iter("abcd").__next__)
    before = first.chain.to_json()
    [nid, *_] = first.chain.notifs
    n = first.chain.notifs[nid]
    outcome = Outcome(nid, n.attempt, S.FAILED_RETRYABLE, "busy")
    later = decide(AlertState.TRIGGERED, plan, first.chain, outcome, T0, iter("efgh").__next__)
    assert later.chain.to_json() != before  # the decision did change its copy
    assert first.chain.to_json() == before


def test_audit_records_carry_every_field_flat() -> None:
    record = Audit("send", "sending", "busy", "n-1", "voice", 2, "alice", 0, 1, "engine").record()
    assert record == {
        "event": "send", "status": "sending", "reason": "busy", "notification_uuid": "n-1",
        "channel": "voice", "attempt": 2, "recipient_id": "alice", "round": 0, "step": 1,
        "actor": "engine",
    }  # fmt: skip


def test_rate_limit_release() -> None:
    limit = RateLimit(max=2, window=60)
    sends = [T0 - timedelta(seconds=50), T0 - timedelta(seconds=10), T0 - timedelta(seconds=90)]
    assert rate_limit_release(sends, limit, T0) == T0 + timedelta(seconds=10)
    assert rate_limit_release(sends[:1], limit, T0) is None


STATUSES = st.sampled_from(list(S))


@settings(max_examples=150, deadline=None)
@given(
    outcomes=st.lists(STATUSES, min_size=1, max_size=40),
    repeat=st.integers(0, 3),
    cap=st.integers(1, 30),
    ack_at=st.integers(0, 40),
    snooze=st.sampled_from([None, "1m"]),
)
def test_invariants_hold_for_any_outcomes(
    outcomes: list[S], repeat: int, cap: int, ack_at: int, snooze: str | None
) -> None:
    """Whatever channels report: the cap holds, the chain ends, nothing is sent after close."""
    script = iter(itertools.cycle(outcomes))
    plan = plan_of(steps=[
        {"groups": ["team"], "channels": ["voice", "sms"], "delay": 30},
        {"recipients": ["bob"], "channels": ["email"], "delay": 30},
    ], repeat=repeat, max_notifications=cap, voice={"snooze": snooze})  # fmt: skip
    sim = Sim(plan, lambda _d: (next(script), "r"))
    sim.feed(Start())
    for i in range(400):
        if i == ack_at:
            sim.feed(Close(AlertState.ACKNOWLEDGED, "api"))
            closed_at = len(sim.sent)
        if not sim.queue:
            break
        due, _, item = heapq.heappop(sim.queue)
        sim.now = due
        if isinstance(item, Dispatch):
            sim.sent.append((0, item))
            sim.feed(Outcome(item.notification_id, item.attempt, next(script), "r"))
        else:
            assert isinstance(item, StepTimer | CapTimer)
            sim.feed(item)
    assert not sim.queue, "the chain never ended"
    assert len(sim.sent) <= cap
    assert sim.state is not AlertState.TRIGGERED
    if ack_at < i:
        assert len(sim.sent) == closed_at
