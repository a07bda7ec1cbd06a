"""How a finished call becomes the engine's next move (retry, fallback, ack, escalate)."""

from __future__ import annotations

import pytest

from api.voice_channel import SipUriDialer, classify_call
from escalation.channels.base import DeliveryStatus as S
from gateway.media.dtmf import DtmfMethod
from gateway.result import CallOutcome, CallResult, FailureCause, ReceivedDigit


def result(
    outcome: CallOutcome,
    code: int | None,
    *,
    digits: str = "",
    hangup_by: str | None = None,
    session_expired: bool = False,
    failure: FailureCause | None = None,
) -> CallResult:
    return CallResult(
        outcome=outcome,
        sip_code=code,
        reason="x",
        direction="outbound",
        target="sip:+14155550101@127.0.0.1:5090",
        call_id="c1@127.0.0.1",
        transport="udp",
        hangup_by=hangup_by,
        received=[ReceivedDigit(d, DtmfMethod.RFC4733, 100 * i) for i, d in enumerate(digits)],
        session_expired=session_expired,
        failure=failure,
    )


@pytest.mark.parametrize(
    ("call", "outcome", "status", "reason"),
    [
        (result(CallOutcome.ANSWERED, 200, digits="1"), "acknowledged", S.ACKNOWLEDGED,
         "pressed_1"),
        (result(CallOutcome.ANSWERED, 200, digits="2"), "escalate", S.ESCALATE, "pressed_2"),
        (result(CallOutcome.ANSWERED, 200, digits="3"), "resolved", S.RESOLVED, "pressed_3"),
        (result(CallOutcome.ANSWERED, 200, digits="4"), "snoozed", S.SNOOZE, "pressed_4"),
        (result(CallOutcome.ANSWERED, 200, digits="77"), "not_acknowledged", S.NOT_ACKNOWLEDGED,
         "no_valid_digit"),
        (result(CallOutcome.ANSWERED, 200, hangup_by="local"), "machine", S.NOT_ACKNOWLEDGED,
         "answering_machine"),
        # a voicemail greeting: answered, nobody presses anything
        (result(CallOutcome.ANSWERED, 200, hangup_by="local"), "", S.NOT_ACKNOWLEDGED,
         "no_valid_digit"),
        (result(CallOutcome.ANSWERED, 200, hangup_by="remote"), "", S.NOT_ACKNOWLEDGED,
         "hung_up_without_digit"),
        # the session timer ended the call before a key (RFC 4028): said as such
        (result(CallOutcome.ANSWERED, 200, hangup_by="local", session_expired=True), "",
         S.NOT_ACKNOWLEDGED, "session_expired"),
        # a key pressed before the expiry still counts
        (result(CallOutcome.ANSWERED, 200, digits="1", session_expired=True), "acknowledged",
         S.ACKNOWLEDGED, "pressed_1"),
        (result(CallOutcome.BUSY, 486), "", S.FAILED_RETRYABLE, "busy"),
        (result(CallOutcome.NO_ANSWER, 487), "", S.FAILED_RETRYABLE, "no_answer"),
        (result(CallOutcome.REJECTED, 603), "", S.FAILED_RETRYABLE, "rejected_sip_603"),
        (result(CallOutcome.REJECTED, 404), "", S.FAILED_PERMANENT, "rejected_sip_404"),
        (result(CallOutcome.REJECTED, 484), "", S.FAILED_PERMANENT, "rejected_sip_484"),
        (result(CallOutcome.FAILED, 503), "", S.FAILED_RETRYABLE, "sip_503"),
        (result(CallOutcome.FAILED, None), "", S.FAILED_RETRYABLE, "no_response"),
        # failures of ours say what they were, not the SIP code we gave them
        (result(CallOutcome.FAILED, 503, failure=FailureCause.TLS_CERTIFICATE), "",
         S.FAILED_RETRYABLE, "tls_certificate_rejected"),
        (result(CallOutcome.FAILED, 503, failure=FailureCause.CONNECT), "",
         S.FAILED_RETRYABLE, "connect_failed"),
        (result(CallOutcome.FAILED, 408, failure=FailureCause.NO_RESPONSE), "",
         S.FAILED_RETRYABLE, "no_response"),
        (result(CallOutcome.CANCELLED, 487), "", S.CANCELLED, "call_cancelled"),
    ],
)  # fmt: skip
def test_classify_call(call: CallResult, outcome: str, status: S, reason: str) -> None:
    got = classify_call(call, outcome)
    assert (got.status, got.reason) == (status, reason)
    assert got.provider_id == "c1@127.0.0.1"
    assert got.details["digits"] == call.digits
    assert got.details.get("error") == ("x" if call.failure is not None else None)


def test_dialer_template_needs_the_number() -> None:
    with pytest.raises(ValueError, match="number"):
        SipUriDialer(gateway=None, template="sip:alice@127.0.0.1")  # type: ignore[arg-type]
