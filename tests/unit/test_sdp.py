"""SDP offer/answer against the kinds of bodies real SIP peers send, and against garbage."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.media.sdp import (
    SUPPORTED,
    TELEPHONE_EVENT_PT,
    Attribute,
    Connection,
    NegotiatedMedia,
    SdpError,
    SessionDescription,
    create_answer,
    create_offer,
    parse_answer,
)


def crlf(text: str) -> str:
    """Inline SDP below is written one line per source line; peers send CRLF."""
    return "".join(line.strip() + "\r\n" for line in text.strip().splitlines())


# SIPp's built-in uac scenario body.
SIPP_OFFER = crlf("""
    v=0
    o=user1 53655765 2353687637 IN IP4 127.0.0.1
    s=-
    c=IN IP4 127.0.0.1
    t=0 0
    m=audio 6000 RTP/AVP 0
    a=rtpmap:0 PCMU/8000
""")

# baresip with opus first, a video stream and its usual extra attributes.
BARESIP_OFFER = crlf("""
    v=0
    o=- 1452829466 3297123548 IN IP4 192.168.1.23
    s=-
    c=IN IP4 192.168.1.23
    t=0 0
    a=tool:baresip 3.10.1
    m=audio 10380 RTP/AVP 96 9 0 8 101
    b=AS:96
    a=rtpmap:96 opus/48000/2
    a=fmtp:96 stereo=1;sprop-stereo=1
    a=rtpmap:9 G722/8000
    a=rtpmap:0 PCMU/8000
    a=rtpmap:8 PCMA/8000
    a=rtpmap:101 telephone-event/8000
    a=fmtp:101 0-15
    a=sendrecv
    a=label:1
    a=ssrc:2934612330 cname:6c2f8f4a-7d8e-4d8a-bc1e-2c2f5f1c3f5a
    a=rtcp-rsize
    m=video 10382 RTP/AVP 97 98
    b=AS:1000
    a=rtpmap:97 VP8/90000
    a=rtpmap:98 H264/90000
    a=fmtp:98 packetization-mode=0;profile-level-id=42e01f
    a=sendrecv
""")

# Asterisk (chan_pjsip) style offer that prefers alaw and uses telephone-event 100.
ASTERISK_OFFER = crlf("""
    v=0
    o=- 1685339781 1685339781 IN IP4 10.0.0.5
    s=Asterisk
    c=IN IP4 10.0.0.5
    t=0 0
    m=audio 17238 RTP/AVP 8 0 3 100
    a=rtpmap:8 PCMA/8000
    a=rtpmap:0 PCMU/8000
    a=rtpmap:3 GSM/8000
    a=rtpmap:100 telephone-event/8000
    a=fmtp:100 0-16
    a=ptime:20
    a=maxptime:150
    a=sendrecv
""")

# Asterisk answering our offer with alaw and its own event payload type.
ASTERISK_ANSWER_PCMA = crlf("""
    v=0
    o=- 1685339781 1685339782 IN IP4 10.0.0.5
    s=Asterisk
    c=IN IP4 10.0.0.5
    t=0 0
    m=audio 17240 RTP/AVP 8 100
    a=rtpmap:8 PCMA/8000
    a=rtpmap:100 telephone-event/8000
    a=fmtp:100 0-16
    a=ptime:20
    a=maxptime:150
    a=sendrecv
""")

# An IPv6 softphone with c= only at media level and static PCMU without rtpmap.
IPV6_OFFER = crlf("""
    v=0
    o=- 3851046401 3851046401 IN IP6 2001:db8::10
    s=call
    t=0 0
    m=audio 40000 RTP/AVP 0 96
    c=IN IP6 2001:db8::10
    a=rtpmap:96 telephone-event/8000
    a=fmtp:96 0-15
