"""`ackline call` against SIPp as the far end, over real loopback sockets.

SIPp is an independent implementation: each scenario only passes (exit code 0) when our
side sent exactly the messages it expects (ACK, CANCEL, BYE, authenticated INVITE).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.integration.peers import ackline_cli, cli_env, dtmf_pcap, free_port, sipp

pytestmark = pytest.mark.interop

PROMPT = "Database down on eu-1. Press 1 to acknowledge, 2 to escalate."


def run_call(
    tmp: Path, target: str, *args: str, timeout: float = 60
) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run(
        [*ackline_cli(), "call", target, "--json", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(tmp),
    )
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if proc.returncode == 0 and lines else {}
    return proc.returncode, result, proc.stderr


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One prompt cache for the module: synthesis happens once."""
    return tmp_path_factory.mktemp("cli")


@pytest.mark.parametrize(
    ("digit", "transport", "codecs"),
    [
        ("1", "udp", "0 8"),
        ("#", "udp", "0 8"),
        ("5", "tcp", "0 8"),
        ("1", "udp", "8"),  # answerer picks PCMA
    ],
)
def test_answer_and_rfc2833_digit(
    tmp_path: Path, cache_dir: Path, digit: str, transport: str, codecs: str
) -> None:
    with sipp(
        "uas_answer_dtmf.xml",
        tmp_path,
        transport=transport,
        PCAP=str(dtmf_pcap(digit)),
        PAUSE_MS="1500",
        RING_MS="300",
        CODECS=codecs,
    ) as peer:
        rc, result, err = run_call(
            cache_dir,
            f"sip:+15550100@{peer.address}",
            "--say",
            PROMPT,
            "--gather",
            "1",
            "--timeout",
            "15",
            "--transport",
            transport,
        )
        assert rc == 0, err
        assert peer.wait() == 0, peer.logs()  # SIPp saw our ACK and our BYE
    assert result["outcome"] == "answered"
    assert result["sip_code"] == 200
    assert result["digits"] == digit
    assert result["dtmf_method"] == "rfc4733"
    assert result["codec"] == ("PCMA" if codecs == "8" else "PCMU")
    assert result["transport"] == transport
    assert result["hangup_by"] == "local"
    assert 0 <= result["pdd_ms"] < 250  # the 180 comes at once, the 200 after a 300 ms ring
    assert 300 <= result["answer_delay_ms"] < 2000
    assert 1400 <= result["duration_ms"] < 8000  # digit after 1.5 s, then immediate BYE


@pytest.mark.parametrize(
    ("code", "phrase", "outcome"),
    [
        ("486", "Busy Here", "busy"),
        ("503", "Service Unavailable", "failed"),
        ("603", "Decline", "rejected"),
        ("302", "Moved Temporarily", "failed"),
    ],
)
def test_final_error_responses(tmp_path: Path, code: str, phrase: str, outcome: str) -> None:
    with sipp("uas_reject.xml", tmp_path, CODE=code, PHRASE=phrase) as peer:
        rc, result, err = run_call(tmp_path, f"sip:+15550101@{peer.address}", "--gather", "1")
        assert rc == 0, err
        assert peer.wait() == 0, peer.logs()  # SIPp received the ACK for the error
    assert result["outcome"] == outcome
    assert result["sip_code"] == int(code)
    assert result["duration_ms"] == 0
    assert result["digits"] == ""


def test_ring_timeout_sends_cancel(tmp_path: Path) -> None:
    with sipp("uas_ring_cancel.xml", tmp_path) as peer:
        rc, result, err = run_call(
            tmp_path, f"sip:+15550102@{peer.address}", "--ring-timeout", "1.5", "--gather", "1"
        )
        assert rc == 0, err
        assert peer.wait() == 0, peer.logs()  # CANCEL answered, 487 ACKed
    assert result["outcome"] == "no_answer"
    assert result["sip_code"] == 487
    assert result["answer_time"] is None


def _ha(*parts: str) -> str:
    return hashlib.md5(":".join(parts).encode()).hexdigest()


NONCE = "a1b2c3d4e5f60718"


