"""The fuzz bench's own parts (bench/fuzz_*.py) on hand-made inputs: the corpus is what it
claims to be, the mutator is seeded and bounded, the log scanner finds and groups
tracebacks, and the verdict follows its rules."""

from __future__ import annotations

import random
from pathlib import Path

from bench.fuzz_report import Bounds, LogFindings, Outcome, ProcSample, judge, scan_log
from bench.fuzz_rtp import PacketFactory, answer_media
from bench.fuzz_sdp import offers, variants
from bench.fuzz_sip import (
    TEMPLATES,
    TORTURE,
    DialogFields,
    Mutator,
    Origin,
    Route,
    decode_corpus_text,
    load_seeds,
    parse_head,
    render,
    split_frames,
)
from gateway.sip.message import Request, Response, parse_message

ROUTE = Route("udp", ("127.0.0.1", 40000), ("127.0.0.1", 5080))
FIELDS = DialogFields("c1@127.0.0.1", "ft", "tt", 7, "z9hG4bKx1")
OFFER = (
    b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 4000 RTP/AVP 0"
)


# Folded header lines are valid SIP (RFC 3261 7.3.1) that the gateway's parser does not
# unfold; the template stays in the corpus so the fuzz shows what happens to such requests.
FOLDED = "invite_folded"


def test_every_template_renders_to_a_message_the_gateway_accepts() -> None:
    """Mutations start from valid requests, or they test nothing past the parser."""
    seeds = load_seeds(TEMPLATES, Origin.TEMPLATE)
    assert len(seeds) >= 20
    for seed in seeds:
        if seed.name == FOLDED:
            continue
        data = render(seed, ROUTE, FIELDS, OFFER)
        assert b"{{" not in data, seed.name
        message = parse_message(data)
        assert isinstance(message, Request if seed.method != "response" else Response)
        head, _, body = data.partition(b"\r\n\r\n")
        assert parse_head(data) is not None
        if b"Content-Length" in head or b"\r\nl:" in head:
            assert message.content_length == len(body), seed.name


def test_torture_corpus_is_the_rfc_text() -> None:
    seeds = {s.name: s.text for s in load_seeds(TORTURE, Origin.TORTURE)}
    assert len(seeds) >= 45
    # RFC 4475 3.1.1.2: BEL, NUL and DEL inside the quoted display name, as raw bytes
    assert b'"BEL:\\\x07 NUL:\\\x00 DEL:\\\x7f"' in seeds["intmeth"]
    # every line ends in CRLF, the SDP bodies included (their Content-Length counts it)
    for name in ("wsinv", "esc01", "badinv01", "sdp01"):
        body = seeds[name].partition(b"\r\n\r\n")[2]
        assert b"\n" not in body.replace(b"\r\n", b""), name
    assert len(seeds["esc01"].partition(b"\r\n\r\n")[2]) == 150
    assert decode_corpus_text("a\n<hex>00FF</hex>\n") == b"a\r\n\x00\xff\r\n"


def test_the_mutator_is_seeded_and_bounded() -> None:
    seed = next(s for s in load_seeds(TEMPLATES, Origin.TEMPLATE) if s.name == "invite_sdp")
    data = render(seed, ROUTE, FIELDS, OFFER)

    def run(n: int) -> list[bytes]:
        mutator = Mutator(random.Random(n), max_size=2000)
        return [mutator.mutate(data, data)[0] for _ in range(300)]

    first = run(1)
    assert first == run(1)
    assert first != run(2)
    assert all(len(m) <= 2000 for m in first)
    assert len(set(first)) > 250  # they differ from each other, and from the seed
    assert data not in first[:50]


def test_split_frames_cuts_a_stream_by_content_length() -> None:
    one = b"SIP/2.0 200 OK\r\nCall-ID: a\r\nContent-Length: 3\r\n\r\nabc"
    two = b"SIP/2.0 180 Ringing\r\nl: 0\r\n\r\n"
    frames, rest = split_frames(one + b"\r\n" + two + one[:10])
    assert frames == [one, two]
    assert rest == one[:10]


def test_odd_offers_are_named_and_seeded() -> None:
    named = dict(variants("127.0.0.1", 4000))
    assert {"missing_connection", "ipv6_connection", "srtp_crypto", "huge_ptime"} <= set(named)
    assert offers(random.Random(3), "127.0.0.1", 4000, 200) == offers(
        random.Random(3), "127.0.0.1", 4000, 200
    )
    assert len(offers(random.Random(3), "127.0.0.1", 4000, 5)) == 5


