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
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, Protocol, assert_never

import redis.asyncio as aioredis

from escalation import metrics
from escalation.channels.base import Channel, DeliveryResult, DeliveryStatus, Progress
from escalation.core import CancelScope
from escalation.effects import CancelRequest
from escalation.engine import Engine
from escalation.reminders import ShiftReminders
from escalation.sends import SendTask
from gateway.aio import cancel_and_wait
from storage import redis_client
from storage.outage import FailureLog

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


REDIS_CONNECT_TIMEOUT = 2.0
REDIS_TIMEOUT = 5.0
# An ingest waits this long for its wake-up to be published; a slower Redis only delays
# the workers until their next poll of the database, never the answer to the client.
WAKE_WAIT = 0.5


class RedisBus:
    """Timers, wake-ups and cancels over Redis, shared by API and worker processes."""

    def __init__(self, url: str, prefix: str = "ackline") -> None:
        # A Redis that stops answering (paused, partitioned) fails operations within
        # seconds instead of never: it is a bus, the database has the work.
        self.redis: aioredis.Redis = redis_client.async_client(
            url, socket_connect_timeout=REDIS_CONNECT_TIMEOUT, socket_timeout=REDIS_TIMEOUT
        )
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
        self._wait_failures = FailureLog(log, "asking Redis for due timers")

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
                # one timer per batch, not one per waiting ingest (a timer each cost an
                # ingest a tenth more CPU at 200 alerts/s)
                async with asyncio.timeout(WAKE_WAIT):
                    async with self.redis.pipeline(transaction=False) as pipe:
                        if later:
                            pipe.zadd(self.due_key, later)
                        pipe.publish(self.wake_channel, b"1")
                        await pipe.execute()
            except Exception as exc:  # noqa: BLE001 (set on the batch: its callers raise it)
                # the callers see it; polling finds the jobs anyway
                batch.set_exception(exc)
                batch.exception()  # retrieved: no warning if every caller has gone
            else:
                batch.set_result(None)

    async def alert_closed(self, request: CancelRequest) -> None:
        payload = {
            "alert_id": request.alert_id,
            "notifications": [list(n) for n in request.notifications],
            "committed_at": request.committed_at,
            "scope": request.scope.value,
        }
        await self.redis.publish(self.cancel_channel, json.dumps(payload))

    def on_cancel(self, handler: CancelHandler) -> None:
        self._handlers.append(handler)

    async def start(self) -> None:
        """Subscribe in the background: a worker starts (and works, polling the database)
        while Redis is away, and picks its messages up once Redis is back."""
        self._reader = asyncio.create_task(self._read(), name="redis-bus-reader")

    async def _read(self) -> None:
        cancel = self.cancel_channel.encode()
        failures = FailureLog(log, "reading the Redis bus")
        pause = 0.1
        down_since: float | None = None
        while True:
            try:
                if self._pubsub is None:
                    # A new connection: through Sentinel, to whichever node is master now
                    self._pubsub = self.redis.pubsub()
                    await self._pubsub.subscribe(self.wake_channel, self.cancel_channel)
                    if down_since is not None:
                        log.info("listening on the Redis bus again after %.1f s",
                                 time.monotonic() - down_since)  # fmt: skip
                        down_since = None
                msg = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 (FailureLog logs it)
                # Redis away: polling the database covers the gap
                failures.failed(exc)
                down_since = time.monotonic() if down_since is None else down_since
                await self._drop_pubsub()
                # what was published meanwhile is lost: look at the database now
                self._event.set()
                await asyncio.sleep(pause)
                # at most a second between tries: a failover is over in a few seconds
                pause = min(pause * 2, 1.0)
                continue
            pause = 0.1
            if msg is None:
                continue
            if msg["channel"] == cancel:
                data = json.loads(msg["data"])
                request = CancelRequest(
                    data["alert_id"],
                    tuple((n, c) for n, c in data["notifications"]),
                    float(data["committed_at"]),
                    # a message from a release before reassigns closed the alert
                    CancelScope(data.get("scope", CancelScope.ALERT.value)),
                )
                for handler in self._handlers:
                    await handler(request)
            else:
                self._event.set()

    async def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pubsub.aclose(), 1.0)

    async def wait(self, timeout: float) -> None:
        if self._event.is_set():
            self._event.clear()
            return
        now = time.time()
        delay = timeout
        # A timer that came due since the last pass means: run another pass now. Both
        # questions go in one round trip (this runs after every claim pass).
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zremrangebyscore(self.due_key, "-inf", now)
                pipe.zrange(self.due_key, 0, 0, withscores=True)
                came_due, head = await pipe.execute()
        except Exception as exc:  # noqa: BLE001 (FailureLog logs it)
            # Redis away: plain polling
            self._wait_failures.failed(exc)
        else:
            if came_due:
                return
            if head:
                delay = min(timeout, float(head[0][1]) - now)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), max(0.0, delay))
        self._event.clear()

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def close(self) -> None:
        """Bounded even when Redis is away: a wake-up batch still on its way gets a
        second, then the connections are dropped."""
        if self._sender is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._sender, 1.0)
        if self._reader is not None:
            await cancel_and_wait(self._reader)
        await self._drop_pubsub()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.redis.aclose(), 1.0)


