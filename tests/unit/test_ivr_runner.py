"""FlowRunner on real Calls: two in-process gateways over loopback SIP/RTP."""

from __future__ import annotations

import asyncio
import socket
import wave
from pathlib import Path

import numpy as np
import pytest

from gateway.call import Gateway, GatewayConfig
from gateway.sip.transaction import TimerSettings
from ivr import FlowRunner, ack_flow, parse_flow
from ivr.audio import frame_dbfs, write_wav
from tests.ivr_audio import corpus_fixture, load  # noqa: F401 - corpus is a fixture
from tests.ivr_harness import RecordingHooks, loopback, press

pytestmark = pytest.mark.timeout(60)

MENU_FLOW = """
name: menu-test
start: hello
default_outcome: nothing
nodes:
  hello: {type: say, text: "Hello {name}.", next: menu}
  menu:
    type: menu
    say: "Press 1 or 2."
    choices: {"1": one, "2": two}
    timeout: 1.0
    retries: 1
    invalid_prompt: "Invalid."
    no_input_prompt: "Nothing pressed."
    on_failure: failed
  one: {type: say, text: "One.", outcome: chose_one, next: bye}
  two: {type: hangup, outcome: chose_two}
  failed: {type: hangup, outcome: gave_up}
  bye: {type: hangup}
"""


def speech(seconds: float, amplitude: int = 8000) -> np.ndarray:
    """A stand-in for a caller speaking: a warbling tone (not a steady beep)."""
    t = np.arange(int(seconds * 8000)) / 8000
    freq = 300 + 150 * np.sin(2 * np.pi * 3 * t)
    phase = 2 * np.pi * np.cumsum(freq) / 8000
    return (amplitude * np.sin(phase)).astype(np.int16)


async def test_menu_choice_path_variables_and_barge_in(tmp_path: Path) -> None:
    runner = FlowRunner(parse_flow(MENU_FLOW))
    name = "Alice" + " and friends" * 40  # a greeting of about 3 s
    async with loopback(tmp_path, runner, name=name) as lb:
        call = await lb.call()
        answered = asyncio.get_running_loop().time()
        await press(call, "1", after=0.3)  # during the greeting: barge-in, type-ahead
        result = await lb.result()
        await call.wait_ended(5)
        took = asyncio.get_running_loop().time() - answered
    assert result.path == ["hello", "menu", "one", "bye"]
    assert result.outcome == "chose_one"
    assert result.ended_by == "flow"
    assert result.variables["menu_choice"] == "1"
    assert result.variables["caller"] == "+14155550142"
    assert result.variables["direction"] == "inbound"
    assert f"Hello {name}." in lb.prompts.texts
    assert took < 2.0  # the key cut the 3 s greeting short and answered the menu
    assert call.result is not None
    assert call.result.hangup_by == "remote"


async def test_menu_invalid_then_valid(tmp_path: Path) -> None:
    runner = FlowRunner(parse_flow(MENU_FLOW))
    async with loopback(tmp_path, runner, name="Bob") as lb:
        call = await lb.call()
        await press(call, "7", after=0.6)
        await press(call, "2", after=0.8)
        result = await lb.result()
    assert result.outcome == "chose_two"
    assert result.path == ["hello", "menu", "two"]
    assert "Invalid." in lb.prompts.texts
    assert "Nothing pressed." not in lb.prompts.texts


async def test_menu_retries_exhausted(tmp_path: Path) -> None:
    runner = FlowRunner(parse_flow(MENU_FLOW))
    async with loopback(tmp_path, runner, name="Carol") as lb:
        await lb.call()
        result = await lb.result()
    assert result.path == ["hello", "menu", "failed"]
    assert result.outcome == "gave_up"
    assert lb.prompts.texts.count("Press 1 or 2.") == 2  # first prompt + one retry
    assert lb.prompts.texts.count("Nothing pressed.") == 1


GATHER_FLOW = """
name: gather-test
start: pin
nodes:
  pin:
    type: gather
    say: "Enter your PIN then pound."
    variable: pin
    min_digits: 4
    max_digits: 6
    timeout: 2.5
    retries: 1
    invalid_prompt: "That PIN is too short."
    next: ok
    on_failure: bad
  ok: {type: say, text: "PIN {pin} accepted.", outcome: ok}
  bad: {type: hangup, outcome: bad}
"""


