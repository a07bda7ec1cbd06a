"""The ack flow rendered as TwiML for Twilio calls: same wording, same menu, same bounds."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit
from xml.etree import ElementTree as ET

import pytest

from ivr.builtin import ack_flow
from ivr.flow import parse_flow
from ivr.twiml import MenuState, answer, gather, machine_detection, twiml_errors

ALERT = {"alert_severity": "Critical", "alert_title": "Database down", "alert_summary": "eu-1"}


def action(state: MenuState) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"alert": "a1", **state.query()}.items())
    return f"http://127.0.0.1:8080/v1/webhooks/twilio/voice/gather?{query}"


def verbs(xml: str) -> list[tuple[str, str]]:
    root = ET.fromstring(xml.split("?>", 1)[1])
    assert root.tag == "Response"
    out = []
    for el in root:
        out.append((el.tag, (el.text or "").strip()))
        out += [(f"{el.tag}/{child.tag}", (child.text or "").strip()) for child in el]
    return out


def gather_state(xml: str) -> MenuState:
    root = ET.fromstring(xml.split("?>", 1)[1])
    (prompt,) = root.iter("Gather")
    assert prompt.get("numDigits") == "1"
    assert prompt.get("method") == "POST"
    query = {k: v[0] for k, v in parse_qs(urlsplit(prompt.get("action", "")).query).items()}
    assert query["alert"] == "a1"  # the context travels with the state
    return MenuState.parse(query)


def test_answer_speaks_the_alert_then_offers_the_menu() -> None:
    step = answer(ack_flow(), ALERT, action)
    assert verbs(step.xml) == [
        ("Say", "Critical alert. Database down. eu-1"),
        ("Gather", ""),
        ("Gather/Say", "Press 1 to acknowledge, 2 to escalate now, 3 to resolve, 9 to repeat."),
    ]
    assert step.outcomes == []
    assert gather_state(step.xml) == MenuState("menu", 0, 2)


def test_one_acknowledges_two_escalates_with_the_flows_own_words() -> None:
    state = MenuState("menu", 0, 2)
    ack = gather(ack_flow(), ALERT, action, state, "1")
    assert ack.outcomes == ["acknowledged"]
    assert ack.digit == "1"
    assert verbs(ack.xml) == [
        ("Say", "Acknowledged, thank you. Goodbye."),
        ("Hangup", ""),
    ]
    esc = gather(ack_flow(), ALERT, action, state, "2")
    assert esc.outcomes == ["escalate"]
    assert verbs(esc.xml)[0] == ("Say", "Escalating now. Goodbye.")


def test_three_resolves_and_four_snoozes_each_confirmed_aloud() -> None:
    state = MenuState("menu", 0, 2)
    flow = ack_flow(snooze=900)
    resolved = gather(flow, ALERT, action, state, "3")
    assert resolved.outcomes == ["resolved"]
    assert verbs(resolved.xml) == [("Say", "Resolved. Goodbye."), ("Hangup", "")]
    snoozed = gather(flow, ALERT, action, state, "4")
    assert snoozed.outcomes == ["snoozed"]
    assert verbs(snoozed.xml) == [("Say", "Snoozed for 15 minutes. Goodbye."), ("Hangup", "")]
    # without snooze in the policy, 4 is a wrong key
    off = gather(ack_flow(), ALERT, action, state, "4")
    assert off.outcomes == []
    assert verbs(off.xml)[0] == ("Say", "Sorry, that is not a valid choice.")


def test_nine_repeats_and_a_wrong_key_reprompts_until_the_retries_run_out() -> None:
    flow = ack_flow(retries=1)
    repeat = gather(flow, ALERT, action, MenuState("menu", 0, 2), "9")
    assert verbs(repeat.xml)[0] == ("Say", "Critical alert. Database down. eu-1")
    assert gather_state(repeat.xml) == MenuState("menu", 0, 5)

    wrong = gather(flow, ALERT, action, MenuState("menu", 0, 2), "5")
    assert verbs(wrong.xml)[0] == ("Say", "Sorry, that is not a valid choice.")
    assert gather_state(wrong.xml) == MenuState("menu", 1, 2)
    assert wrong.outcomes == []
    assert wrong.digit == "5"

    silent = gather(flow, ALERT, action, MenuState("menu", 1, 2), "")
    assert silent.outcomes == ["not_acknowledged"]
    assert silent.digit is None
    assert verbs(silent.xml) == [("Say", "No choice received. Goodbye."), ("Hangup", "")]


def test_repeating_forever_stops_at_the_flows_step_bound() -> None:
    flow = ack_flow()
    state = MenuState("menu", 0, 2)
    for _ in range(flow.max_steps):
        step = gather(flow, ALERT, action, state, "9")
        if "<Gather" not in step.xml:
            break
        state = gather_state(step.xml)
    else:
        raise AssertionError("pressing 9 forever never ended the call")
    assert verbs(step.xml)[-1] == ("Hangup", "")


def test_answering_machine_verdict_comes_from_twilio() -> None:
    flow = ack_flow(amd=True, machine_message="Please check the pager app.")
    assert machine_detection(flow) == "DetectMessageEnd"
    assert machine_detection(ack_flow(amd=True)) == "Enable"
    assert machine_detection(ack_flow()) is None

    machine = answer(flow, ALERT, action, answered_by="machine_end_beep")
    assert machine.outcomes == ["machine"]
    assert verbs(machine.xml) == [("Say", "Please check the pager app."), ("Hangup", "")]
    human = answer(flow, ALERT, action, answered_by="human")
    assert human.outcomes == []
    assert gather_state(human.xml).node == "menu"


def test_flows_twilio_cannot_run_are_named() -> None:
    flow = parse_flow(
        {
            "name": "vm",
            "start": "rec",
            "nodes": {"rec": {"type": "record", "next": "bye"}, "bye": {"type": "hangup"}},
        }
    )
    assert twiml_errors(flow) == ["node 'rec': record is not supported on twilio trunks"]
    assert twiml_errors(ack_flow(amd=True)) == []


def test_a_forged_state_is_refused() -> None:
    with pytest.raises(ValueError, match="not a menu"):
        gather(ack_flow(), ALERT, action, MenuState("acknowledged", 0, 2), "1")
    with pytest.raises(ValueError, match="invalid literal for int"):
        MenuState.parse({"node": "menu", "attempt": "x"})
