"""Fuzz bench: hostile SIP, SDP, RTP and HTTP against a real `ackline serve --role all`.

Starts the server (SQLite, a `hotline:` section trusting 127.0.0.1 so INVITEs reach call
setup, its output in a log file) and, in order:

1. sends each RFC 4475 torture message once over UDP and TCP, then ``--sip`` seeded
   mutations of a corpus (bench/fuzz_corpus: our request templates and the torture
   messages) over UDP and TCP, at the rate the server keeps up with; answered calls are
   ACKed and hung up, some after mutated in-dialog requests;
2. INVITEs whose SDP is odd (bench/fuzz_sdp.py), each answered or refused, then ended;
3. ``--rtp`` RTP/RTCP/RFC 4733 packets, valid and broken, to a live call's media port,
   from the offered address and from strangers;
4. schemathesis against /openapi.json, ``--api-examples`` valid and invalid cases per
   operation, with a real API key.

Meanwhile an OPTIONS every second checks the server still answers. Then it waits for the
calls to end, samples RSS, open files and sockets (before: after a warm-up call), makes a
real SIPp call that must be answered and hung up cleanly, checks /readyz, stops the server
with SIGTERM (timed) and scans its log for tracebacks. It prints a table and exits 0 on
PASS, 1 on FAIL (bench/fuzz_report.py has the rules and bounds).

Everything runs in a private network namespace (`unshare --net`, as root or in a user
namespace): only loopback exists there, so whatever address a mutated message names, no
packet leaves the machine and no other process's ports are hit.

    python -m bench.fuzz [--sip 1000000] [--sdp 300] [--rtp 100000] [--api-examples 25]
                         [--prime 40] [--settle 40] [--seed 13] [--tcp-share 0.2]
                         [--time-limit 3600] [--workdir DIR] [--keep] [--json [FILE]]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.fuzz_api import fuzz_api
from bench.fuzz_net import SipDriver
from bench.fuzz_report import (
    Bounds,
    LogFindings,
    Outcome,
    ProcSample,
    judge,
    render,
    sample,
    scan_log,
)
from bench.fuzz_rtp import fuzz_live_call
from bench.fuzz_sdp import offers
from bench.ports import free_media_port, free_port, listening
from bench.services import Owned, ServiceError, Services, ackline_command, service_env, tail

NETNS_ENV = "ACKLINE_FUZZ_NETNS"
COMPANY = "fuzz"
API_KEY = "fuzz-key"
UAC_SCENARIO = Path(__file__).with_name("fuzz_uac.xml")
STARTUP_BOUND = 120.0  # seconds for the server to listen and be ready on a loaded machine


def calls_end_bound(t1: float) -> float:
    """How long a call fuzzing left behind may take to end: unACKed, its 2xx is resent for
    64*T1, then its BYE waits timer F (64*T1 more); plus room for a loaded machine."""
    return 128 * t1 + 26.0


CHECK_CALL = "fuzz-check"  # Call-ID prefix of the SIPp calls before and after fuzzing
STOP_BOUND = 60.0  # SIGTERM; then SIGKILL (the shutdown check fails long before)


@dataclass(frozen=True)
class Params:
    sip: int = 1_000_000
    sdp: int = 300
    rtp: int = 100_000
    api_examples: int = 25
    prime: float = 40.0  # seconds of fuzzing before the baseline (see Run.prime)
    settle: float = 40.0  # seconds after the last SIP input before a sample (timer J)
    t1: float = 0.5  # the server's SIP T1 (ACKLINE_SIP_T1): every SIP timer scales with it
    seed: int = 13
    tcp_share: float = 0.2
    time_limit: float = 3600.0  # the whole run; phases stop early when it is near
    workdir: Path | None = None
    keep: bool = False
    progress: bool = True


def say(params: Params, message: str, started: float = time.monotonic()) -> None:
    if params.progress:
        print(f"[{time.monotonic() - started:7.1f}s] {message}", file=sys.stderr, flush=True)


# -- the network namespace ---------------------------------------------------------------


def _loopback_up() -> None:
    """Bring `lo` up in a fresh namespace (SIOCGIFFLAGS/SIOCSIFFLAGS, no `ip` needed)."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, siocgifflags, request))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