async def test_gather_retries_short_input_then_accepts(tmp_path: Path) -> None:
    runner = FlowRunner(parse_flow(GATHER_FLOW))
    async with loopback(tmp_path, runner) as lb:
        call = await lb.call()
        await press(call, "12#", after=0.5)
        await asyncio.sleep(0.8)
        await press(call, "4321#")
        result = await lb.result()
    assert result.variables["pin"] == "4321"
    assert result.outcome == "ok"
    assert lb.prompts.texts.count("That PIN is too short.") == 1
    assert "PIN 4321 accepted." in lb.prompts.texts


HOTLINE_LIKE = """
name: record-test
start: rec
nodes:
  rec:
    type: record
    say: "Speak after the tone."
    max_length: 8
    silence_timeout: 1.0
    next: page
  page: {type: escalate, policy: "ops-{severity}", next: done, on_error: sorry}
  done: {type: webhook, url: "http://127.0.0.1:9/hook/{alert_id}", outcome: paged}
  sorry: {type: hangup, outcome: page_failed}
"""


async def test_record_ends_on_silence_then_hooks_get_variables(tmp_path: Path) -> None:
    hooks = RecordingHooks()
    runner = FlowRunner(parse_flow(HOTLINE_LIKE), hooks, recordings_dir=tmp_path / "rec")
    async with loopback(tmp_path, runner, severity="high") as lb:
        call = await lb.call()
        await asyncio.sleep(1.2)  # prompt (0.2 s) and beep (0.4 s)
        await call.play(speech(1.5))
        result = await lb.result()
    assert result.path == ["rec", "page", "done"]
    assert result.outcome == "paged"
    [recording] = result.recordings
    assert result.variables["recording"] == str(recording)
    assert result.variables["recording_ended_by"] == "silence"
    with wave.open(str(recording)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (8000, 1, 2)
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    seconds = len(pcm) / 8000
    assert 1.3 < seconds < 3.5  # the speech plus a little: trailing silence was trimmed
    assert frame_dbfs(pcm) > -30
    [(policy, variables)] = hooks.escalations
    assert policy == "ops-high"
    assert variables["recording"] == str(recording)
    assert variables["caller"] == "+14155550142"
    [(url, hook_vars)] = hooks.webhooks
    assert url == "http://127.0.0.1:9/hook/alert-42"
    assert hook_vars["alert_id"] == "alert-42"


async def test_record_ends_on_pound_and_failed_hook_takes_on_error(tmp_path: Path) -> None:
    hooks = RecordingHooks(fail=True)
    runner = FlowRunner(parse_flow(HOTLINE_LIKE), hooks, recordings_dir=tmp_path / "rec")
    async with loopback(tmp_path, runner, severity="low") as lb:
        call = await lb.call()
        await asyncio.sleep(1.2)
        playing = asyncio.ensure_future(call.play(speech(6.0)))
        await asyncio.sleep(1.0)
        await press(call, "#")
        result = await lb.result()
        playing.cancel()
    assert result.variables["recording_ended_by"] == "key"
    assert float(result.variables["recording_seconds"]) < 4.0  # well before max_length
    assert result.path == ["rec", "page", "sorry"]
    assert result.outcome == "page_failed"
    assert "escalation engine unavailable" in result.variables["error"]


async def test_hook_error_without_on_error_stops_the_flow(tmp_path: Path) -> None:
    flow = parse_flow(
        """
start: page
nodes:
  page: {type: escalate, policy: p, next: done}
  done: {type: say, text: "Paged.", outcome: paged}
"""
    )
    runner = FlowRunner(flow, RecordingHooks(fail=True))
    async with loopback(tmp_path, runner) as lb:
        await lb.call()
        result = await lb.result()
    assert result.ended_by == "error"
    assert result.error is not None
    assert "escalate hook failed" in result.error
    assert result.path == ["page"]
    assert result.outcome == "completed"


async def test_caller_hangup_ends_the_flow(tmp_path: Path) -> None:
    runner = FlowRunner(parse_flow(MENU_FLOW))
    async with loopback(tmp_path, runner, name="Dan") as lb:
        call = await lb.call()
        await asyncio.sleep(0.5)
        await call.hangup()
        result = await lb.result()
    assert result.ended_by == "caller"
    assert result.outcome == "nothing"
    assert result.path[0] == "hello"


async def test_step_limit_bounds_a_repeat_loop(tmp_path: Path) -> None:
    flow = parse_flow(
        """
start: a
max_steps: 5
nodes:
  a: {type: say, text: "Again.", next: a}
"""
    )
    async with loopback(tmp_path, FlowRunner(flow)) as lb:
        await lb.call()
        result = await lb.result()
    assert result.ended_by == "step_limit"
    assert result.path == ["a"] * 5


@pytest.mark.parametrize(
    ("keys", "outcome", "path_tail"),
    [
        ("1", "acknowledged", ["menu", "acknowledged", "end"]),
        ("2", "escalate", ["menu", "escalate", "end"]),
        ("3", "resolved", ["menu", "resolved", "end"]),
        ("4", "snoozed", ["menu", "snoozed", "end"]),
        ("91", "acknowledged", ["menu", "alert", "menu", "acknowledged", "end"]),
        ("", "not_acknowledged", ["menu", "no_choice", "end"]),
        ("5", "not_acknowledged", ["menu", "no_choice", "end"]),
    ],
)
async def test_ack_flow(tmp_path: Path, keys: str, outcome: str, path_tail: list[str]) -> None:
    runner = FlowRunner(ack_flow(retries=1, digit_timeout=1.0, snooze=900))
    alert = {"alert_title": "Database down on eu-1", "alert_summary": "Replica lag"}
    async with loopback(tmp_path, runner, **alert) as lb:
        call = await lb.call()
        for index, key in enumerate(keys):
            await press(call, key, after=0.6 if index == 0 else 0.9)
            if key == "5":  # a wrong key, twice: each attempt gets one
                await press(call, key, after=1.2)
        result = await lb.result()
    assert result.outcome == outcome
    assert result.path[0] == "alert"
    assert result.path[-len(path_tail) :] == path_tail
    assert "New alert. Database down on eu-1. Replica lag" in lb.prompts.texts
    if keys == "5":
        assert "Sorry, that is not a valid choice." in lb.prompts.texts
    confirmation = CONFIRMATIONS.get(outcome)
    if confirmation is not None:  # every choice is confirmed aloud, last, before the hang-up
        assert lb.prompts.texts[-1] == confirmation


CONFIRMATIONS = {
    "acknowledged": "Acknowledged, thank you. Goodbye.",
    "escalate": "Escalating now. Goodbye.",
    "resolved": "Resolved. Goodbye.",
    "snoozed": "Snoozed for 15 minutes. Goodbye.",
}


async def test_ack_flow_without_snooze_or_resolve_takes_their_keys_as_wrong(
    tmp_path: Path,
) -> None:
    runner = FlowRunner(ack_flow(retries=2, digit_timeout=1.0, resolve=False))
    async with loopback(tmp_path, runner) as lb:
        call = await lb.call()
        await press(call, "4", after=0.6)
        await press(call, "3", after=1.2)
        result = await lb.result()
    assert result.outcome == "not_acknowledged"
    assert lb.prompts.texts.count("Sorry, that is not a valid choice.") == 2
    assert "Press 1 to acknowledge, 2 to escalate now, 9 to repeat." in lb.prompts.texts


async def test_record_without_speech_ends_after_initial_timeout(tmp_path: Path) -> None:
    flow = parse_flow(
        """
start: rec
nodes:
  rec: {type: record, initial_timeout: 1.0, silence_timeout: 0.5, beep: false}
"""
    )
    runner = FlowRunner(flow, recordings_dir=tmp_path / "rec")
    async with loopback(tmp_path, runner) as lb:
        await lb.call()
        started = asyncio.get_running_loop().time()
        result = await lb.result()
        took = asyncio.get_running_loop().time() - started
    assert result.variables["recording_ended_by"] == "no_speech"
    assert 0.8 < took < 2.5
    assert 0.9 <= float(result.variables["recording_seconds"]) <= 1.2


AMD_FLOW = """
start: detect
nodes:
  detect: {type: amd, on_human: hello, settings: {max_analysis: 4}}
  hello: {type: say, text: "Hello, this is ackline.", outcome: talked}
"""


@pytest.mark.parametrize(
    ("clip", "outcome", "path"),
    [("h03_bob", "talked", ["detect", "hello"]), ("m03_bob_nobeep", "machine", ["detect"])],
)
async def test_amd_node_routes_on_the_verdict(
    tmp_path: Path, corpus: dict[str, Path], clip: str, outcome: str, path: list[str]
) -> None:
    async with loopback(tmp_path, FlowRunner(parse_flow(AMD_FLOW))) as lb:
        call = await lb.call()
        playing = asyncio.ensure_future(call.play(load(corpus[clip])))
        result = await lb.result()
        playing.cancel()
    assert result.outcome == outcome
    assert result.path == path
    expected = "human" if clip.startswith("h") else "machine"
    assert result.amd is not None
    assert result.amd.decision.value == expected
    assert result.variables["amd_result"] == expected


async def test_play_node_sends_the_wav_and_a_missing_file_is_an_error(tmp_path: Path) -> None:
    t = np.arange(8000) / 8000
    chirp = (6000 * np.sin(2 * np.pi * (300 + 400 * t) * t)).astype(np.int16)
    (tmp_path / "sounds").mkdir()
    write_wav(tmp_path / "sounds" / "chirp.wav", chirp)
    flow = parse_flow(
        """
start: chirp
nodes:
  chirp: {type: play, file: chirp.wav, barge_in: false, next: missing}
  missing: {type: play, file: nothere.wav}
"""
    )
    runner = FlowRunner(flow, files_dir=tmp_path / "sounds")
    async with loopback(tmp_path, runner) as lb:
        call = await lb.call()
        result = await lb.result()
        await call.wait_ended(5)
        assert call.media is not None
        heard = call.media.received_audio()
    assert result.path == ["chirp", "missing"]
    assert result.ended_by == "error"
    assert result.error is not None
    assert "nothere.wav" in result.error
    scores = np.correlate(heard.astype(np.float64), chirp.astype(np.float64), mode="valid")
    lag = int(np.argmax(scores))
    window = heard[lag : lag + len(chirp)].astype(np.float64)
    similarity = scores[lag] / (np.linalg.norm(window) * np.linalg.norm(chirp) + 1e-9)
    assert similarity > 0.95  # G.711 round trip of the file, as the caller heard it


async def test_unanswered_call_runs_nothing(tmp_path: Path) -> None:
    quick = GatewayConfig(host="127.0.0.1", timers=TimerSettings(t1=0.02, t2=0.1))
    async with Gateway(quick) as gateway:  # nobody listens: timer B fires in 1.3 s
        call = await gateway.dial(f"sip:nobody@127.0.0.1:{free_udp_port()}", ring_timeout=3)
        assert not call.answered
        result = await FlowRunner(parse_flow(MENU_FLOW)).run(call)
    assert result.ended_by == "not_answered"
    assert result.path == []
    assert result.outcome == "nothing"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


BRIDGE_FLOW = """
name: bridge-test
start: connect
default_outcome: nothing
nodes:
  connect:
    type: bridge
    to: "oncall:{team}"
    say: "Connecting you."
    ring_timeout: 3
    connected_outcome: bridged
    next: talked
    on_no_answer: missed
    on_error: broken
  talked: {type: hangup, outcome: talked}
  missed: {type: hangup, outcome: missed}
  broken: {type: hangup, outcome: broken}
"""


@pytest.mark.parametrize(
    ("answers", "fail", "outcome"),
    [(True, False, "talked"), (False, False, "missed"), (False, True, "broken")],
)
async def test_bridge_node_follows_the_hook(
    tmp_path: Path, answers: bool, fail: bool, outcome: str
) -> None:
    class Hooks(RecordingHooks):
        async def bridge(self, ctx: object, target: str, ring_timeout: float) -> bool:
            self.bridges.append(f"{target}/{ring_timeout:g}")
            if fail:
                raise OSError("no carrier")
            return answers

    hooks = Hooks()
    runner = FlowRunner(parse_flow(BRIDGE_FLOW), hooks)
    async with loopback(tmp_path, runner, team="db") as lb:
        await lb.call()
        result = await lb.result()
    assert hooks.bridges == ["oncall:db/3"]
    assert result.outcome == outcome
    assert result.path[0] == "connect"
    assert result.variables.get("connect_connected") == (None if fail else
                                                         ("yes" if answers else "no"))  # fmt: skip


def test_bridge_node_needs_hooks() -> None:
    with pytest.raises(ValueError, match="bridge"):
        FlowRunner(parse_flow(BRIDGE_FLOW))
