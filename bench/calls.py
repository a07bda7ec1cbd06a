"""Call benchmark: concurrent calls with RTP against a SIPp UAS echoing media.

The hold phase keeps N calls up (each streaming 20 ms G.711 frames of one shared prompt
through the shared pacer, SIPp echoing them back, in-band DTMF detection on) and reports
memory per established call (RSS delta and, with --tracemalloc, Python allocations by
source line), pacing jitter, tick work, CPU and failures. The setup phase places short
calls (INVITE, 200, ACK, BYE) at a fixed rate for a duration and reports the rate
achieved, per-second minimum and failures. ``--background-load`` runs CPU-bound processes
beside it, and the load average before and after is part of the report.

Outgoing RTP goes out from the native sender thread when it is built (``native_sender`` in
the report: its step lateness, tick interval jitter, underruns); ``--python-pacer`` sends
from the Python pacer instead, for comparison.

    python -m bench.calls [--calls 500] [--hold 20] [--setup-rate 50] [--duration 10]
    python -m bench.calls --calls 1000 --duration 0 --background-load 1
    python -m bench.calls --calls 0 --setup-rate 200 --duration 60
    python -m bench.calls --calls 1000 --duration 0 --processes 2
    python -m bench.calls --calls 1000 --duration 0 --python-pacer
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from api.loop import run as run_service
from bench.ports import free_media_port, free_port
from gateway.call import Call, Gateway, GatewayConfig
from gateway.media import native

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
_BATCH = 50  # calls dialled at once while ramping up


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
        "900s",
    ]
    out = open(workdir / "sipp.out", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(cmd, cwd=workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    time.sleep(0.5)
    if proc.poll() is not None:
        raise SystemExit(f"sipp failed to start: {(workdir / 'sipp.out').read_text()}")
    return proc, port


def start_background_load(processes: int) -> list[subprocess.Popen[bytes]]:
    """CPU-bound processes beside the gateway: the 'second process of load' of a busy box."""
    spin = "while True: pass"
    return [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(processes)]


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _percentiles(values: list[float], digits: int = 2) -> dict[str, float]:
    if not values:
        return {}
    p50, p99 = np.percentile(values, (50, 99))
    return {
        "p50": round(float(p50), digits),
        "p99": round(float(p99), digits),
        "max": round(float(max(values)), digits),
    }


def _tracemalloc_top(
    before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, calls: int, top: int
) -> dict[str, Any]:
    """Allocation growth per call, by source line, largest first."""
    stats = after.compare_to(before, "lineno")
    total = sum(stat.size_diff for stat in stats)
    lines = [
        {
            "where": f"{stat.traceback[0].filename.split('/site-packages/')[-1]}:"
            f"{stat.traceback[0].lineno}",
            "bytes_per_call": round(stat.size_diff / max(1, calls)),
            "blocks_per_call": round(stat.count_diff / max(1, calls), 2),
        }
        for stat in stats[:top]
    ]
    return {"total_bytes_per_call": round(total / max(1, calls)), "top": lines}


async def _dial(gateway: Gateway, target: str) -> Call | None:
    try:
        call = await gateway.dial(target, ring_timeout=10)
    except Exception as exc:  # every failure is counted by the caller; say which
        log.warning("dial failed: %r", exc, exc_info=True)
        return None
    return call if call.answered else None


class _GcPauses:
    """Durations of the collector's runs, by generation: a full collection walks every
    call's objects and stalls the pacer meanwhile."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self.collected = {0: 0, 1: 0, 2: 0}  # unreachable cycles freed, by generation
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses[info["generation"]].append(time.perf_counter() - self._started)
            self.collected[info["generation"]] += info["collected"]

    def report(self) -> dict[str, Any]:
        return {
            f"gen{g}": {
                "runs": len(p),
                "max_ms": round(max(p, default=0.0) * 1000, 1),
                "collected": self.collected[g],
            }
            for g, p in self.pauses.items()
        }