""")


def our_offer(
    *, codecs: Sequence[str] = ("PCMU", "PCMA"), telephone_event: bool = True
) -> SessionDescription:
    return create_offer(
        "192.0.2.10", 20000, session_id=4242, codecs=codecs, telephone_event=telephone_event
    )


# --------------------------------------------------------------------------------------------
# create_offer
# --------------------------------------------------------------------------------------------


def test_offer_exact_text() -> None:
    assert str(our_offer()) == crlf("""
        v=0
        o=ackline 4242 0 IN IP4 192.0.2.10
        s=ackline
        c=IN IP4 192.0.2.10
        t=0 0
        m=audio 20000 RTP/AVP 0 8 101
        a=rtpmap:0 PCMU/8000
        a=rtpmap:8 PCMA/8000
        a=rtpmap:101 telephone-event/8000
        a=fmtp:101 0-15
        a=ptime:20
        a=sendrecv
    """)


def test_offer_options() -> None:
    offer = create_offer(
        "pbx.example.net", 30000, codecs=("pcma",), telephone_event=False, direction="sendonly"
    )
    text = str(offer)
    assert "c=IN IP4 pbx.example.net\r\n" in text
    assert "m=audio 30000 RTP/AVP 8\r\n" in text
    assert "telephone-event" not in text
    assert text.endswith("a=ptime:20\r\na=sendonly\r\n")
    assert offer.origin.session_id > 0


def test_offer_ipv6() -> None:
    offer = create_offer("[2001:db8::1]", 20000, session_id=1)
    text = str(offer)
    assert "o=ackline 1 0 IN IP6 2001:db8::1\r\n" in text
    assert "c=IN IP6 2001:db8::1\r\n" in text


CODECS_REFUSED = "codecs must be distinct names from"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: create_offer("192.0.2.10", 20000, codecs=()), CODECS_REFUSED),
        (lambda: create_offer("192.0.2.10", 20000, codecs=("G729",)), CODECS_REFUSED),
        (lambda: create_offer("192.0.2.10", 20000, codecs=("PCMU", "pcmu")), CODECS_REFUSED),
        (lambda: create_offer("192.0.2.10", 20000, direction="both"), "direction must be one of"),
        (lambda: create_offer("192.0.2.10", 20000, version=-1), "must not be negative"),
        (
            lambda: create_answer(SIPP_OFFER, "192.0.2.10", 20000, codecs=("opus",)),
            CODECS_REFUSED,
        ),
    ],
)
def test_offer_rejects_bad_arguments(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(("host", "port"), [("", 20000), ("a b", 20000), ("1.2.3.4", 0)])
def test_offer_rejects_bad_local_address(host: str, port: int) -> None:
    with pytest.raises(ValueError, match=r"bad local (host|port)"):
        create_offer(host, port)


def test_constants() -> None:
    assert SUPPORTED == {"PCMU": 0, "PCMA": 8}
    assert TELEPHONE_EVENT_PT == 101


# --------------------------------------------------------------------------------------------
# Parsing and serialisation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [SIPP_OFFER, BARESIP_OFFER, ASTERISK_OFFER, IPV6_OFFER])
def test_real_bodies_round_trip_byte_for_byte(text: str) -> None:
    assert str(SessionDescription.parse(text)) == text
    assert SessionDescription.parse(text.encode()).to_bytes() == text.encode()


def test_lf_only_and_trailing_whitespace_accepted() -> None:
    text = SIPP_OFFER.replace("\r\n", " \n") + "\n\n"
    assert str(SessionDescription.parse(text)) == SIPP_OFFER


def test_parse_fields_and_unknown_attributes_kept() -> None:
    sdp = SessionDescription.parse(BARESIP_OFFER)
    assert sdp.origin.session_id == 1452829466
    assert sdp.origin.version == 3297123548
    assert sdp.connection == Connection("IN", "IP4", "192.168.1.23")
    assert sdp.attributes == [Attribute("tool", "baresip 3.10.1")]
    audio, video = sdp.media
    assert (audio.media, audio.port, audio.proto) == ("audio", 10380, "RTP/AVP")
    assert audio.formats == ["96", "9", "0", "8", "101"]
    assert audio.lines == [("b", "AS:96")]
    assert audio.has("rtcp-rsize")
    assert audio.values("label") == ["1"]
    assert audio.values("ssrc") == ["2934612330 cname:6c2f8f4a-7d8e-4d8a-bc1e-2c2f5f1c3f5a"]
    maps = audio.rtpmaps()
    assert (maps[96].encoding, maps[96].clock_rate, maps[96].channels) == ("opus", 48000, 2)
    assert audio.fmtp(96) == "stereo=1;sprop-stereo=1"
    assert audio.fmtp(0) is None
    assert audio.ptime is None
    assert sdp.direction_of(audio) == "sendrecv"
    assert video.media == "video"
    assert video.rtpmaps()[98].encoding == "H264"
    assert sdp.audio_index() == 0


def test_static_payload_types_without_rtpmap() -> None:
    sdp = SessionDescription.parse(IPV6_OFFER)
    maps = sdp.media[0].rtpmaps()
    assert maps[0].encoding == "PCMU"
    assert maps[96].encoding == "telephone-event"
    assert sdp.connection is None
    assert sdp.connection_of(sdp.media[0]) == Connection("IN", "IP6", "2001:db8::10")


def test_serialiser_puts_lines_in_rfc_order() -> None:
    sdp = SessionDescription.parse(SIPP_OFFER)
    sdp.lines.insert(0, ("b", "AS:64"))
    sdp.lines.append(("i", "info"))
    sdp.media[0].lines.append(("i", "media info"))
    text = str(sdp)
    assert "s=-\r\ni=info\r\nc=IN IP4 127.0.0.1\r\nb=AS:64\r\nt=0 0\r\n" in text
    assert "m=audio 6000 RTP/AVP 0\r\ni=media info\r\na=rtpmap" in text


def test_port_count_and_multicast_ttl() -> None:
    text = SIPP_OFFER.replace("m=audio 6000 ", "m=audio 6000/2 ").replace(
        "c=IN IP4 127.0.0.1", "c=IN IP4 224.2.1.1/127"
    )
    sdp = SessionDescription.parse(text)
    assert sdp.media[0].port_count == 2
    assert sdp.connection is not None
    assert sdp.connection.host == "224.2.1.1"
    assert str(sdp) == text


def test_bump_version() -> None:
    sdp = our_offer()
    sdp.bump_version()
    sdp.bump_version()
    assert sdp.origin.version == 2
    assert sdp.origin.session_id == 4242
    assert "o=ackline 4242 2 IN IP4 192.0.2.10\r\n" in str(sdp)


def test_set_direction_replaces_existing() -> None:
    sdp = our_offer()
    sdp.media[0].set_direction("inactive")
    assert sdp.media[0].values("sendrecv") == []
    assert sdp.direction_of(sdp.media[0]) == "inactive"
    with pytest.raises(ValueError, match="direction must be one of"):
        sdp.media[0].set_direction("off")


MALFORMED = [
    "",
    "\r\n\r\n",
    "hello world",
    "v=1\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\n",
    "o=- 1 1 IN IP4 1.2.3.4\r\nv=0\r\n",
    "v=0\r\ns=-\r\nt=0 0\r\n",
    "v=0\r\no=- 1 1 IN IP4\r\n",
    "v=0\r\no=- abc 1 IN IP4 1.2.3.4\r\n",
    "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\no=- 1 1 IN IP4 1.2.3.4\r\n",
    "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nv=0\r\n",
    "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4\r\n",
    "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 1.1.1.1\r\nc=IN IP4 1.1.1.1\r\n",
    "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio abc RTP/AVP 0\r\n",
    "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 70000 RTP/AVP 0\r\n",
    "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 4000/0 RTP/AVP 0\r\n",
    "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP\r\n",
    "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP 200\r\n",
    "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP PCMU\r\n",
    "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP 0\r\ns=late\r\n",
    "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP 0\r\na=rtpmap:x PCMU/8000\r\n",
    "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP 0\r\na=rtpmap:0 PCMU\r\n",
    "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP 0\r\na=rtpmap:0 PCMU/0\r\n",
    "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP 0\r\na=rtpmap\r\n",
    "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP 0\r\na=ptime:abc\r\n",
    "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP 0\r\na=fmtp:\r\n",
    "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP 0\r\na=:x\r\n",
    "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nno equals sign\r\n",
    "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nM=audio 4000 RTP/AVP 0\r\n",
    "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP 0\r\nc=IN IP4 1.1.1.1\r\n"
    "c=IN IP4 1.1.1.1\r\n",
]


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_sdp_raises_sdp_error(text: str) -> None:
    with pytest.raises(SdpError):
        SessionDescription.parse(text)


def test_invalid_utf8_raises_sdp_error() -> None:
    with pytest.raises(SdpError):
        SessionDescription.parse(b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=\xff\xfe\r\n")


def test_sdp_error_is_a_value_error() -> None:
    assert issubclass(SdpError, ValueError)


# --------------------------------------------------------------------------------------------
# create_answer
# --------------------------------------------------------------------------------------------


def test_answer_to_baresip_picks_first_supported_and_rejects_video() -> None:
    answer, media = create_answer(BARESIP_OFFER, "192.0.2.10", 20000, session_id=7)
    assert media == NegotiatedMedia(
        remote_host="192.168.1.23",
        remote_port=10380,
        payload_type=0,
        codec="PCMU",
        clock_rate=8000,
        telephone_event_pt=101,
        ptime=20,
        direction="sendrecv",
    )
    assert media.can_send
    assert media.can_receive
    assert str(answer) == crlf("""
        v=0
        o=ackline 7 0 IN IP4 192.0.2.10
        s=ackline
        c=IN IP4 192.0.2.10
        t=0 0
        m=audio 20000 RTP/AVP 0 101
        a=rtpmap:0 PCMU/8000
        a=rtpmap:101 telephone-event/8000
        a=fmtp:101 0-15
        a=ptime:20
        a=sendrecv
        m=video 0 RTP/AVP 97 98
    """)


def test_answer_follows_offerer_preference_over_ours() -> None:
    answer, media = create_answer(ASTERISK_OFFER, "192.0.2.10", 20000, codecs=("PCMU", "PCMA"))
    assert (media.codec, media.payload_type, media.telephone_event_pt) == ("PCMA", 8, 100)
    assert answer.media[0].formats == ["8", "100"]
    assert answer.media[0].fmtp(100) == "0-15"


def test_answer_restricted_to_our_codecs() -> None:
    _, media = create_answer(ASTERISK_OFFER, "192.0.2.10", 20000, codecs=("PCMU",))
    assert (media.codec, media.payload_type) == ("PCMU", 0)


def test_answer_no_common_codec() -> None:
    with pytest.raises(SdpError):
        create_answer(SIPP_OFFER, "192.0.2.10", 20000, codecs=("PCMA",))
    g729_only = SIPP_OFFER.replace("RTP/AVP 0", "RTP/AVP 18").replace(
        "a=rtpmap:0 PCMU/8000", "a=rtpmap:18 G729/8000"
    )
    with pytest.raises(SdpError):
        create_answer(g729_only, "192.0.2.10", 20000)


def test_answer_wideband_pcmu_is_not_g711() -> None:
    odd = SIPP_OFFER.replace("RTP/AVP 0", "RTP/AVP 97").replace(
        "a=rtpmap:0 PCMU/8000", "a=rtpmap:97 PCMU/16000"
    )
    with pytest.raises(SdpError):
        create_answer(odd, "192.0.2.10", 20000)


def test_answer_without_telephone_event() -> None:
    answer, media = create_answer(SIPP_OFFER, "192.0.2.10", 20000)
    assert media.telephone_event_pt is None
    assert answer.media[0].formats == ["0"]
    assert "telephone-event" not in str(answer)


def test_answer_ipv6_media_level_connection() -> None:
    answer, media = create_answer(IPV6_OFFER, "2001:db8::20", 30000)
    assert (media.remote_host, media.remote_port) == ("2001:db8::10", 40000)
    assert (media.codec, media.telephone_event_pt) == ("PCMU", 96)
    assert "c=IN IP6 2001:db8::20\r\n" in str(answer)


def test_answer_skips_srtp_stream_and_uses_plain_audio() -> None:
    offer = crlf("""
        v=0
        o=- 5 5 IN IP4 198.51.100.7
        s=-
        c=IN IP4 198.51.100.7
        t=0 0
        m=audio 5004 RTP/SAVP 0
        a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz
        m=audio 5006 RTP/AVP 8 0
    """)
    answer, media = create_answer(offer, "192.0.2.10", 20000)
    assert (media.remote_port, media.codec) == (5006, "PCMA")
    assert [(m.port, m.proto) for m in answer.media] == [(0, "RTP/SAVP"), (20000, "RTP/AVP")]


@pytest.mark.parametrize(
    "offer",
    [
        SIPP_OFFER.replace("RTP/AVP", "RTP/SAVP"),
        SIPP_OFFER.replace("m=audio 6000", "m=audio 0"),
        SIPP_OFFER.replace("m=audio", "m=video"),
        SIPP_OFFER.replace("c=IN IP4 127.0.0.1\r\n", ""),
        SIPP_OFFER.replace("c=IN IP4", "c=ATM NSAP"),
    ],
)
def test_answer_unusable_offer(offer: str) -> None:
    with pytest.raises(SdpError):
        create_answer(offer, "192.0.2.10", 20000)


def test_answer_copies_offer_timing() -> None:
    offer = SIPP_OFFER.replace("t=0 0", "t=3034423619 3042462419\r\nr=604800 3600 0 90000")
    answer, _ = create_answer(offer, "192.0.2.10", 20000)
    assert answer.lines == [("t", "3034423619 3042462419"), ("r", "604800 3600 0 90000")]


def test_answer_takes_remote_ptime() -> None:
    _, media = create_answer(SIPP_OFFER + "a=ptime:30\r\n", "192.0.2.10", 20000)
    assert media.ptime == 30


# --------------------------------------------------------------------------------------------
# parse_answer
# --------------------------------------------------------------------------------------------


def test_parse_answer_pcma_and_peer_event_type() -> None:
    media = parse_answer(ASTERISK_ANSWER_PCMA, our_offer())
    assert media == NegotiatedMedia(
        "10.0.0.5", 17240, 8, "PCMA", 8000, 100, 20, "sendrecv",
        extra_audio=((0, "PCMU"),), extra_events=(101,),
    )  # fmt: skip


@pytest.mark.parametrize("event_pt", [96, 101, 126])
def test_parse_answer_receives_events_on_the_offered_and_the_answered_type(event_pt: int) -> None:
    """RFC 3264 §5.1: we offered telephone-event/101, so the callee may send on 101 even
    when its answer numbers it otherwise; we send on the answer's number."""
    answer = ASTERISK_ANSWER_PCMA.replace("100", str(event_pt))
    media = parse_answer(answer, our_offer())
    assert media.telephone_event_pt == event_pt
    assert media.receive_events == {101, event_pt}


