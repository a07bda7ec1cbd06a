"""Types of the native paced RTP sender (gateway/media/_rtpsend.c)."""

from typing import Any

_Bytes = bytes | bytearray | memoryview

RING: int
STEPS: int
PTIME_MS: int
MAX_PACKET: int

def open_stream(fd: int, address: tuple[Any, ...], period: int = 1) -> int: ...
def push(sid: int, packet: _Bytes, /) -> bool: ...
def push_rtp(
    sid: int,
    payload: _Bytes,
    frame_size: int,
    sequence_number: int,
    timestamp: int,
    ssrc: int,
    payload_type: int,
    marker: bool = False,
    samples: int = -1,
) -> int: ...
def flush(sid: int, /) -> int: ...
def queued(sid: int, /) -> int: ...
def stream_stats(sid: int, /) -> dict[str, int]: ...
def close_stream(sid: int, /) -> None: ...
def stats() -> dict[str, Any]: ...
def reset_stats() -> None: ...
