"""What sending costs the event loop: N sessions play a prompt to one sink socket, and the
CPU time of the loop's own thread per pacer tick is measured, with the native sender and
with the Python pacer sending. No signalling, no echo, no in-band scan: only the send path.

The loop thread's CPU time (``time.thread_time``), not the process's, so the native sender
thread's system calls (on the other core) are not counted, and not wall time, so a loaded
box (other jobs) changes the figures little.

    python -m bench.send_cost [--sessions 1000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import time
from typing import Any

import numpy as np

from gateway.media import native
from gateway.media.pacer import Pacer
from gateway.media.sdp import NegotiatedMedia
from gateway.media.session import MediaSession

HOST = "127.0.0.1"


async def measure(sessions: int, seconds: float, native_send: bool) -> dict[str, Any]:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind((HOST, 0))
    media = NegotiatedMedia(
        remote_host=HOST,
        remote_port=sink.getsockname()[1],
        payload_type=0,
        codec="PCMU",
        clock_rate=8000,
        telephone_event_pt=101,
        ptime=20,
        direction="sendrecv",
    )
    pacer = Pacer(20)
    calls = [
        MediaSession(
            local_host=HOST,
            pacer=pacer,
            native_send=native_send,
            inband_dtmf=False,
            port_range=(40000, 60000),
        )
        for _ in range(sessions)
    ]
    tone = (np.sin(np.arange(16000) * 2 * np.pi * 440 / 8000) * 8000).astype(np.int16)
    prompt = np.tile(tone, int(seconds) + 4)
    prompt.flags.writeable = False
    try:
        for call in calls:
            await call.open()
            call.configure(media)
            call.play(prompt)
        await asyncio.sleep(1.0)
        pacer.reset_stats()
        native.reset_stats()
        cpu = time.thread_time()
        await asyncio.sleep(seconds)
        cpu = time.thread_time() - cpu
        ticks = max(1, pacer.stats.ticks)
        report = {
            "send_path": "native" if native_send else "python",
            "sessions": sessions,
            "ticks": pacer.stats.ticks,
            "loop_thread_cpu_ms_per_tick": round(cpu * 1000 / ticks, 2),
            "loop_thread_cpu_us_per_session_tick": round(cpu * 1e6 / ticks / sessions, 2),
            "pacer_tick_lateness_ms": {
                k: round(v, 2) for k, v in pacer.stats.lateness_ms((50, 99)).items()
            },
        }
        if native_send:
            sender = native.stats()
            report["native_step_lateness_ms"] = {
                k: round(v, 3) for k, v in sender.lateness_ms.items()
            }
            report["native_underruns"] = sender.underruns
        return report
    finally:
        for call in calls:
            await call.close()
        await pacer.stop()
        sink.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    paths = [True, False] if native.available() else [False]
    reports = [asyncio.run(measure(args.sessions, args.seconds, path)) for path in paths]
    print(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