def test_parse_answer_receives_every_offered_codec() -> None:
    """The answer prefers PCMA (we send PCMA) but a compliant callee sends our first
    choice, PCMU, which it also listed (RFC 3264 §6.1): both decode."""
    answer = ASTERISK_ANSWER_PCMA.replace("8 100", "8 0 100")
    media = parse_answer(answer, our_offer())
    assert (media.payload_type, media.codec) == (8, "PCMA")
    assert media.receive_audio == {8: "PCMA", 0: "PCMU"}
    only_pcmu = parse_answer(answer.replace("8 0 100", "0 100"), our_offer(codecs=("PCMU",)))
    assert only_pcmu.receive_audio == {0: "PCMU"}


def test_parse_answer_without_events_receives_none() -> None:
    media = parse_answer(ASTERISK_ANSWER_PCMA.replace("8 100", "8"), our_offer())
    assert media.telephone_event_pt is None
    assert media.receive_events == frozenset()


def test_create_answer_receives_on_what_it_answered() -> None:
    _, media = create_answer(ASTERISK_OFFER, "192.0.2.10", 20000)
    assert media.receive_audio == {media.payload_type: media.codec}
    assert media.receive_events == {100}


def test_parse_answer_accepts_bytes_and_objects() -> None:
    offer = our_offer()
    expected = parse_answer(ASTERISK_ANSWER_PCMA, offer)
    assert parse_answer(ASTERISK_ANSWER_PCMA.encode(), offer) == expected
    assert parse_answer(SessionDescription.parse(ASTERISK_ANSWER_PCMA), offer) == expected