def test_packets_and_the_answers_media() -> None:
    factory = PacketFactory(random.Random(4), event_pt=96)
    audio = factory.audio()
    assert len(audio) == 172
    assert audio[0] == 0x80
    assert factory.event()[1] & 0x7F == 96
    body = (
        b"v=0\r\nc=IN IP4 127.0.0.1\r\nm=audio 20000 RTP/AVP 0 101\r\n"
        b"a=rtpmap:101 telephone-event/8000\r\n"
    )
    media = answer_media(body)
    assert media is not None
    assert (media.host, media.port, media.event_pt) == (
        "127.0.0.1",
        20000,
        101,
    )


LOG = """2026-01-01 10:00:00,000 WARNING gateway.transport: dropped
2026-01-01 10:00:01,000 ERROR gateway.call: call abc@h: inbound call failed
Traceback (most recent call last):
  File "/work/main/gateway/transport.py", line 776, in _deliver
    message = parse_message(data)
gateway.sip.message.BadRequest: 400 Invalid To header

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "/work/main/gateway/call.py", line 969, in _answer_incoming
    await self._run_incoming(ctx)
  File "/work/main/gateway/sip/dialog.py", line 112, in from_uas_request
    route_set=list(invite.record_route),
  File "/x/site-packages/sipmessage/uri.py", line 96, in parse
    raise ValueError("URI is not valid")
  File "/work/main/gateway/sip/message.py", line 188, in check_request
    Address.parse(value)
ValueError: URI is not valid
{"call_id": "one@h", "duration_ms": 10}
Task exception was never retrieved
{"call_id": "two@h", "duration_ms": 250000, "reason": "local hangup"}
"""


def test_scan_log_groups_a_chained_traceback_as_its_last_exception(tmp_path: Path) -> None:
    path = tmp_path / "server.log"
    path.write_text(LOG)
    found = scan_log(path, until=LOG.index('{"call_id": "two'))
    assert found.tracebacks == 1
    assert found.never_retrieved == 1
    [kind] = found.kinds.values()
    # the newest exception, located at our last frame before the library's
    assert kind.signature == "ValueError: URI is not valid @ dialog.py:112 from_uas_request"
    assert "call abc@h: inbound call failed" in kind.context
    assert found.ended_calls == {"one@h"}
    assert found.open_at_end == [("two@h", 250.0, "local hangup")]
    assert found.error_lines


def outcome(**changes: object) -> Outcome:
    sample = ProcSample(rss_kb=200_000, fds=20, udp_sockets=1, tcp_sockets=2, threads=8)
    values: dict[str, object] = dict(
        params={}, inputs={}, rates={}, responses={}, before=sample, after=sample,
        crashed=None, log=LogFindings(), hangs={"x": 0}, api_failures=[], final_call="ok",
        readyz=200, shutdown_seconds=3.0, exit_code=0, torture={}, sdp_outcomes={},
        answered_calls=10, calls_not_ended=[], rtp={},
    )  # fmt: skip
    values.update(changes)
    return Outcome(**values)  # type: ignore[arg-type]


def test_judge_passes_a_clean_run_and_names_each_failure() -> None:
    bounds = Bounds()
    assert all(c.ok for c in judge(outcome(), bounds))
    grown = ProcSample(rss_kb=200_000 + 90 * 1024, fds=29, udp_sockets=2, tcp_sockets=2,
                       threads=8, udp_ports=(5000, 20002))  # fmt: skip
    failed = {c.name: c.detail for c in judge(outcome(after=grown, shutdown_seconds=13.0,
              hangs={"INVITEs left at 1xx": 2}, readyz=503), bounds) if not c.ok}  # fmt: skip
    assert set(failed) == {"RSS growth", "open files growth", "UDP sockets back to baseline",
                           "no hangs", "/readyz answers 200", "SIGTERM stop in time"}  # fmt: skip
    assert "INVITEs left at 1xx=2" in failed["no hangs"]
    killed = {c.name for c in judge(outcome(shutdown_seconds=None), bounds) if not c.ok}
    assert killed == {"SIGTERM stop in time"}
