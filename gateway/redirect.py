"""Following 3xx redirects of an outbound INVITE (RFC 3261 §8.1.3.4), as pure decisions.

A carrier answering 301/302 with a Contact says "call this instead". Following it is the
same call (same Call-ID, From tag and offer), but each new target is a new destination:
whoever places the call screens it again (the toll-fraud guard: a redirect to a premium
or foreign number must not be a way around it). Hops are bounded and a target seen
before ends the call, so two peers redirecting to each other cannot keep it going.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from sipmessage import URI, Address, CSeq, Request, Via

from gateway.sip.message import copy_request

__all__ = [
    "DEFAULT_MAX_HOPS",
    "FOLLOWED_CODES",
    "RedirectDecision",
    "RedirectPolicy",
    "RedirectScreen",
    "RedirectVerdict",
    "Redirects",
    "redirected_invite",
]

DEFAULT_MAX_HOPS = 3
# 305 Use Proxy and 380 Alternative Service name no new destination for the call.
FOLLOWED_CODES = frozenset({300, 301, 302})

RedirectScreen = Callable[[URI], str | None]
"""Why a redirect target must not be called (a refusal reason), or None to follow it."""


class RedirectVerdict(enum.Enum):
    FOLLOW = "follow"
    REFUSED = "refused"  # the screen said no: not a destination we may call
    LOOP = "loop"  # every target offered was called before in this call
    TOO_MANY_HOPS = "too_many_hops"
    NO_TARGET = "no_target"  # no Contact we can call (none, or not sip:)

    @property
    def refused(self) -> bool:
        return self is RedirectVerdict.REFUSED


@dataclass(frozen=True)
class RedirectDecision:
    verdict: RedirectVerdict
    target: URI | None  # the target to call next (FOLLOW), or the one refused (REFUSED)
    reason: str


@dataclass(frozen=True)
class RedirectPolicy:
    """Whether and how a dial follows redirects: at most ``max_hops``, each target
    passed through ``screen`` first."""

    screen: RedirectScreen
    max_hops: int = DEFAULT_MAX_HOPS

    def __post_init__(self) -> None:
        if self.max_hops < 1:
            raise ValueError("max_hops must be at least 1")


def target_key(uri: URI) -> str:
    """What makes two targets the same for loop detection: scheme, user, host and port."""
    host = uri.host.lower().strip("[]")
    return f"{uri.scheme}:{uri.user or ''}@{host}:{uri.port or 5060}"


def _q(contact: Address) -> float:
    try:
        return float(contact.parameters.get("q") or 1.0)
    except ValueError:
        return 0.0


@dataclass(frozen=True)
class Redirects:
    """The redirect history of one call: the targets called so far, the first included."""

    policy: RedirectPolicy
    visited: tuple[str, ...]
    hops: int = 0

    @classmethod
    def start(cls, policy: RedirectPolicy, first: URI) -> Redirects:
        return cls(policy, (target_key(first),))

    def decide(self, contacts: Sequence[Address]) -> tuple[RedirectDecision, Redirects]:
        """The next target among a 3xx's Contacts (highest q first, RFC 3261 §8.1.3.4),
        and the history with it. Targets called before are skipped; the first new one
        the screen refuses refuses the redirect (a later, cheaper Contact does not make
        a refused one acceptable: the carrier meant that one)."""
        if self.hops >= self.policy.max_hops:
            reason = f"more than {self.policy.max_hops} redirects"
            return RedirectDecision(RedirectVerdict.TOO_MANY_HOPS, None, reason), self
        ordered = sorted(contacts, key=_q, reverse=True)  # stable: equal q keep their order
        callable_ = [c.uri for c in ordered if c.uri.scheme == "sip" and c.uri.host]
        if not callable_:
            return RedirectDecision(RedirectVerdict.NO_TARGET, None, "no sip: Contact"), self
        fresh = [uri for uri in callable_ if target_key(uri) not in self.visited]
        if not fresh:
            reason = f"redirected back to {callable_[0]}"
            return RedirectDecision(RedirectVerdict.LOOP, callable_[0], reason), self
        target = fresh[0]
        refusal = self.policy.screen(target)
        if refusal is not None:
            return RedirectDecision(RedirectVerdict.REFUSED, target, refusal), self
        history = replace(self, visited=(*self.visited, target_key(target)), hops=self.hops + 1)
        return RedirectDecision(RedirectVerdict.FOLLOW, target, f"redirected to {target}"), history


def redirected_invite(invite: Request, target: URI, via: Via, *, keep_credentials: bool) -> Request:
    """The INVITE to ``target``: same Call-ID, From, To and body, CSeq + 1, ``via`` (a
    fresh branch) on top (RFC 3261 §8.1.3.4). Credentials go only back to the host they
    were computed for."""
    request = copy_request(invite)
    request.uri = target
    request.via = [via]
    request.cseq = CSeq(invite.cseq.sequence + 1, invite.cseq.method)
    if not keep_credentials:
        request.headers.remove("Authorization")
        request.headers.remove("Proxy-Authorization")
    return request
