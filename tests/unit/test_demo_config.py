"""The first-run demo's files agree: ackline.demo.yaml rings the address the shipped
softphone script answers on, and `make run` loads the demo when there is no ackline.yaml."""

from __future__ import annotations

from pathlib import Path

from escalation.config import load_config
from gateway.softphone import load_script

ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_rings_the_softphone_script_on_loopback() -> None:
    cfg = load_config(ROOT / "ackline.demo.yaml")
    script = load_script(ROOT / "examples" / "answer-and-ack.yaml")
    assert script.answer
    assert script.listen == "127.0.0.1:5070"
    assert cfg.voice_target == f"sip:{{number}}@{script.listen}"
    assert cfg.carriers is None
    assert cfg.hotline is None
    [critical] = cfg.policies
    assert critical.name == "critical"  # the README's curl pages it
    assert critical.steps[0].channels == ["voice"]
    assert [s.model_dump() for s in script.steps][:2] == [
        {"wait_audio": 20.0, "min_ms": 500},
        {"dtmf": "1", "method": "rfc4733", "duration_ms": 120},
    ]


def test_make_run_loads_the_demo_without_an_ackline_yaml() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "test -f ackline.yaml && echo ackline.yaml || echo ackline.demo.yaml" in makefile
