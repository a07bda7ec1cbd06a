"""Built-in flows: the outbound alert acknowledgement and a reference inbound hotline.

They are YAML text in this module (not package data files) so they ship with the code in
any install; :func:`ack_flow` adjusts the menu's patience and adds answering-machine
detection before validating, so every variant goes through the same checks as a flow an
operator writes.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from gateway.call import Call
from ivr.flow import Flow, parse_flow
from ivr.runner import FlowHooks, FlowResult, FlowRunner

__all__ = [
    "ACK_FLOW_YAML",
    "ACK_OUTCOMES",
    "HOTLINE_FLOW_YAML",
    "AckOutcome",
    "ack_flow",
    "hotline_flow",
    "run_ack_flow",
]


class AckOutcome(enum.StrEnum):
    """Every outcome the ack flow can return (a flow's outcomes are its node names' words)."""

    ACKNOWLEDGED = "acknowledged"  # pressed 1
    ESCALATE = "escalate"  # pressed 2
    RESOLVED = "resolved"  # pressed 3 (unless the policy turned it off)
    SNOOZED = "snoozed"  # pressed 4 (only when the policy snoozes)
    NOT_ACKNOWLEDGED = "not_acknowledged"
    MACHINE = "machine"


ACK_OUTCOMES = tuple(o.value for o in AckOutcome)
"""Anything but acknowledged, resolved or snoozed means keep paging."""

ACK_FLOW_YAML = """
name: ack
start: alert
default_outcome: not_acknowledged
max_steps: 40
variables:
  alert_severity: New
  alert_title: an alert
  alert_summary: ""
nodes:
  alert:
    type: say
    text: "{alert_severity} alert. {alert_title}. {alert_summary}"
    next: menu
  menu:
    type: menu
    say: "Press 1 to acknowledge, 2 to escalate now, 3 to resolve, 4 to snooze, 9 to repeat."
    choices: {"1": acknowledged, "2": escalate, "3": resolved, "4": snoozed, "9": alert}
    timeout: 6
    retries: 2
    invalid_prompt: "Sorry, that is not a valid choice."
    on_failure: no_choice
  acknowledged:
    type: say
    text: "Acknowledged, thank you. Goodbye."
    outcome: acknowledged
    barge_in: false
    next: end
  escalate:
    type: say
    text: "Escalating now. Goodbye."
    outcome: escalate
    barge_in: false
    next: end
  resolved:
    type: say
    text: "Resolved. Goodbye."
    outcome: resolved
    barge_in: false
    next: end
  snoozed:
    type: say
    text: "Snoozed. Goodbye."
    outcome: snoozed
    barge_in: false
    next: end
  no_choice:
    type: say
    text: "No choice received. Goodbye."
    outcome: not_acknowledged
    next: end
  end:
    type: hangup
"""

HOTLINE_FLOW_YAML = """
name: hotline
start: greet
default_outcome: abandoned
variables:
  policy: default
nodes:
  greet:
    type: say
    text: "Welcome to the ackline on-call hotline."
    next: menu
  menu:
    type: menu
    say: "Press 1 to report an outage."
    choices: {"1": record}
    timeout: 5
    retries: 2
    invalid_prompt: "Sorry, that is not a valid choice."
    on_failure: goodbye
  record:
    type: record
    say: "Describe the outage after the tone. Press pound when you are done."
    max_length: 30
    silence_timeout: 2
    next: page
  page:
    type: escalate
    policy: "{policy}"
    outcome: reported
    next: connect
    on_error: page_failed
  connect:
    type: bridge
    to: "oncall:{policy}"
    say: "Connecting you to the on-call engineer."
    ring_timeout: 20
    connected_outcome: connected
    next: end
    on_no_answer: paged
    on_error: paged
  paged:
    type: say
    text: "Thank you. The team has been paged. Goodbye."
    outcome: reported
    barge_in: false
    next: end
  page_failed:
    type: say
    text: "Sorry, the team could not be paged. Please call again."
    outcome: failed
    next: end
  goodbye:
    type: say
    text: "Goodbye."
    next: end
  end:
    type: hangup
