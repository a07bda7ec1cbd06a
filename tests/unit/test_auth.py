"""Digest authentication: RFC test vectors, 401/407 retry flows and the verifier."""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

import pytest
from sipmessage import AuthCredentials, Request, Response

from gateway.sip.auth import (
    Credentials,
    DigestClient,
    DigestError,
    DigestServer,
    compute_response,
    parse_challenges,
    parse_credentials,
)
from gateway.sip.message import create_response, parse_message

REGISTER = (
    "REGISTER sip:registrar.biloxi.example.com SIP/2.0\r\n"
    "Via: SIP/2.0/UDP bobspc.biloxi.example.com:5060;branch=z9hG4bKnashds7\r\n"
    "Max-Forwards: 70\r\n"
    "To: Bob <sip:bob@biloxi.example.com>\r\n"
    "From: Bob <sip:bob@biloxi.example.com>;tag=456248\r\n"
    "Call-ID: 843817637684230@998sdasdh09\r\n"
    "CSeq: 1826 REGISTER\r\n"
    "Contact: <sip:bob@192.0.2.4>\r\n"
    "Expires: 7200\r\n"
    "Content-Length: 0\r\n"
    "\r\n"
)

INVITE = (
    "INVITE sip:+15551234567@carrier.example.net SIP/2.0\r\n"
    "Via: SIP/2.0/TCP gw.ackline.example:5060;branch=z9hG4bKinv1;rport\r\n"
    "Max-Forwards: 70\r\n"
    "To: <sip:+15551234567@carrier.example.net>\r\n"
    "From: <sip:alerts@ackline.example>;tag=f00\r\n"
    "Call-ID: call-1@gw.ackline.example\r\n"
    "CSeq: 10 INVITE\r\n"
    "Contact: <sip:alerts@gw.ackline.example;transport=tcp>\r\n"
    "Content-Type: application/sdp\r\n"
    "Content-Length: 4\r\n"
    "\r\n"
    "v=0\n"
)


def _parse_request(raw: str) -> Request:
    message = parse_message(raw.encode())
    assert isinstance(message, Request)
    return message


def _challenge(request: Request, code: int, *values: str) -> Response:
    """A 401/407 exactly as a carrier would send it, round-tripped through the parser."""
    response = create_response(request, code, to_tag="srv")
    header = "WWW-Authenticate" if code == 401 else "Proxy-Authenticate"
    for value in values:
        response.headers.add(header, value)
    message = parse_message(bytes(response))
    assert isinstance(message, Response)
    return message


def _client(
    username: str = "bob", password: str = "zanzibar", realm: str | None = None
) -> DigestClient:
    cnonces = (f"cn{i}" for i in itertools.count(1))
    return DigestClient(
        Credentials(username, password, realm), cnonce_factory=lambda: next(cnonces)
    )


def _only_credentials(request: Request, header: str = "Authorization") -> dict[str, str]:
    found = parse_credentials(request, header)
    assert len(found) == 1
    assert found[0].scheme.lower() == "digest"
    params = found[0].parameters
    assert params is not None
    return dict(params)


# --- compute_response test vectors --------------------------------------------------------


def test_rfc2617_section_3_5_vector() -> None:
    assert (
        compute_response(
            username="Mufasa",
            realm="testrealm@host.com",
            password="Circle Of Life",
            method="GET",
            uri="/dir/index.html",
            nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
            qop="auth",
            nc="00000001",
            cnonce="0a4f113b",
        )
        == "6629fae49393a05397450978507c4ef1"
    )


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [
        ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
        ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
    ],
)
def test_rfc7616_section_3_9_1_vectors(algorithm: str, expected: str) -> None:
    assert (
        compute_response(
            username="Mufasa",
            realm="http-auth@example.org",
            password="Circle of Life",
            method="GET",
            uri="/dir/index.html",
            nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
            algorithm=algorithm,
            qop="auth",
            nc="00000001",
            cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
        )
        == expected
    )


def _h(name: str, text: str) -> str:
    return hashlib.new(name, text.encode()).hexdigest()