@pytest.mark.parametrize(
    ("password", "outcome", "code"),
    [
        ("s3cret", "answered", 200),
        ("wrong", "rejected", 403),
    ],
)
def test_407_challenge_digest_verified_by_sipp(
    tmp_path: Path, cache_dir: Path, password: str, outcome: str, code: int
) -> None:
    """Without qop the digest is deterministic, so SIPp itself checks our response."""
    port = free_port()
    target = f"sip:+15550103@127.0.0.1:{port}"
    expected = _ha(_ha("alice", "ackline.test", "s3cret"), NONCE, _ha("INVITE", target))
    with sipp(
        "uas_auth.xml",
        tmp_path,
        port=port,
        QOP_PARAM="",
        EXPECTED=expected,
        ACCEPT_ANY="authvalid",
        CODECS="0",
    ) as peer:
        rc, result, err = run_call(
            cache_dir, target, "--auth-user", "alice", "--auth-password", password
        )
        assert rc == 0, err
        assert peer.wait() == 0, peer.logs()
    assert result["outcome"] == outcome
    assert result["sip_code"] == code
    assert result["authenticated"] is True


def test_407_challenge_qop_auth(tmp_path: Path, cache_dir: Path) -> None:
    with sipp(
        "uas_auth.xml",
        tmp_path,
        QOP_PARAM=', qop="auth"',
        EXPECTED="none",
        ACCEPT_ANY="anyauth",
        CODECS="0",
    ) as peer:
        target = f"sip:+15550104@{peer.address}"
        rc, result, err = run_call(
            cache_dir,
            target,
            "--auth-user",
            "alice",
            "--auth-password",
            "s3cret",
        )
        assert rc == 0, err
        assert peer.wait() == 0, peer.logs()
        auth_lines = [line for line in peer.log_lines() if "AUTH Digest" in line]
    assert result["outcome"] == "answered"
    assert result["authenticated"] is True
    assert auth_lines, peer.logs()
    params = _digest_params(auth_lines[-1].split("AUTH ", 1)[1])
    assert params["username"] == "alice"
    assert params["realm"] == "ackline.test"
    assert params["nonce"] == NONCE
    assert params["qop"] == "auth"
    assert params["nc"] == "00000001"
    ha1 = _ha("alice", "ackline.test", "s3cret")
    ha2 = _ha("INVITE", params["uri"])
    expected = _ha(ha1, NONCE, params["nc"], params["cnonce"], "auth", ha2)
    assert params["response"] == expected


def _digest_params(header: str) -> dict[str, str]:
    body = header.split(" ", 1)[1]
    out: dict[str, str] = {}
    for item in body.split(","):
        key, _, value = item.strip().partition("=")
        out[key] = value.strip('"')
    return out


def test_remote_bye_mid_prompt(tmp_path: Path, cache_dir: Path) -> None:
    long_prompt = " ".join([PROMPT] * 4)
    with sipp("uas_remote_bye.xml", tmp_path, PAUSE_MS="1000", CODECS="0") as peer:
        rc, result, err = run_call(
            cache_dir,
            f"sip:+15550105@{peer.address}",
            "--say",
            long_prompt,
            "--gather",
            "1",
            "--timeout",
            "20",
        )
        assert rc == 0, err
        assert peer.wait() == 0, peer.logs()  # our 200 OK to its BYE arrived
    assert result["outcome"] == "answered"
    assert result["hangup_by"] == "remote"
    assert 900 <= result["duration_ms"] < 4000  # ended by the BYE, not by the 20 s timeout


def test_invalid_uri_is_a_clear_error(tmp_path: Path) -> None:
    rc, _, err = run_call(tmp_path, "sip:bad uri@@", "--gather", "1")
    assert rc == 2
    assert "invalid SIP URI" in err


def test_unsupported_transport_is_rejected(tmp_path: Path) -> None:
    rc, _, err = run_call(tmp_path, "sip:+15550106@127.0.0.1:5999", "--transport", "sctp")
    assert rc == 2
    assert "unsupported transport" in err


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_unreachable_port_is_a_clear_error(tmp_path: Path, transport: str) -> None:
    port = free_port()  # nothing listens there
    rc, _, err = run_call(
        tmp_path, f"sip:+15550107@127.0.0.1:{port}", "--transport", transport, timeout=20
    )
    assert rc == 3
    assert "error:" in err
    assert str(port) in err
