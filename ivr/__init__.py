"""Declarative IVR flows, answering-machine detection and the built-in alert flows.

``FlowRunner(flow, hooks).run(call, variables)`` drives a :class:`gateway.call.Call`
through a validated :class:`Flow`; ``run_ack_flow`` is the outbound acknowledgement.
"""

from ivr.amd import AmdConfig, AmdDecision, AmdDetector, AmdResult, classify, detect_on_call
from ivr.audio import AudioStream, VoiceActivity
from ivr.builtin import ACK_OUTCOMES, ack_flow, hotline_flow, run_ack_flow
from ivr.flow import Flow, FlowError, load_flow, parse_flow
from ivr.runner import FlowContext, FlowHooks, FlowResult, FlowRunner

__all__ = [
    "ACK_OUTCOMES",
    "AmdConfig",
    "AmdDecision",
    "AmdDetector",
    "AmdResult",
    "AudioStream",
    "Flow",
    "FlowContext",
    "FlowError",
    "FlowHooks",
    "FlowResult",
    "FlowRunner",
    "VoiceActivity",
    "ack_flow",
    "classify",
    "detect_on_call",
    "hotline_flow",
    "load_flow",
    "parse_flow",
    "run_ack_flow",
]