"""


def _load(text: str) -> dict[str, Any]:
    raw = yaml.safe_load(text)
    assert isinstance(raw, dict)
    return raw


_ACK = _load(ACK_FLOW_YAML)
# the menu's keys in the order they are offered, and how the menu says each
_KEYS = (AckOutcome.ACKNOWLEDGED, AckOutcome.ESCALATE, AckOutcome.RESOLVED, AckOutcome.SNOOZED)
_OFFER = {
    AckOutcome.ACKNOWLEDGED: "acknowledge",
    AckOutcome.ESCALATE: "escalate now",
    AckOutcome.RESOLVED: "resolve",
    AckOutcome.SNOOZED: "snooze",
}


def _withdraw(raw: dict[str, Any], outcome: AckOutcome) -> None:
    """Take a choice off the menu: its key becomes a wrong key, its node goes."""
    menu = raw["nodes"]["menu"]
    menu["choices"] = {k: o for k, o in menu["choices"].items() if o != outcome.value}
    del raw["nodes"][outcome.value]


def ack_flow(
    *,
    retries: int = 2,
    digit_timeout: float = 6.0,
    invalid_prompt: str | None = "Sorry, that is not a valid choice.",
    amd: bool = False,
    machine_message: str | None = None,
    resolve: bool = True,
    snooze: float | None = None,
) -> Flow:
    """The acknowledgement flow: 1 acknowledged, 2 escalate, 3 resolved, 4 snoozed, 9
    repeat, else re-prompt; every choice is confirmed aloud before the hang-up.

    ``retries`` is how many times the menu is repeated after no or a wrong key before the
    result is ``not_acknowledged``. ``resolve`` offers 3; ``snooze`` (seconds, whole
    minutes) offers 4, which is not offered without it. With ``amd`` the callee's first
    words are analysed first: a machine gets ``machine_message`` after its beep (or
    nothing, and the call ends), and the outcome is ``machine``.
    """
    raw = copy.deepcopy(_ACK)
    menu = raw["nodes"]["menu"]
    offer = dict(_OFFER)
    if not resolve:
        _withdraw(raw, AckOutcome.RESOLVED)
    if snooze is None:
        _withdraw(raw, AckOutcome.SNOOZED)
    else:
        minutes = round(snooze / 60)
        span = f"{minutes} minute{'' if minutes == 1 else 's'}"
        offer[AckOutcome.SNOOZED] = f"snooze for {span}"
        raw["nodes"][AckOutcome.SNOOZED.value]["text"] = f"Snoozed for {span}. Goodbye."
    keys = {o: k for k, o in menu["choices"].items()}
    offered = [f"{keys[o]} to {offer[o]}" for o in _KEYS if o in keys]
    menu["say"] = f"Press {', '.join(offered)}, 9 to repeat."
    menu["retries"] = retries
    menu["timeout"] = digit_timeout
    if invalid_prompt is None:
        menu.pop("invalid_prompt")
    else:
        menu["invalid_prompt"] = invalid_prompt
    if amd:
        detect: dict[str, Any] = {"type": "amd", "on_human": raw["start"]}
        if machine_message:
            detect["on_machine"] = "voicemail"
            raw["nodes"]["voicemail"] = {
                "type": "say",
                "text": machine_message,
                "barge_in": False,
                "next": "end",
            }
        raw["nodes"]["detect"] = detect
        raw["start"] = "detect"
    return parse_flow(raw, source="built-in ack flow")


def hotline_flow() -> Flow:
    """Reference inbound flow: greet, 1 to report, record, page the team, then try to put
    the caller through to the on-call responder; if nobody answers, confirm the page."""
    return parse_flow(HOTLINE_FLOW_YAML, source="built-in hotline flow")


async def run_ack_flow(
    call: Call,
    alert: Mapping[str, object],
    *,
    flow: Flow | None = None,
    hooks: FlowHooks | None = None,
    recordings_dir: Path | None = None,
    on_outcome: Callable[[str], None] | None = None,
) -> FlowResult:
    """Run the ack flow on an answered outbound call; ``result.outcome`` is in ACK_OUTCOMES.

    ``alert`` fills the prompt: ``alert_title``, ``alert_summary``, ``alert_severity``.
    """
    runner = FlowRunner(
        flow or ack_flow(), hooks, recordings_dir=recordings_dir, on_outcome=on_outcome
    )
    return await runner.run(call, alert)
