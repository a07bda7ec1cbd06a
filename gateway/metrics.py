"""Prometheus metrics of the SIP/RTP core (process-global, like prometheus-client itself)."""

from __future__ import annotations

import enum

from prometheus_client import Counter


class RtpDropReason(enum.StrEnum):
    """Why a call's media port threw a datagram away before handling it."""

    FOREIGN_SOURCE = "foreign_source"  # not the call's media source: possible injection
    MALFORMED = "malformed"  # not parseable as RTP


RTP_DROPPED = Counter(
    "ackline_rtp_dropped_packets_total",
    "Datagrams a call's media port dropped before handling them, by reason",
    ["reason"],
)
# Bound once (labels() is a dict lookup under a lock), and so every reason is exported from
# the start: a rate over a series that appears only with the first drop misses that drop.
RTP_DROPPED_BY_REASON = {
    reason: RTP_DROPPED.labels(reason=reason.value) for reason in RtpDropReason
}


class SipDropReason(enum.StrEnum):
    """Why the SIP stack threw a message away without answering it."""

    MALFORMED = "malformed"  # unparseable, no usable top Via, or a broken ACK
    OVERSIZE = "oversize"  # above the message size limit


SIP_DROPPED = Counter(
    "ackline_sip_dropped_messages_total",
    "SIP messages dropped unanswered, by reason",
    ["reason"],
)
SIP_DROPPED_BY_REASON = {
    reason: SIP_DROPPED.labels(reason=reason.value) for reason in SipDropReason
}

SIP_REJECTED = Counter(
    "ackline_sip_rejected_requests_total",
    "New requests answered with a final error statelessly, before any call state was spent "
    "on them (malformed, untrusted, flood, shutting down), by status code",
    ["code"],
)


def count_rejection(code: int) -> None:
    SIP_REJECTED.labels(code=str(code)).inc()


class TcpCloseReason(enum.StrEnum):
    """Why the SIP transport closed (or refused) an inbound TCP connection itself."""

    GLOBAL_CAP = "global_cap"  # too many inbound connections in all
    SOURCE_CAP = "source_cap"  # too many from one address
    INCOMPLETE = "incomplete"  # no complete message within the message timeout
    IDLE = "idle"  # no traffic at all (keep-alives included) within the idle timeout


TCP_CLOSED = Counter(
    "ackline_sip_tcp_connections_closed_total",
    "Inbound SIP TCP connections refused or closed by the transport's limits, by reason",
    ["reason"],
)
TCP_CLOSED_BY_REASON = {reason: TCP_CLOSED.labels(reason=reason.value) for reason in TcpCloseReason}

CALL_TASK_FAILURES = Counter(
    "ackline_call_task_failures_total",
    "Call tasks that raised: each such call was answered or hung up and cleaned up",
    ["direction"],
)
