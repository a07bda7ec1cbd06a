"""`ackline call +1...` through the configured carrier trunks, SIPp playing the carriers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.peers import ackline_cli, cli_env, dtmf_pcap, free_port, sipp

pytestmark = pytest.mark.interop

NUMBER = "+14155550101"


def run(tmp: Path, config: dict[str, Any], *args: str) -> tuple[int, dict[str, Any], str]:
    path = tmp / "ackline.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [*ackline_cli(), "call", *args, "--config", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(tmp),
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    return proc.returncode, json.loads(lines[-1]) if lines else {}, proc.stderr


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
    assert code == 2 and "unknown route 'nope'" in err, err
    code, _, err = run(tmp_path, {"company": "acme"}, NUMBER)
    assert code == 2 and "no carriers: section" in err, err


def test_every_trunk_failing_exits_3_with_the_attempts(tmp_path: Path) -> None:
    with sipp("carrier_reject.xml", tmp_path, calls=10, CODE="502", PHRASE="Bad Gateway") as a:
        config = carriers({"name": "only", "host": "127.0.0.1", "port": a.port})
        code, result, err = run(tmp_path, config, NUMBER)
    assert code == 3, err
    assert result["outcome"] == "failed"
    assert [(t["trunk"], t["sip_code"]) for t in result["trunks_tried"]] == [("only", 502)]
