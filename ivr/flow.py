"""Declarative IVR flows: a YAML graph of nodes, validated before any call uses it.

A flow names its ``start`` node and a map of nodes; each node says what to do and which
node comes next. Flows are written by operators, so mistakes are reported at load time
naming the node and field (``node 'menu' field 'choices': ...``) instead of surfacing
as a broken call at 3 a.m.

Text fields may contain ``{variables}`` (plain names only: no attribute access, indexing
or format specs, so a flow cannot reach into Python objects).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "AmdNode",
    "EscalateNode",
    "Flow",
    "FlowError",
    "GatherNode",
    "HangupNode",
    "MenuNode",
    "Node",
    "PlayNode",
    "RecordNode",
    "SayNode",
    "WebhookNode",
    "load_flow",
    "parse_flow",
    "placeholders",
    "render_text",
]

DTMF_KEYS = "0123456789*#"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NODE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class FlowError(ValueError):
    """A flow definition is invalid; the message names the node and field."""


def placeholders(text: str) -> list[str]:
    """Variable names used in ``text``; raises ValueError on anything but ``{name}``."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ValueError(f"bad placeholder in {text!r}: {exc}") from None
    for _literal, field, spec, conversion in parsed:
        if field is None:
            continue
        if not _NAME.match(field) or spec or conversion:
            raise ValueError(f"placeholder {{{field}}} must be a plain variable name")
        names.append(field)
    return names


def render_text(text: str, variables: Mapping[str, object]) -> str:
    """Fill ``{name}`` placeholders; unknown names become empty (they are logged by callers)."""
    out: list[str] = []
    for literal, field, _spec, _conversion in string.Formatter().parse(text):
        out.append(literal)
        if field is not None:
            value = variables.get(field)
            out.append("" if value is None else str(value))
    return "".join(out)


def _check_text(value: str) -> str:
    placeholders(value)
    return value


