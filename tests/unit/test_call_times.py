"""Every call result's timing fields come from one place (gateway.result.CallTimes), for
our SIP calls and Twilio's alike."""

from __future__ import annotations

from datetime import datetime

from gateway.result import CallTimes


def test_an_outbound_call_times_its_ringing_answer_and_length() -> None:
    times = CallTimes()
    times.start(10.0)
    times.start(11.0)  # a retried INVITE (digest) keeps the first send
    times.respond(10.4)  # 180 Ringing
    times.respond(10.9)  # later provisionals do not move it
    assert times.since_answer_ms(12.0) == 0  # a key before the answer
    times.answer(12.5)
    assert times.since_answer_ms(13.0) == 500
    timings = times.timings(20.5)
    assert timings["pdd_ms"] == 400
    assert timings["answer_delay_ms"] == 2500
    assert timings["duration_ms"] == 8000
    assert timings["answer_time"] is not None
    assert datetime.fromisoformat(timings["answer_time"]).utcoffset() is not None


def test_an_answer_without_ringing_is_the_first_response_and_a_carrier_length_wins() -> None:
    times = CallTimes()
    times.start(0.0)
    times.answer(1.25)
    assert times.timings(9.0, duration_ms=7000) == {
        "pdd_ms": 1250, "answer_delay_ms": 1250, "answer_time": times.answer_time,
        "duration_ms": 7000,
    }  # fmt: skip


def test_unanswered_and_inbound_calls_have_no_delays_and_no_length() -> None:
    ringing = CallTimes()
    ringing.start(0.0)
    ringing.respond(0.3)
    assert ringing.timings(30.0, duration_ms=5000) == {
        "pdd_ms": 300, "answer_delay_ms": None, "answer_time": None, "duration_ms": 0,
    }  # fmt: skip
    inbound = CallTimes()  # we never sent an INVITE: nothing to count from
    inbound.answer(4.0)
    timings = inbound.timings(6.0)
    assert timings["pdd_ms"] is None
    assert timings["answer_delay_ms"] is None
    assert timings["duration_ms"] == 2000
