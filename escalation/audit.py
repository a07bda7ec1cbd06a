"""Append-only audit trail: one JSON line per event, one file per company.

The first ten fields are a stable contract (never renamed, never change meaning); later
fields are only ever added. Lines are written with a single `write(2)` on an O_APPEND
descriptor, so API and worker processes can share a file without interleaving, and are
flushed immediately (fsync optional: it costs a disk round trip per event).

`replay()` rebuilds an alert's path from these lines alone.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

STABLE_FIELDS = (
    "ts",
    "alert_id",
    "notification_uuid",
    "channel",
    "status",
    "attempt",
    "reason",
    "actor",
    "ip",
    "request_id",
)
_COMPANY = re.compile(r"[^A-Za-z0-9_.-]")


class AuditLog:
    """Writes and reads `<directory>/<company>.jsonl`."""

    def __init__(self, directory: str | Path, *, fsync: bool = False) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def path(self, company: str) -> Path:
        return self.directory / f"{_COMPANY.sub('_', company) or '_'}.jsonl"

    def _fd(self, company: str) -> int:
        fd = self._fds.get(company)
        if fd is None:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(self.path(company), flags, 0o640)
            self._fds[company] = fd
        return fd

    def write(self, company: str, records: Iterable[Mapping[str, Any]]) -> None:
        """Append records; fields missing from the stable set are written as null."""
        lines = []
        for rec in records:
            line = {k: rec.get(k) for k in STABLE_FIELDS}
            line.update({k: v for k, v in rec.items() if k not in line})
            if line["ts"] is None:
                line["ts"] = datetime.now(UTC).isoformat()
            lines.append(json.dumps(line, default=str, separators=(",", ":")) + "\n")
        if not lines:
            return
        data = "".join(lines).encode()
        with self._lock:
            fd = self._fd(company)
            os.write(fd, data)
            if self.fsync:
                os.fsync(fd)

    def read(
        self,
        company: str,
        *,
        alert_id: str | None = None,
        channel: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Matching records in write order; a torn last line (crash mid-write) is skipped."""
        path = self.path(company)
        if not path.exists():
            return
        with path.open(encoding="utf-8") as fh:
            for raw in fh:
                try:
                    rec: dict[str, Any] = json.loads(raw)
                except json.JSONDecodeError:
                    continue
                if alert_id is not None and rec.get("alert_id") != alert_id:
                    continue
                if channel is not None and rec.get("channel") != channel:
                    continue
                if since is not None or until is not None:
                    ts = datetime.fromisoformat(rec["ts"])
                    if (since and ts < since) or (until and ts > until):
                        continue
                yield rec

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


@dataclass
class AttemptPath:
    notification_uuid: str
    channel: str
    recipient_id: str | None
    attempt: int
    statuses: list[str] = field(default_factory=list)

    @property
    def final(self) -> str:
        return self.statuses[-1]


@dataclass
class AlertPath:
    """What happened to one alert, as told by the audit trail."""

    alert_id: str
    state: str = "unknown"
    acked_by: str | None = None
    steps: list[tuple[int, int]] = field(default_factory=list)
    attempts: dict[tuple[str, int], AttemptPath] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)

    def sent(self) -> list[tuple[str, str | None, int]]:
        """(channel, recipient, attempt) of every hand-off, in order."""
        return [
            (a.channel, a.recipient_id, a.attempt)
            for a in self.attempts.values()
            if "sending" in a.statuses
        ]


_STATE_EVENTS = {
    "created": "triggered",
    "ack": "acknowledged",
    "resolve": "resolved",
    "exhausted": "exhausted",
}


def replay(records: Iterable[Mapping[str, Any]], alert_id: str) -> AlertPath:
    """Rebuild the path of `alert_id` (state, steps fired, every attempt's statuses)."""
    path = AlertPath(alert_id)
    for rec in records:
        if rec.get("alert_id") != alert_id:
            continue
        event = str(rec.get("event"))
        path.events.append(event)
        if event in _STATE_EVENTS:
            path.state = _STATE_EVENTS[event]
            if event == "ack":
                path.acked_by = rec.get("actor")
        elif event == "step":
            path.steps.append((int(rec["round"]), int(rec["step"])))
        nid, attempt = rec.get("notification_uuid"), rec.get("attempt")
        if nid is None or attempt is None or event not in ("scheduled", "send", "result", "held"):
            continue
        key = (str(nid), int(attempt))
        entry = path.attempts.get(key)
        if entry is None:
            entry = AttemptPath(str(nid), str(rec.get("channel")), rec.get("recipient_id"), key[1])
            path.attempts[key] = entry
        entry.statuses.append(str(rec.get("status")))
    return path
