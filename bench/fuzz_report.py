"""What the fuzz bench measures about the server and how it judges it: process samples from
/proc, the server log's tracebacks, the pass rules with their bounds, and the table.

Pure apart from reading /proc and the log file, so the rules are tested on hand-made
records (tests/unit/test_fuzz_report.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ProcSample:
    """One look at the server process."""

    rss_kb: int
    fds: int
    udp_sockets: int
    tcp_sockets: int
    threads: int
    udp_ports: tuple[int, ...] = ()  # local ports of its UDP sockets: which one stayed open


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / entry)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _ports_in(path: str, inodes: set[str]) -> list[int]:
    """Local ports of the sockets in a /proc/net table that are among ``inodes``."""
    try:
        with open(path) as f:
            rows = [line.split() for line in list(f)[1:]]
    except OSError:
        return []
    return [int(r[1].rsplit(":", 1)[1], 16) for r in rows if len(r) > 9 and r[9] in inodes]


def sample(pid: int) -> ProcSample:
    """RSS, open descriptors, UDP and TCP sockets and threads of ``pid`` (Linux /proc;
    the socket tables are those of the reader's network namespace, the server's here)."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"^VmRSS:\s+(\d+)", status, re.MULTILINE)[1])  # type: ignore[index]
    threads = int(re.search(r"^Threads:\s+(\d+)", status, re.MULTILINE)[1])  # type: ignore[index]
    inodes = _socket_inodes(pid)
    udp = _ports_in(f"/proc/{pid}/net/udp", inodes) + _ports_in(f"/proc/{pid}/net/udp6", inodes)
    tcp = _ports_in(f"/proc/{pid}/net/tcp", inodes) + _ports_in(f"/proc/{pid}/net/tcp6", inodes)
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return ProcSample(rss, fds, len(udp), len(tcp), threads, tuple(sorted(udp)))


# -- the server's log ---------------------------------------------------------------------

_TRACEBACK = "Traceback (most recent call last):"
_NEVER_RETRIEVED = ("Task exception was never retrieved", "exception was never retrieved")
_FRAME = re.compile(r'^\s+File "([^"]+)", line (\d+), in (\S+)')
_LEVEL = re.compile(r"^\S+ \S+ (ERROR|CRITICAL) (\S+): (.*)$")
_VOLATILE = re.compile(r"0x[0-9a-f]+|\b[0-9a-f]{8,}\b|\d+")


@dataclass
class Traceback:
    """One kind of traceback: where it was raised, what, how often, the first in full."""

    signature: str
    count: int
    context: str  # the log line that announced it
    example: str


@dataclass
class LogFindings:
    tracebacks: int = 0
    never_retrieved: int = 0
    error_lines: Counter[str] = field(default_factory=Counter)  # ERROR/CRITICAL, by shape
    kinds: dict[str, Traceback] = field(default_factory=dict)
    forced_exit: bool = False  # the server's own "still stopping ... exiting now"
    ended_calls: set[str] = field(default_factory=set)  # Call-IDs of results before `until`
    # Calls whose result came after `until` (the end of the run): still open then, ended by
    # the final check's call or the stop: (Call-ID, duration in s, reason).
    open_at_end: list[tuple[str, float, str]] = field(default_factory=list)

    @property
    def unhandled(self) -> int:
        return self.tracebacks + self.never_retrieved


def _signature(frames: list[str], last: str) -> str:
    """Where and what, so repeats of one bug group: the exception type and message with
    numbers and ids blanked, and our innermost frame before the first library frame (a
    library that re-raises one exception object grows its traceback with every raise, so
    frames after that are history, not this failure)."""
    ours: list[str] = []
    for frame in frames:
        if "/site-packages/" in frame or "/lib/python" in frame:
            if ours:
                break
            continue
        ours.append(frame)
    where = (ours or frames or ["?"])[-1]
    path, _, rest = where.partition(":")
    return f"{_VOLATILE.sub('N', last)[:160]} @ {Path(path).name}:{rest}"


_CHAINED = ("During handling of the above exception", "The above exception was the direct cause")


