"""Engine + in-process worker against real SQLite and PostgreSQL, with scripted carriers."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlmodel import col

from escalation.alert_input import AlertIn
from escalation.audit import replay
from escalation.audit_records import RequestContext
from escalation.channels.base import DeliveryResult, DeliveryStatus, Notification
from storage.models import Alert, AlertState, Job, NotificationAttempt
from tests.conftest_escalation import Harness, Store, make_harness, reply
from tests.waiting import wait_until

pytest_plugins = ["tests.conftest_escalation"]

S = DeliveryStatus
PEOPLE = [
    {"id": "alice", "name": "Alice", "phone": "+14155550101", "telegram_chat_id": "42"},
    {"id": "bob", "name": "Bob", "phone": "+14155550102", "email": "bob@example.com"},
]
FAST_RETRY = {
    "voice": {"attempts": 3, "backoff": "exponential", "base": 0.1, "factor": 2, "max": 1,
              "fallback_channel": "telegram_voice"},
    "telegram_voice": {"attempts": 2, "backoff": "linear", "base": 0.15, "factor": 0, "max": 1,
                       "fallback_channel": "sms"},
    "sms": {"attempts": 2, "backoff": "linear", "base": 0.1, "factor": 1, "max": 1},
}  # fmt: skip


def config(steps: list[dict[str, Any]], **policy: Any) -> dict[str, Any]:
    return {
        "recipients": PEOPLE,
        "channel_defaults": FAST_RETRY,
        "policies": [{"name": "p", "steps": steps, **policy}],
    }


async def harness(store: Store, tmp_path: Path, cfg: dict[str, Any], **scripts: Any) -> Harness:
    h = await make_harness(store, tmp_path / "audit", cfg, scripts)
    h.start()
    return h


async def test_busy_voice_falls_back_in_order_with_backoff(store: Store, tmp_path: Path) -> None:
    h = await harness(
        store, tmp_path, config([{"recipients": ["alice"], "channels": ["voice"], "delay": 60}]),
        voice=reply(S.FAILED_RETRYABLE, "busy"),
        telegram_voice=reply(S.FAILED_PERMANENT, "telegram_403"),
        sms=reply(S.ACKNOWLEDGED, "sms_reply"),
    )  # fmt: skip
    try:
        alert = await h.ingest()
        assert await h.wait_state(alert.id, "acknowledged") == "acknowledged"
        sends = sorted(
            (s.at, s.notification.channel, s.notification.attempt)
            for ch in h.channels.values()
            for s in ch.sent
        )
        # telegram_voice fails permanently: no retry, straight on to sms
        assert [(c, a) for _, c, a in sends] == [
            ("voice", 1), ("voice", 2), ("voice", 3), ("telegram_voice", 1), ("sms", 1)
        ]  # fmt: skip
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(sends)]
        assert 0.1 <= gaps[0] < 0.6
        assert 0.2 <= gaps[1] < 0.7  # exponential 0.1, 0.2
        assert gaps[2] < 0.5
        assert gaps[3] < 0.5  # fallbacks are immediate

        got = await h.engine.get_alert(alert.id)
        assert got is not None
        db_alert, attempts = got
        assert db_alert.acked_by == "sms:alice"
        assert [(a.channel, a.attempt, a.status) for a in attempts] == [
            ("voice", 1, "failed_retryable"), ("voice", 2, "failed_retryable"),
            ("voice", 3, "failed_retryable"), ("telegram_voice", 1, "failed_permanent"),
            ("sms", 1, "acknowledged"),
        ]  # fmt: skip
        # the audit alone tells the same story
        path = replay(h.audit.read("acme"), alert.id)
        assert path.state == "acknowledged"
        assert path.acked_by == "sms:alice"
        assert path.sent() == [(c, "alice", a) for _, c, a in sends]
        assert {k: v.final for k, v in path.attempts.items()} == {
            (a.notification_id, a.attempt): a.status for a in attempts
        }
        for rec in h.audit.read("acme", alert_id=alert.id):
            assert list(rec)[:10] == [
                "ts", "alert_id", "notification_uuid", "channel", "status", "attempt",
                "reason", "actor", "ip", "request_id",
            ]  # fmt: skip
    finally:
        await h.stop()


async def test_ack_racing_scheduled_retries_fires_nothing_after_ack(
    store: Store, tmp_path: Path
) -> None:
    retry = {"voice": {"attempts": 20, "backoff": "linear", "base": 0.03, "factor": 0, "max": 1}}
    cfg = config([{"groups": [], "recipients": ["alice", "bob"], "channels": ["voice"]}])
    cfg["channel_defaults"] = retry
    h = await harness(store, tmp_path, cfg, voice=reply(S.FAILED_RETRYABLE, "no_answer"))
    try:
        alerts = [await h.ingest(title=f"a{i}") for i in range(12)]
        rng = random.Random(7)
        acked_at: dict[str, float] = {}

        async def ack_later(alert_id: str) -> None:
            await asyncio.sleep(rng.uniform(0.05, 0.4))
            await h.engine.close(alert_id, AlertState.ACKNOWLEDGED, RequestContext("api:u"))
            acked_at[alert_id] = time.time()

        await asyncio.gather(*(ack_later(a.id) for a in alerts))
        await asyncio.sleep(0.3)  # several retry periods after the last ack
        await h.worker.idle()
        for a in alerts:
            assert await h.state(a.id) == "acknowledged"
            sent = [s.at for s in h.channels["voice"].sent if s.notification.alert_id == a.id]
            assert len(sent) >= 2  # the race was real: retries happened before the ack
            assert max(sent) <= acked_at[a.id], "a notification fired after the ack committed"
            got = await h.engine.get_alert(a.id)
            assert got is not None
            assert {x.status for x in got[1]} <= {"failed_retryable", "cancelled"}
    finally:
        await h.stop()


async def test_ack_hangs_up_inflight_call_quickly(store: Store, tmp_path: Path) -> None:
    cfg = config([{"recipients": ["alice"], "channels": ["voice", "sms"]}])
    h = await harness(store, tmp_path, cfg, voice=lambda _n: None, sms=reply(S.DELIVERED))
    try:
        alert = await h.ingest()
        for _ in range(200):
            if h.channels["voice"].sent:
                break
            await asyncio.sleep(0.01)
        t0 = time.time()
        await h.engine.close(alert.id, AlertState.RESOLVED, RequestContext("monitor"))
        nid = h.channels["voice"].sent[0].notification.notification_id
        for _ in range(100):
            if nid in h.channels["voice"].cancelled:
                break
            await asyncio.sleep(0.005)
        assert h.channels["voice"].cancelled[nid] - t0 < 0.1  # ack -> hang-up latency
        await h.worker.idle()
        got = await h.engine.get_alert(alert.id)
        assert got is not None
        assert got[0].state == "resolved"
        assert {(a.channel, a.status) for a in got[1]} == {
            ("voice", "cancelled"), ("sms", "delivered")
        }  # fmt: skip
    finally:
        await h.stop()


async def test_caps_end_the_chain_as_exhausted(store: Store, tmp_path: Path) -> None:
    steps = [{"recipients": ["bob"], "channels": ["sms"], "delay": 0.05}]
    cfg = config(steps, repeat=20, max_notifications=3)
    cfg["policies"].append({"name": "short", "steps": steps, "repeat": 20, "max_duration": 0.3})
    h = await harness(store, tmp_path, cfg, sms=reply(S.DELIVERED))
    try:
        by_count = await h.ingest()
        by_time = await h.ingest(policy="short")
        assert await h.wait_state(by_count.id, "exhausted") == "exhausted"
        assert await h.wait_state(by_time.id, "exhausted") == "exhausted"
        await h.worker.idle()
        counted = [s for s in h.channels["sms"].sent if s.notification.alert_id == by_count.id]
        assert len(counted) == 3
        timed = [s for s in h.channels["sms"].sent if s.notification.alert_id == by_time.id]
        # one every 50 ms until the 300 ms cap: never more; fewer when the box is slow
        assert 1 <= len(timed) <= 8
        reasons = {
            r["alert_id"]: r["reason"] for r in h.audit.read("acme") if r["event"] == "exhausted"
        }
        assert reasons == {by_count.id: "cap_notifications", by_time.id: "cap_duration"}
    finally:
        await h.stop()


async def test_escalate_skips_to_next_step(store: Store, tmp_path: Path) -> None:
    def voice(n: Notification) -> DeliveryResult:
        return DeliveryResult(S.ESCALATE, "dtmf_2")

    cfg = config([
        {"recipients": ["alice"], "channels": ["voice"], "delay": 30},
        {"recipients": ["bob"], "channels": ["sms"], "delay": 30},
    ])  # fmt: skip
    h = await harness(store, tmp_path, cfg, voice=voice, sms=reply(S.ACKNOWLEDGED, "reply"))
    try:
        alert = await h.ingest()
        assert await h.wait_state(alert.id, "acknowledged", timeout=3) == "acknowledged"
        assert [s.notification.contact.recipient_id for s in h.channels["sms"].sent] == ["bob"]
    finally:
        await h.stop()


async def test_rate_limit_bundles_the_excess(store: Store, tmp_path: Path) -> None:
    steps = [{"recipients": ["bob"], "channels": ["sms"], "delay": 60}]
    cfg = config(steps)
    cfg["rate_limits"] = {"sms": {"max": 2, "window": 0.6, "mode": "bundle"}}
    h = await harness(store, tmp_path, cfg, sms=reply(S.DELIVERED))
    try:
        alerts = [await h.ingest(title=f"flap {i}") for i in range(5)]
        deadline = time.monotonic() + 5
        delivered: list[str] = []
        while time.monotonic() < deadline:
            delivered = []
            for a in alerts:
                got = await h.engine.get_alert(a.id)
                assert got is not None
                if got[1][0].status == "delivered":
                    delivered.append(a.id)
            if len(delivered) == 5:
                break
            await asyncio.sleep(0.05)
        await h.worker.idle()
        sent = h.channels["sms"].sent
        bundled = sum(int(s.notification.details.get("bundled_count", "0")) for s in sent)
        assert len(sent) + bundled == 5  # every alert reached bob...
        assert bundled >= 1  # ...in fewer messages
        events = [r["event"] for r in h.audit.read("acme")]
        assert events.count("bundled") == bundled
        # the limit held: never more than 2 hand-offs (bundle carriers) within 0.6 s, by the
        # engine's own clock (the worker's send() may run late on a loaded machine)
        sends = [r for r in h.audit.read("acme") if r["event"] == "send"]
        assert len(sends) == len(sent)
        times = sorted(datetime.fromisoformat(r["ts"]).timestamp() for r in sends)
        assert all(b - a >= 0.6 - 0.05 for a, b in zip(times, times[2:], strict=False))
    finally:
        await h.stop()


async def test_rate_limit_hold_mode_spaces_out(store: Store, tmp_path: Path) -> None:
    cfg = config([{"recipients": ["bob"], "channels": ["sms"], "delay": 60}])
    cfg["rate_limits"] = {"default": {"max": 1, "window": 0.25, "mode": "hold"}}
    h = await harness(store, tmp_path, cfg, sms=reply(S.DELIVERED))
    try:
        alerts = [await h.ingest(title=f"flap {i}") for i in range(3)]
        await wait_until(lambda: len(h.channels["sms"].sent) >= 3, 5, "3 sms", interval=0.02)
        await h.worker.idle()
        assert len(h.channels["sms"].sent) == 3
        times = []
        for a in alerts:
            got = await h.engine.get_alert(a.id)
            assert got is not None
            assert got[1][0].sent_at is not None
            times.append(got[1][0].sent_at.timestamp())
        assert all(b - a >= 0.25 for a, b in itertools.pairwise(times))
    finally:
        await h.stop()


async def test_concurrent_duplicates_page_once(store: Store, tmp_path: Path) -> None:
    cfg = config([{"recipients": ["bob"], "channels": ["sms"], "delay": 60}])
    h = await harness(store, tmp_path, cfg, sms=reply(S.DELIVERED))
    try:
        results = await asyncio.gather(*(
            h.engine.ingest("acme", "key-1", "same", AlertIn(title="t", policy="p"),
                            RequestContext("t"))
            for _ in range(10)
        ))  # fmt: skip
        assert len({r.alert.id for r in results}) == 1
        assert sum(r.created for r in results) == 1
        deduped = await asyncio.gather(*(
            h.ingest(key=f"k{i}", dedup_key="disk-sda1") for i in range(6)
        ))  # fmt: skip
        assert len({a.id for a in deduped}) == 1
        await asyncio.sleep(0.3)
        await h.worker.idle()
        assert len(h.channels["sms"].sent) == 2  # one per distinct incident
    finally:
        await h.stop()


async def test_a_send_in_flight_at_the_ack_is_left_to_its_worker_to_record(
    store: Store, tmp_path: Path
) -> None:
    """An ack while a send is out leaves that send's job to the worker holding it (it hangs
    up and records how the call ended); the result then ends the job and the attempt."""
    cfg = config([{"recipients": ["alice"], "channels": ["sms"], "delay": 60}])
    h = await make_harness(store, tmp_path / "audit", cfg, {"sms": reply(S.DELIVERED)})
    try:
        alert = await h.ingest()
        [task] = await h.engine.claim("worker-a", 10)
        closed = await h.engine.close(alert.id, AlertState.ACKNOWLEDGED, RequestContext("api:u"))
        assert closed is not None
        job, row = await _job_and_attempt(h, task)
        assert (job.done, row.status) == (False, "sending")  # still the worker's
        await h.engine.complete(task, DeliveryResult(S.CANCELLED, "hung_up"), "worker-a")
        job, row = await _job_and_attempt(h, task)
        assert (job.done, job.outcome) == (True, "done")
        assert (row.status, row.reason) == ("cancelled", "hung_up")
        assert await h.state(alert.id) == "acknowledged"
    finally:
        await h.stop()  # never started: only closes the database and the audit log


async def test_a_dead_workers_send_on_a_closed_alert_does_not_stay_in_flight(
    store: Store, tmp_path: Path
) -> None:
    """A worker took a send and died; the alert is acked meanwhile (by another step).
    Nobody will record that call: once its lease has run out, the attempt is closed,
    whether the ack came before the lease ran out (the next claim finds it) or after
    (the ack itself closes it)."""
    cfg = config([{"recipients": ["alice", "bob"], "channels": ["sms"], "delay": 60}])
    h = await make_harness(store, tmp_path / "audit", cfg, {}, lease_seconds=0.3)
    try:
        early, late = await h.ingest(), await h.ingest()
        tasks = await h.engine.claim("dead-worker", 10)
        assert len(tasks) == 4
        await h.engine.close(early.id, AlertState.ACKNOWLEDGED, RequestContext("api:u"))
        await asyncio.sleep(0.4)  # the dead worker's leases run out
        await h.engine.close(late.id, AlertState.ACKNOWLEDGED, RequestContext("api:u"))
        assert await h.engine.claim("worker-b", 10) == []  # nothing is handed out again
        for task in tasks:
            job, row = await _job_and_attempt(h, task)
            assert (job.done, job.outcome) == (True, "cancelled")
            assert (row.status, row.reason) == ("cancelled", "alert_closed")
            assert row.finished_at is not None
    finally:
        await h.stop()


async def _job_and_attempt(h: Any, task: Any) -> tuple[Job, NotificationAttempt]:
    async with h.db.session() as s:
        job = (await s.execute(select(Job).where(col(Job.id) == task.job_id))).scalar_one()
        row = await s.get(NotificationAttempt, task.attempt_row)
    assert row is not None
    return job, row


async def test_a_claim_meeting_a_due_timer_still_hands_out_every_due_send_once(
    store: Store, tmp_path: Path
) -> None:
    """A due step timer among the claimed jobs is run by the general path; the sends
    due alongside it are claimed by that same pass, none left leased to nobody."""
    cfg = config([
        {"recipients": ["alice"], "channels": ["sms"], "delay": 0.05},
        {"recipients": ["bob"], "channels": ["sms"], "delay": 60},
    ])  # fmt: skip
    h = await make_harness(store, tmp_path / "audit", cfg, {"sms": reply(S.DELIVERED)})
    try:
        first = await h.ingest()
        await asyncio.sleep(0.1)  # its step timer is due now, its first send too
        second = await h.ingest()
        tasks = await h.engine.claim("worker-a", 10)
        sent = sorted((t.notification.alert_id, t.notification.contact.recipient_id)
                      for t in tasks)  # fmt: skip
        assert sent == sorted([(first.id, "alice"), (first.id, "bob"), (second.id, "alice")])
        async with h.db.session() as s:
            sends = (await s.execute(select(Job).where(col(Job.kind) == "send"))).scalars()
            leases = {j.id: (j.owner, j.attempts) for j in sends}
        assert [leases[t.job_id] for t in tasks] == [("worker-a", 1)] * 3  # leased once
    finally:
        await h.stop()  # never started: only closes the database and the audit log


async def test_claim_leases_sends_and_cancels_jobs_of_closed_alerts(
    store: Store, tmp_path: Path
) -> None:
    """One claim pass: a triggered alert's send is leased to the claimer and its attempt
    marked in flight; a job whose alert closed without its jobs being cancelled (a close
    racing a timer) is cancelled, never handed out, and not seen again."""
    cfg = config([{"recipients": ["alice"], "channels": ["sms"], "delay": 60}])
    h = await make_harness(store, tmp_path / "audit", cfg, {"sms": reply(S.DELIVERED)})
    try:
        live, closed = await h.ingest(), await h.ingest()
        async with h.db.session() as s, s.begin():
            await s.execute(
                update(Alert).where(col(Alert.id) == closed.id).values(state="acknowledged")
            )
        tasks = await h.engine.claim("worker-a", 10)
        assert [t.notification.alert_id for t in tasks] == [live.id]
        assert await h.engine.claim("worker-b", 10) == []  # leased, cancelled: nothing left
        async with h.db.session() as s:
            sends = select(Job).where(col(Job.kind) == "send")
            jobs = {j.alert_id: j for j in (await s.execute(sends)).scalars()}
            attempts = {
                a.alert_id: a for a in (await s.execute(select(NotificationAttempt))).scalars()
            }
        leased = jobs[live.id]
        assert (leased.owner, leased.attempts, leased.done) == ("worker-a", 1, False)
        assert leased.lease_until is not None
        assert (attempts[live.id].status, attempts[live.id].sent_at is not None) == (
            "sending",
            True,
        )
        assert (jobs[closed.id].done, jobs[closed.id].outcome) == (True, "cancelled")
        assert (attempts[closed.id].status, attempts[closed.id].reason) == (
            "cancelled",
            "alert_closed",
        )
        assert attempts[closed.id].sent_at is None
    finally:
        await h.stop()  # never started: only closes the database and the audit log


async def test_snooze_pauses_the_chain_then_its_step_fires_again(
    store: Store, tmp_path: Path
) -> None:
    """Alice pressed 4: bob's call of the same step is cancelled, the cap timer is kept
    and the step is stored to fire again at the snooze's end (brought forward here), when
    alice is called again."""
    calls = itertools.count()

    def voice(n: Notification) -> DeliveryResult | None:
        if n.contact.recipient_id == "bob":
            return None  # rings until hung up
        if next(calls) == 0:
            return DeliveryResult(S.SNOOZE, "pressed_4")
        return DeliveryResult(S.ACKNOWLEDGED, "pressed_1")

    cfg = config(
        [{"recipients": ["alice"], "channels": ["voice"], "delay": 30},
         {"recipients": ["bob"], "channels": ["sms"], "delay": 30}],
        voice={"snooze": "1m"},
    )  # fmt: skip
    cfg["policies"][0]["steps"][0]["recipients"].append("bob")
    h = await harness(store, tmp_path, cfg, voice=voice, sms=reply(S.DELIVERED))
    try:
        alert = await h.ingest()
        deadline = time.monotonic() + 5
        while not [r for r in h.audit.read("acme") if r["event"] == "snoozed"]:
            assert time.monotonic() < deadline, "never snoozed"
            await asyncio.sleep(0.05)
        await h.worker.idle()
        [snoozed] = [r for r in h.audit.read("acme") if r["event"] == "snoozed"]
        assert (snoozed["actor"], snoozed["seconds"]) == ("voice:alice", 60.0)
        async with h.db.session() as s:
            jobs = (await s.scalars(select(Job).where(col(Job.alert_id) == alert.id,
                                                      ~col(Job.done)))).all()  # fmt: skip
            attempts = (await s.scalars(select(NotificationAttempt).where(
                col(NotificationAttempt.alert_id) == alert.id))).all()  # fmt: skip
        assert sorted((j.kind, j.payload) for j in jobs) == [
            ("cap", {}), ("step", {"round": 0, "step": 0})
        ]  # fmt: skip
        [step] = [j for j in jobs if j.kind == "step"]
        assert step.due_at.isoformat()[:19] == snoozed["until"][:19]
        assert sorted((a.recipient_id, a.status) for a in attempts) == [
            ("alice", "snooze"), ("bob", "cancelled")
        ]  # fmt: skip
        assert await h.state(alert.id) == "triggered"
        async with h.db.session() as s, s.begin():
            await s.execute(update(Job).where(col(Job.id) == step.id)
                            .values(due_at=datetime.now(step.due_at.tzinfo)))  # fmt: skip
        assert await h.wait_state(alert.id, "acknowledged", timeout=5) == "acknowledged"
        called = [x.notification.contact.recipient_id for x in h.channels["voice"].sent]
        assert called.count("alice") == 2
        assert h.channels["sms"].sent == []  # step 1 never
        steps = [r["reason"] for r in h.audit.read("acme") if r["event"] == "step"]
        assert steps == ["start", "timer:snooze_over"]
    finally:
        await h.stop()
