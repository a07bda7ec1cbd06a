"""Flow definitions: what validates, and that bad flows name the node and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from ivr import FlowError, FlowRunner, ack_flow, hotline_flow, load_flow, parse_flow
from ivr.builtin import ACK_FLOW_YAML, HOTLINE_FLOW_YAML
from ivr.flow import AmdNode, MenuNode, SayNode, render_text
from tests.ivr_harness import RecordingHooks

GOOD = """
name: sample
start: hello
nodes:
  hello: {type: say, text: "Alert {alert_title}", next: menu}
  menu:
    type: menu
    say: "Press 1"
    choices: {"1": bye, "9": menu}
    on_failure: bye
  bye: {type: hangup, outcome: done}
"""


def test_good_flow_parses_with_defaults() -> None:
    flow = parse_flow(GOOD)
    assert flow.name == "sample"
    assert flow.start == "hello"
    menu = flow.node("menu")
    assert isinstance(menu, MenuNode)
    assert menu.choices == {"1": "bye", "9": "menu"}
    assert (menu.retries, menu.timeout) == (2, 5.0)
    assert flow.default_outcome == "completed"
    assert flow.uses("menu")
    assert not flow.uses("record")


def test_load_flow_from_file(tmp_path: Path) -> None:
    path = tmp_path / "flow.yaml"
    path.write_text(GOOD)
    assert load_flow(path).nodes.keys() == {"hello", "menu", "bye"}
    path.write_text(GOOD.replace("next: menu", "next: gone"))
    with pytest.raises(FlowError, match=str(path)):
        load_flow(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("next: menu", "next: nowhere"), "node 'hello' field 'next': unknown node 'nowhere'"),
        (("on_failure: bye", "on_failure: exit"), "node 'menu' field 'on_failure': unknown"),
        (('"9": menu', '"9": back'), "node 'menu' field 'choices.9': unknown node 'back'"),
        (("start: hello\n", ""), "field 'start': Field required"),
        (("start: hello", "start: nope"), "field 'start': unknown node 'nope'"),
        (('"9": menu', '"10": menu'), "node 'menu' (menu) field 'choices': choice key '10'"),
        (('"9": menu', '"x": menu'), "choice key 'x' is not a single DTMF key"),
        (("type: hangup", "type: dance"), "node 'bye': unknown node type 'dance'"),
        (("{type: hangup, outcome: done}", "{outcome: done}"), "node 'bye': missing field 'type'"),
        (("{alert_title}", "{alert.__class__}"), "node 'hello' (say) field 'text': placeholder"),
        (("{alert_title}", "{alert_title"), "node 'hello' (say) field 'text': bad placeholder"),
        (('say: "Press 1"', 'say: "Press 1"\n    colour: red'), "field 'colour': Extra inputs"),
        (('say: "Press 1"', 'say: "Press 1"\n    play: a.wav'), "either 'say' or 'play'"),
        (('say: "Press 1"', "say: ''"), "node 'menu' (menu) field 'say'"),
    ],
)
def test_bad_flow_names_node_and_field(change: tuple[str, str], message: str) -> None:
    old, new = change
    assert old in GOOD
    with pytest.raises(FlowError) as info:
        parse_flow(GOOD.replace(old, new))
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ("{type: gather, variable: pin, terminators: 'x'}", "field 'terminators': 'x' is not"),
        ("{type: gather, variable: 2pin}", "field 'variable': '2pin' is not a valid variable"),
        ("{type: gather, variable: p, min_digits: 5, max_digits: 2}", "min_digits is larger"),
        ("{type: gather, variable: p, timeout: 0}", "field 'timeout'"),
        ("{type: record, finish_on_key: 'ab'}", "field 'finish_on_key': 'a' is not a DTMF"),
        ("{type: record, max_length: -1}", "field 'max_length'"),
        ("{type: escalate}", "(escalate) field 'policy': Field required"),
        ("{type: amd, settings: {greeting: 0}}", "field 'settings.greeting'"),
        ("{type: amd, on_machine: voicemail}", "field 'on_machine': unknown node 'voicemail'"),
    ],
)
def test_bad_node_fields(node: str, message: str) -> None:
    text = f"start: n\nnodes:\n  n: {node}\n"
    with pytest.raises(FlowError) as info:
        parse_flow(text)
    assert "node 'n'" in str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize("text", ["", "just text", "[1, 2]", "start: a\nnodes: {}", "a: [b"])
def test_not_a_flow(text: str) -> None:
    with pytest.raises(FlowError):
        parse_flow(text)


def test_render_text_fills_known_and_blanks_unknown() -> None:
    assert render_text("{a} and {b}.", {"a": "x"}) == "x and ."
    assert render_text("no vars", {}) == "no vars"


def test_builtin_flows_validate_and_runner_checks_requirements(tmp_path: Path) -> None:
    assert parse_flow(ACK_FLOW_YAML).name == "ack"
    assert parse_flow(HOTLINE_FLOW_YAML).name == "hotline"
    ack = ack_flow(retries=4, digit_timeout=3.0)
    menu = ack.node("menu")
    assert isinstance(menu, MenuNode)
    assert (menu.retries, menu.timeout) == (4, 3.0)
    assert menu.choices == {"1": "acknowledged", "2": "escalate", "3": "resolved", "9": "alert"}
    assert menu.say == "Press 1 to acknowledge, 2 to escalate now, 3 to resolve, 9 to repeat."
    snoozing = ack_flow(resolve=False, snooze=600).node("menu")
    assert isinstance(snoozing, MenuNode)
    assert snoozing.choices == {"1": "acknowledged", "2": "escalate", "4": "snoozed", "9": "alert"}
    assert snoozing.say == (
        "Press 1 to acknowledge, 2 to escalate now, 4 to snooze for 10 minutes, 9 to repeat."
    )
    with_amd = ack_flow(amd=True, machine_message="Please call the on-call line back.")
    detect = with_amd.node(with_amd.start)
    assert isinstance(detect, AmdNode)
    assert (detect.on_human, detect.on_machine) == ("alert", "voicemail")
    voicemail = with_amd.node("voicemail")
    assert isinstance(voicemail, SayNode)
    assert not voicemail.barge_in
    hotline = hotline_flow()
    with pytest.raises(ValueError, match="no hooks"):
        FlowRunner(hotline, recordings_dir=tmp_path)
    with pytest.raises(ValueError, match="recordings_dir"):
        FlowRunner(hotline, RecordingHooks())
    FlowRunner(hotline, RecordingHooks(), recordings_dir=tmp_path)