def test_parse_answer_first_offered_codec_in_answer_order() -> None:
    answer = ASTERISK_ANSWER_PCMA.replace("RTP/AVP 8 100", "RTP/AVP 18 0 8 100")
    answer = answer.replace("a=rtpmap:8 PCMA/8000", "a=rtpmap:18 G729/8000")
    media = parse_answer(answer, our_offer())
    assert (media.codec, media.payload_type) == ("PCMU", 0)


def test_parse_answer_ignores_codec_we_did_not_offer() -> None:
    media = parse_answer(ASTERISK_ANSWER_PCMA.replace("8 100", "8 0 100"), our_offer())
    assert media.codec == "PCMA"
    with pytest.raises(SdpError):
        parse_answer(ASTERISK_ANSWER_PCMA, our_offer(codecs=("PCMU",)))


@pytest.mark.parametrize("event_pt", [96, 100, 101, 127])
def test_dynamic_telephone_event_pt(event_pt: int) -> None:
    answer = ASTERISK_ANSWER_PCMA.replace("100", str(event_pt))
    assert parse_answer(answer, our_offer()).telephone_event_pt == event_pt
    offer = ASTERISK_OFFER.replace("100", str(event_pt))
    answer_sdp, media = create_answer(offer, "192.0.2.10", 20000)
    assert media.telephone_event_pt == event_pt
    assert answer_sdp.media[0].formats == ["8", str(event_pt)]
    assert answer_sdp.media[0].rtpmaps()[event_pt].encoding == "telephone-event"