async def hold_phase(
    gateway: Gateway,
    target: str,
    calls: int,
    hold: float,
    trace_top: int = 0,
    peer: psutil.Process | None = None,
) -> dict[str, Any]:
    process = psutil.Process()
    # One prompt shared by all calls, read-only, as the prompt cache hands it out.
    tone = (np.sin(np.arange(8000 * 2) * 2 * np.pi * 440 / 8000) * 8000).astype(np.int16)
    prompt = np.tile(tone, int(hold) + 2)
    prompt.flags.writeable = False
    rss_before = process.memory_info().rss
    if trace_top:
        tracemalloc.start()
    traced_before = tracemalloc.take_snapshot() if trace_top else None
    started = time.monotonic()
    # Ramp up in batches so the setup burst does not distort the held-call measurement.
    established: list[Call | None] = []
    for offset in range(0, calls, _BATCH):
        batch = [_dial(gateway, target) for _ in range(min(_BATCH, calls - offset))]
        established += await asyncio.gather(*batch)
    setup_s = time.monotonic() - started
    live = [c for c in established if c is not None]
    for call in live:
        if call.media is not None:
            call.media.play(prompt)
    await asyncio.sleep(1.0)  # first second: sockets' and jitter buffers' start-up
    gateway.pacer.reset_stats()
    native.reset_stats()
    native_on = sum(1 for c in live if c.media is not None and c.media._native is not None)
    load_before = _load()
    process.cpu_percent(None)
    if peer is not None:
        peer.cpu_percent(None)
    cpu_t0 = process.cpu_times()
    sent_before = sum(c.media.stats.packets_sent for c in live if c.media)
    gc_pauses = _GcPauses()
    gc.callbacks.append(gc_pauses)
    t0 = time.monotonic()
    try:
        await asyncio.sleep(hold)
    finally:
        gc.callbacks.remove(gc_pauses)
    elapsed = time.monotonic() - t0
    cpu = process.cpu_percent(None)
    peer_cpu = peer.cpu_percent(None) if peer is not None else None
    cpu_t1 = process.cpu_times()
    rss_during = process.memory_info().rss
    load_after = _load()
    traced = None
    if traced_before is not None:
        traced = _tracemalloc_top(traced_before, tracemalloc.take_snapshot(), len(live), trace_top)
        tracemalloc.stop()
    stats = gateway.pacer.stats
    sender = native.stats() if native_on else None
    rx_jitter = [c.media.stats.jitter for c in live if c.media]
    received = sum(c.media.stats.packets_received for c in live if c.media)
    sent = sum(c.media.stats.packets_sent for c in live if c.media)
    await asyncio.gather(*(c.hangup() for c in live), return_exceptions=True)
    return {
        "concurrent_calls": calls,
        "answered": len(live),
        "failures": calls - len(live),
        "ramp_up_s": round(setup_s, 2),
        "hold_s": round(elapsed, 1),
        "cpu_percent": round(cpu, 1),
        "cpu_user_s": round(cpu_t1.user - cpu_t0.user, 2),
        "cpu_system_s": round(cpu_t1.system - cpu_t0.system, 2),
        "sipp_cpu_percent": peer_cpu,
        "gc": gc_pauses.report(),
        "send_path": "native" if native_on else "python",
        "calls_on_native_sender": native_on,
        # The Python pacer ticks in both cases: with the native sender it only tops queues up
        # and polls reception, without it it sends every frame.
        "pacer_tick_lateness_ms": stats.lateness_ms(percentiles=(50, 99, 100)),
        "pacing_interval_jitter_ms": stats.interval_jitter_ms(percentiles=(50, 99, 100)),
        "tick_work_ms": stats.work_ms(percentiles=(50, 99, 100)),
        "ticks_skipped": stats.ticks_skipped,
        "ticks_caught_up": stats.ticks_caught_up,
        "rtp_rx_jitter_ms_across_calls": _percentiles(rx_jitter),
        **({"native_sender": _native_report(sender)} if sender is not None else {}),
        "rss_mb": round(rss_during / 2**20, 1),
        "memory_per_call_kib": round((rss_during - rss_before) / max(1, len(live)) / 1024, 1),
        "rtp_packets_sent": sent,
        # Over the hold alone: 50 a second per call when every frame went out.
        "rtp_packets_per_call_per_s_in_hold": round(
            (sent - sent_before) / max(1, len(live)) / max(elapsed, 1e-9), 2
        ),
        "rtp_packets_echoed_back": received,
        "load_avg_before": load_before,
        "load_avg_after": load_after,
        **({"tracemalloc": traced} if traced is not None else {}),
    }