class _Scanner:
    """Reads a log a line at a time; a traceback, with the exceptions chained to it, is one
    finding, named after the last exception of the chain."""

    def __init__(self, until: int | None = None) -> None:
        self.until = until
        self.offset = 0
        self.found = LogFindings()
        self.previous = ""
        self.block: list[str] | None = None
        self.frames: list[str] = []
        self.context = ""
        self.last = ""  # the exception line that ended the traceback so far
        self.chained = False

    def feed(self, line: str) -> None:
        if self.block is not None and self._continue(line):
            return
        if _TRACEBACK in line:
            self.found.tracebacks += 1
            self.block, self.frames, self.last, self.chained = [line], [], "", False
            self.context = self.previous
            return
        found = self.found
        if any(text in line for text in _NEVER_RETRIEVED):
            found.never_retrieved += 1
        if "still stopping after" in line and "exiting now" in line:
            found.forced_exit = True
        level = _LEVEL.match(line)
        if level is not None:
            found.error_lines[f"{level[2]}: {_VOLATILE.sub('N', level[3])[:120]}"] += 1
        elif line.startswith("{") and '"call_id"' in line:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                result = json.loads(line)
                call_id = str(result["call_id"])
                if self.until is None or self.offset < self.until:
                    found.ended_calls.add(call_id)
                else:
                    found.open_at_end.append((call_id, result.get("duration_ms", 0) / 1000,
                                              str(result.get("reason"))))  # fmt: skip
        self.previous = line

    def _continue(self, line: str) -> bool:
        """True when ``line`` belongs to the traceback being read."""
        assert self.block is not None
        if line.startswith(_CHAINED):
            self.chained = True
        elif _TRACEBACK in line and self.chained:  # the newer exception: it names the finding
            self.chained, self.last, self.frames = False, "", []
        elif line.startswith((" ", "\t")) and not self.last:
            match = _FRAME.match(line)
            if match:
                self.frames.append(f"{match[1]}:{match[2]} {match[3]}")
        elif line and not self.chained:
            if self.last:  # the traceback ended at the last exception line
                self.finish()
                return False
            self.last = line
        self.block.append(line)
        return True

    def finish(self) -> None:
        if self.block is None:
            return
        signature = _signature(self.frames, self.last or self.block[-1])
        _add_traceback(self.found, signature, self.context, self.block)
        self.block = None


def scan_log(path: Path, until: int | None = None) -> LogFindings:
    """Tracebacks (grouped), "exception was never retrieved", ERROR lines and the call
    results the server printed, reading the log a line at a time. ``until`` is the log's
    size when the run ended: results after it are calls that were still open then."""
    scanner = _Scanner(until)
    with path.open("rb") as f:
        for raw in f:
            scanner.feed(raw.decode("utf8", "replace").rstrip("\n"))
            scanner.offset += len(raw)
    scanner.finish()
    return scanner.found


def _add_traceback(found: LogFindings, signature: str, context: str, block: list[str]) -> None:
    kind = found.kinds.get(signature)
    if kind is None:
        found.kinds[signature] = Traceback(signature, 1, context, "\n".join(block[:80]))
    else:
        kind.count += 1