def reexec_in_netns(argv: list[str]) -> None:
    """Run this bench again inside a new network namespace; does not return."""
    unshare = shutil.which("unshare")
    if unshare is None:
        raise SystemExit("bench.fuzz needs `unshare` (util-linux) for its own network namespace")
    isolate = ["--net"] if os.geteuid() == 0 else ["--user", "--map-root-user", "--net"]
    env = {**os.environ, NETNS_ENV: "1"}
    os.execve(unshare, [unshare, *isolate, sys.executable, "-m", "bench.fuzz", *argv], env)


# -- the server --------------------------------------------------------------------------


def server_config(workdir: Path) -> dict[str, Any]:
    """A hotline on every number, trusting 127.0.0.1, with a flood limit far above what
    the fuzzer sends: INVITEs must reach call setup, not stop at the limiter."""
    return {
        "company": COMPANY,
        "recipients": [{"id": "oncall", "name": "On call", "phone": "+14155550101"}],
        "policies": [{"name": "hotline", "steps": [
            {"recipients": ["oncall"], "channels": ["voice"], "delay": "10m"}]}],
        "hotline": {
            "numbers": {"default": {"flow": "hotline", "policy": "hotline"}},
            "trusted": [{"name": "loopback", "sources": ["127.0.0.1"]}],
            "recordings_dir": str(workdir / "recordings"),
            "invite_rate": 1_000_000,
            "invite_burst": 1_000_000,
        },
    }  # fmt: skip


class Server:
    def __init__(self, workdir: Path, services: Services, t1: float) -> None:
        self.workdir = workdir
        self.sip_port = free_port()
        self.http_port = free_port()
        config = workdir / "ackline.yaml"
        config.write_text(yaml.safe_dump(server_config(workdir)))
        env = service_env({
            "ACKLINE_CONFIG": str(config),
            "ACKLINE_API_KEYS": f"{API_KEY}:{COMPANY}",
            "ACKLINE_DATABASE_URL": f"sqlite:///{workdir / 'ackline.db'}",
            "ACKLINE_AUDIT_DIR": str(workdir / "audit"),
            "ACKLINE_SIP_T1": str(t1),
        })  # fmt: skip
        if "ACKLINE_PROMPT_CACHE" in os.environ:
            env["ACKLINE_PROMPT_CACHE"] = os.environ["ACKLINE_PROMPT_CACHE"]
        cmd = [*ackline_command(), "serve", "--role", "all", "--host", "127.0.0.1",
               "--port", str(self.sip_port), "--http-port", str(self.http_port)]  # fmt: skip
        self.proc = Owned("ackline", cmd, workdir / "server.log", env=env, cwd=workdir)
        services.add(self.proc)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log(self) -> Path:
        return self.proc.log

    def start(self) -> None:
        self.proc.start()
        deadline = time.monotonic() + STARTUP_BOUND
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise ServiceError(f"ackline serve exited at start:\n{tail(self.log)}")
            if listening(self.sip_port, "udp") and self.readyz() == 200:
                return
            time.sleep(0.1)
        raise ServiceError(f"ackline serve not ready in {STARTUP_BOUND:g} s:\n{tail(self.log)}")

    def readyz(self) -> int | None:
        try:
            return httpx.get(f"{self.base_url}/readyz", timeout=5).status_code
        except httpx.HTTPError:
            return None

    def metrics(self) -> dict[str, float]:
        """The gateway's counters from /metrics (name{labels} -> value)."""
        try:
            text = httpx.get(f"{self.base_url}/metrics", timeout=5).text
        except httpx.HTTPError:
            return {}
        values = {}
        for line in text.splitlines():
            if line.startswith(("ackline_rtp_", "ackline_sip_", "ackline_call_")):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    values[name] = float(value)
        return values

    def crashed(self) -> str | None:
        if self.proc.alive():
            return None
        code = self.proc.popen.returncode
        return f"exited with status {code} during the run; log tail:\n{tail(self.log, 30)}"