def test_parse_answer_event_only_if_offered() -> None:
    assert (
        parse_answer(ASTERISK_ANSWER_PCMA, our_offer(telephone_event=False)).telephone_event_pt
        is None
    )
    no_events = ASTERISK_ANSWER_PCMA.replace("8 100", "8")
    assert parse_answer(no_events, our_offer()).telephone_event_pt is None


def test_parse_answer_rejected_stream() -> None:
    with pytest.raises(SdpError):
        parse_answer(ASTERISK_ANSWER_PCMA.replace("m=audio 17240", "m=audio 0"), our_offer())


@pytest.mark.parametrize(
    "answer",
    [
        ASTERISK_ANSWER_PCMA.replace("8 100", "18 100").replace("rtpmap:8 PCMA", "rtpmap:18 G729"),
        ASTERISK_ANSWER_PCMA + "m=video 0 RTP/AVP 97\r\n",
        ASTERISK_ANSWER_PCMA.replace("m=audio", "m=video"),
        ASTERISK_ANSWER_PCMA.replace("RTP/AVP", "RTP/SAVP"),
        ASTERISK_ANSWER_PCMA.replace("c=IN IP4 10.0.0.5\r\n", ""),
        "not sdp",
    ],
)
def test_parse_answer_unacceptable(answer: str) -> None:
    with pytest.raises(SdpError):
        parse_answer(answer, our_offer())