def _check_keys(value: str) -> str:
    bad = [key for key in value if key not in DTMF_KEYS]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a DTMF key (0-9, * or #)")
    return value


Text = Annotated[str, Field(min_length=1), AfterValidator(_check_text)]
"""Text spoken or sent: non-empty, ``{name}`` placeholders only."""
Keys = Annotated[str, AfterValidator(_check_keys)]


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    outcome: str | None = None  # sets the flow's outcome when this node runs

    def targets(self) -> Iterator[tuple[str, str]]:
        """(field, node id) pairs this node can continue to, for reference checks."""
        for name in (
            "next", "on_failure", "on_error", "on_human", "on_machine", "on_unknown",
            "on_no_answer",
        ):  # fmt: skip
            value = getattr(self, name, None)
            if value is not None:
                yield name, value

    def texts(self) -> Iterator[tuple[str, str]]:
        for name in ("text", "say", "invalid_prompt", "no_input_prompt", "url", "policy", "to"):
            value = getattr(self, name, None)
            if isinstance(value, str):
                yield name, value


class _Prompted(_Node):
    """A node with an optional prompt: ``say`` (TTS text) or ``play`` (a WAV file)."""

    say: Text | None = None
    play: str | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> _Prompted:
        if self.say is not None and self.play is not None:
            raise ValueError("give either 'say' or 'play', not both")
        return self


class SayNode(_Node):
    """Speak ``text`` through the prompt cache; a key press stops it (barge-in)."""

    type: Literal["say"]
    text: Text
    barge_in: bool = True
    next: str | None = None


class PlayNode(_Node):
    """Play a WAV file (8 kHz mono 16-bit, or anything the prompt converter reads)."""

    type: Literal["play"]
    file: str = Field(min_length=1)
    barge_in: bool = True
    next: str | None = None


class GatherNode(_Prompted):
    """Prompt, collect digits into ``variable``; re-prompt on bad input, then ``on_failure``."""

    type: Literal["gather"]
    variable: str
    min_digits: int = Field(1, ge=1, le=64)
    max_digits: int = Field(1, ge=1, le=64)
    timeout: float = Field(5.0, gt=0, le=300)
    terminators: Keys = "#"
    retries: int = Field(2, ge=0, le=10)
    invalid_prompt: Text | None = None
    next: str | None = None
    on_failure: str | None = None

    @field_validator("variable")
    @classmethod
    def _variable(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"{value!r} is not a valid variable name")
        return value

    @model_validator(mode="after")
    def _digits(self) -> GatherNode:
        if self.min_digits > self.max_digits:
            raise ValueError("min_digits is larger than max_digits")
        return self


class MenuNode(_Prompted):
    """Prompt and branch on one key; ``retries`` re-prompts on no/invalid input."""

    type: Literal["menu"]
    choices: dict[str, str] = Field(min_length=1)
    timeout: float = Field(5.0, gt=0, le=300)
    retries: int = Field(2, ge=0, le=10)
    invalid_prompt: Text | None = None
    no_input_prompt: Text | None = None
    on_failure: str | None = None

    @field_validator("choices")
    @classmethod
    def _choice_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if len(key) != 1 or key not in DTMF_KEYS:
                raise ValueError(f"choice key {key!r} is not a single DTMF key (0-9, * or #)")
        return value

    def targets(self) -> Iterator[tuple[str, str]]:
        yield from super().targets()
        for key, target in self.choices.items():
            yield f"choices.{key}", target


class RecordNode(_Prompted):
    """Record what the caller says into a WAV file, stored in ``variable``.

    Ends after ``max_length`` seconds, on ``silence_timeout`` seconds of silence after
    speech, when no speech starts within ``initial_timeout`` (people take a moment to
    begin), on a ``finish_on_key`` key, or when the caller hangs up (what was said is kept).
    """

    type: Literal["record"]
    variable: str = "recording"
    max_length: float = Field(60.0, gt=0, le=3600)
    silence_timeout: float = Field(3.0, ge=0, le=60)  # 0 disables
    initial_timeout: float = Field(5.0, gt=0, le=60)
    finish_on_key: Keys = "#"
    beep: bool = True
    next: str | None = None


class HangupNode(_Node):
    """End the call (and the flow)."""

    type: Literal["hangup"]


class EscalateNode(_Node):
    """Call the application's ``escalate`` hook; the alert id it returns goes to ``variable``."""

    type: Literal["escalate"]
    policy: Text
    variable: str = "alert_id"
    next: str | None = None
    on_error: str | None = None


class WebhookNode(_Node):
    """Call the application's ``webhook`` hook with ``url`` and the flow's variables."""

    type: Literal["webhook"]
    url: Text
    next: str | None = None
    on_error: str | None = None


class BridgeNode(_Node):
    """Connect the caller to ``to`` through the application's ``bridge`` hook.

    ``to`` is a phone number, a SIP URI, or whatever the application understands (the
    ackline hotline takes ``oncall:<policy>``). While it rings the caller hears ``say``.
    When the bridged conversation ends the flow continues at ``next`` (the call is usually
    over by then, so ``connected_outcome`` is set as soon as the parties are connected);
    when nobody answers, at ``on_no_answer``.
    """

    type: Literal["bridge"]
    to: Text
    say: Text | None = None
    connected_outcome: str | None = None
    ring_timeout: float = Field(20.0, gt=0, le=120)
    next: str | None = None
    on_no_answer: str | None = None
    on_error: str | None = None


Seconds = Annotated[float, Field(gt=0, le=60)]


class AmdSettings(BaseModel):
    """Overrides of :class:`ivr.amd.AmdConfig` (seconds)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    initial_silence: Seconds | None = None
    greeting: Seconds | None = None
    after_greeting_silence: Seconds | None = None
    max_analysis: Seconds | None = None
    beep: bool | None = None


class AmdNode(_Node):
    """Answering-machine detection on what the callee says first.

    On ``machine`` the flow outcome becomes ``machine``; with ``wait_for_beep`` the flow
    continues to ``on_machine`` only once the greeting is over (beep or silence), so a
    message left there is recorded. ``on_unknown`` defaults to ``on_human``.
    """

    type: Literal["amd"]
    settings: AmdSettings = AmdSettings()
    wait_for_beep: bool = True
    beep_timeout: float = Field(20.0, gt=0, le=120)
    on_human: str | None = None
    on_machine: str | None = None
    on_unknown: str | None = None


Node = Annotated[
    SayNode
    | PlayNode
    | GatherNode
    | MenuNode
    | RecordNode
    | HangupNode
    | EscalateNode
    | WebhookNode
    | AmdNode
    | BridgeNode,
    Field(discriminator="type"),
]
NODE_TYPES = (
    "say", "play", "gather", "menu", "record", "hangup", "escalate", "webhook", "amd", "bridge",
)  # fmt: skip


class Flow(BaseModel):
    """A validated flow: every reference resolves, every key is a DTMF key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "flow"
    start: str
    default_outcome: str = "completed"  # when no node set an outcome
    variables: dict[str, str] = Field(default_factory=dict)  # defaults, overridden at run
    max_steps: int = Field(100, ge=1, le=10_000)  # bounds loops such as "9 to repeat"
    nodes: dict[str, Node] = Field(min_length=1)

    @model_validator(mode="after")
    def _references(self) -> Flow:
        for node_id, node in self.nodes.items():
            if not _NODE_ID.match(node_id):
                raise ValueError(f"node {node_id!r}: invalid node id")
            for field, target in node.targets():
                if target not in self.nodes:
                    raise ValueError(f"node {node_id!r} field {field!r}: unknown node {target!r}")
        if self.start not in self.nodes:
            raise ValueError(f"field 'start': unknown node {self.start!r}")
        return self

    def node(self, node_id: str) -> Node:
        return self.nodes[node_id]

    def uses(self, node_type: str) -> bool:
        return any(node.type == node_type for node in self.nodes.values())


def _describe(error: Mapping[str, Any], raw: Mapping[str, Any]) -> str:
    """One pydantic error as "node 'x' (type) field 'y': message"."""
    loc = [str(part) for part in error.get("loc", ())]
    message = str(error.get("msg", "invalid"))
    if error.get("type") == "value_error":
        message = message.removeprefix("Value error, ")
    if len(loc) >= 2 and loc[0] == "nodes":
        node_id = loc[1]
        node = raw.get("nodes", {}).get(node_id) if isinstance(raw.get("nodes"), dict) else None
        kind = node.get("type") if isinstance(node, dict) else None
        if error.get("type") == "union_tag_invalid":
            return (
                f"node {node_id!r}: unknown node type {kind!r} "
                f"(expected one of: {', '.join(NODE_TYPES)})"
            )
        if error.get("type") == "union_tag_not_found":
            return f"node {node_id!r}: missing field 'type' ({', '.join(NODE_TYPES)})"
        # loc is nodes, id, <tag>, field...; drop the discriminator tag pydantic inserts
        rest = loc[3:] if len(loc) > 2 and loc[2] in NODE_TYPES else loc[2:]
        if rest:
            return f"node {node_id!r} ({kind}) field {'.'.join(rest)!r}: {message}"
        return f"node {node_id!r} ({kind}): {message}"
    if loc:
        return f"field {'.'.join(loc)!r}: {message}"
    return message


def parse_flow(data: str | Mapping[str, Any], *, source: str = "flow") -> Flow:
    """Validate a flow from YAML text or an already parsed mapping."""
    if isinstance(data, str):
        try:
            raw = yaml.safe_load(data)
        except yaml.YAMLError as exc:
            raise FlowError(f"{source}: not valid YAML: {exc}") from None
    else:
        raw = data
    if not isinstance(raw, Mapping):
        raise FlowError(f"{source}: a flow must be a mapping with 'start' and 'nodes'")
    try:
        return Flow.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(error, raw) for error in exc.errors()]
        raise FlowError(f"{source}: " + "; ".join(problems)) from None


def load_flow(path: str | Path) -> Flow:
    """Read and validate a flow YAML file."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise FlowError(f"{file}: cannot read the flow: {exc.strerror or exc}") from None
    return parse_flow(text, source=str(file))
