"""`ackline call +1...` through the configured carrier trunks, SIPp playing the carriers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.peers import SippRun, ackline_cli, cli_env, dtmf_pcap, free_port, sipp

pytestmark = pytest.mark.interop

NUMBER = "+14155550101"


def env(tmp: Path) -> dict[str, str]:
    """The CLI's environment: the test's own database (trunk overrides, round-robin turns)."""
    return {**cli_env(tmp), "ACKLINE_DATABASE_URL": f"sqlite:///{tmp}/ackline.db",
            "ACKLINE_AUDIT_DIR": str(tmp / "audit")}  # fmt: skip


def run(
    tmp: Path, config: dict[str, Any], *args: str, env_extra: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], str]:
    path = tmp / "ackline.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [*ackline_cli(), "call", *args, "--config", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env(tmp), **(env_extra or {})},
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    return proc.returncode, json.loads(lines[-1]) if lines else {}, proc.stderr


def carriers_cli(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`ackline carriers ...` on the configuration `run` wrote, and the same database."""
    return subprocess.run(
        [*ackline_cli(), "carriers", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env(tmp), "ACKLINE_CONFIG": str(tmp / "ackline.yaml")},
    )


def carriers(*trunks: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"carriers": {"allowed_countries": ["US"], "trunks": list(trunks), **extra}}


def test_number_fails_over_and_the_json_names_the_trunks(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        sipp("carrier_reject.xml", tmp_path / "a", calls=10, CODE="503", PHRASE="Down") as a,
        sipp("carrier_answer_dtmf.xml", tmp_path / "b", calls=10, RING_MS="0",
             PAUSE_MS="300", PCAP=str(dtmf_pcap("1"))) as b,
    ):  # fmt: skip
        config = carriers(
            {"name": "first", "host": "127.0.0.1", "port": a.port, "priority": 1},
            {"name": "second", "host": "127.0.0.1", "port": b.port, "priority": 2},
        )
        code, result, err = run(tmp_path, config, NUMBER, "--gather", "1", "--timeout", "5")
    assert code == 0, err
    assert (result["outcome"], result["digits"], result["trunk"]) == ("answered", "1", "second")
    assert [(t["trunk"], t["sip_code"]) for t in result["trunks_tried"]] == [
        ("first", 503),
        ("second", 200),
    ]
    assert result["target"].startswith(f"sip:{NUMBER}@127.0.0.1:{b.port}")


def test_route_selects_its_trunks(tmp_path: Path) -> None:
    with sipp("carrier_answer_dtmf.xml", tmp_path, calls=10, RING_MS="0", PAUSE_MS="300",
              PCAP=str(dtmf_pcap("5"))) as b:  # fmt: skip
        config = carriers(
            {"name": "main", "host": "127.0.0.1", "port": free_port(), "priority": 1},
            {"name": "backup", "host": "127.0.0.1", "port": b.port, "priority": 2},
            routes={"cheap": {"trunks": ["backup"]}},
        )
        code, result, err = run(tmp_path, config, NUMBER, "--route", "cheap", "--gather", "1")
    assert code == 0, err
    assert result["trunk"] == "backup"
    assert [t["trunk"] for t in result["trunks_tried"]] == ["backup"]  # main never tried
    assert result["digits"] == "5"


@pytest.mark.parametrize(
    ("number", "message"),
    [
        ("+1 415 555", "valid"),  # too short: not a number
        ("+44 20 7946 0958", "country"),  # GB is not allowed by this deployment
        ("+1 900 555 0199", "premium"),  # a premium-rate number
    ],
)
def test_bad_or_refused_numbers_touch_no_carrier(tmp_path: Path, number: str, message: str) -> None:
    with sipp("carrier_answer_dtmf.xml", tmp_path, calls=10, RING_MS="0", PAUSE_MS="0",
              PCAP=str(dtmf_pcap("1"))) as b:  # fmt: skip
        config = carriers({"name": "only", "host": "127.0.0.1", "port": b.port})
        code, _result, err = run(tmp_path, config, number)
        log = "".join(p.read_text() for p in tmp_path.glob("*_messages.log"))
    assert code == 2, err
    assert message in err.lower(), err
    assert "INVITE" not in log