def test_sess_and_legacy_and_auth_int_formulas() -> None:
    base: dict[str, Any] = {
        "username": "bob",
        "realm": "biloxi.example.com",
        "password": "zanzibar",
        "method": "INVITE",
        "uri": "sip:bob@biloxi.example.com",
        "nonce": "n1",
    }
    ha1 = _h("sha256", "bob:biloxi.example.com:zanzibar")
    ha1_sess = _h("sha256", f"{ha1}:n1:c1")
    ha2 = _h("sha256", "INVITE:sip:bob@biloxi.example.com")
    assert compute_response(
        **base, algorithm="SHA-256-sess", qop="auth", nc="00000001", cnonce="c1"
    ) == _h("sha256", f"{ha1_sess}:n1:00000001:c1:auth:{ha2}")

    md5_ha1 = _h("md5", "bob:biloxi.example.com:zanzibar")
    md5_ha2 = _h("md5", "INVITE:sip:bob@biloxi.example.com")
    assert compute_response(**base) == _h("md5", f"{md5_ha1}:n1:{md5_ha2}")  # RFC 2069

    body_hash = hashlib.md5(b"v=0\n").hexdigest()
    int_ha2 = _h("md5", f"INVITE:sip:bob@biloxi.example.com:{body_hash}")
    assert compute_response(
        **base, qop="auth-int", nc="00000001", cnonce="c1", body=b"v=0\n"
    ) == _h("md5", f"{md5_ha1}:n1:00000001:c1:auth-int:{int_ha2}")

    with pytest.raises(DigestError):
        compute_response(**base, algorithm="SHA-1")
    with pytest.raises(DigestError):
        compute_response(**base, qop="auth")  # no nc/cnonce
    with pytest.raises(DigestError):
        compute_response(**base, algorithm="MD5-sess")  # no cnonce


# --- client flows -----------------------------------------------------------------------


def test_401_register_flow_builds_authorization() -> None:
    register = _parse_request(REGISTER)
    challenge = _challenge(
        register,
        401,
        'Digest realm="biloxi.example.com", qop="auth,auth-int", '
        'nonce="ea9c8e88df84f1cec4341ae6cbe5a359", opaque="5ccc069c403ebaf9f0171e9517f40e41"',
    )
    retry = _client().authorize(register, challenge)

    assert retry is not register
    assert register.headers.get("Authorization") is None  # original untouched
    assert retry.cseq.sequence == 1827
    assert retry.cseq.method == "REGISTER"
    assert retry.via[0].parameters["branch"] != "z9hG4bKnashds7"
    assert str(retry.via[0].parameters["branch"]).startswith("z9hG4bK")
    assert retry.call_id == register.call_id
    assert retry.from_address == register.from_address
    assert retry.expires == 7200

    wire = parse_message(bytes(retry))
    assert isinstance(wire, Request)
    raw_header = wire.headers["Authorization"]
    assert "qop=auth," in raw_header
    assert "nc=00000001" in raw_header  # tokens, unquoted
    params = _only_credentials(wire)
    assert params["username"] == "bob"
    assert params["realm"] == "biloxi.example.com"
    assert params["nonce"] == "ea9c8e88df84f1cec4341ae6cbe5a359"
    assert params["uri"] == "sip:registrar.biloxi.example.com"
    assert params["opaque"] == "5ccc069c403ebaf9f0171e9517f40e41"
    assert (params["qop"], params["nc"], params["cnonce"]) == ("auth", "00000001", "cn1")
    assert "algorithm" not in params  # not offered, so not echoed
    assert params["response"] == compute_response(
        username="bob",
        realm="biloxi.example.com",
        password="zanzibar",
        method="REGISTER",
        uri="sip:registrar.biloxi.example.com",
        nonce="ea9c8e88df84f1cec4341ae6cbe5a359",
        qop="auth",
        nc="00000001",
        cnonce="cn1",
    )


def test_407_invite_flow_uses_proxy_authorization() -> None:
    invite = _parse_request(INVITE)
    challenge = _challenge(
        invite, 407, 'Digest realm="carrier", nonce="abc123", algorithm=MD5, qop="auth"'
    )
    retry = _client("alerts", "s3cret").authorize(invite, challenge)
    assert retry.headers.get("Authorization") is None
    params = _only_credentials(retry, "Proxy-Authorization")
    assert params["algorithm"] == "MD5"
    assert params["uri"] == "sip:+15551234567@carrier.example.net"
    assert params["response"] == compute_response(
        username="alerts",
        realm="carrier",
        password="s3cret",
        method="INVITE",
        uri="sip:+15551234567@carrier.example.net",
        nonce="abc123",
        qop="auth",
        nc="00000001",
        cnonce="cn1",
    )
    assert retry.body == b"v=0\n"
    assert retry.cseq.sequence == 11
    assert retry.via[0].parameters.get("rport", "missing") is None  # other params kept


def test_nonce_count_increments_per_realm_and_nonce() -> None:
    client = _client()
    register = _parse_request(REGISTER)
    same = _challenge(register, 401, 'Digest realm="biloxi.example.com", nonce="n1", qop="auth"')
    first = _only_credentials(client.authorize(register, same))
    second = _only_credentials(client.authorize(register, same))
    other = _only_credentials(
        client.authorize(
            register,
            _challenge(register, 401, 'Digest realm="biloxi.example.com", nonce="n2", qop=auth'),
        )
    )
    assert (first["nc"], second["nc"], other["nc"]) == ("00000001", "00000002", "00000001")
    assert first["cnonce"] != second["cnonce"]


