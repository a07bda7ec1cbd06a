"""The HTTP API under schemathesis: cases generated from the running server's
/openapi.json (valid and invalid ones), sent with a real API key; every answer counted by
status class and every 5xx kept with a curl command that repeats it.

Nothing is down during the run, so a 503 is as much a failure as a 500.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import HypothesisException
from schemathesis import GenerationMode
from schemathesis.core.parameters import ParameterLocation
from schemathesis.core.result import Err

REQUEST_TIMEOUT = 10.0


@dataclass
class ApiStats:
    operations: int = 0
    requests: int = 0
    statuses: Counter[str] = field(default_factory=Counter)  # by class: 2xx .. 5xx
    transport_errors: int = 0  # no answer at all (timeout, refused connection)
    generation_errors: list[str] = field(default_factory=list)  # schemathesis could not build
    failures: list[dict[str, Any]] = field(default_factory=list)  # one per (operation, status)
    elapsed: float = 0.0


class _Sender:
    """Sends the cases of one operation and counts what comes back."""

    def __init__(
        self, stats: ApiStats, seen: dict[tuple[str, int], dict[str, Any]], label: str,
        base_url: str, headers: dict[str, str], session: requests.Session, deadline: float,
    ) -> None:  # fmt: skip
        self.stats = stats
        self.seen = seen
        self.label = label
        self.base_url = base_url
        self.headers = headers
        self.session = session
        self.deadline = deadline

    def __call__(self, case: Any) -> None:
        if time.monotonic() > self.deadline:
            return
        stats = self.stats
        stats.requests += 1
        try:
            response = case.call(base_url=self.base_url, session=self.session,
                                 headers=self.headers, timeout=REQUEST_TIMEOUT)  # fmt: skip
        except requests.RequestException:
            stats.transport_errors += 1
            return
        status = response.status_code
        stats.statuses[f"{status // 100}xx"] += 1
        if status < 500:
            return
        failure = self.seen.setdefault((self.label, status), {
            "operation": self.label, "status": status, "count": 0,
            "body": response.text[:300], "curl": case.as_curl_command(headers=self.headers),
        })  # fmt: skip
        failure["count"] += 1


def _modes(operation: Any) -> list[GenerationMode]:
    """Invalid cases need somewhere to be invalid: a body or a query. For an operation with
    only path and header parameters schemathesis finds none and spends a second looking."""
    if operation.get_request_payload_content_types() or any(
        p.location == ParameterLocation.QUERY for p in operation.iter_parameters()
    ):
        return [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    return [GenerationMode.POSITIVE]


def _as_test(send: _Sender) -> Callable[[Any], None]:
    """Hypothesis wants a plain function to decorate."""

    def send_case(case: Any) -> None:
        send(case)

    return send_case


def fuzz_api(
    base_url: str, api_key: str, examples: int, run_seed: int, deadline: float
) -> ApiStats:
    """``examples`` positive and ``examples`` negative cases per operation, until
    ``deadline``."""
    stats = ApiStats()
    began = time.monotonic()
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    session = requests.Session()
    headers = {"X-API-Key": api_key}
    seen: dict[tuple[str, int], dict[str, Any]] = {}
    for result in schema.get_all_operations():
        if time.monotonic() > deadline:
            break
        if isinstance(result, Err):  # an operation schemathesis cannot build cases for
            stats.generation_errors.append(repr(result.err())[:300])
            continue
        operation = result.ok()
        stats.operations += 1
        send = _Sender(stats, seen, operation.label, base_url, headers, session, deadline)
        for mode in _modes(operation):
            runner = seed(run_seed)(settings(
                max_examples=examples, deadline=None, database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )(given(case=operation.as_strategy(generation_mode=mode))(_as_test(send))))  # fmt: skip
            try:
                runner()
            except HypothesisException as exc:  # e.g. a schema nothing satisfies
                stats.generation_errors.append(f"{operation.label} {mode.value}: {exc!r}"[:300])
    stats.failures = list(seen.values())
    stats.elapsed = time.monotonic() - began
    return stats