def test_parse_answer_media_connection_and_ptime() -> None:
    answer = ASTERISK_ANSWER_PCMA.replace("a=rtpmap:8", "c=IN IP4 10.0.0.99\r\na=rtpmap:8")
    answer = answer.replace("a=ptime:20", "a=ptime:30")
    media = parse_answer(answer, our_offer())
    assert (media.remote_host, media.ptime) == ("10.0.0.99", 30)


# --------------------------------------------------------------------------------------------
# Hold and resume
# --------------------------------------------------------------------------------------------


def answer_with(direction: str, host: str = "10.0.0.5") -> str:
    return ASTERISK_ANSWER_PCMA.replace("a=sendrecv", f"a={direction}").replace(
        "c=IN IP4 10.0.0.5", f"c=IN IP4 {host}"
    )


def test_we_hold_and_resume_with_reoffers() -> None:
    first = our_offer()
    assert parse_answer(ASTERISK_ANSWER_PCMA, first).direction == "sendrecv"

    hold = create_offer("192.0.2.10", 20000, session_id=4242, version=1, direction="sendonly")
    assert "o=ackline 4242 1 IN IP4" in str(hold)
    assert "a=sendonly\r\n" in str(hold)
    held = parse_answer(answer_with("recvonly"), hold)
    assert (held.direction, held.can_send, held.can_receive) == ("sendonly", True, False)
    assert parse_answer(answer_with("inactive"), hold).direction == "inactive"
    # A peer that ignores the hold and answers sendrecv still cannot make us receive.
    assert parse_answer(ASTERISK_ANSWER_PCMA, hold).direction == "sendonly"

    resume = create_offer("192.0.2.10", 20000, session_id=4242, version=2)
    assert "o=ackline 4242 2 IN IP4" in str(resume)
    assert parse_answer(ASTERISK_ANSWER_PCMA, resume).direction == "sendrecv"


def test_answer_with_null_address_means_do_not_send() -> None:
    media = parse_answer(answer_with("sendrecv", host="0.0.0.0"), our_offer())
    assert media.direction == "recvonly"
    assert not media.can_send


@pytest.mark.parametrize(
    ("offer_direction", "answer_direction"),
    [
        ("sendrecv", "sendrecv"),
        ("sendonly", "recvonly"),
        ("recvonly", "sendonly"),
        ("inactive", "inactive"),
    ],
)
def test_remote_hold_mirrors_direction(offer_direction: str, answer_direction: str) -> None:
    offer = ASTERISK_OFFER.replace("a=sendrecv", f"a={offer_direction}")
    answer, media = create_answer(offer, "192.0.2.10", 20000)
    assert media.direction == answer_direction
    assert answer.direction_of(answer.media[0]) == answer_direction
    assert f"a={answer_direction}\r\n" in str(answer)