def test_unknown_route_and_missing_carriers_are_clear_errors(tmp_path: Path) -> None:
    config = carriers({"name": "only", "host": "127.0.0.1", "port": free_port()})
    code, _, err = run(tmp_path, config, NUMBER, "--route", "nope")
    assert code == 2, err
    assert "unknown route 'nope'" in err, err
    code, _, err = run(tmp_path, {"company": "acme"}, NUMBER)
    assert code == 2, err
    assert "no carriers: section" in err, err


def test_every_trunk_failing_exits_3_with_the_attempts(tmp_path: Path) -> None:
    with sipp("carrier_reject.xml", tmp_path, calls=10, CODE="502", PHRASE="Bad Gateway") as a:
        config = carriers({"name": "only", "host": "127.0.0.1", "port": a.port})
        code, result, err = run(tmp_path, config, NUMBER)
    assert code == 3, err
    assert result["outcome"] == "failed"
    assert [(t["trunk"], t["sip_code"]) for t in result["trunks_tried"]] == [("only", 502)]


def invites(peer: SippRun) -> int:
    return sum(1 for line in peer.log_lines() if line.startswith("INVITE "))


def two_carriers(tmp: Path) -> contextlib.AbstractContextManager[tuple[SippRun, SippRun]]:
    @contextlib.contextmanager
    def both() -> Iterator[tuple[SippRun, SippRun]]:
        scenario = {"RING_MS": "0", "PAUSE_MS": "300", "PCAP": str(dtmf_pcap("1"))}
        (tmp / "a").mkdir()
        (tmp / "b").mkdir()
        with (
            sipp("carrier_answer_dtmf.xml", tmp / "a", calls=10, fields=scenario) as a,
            sipp("carrier_answer_dtmf.xml", tmp / "b", calls=10, fields=scenario) as b,
        ):
            yield a, b

    return both()


def test_a_trunk_disabled_with_the_cli_carries_no_cli_call(tmp_path: Path) -> None:
    with two_carriers(tmp_path) as (a, b):
        config = carriers(
            {"name": "a", "host": "127.0.0.1", "port": a.port, "priority": 1},
            {"name": "b", "host": "127.0.0.1", "port": b.port, "priority": 2},
        )
        first = run(tmp_path, config, NUMBER, "--gather", "1", "--timeout", "5")
        disabled = carriers_cli(tmp_path, "disable", "a")
        second = run(tmp_path, config, NUMBER, "--gather", "1", "--timeout", "5")
        enabled = carriers_cli(tmp_path, "enable", "a")
        third = run(tmp_path, config, NUMBER, "--gather", "1", "--timeout", "5")
        seen = (invites(a), invites(b))
    assert disabled.returncode == 0, disabled.stderr + enabled.stderr
    assert enabled.returncode == 0, disabled.stderr + enabled.stderr
    assert [r[0] for r in (first, second, third)] == [0, 0, 0], [
        r[2] for r in (first, second, third)
    ]
    assert [r[1]["trunk"] for r in (first, second, third)] == ["a", "b", "a"]
    assert [t["trunk"] for t in second[1]["trunks_tried"]] == ["b"]  # a never tried
    assert second[1]["digits"] == "1"
    assert seen == (2, 1)


def test_round_robin_goes_on_from_one_cli_call_to_the_next(tmp_path: Path) -> None:
    with two_carriers(tmp_path) as (a, b):
        config = carriers(
            {"name": "a", "host": "127.0.0.1", "port": a.port},
            {"name": "b", "host": "127.0.0.1", "port": b.port},
            strategy="round_robin",
        )
        results = [run(tmp_path, config, NUMBER, "--gather", "1", "--timeout", "5")
                   for _ in range(3)]  # fmt: skip
        seen = (invites(a), invites(b))
    assert [code for code, _, _ in results] == [0, 0, 0], [err for _, _, err in results]
    assert [result["trunk"] for _, result, _ in results] == ["a", "b", "a"]
    assert seen == (2, 1)


