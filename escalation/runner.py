"""Workers: claim due jobs from the database, hand notifications to channels, record results.

The database stays the source of truth (jobs, leases, alert state); a bus only makes
workers react fast. `InProcessBus` serves the embedded single-process default (SQLite);
`RedisBus` carries timers (a sorted set of due times), wake-ups and cancels between API
and worker processes. If Redis loses data, workers still find every job by polling the
database, only later. A worker that dies leaves its leases to expire; another worker
then claims those jobs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

import redis.asyncio as aioredis

from escalation import metrics
from escalation.channels.base import Channel, DeliveryResult, DeliveryStatus
from escalation.engine import CancelRequest, Engine, SendTask

log = logging.getLogger(__name__)

CancelHandler = Callable[[CancelRequest], Awaitable[None]]


class WorkerBus(Protocol):
    """The worker's side of a bus."""

    def on_cancel(self, handler: CancelHandler) -> None: ...

    async def wait(self, timeout: float) -> None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class InProcessBus:
    """API and worker in one process: a wake-up event, a heap of due times, direct cancels."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._due: list[float] = []
        self._handlers: list[CancelHandler] = []

    async def jobs_added(self, jobs: Sequence[tuple[int, datetime]]) -> None:
        now = time.time()
        for _, due in jobs:
            if due.timestamp() > now:  # due now: the wake-up below is enough
                heapq.heappush(self._due, due.timestamp())
        self._event.set()

    async def alert_closed(self, request: CancelRequest) -> None:
        for handler in self._handlers:
            await handler(request)

    def on_cancel(self, handler: CancelHandler) -> None:
        self._handlers.append(handler)

    async def wait(self, timeout: float) -> None:
        # A timer that came due since the last pass means: run another pass now.
        now = time.time()
        came_due = False
        while self._due and self._due[0] <= now:
            heapq.heappop(self._due)
            came_due = True
        if came_due or self._event.is_set():
            self._event.clear()
            return
        delay = min(timeout, self._due[0] - now) if self._due else timeout
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), max(0.0, delay))
        self._event.clear()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class RedisBus:
    """Timers, wake-ups and cancels over Redis, shared by API and worker processes."""

    def __init__(self, url: str, prefix: str = "ackline") -> None:
        self.redis: aioredis.Redis = aioredis.from_url(url)
        self.due_key = f"{prefix}:due"
        self.wake_channel = f"{prefix}:wake"
        self.cancel_channel = f"{prefix}:cancel"
        self._event = asyncio.Event()
        self._handlers: list[CancelHandler] = []
        self._reader: asyncio.Task[None] | None = None
        self._pubsub: Any = None
        # Wake-ups are sent in batches: what is added while one batch is on its way goes
        # in the next, one round trip and one wake-up message for all of it.
        self._later: dict[str, float] = {}
        self._batch: asyncio.Future[None] | None = None
        self._sender: asyncio.Task[None] | None = None

    async def jobs_added(self, jobs: Sequence[tuple[int, datetime]]) -> None:
        """Publish a wake-up; only timers still in the future go into the sorted set (one
        already due would only make the woken worker run a second, empty pass). Returns
        once the batch this joined is sent (its error, if any, is raised here)."""
        now = time.time()
        self._later.update(
            {str(job_id): due.timestamp() for job_id, due in jobs if due.timestamp() > now}
        )
        if self._batch is None:
            self._batch = asyncio.get_running_loop().create_future()
        batch = self._batch
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_wake_ups(), name="redis-bus-wake")
        await asyncio.shield(batch)

    async def _send_wake_ups(self) -> None:
        while self._batch is not None:
            batch, later = self._batch, self._later
            self._batch, self._later = None, {}
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    if later:
                        pipe.zadd(self.due_key, later)
                    pipe.publish(self.wake_channel, b"1")
                    await pipe.execute()
            except Exception as exc:  # the callers see it; polling finds the jobs anyway
                batch.set_exception(exc)
                batch.exception()  # retrieved: no warning if every caller has gone
            else:
                batch.set_result(None)

    async def alert_closed(self, request: CancelRequest) -> None:
        payload = {
            "alert_id": request.alert_id,
            "notifications": [list(n) for n in request.notifications],
            "committed_at": request.committed_at,
        }
        await self.redis.publish(self.cancel_channel, json.dumps(payload))

    def on_cancel(self, handler: CancelHandler) -> None:
        self._handlers.append(handler)

    async def start(self) -> None:
        self._pubsub = self.redis.pubsub()
        await self._pubsub.subscribe(self.wake_channel, self.cancel_channel)
        self._reader = asyncio.create_task(self._read(), name="redis-bus-reader")

    async def _read(self) -> None:
        cancel = self.cancel_channel.encode()
        while True:
            try:
                msg = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception:  # connection blip: polling the database covers the gap
                log.exception("redis bus: reading failed; retrying")
                await asyncio.sleep(0.5)
                continue
            if msg is None:
                continue
            if msg["channel"] == cancel:
                data = json.loads(msg["data"])
                request = CancelRequest(
                    data["alert_id"],
                    tuple((n, c) for n, c in data["notifications"]),
                    float(data["committed_at"]),
                )
                for handler in self._handlers:
                    await handler(request)
            else:
                self._event.set()

    async def wait(self, timeout: float) -> None:
        if self._event.is_set():
            self._event.clear()
            return
        now = time.time()
        # A timer that came due since the last pass means: run another pass now. Both
        # questions go in one round trip (this runs after every claim pass).
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(self.due_key, "-inf", now)
            pipe.zrange(self.due_key, 0, 0, withscores=True)
            came_due, head = await pipe.execute()
        if came_due:
            return
        delay = min(timeout, float(head[0][1]) - now) if head else timeout
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), max(0.0, delay))
        self._event.clear()

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def close(self) -> None:
        if self._sender is not None:
            with contextlib.suppress(Exception):
                await self._sender
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._pubsub is not None:
            await self._pubsub.aclose()
        await self.redis.aclose()


class Worker:
    """Claims due jobs and runs each notification attempt as its own task."""

    def __init__(
        self,
        engine: Engine,
        bus: WorkerBus,
        channels: Mapping[str, Channel],
        *,
        worker_id: str | None = None,
        batch: int = 100,
        max_inflight: int = 1000,
        poll_interval: float = 1.0,
        record_linger: float = 0.01,
        purge_interval: float = 60.0,
        purge_batch: int = 1000,
    ) -> None:
        self.engine = engine
        self.bus = bus
        self.channels = channels
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.batch = batch
        self.max_inflight = max_inflight
        self.poll_interval = poll_interval
        self.purge_interval = purge_interval  # <= 0: this worker deletes no done jobs
        self.purge_batch = purge_batch
        self._inflight: dict[str, tuple[str, SendTask, asyncio.Task[None]]] = {}
        self._closed: dict[str, float] = {}  # alert id -> when its close was announced
        self._cancels: set[asyncio.Task[None]] = set()
        # Results waiting to be recorded, and the task recording them (group commit)
        self.record_linger = record_linger
        self._results: list[tuple[SendTask, DeliveryResult, asyncio.Future[None]]] = []
        self._recorder: asyncio.Task[None] | None = None
        bus.on_cancel(self.cancel)

    async def run(self, stop: asyncio.Event, *, grace: float = 10.0) -> None:
        """Work until `stop` is set, then let in-flight notifications finish for `grace` s.
        The bus is started here; closing it is left to its owner, who may still publish."""
        await self.bus.start()
        renewer = asyncio.create_task(self._renew_leases(), name="lease-renewer")
        purger = asyncio.create_task(self._purge_done_jobs(), name="done-job-purger")
        try:
            while not stop.is_set():
                try:
                    claimed = await self.run_once()
                except Exception:  # database blip: back off, the jobs stay in the database
                    log.exception("worker %s: claim failed", self.worker_id)
                    claimed = 0
                    await asyncio.sleep(self.poll_interval)
                if claimed >= self.batch or stop.is_set():
                    continue
                waiter = asyncio.create_task(self.bus.wait(self.poll_interval))
                stopper = asyncio.create_task(stop.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                for t in (waiter, stopper):
                    t.cancel()
        finally:
            pending = [t for _, _, t in self._inflight.values()]
            if pending:
                await asyncio.wait(pending, timeout=grace)
            for t in (renewer, purger):
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t

    async def run_once(self) -> int:
        """One claim pass; returns how many notifications were handed to channels."""
        free = self.max_inflight - len(self._inflight)
        if free <= 0:
            return 0
        tasks = await self.engine.claim(self.worker_id, min(self.batch, free))
        for task in tasks:
            nid = task.notification.notification_id
            runner = asyncio.create_task(self._deliver(task), name=f"deliver-{nid}")
            self._inflight[nid] = (task.notification.alert_id, task, runner)
        return len(tasks)

    async def idle(self) -> None:
        """Wait until every notification in flight has been recorded (tests, shutdown)."""
        while self._inflight:
            await asyncio.wait([t for _, _, t in self._inflight.values()])

    async def _deliver(self, task: SendTask) -> None:
        n = task.notification
        try:
            channel = self.channels.get(n.channel)
            if n.alert_id in self._closed:
                result = DeliveryResult(DeliveryStatus.CANCELLED, "closed_before_send")
            elif channel is None:
                result = DeliveryResult(DeliveryStatus.FAILED_PERMANENT, "channel_unavailable")
            else:
                lag = time.time() - task.due_at.timestamp()
                metrics.DISPATCH_LAG.observe(max(0.0, lag))
                try:
                    result = await channel.send(n)
                except Exception as exc:  # the contract says never raise; be safe anyway
                    log.exception("channel %s raised", n.channel)
                    reason = f"channel_error:{type(exc).__name__}"
                    result = DeliveryResult(DeliveryStatus.FAILED_RETRYABLE, reason)
            await self._record(task, result)
        finally:
            self._inflight.pop(n.notification_id, None)

    async def _record(self, task: SendTask, result: DeliveryResult) -> None:
        """Hand the result to the recorder and wait until it is committed.

        Results that finish together (a claim's worth of quick sends) are recorded in one
        transaction instead of one each; a batch that fails is retried result by result."""
        done = asyncio.get_running_loop().create_future()
        self._results.append((task, result, done))
        if self._recorder is None or self._recorder.done():
            self._recorder = asyncio.create_task(self._record_pending(), name="recorder")
        await done

    async def _record_pending(self) -> None:
        while self._results:
            if self.record_linger > 0:
                await asyncio.sleep(self.record_linger)
            batch = self._results[: self.batch]
            del self._results[: len(batch)]
            try:
                await self.engine.complete_many([(t, r) for t, r, _ in batch], self.worker_id)
            except Exception:
                log.exception("recording a batch of %d results failed; one by one", len(batch))
                await asyncio.gather(*(self._record_one(t, r) for t, r, _ in batch))
            for _, _, done in batch:
                if not done.done():
                    done.set_result(None)

    async def _record_one(self, task: SendTask, result: DeliveryResult) -> None:
        for attempt in range(6):
            try:
                await self.engine.complete(task, result, self.worker_id)
                return
            except Exception:
                log.exception("recording result of %s failed", task.notification.notification_id)
                await asyncio.sleep(0.2 * 2**attempt)
        # The lease will expire and another worker will retry this attempt.

    async def cancel(self, request: CancelRequest) -> None:
        """An alert was acked/resolved: hang up what this worker has in flight for it."""
        now = time.monotonic()
        self._closed[request.alert_id] = now
        if len(self._closed) > 10_000:
            self._closed = {a: t for a, t in self._closed.items() if now - t < 600}
        for nid, (alert_id, task, _) in list(self._inflight.items()):
            if alert_id == request.alert_id:
                channel = self.channels.get(task.notification.channel)
                if channel is not None:
                    t = asyncio.create_task(self._cancel_one(channel, nid, request.committed_at))
                    self._cancels.add(t)
                    t.add_done_callback(self._cancels.discard)

    @staticmethod
    async def _cancel_one(channel: Channel, nid: str, committed_at: float) -> None:
        metrics.CANCEL_LATENCY.observe(max(0.0, time.time() - committed_at))
        try:
            await channel.cancel(nid)
        except Exception:
            log.exception("cancel of %s failed", nid)

    async def _purge_done_jobs(self) -> None:
        """Every `purge_interval` s delete old done jobs, at most a few batches at a time,
        so the jobs table stays the size of the retention window."""
        if self.purge_interval <= 0:
            return
        while True:
            await asyncio.sleep(self.purge_interval)
            try:
                for _ in range(10):
                    if await self.engine.purge_done_jobs(self.purge_batch) < self.purge_batch:
                        break
            except Exception:
                log.exception("deleting done jobs failed")

    async def _renew_leases(self) -> None:
        period = max(0.5, self.engine.config.lease_seconds / 3)
        while True:
            await asyncio.sleep(period)
            ids = [
                m.job_id for _, task, _ in self._inflight.values() for m in (task, *task.bundled)
            ]
            try:
                await self.engine.renew(self.worker_id, ids)
            except Exception:
                log.exception("lease renewal failed")
