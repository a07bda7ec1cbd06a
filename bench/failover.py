"""Failover benchmark: kill the primary carrier mid-run and measure how calls recover.

Two SIPp UAS act as carriers on loopback (answering INVITEs and OPTIONS probes). Calls are
placed at a steady rate through ``CarrierRouter`` (priority strategy, so every call goes
to the primary while it lives); partway through, the primary SIPp is SIGKILLed. Reported:
time from the kill to the next answered call on the secondary, calls lost (not answered),
setup times around the kill, and when the breaker / probes took the primary out.

    python -m bench.failover [--duration 10] [--kill-at 4] [--rate 10] [--transport udp]

Targets: recovery <= 3 s, 0 calls lost. Loopback only; the run is bounded by --duration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.ports import free_media_port, free_port, listening
from carriers.health import HealthChange, HealthPolicy
from carriers.router import CarrierRouter, NoRouteAvailable
from carriers.trunk import Trunk
from gateway.call import Gateway, GatewayConfig
from gateway.sip.transaction import TimerSettings

SCENARIO = Path(__file__).resolve().parents[1] / "tests/integration/scenarios/carrier_uas.xml"
NUMBERS = [f"+1415555{n:04d}" for n in range(100, 200)]  # fictional 555-01xx range


class Carrier:
    """One SIPp UAS process standing in for a carrier."""

    def __init__(self, name: str, workdir: Path, transport: str) -> None:
        self.name = name
        self.port = free_port()
        self.workdir = workdir / name
        self.workdir.mkdir()
        scenario = self.workdir / "carrier_uas.xml"
        scenario.write_text(SCENARIO.read_text().replace("@RING_MS@", "0"))
        cmd = [
            "sipp",
            "-sf",
            str(scenario),
            "-i",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-mi",
            "127.0.0.1",
            "-mp",
            str(free_media_port(avoid=self.port)),
            "-t",
            "u1" if transport == "udp" else "t1",
            "-m",
            "1000000",
            "-max_socket",
            "1024",
            "-nostdin",
        ]
        self.out = open(self.workdir / "sipp.out", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            cmd, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=self.out, stderr=self.out
        )

    def wait_ready(self, transport: str) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(
                    f"sipp {self.name} exited: {(self.workdir / 'sipp.out').read_text()}"
                )
            if listening(self.port, transport):
                return
            time.sleep(0.02)
        raise SystemExit(f"sipp {self.name} did not start listening")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.out.close()


@dataclass
class Record:
    started: float
    finished: float = 0.0
    trunk: str | None = None
    answered: bool = False
    attempts: list[str] = field(default_factory=list)
    error: str | None = None


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("sipp") is None:
        raise SystemExit("sipp is not installed (Debian package sip-tester)")
    workdir = Path(tempfile.mkdtemp(prefix="ackline-failover-"))
    carriers = [Carrier(name, workdir, args.transport) for name in ("primary", "secondary")]
    for c in carriers:
        c.wait_ready(args.transport)
    primary = carriers[0]
    trunks = [
        Trunk(
            name=c.name,
            host="127.0.0.1",
            port=c.port,
            transport=args.transport,
            priority=10 * (i + 1),
            trying_timeout=args.trying_timeout,
        )
        for i, c in enumerate(carriers)
    ]
    changes: list[tuple[float, HealthChange]] = []
    records: list[Record] = []
    udp, tcp = (0, None) if args.transport == "udp" else (None, 0)
    config = GatewayConfig(
        host="127.0.0.1", udp_port=udp, tcp_port=tcp, timers=TimerSettings(t1=args.t1)
    )
    policy = HealthPolicy(
        down_after=args.down_after, up_after=2, breaker_failures=2, breaker_cooldown=30.0
    )
    kill_at = 0.0
    try:
        async with Gateway(config) as gateway:
            router = CarrierRouter(
                gateway,
                trunks,
                "priority",
                allowed_countries=["US"],
                health=policy,
                on_health_change=lambda ch: changes.append((time.monotonic(), ch)),
            )
            prober = router.prober(interval=args.probe_interval)
            inflight: set[asyncio.Task[None]] = set()

            async def one(number: str) -> None:
                record = Record(started=time.monotonic())
                records.append(record)
                try:
                    routed = await router.place_call(number, ring_timeout=5)
                    record.trunk = routed.trunk
                    record.answered = routed.answered
                    record.attempts = [f"{a.trunk}:{a.outcome.value}" for a in routed.attempts]
                    record.finished = time.monotonic()
                    await asyncio.sleep(args.hold)
                    # A BYE to the killed carrier is never answered; do not wait for timer F.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(routed.call.hangup(), 1.0)
                except NoRouteAvailable as exc:
                    record.finished = time.monotonic()
                    record.error = str(exc)
                    record.attempts = [f"{a.trunk}:{a.outcome.value}" for a in exc.attempts]

            async with prober:
                await asyncio.sleep(args.probe_interval * 2)  # probes settle
                begin = time.monotonic()
                deadline = begin + args.duration
                next_call = begin
                index = 0
                killed = False
                while time.monotonic() < deadline:
                    now = time.monotonic()
                    if not killed and now - begin >= args.kill_at:
                        primary.kill()
                        kill_at = time.monotonic()
                        killed = True
                    if now >= next_call and len(inflight) < args.max_inflight:
                        task = asyncio.ensure_future(one(NUMBERS[index % len(NUMBERS)]))
                        inflight.add(task)
                        task.add_done_callback(inflight.discard)
                        index += 1
                        next_call += 1.0 / args.rate
                    await asyncio.sleep(min(0.01, max(0.0, next_call - time.monotonic())))
                if inflight:
                    await asyncio.wait(inflight, timeout=10)
            await router.close(grace=64 * args.t1 + 1)  # let abandoned INVITEs hit timer B
    finally:
        for c in carriers:
            c.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return summarise(records, changes, kill_at, args)


def summarise(
    records: list[Record],
    changes: list[tuple[float, HealthChange]],
    kill_at: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    done = [r for r in records if r.finished]
    answered = [r for r in done if r.answered]
    lost = [r for r in records if not r.answered]
    after = [r for r in answered if r.trunk == "secondary" and r.finished >= kill_at]
    recovery = min((r.finished - kill_at for r in after), default=None)
    around = [r for r in done if kill_at - 0.5 <= r.started <= kill_at + 3.0]
    setups = sorted((r.finished - r.started) * 1000 for r in answered)

    def at(aspect: str, new: str) -> float | None:
        for stamp, change in changes:
            if change.trunk == "primary" and change.aspect == aspect and change.new == new:
                return round(stamp - kill_at, 3)
        return None

    return {
        "transport": args.transport,
        "rate_cps": args.rate,
        "duration_s": args.duration,
        "trying_timeout_s": args.trying_timeout,
        "probe_interval_s": args.probe_interval,
        "calls": len(records),
        "answered": len(answered),
        "lost": len(lost),
        "via_primary": sum(1 for r in answered if r.trunk == "primary"),
        "via_secondary": sum(1 for r in answered if r.trunk == "secondary"),
        "failed_over": sum(1 for r in answered if len(r.attempts) > 1),
        "kill_to_next_secondary_answer_s": None if recovery is None else round(recovery, 3),
        "kill_to_breaker_open_s": at("breaker", "open"),
        "kill_to_probe_down_s": at("probe", "down"),
        "setup_ms_p50": round(statistics.median(setups), 1) if setups else None,
        "setup_ms_max": round(setups[-1], 1) if setups else None,
        "setup_ms_max_around_kill": round(
            max(((r.finished - r.started) * 1000 for r in around), default=0.0), 1
        ),
        "lost_reasons": [r.error for r in lost][:5],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of calls")
    parser.add_argument("--kill-at", type=float, default=4.0, help="kill the primary after")
    parser.add_argument("--rate", type=float, default=10.0, help="new calls per second")
    parser.add_argument("--hold", type=float, default=0.2, help="seconds each call stays up")
    parser.add_argument("--max-inflight", type=int, default=50)
    parser.add_argument("--transport", choices=["udp", "tcp"], default="udp")
    parser.add_argument("--trying-timeout", type=float, default=1.0)
    parser.add_argument("--probe-interval", type=float, default=0.5)
    parser.add_argument("--down-after", type=int, default=3)
    parser.add_argument("--t1", type=float, default=0.1, help="SIP T1 (loopback RTT is tiny)")
    args = parser.parse_args(argv)
    if not 0 < args.kill_at < args.duration:
        parser.error("--kill-at must fall inside --duration")
    figures = asyncio.run(run(args))
    for key, value in figures.items():
        print(f"{key:34} {json.dumps(value)}")
    recovery = figures["kill_to_next_secondary_answer_s"]
    ok = recovery is not None and recovery <= 3.0 and figures["lost"] == 0
    print(f"{'target (<= 3 s, 0 lost)':34} {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