def test_remote_hold_rfc2543_null_connection() -> None:
    offer = ASTERISK_OFFER.replace("c=IN IP4 10.0.0.5", "c=IN IP4 0.0.0.0")
    answer, media = create_answer(offer, "192.0.2.10", 20000)
    assert (media.direction, media.remote_host, media.can_send) == ("recvonly", "0.0.0.0", False)
    assert "a=recvonly\r\n" in str(answer)


def test_remote_hold_ipv6_null_connection() -> None:
    offer = IPV6_OFFER.replace("c=IN IP6 2001:db8::10", "c=IN IP6 ::")
    _, media = create_answer(offer, "2001:db8::20", 30000)
    assert media.direction == "recvonly"


def test_session_level_direction_applies() -> None:
    offer = ASTERISK_OFFER.replace("a=sendrecv\r\n", "").replace(
        "t=0 0\r\n", "t=0 0\r\na=sendonly\r\n"
    )
    _, media = create_answer(offer, "192.0.2.10", 20000)
    assert media.direction == "recvonly"


def test_remote_hold_then_resume_sequence() -> None:
    hold = ASTERISK_OFFER.replace("1685339781 1685339781", "1685339781 1685339782").replace(
        "a=sendrecv", "a=sendonly"
    )
    answer, held = create_answer(hold, "192.0.2.10", 20000, session_id=9, version=1)
    assert held.direction == "recvonly"
    assert answer.origin.version == 1
    resume = ASTERISK_OFFER.replace("1685339781 1685339781", "1685339781 1685339783")
    answer, resumed = create_answer(resume, "192.0.2.10", 20000, session_id=9, version=2)
    assert resumed.direction == "sendrecv"
    assert answer.origin.version == 2


def test_offer_answer_between_two_instances() -> None:
    """Our own offer answered by our own answerer lands on PCMU and our event type."""
    offer = create_offer("192.0.2.10", 20000, session_id=1)
    answer, callee_view = create_answer(str(offer), "192.0.2.20", 30000, codecs=("PCMA", "PCMU"))
    caller_view = parse_answer(str(answer), offer)
    assert (callee_view.codec, caller_view.codec) == ("PCMU", "PCMU")
    assert (callee_view.remote_port, caller_view.remote_port) == (20000, 30000)
    assert caller_view.telephone_event_pt == callee_view.telephone_event_pt == 101


# --------------------------------------------------------------------------------------------
# Robustness: anything that is not valid SDP raises SdpError and nothing else
# --------------------------------------------------------------------------------------------

GOOD_LINES = [
    "s=-", "c=IN IP4 192.0.2.1", "c=IN IP4 0.0.0.0", "c=IN IP6 ::1", "c=IN IP4 10.0.0.1/127",
    "t=0 0", "b=AS:64", "i=info", "k=prompt", "x=unknown", "m=audio 4000 RTP/AVP 0 8 101",
    "m=audio 4002 RTP/AVP 8 0", "m=audio 4004 RTP/AVP 18 96", "m=audio 0 RTP/AVP 0",
    "m=video 5000 RTP/AVP 96", "m=audio 4000/2 RTP/AVP 18", "m=image 0 udptl t38",
    "m=audio 4000 RTP/SAVP 0", "a=rtpmap:0 PCMU/8000", "a=rtpmap:8 PCMA/8000",
    "a=rtpmap:101 telephone-event/8000", "a=rtpmap:96 telephone-event/8000/1",
    "a=rtpmap:8 PCMU/16000", "a=fmtp:101 0-15", "a=ptime:20", "a=ptime:20.5", "a=ptime:0",
    "a=sendonly", "a=recvonly", "a=inactive", "a=sendrecv", "a=x:y", "a=flag",
]  # fmt: skip
BAD_LINES = [
    "v=0", "o=", "o=- 1 2 IN IP4 1.2.3.4", "s=", "c=IN IP4", "m=audio 99999 RTP/AVP 0", "m=",
    "a=rtpmap:0 PCMU", "a=rtpmap:", "a=fmtp:", "a=ptime:", "a=", "=", "",
]  # fmt: skip


