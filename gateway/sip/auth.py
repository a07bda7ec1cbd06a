"""SIP digest authentication (RFC 2617, RFC 7616, RFC 8760): client and verifier.

Carriers challenge REGISTER and INVITE with 401/407; ``DigestClient`` turns the
challenged request into a retry carrying credentials and refuses to loop when the
credentials are rejected. ``DigestServer`` checks inbound credentials. Both are pure:
no I/O, and randomness (cnonce, nonce) can be injected for reproducible tests.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sipmessage import (
    URI,
    AuthChallenge,
    AuthCredentials,
    AuthParameters,
    CSeq,
    Request,
    Response,
    Via,
)
from sipmessage.address import quote

from gateway.sip.message import copy_request, new_branch

__all__ = [
    "SUPPORTED_ALGORITHMS",
    "Credentials",
    "DigestClient",
    "DigestError",
    "DigestServer",
    "compute_response",
    "parse_challenges",
    "parse_credentials",
]

_HASHES: dict[str, str] = {"MD5": "md5", "SHA-256": "sha256"}
if "sha512_256" in hashlib.algorithms_available:  # RFC 8760; absent from some OpenSSL builds
    _HASHES["SHA-512-256"] = "sha512_256"

# Strongest first; a -sess variant ranks with its base hash.
_STRENGTH = {"SHA-512-256": 3, "SHA-256": 2, "MD5": 1}

SUPPORTED_ALGORITHMS: frozenset[str] = frozenset(
    name for base in _HASHES for name in (base, base + "-sess")
)

_HEADERS = {
    401: ("WWW-Authenticate", "Authorization"),
    407: ("Proxy-Authenticate", "Proxy-Authorization"),
}

# sipmessage 0.7.1 splits auth-params on every comma, even inside quoted strings such
# as qop="auth,auth-int" (the RFC 2617 example). Commas inside quotes are swapped for a
# control character before parsing and restored afterwards; the parsing itself stays
# sipmessage's.
_QUOTED_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_COMMA_STAND_IN = "\x1f"

# RFC 7616 §3.4: these are tokens in credentials and must not be quoted.
_UNQUOTED_CREDENTIAL_PARAMS = frozenset({"algorithm", "qop", "nc"})


class DigestError(ValueError):
    """The challenge cannot (or must not) be answered with our credentials."""


@dataclass(frozen=True)
class Credentials:
    """Username and password for one account; ``realm=None`` answers any realm."""

    username: str
    password: str
    realm: str | None = None


def _mask_quoted_commas(value: str) -> str:
    if _COMMA_STAND_IN in value:
        raise ValueError("control character in authentication header")
    return _QUOTED_STRING.sub(lambda m: m.group(0).replace(",", _COMMA_STAND_IN), value)


def _restore(parameters: AuthParameters) -> dict[str, str]:
    """Unmask commas and lower-case names (auth-param names are case-insensitive)."""
    return {k.lower(): v.replace(_COMMA_STAND_IN, ",") for k, v in parameters.items()}


def parse_challenges(response: Response, header: str) -> list[AuthChallenge]:
    """Parse every ``header`` (WWW-/Proxy-Authenticate) value of ``response``.

    Raises ``ValueError`` on a malformed header.
    """
    challenges = []
    for value in response.headers.getlist(header):
        parsed = AuthChallenge.parse(_mask_quoted_commas(value))
        challenges.append(
            AuthChallenge(parsed.scheme, AuthParameters(**_restore(parsed.parameters)))
        )
    return challenges


def parse_credentials(request: Request, header: str) -> list[AuthCredentials]:
    """Parse every ``header`` (Authorization/Proxy-Authorization) value of ``request``.

    Raises ``ValueError`` on a malformed header.
    """
    credentials = []
    for value in request.headers.getlist(header):
        parsed = AuthCredentials.parse(_mask_quoted_commas(value))
        if parsed.parameters is None:
            credentials.append(parsed)
        else:
            params = AuthParameters(**_restore(parsed.parameters))
            credentials.append(AuthCredentials(parsed.scheme, parameters=params))
    return credentials


class _CredentialParameters(AuthParameters):
    """Serialises with RFC 7616 quoting (sipmessage always quotes ``qop``)."""

    def __str__(self) -> str:
        return ", ".join(
            f"{k}={v if k in _UNQUOTED_CREDENTIAL_PARAMS else quote(v)}" for k, v in self.items()
        )


def _split_algorithm(algorithm: str) -> tuple[str, bool]:
    """Return (hashlib name, is-session variant); raise DigestError if unsupported."""
    canonical = algorithm.upper()
    session = canonical.endswith("-SESS")
    base = canonical.removesuffix("-SESS")
    if base not in _HASHES:
        raise DigestError(f"unsupported digest algorithm {algorithm!r}")
    return _HASHES[base], session


def _hash(hash_name: str, data: str | bytes) -> str:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return hashlib.new(hash_name, raw).hexdigest()


def compute_response(
    *,
    username: str,
    realm: str,
    password: str,
    method: str,
    uri: str,
    nonce: str,
    algorithm: str = "MD5",
    qop: str | None = None,
    nc: str | None = None,
    cnonce: str | None = None,
    body: bytes = b"",
) -> str:
    """Return the digest ``response`` value (RFC 7616 §3.4.1, RFC 2069 when ``qop`` is None).

    ``body`` is only used for ``qop="auth-int"``.
    """
    if qop not in (None, "auth", "auth-int"):
        raise DigestError(f"unsupported qop {qop!r}")
    hash_name, session = _split_algorithm(algorithm)
    ha1 = _hash(hash_name, f"{username}:{realm}:{password}")
    if session:
        if cnonce is None:
            raise DigestError(f"{algorithm} needs a cnonce")
        ha1 = _hash(hash_name, f"{ha1}:{nonce}:{cnonce}")
    if qop == "auth-int":
        ha2 = _hash(hash_name, f"{method}:{uri}:{_hash(hash_name, body)}")
    else:
        ha2 = _hash(hash_name, f"{method}:{uri}")
    if qop is None:
        return _hash(hash_name, f"{ha1}:{nonce}:{ha2}")
    if nc is None or cnonce is None:
        raise DigestError("qop requires nc and cnonce")
    return _hash(hash_name, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


def _qop_options(params: Mapping[str, str]) -> list[str] | None:
    """The qop options a challenge offers, or None for a legacy RFC 2069 challenge."""
    if "qop" not in params:
        return None
    return [option.strip().lower() for option in params["qop"].split(",") if option.strip()]


class DigestClient:
    """Answers 401/407 challenges for one account.

    Remembers nonce counts per (realm, nonce) so a server that re-uses a nonce across
    challenges gets nc=00000002, 00000003... as RFC 7616 §3.4 requires for replay
    protection.
    """

    def __init__(
        self, credentials: Credentials, *, cnonce_factory: Callable[[], str] | None = None
    ) -> None:
        self.credentials = credentials
        self._cnonce_factory = cnonce_factory or (lambda: secrets.token_hex(8))
        self._nonce_counts: dict[tuple[str, str], int] = {}

    def authorize(self, request: Request, response: Response) -> Request:
        """Return a copy of ``request`` that answers the challenges in ``response``.

        The copy has CSeq + 1, a fresh top Via branch and one credentials header per
        challenged realm. Raises ``DigestError`` when no challenge can be answered or
        when the server challenges a realm we already answered without stale=true, so
        callers cannot loop on a wrong password.
        """
        retry = self.with_credentials(request, response)
        cseq = request.cseq
        retry.cseq = CSeq(cseq.sequence + 1, cseq.method)
        vias = retry.via
        via = vias[0]
        vias[0] = Via(
            transport=via.transport,
            host=via.host,
            port=via.port,
            parameters=via.parameters.replace(branch=new_branch()),
        )
        retry.via = vias
        return retry

    def with_credentials(self, request: Request, response: Response) -> Request:
        """A copy of ``request`` (same CSeq and Via) answering the challenges in ``response``.

        Also for a new request answering an earlier challenge: re-using its nonce (with
        the next nonce count) spares a registrar's refresh the round trip of a fresh
        challenge. Raises ``DigestError`` as `authorize` does.
        """
        if response.code not in _HEADERS:
            raise DigestError(f"{response.code} is not an authentication challenge")
        challenge_header, credentials_header = _HEADERS[response.code]
        try:
            challenges = parse_challenges(response, challenge_header)
            previous = parse_credentials(request, credentials_header)
        except ValueError as exc:
            raise DigestError(f"malformed {challenge_header}: {exc}") from exc

        by_realm: dict[str, list[Mapping[str, str]]] = {}
        for challenge in challenges:
            if challenge.scheme.lower() == "digest" and "nonce" in challenge.parameters:
                realm = challenge.parameters.get("realm", "")
                by_realm.setdefault(realm, []).append(challenge.parameters)
        if not by_realm:
            raise DigestError(f"no Digest challenge in {response.code} response")
        wanted = self.credentials.realm
        realms = [realm for realm in by_realm if wanted is None or realm == wanted]
        if not realms:
            raise DigestError(f"challenge realm(s) {sorted(by_realm)} do not match {wanted!r}")

        # A realm we already answered that challenges again without stale=true rejected the
        # credentials, whether or not it chose a fresh nonce (RFC 7616 §3.3, RFC 2617 §3.2.1).
        answered_realms = {
            c.parameters.get("realm", "")
            for c in previous
            if c.parameters is not None and c.scheme.lower() == "digest"
        }
        headers = []
        for realm in realms:
            params = _strongest(by_realm[realm])
            stale = params.get("stale", "").lower() == "true"
            if realm in answered_realms and not stale:
                raise DigestError(f"credentials for realm {realm!r} were rejected")
            headers.append(self._credentials_for(request, realm, params))

        retry = copy_request(request)
        # Keep credentials for realms nobody challenged this time (e.g. an earlier proxy).
        kept = [
            value
            for value, parsed in zip(
                request.headers.getlist(credentials_header), previous, strict=True
            )
            if parsed.parameters is None or parsed.parameters.get("realm", "") not in realms
        ]
        retry.headers.remove(credentials_header)
        for value in [*kept, *headers]:
            retry.headers.add(credentials_header, value)
        return retry

    def _credentials_for(self, request: Request, realm: str, params: Mapping[str, str]) -> str:
        """Build one credentials header value for a challenge _strongest() accepted."""
        algorithm = params.get("algorithm", "MD5")
        qop = None if _qop_options(params) is None else "auth"
        nonce = params["nonce"]
        uri = str(request.uri)
        fields: dict[str, str] = {
            "username": self.credentials.username,
            "realm": realm,
            "nonce": nonce,
            "uri": uri,
        }
        nc = cnonce = None
        if qop is not None:
            count = self._nonce_counts.get((realm, nonce), 0) + 1
            self._nonce_counts[(realm, nonce)] = count
            nc = f"{count:08x}"
            cnonce = self._cnonce_factory()
        fields["response"] = compute_response(
            username=self.credentials.username,
            realm=realm,
            password=self.credentials.password,
            method=request.method,
            uri=uri,
            nonce=nonce,
            algorithm=algorithm,
            qop=qop,
            nc=nc,
            cnonce=cnonce,
        )
        if "algorithm" in params:
            fields["algorithm"] = algorithm
        if cnonce is not None and nc is not None and qop is not None:
            fields.update(cnonce=cnonce, qop=qop, nc=nc)
        if "opaque" in params:
            fields["opaque"] = params["opaque"]
        return str(AuthCredentials("Digest", parameters=_CredentialParameters(**fields)))


def _unanswerable(params: Mapping[str, str]) -> str | None:
    """Why we cannot answer this challenge, or None if we can."""
    algorithm = params.get("algorithm", "MD5")
    try:
        _, session = _split_algorithm(algorithm)
    except DigestError as exc:
        return str(exc)
    qop_options = _qop_options(params)
    if qop_options is None:
        # RFC 2617 forbids a cnonce without qop, yet a -sess HA1 needs one.
        return f"{algorithm} challenge without qop cannot be answered" if session else None
    if "auth" not in qop_options:
        return f"unsupported qop options {qop_options} (auth-int is not supported)"
    return None


def _strongest(candidates: list[Mapping[str, str]]) -> Mapping[str, str]:
    """Pick the strongest answerable challenge of one realm; raise if none is."""
    usable = [params for params in candidates if _unanswerable(params) is None]
    if not usable:
        raise DigestError(_unanswerable(candidates[0]))

    def strength(params: Mapping[str, str]) -> int:
        base = params.get("algorithm", "MD5").upper().removesuffix("-SESS")
        return _STRENGTH[base]

    return max(usable, key=strength)  # max() keeps the first of equals: server's order


@dataclass
class _NonceState:
    issued_at: float
    last_nc: int = 0


class DigestServer:
    """Issues digest challenges and verifies the credentials that answer them.

    Nonces are random and remembered (bounded by ``max_nonces``) so that unknown or
    expired nonces are refused and nonce counts cannot be replayed.
    """

    def __init__(
        self,
        realm: str,
        users: Mapping[str, str],
        algorithm: str = "MD5",
        *,
        proxy: bool = False,
        nonce_lifetime: float = 300.0,
        max_nonces: int = 10_000,
        nonce_factory: Callable[[], str] | None = None,
    ) -> None:
        _split_algorithm(algorithm)
        self.realm = realm
        self.users = users
        self.algorithm = algorithm
        self.proxy = proxy
        self.nonce_lifetime = nonce_lifetime
        self.max_nonces = max_nonces
        self._nonce_factory = nonce_factory or (lambda: secrets.token_urlsafe(24))
        self._nonces: dict[str, _NonceState] = {}

    @property
    def challenge_header(self) -> str:
        return "Proxy-Authenticate" if self.proxy else "WWW-Authenticate"

    @property
    def credentials_header(self) -> str:
        return "Proxy-Authorization" if self.proxy else "Authorization"

    @property
    def status_code(self) -> int:
        return 407 if self.proxy else 401

    def challenge(self, now: float, *, stale: bool = False) -> AuthChallenge:
        """Return a fresh challenge; ``stale=True`` tells the client to just retry."""
        self._expire(now)
        while len(self._nonces) >= self.max_nonces:
            del self._nonces[next(iter(self._nonces))]  # oldest first (insertion order)
        nonce = self._nonce_factory()
        self._nonces[nonce] = _NonceState(issued_at=now)
        fields = {
            "realm": self.realm,
            "nonce": nonce,
            "algorithm": self.algorithm,
            "qop": "auth",
        }
        if stale:
            fields["stale"] = "true"
        return AuthChallenge("Digest", AuthParameters(**fields))

    def verify(
        self, request: Request, method: str | None = None, *, now: float | None = None
    ) -> str | None:
        """Return the authenticated username, or None if the credentials do not check out.

        ``method`` defaults to the request method; ``now`` additionally enforces the
        nonce lifetime.
        """
        try:
            all_credentials = parse_credentials(request, self.credentials_header)
        except ValueError:
            return None
        for credentials in all_credentials:
            params = credentials.parameters
            if (
                params is not None
                and credentials.scheme.lower() == "digest"
                and params.get("realm") == self.realm
            ):
                return self._check(request, method or request.method, params, now)
        return None

    def is_stale(self, request: Request, now: float) -> bool:
        """True when the request answers one of our nonces that has since expired."""
        try:
            all_credentials = parse_credentials(request, self.credentials_header)
        except ValueError:
            return False
        for credentials in all_credentials:
            if credentials.parameters is None:
                continue
            state = self._nonces.get(credentials.parameters.get("nonce", ""))
            if state is not None and now - state.issued_at > self.nonce_lifetime:
                return True
        return False

    def _check(
        self, request: Request, method: str, params: Mapping[str, str], now: float | None
    ) -> str | None:
        username = params.get("username")
        nonce = params.get("nonce", "")
        uri = params.get("uri", "")
        state = self._nonces.get(nonce)
        if username is None or username not in self.users or state is None:
            return None
        if now is not None and now - state.issued_at > self.nonce_lifetime:
            return None
        if params.get("algorithm", "MD5").upper() != self.algorithm.upper():
            return None
        if params.get("qop", "").lower() != "auth":
            return None  # we always offer qop=auth (RFC 3261 §22.4 item 8)
        if not _same_uri(uri, request.uri):
            return None
        nc_text = params.get("nc", "")
        cnonce = params.get("cnonce")
        try:
            nc = int(nc_text, 16)
        except ValueError:
            return None
        if cnonce is None or nc <= state.last_nc:
            return None  # replayed or reordered nonce count
        expected = compute_response(
            username=username,
            realm=self.realm,
            password=self.users[username],
            method=method,
            uri=uri,
            nonce=nonce,
            algorithm=self.algorithm,
            qop="auth",
            nc=nc_text,
            cnonce=cnonce,
        )
        if not hmac.compare_digest(expected, params.get("response", "").lower()):
            return None
        state.last_nc = nc
        return username

    def _expire(self, now: float) -> None:
        for nonce, state in list(self._nonces.items()):
            # Keep expired nonces for one more lifetime so is_stale() can answer stale=true.
            if now - state.issued_at > 2 * self.nonce_lifetime:
                del self._nonces[nonce]


def _same_uri(digest_uri: str, request_uri: URI) -> bool:
    if digest_uri == str(request_uri):
        return True
    try:
        return URI.parse(digest_uri) == request_uri
    except ValueError:
        return False
