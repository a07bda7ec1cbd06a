"""Resolved policies and parsed plans, cached so a transaction rarely parses or loads one.

Two caches: the resolved policy a new alert starts from (reused for `plan_ttl` seconds,
refreshed in the background before it expires), and each alert's parsed plan (plans
change only when an alert is reassigned, a new revision).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from escalation import crud
from escalation.config import Policy, Recipient, RetryPolicy
from escalation.core import Plan, build_plan
from escalation.records import AlertView
from storage.db import Database
from storage.models import GroupRow, PolicyRow, RecipientRow

log = logging.getLogger(__name__)

_PLAN_CACHE_SIZE = 20_000


class UnknownPolicy(LookupError):
    pass


def recipient(row: RecipientRow) -> Recipient:
    return Recipient.model_validate(row.model_dump(exclude={"company", "updated_at"}))


class PlanCache:
    def __init__(
        self,
        db: Database,
        clock: Callable[[], datetime],
        channel_defaults: Mapping[str, RetryPolicy],
        plan_ttl: float,
    ) -> None:
        self.db = db
        self.clock = clock
        self.channel_defaults = channel_defaults
        self.plan_ttl = plan_ttl
        self._by_alert: OrderedDict[str, Plan] = OrderedDict()
        self._by_content: dict[tuple[str, str], tuple[dict[str, Any], Plan]] = {}
        self._policies: dict[tuple[str, str], tuple[float, Plan, dict[str, Any]]] = {}
        self._loads: dict[tuple[str, str], asyncio.Task[tuple[Plan, dict[str, Any]]]] = {}
        # A resolved policy's snapshot as JSON text, by the identity of the cached dict
        # (kept here, so the id stays its own): every alert of a policy stores the same.
        self._texts: dict[int, tuple[dict[str, Any], str]] = {}

    # ------------------------------------------------------------------ per alert

    def parsed(self, alert: AlertView) -> Plan:
        """Plans change only when an alert is reassigned (a new revision), so parse each
        once per revision (the hot path of every tx)."""
        plan = self._by_alert.get(alert.id)
        if plan is None or plan.revision != alert.plan.get("revision", 0):
            # Alerts of one policy mostly share one snapshot: comparing dicts is far cheaper
            # than parsing one (a worker sees every alert for the first time).
            key = (alert.company, alert.policy)
            shared = self._by_content.get(key)
            if shared is not None and shared[0] == alert.plan:
                plan = shared[1]
            else:
                plan = Plan.from_json(alert.plan)
                if plan.revision == 0:  # a reassigned plan is its alert's alone
                    self._by_content[key] = (alert.plan, plan)
            self._by_alert[alert.id] = plan
            if len(self._by_alert) > _PLAN_CACHE_SIZE:
                self._by_alert.popitem(last=False)
        return plan

    def replaced(self, alert_id: str, plan: Plan) -> None:
        """A decision gave the alert a new plan (a reassign)."""
        self._by_alert[alert_id] = plan

    def remember(
        self, alert_id: str, company: str, policy: str, plan: Plan, plan_json: dict[str, Any]
    ) -> None:
        """A new alert's plan: the next transaction on it need not parse it."""
        self._by_alert[alert_id] = plan
        if len(self._by_alert) > _PLAN_CACHE_SIZE:
            self._by_alert.popitem(last=False)
        self._by_content[(company, policy)] = (plan_json, plan)

    def text(self, plan_json: dict[str, Any]) -> str:
        """The snapshot as JSON text, dumped once per cached policy."""
        cached = self._texts.get(id(plan_json))
        if cached is not None and cached[0] is plan_json:
            return cached[1]
        if len(self._texts) > 256:
            self._texts.clear()
        text = json.dumps(plan_json)
        self._texts[id(plan_json)] = (plan_json, text)
        return text

    # ------------------------------------------------------------------ resolved policies

    def invalidate(self, company: str) -> None:
        """Forget resolved policies after a policy/recipient/group change in this process."""
        for key in [k for k in self._policies if k[0] == company]:
            del self._policies[key]
        for key in [k for k in self._loads if k[0] == company]:
            del self._loads[key]  # a load under way may predate the change

    async def in_session(
        self, s: AsyncSession, company: str, policy_name: str
    ) -> tuple[Plan, dict[str, Any]]:
        """The resolved policy, loaded in the caller's transaction when not cached for
        `plan_ttl` seconds (another process's edit applies to new alerts within that time)."""
        key = (company, policy_name)
        cached = self._policies.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1], cached[2]
        return self._cache(key, await self._load(s, company, policy_name))

    async def resolved(self, company: str, policy: str) -> tuple[Plan, dict[str, Any]]:
        """The resolved policy for a new alert, outside any transaction. One load at a
        time per policy: in the last quarter of its `plan_ttl` a cached plan is reloaded
        in the background, so under a steady stream it never expires; one that has (a
        quiet spell) is loaded once while the requests arriving meanwhile wait for it
        (each loading it for itself took a session apiece, and at 200 alerts/s with the
        default two-second `plan_ttl` that window came every two seconds).

        Raises UnknownPolicy."""
        key = (company, policy)
        cached = self._policies.get(key)
        if cached is not None:
            expires, plan, data = cached
            left = expires - time.monotonic()
            if left > 0:
                if left < self.plan_ttl / 4 and key not in self._loads:
                    self._load_once(key)
                return plan, data
        return await asyncio.shield(self._loads.get(key) or self._load_once(key))

    async def shutdown(self) -> None:
        """End the background refreshes before the database goes away: a refresh is only
        a cache fill, and one left running would outlive its pool."""
        loads = list(self._loads.values())
        for task in loads:
            task.cancel()
        await asyncio.gather(*loads, return_exceptions=True)

    def _cache(self, key: tuple[str, str], plan: Plan) -> tuple[Plan, dict[str, Any]]:
        data = plan.to_json()
        self._policies[key] = (time.monotonic() + self.plan_ttl, plan, data)
        return plan, data

    def _load_once(self, key: tuple[str, str]) -> asyncio.Task[tuple[Plan, dict[str, Any]]]:
        async def load() -> tuple[Plan, dict[str, Any]]:
            async with self.db.session() as s:
                return self._cache(key, await self._load(s, *key))

        def done(task: asyncio.Task[tuple[Plan, dict[str, Any]]]) -> None:
            if self._loads.get(key) is task:
                del self._loads[key]
            # (retrieved here: no "exception was never retrieved" for a background load)
            error = None if task.cancelled() else task.exception()
            if error is not None and not isinstance(error, UnknownPolicy):
                log.warning("loading policy %s/%s failed: %r", *key, error)

        task = asyncio.create_task(load(), name=f"plan-{key[0]}-{key[1]}")
        self._loads[key] = task
        task.add_done_callback(done)
        return task

    async def _load(self, s: AsyncSession, company: str, policy_name: str) -> Plan:
        row = await s.get(PolicyRow, (company, policy_name))
        if row is None:
            raise UnknownPolicy(policy_name)
        policy = Policy.model_validate(row.spec)
        group_names = {g for step in policy.steps for g in step.groups}
        groups: dict[str, list[str]] = {}
        if group_names:
            res = await s.execute(
                select(GroupRow).where(
                    col(GroupRow.company) == company, col(GroupRow.name).in_(group_names)
                )
            )
            groups = {g.name: list(g.members) for g in res.scalars()}
        ids = {r for step in policy.steps for r in step.recipients}
        ids |= {m for members in groups.values() for m in members}
        names = {n for step in policy.steps for n in step.schedules}
        rotas = await crud.rotas(s, company, names, self.clock())
        ids |= {r for people in rotas.values() for r in people}
        res2 = await s.execute(
            select(RecipientRow).where(
                col(RecipientRow.company) == company, col(RecipientRow.id).in_(ids)
            )
        )
        recipients = {r.id: recipient(r) for r in res2.scalars()}
        return build_plan(policy, recipients, groups, self.channel_defaults, rotas)