# -- bounds and verdict ------------------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    """How much the server may grow over a run and how long it may take to stop.

    RSS: the baseline is taken after a warm-up call (prompts rendered, imports done), so
    what is left is allocator slack and caches that fill once; a leak of even 100 bytes
    per input is 100 MB over the default million, so 64 MB + 10 % of the baseline still
    tells a leak from noise. Descriptors and sockets: once every call has ended, nothing
    per input may stay open; a few descriptors of lazily opened files (the database's
    journal, a log) are allowed. Stop: the drain timeout (ACKLINE_DRAIN_TIMEOUT, 10 s)
    plus the 2 s the CLI itself grants before it cuts a hung stop short.
    """

    rss_growth_mb: float = 64.0
    rss_growth_share: float = 0.10
    fd_growth: int = 8
    udp_growth: int = 0
    shutdown_seconds: float = 12.0

    def rss_limit_kb(self, before_kb: int) -> int:
        return int(self.rss_growth_mb * 1024 + before_kb * self.rss_growth_share)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Outcome:
    """Everything a run measured, in plain data (the JSON report is this, dumped)."""

    params: dict[str, Any]
    inputs: dict[str, int]
    rates: dict[str, float]
    responses: dict[str, dict[str, int]]
    before: ProcSample | None
    after: ProcSample | None
    crashed: str | None  # how the server died during the run, None if it did not
    log: LogFindings
    hangs: dict[str, int]
    api_failures: list[dict[str, Any]]
    final_call: str  # "ok" or what went wrong
    readyz: int | None
    shutdown_seconds: float | None  # None: it had to be killed
    exit_code: int | None
    torture: dict[str, dict[str, str]]
    sdp_outcomes: dict[str, int]
    answered_calls: int
    calls_not_ended: list[str]  # Call-IDs of answered calls without a result line
    rtp: dict[str, Any]
    peak_rss_kb: int = 0
    notes: list[str] = field(default_factory=list)
    workdir: str = ""
    samples: dict[str, ProcSample] = field(default_factory=dict)  # by phase
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        log = self.log
        data["log"] = {
            "tracebacks": log.tracebacks,
            "never_retrieved": log.never_retrieved,
            "forced_exit": log.forced_exit,
            "error_lines": dict(log.error_lines.most_common(30)),
            "kinds": [asdict(k) for k in sorted(log.kinds.values(), key=lambda k: -k.count)],
            "open_at_end": log.open_at_end,
        }
        data["passed"] = self.passed
        return data


def judge(outcome: Outcome, bounds: Bounds) -> list[Check]:
    """The pass rules: no crash, no unhandled exception, growth within ``bounds``, no
    hang, no 5xx from the API, the server still takes a call and is ready, and it stops
    in time."""
    checks = [
        Check("no crash", outcome.crashed is None, outcome.crashed or "server ran throughout"),
        Check("no unhandled exceptions", outcome.log.unhandled == 0,
              f"{outcome.log.tracebacks} tracebacks, {outcome.log.never_retrieved} "
              f"'never retrieved' ({len(outcome.log.kinds)} distinct)"),
    ]  # fmt: skip
    before, after = outcome.before, outcome.after
    if before is not None and after is not None:
        limit = bounds.rss_limit_kb(before.rss_kb)
        growth = after.rss_kb - before.rss_kb
        checks += [
            Check("RSS growth", growth <= limit,
                  f"{before.rss_kb / 1024:.0f} -> {after.rss_kb / 1024:.0f} MB "
                  f"({growth / 1024:+.1f} MB, limit {limit / 1024:.0f} MB)"),
            Check("open files growth", after.fds - before.fds <= bounds.fd_growth,
                  f"{before.fds} -> {after.fds} (limit +{bounds.fd_growth})"),
            Check("UDP sockets back to baseline", after.udp_sockets - before.udp_sockets
                  <= bounds.udp_growth, f"{before.udp_sockets} -> {after.udp_sockets}" + (
                      f" (still open: port {', '.join(map(str, extra))})" if (extra := sorted(
                          set(after.udp_ports) - set(before.udp_ports))) else "")),
        ]  # fmt: skip
    else:
        checks.append(Check("process samples", False, "the server could not be sampled"))
    hangs = {k: v for k, v in outcome.hangs.items() if v}
    checks += [
        Check("no hangs", not hangs, ", ".join(f"{k}={v}" for k, v in hangs.items()) or "none"),
        Check("no call left open at the end", not outcome.log.open_at_end,
              f"{len(outcome.log.open_at_end)} call(s) ended only by the final check or the "
              "stop" + (": " + ", ".join(f"{c[:40]} after {d:.0f} s ({r})" for c, d, r
                                       in outcome.log.open_at_end[:3])
                        if outcome.log.open_at_end else "")),
        Check("every answered call ended", not outcome.calls_not_ended,
              f"{len(outcome.calls_not_ended)} of {outcome.answered_calls} calls answered to "
              "us had not ended when the run did" + (
                  f" (first: {outcome.calls_not_ended[0]})" if outcome.calls_not_ended else "")),
        Check("HTTP API: no 5xx", not outcome.api_failures,
              f"{len(outcome.api_failures)} operation(s) answered 5xx"),
        Check("a real call works afterwards", outcome.final_call == "ok", outcome.final_call),
        Check("/readyz answers 200", outcome.readyz == 200, str(outcome.readyz)),
    ]  # fmt: skip
    took = outcome.shutdown_seconds
    checks.append(Check(
        "SIGTERM stop in time",
        took is not None and took <= bounds.shutdown_seconds and outcome.exit_code == 0
        and not outcome.log.forced_exit,
        ("killed: still running" if took is None else f"{took:.1f} s, exit {outcome.exit_code}")
        + f" (limit {bounds.shutdown_seconds:g} s, exit 0)"))  # fmt: skip
    return checks


def _rows(pairs: Iterable[tuple[str, str]]) -> list[str]:
    pairs = list(pairs)
    width = max((len(k) for k, _ in pairs), default=0)
    return [f"  {k:<{width}}  {v}" for k, v in pairs]


def render(outcome: Outcome, bounds: Bounds) -> str:
    """The table `make fuzz` prints."""
    lines = ["ackline fuzz", "", "inputs sent"]
    lines += _rows((k, f"{v:,}") for k, v in outcome.inputs.items())
    lines += ["", "throughput"]
    lines += _rows((k, f"{v:,.0f}") for k, v in outcome.rates.items())
    lines += ["", "responses"]
    lines += _rows((k, ", ".join(f"{c} {n:,}" for c, n in sorted(v.items())) or "-")
                   for k, v in outcome.responses.items())  # fmt: skip
    if outcome.torture:
        lines += ["", f"RFC 4475 messages ({len(outcome.torture)}), first answer over UDP / TCP"]
        by_answer: dict[str, list[str]] = {}
        for name, got in sorted(outcome.torture.items()):
            by_answer.setdefault(f"{got['udp']} / {got['tcp']}", []).append(name)
        lines += _rows((k, ", ".join(v)) for k, v in sorted(by_answer.items()))
    if outcome.sdp_outcomes:
        lines += ["", "odd SDP offers"]
        lines += _rows((k, str(v)) for k, v in sorted(outcome.sdp_outcomes.items()))
    if outcome.rtp:
        lines += ["", "live call media"]
        lines += _rows((k, str(v)) for k, v in outcome.rtp.items())
    b, a = outcome.before, outcome.after
    if b is not None and a is not None:
        lines += ["", "server process      before      after"]
        for name, x, y in (("RSS (MB)", b.rss_kb / 1024, a.rss_kb / 1024),
                           ("open files", b.fds, a.fds), ("UDP sockets", b.udp_sockets,
                           a.udp_sockets), ("TCP sockets", b.tcp_sockets, a.tcp_sockets),
                           ("threads", b.threads, a.threads)):  # fmt: skip
            lines.append(f"  {name:<16}{x:>10.0f} {y:>10.0f}")
        lines.append(f"  {'peak RSS (MB)':<16}{outcome.peak_rss_kb / 1024:>21.0f}")
        if outcome.samples:
            lines.append("  RSS (MB) by phase: " + ", ".join(
                f"{k} {v.rss_kb / 1024:.0f}" for k, v in outcome.samples.items()))  # fmt: skip
    if outcome.log.kinds:
        lines += ["", "distinct tracebacks (count, where, first announced as)"]
        for kind in sorted(outcome.log.kinds.values(), key=lambda k: -k.count):
            lines.append(f"  {kind.count:>6}  {kind.signature}")
            lines.append(f"          {kind.context[:150]}")
    if outcome.log.error_lines:
        lines += ["", "ERROR lines in the server log (most frequent)"]
        lines += [f"  {n:>6}  {text}" for text, n in outcome.log.error_lines.most_common(10)]
    if outcome.api_failures:
        lines += ["", "HTTP API 5xx"]
        lines += [f"  {f['status']}  {f['operation']}  {f.get('curl', '')[:200]}"
                  for f in outcome.api_failures[:20]]  # fmt: skip
    lines += ["", f"bounds: RSS +{bounds.rss_growth_mb:g} MB + {bounds.rss_growth_share:.0%} of "
              f"the baseline, open files +{bounds.fd_growth}, UDP sockets "
              f"+{bounds.udp_growth}, stop within {bounds.shutdown_seconds:g} s"]  # fmt: skip
    for note in outcome.notes:
        lines.append(f"note: {note}")
    lines += ["", "checks"]
    lines += [f"  {'ok  ' if c.ok else 'FAIL'}  {c.name}: {c.detail}" for c in outcome.checks]
    lines += ["", "PASS" if outcome.passed else "FAIL"]
    return "\n".join(lines)
