"""The chaos bench's rules (bench/chaos_report.py) on hand-made records: what counts as
lost, stuck, a duplicate within or over the bound, a repeated audit line, a call left
open; and the fault syntax of `python -m bench.chaos --faults`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from bench.chaos import FaultSpec, parse_faults
from bench.chaos_report import (
    Answer,
    FaultEvent,
    FaultKind,
    Request,
    StoredAlert,
    WorkerCalls,
    build_report,
    called_after_answering,
    duplicate_audit_lines,
    duplicate_sends,
    make_windows,
    open_calls,
    window_of,
)
from bench.services import Invite

T0 = 1_800_000_000.0
KILLED, LIVE, OTHER = 101, 202, 303


def at(seconds: float) -> str:
    return datetime.fromtimestamp(T0 + seconds, UTC).isoformat()


def send(t: float, pid: int, nid: str = "n1", attempt: int = 1, **extra: Any) -> dict[str, Any]:
    return {"ts": at(t), "event": "send", "status": "sending", "alert_id": "a1",
            "notification_uuid": nid, "attempt": attempt, "channel": "voice",
            "recipient_id": "presser", "worker": f"host:{pid}:abc123", **extra}  # fmt: skip


def result(t: float, status: str, nid: str = "n1", **extra: Any) -> dict[str, Any]:
    return {"ts": at(t), "event": "result", "status": status, "alert_id": "a1",
            "notification_uuid": nid, "attempt": 1, "channel": "voice",
            "recipient_id": "presser", **extra}  # fmt: skip


def test_one_resend_after_a_killed_worker_is_within_the_bound() -> None:
    audit = [send(1, KILLED), send(31, LIVE)]
    [dup] = duplicate_sends(audit, {KILLED: T0 + 10})
    assert dup.within_bound
    assert (dup.worker, dup.previous_worker) == (f"host:{LIVE}:abc123", f"host:{KILLED}:abc123")


def test_a_resend_after_a_live_worker_is_over_the_bound() -> None:
    [dup] = duplicate_sends([send(1, LIVE), send(6, LIVE)], {KILLED: T0 + 3})
    assert not dup.within_bound


def test_a_killed_worker_excuses_one_resend_of_an_attempt_not_two() -> None:
    audit = [send(1, KILLED), send(31, LIVE), send(61, OTHER)]
    assert [d.within_bound for d in duplicate_sends(audit, {KILLED: T0 + 10})] == [True, False]


def test_only_a_send_in_flight_at_the_kill_is_excused() -> None:
    """The worker sent the attempt twice while alive, then died: the first repeat is not
    the kill's doing."""
    audit = [send(1, KILLED), send(5, KILLED), send(31, LIVE)]
    assert [d.within_bound for d in duplicate_sends(audit, {KILLED: T0 + 10})] == [False, True]


def test_sends_of_different_attempts_are_not_duplicates() -> None:
    audit = [send(1, LIVE, attempt=1), send(5, LIVE, attempt=2), send(5, LIVE, nid="n2")]
    assert duplicate_sends(audit, {}) == []


def test_a_repeated_result_line_is_a_duplicate_audit_line() -> None:
    audit = [send(1, LIVE), result(3, "acknowledged"), result(3.01, "acknowledged")]
    [line] = duplicate_audit_lines(audit)
    assert (line.event, line.status, line.copies) == ("result", "acknowledged", 2)
    assert duplicate_audit_lines([result(3, "acknowledged"), result(4, "cancelled")]) == []


def test_a_second_send_is_not_counted_as_a_duplicate_audit_line() -> None:
    assert duplicate_audit_lines([send(1, KILLED), send(31, LIVE)]) == []


def test_calling_a_person_again_after_they_answered_is_found() -> None:
    audit = [send(1, LIVE), result(3, "acknowledged"), send(10, LIVE, nid="n2")]
    [again] = called_after_answering(audit)
    assert (again.alert_id, again.recipient_id) == ("a1", "presser")
    # a send that raced the ack (claimed before it committed) is not a call after it
    assert called_after_answering([send(1, LIVE), result(3, "acknowledged"),
                                   send(3.5, LIVE, nid="n2")]) == []  # fmt: skip
    # someone else may still be called
    other = send(10, LIVE, nid="n2", recipient_id="silent")
    assert called_after_answering([result(3, "acknowledged"), other]) == []


def test_open_calls_are_those_of_running_workers_that_never_ended() -> None:
    invites = [Invite(T0 + 1, "c-live", 5000), Invite(T0 + 2, "c-dead", 5002),
               Invite(T0 + 3, "c-done", 5000), Invite(T0 + 3.5, "c-live", 5000)]  # fmt: skip
    calls = WorkerCalls({5000: LIVE, 5002: KILLED}, frozenset({"c-done"}))
    assert [i.call_id for i in open_calls(invites, calls, [KILLED])] == ["c-live"]


def test_windows_run_from_one_fault_to_the_next() -> None:
    faults = [FaultEvent(FaultKind.REDIS, T0 + 30, T0 + 35),
              FaultEvent(FaultKind.WORKER, T0 + 10, T0 + 13, killed_pid=KILLED)]  # fmt: skip
    windows = make_windows(T0, T0 + 60, faults)
    assert [(w.name, w.start - T0, w.end - T0) for w in windows] == [
        ("before faults", 0, 10), ("worker kill -9", 10, 30), ("redis kill -9", 30, 60)
    ]  # fmt: skip
    assert window_of(windows, T0 + 29.9).name == "worker kill -9"
    assert window_of(windows, T0 - 1).name == "before faults"