def test_trunk_session_timer_settings_reach_the_invite(tmp_path: Path) -> None:
    """`ackline call` asks for the trunk's session_expires and min_se, as workers do."""
    with sipp("carrier_session_timer.xml", tmp_path, calls=10, RING_MS="0", PAUSE_MS="300",
              PCAP=str(dtmf_pcap("1"))) as peer:  # fmt: skip
        trunk = {"name": "timed", "host": "127.0.0.1", "port": peer.port,
                 "session_expires": 600, "min_se": 120}  # fmt: skip
        code, result, err = run(tmp_path, carriers(trunk), NUMBER, "--gather", "1",
                                "--timeout", "5")  # fmt: skip
        timers = [line.split() for line in peer.log_lines() if line.startswith("TIMER")]
    assert code == 0, err
    assert (result["outcome"], result["trunk"]) == ("answered", "timed")
    assert timers == [["TIMER", "600", "120", "timer"]], timers


async def test_a_trunk_budget_held_by_a_worker_through_redis_counts_for_the_cli(
    tmp_path: Path,
) -> None:
    """With Redis, a trunk at its max_concurrent across all processes carries no CLI call."""
    from carriers.budgets import RedisBudgets
    from carriers.trunk import Trunk

    redis_url, prefix = "redis://127.0.0.1:6379/0", f"ackline-test-{secrets.token_hex(4)}"
    extra = {"REDIS_URL": redis_url, "ACKLINE_REDIS_PREFIX": prefix}
    budgets = RedisBudgets(redis_url, prefix)
    with two_carriers(tmp_path) as (a, b):
        full = {"name": "a", "host": "127.0.0.1", "port": a.port, "priority": 1,
                "max_concurrent": 1}  # fmt: skip
        config = carriers(full, {"name": "b", "host": "127.0.0.1", "port": b.port, "priority": 2})
        args = (NUMBER, "--gather", "1", "--timeout", "5")
        # a worker's call in progress on a, through the shared budget
        refusal, claim = await budgets.acquire(Trunk.model_validate(full))
        assert refusal is None
        try:
            held = await asyncio.to_thread(run, tmp_path, config, *args, env_extra=extra)
        finally:
            await budgets.release("a", claim)
            await budgets.close()
        free = await asyncio.to_thread(run, tmp_path, config, *args, env_extra=extra)
        seen = (invites(a), invites(b))
    assert (held[0], held[1]["trunk"]) == (0, "b"), held[2]
    assert [t["trunk"] for t in held[1]["trunks_tried"]] == ["b"]  # a was never dialled
    assert (free[0], free[1]["trunk"]) == (0, "a"), free[2]  # released: a carries it again
    assert seen == (1, 1)


def test_a_sip_uri_call_asks_for_the_gateway_session_timer_settings(tmp_path: Path) -> None:
    """`ackline call sip:...` (no trunk) asks for ACKLINE_SIP_SESSION_EXPIRES/MIN_SE as
    `serve` does for its dials without a trunk."""
    with sipp("carrier_session_timer.xml", tmp_path, RING_MS="0", PAUSE_MS="300",
              PCAP=str(dtmf_pcap("1"))) as peer:  # fmt: skip
        proc = subprocess.run(
            [*ackline_cli(), "call", f"sip:{NUMBER}@127.0.0.1:{peer.port}", "--gather", "1",
             "--timeout", "5", "--json"],
            capture_output=True, text=True, timeout=60,
            env={**env(tmp_path), "ACKLINE_SIP_SESSION_EXPIRES": "300",
                 "ACKLINE_SIP_MIN_SE": "150"},
        )  # fmt: skip
        timers = [line.split() for line in peer.log_lines() if line.startswith("TIMER")]
    assert proc.returncode == 0, proc.stderr
    assert timers == [["TIMER", "300", "150", "timer"]], timers
