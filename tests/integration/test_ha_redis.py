"""Redis with a replica and three sentinels: ackline rides through a master killed -9.

bench.redis_failover in miniature: API and worker on a redis+sentinel:// URL, alerts
posted steadily, the master killed -9. Every alert answered 202 must be delivered; none
may be answered 500 (nor anything but 202: ingest does not need Redis); and the worker
must hear wake-ups again through the new master (the database poll is slower than the
hand-offs asserted)."""

from __future__ import annotations

import shutil
from pathlib import Path

from bench.redis_failover import Params, run
from bench.services import tail


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
