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
