"""Every keypress heard whatever payload numbers the callee picks (RFC 3264 §5.1, §6.1).

ackline offers PCMU, PCMA and telephone-event/101. SIPp plays a callee that answers with
its own numbering (telephone-event/126, PCMA first) and then sends on either numbering:
on the type ackline offered to receive, or on the one it answered with.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.pcap import PCMA, PCMU, inband_dtmf_pcap, retype_rtp_pcap
from tests.integration.peers import dtmf_pcap, sipp
from tests.integration.test_sipp_dtmf_methods import run_call

pytestmark = pytest.mark.interop


@pytest.mark.parametrize("sent_on", [101, 126])
def test_events_heard_on_the_offered_and_the_answered_type(tmp_path: Path, sent_on: int) -> None:
    pcap = dtmf_pcap("7")  # SIPp's sample: telephone-event on 101
    if sent_on != 101:
        pcap = retype_rtp_pcap(pcap, tmp_path / f"dtmf_7_pt{sent_on}.pcap", sent_on)
    with sipp(
        "uas_answer_payload_types.xml",
        tmp_path,
        FORMATS="0",
        EVENT_PT="126",
        PCAP=str(pcap),
        PAUSE_MS="300",
    ) as peer:
        result = run_call(
            tmp_path, f"sip:+15550130@{peer.address}", "--gather", "1", "--timeout", "8"
        )
        assert peer.wait(timeout=15) == 0, peer.logs()  # our BYE came after the key
    assert result["outcome"] == "answered"
    assert (result["digits"], result["dtmf_method"]) == ("7", "rfc4733")
    assert result["hangup_by"] == "local"
    assert result["duration_ms"] < 5000  # ended by the key, not the 8 s timeout


@pytest.mark.parametrize(
    ("formats", "sent_as", "digit"),
    [
        ("8", PCMA, "3"),  # PCMA answered although we listed PCMU first, and sent
        ("8 0", PCMU, "5"),  # PCMA answered first, PCMU (our first choice) sent
    ],
)
def test_audio_of_the_answered_codecs_decoded(
    tmp_path: Path, formats: str, sent_as: int, digit: str
) -> None:
    """In-band tones are only heard when the audio is decoded with the codec it came in."""
    pcap = inband_dtmf_pcap(tmp_path / f"inband_{digit}.pcap", digit, payload_type=sent_as)
    with sipp(
        "uas_answer_payload_types.xml",
        tmp_path,
        FORMATS=formats,
        EVENT_PT="101",
        PCAP=str(pcap),
        PAUSE_MS="300",
    ) as peer:
        result = run_call(
            tmp_path, f"sip:+15550131@{peer.address}", "--gather", "1", "--timeout", "8"
        )
        assert peer.wait(timeout=15) == 0, peer.logs()
    assert result["outcome"] == "answered"
    assert result["codec"] == "PCMA"  # what we send: the answer's first choice
    assert (result["digits"], result["dtmf_method"]) == (digit, "inband")
    assert result["duration_ms"] < 5000