def sipp_call(server: Server, workdir: Path, name: str) -> str:
    """One SIPp call: answered, held a second, hung up with BYE, 200. "ok" or why not."""
    if shutil.which("sipp") is None:
        return "sipp is not installed (Debian package sip-tester)"
    calldir = workdir / name
    calldir.mkdir(exist_ok=True)
    port = free_port()
    cmd = ["sipp", "-sf", str(UAC_SCENARIO), "-i", "127.0.0.1", "-p", str(port), "-mi",
           "127.0.0.1", "-mp", str(free_media_port(avoid=port)), "-t", "u1", "-m", "1",
           "-nostdin", "-timeout", "30s", "-timeout_error", "-trace_err", "-cid_str",
           f"{CHECK_CALL}-%u-%p@%s", f"127.0.0.1:{server.sip_port}"]  # fmt: skip
    try:
        done = subprocess.run(cmd, cwd=calldir, capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "SIPp did not finish within 60 s"
    if done.returncode == 0:
        return "ok"
    errors = "".join(p.read_text(errors="replace")[-600:] for p in calldir.glob("*_errors.log"))
    return f"SIPp exit {done.returncode}: {errors.strip()[-600:] or done.stdout[-300:]!r}"


def wait_calls_ended(server: Server, baseline: ProcSample, bound: float) -> ProcSample:
    """Until the server holds no more UDP sockets than at the baseline (every call's media
    socket closed), at most ``bound`` seconds; the last sample."""
    deadline = time.monotonic() + bound
    current = sample(server.proc.pid)
    while current.udp_sockets > baseline.udp_sockets and time.monotonic() < deadline:
        if not server.proc.alive():
            break
        time.sleep(1.0)
        current = sample(server.proc.pid)
    time.sleep(1.0)  # closing sockets, freed memory returned
    return sample(server.proc.pid)


# -- the run -----------------------------------------------------------------------------


class Run:
    """One fuzz run's findings as they come in, turned into an Outcome at the end."""

    def __init__(self, params: Params, workdir: Path) -> None:
        self.params = params
        self.workdir = workdir
        self.started = time.monotonic()
        self.rng = random.Random(params.seed)
        self.inputs: dict[str, int] = {}
        self.rates: dict[str, float] = {}
        self.responses: dict[str, dict[str, int]] = {}
        self.hangs: dict[str, int] = {}
        self.notes: list[str] = []
        self.torture: dict[str, dict[str, str]] = {}
        self.sdp_outcomes: Counter[str] = Counter()
        self.answered: list[str] = []  # Call-IDs of every call the server answered
        self.transcripts: dict[str, list[bytes]] = {}
        self.rtp: dict[str, Any] = {}
        self.api_failures: list[dict[str, Any]] = []
        self.samples: dict[str, ProcSample] = {}  # the server after each phase
        self.peak_rss_kb = 0
        self.invites: dict[str, bytes] = {}  # INVITEs by Call-ID (the last ones sent)
        self.sip_ended = 0.0
        self._server: Server | None = None
        self._watched = 0.0

    def watch(self) -> bool:
        """The phases' liveness callback: is the server up? Also keeps the peak RSS (a
        sample at most once a second)."""
        server = self._server
        if server is None or not server.proc.alive():
            return False
        now = time.monotonic()
        if now - self._watched >= 1.0:
            self._watched = now
            with contextlib.suppress(OSError):
                self.peak_rss_kb = max(self.peak_rss_kb, sample(server.proc.pid).rss_kb)
        return True

    def prime(self, server: Server) -> None:
        """Fuzz for ``params.prime`` seconds, then wait for its transactions to expire:
        the baseline then already holds what a steady input rate keeps in flight (finished
        transactions wait 32 s) and the allocator's arenas for it, so growth measured
        against it is what stays, not what a rate holds for a while."""
        if self.params.prime <= 0:
            return
        say(self.params, f"priming: {self.params.prime:g} s of fuzzing, then "
                         f"{self.params.settle:g} s for its transactions to end")  # fmt: skip
        rng = random.Random(self.params.seed + 1)
        (self.workdir / "prime").mkdir(exist_ok=True)
        driver = SipDriver(("127.0.0.1", server.sip_port), rng, self.workdir / "prime",
                           alive=self.watch, tcp_share=self.params.tcp_share)  # fmt: skip
        try:
            driver.fuzz(10**9, time.monotonic() + self.params.prime)
        finally:
            driver.close()
        self.inputs["SIP while priming (not counted below)"] = sum(driver.stats.inputs.values())
        time.sleep(self.params.settle)

    def at(self, share: float) -> float:
        """A phase's deadline: ``share`` of the time limit after the start."""
        return self.started + self.params.time_limit * share

    def sip(self, server: Server) -> None:
        params = self.params
        driver = SipDriver(("127.0.0.1", server.sip_port), self.rng, self.workdir,
                           alive=self.watch, tcp_share=params.tcp_share)  # fmt: skip
        try:
            self.torture = driver.torture()  # on a fresh server: a conformance reading
            say(params, f"RFC 4475: {len(self.torture)} messages sent over UDP and TCP")
            driver.fuzz(params.sip, self.at(0.7))
            stats = driver.stats
            say(params, f"SIP: {sum(stats.inputs.values()):,} inputs in {stats.elapsed:.0f} s")
            sink = driver.sink.getsockname()[1]
            calls = driver.sdp_calls(offers(self.rng, "127.0.0.1", sink, params.sdp))
            self.sdp_outcomes.update(call.outcome for call in calls)
            say(params, f"SDP: {len(calls)} INVITEs: {dict(self.sdp_outcomes)}")
            self.hangs["INVITEs left at 1xx (no final response)"] = stats.provisional_only
            self.hangs["SDP INVITEs without a final response"] = self.sdp_outcomes[
                "no final response"]  # fmt: skip
            self.hangs["SIP liveness OPTIONS lost"] = stats.probes_lost
            self.hangs["TCP connections the server stopped reading"] = stats.tcp_stuck
            if driver.kernel_drops:
                self.notes.append(f"the kernel dropped {driver.kernel_drops:,} datagrams on the "
                                  "server's SIP socket (its backlog was full)")  # fmt: skip
        finally:
            driver.close()
            self.sip_ended = time.monotonic()
            self.invites = {k: c.data for k, c in driver.calls.items()}
        self.inputs["SIP inputs made"] = stats.generated
        self.inputs["SIP over UDP"] = stats.inputs["udp"]
        self.inputs["SIP over TCP"] = stats.inputs["tcp"]
        self.inputs["  lost with a TCP connection the server closed"] = stats.tcp_unsent
        self.inputs["  of which in-dialog"] = stats.in_dialog
        self.inputs["  of which unmutated"] = stats.unmutated
        self.inputs["RFC 4475 messages (UDP + TCP)"] = 2 * len(self.torture)
        self.inputs["INVITEs with odd SDP"] = stats.inputs["sdp"]
        sent = stats.inputs["udp"] + stats.inputs["tcp"]
        self.rates["SIP inputs/s (mean)"] = sent / max(stats.send_seconds, 1e-9)
        seconds = sorted(stats.per_second[1:-1]) or stats.per_second
        if seconds and not seconds[0]:
            self.notes.append(f"{seconds.count(0)} whole second(s) without a SIP input sent: "
                              "the server's UDP backlog did not drain")  # fmt: skip
        if seconds:
            self.rates["SIP inputs/s (slowest whole second)"] = seconds[0]
            self.rates["SIP inputs/s (median second)"] = seconds[len(seconds) // 2]
        self.rates["s paused for the server's UDP backlog"] = stats.paused
        self.rates["slowest liveness OPTIONS (ms)"] = stats.probe_max_ms
        self.responses["SIP by class"] = dict(stats.responses)
        self.responses["SIP 5xx"] = {str(c): n for c, n in stats.codes.items() if c >= 500}
        self.responses["SIP calls"] = {
            "answered": stats.answered, "hung up": stats.hangups, "BYE 200": stats.hangups_ok,
            **{f"BYE {c}": n for c, n in stats.hangups_refused.items()},
            "cancelled": stats.cancels}  # fmt: skip
        self.responses["SIP requests from the server"] = dict(stats.server_requests)
        self.responses["TCP"] = {
            "connections": stats.tcp_connects,
            "closed by the server": stats.tcp_closed_by_server,
        }
        self.answered += stats.answered_ids
        self.transcripts = stats.transcripts
        self.notes += [f"reproducer: {path}" for path in stats.reproducers]

    def media(self, server: Server) -> None:
        params = self.params
        say(params, f"RTP: {params.rtp:,} packets to live calls")
        before = server.metrics()
        media = fuzz_live_call(("127.0.0.1", server.sip_port), params.rtp, self.rng,
                               alive=self.watch, deadline=self.at(0.8))  # fmt: skip
        time.sleep(2.0)  # drops reach the metric on the sessions' housekeeping tick
        after = server.metrics()
        dropped = {k.split('"')[1]: int(v - before.get(k, 0.0)) for k, v in after.items()
                   if k.startswith("ackline_rtp_dropped_packets_total")}  # fmt: skip
        self.rtp = {
            "packets by kind": {str(k): n for k, n in media.sent.items()},
            "packets by source": {str(k): n for k, n in media.sources.items()},
            "dropped by the gateway (metric)": dropped,
            "calls (ended by the gateway)": f"{media.calls} ({media.ended_by_gateway})",
            "alive checks (unanswered)": f"{media.alive_checks} ({media.alive_failed})",
            "packets/s": round(sum(media.sent.values()) / max(media.elapsed, 1e-9)),
        }
        self.inputs["RTP/RTCP/RFC 4733 packets"] = sum(media.sent.values())
        self.hangs["live calls not answered"] = media.calls_failed
        self.hangs["live-call OPTIONS unanswered"] = media.alive_failed
        self.answered += media.call_ids

    def api(self, server: Server) -> None:
        params = self.params
        say(params, f"HTTP API: schemathesis, {params.api_examples} cases per operation and mode")
        api = fuzz_api(server.base_url, API_KEY, params.api_examples, params.seed, self.at(0.9))
        self.inputs["HTTP requests"] = api.requests
        self.responses["HTTP by class"] = dict(api.statuses)
        self.rates["HTTP operations"] = api.operations
        self.api_failures = api.failures
        self.hangs["HTTP requests without an answer"] = api.transport_errors
        unusable = [e for e in api.generation_errors if "Unsatisfiable" not in e]
        self.notes += [f"schemathesis: {e}" for e in unusable[:5]]

    def traceback_inputs(self, log: LogFindings) -> None:
        """A traceback announced as "call <Call-ID>: ..." names the INVITE that caused it:
        written out as that traceback's reproducer."""
        for n, kind in enumerate(log.kinds.values(), 1):
            match = re.search(r"call (\S+?):", kind.context)
            data = self.invites.get(match[1]) if match else None
            if data:
                path = self.workdir / f"repro-traceback-{n}.sip"
                path.write_bytes(data)
                self.notes.append(f"reproducer of '{kind.signature[:60]}': {path}")

    def unended(self, log: LogFindings) -> list[str]:
        """Answered calls with no result line: the server never ended them. The first
        few get their transcript (what we sent them) written as a reproducer."""
        missing = [c for c in self.answered if c not in log.ended_calls]
        for n, call_id in enumerate(missing[:10], 1):
            sent = self.transcripts.get(call_id)
            if sent:
                path = self.workdir / f"repro-never-ended-{n}.sip"
                path.write_bytes(b"\n--- next message ---\n".join(sent))
                self.notes.append(f"reproducer (call never ended): {path}")
        return missing


def run(params: Params) -> Outcome:
    workdir = params.workdir or Path(tempfile.mkdtemp(prefix="ackline-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    this = Run(params, workdir)
    before = after = None
    crashed: str | None = None
    final_call = "not run"
    readyz: int | None = None
    took: float | None = None
    exit_code: int | None = None
    run_ended_at: int | None = None
    with Services() as services:
        server = Server(workdir, services, params.t1)
        say(params, f"ackline serve: SIP :{server.sip_port}, HTTP :{server.http_port}, "
                    f"workdir {workdir}")  # fmt: skip
        server.start()
        this._server = server
        warm = sipp_call(server, workdir, "warmup-call")
        if warm != "ok":
            raise ServiceError(f"the server does not take a call before fuzzing: {warm}")
        this.prime(server)
        time.sleep(1.0)
        before = sample(server.proc.pid)
        say(params, f"baseline: RSS {before.rss_kb / 1024:.0f} MB, {before.fds} open files, "
                    f"{before.udp_sockets} UDP sockets")  # fmt: skip
        this.samples["baseline"] = before
        for phase in (this.sip, this.media, this.api):
            if server.proc.alive():
                phase(server)
            if server.proc.alive():
                this.samples[f"after {phase.__name__}"] = sample(server.proc.pid)
        crashed = server.crashed()
        if crashed is None:
            say(params, "waiting for every call and transaction to end")
            quiet = this.sip_ended + params.settle - time.monotonic()
            if quiet > 0:
                time.sleep(quiet)
            after = wait_calls_ended(server, before, calls_end_bound(params.t1))
            run_ended_at = server.log.stat().st_size
            final_call = sipp_call(server, workdir, "final-call")
            readyz = server.readyz()
            crashed = server.crashed()
        if crashed is None:
            say(params, "SIGTERM")
            took = server.proc.stop(timeout=STOP_BOUND)
            exit_code = server.proc.popen.returncode
    log = scan_log(server.log, run_ended_at)
    log.open_at_end = [c for c in log.open_at_end if not c[0].startswith(CHECK_CALL)]
    this.traceback_inputs(log)
    outcome = Outcome(
        params={k: str(v) for k, v in asdict(params).items()}, inputs=this.inputs,
        rates=this.rates, responses=this.responses, before=before, after=after,
        crashed=crashed, log=log, hangs=this.hangs, api_failures=this.api_failures,
        final_call=final_call, readyz=readyz, shutdown_seconds=took, exit_code=exit_code,
        torture=this.torture, sdp_outcomes=dict(this.sdp_outcomes),
        answered_calls=len(this.answered), calls_not_ended=this.unended(log),
        rtp=this.rtp, notes=this.notes, workdir=str(workdir), samples=this.samples,
        peak_rss_kb=this.peak_rss_kb,
    )  # fmt: skip
    outcome.notes.append(f"server log: {server.log}")
    outcome.notes.append(f"wall time {time.monotonic() - this.started:.0f} s")
    return outcome


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    defaults = Params()
    parser = argparse.ArgumentParser(
        prog="python -m bench.fuzz", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--sip", type=int, default=defaults.sip, help="mutated SIP inputs")
    parser.add_argument("--sdp", type=int, default=defaults.sdp, help="INVITEs with odd SDP")
    parser.add_argument("--rtp", type=int, default=defaults.rtp, help="packets to live calls")
    parser.add_argument("--api-examples", type=int, default=defaults.api_examples,
                        help="schemathesis cases per operation and mode")  # fmt: skip
    parser.add_argument(
        "--prime",
        type=float,
        default=defaults.prime,
        help="seconds of fuzzing before the baseline sample (0: none)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=defaults.settle,
        help="seconds after the last SIP input before sampling the server "
        "(a finished transaction is kept 32 s, timer J)",
    )
    parser.add_argument("--t1", type=float, default=defaults.t1,
                        help="the server's SIP timer T1 in seconds (ACKLINE_SIP_T1)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--tcp-share", type=float, default=defaults.tcp_share,
                        help="share of SIP inputs sent over TCP")  # fmt: skip
    parser.add_argument("--time-limit", type=float, default=defaults.time_limit,
                        help="seconds for the whole run")  # fmt: skip
    parser.add_argument("--workdir", type=Path, help="keep the server's log and files here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="FILE",
        help="also write the report as JSON (to stdout with no FILE)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(args_list)
    if os.environ.get(NETNS_ENV) != "1":
        reexec_in_netns(args_list)
    _loopback_up()
    params = Params(sip=args.sip, sdp=args.sdp, rtp=args.rtp, api_examples=args.api_examples,
                    prime=args.prime, settle=args.settle, t1=args.t1,
                    seed=args.seed, tcp_share=args.tcp_share, time_limit=args.time_limit,
                    workdir=args.workdir, keep=args.keep, progress=not args.quiet)  # fmt: skip
    try:
        outcome = run(params)
    except ServiceError as exc:
        print(f"fuzz bench could not run: {exc}", file=sys.stderr)
        return 2
    bounds = Bounds()
    outcome.checks = judge(outcome, bounds)
    print(render(outcome, bounds))
    if args.json is not None:
        text = json.dumps(outcome.to_json(), indent=2, default=str)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    workdir = Path(outcome.workdir)
    if outcome.passed and params.workdir is None and not params.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if outcome.passed else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
