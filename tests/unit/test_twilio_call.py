"""Twilio's call reports become the same CallResult (and router verdict) as a SIP call."""

from __future__ import annotations

import pytest

from carriers.rotation import AttemptKind
from carriers.router import classify
from carriers.trunk import Trunk
from carriers.twilio_voice import CallEvents, TwilioCall
from gateway.result import CallOutcome

TRUNK = Trunk.model_validate({"name": "tw", "kind": "twilio", "account_sid": "AC" + "0" * 32,
                              "auth_token": "t", "caller_id": "+14155550100"})  # fmt: skip
SID = "CA" + "a" * 32


def placed() -> TwilioCall:
    call = TwilioCall(TRUNK, "+14155550101", client=None)
    call.call_id = SID
    call.responded.set()
    return call


def status(call: TwilioCall, value: str, **extra: str) -> None:
    call.on_report({"CallSid": SID, "CallStatus": value, **extra})


async def test_answered_call_with_a_key_is_answered_200_with_the_digit() -> None:
    call = placed()
    status(call, "ringing")
    status(call, "in-progress")
    assert call.answered
    assert not call.ended.is_set()
    call.on_report({"kind": "gather", "digit": "1", "outcome": "acknowledged", "decided": "1"})
    assert call.decided.is_set()
    assert call.outcome == "acknowledged"
    status(call, "completed", CallDuration="7", SipResponseCode="200")
    result = call.result
    assert result is not None
    assert call.ended.is_set()
    assert (result.outcome, result.sip_code, result.duration_ms) == (
        CallOutcome.ANSWERED,
        200,
        7000,
    )
    assert result.digits == "1"
    assert result.dtmf_method == "twilio_gather"
    assert result.hangup_by == "remote"
    assert result.transport == "twilio"
    assert result.pdd_ms is not None
    assert classify(call)[0] is AttemptKind.ANSWERED
    status(call, "in-progress")  # a late, out-of-order report changes nothing
    assert call.result is result


@pytest.mark.parametrize(
    ("report", "outcome", "code", "kind"),
    [
        ({"CallStatus": "busy", "SipResponseCode": "486"}, CallOutcome.BUSY, 486, AttemptKind.BUSY),
        ({"CallStatus": "no-answer", "SipResponseCode": "487"}, CallOutcome.NO_ANSWER, 480,
         AttemptKind.NO_ANSWER),
        # the far end's 503 through Twilio: another trunk may do better
        ({"CallStatus": "failed", "SipResponseCode": "503"}, CallOutcome.FAILED, 503,
         AttemptKind.CARRIER_ERROR),
        ({"CallStatus": "failed"}, CallOutcome.FAILED, 502, AttemptKind.CARRIER_ERROR),
        ({"CallStatus": "failed", "SipResponseCode": "603"}, CallOutcome.FAILED, 603,
         AttemptKind.FAILED),
        ({"CallStatus": "canceled"}, CallOutcome.CANCELLED, 487, AttemptKind.CANCELLED),
    ],
)  # fmt: skip
async def test_unanswered_ends_map_like_sip(
    report: dict[str, str], outcome: CallOutcome, code: int, kind: AttemptKind
) -> None:
    call = placed()
    call.on_report({"CallSid": SID, **report})
    assert call.result is not None
    assert (call.result.outcome, call.result.sip_code) == (outcome, code)
    assert call.result.duration_ms == 0
    assert call.result.hangup_by is None
    assert classify(call)[0] is kind


async def test_a_key_before_the_answered_report_still_counts_as_answered() -> None:
    call = placed()
    call.on_report({"kind": "gather", "digit": "2", "outcome": "escalate", "decided": "1"})
    assert call.answered
    assert call.outcome == "escalate"
    call.on_report({"kind": "gather", "digit": "5", "outcome": "", "decided": ""})
    assert call.digits == "25"
    status(call, "completed", CallDuration="3")
    assert call.result is not None
    assert call.result.outcome is CallOutcome.ANSWERED


async def test_an_outcome_that_is_not_decided_waits_for_the_end() -> None:
    call = placed()
    status(call, "in-progress", AnsweredBy="machine_end_beep")
    call.on_report({"kind": "gather", "digit": "", "outcome": "machine", "decided": ""})
    assert not call.decided.is_set()
    assert call.outcome == "machine"
    assert call.answered_by == "machine_end_beep"


async def test_reports_that_beat_the_rest_answer_are_replayed_on_watch() -> None:
    events = CallEvents()
    await events.publish(SID, {"CallSid": SID, "CallStatus": "ringing"})
    await events.publish(SID, {"CallSid": SID, "CallStatus": "in-progress"})
    call = placed()
    events.watch(call)
    assert call.answered
    await events.publish(SID, {"CallSid": SID, "CallStatus": "completed", "CallDuration": "1"})
    assert call.ended.is_set()
    # an ended call is forgotten: later reports for it are only buffered, never applied
    assert SID not in events._calls
    await events.close()


async def test_a_keypress_reported_after_the_final_status_still_counts() -> None:
    call = placed()
    status(call, "in-progress")
    status(call, "completed", CallDuration="9")
    assert (call.ended.is_set(), call.outcome) == (True, None)
    call.on_report({"kind": "gather", "digit": "1", "outcome": "acknowledged", "decided": "1"})
    assert call.decided.is_set()
    assert call.outcome == "acknowledged"
    assert call.result is not None
    assert call.result.digits == "1"