_DEADLINE_EXCEEDED = DeliveryResult(DeliveryStatus.FAILED_RETRYABLE, "deadline_exceeded")
# How long before the end of a drain the sends still running are handed back: enough to
# hang them up and release their leases in one round trip.
HANDBACK_RESERVE = 3.0
# A delivery handed back or given up on has this long to hang up before it is abandoned.
HANGUP_WAIT = 2.0
# The longest a channel's cancel (hang-up) is waited for after an ack: a BYE to a far end
# that has gone away takes its transaction timeout (32 s) to fail; the call itself ends
# by its own bounds, this only stops waiting.
HANGUP_LIMIT = 15.0


@dataclass(eq=False)
class _Flight:
    """One claimed notification attempt in this worker, from hand-off to recorded result."""

    task: SendTask
    deadline: float  # loop time past which the send is given up on (Channel.deadline)
    runner: asyncio.Task[None] | None = None
    recording: bool = False  # the channel has answered; the result is being committed
    stopping: bool = False  # hung up: the alert closed, or the send was given up or handed on
    handed_on: bool = False  # another worker takes it over: record nothing
    given_up: bool = False  # past its deadline: recorded as deadline_exceeded
    cut_off: bool = False  # the send would not end after the hang-up: its task was cancelled

    @property
    def job_ids(self) -> list[int]:
        return [m.job_id for m in (self.task, *self.task.bundled)]


