"""RFC 3261 §12 dialogs: the state two user agents share between INVITE and BYE.

A dialog only knows identifiers, sequence numbers and routing; it builds in-dialog
requests and checks incoming ones. It performs no I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from sipmessage import URI, Address, CSeq, Request, Response, Via

from gateway.sip.message import new_branch

__all__ = ["Dialog", "DialogError", "DialogState", "next_hop"]

USER_AGENT = "ackline/0.1"


class DialogError(ValueError):
    """A message cannot create or belong to a dialog."""


class DialogState(enum.Enum):
    EARLY = "early"
    CONFIRMED = "confirmed"
    TERMINATED = "terminated"


def next_hop(target: URI, route_set: list[Address]) -> URI:
    """Where an in-dialog request is physically sent (loose routing, RFC 3261 §12.2.1.1).

    With a route set whose first entry is a loose router (``lr``) the request goes there;
    a strict router would require rewriting the Request-URI, which we do not support.
    """
    if route_set:
        first = route_set[0].uri
        if "lr" not in first.parameters:
            raise DialogError("strict routing (route without ;lr) is not supported")
        return first
    return target


@dataclass
class Dialog:
    """Dialog state for one call leg, from the point of view of the local user agent."""

    call_id: str
    local_tag: str
    remote_tag: str
    local_address: Address  # our From (UAC) or To (UAS), without tag
    remote_address: Address
    remote_target: URI  # remote Contact
    route_set: list[Address]
    local_cseq: int
    remote_cseq: int | None
    contact: Address  # our Contact
    state: DialogState = DialogState.CONFIRMED
    invite_cseq: int = 0  # CSeq of the INVITE that created (or last refreshed) the dialog
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_uac_response(cls, invite: Request, response: Response) -> Dialog:
        """Create the UAC side from a 2xx (or tagged 1xx) answer to our INVITE; a header
        it needs that does not parse is a DialogError like one that is missing."""
        try:
            return cls._from_uac_response(invite, response)
        except DialogError:
            raise
        except ValueError as exc:
            raise DialogError(f"unusable header in the response: {exc}") from None

    @classmethod
    def _from_uac_response(cls, invite: Request, response: Response) -> Dialog:
        to = response.to_address
        remote_tag = to.parameters.get("tag")
        if not remote_tag:
            raise DialogError("response creating a dialog has no To tag")
        contacts = response.contact
        if not contacts:
            raise DialogError("response creating a dialog has no Contact")
        from_ = invite.from_address
        local_tag = from_.parameters.get("tag")
        if not local_tag:
            raise DialogError("INVITE has no From tag")
        our_contacts = invite.contact
        if not our_contacts:
            raise DialogError("INVITE has no Contact")
        return cls(
            call_id=invite.call_id,
            local_tag=local_tag,
            remote_tag=remote_tag,
            local_address=_without_tag(from_),
            remote_address=_without_tag(to),
            remote_target=contacts[0].uri,
            route_set=list(reversed(response.record_route)),
            local_cseq=invite.cseq.sequence,
            remote_cseq=None,
            contact=our_contacts[0],
            state=DialogState.CONFIRMED if response.code < 300 else DialogState.EARLY,
            invite_cseq=invite.cseq.sequence,
        )

    @classmethod
    def from_uas_request(cls, invite: Request, local_tag: str, contact: Address) -> Dialog:
        """Create the UAS side when we answer an incoming INVITE; a header it needs that
        does not parse is a DialogError like one that is missing."""
        try:
            return cls._from_uas_request(invite, local_tag, contact)
        except DialogError:
            raise
        except ValueError as exc:
            raise DialogError(f"unusable header in the INVITE: {exc}") from None

    @classmethod
    def _from_uas_request(cls, invite: Request, local_tag: str, contact: Address) -> Dialog:
        from_ = invite.from_address
        remote_tag = from_.parameters.get("tag")
        if not remote_tag:
            raise DialogError("INVITE has no From tag")
        contacts = invite.contact
        if not contacts:
            raise DialogError("INVITE has no Contact")
        return cls(
            call_id=invite.call_id,
            local_tag=local_tag,
            remote_tag=remote_tag,
            local_address=_without_tag(invite.to_address),
            remote_address=_without_tag(from_),
            remote_target=contacts[0].uri,
            route_set=list(invite.record_route),
            local_cseq=0,
            remote_cseq=invite.cseq.sequence,
            contact=contact,
            invite_cseq=invite.cseq.sequence,
        )

    def matches(self, message: Request | Response, *, incoming: bool = True) -> bool:
        """True when ``message`` belongs to this dialog (Call-ID and both tags)."""
        if message.call_id != self.call_id:
            return False
        from_tag = message.from_address.parameters.get("tag")
        to_tag = message.to_address.parameters.get("tag")
        is_remote_request = incoming and isinstance(message, Request)
        if is_remote_request:
            return from_tag == self.remote_tag and to_tag == self.local_tag
        return from_tag == self.local_tag and to_tag == self.remote_tag

    def create_request(
        self,
        method: str,
        via: Via,
        *,
        body: bytes = b"",
        content_type: str | None = None,
    ) -> Request:
        """Build an in-dialog request (BYE, re-INVITE, INFO, OPTIONS); ACK uses create_ack."""
        if method in ("ACK", "CANCEL"):
            raise DialogError(f"{method} is not built by create_request")
        self.local_cseq += 1
        request = self._base_request(method, via, CSeq(self.local_cseq, method))
        if method == "INVITE":
            self.invite_cseq = self.local_cseq
        if content_type is not None:
            request.headers.set("Content-Type", content_type)
        request.body = body
        request.content_length = len(body)
        return request

    def create_ack(self, via: Via, *, cseq: int | None = None, body: bytes = b"") -> Request:
        """ACK for a 2xx: a new transaction with the INVITE's CSeq number (RFC 3261 §13.2.2.4)."""
        request = self._base_request("ACK", via, CSeq(cseq or self.invite_cseq, "ACK"))
        request.body = body
        request.content_length = len(body)
        return request

    def receive_request(self, request: Request) -> bool:
        """Check and record the remote CSeq; False means out of order (answer 500)."""
        sequence = request.cseq.sequence
        if request.method == "ACK" or request.method == "CANCEL":
            return True
        if self.remote_cseq is not None and sequence <= self.remote_cseq:
            return False
        self.remote_cseq = sequence
        if request.method == "INVITE":
            self.invite_cseq = sequence
        return True

    def refresh_target(self, message: Request | Response) -> None:
        """A re-INVITE or its 2xx may move the remote target (RFC 3261 §12.2)."""
        contacts = message.contact
        if contacts:
            self.remote_target = contacts[0].uri

    def destination(self) -> URI:
        """The URI whose host/port an in-dialog request is physically sent to."""
        return next_hop(self.remote_target, self.route_set)

    def _base_request(self, method: str, via: Via, cseq: CSeq) -> Request:
        request = Request(method, self.remote_target)
        branch_via = Via(
            transport=via.transport,
            host=via.host,
            port=via.port,
            parameters=via.parameters.replace(branch=new_branch()),
        )
        request.via = [branch_via]
        request.max_forwards = 70
        request.from_address = _with_tag(self.local_address, self.local_tag)
        request.to_address = _with_tag(self.remote_address, self.remote_tag)
        request.call_id = self.call_id
        request.cseq = cseq
        if self.route_set:
            request.route = list(self.route_set)
        request.contact = [self.contact]
        request.user_agent = USER_AGENT
        return request


def _with_tag(address: Address, tag: str) -> Address:
    return Address(
        uri=address.uri, name=address.name, parameters=address.parameters.replace(tag=tag)
    )


def _without_tag(address: Address) -> Address:
    params = {k: v for k, v in address.parameters.items() if k != "tag"}
    return Address(
        uri=address.uri, name=address.name, parameters=type(address.parameters)(**params)
    )
