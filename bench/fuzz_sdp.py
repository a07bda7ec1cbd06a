"""SDP offers for the fuzzer's INVITEs: named hand-made oddities (what real phones and
broken gateways send) and seeded line-level mutations of a good offer. Pure.

Bodies are returned without the last CRLF (the INVITE template ends the line).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from bench.fuzz_sip import NUMBERS, SPECIAL_BYTES


def _sdp(*lines: str) -> bytes:
    return "\r\n".join(lines).encode()


def good_offer(host: str, port: int) -> bytes:
    """What a plain phone offers: PCMU, PCMA and RFC 4733 events."""
    return _sdp("v=0", f"o=- 1 1 IN IP4 {host}", "s=-", f"c=IN IP4 {host}", "t=0 0",
                f"m=audio {port} RTP/AVP 0 8 101", "a=rtpmap:0 PCMU/8000",
                "a=rtpmap:8 PCMA/8000", "a=rtpmap:101 telephone-event/8000",
                "a=fmtp:101 0-16", "a=ptime:20", "a=sendrecv")  # fmt: skip


def variants(host: str, port: int) -> list[tuple[str, bytes]]:
    """Named offers, each odd in one way; the gateway must answer (200) or refuse (488,
    400, 415) every one, and hang up cleanly."""
    v, o, s, t = "v=0", f"o=- 7 7 IN IP4 {host}", "s=-", "t=0 0"
    c = f"c=IN IP4 {host}"
    pcmu = "a=rtpmap:0 PCMU/8000"
    events = ("a=rtpmap:101 telephone-event/8000", "a=fmtp:101 0-15")
    audio = f"m=audio {port} RTP/AVP 0 101"
    return [
        ("plain", good_offer(host, port)),
        (
            "video_then_audio",
            _sdp(
                v,
                o,
                s,
                c,
                t,
                f"m=video {port + 2} RTP/AVP 31",
                "a=rtpmap:31 H261/90000",
                audio,
                pcmu,
                *events,
            ),
        ),
        (
            "two_audio",
            _sdp(
                v,
                o,
                s,
                c,
                t,
                f"m=audio {port} RTP/AVP 8",
                "a=rtpmap:8 PCMA/8000",
                f"m=audio {port + 2} RTP/AVP 0",
                pcmu,
            ),
        ),
        (
            "audio_port_zero_then_audio",
            _sdp(v, o, s, c, t, "m=audio 0 RTP/AVP 0", f"m=audio {port} RTP/AVP 0", pcmu),
        ),
        ("no_audio", _sdp(v, o, s, c, t, f"m=video {port} RTP/AVP 96", "a=rtpmap:96 VP8/90000")),
        ("application_only", _sdp(v, o, s, c, t, f"m=application {port} UDP/BFCP *")),
        (
            "only_unknown_codecs",
            _sdp(
                v,
                o,
                s,
                c,
                t,
                f"m=audio {port} RTP/AVP 18 96 97",
                "a=rtpmap:18 G729/8000",
                "a=rtpmap:96 opus/48000/2",
                "a=rtpmap:97 AMR-WB/16000",
            ),
        ),
        ("dynamic_pt_without_rtpmap", _sdp(v, o, s, c, t, f"m=audio {port} RTP/AVP 96 97")),
        ("static_pt_without_rtpmap", _sdp(v, o, s, c, t, f"m=audio {port} RTP/AVP 0")),
        ("events_only", _sdp(v, o, s, c, t, f"m=audio {port} RTP/AVP 101", *events)),
        (
            "rtpmap_garbage",
            _sdp(
                v,
                o,
                s,
                c,
                t,
                f"m=audio {port} RTP/AVP 0 96",
                "a=rtpmap:96 ",
                "a=rtpmap:abc PCMU/8000",
                "a=rtpmap:0 PCMU/0",
                "a=rtpmap:0 PCMU/-8000",
                "a=rtpmap:999 PCMA/8000",
                "a=rtpmap:0 PCMU/8000/0",
            ),
        ),
        (
            "fmtp_garbage",
            _sdp(
                v,
                o,
                s,
                c,
                t,
                audio,
                pcmu,
                "a=rtpmap:101 telephone-event/8000",
                "a=fmtp:101 0-15,99999-,,;;",
                "a=fmtp:101",
                "a=fmtp:abc x",
                "a=fmtp:101 " + "0-15," * 2000,
            ),
        ),
        (
            "events_at_48k",
            _sdp(
                v,
                o,
                s,
                c,
                t,
                f"m=audio {port} RTP/AVP 0 101",
                pcmu,
                "a=rtpmap:101 telephone-event/48000",
            ),
        ),
        (
            "huge_ptime",
            _sdp(v, o, s, c, t, audio, pcmu, *events, "a=ptime:100000", "a=maxptime:4294967296"),
        ),
        ("zero_ptime", _sdp(v, o, s, c, t, audio, pcmu, "a=ptime:0")),
        ("negative_ptime", _sdp(v, o, s, c, t, audio, pcmu, "a=ptime:-20")),
        ("fraction_ptime", _sdp(v, o, s, c, t, audio, pcmu, "a=ptime:0.5")),
        ("ipv6_connection", _sdp(v, "o=- 7 7 IN IP6 ::1", s, "c=IN IP6 ::1", t, audio, pcmu)),
        ("ipv6_bracketed", _sdp(v, o, s, "c=IN IP6 [::1]", t, audio, pcmu)),
        ("ipv6_type_with_ipv4", _sdp(v, o, s, f"c=IN IP6 {host}", t, audio, pcmu)),
        ("missing_connection", _sdp(v, o, s, t, audio, pcmu)),
        ("media_level_connection", _sdp(v, o, s, t, audio, c, pcmu)),
        ("hold_zero_address", _sdp(v, o, s, "c=IN IP4 0.0.0.0", t, audio, pcmu)),
        ("multicast", _sdp(v, o, s, "c=IN IP4 224.2.1.1/127/3", t, audio, pcmu)),
        ("hostname_connection", _sdp(v, o, s, "c=IN IP4 localhost", t, audio, pcmu)),
        ("unresolvable_connection", _sdp(v, o, s, "c=IN IP4 media.invalid", t, audio, pcmu)),
        ("atm_network", _sdp(v, o, s, "c=ATM NSAP 47.0091.8100.0000", t, audio, pcmu)),
        ("port_65536", _sdp(v, o, s, c, t, "m=audio 65536 RTP/AVP 0", pcmu)),
        ("port_negative", _sdp(v, o, s, c, t, "m=audio -1 RTP/AVP 0", pcmu)),
        ("port_words", _sdp(v, o, s, c, t, "m=audio abc RTP/AVP 0", pcmu)),
        ("port_count", _sdp(v, o, s, c, t, f"m=audio {port}/2 RTP/AVP 0", pcmu)),
        (
            "all_payload_types",
            _sdp(
                v,
                o,
                s,
                c,
                t,
                f"m=audio {port} RTP/AVP " + " ".join(str(n) for n in range(128)),
                pcmu,
            ),
        ),
        (
            "many_media_lines",
            _sdp(v, o, s, c, t, *(f"m=audio {port + 2 * i} RTP/AVP 0" for i in range(200)), pcmu),
        ),
        (
            "srtp_crypto",
            _sdp(
                v,
                o,
                s,
                c,
                t,
                f"m=audio {port} RTP/SAVP 0",
                pcmu,
                "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:"
                "PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:32",
            ),
        ),
        (
            "srtp_and_rtp_offers",
            _sdp(
                v,
                o,
                s,
                c,
                t,
                f"m=audio {port} RTP/SAVP 0",
                pcmu,
                "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:" + "A" * 5000,
                f"m=audio {port + 2} RTP/AVP 0",
                pcmu,
            ),
        ),
        (
            "dtls_webrtc",
            _sdp(
                v,
                o,
                s,
                c,
                t,
                f"m=audio {port} UDP/TLS/RTP/SAVPF 111",
                "a=rtpmap:111 opus/48000/2",
                "a=setup:actpass",
                "a=rtcp-mux",
                "a=fingerprint:sha-256 " + ":".join(["AB"] * 32),
                "a=ice-ufrag:abcd",
                "a=ice-pwd:" + "p" * 24,
            ),
        ),
        (
            "directions_conflict",
            _sdp(
                v, o, s, c, t, "a=recvonly", audio, pcmu, "a=sendonly", "a=inactive", "a=sendrecv"
            ),
        ),
        ("inactive", _sdp(v, o, s, c, t, audio, pcmu, "a=inactive")),
        ("bandwidth", _sdp(v, o, s, c, "b=AS:-1", "b=TIAS:99999999999999999999", t, audio, pcmu)),
        ("version_1", _sdp("v=1", o, s, c, t, audio, pcmu)),
        ("no_version", _sdp(o, s, c, t, audio, pcmu)),
        ("garbage_origin", _sdp(v, "o=", s, c, t, audio, pcmu)),
        ("no_session_lines", _sdp(v, audio, pcmu)),
        ("lf_only", good_offer(host, port).replace(b"\r\n", b"\n")),
        ("nul_bytes", good_offer(host, port).replace(b"PCMU", b"PC\x00MU")),
        ("not_utf8", good_offer(host, port).replace(b"s=-", b"s=\xff\xfe\xfd")),
        ("long_attribute", _sdp(v, o, s, c, t, audio, pcmu, "a=x-" + "y" * 20000)),
        ("empty_lines", _sdp(v, "", o, "", s, c, t, "", audio, pcmu)),
        (
            "lowercase_types",
            _sdp(
                v, o, s, f"c=in ip4 {host}", t, f"m=AUDIO {port} rtp/avp 0", "a=rtpmap:0 pcmu/8000"
            ),
        ),
    ]


def mutate_offer(rng: random.Random, body: bytes) -> bytes:
    """A seeded line-level corruption of an offer: a line duplicated, dropped or swapped,
    a number replaced by a limit value, a special byte inserted, bits flipped."""
    lines = body.split(b"\r\n")
    for _ in range(rng.randint(1, 3)):
        if not lines:
            break
        i = rng.randrange(len(lines))
        op = rng.randrange(6)
        if op == 0:
            lines.insert(i, lines[i])
        elif op == 1:
            del lines[i]
        elif op == 2:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == 3:
            lines[i] = _replace_number(rng, lines[i])
        elif op == 4 and lines[i]:
            at = rng.randrange(len(lines[i]))
            lines[i] = lines[i][:at] + rng.choice(SPECIAL_BYTES) + lines[i][at:]
        elif lines[i]:
            buf = bytearray(lines[i])
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
            lines[i] = bytes(buf)
    return b"\r\n".join(lines)


def _replace_number(rng: random.Random, line: bytes) -> bytes:
    digits = [i for i, c in enumerate(line) if 48 <= c <= 57]
    if not digits:
        return line
    start = end = rng.choice(digits)
    while start > 0 and 48 <= line[start - 1] <= 57:
        start -= 1
    while end < len(line) and 48 <= line[end] <= 57:
        end += 1
    return line[:start] + rng.choice(NUMBERS) + line[end:]


def offers(rng: random.Random, host: str, port: int, count: int) -> list[tuple[str, bytes]]:
    """``count`` offers: every named variant once (a seeded sample of them when ``count``
    is smaller), then seeded mutations of the variants."""
    named: Sequence[tuple[str, bytes]] = variants(host, port)
    chosen = list(named) if count >= len(named) else rng.sample(list(named), count)
    while len(chosen) < count:
        name, body = rng.choice(named)
        chosen.append((f"mutated:{name}", mutate_offer(rng, body)))
    return chosen
