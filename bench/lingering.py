"""What finished transactions cost the cyclic collector while they linger.

At ``--rate`` calls per second each call leaves an INVITE client transaction in Accepted
for timer M (64*T1, 32 s) and a BYE one in Completed for timer K: ``rate * 32`` calls'
worth at any time. This builds that many, as the endpoint leaves them (final response
in, events drained), and reports the objects the collector tracks per call and the CPU
time of a full collection over them (median of 7). CPU time rather than wall time, so
other processes on the box move the figure little; bench.calls measures the pauses.

    python -m bench.lingering [--rate 200]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

from gateway.sip.message import parse_message
from gateway.sip.transaction import (
    ClientInviteTransaction,
    ClientNonInviteTransaction,
    TimerSettings,
)

_SDP = (
    "v=0\r\no=ackline 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 20000 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=ptime:20\r\na=sendrecv\r\n"
)


def _message(first: str, method: str, branch: str, i: int, body: str = "") -> bytes:
    to_tag = f";tag=t{i}" if first.startswith("SIP/") else ""
    return (
        f"{first}\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5060;branch={branch};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:ackline@127.0.0.1>;tag=f{i}\r\n"
        f"To: <sip:+14155550101@127.0.0.1:5090>{to_tag}\r\n"
        f"Call-ID: bench-{i}@127.0.0.1\r\n"
        f"CSeq: 1 {method}\r\n"
        "Contact: <sip:ackline@127.0.0.1:5060>\r\n"
        "Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, PRACK, UPDATE\r\n"
        "Supported: 100rel, timer\r\n"
        "Session-Expires: 1800\r\nMin-SE: 90\r\n"
        + ("Content-Type: application/sdp\r\n" if body else "")
        + f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()


def lingering_call(i: int) -> list[object]:
    """The two transactions one finished call leaves behind."""
    timers = TimerSettings()
    invite = parse_message(
        _message("INVITE sip:+14155550101@127.0.0.1:5090 SIP/2.0", "INVITE", f"z9hG4bKi{i}", i,
                 _SDP)
    )  # fmt: skip
    ok = parse_message(_message("SIP/2.0 200 OK", "INVITE", f"z9hG4bKi{i}", i, _SDP))
    bye = parse_message(_message("BYE sip:+14155550101@127.0.0.1:5090 SIP/2.0", "BYE",
                                 f"z9hG4bKb{i}", i))  # fmt: skip
    bye_ok = parse_message(_message("SIP/2.0 200 OK", "BYE", f"z9hG4bKb{i}", i))
    out: list[object] = []
    for txn_type, request, response in (
        (ClientInviteTransaction, invite, ok),
        (ClientNonInviteTransaction, bye, bye_ok),
    ):
        txn = txn_type(request, reliable=False, timers=timers)  # type: ignore[arg-type]
        txn.start(0.0)
        txn.messages_to_send()
        txn.receive_response(response, 0.1)  # type: ignore[arg-type]
        while txn.next_event() is not None:
            pass
        out.append(txn)
    return out


def _full_collection_ms() -> float:
    times = []
    for _ in range(7):
        started = time.process_time()
        gc.collect()
        times.append((time.process_time() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="calls per second")
    args = parser.parse_args()
    calls = int(args.rate * TimerSettings().timer_m)
    gc.collect()
    before = len(gc.get_objects())
    without = _full_collection_ms()
    kept = [lingering_call(i) for i in range(calls)]
    gc.collect()
    tracked = len(gc.get_objects()) - before
    report = {
        "calls_lingering": calls,
        "tracked_objects_per_call": round(tracked / calls, 1),
        "full_collection_cpu_ms_without": round(without, 1),
        "full_collection_cpu_ms_with": round(_full_collection_ms(), 1),
    }
    del kept
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