def _native_report(sender: native.NativeSenderStats) -> dict[str, Any]:
    """The sender thread over the hold: how late its 2 ms send steps woke (the wire's
    pacing error), |tick interval - 20 ms|, and queues that ran dry (Python fell behind)."""
    return {
        "step_lateness_ms": {k: round(v, 3) for k, v in sender.lateness_ms.items()},
        "tick_interval_jitter_ms": {k: round(v, 3) for k, v in sender.interval_jitter_ms.items()},
        "ticks": sender.ticks,
        "ticks_caught_up": sender.ticks_caught_up,
        "ticks_skipped": sender.ticks_skipped,
        "packets_sent": sender.sent,
        "underruns": sender.underruns,
        "dropped_unsent": sender.dropped,
        "send_errors": sender.errors,
        "realtime_priority": sender.realtime,
    }


async def setup_phase(
    gateway: Gateway, target: str, rate: float, duration: float
) -> dict[str, Any]:
    """Calls started at ``rate`` per second for ``duration``: each dialled, answered and
    hung up at once. A call counts as set up when its 200 arrived (dial returned)."""
    total = int(rate * duration)
    failures = 0
    durations: list[float] = []
    answered_at: list[float] = []
    load_before = _load()
    process = psutil.Process()
    process.cpu_percent(None)

    async def one() -> None:
        nonlocal failures
        t0 = time.monotonic()
        call = await _dial(gateway, target)
        if call is None:
            failures += 1
            return
        answered_at.append(time.monotonic())
        durations.append(answered_at[-1] - t0)
        try:
            await call.hangup()
        except Exception as exc:  # a failed BYE is a failed call: counted, and said why
            log.warning("hangup failed: %r", exc, exc_info=True)
            failures += 1

    tasks: set[asyncio.Future[None]] = set()  # only those running: the heap stays the gateway's
    gc_pauses = _GcPauses()
    gc.callbacks.append(gc_pauses)
    start = time.monotonic()
    late = 0.0
    try:
        for i in range(total):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                late = max(late, -delay)
            task = asyncio.ensure_future(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    finally:
        gc.callbacks.remove(gc_pauses)
    elapsed = time.monotonic() - start
    # What a full collection walks now: what ended calls leave lingering (the last 32 s of
    # transactions, for timers D and M) plus the gateway itself; and what one costs in CPU
    # time (less at the mercy of other processes on the box than the pauses' wall time).
    tracked = len(gc.get_objects())
    cpu_before = time.process_time()
    gc.collect()
    full_collection_cpu_ms = (time.process_time() - cpu_before) * 1000
    setup_ms = np.array(durations) * 1000 if durations else np.array([0.0])
    # Setups completed in each whole second of the run (the last, partial one left out).
    per_second = np.bincount(
        np.array([int(t - start) for t in answered_at], dtype=np.int64),
        minlength=int(duration),
    )[: int(duration)]
    return {
        "setups": total,
        "target_rate_per_s": rate,
        "duration_s": duration,
        "achieved_rate_per_s": round(len(durations) / elapsed, 1),
        "min_setups_in_one_second": int(per_second.min()) if len(per_second) else 0,
        "setups_each_second": per_second.tolist(),
        "failures": failures,
        "setup_ms_p50": round(float(np.percentile(setup_ms, 50)), 2),
        "setup_ms_p99": round(float(np.percentile(setup_ms, 99)), 2),
        "setup_ms_max": round(float(setup_ms.max()), 2),
        "dialler_max_late_ms": round(late * 1000, 1),
        "gc": gc_pauses.report(),
        "gc_tracked_objects_at_end": tracked,
        "full_collection_cpu_ms_at_end": round(full_collection_cpu_ms, 1),
        "cpu_percent": round(process.cpu_percent(None), 1),
        "load_avg_before": load_before,
        "load_avg_after": _load(),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    total_setups = int(args.setup_rate * args.duration)
    loaders = start_background_load(args.background_load)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sipp, port = start_sipp(Path(tmp), args.calls + total_setups + 10)
            target = f"sip:+15550100@127.0.0.1:{port}"
            try:
                config = GatewayConfig(host="127.0.0.1", media_native_send=not args.python_pacer)
                async with Gateway(config) as gateway:
                    if args.gc_freeze:  # as `ackline serve` does once it has started
                        gc.collect()
                        gc.freeze()
                    report: dict[str, Any] = {
                        "python": sys.version.split()[0],
                        "cpus": os.cpu_count(),
                        "background_load_processes": args.background_load,
                        "gc_frozen_objects": gc.get_freeze_count(),
                    }
                    if args.calls:
                        report["hold"] = await hold_phase(
                            gateway,
                            target,
                            args.calls,
                            args.hold,
                            args.tracemalloc,
                            psutil.Process(sipp.pid),
                        )
                        await asyncio.sleep(1)
                    if total_setups:
                        report["setup"] = await setup_phase(
                            gateway, target, args.setup_rate, args.duration
                        )
            finally:
                sipp.terminate()
                sipp.wait(timeout=10)
    finally:
        for loader in loaders:
            loader.kill()
            loader.wait()
    return report


def run_processes(args: argparse.Namespace) -> dict[str, Any]:
    """Run N single-process benches at once, each with its share, and combine the reports:
    failures and calls add up, jitter and tick work are the worst process's."""
    n = args.processes
    child = [sys.executable, "-m", "bench.calls", "--hold", str(args.hold)]
    child += ["--calls", str(args.calls // n), "--duration", str(args.duration)]
    child += ["--setup-rate", str(args.setup_rate / n)]
    child += ["--gc-freeze"] if args.gc_freeze else []
    child += ["--python-pacer"] if args.python_pacer else []
    loaders = start_background_load(args.background_load)
    try:
        procs = [subprocess.Popen(child, stdout=subprocess.PIPE) for _ in range(n)]
        outputs = [proc.communicate()[0] for proc in procs]
    finally:
        for loader in loaders:
            loader.kill()
            loader.wait()
    reports = [json.loads(out) for out in outputs]
    combined: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "processes": n,
        "background_load_processes": args.background_load,
        "per_process": reports,
    }
    holds = [r["hold"] for r in reports if "hold" in r]
    if holds:
        combined["hold"] = {
            "concurrent_calls": sum(h["concurrent_calls"] for h in holds),
            "answered": sum(h["answered"] for h in holds),
            "failures": sum(h["failures"] for h in holds),
            "cpu_percent": round(sum(h["cpu_percent"] for h in holds), 1),
            "worst_pacing_interval_jitter_ms": {
                key: max(h["pacing_interval_jitter_ms"][key] for h in holds)
                for key in ("p50", "p99", "p100")
            },
            "memory_per_call_kib": max(h["memory_per_call_kib"] for h in holds),
            **(
                {
                    "worst_native_step_lateness_ms": {
                        key: max(h["native_sender"]["step_lateness_ms"][key] for h in holds)
                        for key in ("p50", "p99", "max")
                    }
                }
                if all("native_sender" in h for h in holds)
                else {}
            ),
        }
    setups = [r["setup"] for r in reports if "setup" in r]
    if setups:
        combined["setup"] = {
            "setups": sum(x["setups"] for x in setups),
            "achieved_rate_per_s": round(sum(x["achieved_rate_per_s"] for x in setups), 1),
            "failures": sum(x["failures"] for x in setups),
        }
    return combined


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=500, help="concurrent calls to hold (0: none)")
    parser.add_argument("--hold", type=float, default=20.0, help="seconds to hold them")
    parser.add_argument("--setup-rate", type=float, default=50.0, help="call setups per second")
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds of the setup phase (0: none)"
    )
    parser.add_argument(
        "--background-load",
        type=int,
        default=0,
        metavar="N",
        help="CPU-bound processes to run beside the gateway during the whole run",
    )
    parser.add_argument(
        "--tracemalloc",
        type=int,
        default=0,
        metavar="N",
        help="trace allocations while holding; report the N source lines that grew most",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="split the calls and the setup rate over N gateway processes, each with its own\n"
        "SIPp, run at once (the media on both cores, as N workers would run it)",
    )
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() once the gateway has started, as `ackline serve` does: full\n"
        "collections then skip the start-up heap (modules, prompts)",
    )
    parser.add_argument(
        "--python-pacer",
        action="store_true",
        help="send every frame from the Python pacer, not the native sender thread\n"
        "(GatewayConfig.media_native_send=False): the comparison",
    )
    args = parser.parse_args()
    # One process runs on the loop `ackline serve` runs on.
    report = run_processes(args) if args.processes > 1 else run_service(main_async(args))
    print(json.dumps(report, indent=2))
    failed = sum(report.get(phase, {}).get("failures", 0) for phase in ("hold", "setup"))
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