def test_rejected_credentials_raise_instead_of_looping() -> None:
    client = _client(password="wrong")
    register = _parse_request(REGISTER)
    header = 'Digest realm="biloxi.example.com", nonce="n1", qop="auth"'
    retry = client.authorize(register, _challenge(register, 401, header))
    with pytest.raises(DigestError, match="rejected"):
        client.authorize(retry, _challenge(retry, 401, header))
    # A fresh nonce without stale=true rejects the password just the same (RFC 7616 §3.3).
    fresh = 'Digest realm="biloxi.example.com", nonce="n9", qop="auth"'
    with pytest.raises(DigestError, match="rejected"):
        client.authorize(retry, _challenge(retry, 401, fresh))

    # stale=true means "right password, old nonce": retry with the new nonce.
    stale = 'Digest realm="biloxi.example.com", nonce="n2", qop="auth", stale=TRUE'
    again = client.authorize(retry, _challenge(retry, 401, stale))
    params = _only_credentials(again)
    assert params["nonce"] == "n2"
    assert again.cseq.sequence == register.cseq.sequence + 2


def test_strongest_algorithm_is_chosen() -> None:
    register = _parse_request(REGISTER)
    challenge = _challenge(
        register,
        401,
        'Digest realm="biloxi.example.com", nonce="n1", algorithm=MD5, qop="auth"',
        'Digest realm="biloxi.example.com", nonce="n1", algorithm=SHA-256, qop="auth"',
        'Digest realm="biloxi.example.com", nonce="n1", algorithm=SHA-1, qop="auth"',
    )
    params = _only_credentials(_client().authorize(register, challenge))
    assert params["algorithm"] == "SHA-256"
    assert len(params["response"]) == 64
    assert params["response"] == compute_response(
        username="bob",
        realm="biloxi.example.com",
        password="zanzibar",
        method="REGISTER",
        uri="sip:registrar.biloxi.example.com",
        nonce="n1",
        algorithm="SHA-256",
        qop="auth",
        nc="00000001",
        cnonce="cn1",
    )


def test_legacy_challenge_without_qop() -> None:
    register = _parse_request(REGISTER)
    challenge = _challenge(register, 401, 'Digest realm="biloxi.example.com", nonce="n1"')
    params = _only_credentials(_client().authorize(register, challenge))
    assert not {"qop", "nc", "cnonce"} & params.keys()
    ha1 = _h("md5", "bob:biloxi.example.com:zanzibar")
    ha2 = _h("md5", "REGISTER:sip:registrar.biloxi.example.com")
    assert params["response"] == _h("md5", f"{ha1}:n1:{ha2}")


def test_only_challenged_realm_credentials_are_replaced() -> None:
    client = _client()
    register = _parse_request(REGISTER)
    register.headers.add("Authorization", 'Digest username="bob", realm="edge", nonce="e1"')
    register.headers.add("Authorization", 'Digest username="bob", realm="core", nonce="c1"')
    retry = client.authorize(
        register,
        _challenge(register, 401, 'Digest realm="core", nonce="c2", qop="auth", stale=true'),
    )
    found = {
        c.parameters["realm"]: c.parameters["nonce"]
        for c in parse_credentials(retry, "Authorization")
        if c.parameters is not None
    }
    assert found == {"edge": "e1", "core": "c2"}


@pytest.mark.parametrize(
    ("code", "header", "credentials_realm", "message"),
    [
        (401, 'Digest realm="r", nonce="n", algorithm=SHA-1, qop="auth"', None, "algorithm"),
        (401, 'Digest realm="r", nonce="n", qop="auth-int"', None, "qop"),
        (401, 'Digest realm="r", nonce="n", qop="auth"', "other", "realm"),
        (401, 'Digest realm="r", nonce="n", algorithm=MD5-sess', None, "without qop"),
        (401, 'Basic realm="r"', None, "no Digest"),
        (407, "", None, "no Digest"),
    ],
)
def test_unanswerable_challenges_raise(
    code: int, header: str, credentials_realm: str | None, message: str
) -> None:
    register = _parse_request(REGISTER)
    challenge = _challenge(register, code, *([header] if header else []))
    with pytest.raises(DigestError, match=message):
        _client(realm=credentials_realm).authorize(register, challenge)