def request(index: int, alert_id: str | None, *statuses: int | None) -> Request:
    req = Request(index, f"k{index}", "answer")
    for i, status in enumerate(statuses):
        error = "ReadError" if status is None else None
        req.answers.append(Answer(T0 + index + i * 0.5, T0 + index + i * 0.5 + 0.1, status, error))
    req.alert_id = alert_id
    return req


def test_report_counts_lost_stuck_and_500_per_window_and_fails_the_verdict() -> None:
    faults = [FaultEvent(FaultKind.POSTGRES, T0 + 5, T0 + 8)]
    requests = [
        request(1, "a-ok", 202),
        request(2, "a-stuck", 202),
        request(6, "a-lost", 500, None, 202),
        request(7, None, 503, 503),
    ]
    stored = [StoredAlert("a-ok", "k1", "acknowledged"),
              StoredAlert("a-stuck", "k2", "exhausted", (("n9", 1),)),
              StoredAlert("a-late", "k7", "triggered")]  # fmt: skip
    audit = [send(2.5, KILLED, nid="n9")]
    report = build_report(requests, faults, T0, T0 + 10, stored, audit, [],
                          WorkerCalls({}, frozenset()))  # fmt: skip
    before, during = report.windows
    assert (before.accepted, before.finished, before.stuck, before.lost) == (2, 2, 1, 0)
    assert (during.accepted, during.lost, during.gave_up) == (1, 1, 1)
    assert (during.count("500"), during.count("503"), during.transport_errors) == (1, 2, 1)
    assert during.retries == 3  # two for k6, one for k7
    checks = {c.name: c.ok for c in report.checks}
    assert checks == {
        "no alert lost": False,
        "no alert stuck": False,
        "no 500": False,
        "duplicate notifications within bound": True,
        "no duplicate audit lines": True,
        "nobody called again after answering": True,
        "one alert per Idempotency-Key": True,
        "every call at the carrier was handed out": True,
        "every call hung up": True,
    }
    assert not report.passed
    assert "stored although refused" in report.examples  # k7: 503s, yet in the database
    assert report.examples["no alert stuck"] == [
        "alert a-stuck (answer) exhausted: attempt n9/1 still sending, last taken by "
        f"host:{KILLED}:abc123"
    ]


def test_a_clean_run_passes() -> None:
    stored = [StoredAlert("a-ok", "k1", "acknowledged")]
    audit = [send(1.5, LIVE), result(2, "acknowledged", provider_id="c1")]
    invites = [Invite(T0 + 1.6, "c1", 5000)]
    calls = WorkerCalls({5000: LIVE}, frozenset({"c1"}))
    report = build_report([request(1, "a-ok", 202)], [], T0, T0 + 3, stored, audit, invites,
                          calls)  # fmt: skip
    assert report.passed, report.checks
    assert report.carrier.invites == report.carrier.with_result == 1


def test_a_call_cut_by_a_carrier_kill_and_placed_on_the_next_trunk_is_one_send() -> None:
    """One send, two INVITEs: the first trunk died under the call (no result names it),
    the send went on to the second. Only a kill of that carrier excuses the extra call."""
    stored = [StoredAlert("a-ok", "k1", "acknowledged")]
    audit = [send(1.5, LIVE), result(4, "acknowledged", provider_id="c2")]
    invites = [Invite(T0 + 1.6, "c1", 5000), Invite(T0 + 2.5, "c2", 5000)]
    calls = WorkerCalls({5000: LIVE}, frozenset({"c1", "c2"}))

    def handed_out(cut: frozenset[str]) -> bool:
        report = build_report([request(1, "a-ok", 202)], [], T0, T0 + 5, stored, audit,
                              invites, calls, cut)  # fmt: skip
        [check] = [c for c in report.checks if c.name == "every call at the carrier was handed out"]
        return check.ok

    assert handed_out(frozenset({"c1"}))
    assert not handed_out(frozenset())


def test_fault_specs_parse_with_default_downtimes() -> None:
    assert parse_faults("redis@30, worker@10:2") == (
        FaultSpec(FaultKind.WORKER, 10.0, 2.0), FaultSpec(FaultKind.REDIS, 30.0, 5.0)
    )  # fmt: skip
    assert parse_faults("") == ()
    with pytest.raises(ValueError, match="kind@start"):
        parse_faults("disk@10")


def test_a_duplicate_counts_in_the_window_of_the_hand_off_it_repeats() -> None:
    """A hand-off lost during the Redis outage is repeated when its lease expires, in a
    later window: the outage is what went wrong."""
    faults = [FaultEvent(FaultKind.REDIS, T0 + 5, T0 + 10),
              FaultEvent(FaultKind.POSTGRES, T0 + 20, T0 + 25)]  # fmt: skip
    audit = [send(6, LIVE), send(36, LIVE), result(37, "acknowledged")]
    report = build_report([request(1, "a1", 202)], faults, T0, T0 + 40,
                          [StoredAlert("a1", "k1", "acknowledged")], audit, [],
                          WorkerCalls({}, frozenset()))  # fmt: skip
    over = {w.name: w.duplicate_sends_over for w in report.windows}
    assert over == {"before faults": 0, "redis kill -9": 1, "postgres crash": 0}


def test_a_resend_excused_by_a_kill_counts_in_the_kill_s_window() -> None:
    faults = [FaultEvent(FaultKind.WORKER, T0 + 10, T0 + 13, killed_pid=KILLED)]
    audit = [send(9, KILLED), send(40, LIVE), result(41, "acknowledged")]
    report = build_report([request(1, "a1", 202)], faults, T0, T0 + 45,
                          [StoredAlert("a1", "k1", "acknowledged")], audit, [],
                          WorkerCalls({}, frozenset()))  # fmt: skip
    within = {w.name: w.duplicate_sends_within for w in report.windows}
    assert within == {"before faults": 0, "worker kill -9": 1}
