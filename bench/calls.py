"""Call benchmark: concurrent calls with RTP against a SIPp UAS echoing media.

Phase 1 holds N concurrent calls (each streaming 20 ms G.711 frames through the shared
pacer, SIPp echoing them back) and reports CPU %, pacing jitter, memory per call and
failures. Phase 2 places short calls at a fixed setup rate and reports failures.

    python -m bench.calls [--calls 500] [--hold 20] [--rate 50] [--setups 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from api.loop import run as run_service
from bench.ports import free_media_port, free_port
from gateway.call import Call, Gateway, GatewayConfig

HERE = Path(__file__).parent


def start_sipp(workdir: Path, max_calls: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = [
        "sipp",
        "-sf",
        str(HERE / "uas_echo.xml"),
        "-i",
        "127.0.0.1",
        "-p",
        str(port),
        "-mi",
        "127.0.0.1",
        "-mp",
        str(free_media_port(avoid=port)),
        "-rtp_echo",
        "-t",
        "u1",
        "-nostdin",
        "-m",
        str(max_calls),
        "-max_socket",
        "4096",
        "-timeout",
        "600s",
    ]
    out = open(workdir / "sipp.out", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(cmd, cwd=workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    time.sleep(0.5)
    if proc.poll() is not None:
        raise SystemExit(f"sipp failed to start: {(workdir / 'sipp.out').read_text()}")
    return proc, port


async def hold_phase(gateway: Gateway, target: str, calls: int, hold: float) -> dict[str, Any]:
    process = psutil.Process()
    rss_before = process.memory_info().rss
    tone = (np.sin(np.arange(8000 * 2) * 2 * np.pi * 440 / 8000) * 8000).astype(np.int16)
    started = time.monotonic()

    async def one() -> Call | None:
        try:
            call = await gateway.dial(target, ring_timeout=10)
        except Exception:
            return None
        return call if call.answered else None

    # Ramp up in batches so the setup burst does not distort the held-call measurement.
    established: list[Call | None] = []
    for offset in range(0, calls, 50):
        batch = [one() for _ in range(min(50, calls - offset))]
        established += await asyncio.gather(*batch)
    setup_s = time.monotonic() - started
    live = [c for c in established if c is not None]
    for call in live:
        if call.media is not None:
            call.media.play(np.tile(tone, int(hold) + 1))
    gateway.pacer.reset_stats()
    process.cpu_percent(None)
    await asyncio.sleep(hold)
    cpu = process.cpu_percent(None)
    rss_during = process.memory_info().rss
    jitter = gateway.pacer.interval_jitter_ms(percentiles=(50, 99))
    tick_work = gateway.pacer.stats.work_ms(percentiles=(50, 99))
    received = sum(c.media.stats.packets_received for c in live if c.media)
    sent = sum(c.media.stats.packets_sent for c in live if c.media)
    await asyncio.gather(*(c.hangup() for c in live), return_exceptions=True)
    return {
        "concurrent_calls": calls,
        "answered": len(live),
        "failures": calls - len(live),
        "ramp_up_s": round(setup_s, 2),
        "cpu_percent": round(cpu, 1),
        "pacing_interval_jitter_ms": jitter,
        "tick_work_ms": tick_work,
        "rss_mb": round(rss_during / 2**20, 1),
        "memory_per_call_kb": round((rss_during - rss_before) / max(1, len(live)) / 1024, 1),
        "rtp_packets_sent": sent,
        "rtp_packets_echoed_back": received,
    }


async def setup_phase(gateway: Gateway, target: str, total: int, rate: float) -> dict[str, Any]:
    failures = 0
    durations: list[float] = []

    async def one() -> None:
        nonlocal failures
        t0 = time.monotonic()
        try:
            call = await gateway.dial(target, ring_timeout=10)
            if not call.answered:
                failures += 1
                return
            durations.append(time.monotonic() - t0)
            await call.hangup()
        except Exception:
            failures += 1

    tasks = []
    start = time.monotonic()
    for i in range(total):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one()))
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - start
    setup_ms = np.array(durations) * 1000 if durations else np.array([0.0])
    return {
        "setups": total,
        "target_rate_per_s": rate,
        "achieved_rate_per_s": round(total / elapsed, 1),
        "failures": failures,
        "setup_ms_p50": round(float(np.percentile(setup_ms, 50)), 2),
        "setup_ms_p99": round(float(np.percentile(setup_ms, 99)), 2),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    with tempfile.TemporaryDirectory() as tmp:
        sipp, port = start_sipp(Path(tmp), args.calls + args.setups + 10)
        target = f"sip:+15550100@127.0.0.1:{port}"
        try:
            async with Gateway(GatewayConfig(host="127.0.0.1")) as gateway:
                report: dict[str, Any] = {"python": sys.version.split()[0]}
                report["hold"] = await hold_phase(gateway, target, args.calls, args.hold)
                await asyncio.sleep(1)
                report["setup"] = await setup_phase(gateway, target, args.setups, args.rate)
        finally:
            sipp.terminate()
            sipp.wait(timeout=10)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=500, help="concurrent calls to hold")
    parser.add_argument("--hold", type=float, default=20.0, help="seconds to hold them")
    parser.add_argument("--rate", type=float, default=50.0, help="call setups per second")
    parser.add_argument("--setups", type=int, default=500, help="calls in the setup phase")
    args = parser.parse_args()
    report = run_service(main_async(args))  # the loop `ackline serve` runs on
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