def test_non_challenge_response_raises() -> None:
    register = _parse_request(REGISTER)
    with pytest.raises(DigestError):
        _client().authorize(register, create_response(register, 403))


def test_quoted_commas_survive_parsing() -> None:
    register = _parse_request(REGISTER)
    response = _challenge(
        register, 401, 'Digest realm="Acme, Inc.", nonce="a,b", qop="auth, auth-int"'
    )
    (challenge,) = parse_challenges(response, "WWW-Authenticate")
    assert dict(challenge.parameters) == {
        "realm": "Acme, Inc.",
        "nonce": "a,b",
        "qop": "auth, auth-int",
    }


# --- server -----------------------------------------------------------------------------


def _server_challenge(server: DigestServer, request: Request, now: float) -> Response:
    response = create_response(request, server.status_code, to_tag="srv")
    response.headers.set(server.challenge_header, str(server.challenge(now)))
    message = parse_message(bytes(response))
    assert isinstance(message, Response)
    return message


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256", "SHA-256-sess", "MD5-sess"])
def test_server_verifies_client_round_trip(algorithm: str) -> None:
    server = DigestServer("ackline", {"bob": "zanzibar"}, algorithm)
    register = _parse_request(REGISTER)
    assert server.verify(register, "REGISTER") is None  # no credentials at all

    retry = _client().authorize(register, _server_challenge(server, register, 0.0))
    wire = parse_message(bytes(retry))
    assert isinstance(wire, Request)
    assert server.verify(wire, "REGISTER", now=1.0) == "bob"
    assert server.verify(wire, "REGISTER") is None  # same nc again: replay
    assert server.verify(wire, "INVITE") is None  # digest covers the method


def test_server_rejects_wrong_password_unknown_user_and_foreign_nonce() -> None:
    server = DigestServer("ackline", {"bob": "zanzibar"})
    register = _parse_request(REGISTER)
    challenge = _server_challenge(server, register, 0.0)
    wrong = _client(password="nope").authorize(register, challenge)
    assert server.verify(wrong) is None
    stranger = _client(username="eve").authorize(register, challenge)
    assert server.verify(stranger) is None

    other_server = DigestServer("ackline", {"bob": "zanzibar"})
    foreign = _client().authorize(register, _server_challenge(other_server, register, 0.0))
    assert server.verify(foreign) is None
    assert other_server.verify(foreign) == "bob"


def test_server_rejects_tampered_uri_and_expired_nonce() -> None:
    server = DigestServer("ackline", {"bob": "zanzibar"}, nonce_lifetime=60.0)
    register = _parse_request(REGISTER)
    retry = _client().authorize(register, _server_challenge(server, register, 0.0))
    moved = parse_message(bytes(retry).replace(b"REGISTER sip:registrar.", b"REGISTER sip:evil."))
    assert isinstance(moved, Request)
    assert server.verify(moved) is None
    assert not server.is_stale(retry, 30.0)
    assert server.is_stale(retry, 61.0)
    assert server.verify(retry, now=61.0) is None
    assert server.verify(retry, now=59.0) == "bob"


def test_proxy_server_uses_407_headers() -> None:
    server = DigestServer("carrier", {"alerts": "s3cret"}, "SHA-256", proxy=True)
    invite = _parse_request(INVITE)
    challenge = _server_challenge(server, invite, 0.0)
    assert challenge.code == 407
    assert challenge.proxy_authenticate is not None
    stale = server.challenge(0.0, stale=True)
    assert stale.parameters["stale"] == "true"
    retry = _client("alerts", "s3cret").authorize(invite, challenge)
    assert server.verify(retry) == "alerts"
    # The same credentials in Authorization are not for a proxy.
    moved = parse_message(bytes(retry).replace(b"Proxy-Authorization:", b"Authorization:"))
    assert isinstance(moved, Request)
    assert server.verify(moved) is None


def test_server_forgets_oldest_nonce_when_full() -> None:
    nonces = (f"nonce{i}" for i in itertools.count())
    server = DigestServer(
        "ackline", {"bob": "zanzibar"}, max_nonces=2, nonce_factory=lambda: next(nonces)
    )
    register = _parse_request(REGISTER)
    first = _client().authorize(register, _server_challenge(server, register, 0.0))
    server.challenge(1.0)
    server.challenge(2.0)  # evicts nonce0
    assert _only_credentials(first)["nonce"] == "nonce0"
    assert server.verify(first) is None


def test_unknown_credentials_scheme_is_ignored() -> None:
    server = DigestServer("ackline", {"bob": "zanzibar"})
    register = _parse_request(REGISTER)
    register.headers.add("Authorization", str(AuthCredentials("Bearer", token="abc")))
    assert server.verify(register) is None
