"""The same IVR flows as TwiML, for calls Twilio carries (the `twilio` trunk kind).

On a SIP call our runner plays the flow on the audio. On a Twilio call Twilio does: each
webhook asks "what now?" and gets a TwiML document that runs the flow up to the next
keypress. The state of the conversation travels in the Gather's action URL (node, attempt,
steps taken), which Twilio signs back to us, so any API process can answer any callback.

Supported nodes: `say`, `menu`, `hangup` and `amd` (Twilio's own detection decides, from
the AnsweredBy parameter). `twiml_errors` names any other node so such a flow is refused
when the configuration loads, not on the first call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from xml.etree import ElementTree as ET

from ivr.flow import AmdNode, Flow, HangupNode, MenuNode, SayNode, render_text

__all__ = [
    "MenuState",
    "TwimlStep",
    "answer",
    "gather",
    "machine_detection",
    "spoken_goodbye",
    "twiml_errors",
]

SUPPORTED = (SayNode, MenuNode, HangupNode, AmdNode)
# Twilio's own voice for <Say>; espeak-ng voices do not apply on Twilio.
SAY_VOICE = "alice"


@dataclass(frozen=True)
class MenuState:
    """Where a conversation stands while Twilio waits for a key (in the action URL)."""

    node: str
    attempt: int = 0  # prompts already repeated after no key or a wrong key
    steps: int = 0  # nodes run so far (bounded by the flow's max_steps)

    def query(self) -> dict[str, str]:
        return {"node": self.node, "attempt": str(self.attempt), "steps": str(self.steps)}

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> MenuState:
        """Raises ValueError on a missing or malformed field."""
        return cls(query["node"], int(query.get("attempt", "0")), int(query.get("steps", "0")))


@dataclass
class TwimlStep:
    """One TwiML answer and the outcomes the flow reached on the way (e.g. acknowledged)."""

    xml: str
    outcomes: list[str] = field(default_factory=list)
    digit: str | None = None  # the key that led here, if any


ActionUrl = Callable[[MenuState], str]


def twiml_errors(flow: Flow) -> list[str]:
    """Why `flow` cannot run on a Twilio call (empty: it can)."""
    return [
        f"node {node_id!r}: {node.type} is not supported on twilio trunks"
        for node_id, node in flow.nodes.items()
        if not isinstance(node, SUPPORTED)
    ]


def spoken_goodbye(text: str) -> str:
    """A document that says `text` and hangs up (outside any flow)."""
    root = ET.Element("Response")
    ET.SubElement(root, "Say", voice=SAY_VOICE).text = text
    ET.SubElement(root, "Hangup")
    return _document(root)


def machine_detection(flow: Flow) -> str | None:
    """Twilio's MachineDetection mode for `flow`: none without an amd node; waiting for the
    end of the greeting (the beep) when the flow leaves a message on a machine."""
    detectors = [n for n in flow.nodes.values() if isinstance(n, AmdNode)]
    if not detectors:
        return None
    leaves_message = any(n.wait_for_beep and n.on_machine is not None for n in detectors)
    return "DetectMessageEnd" if leaves_message else "Enable"


def answer(
    flow: Flow, variables: Mapping[str, str], action_url: ActionUrl, *, answered_by: str = ""
) -> TwimlStep:
    """The document for a call that was just answered."""
    return _Renderer(flow, variables, action_url, answered_by).run(flow.start, 0)


def gather(
    flow: Flow,
    variables: Mapping[str, str],
    action_url: ActionUrl,
    state: MenuState,
    digits: str,
) -> TwimlStep:
    """The document after the menu at `state` got `digits` (empty: no key in time)."""
    renderer = _Renderer(flow, variables, action_url, "")
    menu = flow.nodes.get(state.node)
    if not isinstance(menu, MenuNode):
        raise ValueError(f"node {state.node!r} is not a menu of flow {flow.name!r}")
    digit = digits[:1]
    if digit in menu.choices:
        step = renderer.run(menu.choices[digit], state.steps + 1)
    elif state.attempt < menu.retries:
        retry_prompt = menu.invalid_prompt if digit else menu.no_input_prompt
        if retry_prompt is not None:
            renderer.say(retry_prompt)
        again = MenuState(state.node, state.attempt + 1, state.steps)
        step = renderer.menu(menu, again)
    elif menu.on_failure is not None:
        step = renderer.run(menu.on_failure, state.steps + 1)
    else:
        step = renderer.finish()
    step.digit = digit or None
    return step


class _Renderer:
    def __init__(
        self,
        flow: Flow,
        variables: Mapping[str, str],
        action_url: ActionUrl,
        answered_by: str,
    ) -> None:
        self.flow = flow
        self.variables = {**flow.variables, **variables}
        self.action_url = action_url
        self.answered_by = answered_by
        self.root = ET.Element("Response")
        self.outcomes: list[str] = []

    def run(self, node_id: str | None, steps: int) -> TwimlStep:
        while node_id is not None:
            if steps >= self.flow.max_steps:
                break
            steps += 1
            node = self.flow.nodes[node_id]
            if node.outcome is not None:
                self.outcomes.append(node.outcome)
            if isinstance(node, SayNode):
                self.say(node.text)
                node_id = node.next
            elif isinstance(node, MenuNode):
                return self.menu(node, MenuState(node_id, 0, steps))
            elif isinstance(node, AmdNode):
                node_id = self._after_amd(node)
            elif isinstance(node, HangupNode):
                break
            else:
                raise ValueError(f"node {node_id!r}: {node.type} is not supported on twilio")
        return self.finish()

    def say(self, text: str) -> None:
        spoken = render_text(text, self.variables)
        if spoken.strip(" .,"):
            ET.SubElement(self.root, "Say", voice=SAY_VOICE).text = spoken

    def menu(self, node: MenuNode, state: MenuState) -> TwimlStep:
        prompt = ET.SubElement(
            self.root,
            "Gather",
            input="dtmf",
            numDigits="1",
            timeout=str(max(1, round(node.timeout))),
            action=self.action_url(state),
            method="POST",
            actionOnEmptyResult="true",  # no key: we decide (re-prompt or give up), not Twilio
        )
        if node.say is not None:
            spoken = render_text(node.say, self.variables)
            ET.SubElement(prompt, "Say", voice=SAY_VOICE).text = spoken
        return self._done()

    def finish(self) -> TwimlStep:
        ET.SubElement(self.root, "Hangup")
        return self._done()

    def _after_amd(self, node: AmdNode) -> str | None:
        verdict = self.answered_by
        if verdict.startswith("machine") or verdict == "fax":
            self.outcomes.append("machine")
            return node.on_machine
        if verdict == "human":
            return node.on_human
        return node.on_unknown or node.on_human

    def _done(self) -> TwimlStep:
        return TwimlStep(_document(self.root), list(self.outcomes))


def _document(root: ET.Element) -> str:
    return '<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(root, encoding="unicode")
