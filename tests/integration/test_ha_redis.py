"""Redis with a replica and three sentinels: ackline rides through a master killed -9.

bench.redis_failover in miniature: API and worker on a redis+sentinel:// URL, alerts
posted steadily, the master killed -9. Every alert answered 202 must be delivered; none
may be answered 500 (nor anything but 202: ingest does not need Redis); and the worker
must hear wake-ups again through the new master (the database poll is slower than the
hand-offs asserted)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from bench.ha_redis import RedisSentinelSet
from bench.redis_failover import Params, run
from bench.services import tail
from carriers.twilio_voice import CallEvents


def test_a_redis_master_killed_loses_no_alert_and_wake_ups_resume(tmp_path: Path) -> None:
    assert shutil.which("redis-server"), "redis-server is needed (scripts/install-system-deps.sh)"
    outcome = run(Params(rate=10, before=3, after=6, poll=5, settle=12, workdir=tmp_path))
    logs = "\n".join(f"--- {p.name}\n{tail(p, 30)}" for p in outcome.logs)
    described = f"{outcome.line()}\n{logs}"
    assert outcome.accepted >= 80, described
    assert outcome.answers.get(500, 0) == 0, described
    assert outcome.non_202 == 0, described
    assert outcome.lost == [], described
    assert outcome.failover_s < 10, described
    assert outcome.resubscribed_s < outcome.failover_s + 3, described
    # handed off by a wake-up, not by the 5 s poll of the database
    assert outcome.after_resubscribe > 0, described
    assert outcome.late_handoff_s < 2.0, described


async def test_a_key_pressed_during_a_failover_still_reaches_the_call(tmp_path: Path) -> None:
    """A Twilio webhook's report published while the master is down is retried until
    the replica is promoted, and the listener (resubscribed there) gets it."""
    nodes = RedisSentinelSet(tmp_path)
    await asyncio.to_thread(nodes.start)
    listener, webhook = CallEvents(nodes.url, "ha-test"), CallEvents(nodes.url, "ha-test")
    try:
        await listener.start()
        old = await asyncio.to_thread(nodes.crash_master)
        await webhook.publish("CA-during", {"kind": "gather", "digit": "1"})
        assert await asyncio.to_thread(nodes.wait_failover, old) != old
        for _ in range(100):
            if "CA-during" in listener._early:
                break
            await asyncio.sleep(0.05)
        assert [r for _, r in listener._early["CA-during"]] == [{"kind": "gather", "digit": "1"}]
    finally:
        await listener.close()
        await webhook.close()
        await asyncio.to_thread(nodes.close)