def sdp_like() -> st.SearchStrategy[str]:
    """Well-formed lines in random order, half the time with one broken or random line."""

    def build(args: tuple[list[str], str | None, int]) -> str:
        lines, intruder, position = args
        if intruder is not None:
            lines.insert(position % (len(lines) + 1), intruder)
        return "".join(f"{x}\r\n" for x in ["v=0", "o=- 1 2 IN IP4 1.2.3.4", *lines])

    intruder = st.one_of(st.none(), st.sampled_from(BAD_LINES), st.text(max_size=20))
    return st.tuples(
        st.lists(st.sampled_from(GOOD_LINES), max_size=25), intruder, st.integers(0, 30)
    ).map(build)


def mutated() -> st.SearchStrategy[str]:
    bodies = [SIPP_OFFER, BARESIP_OFFER, ASTERISK_OFFER, ASTERISK_ANSWER_PCMA, IPV6_OFFER]

    def mutate(args: tuple[str, int, int, str]) -> str:
        body, start, length, insert = args
        start %= len(body)
        return body[:start] + insert + body[start + length :]

    return st.tuples(
        st.sampled_from(bodies), st.integers(0, 2000), st.integers(0, 12), st.text(max_size=6)
    ).map(mutate)


ANY_TEXT = st.one_of(st.text(), st.binary(), sdp_like(), mutated())


def only_sdp_errors(text: str | bytes) -> None:
    """Run every entry point on ``text``; anything but SdpError propagates and fails."""
    try:
        sdp = SessionDescription.parse(text)
    except SdpError:
        sdp = None
    if sdp is not None:
        # What we accept we can re-serialise, and that is a fixed point.
        again = SessionDescription.parse(str(sdp))
        assert str(again) == str(sdp)
    with contextlib.suppress(SdpError):
        create_answer(text, "192.0.2.10", 20000)
    with contextlib.suppress(SdpError):
        parse_answer(text, create_offer("192.0.2.10", 20000, session_id=1))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ANY_TEXT)
def test_random_input_only_ever_raises_sdp_error(text: str | bytes) -> None:
    only_sdp_errors(text)


@settings(max_examples=300, deadline=None)
@given(sdp_like())
def test_sdp_like_input_negotiates_or_raises_sdp_error(text: str) -> None:
    only_sdp_errors(text)
    only_sdp_errors(text.replace("\r\n", "\n").encode())


RFC4475_SDP = (
    "v=0\r\no=mhandley 29739 7272939 IN IP4 192.0.2.3\r\ns=-\r\nc=IN IP4 192.0.2.4\r\n"
    "t=0 0\r\nm=audio 49217 RTP/AVP 0 12\r\nm=video 3227 RTP/AVP 31\r\na=rtpmap:31 LPC\r\n"
)


def test_an_odd_attribute_on_a_stream_we_do_not_use_does_not_refuse_the_call() -> None:
    """RFC 4475's messages carry this body: its video stream's rtpmap has no clock rate.
    We only interpret audio streams' attributes; the video stream is declined (port 0)."""
    answer, media = create_answer(RFC4475_SDP, "192.0.2.10", 20000)
    assert (media.codec, media.remote_host, media.remote_port) == ("PCMU", "192.0.2.4", 49217)
    assert [(m.media, m.port) for m in answer.media] == [("audio", 20000), ("video", 0)]
    on_audio = RFC4475_SDP.replace("RTP/AVP 0 12\r\n", "RTP/AVP 0 12\r\na=rtpmap:0 LPC\r\n")
    with pytest.raises(SdpError):  # the same attribute on the audio stream still counts
        create_answer(on_audio, "192.0.2.10", 20000)


@pytest.mark.parametrize("address", ["media.example.com", "127.0.0.1\u202e", "127.0.0.1.5"])
def test_a_connection_address_that_is_not_an_ip_is_refused(address: str) -> None:
    """RTP is sent from the media clock's tick: no name lookup there (and a name that is
    not even ASCII made every send raise)."""
    offer = SIPP_OFFER.replace("c=IN IP4 127.0.0.1", f"c=IN IP4 {address}")
    assert offer != SIPP_OFFER
    with pytest.raises(SdpError, match="not an IP address"):
        create_answer(offer, "192.0.2.10", 20000)