class Worker:
    """Claims due jobs and runs each notification attempt as its own task.

    Nothing it holds is open-ended: every send is bounded by its channel's deadline, a
    lease is renewed only while its send is within that bound (or its result is being
    recorded), a result is retried until it is committed, and a stop hands the sends still
    running back to the other workers within `drain_timeout`.
    """

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
        check_interval: float = 2.0,
        drain_timeout: float = 10.0,
        reminder_interval: float = 30.0,
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
        # How often the worker checks its sends against the database: the alerts closed
        # without their cancel reaching it (Redis down), the jobs another worker took over.
        self.check_interval = check_interval
        self.drain_timeout = drain_timeout
        # How often this worker looks for shift reminders due (<= 0: never); each pass is
        # its own task, so a slow channel delays reminders, never a page.
        self.reminder_interval = reminder_interval
        self.reminders = ShiftReminders(
            engine.db, engine.audit, channels, worker_id=self.worker_id, clock=engine.clock
        )
        self._inflight: dict[str, _Flight] = {}
        self._closed: dict[str, float] = {}  # alert id -> when its close was announced
        # notification id -> when a reassign withdrew it (its cancel may come before
        # the send it stops has started here)
        self._withdrawn: dict[str, float] = {}
        self._background: set[asyncio.Future[Any]] = set()
        # Results waiting to be recorded, and the task recording them (group commit)
        self.record_linger = record_linger
        self._results: list[tuple[SendTask, DeliveryResult, asyncio.Future[None]]] = []
        self._recorder: asyncio.Task[None] | None = None
        self._give_up_recording_at: float | None = None  # set while draining
        self._claim_failures = FailureLog(log, "claiming due jobs")
        self._record_failures = FailureLog(log, "recording a delivery result")
        self._check_failures = FailureLog(log, "checking and renewing the sends in flight")
        self._purge_failures = FailureLog(log, "deleting done jobs")
        self._answer_failures = FailureLog(log, "recording an answered call")
        self._reminder_failures = FailureLog(log, "sending shift reminders")
        bus.on_cancel(self.cancel)

    async def run(self, stop: asyncio.Event, *, grace: float | None = None) -> None:
        """Work until `stop` is set, then drain for `grace` seconds (default
        `drain_timeout`): no new claims, sends in flight may finish, those still running
        near the end are hung up and handed back (see `_drain`). The bus is started here;
        closing it is left to its owner, who may still publish."""
        await self.bus.start()
        checker = asyncio.create_task(self._check_inflight(), name="inflight-checker")
        purger = asyncio.create_task(self._purge_done_jobs(), name="done-job-purger")
        reminder = asyncio.create_task(self._remind_shifts(), name="shift-reminders")
        try:
            while not stop.is_set():
                try:
                    claimed = await self.run_once()
                except Exception as exc:  # noqa: BLE001 (FailureLog logs it)
                    # database away: the jobs stay in the database
                    self._claim_failures.failed(exc)
                    claimed = 0
                    await _wait_event(stop, self.poll_interval)
                if claimed >= self.batch or stop.is_set():
                    continue
                waiter = asyncio.create_task(self.bus.wait(self.poll_interval))
                stopper = asyncio.create_task(stop.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                for t in (waiter, stopper):
                    t.cancel()
                await asyncio.gather(waiter, stopper, return_exceptions=True)
        finally:
            try:
                await self._drain(self.drain_timeout if grace is None else grace)
            finally:
                for t in (checker, purger, reminder):
                    await cancel_and_wait(t)

    async def run_once(self) -> int:
        """One claim pass; returns how many notifications were handed to channels."""
        free = self.max_inflight - len(self._inflight)
        if free <= 0:
            return 0
        tasks = await self.engine.claim(self.worker_id, min(self.batch, free))
        now = asyncio.get_running_loop().time()
        for task in tasks:
            n = task.notification
            channel = self.channels.get(n.channel)
            bound = channel.deadline(n) if channel is not None else 0.0
            flight = _Flight(task, now + bound)
            flight.runner = asyncio.create_task(
                self._deliver(flight), name=f"deliver-{n.notification_id}"
            )
            self._inflight[n.notification_id] = flight
        return len(tasks)

    async def idle(self) -> None:
        """Wait until every notification in flight has been recorded (tests, shutdown)."""
        while self._inflight:
            await asyncio.wait([f.runner for f in self._inflight.values() if f.runner])

    async def _deliver(self, flight: _Flight) -> None:
        n = flight.task.notification
        try:
            result = await self._send(flight)
            if flight.handed_on:
                return  # another worker sends it (or already does): nothing to record
            flight.recording = True
            await self._record(flight.task, result)
        finally:
            self._inflight.pop(n.notification_id, None)

    async def _send(self, flight: _Flight) -> DeliveryResult:
        """The channel's verdict, or the worker's own when the send ran out of time."""
        task = flight.task
        n = task.notification
        channel = self.channels.get(n.channel)
        if task.interrupted:
            # A previous owner was lost while the person was on the phone: placing the
            # attempt again would ring them a second time for it.
            return DeliveryResult(DeliveryStatus.NOT_ACKNOWLEDGED, "call_interrupted")
        if n.alert_id in self._closed:
            return DeliveryResult(DeliveryStatus.CANCELLED, "closed_before_send")
        if n.notification_id in self._withdrawn:
            return DeliveryResult(DeliveryStatus.CANCELLED, "reassigned_before_send")
        if channel is None:
            return DeliveryResult(DeliveryStatus.FAILED_PERMANENT, "channel_unavailable")
        metrics.DISPATCH_LAG.observe(max(0.0, time.time() - task.due_at.timestamp()))
        try:
            result = await channel.send(n, partial(self._progress, flight))
        except asyncio.CancelledError:
            if not flight.cut_off:
                raise  # the worker stopping
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()  # `_give_up` ended a send that would not end
            return _DEADLINE_EXCEEDED
        except Exception as exc:  # the contract says never raise; be safe anyway
            log.exception("channel %s raised", n.channel)
            return DeliveryResult(
                DeliveryStatus.FAILED_RETRYABLE, f"channel_error:{type(exc).__name__}"
            )
        return _DEADLINE_EXCEEDED if flight.given_up else result

    async def _give_up(self, flight: _Flight) -> None:
        """A send past its deadline (see `_check_inflight`): hang up, give the send
        `HANGUP_WAIT` to end by itself, then cut it off; either way its result is
        `deadline_exceeded` (what the channel says after a forced hang-up is not news)."""
        n = flight.task.notification
        log.warning("worker %s: %s on %s still running after its deadline; hanging up",
                    self.worker_id, n.notification_id, n.channel)  # fmt: skip
        metrics.SENDS_GIVEN_UP.labels(n.channel).inc()
        flight.given_up = flight.stopping = True
        channel = self.channels.get(n.channel)
        if channel is not None:
            try:
                await asyncio.wait_for(channel.cancel(n.notification_id), HANGUP_WAIT)
            except Exception as exc:
                log.warning("hanging up %s failed: %r", n.notification_id, exc, exc_info=True)
        loop = asyncio.get_running_loop()
        until = loop.time() + HANGUP_WAIT
        while not flight.recording and flight.runner is not None and not flight.runner.done():
            if loop.time() >= until:
                flight.cut_off = True
                flight.runner.cancel()
                return
            await asyncio.sleep(0.05)

    def _progress(self, flight: _Flight, progress: Progress) -> None:
        if progress is Progress.ANSWERED:
            self._spawn(self._mark_answered(flight.task))

    async def _mark_answered(self, task: SendTask) -> None:
        try:
            await self.engine.mark_answered(task)
        except Exception as exc:  # noqa: BLE001 (FailureLog logs it)
            # only a duplicate call after a crash depends on it
            self._answer_failures.failed(exc)

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
            except Exception as exc:  # noqa: BLE001 (FailureLog logs it)
                self._record_failures.failed(exc)
                await asyncio.gather(*(self._record_one(t, r) for t, r, _ in batch))
            for _, _, done in batch:
                if not done.done():
                    done.set_result(None)

    async def _record_one(self, task: SendTask, result: DeliveryResult) -> None:
        """Retry until committed: a result given up on would leave the job leased to a
        worker that has forgotten it, and the notification would be sent again. Recording
        is idempotent (a result already committed is not recorded twice). Only a drain
        ends the retries, at its deadline."""
        delay = 0.2
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self.engine.complete(task, result, self.worker_id)
                return
            except Exception as exc:  # noqa: BLE001 (FailureLog logs it)
                self._record_failures.failed(exc)
            stop_at = self._give_up_recording_at
            if stop_at is not None and loop.time() + delay > stop_at:
                log.error("worker %s stops with the result of %s unrecorded (%s): it is sent "
                          "again once its lease runs out", self.worker_id,
                          task.notification.notification_id, result.status.value)  # fmt: skip
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def cancel(self, request: CancelRequest) -> None:
        """An alert was acked/resolved: hang up what this worker has in flight for it.
        A reassigned or snoozed alert goes on: only the calls listed are hung up."""
        now = time.monotonic()
        match request.scope:
            case CancelScope.ALERT:
                _remember(self._closed, [request.alert_id], now)
                ended = None
            case CancelScope.CHAIN | CancelScope.SNOOZE:
                ended = {nid for nid, _channel in request.notifications}
                _remember(self._withdrawn, ended, now)
            case _:
                assert_never(request.scope)
        for flight in list(self._inflight.values()):
            n = flight.task.notification
            if ended is not None and n.notification_id not in ended:
                continue
            if n.alert_id == request.alert_id and not flight.stopping:
                if request.committed_at is not None:
                    latency = max(0.0, time.time() - request.committed_at)
                    metrics.CANCEL_LATENCY.observe(latency)
                self._spawn(self._hang_up(flight))

    async def _hang_up(self, flight: _Flight) -> None:
        """Stop a send whose alert closed or whose job is no longer ours; the send then
        reports how it ended (cancelled) unless it was handed on."""
        flight.stopping = True
        n = flight.task.notification
        channel = self.channels.get(n.channel)
        if channel is None:
            return
        try:
            await asyncio.wait_for(channel.cancel(n.notification_id), HANGUP_LIMIT)
        except TimeoutError:
            log.warning("hanging up %s took over %gs; left to its deadline",
                        n.notification_id, HANGUP_LIMIT)  # fmt: skip
        except Exception:
            log.exception("cancel of %s failed", n.notification_id)

    async def _check_inflight(self) -> None:
        """Every `check_interval`: give up the sends past their deadline (`_give_up`),
        renew the leases of the sends still within it (every third of the lease, or at
        once after a failed renewal) and stop the sends whose alert closed or whose job
        another worker took over. A send past its bound is not renewed: if this worker
        is wedged, its lease runs out and another takes it. (Deadlines are swept here
        rather than timed per send: a timer and a task more for every notification cost
        the hot path.)"""
        lease_every = max(0.5, self.engine.config.lease_seconds / 3)
        loop = asyncio.get_running_loop()
        renewed_at = loop.time()
        renew_failed = False
        while True:
            await asyncio.sleep(min(self.check_interval, lease_every))
            flights = list(self._inflight.values())
            if not flights:
                renewed_at, renew_failed = loop.time(), False
                continue
            now = loop.time()
            for flight in flights:
                if now >= flight.deadline and not (flight.recording or flight.given_up):
                    self._spawn(self._give_up(flight))
            try:
                if renew_failed or now - renewed_at >= lease_every:
                    live = [f for f in flights if f.recording or now < f.deadline]
                    renew_failed = True
                    await self.engine.renew(self.worker_id, [j for f in live for j in f.job_ids])
                    renewed_at, renew_failed = now, False
                sending = [f for f in flights if not f.recording and not f.stopping]
                lost, closed = await self.engine.inflight_status(
                    self.worker_id,
                    [f.task.job_id for f in sending],
                    {f.task.notification.alert_id for f in sending},
                )
            except Exception as exc:  # noqa: BLE001 (FailureLog logs it)
                self._check_failures.failed(exc)
                continue
            for flight in sending:
                if flight.task.job_id in lost:
                    log.warning(
                        "worker %s: %s is no longer ours; hanging up without a result",
                        self.worker_id,
                        flight.task.notification.notification_id,
                    )
                    flight.handed_on = True
                    self._spawn(self._hang_up(flight))
            for alert_id in closed:
                await self.cancel(CancelRequest(alert_id, (), None))

    async def _drain(self, timeout: float) -> None:
        """Finish within `timeout`: sends in flight get most of it to end by themselves;
        then the ones still running are hung up and their jobs released to the other
        workers at once (no waiting for the lease), and results not yet committed are
        retried until the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._give_up_recording_at = deadline
        running = [f.runner for f in self._inflight.values() if f.runner is not None]
        if running:
            await asyncio.wait(running, timeout=max(0.0, timeout - HANDBACK_RESERVE))
        handed = [f for f in self._inflight.values() if not f.recording]
        if handed:
            for flight in handed:
                flight.handed_on = True
            hangups = [self._spawn(self._hang_up(f)) for f in handed]
            await asyncio.wait(hangups, timeout=HANGUP_WAIT)
            try:
                async with asyncio.timeout(max(0.1, deadline - loop.time())):
                    await self.engine.release(
                        self.worker_id, [j for f in handed for j in f.job_ids]
                    )
                log.info("worker %s handed %d sends back", self.worker_id, len(handed))
            except Exception as exc:
                log.warning("worker %s could not hand %d sends back (%r): their leases run "
                            "out instead", self.worker_id, len(handed), exc,
                            exc_info=True)  # fmt: skip
        left = [f.runner for f in self._inflight.values() if f.runner is not None]
        if left:
            await asyncio.wait(left, timeout=max(0.0, deadline - loop.time()))
        for flight in list(self._inflight.values()):
            if flight.runner is not None:
                await cancel_and_wait(flight.runner)
        for task in list(self._background):
            await cancel_and_wait(task)

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
            except Exception as exc:  # noqa: BLE001 (FailureLog logs it)
                self._purge_failures.failed(exc)

    async def _remind_shifts(self) -> None:
        """Every `reminder_interval` s one pass of shift reminders at the engine's clock
        (escalation.reminders); a failed pass is logged and the next one tries again."""
        if self.reminder_interval <= 0:
            return
        while True:
            await asyncio.sleep(self.reminder_interval)
            try:
                await self.reminders.run_once(self.engine.clock())
            except Exception as exc:  # noqa: BLE001 (FailureLog logs it)
                self._reminder_failures.failed(exc)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task


def _remember(seen: dict[str, float], keys: Iterable[str], now: float) -> None:
    """Note keys with the time; past 10,000 entries, forget those over ten minutes old."""
    for key in keys:
        seen[key] = now
    if len(seen) > 10_000:
        for key in [k for k, t in seen.items() if now - t >= 600]:
            del seen[key]


async def _wait_event(event: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)
