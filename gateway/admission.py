"""Who may start a call with us: trusted carrier addresses, optional digest, flood limits.

A hotline number is an open door to the escalation engine, so an INVITE is admitted only
from the addresses of a configured trunk (and, when that trunk has credentials, only after
a digest challenge); others get 403. A source sending new INVITEs faster than its budget
gets 503 with Retry-After before any call state or media port is spent on it. Pure logic:
the gateway feeds requests and times in and sends whatever response the decision names.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from sipmessage import AuthChallenge, Request

from gateway.sip.auth import DigestServer

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class TrustedTrunk:
    """A carrier allowed to send us calls: its addresses and, optionally, a digest login."""

    name: str
    networks: tuple[Network, ...]
    users: Mapping[str, str] = field(default_factory=dict)  # username -> password
    realm: str = "ackline"

    @classmethod
    def parse(cls, name: str, sources: Sequence[str], **kwargs: object) -> TrustedTrunk:
        """`sources` are addresses or CIDR networks; a bad one is a ValueError naming it."""
        networks = []
        for source in sources:
            try:
                networks.append(ipaddress.ip_network(source.strip(), strict=False))
            except ValueError:
                raise ValueError(
                    f"trunk {name!r}: {source!r} is not an address or network"
                ) from None
        if not networks:
            raise ValueError(f"trunk {name!r}: no trusted source addresses")
        return cls(name, tuple(networks), **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Decision:
    """What to do with one INVITE: admit it, or answer `code` (403, 503, 401/407)."""

    admitted: bool
    trunk: str | None = None
    code: int = 0
    reason: str = ""
    retry_after: int | None = None
    challenge: AuthChallenge | None = None
    challenge_header: str | None = None
    username: str | None = None


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated


class InboundGuard:
    """Admission control for new INVITEs (in-dialog requests never come here).

    `trunks` empty means no ACL: every source is trusted (a lab or a PBX on loopback).
    `rate`/`burst` bound new INVITEs per source address, trusted or not.
    """

    def __init__(
        self,
        trunks: Sequence[TrustedTrunk] = (),
        *,
        rate: float = 10.0,
        burst: int = 20,
        max_sources: int = 10_000,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.trunks = list(trunks)
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._digest = {t.name: DigestServer(t.realm, t.users) for t in self.trunks if t.users}

    def trunk_for(self, host: str) -> TrustedTrunk | None:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return None
        for trunk in self.trunks:
            if any(address in net for net in trunk.networks):
                return trunk
        return None

    def check(self, request: Request, source_host: str, now: float) -> Decision:
        trunk = self.trunk_for(source_host) if self.trunks else None
        name = trunk.name if trunk else None
        if not self._take(source_host, now):
            return Decision(False, name, 503, "invite_flood", retry_after=self._retry_after())
        if self.trunks and trunk is None:
            return Decision(False, code=403, reason="untrusted_source")
        digest = self._digest.get(name or "")
        if digest is None:
            return Decision(True, name)
        user = digest.verify(request, now=now)
        if user is not None:
            return Decision(True, name, username=user)
        stale = digest.is_stale(request, now)
        return Decision(
            False,
            name,
            digest.status_code,
            "stale_nonce" if stale else "authentication_required",
            challenge=digest.challenge(now, stale=stale),
            challenge_header=digest.challenge_header,
        )

    def _retry_after(self) -> int:
        return max(1, round(1 / self.rate))

    def _take(self, source: str, now: float) -> bool:
        """Token bucket per source address; the least recently seen sources are forgotten."""
        bucket = self._buckets.get(source)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now)
            self._buckets[source] = bucket
            while len(self._buckets) > self.max_sources:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(source)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True
