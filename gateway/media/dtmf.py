"""DTMF in all three forms a SIP call can carry it: RFC 4733 events, SIP INFO and in-band tones.

Alert acknowledgement depends on a single key press, so every path here is built to report each
key exactly once: RFC 4733 senders retransmit end packets and lose packets, in-band tones last
many analysis blocks, and speech or noise must never be mistaken for a key. Everything is a pure
state machine or function; the RTP/SIP layers feed it.
"""

from __future__ import annotations

import functools
import re
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "DIGITS",
    "DtmfDigit",
    "DtmfMethod",
    "GoertzelDetector",
    "Rfc4733Receiver",
    "dtmf_tone",
    "feed_all",
    "info_dtmf_body",
    "parse_info_dtmf",
    "rfc4733_packets",
]

DIGITS: Final = "0123456789*#ABCD"
"""RFC 4733 event codes 0-15, indexed by event number."""

_ROW_HZ: Final = (697.0, 770.0, 852.0, 941.0)
_COL_HZ: Final = (1209.0, 1336.0, 1477.0, 1633.0)
_KEYPAD: Final = ("123A", "456B", "789C", "*0#D")
_KEY_POSITION: Final = {key: (r, c) for r, keys in enumerate(_KEYPAD) for c, key in enumerate(keys)}
# Relative frequency offsets searched when confirming a tone (ITU-T Q.24 accepts ±1.5 %).
_PAIR_OFFSETS: Final = (-0.015, -0.01, -0.005, 0.0, 0.005, 0.01, 0.015)

# RFC 4733 telephone-event is always 8 kHz in the SDP we negotiate.
_EVENT_CLOCK_RATE: Final = 8000
_MAX_EVENT_DURATION: Final = 0xFFFF


class DtmfMethod(StrEnum):
    """How a digit reached us; kept on each digit for logging and duplicate suppression."""

    RFC4733 = "rfc4733"
    SIP_INFO = "sip_info"
    INBAND = "inband"
    TWILIO_GATHER = "twilio_gather"  # received only: Twilio's <Gather> heard the key for us


@dataclass(frozen=True)
class DtmfDigit:
    """One key press. ``at`` is when it was recognised (caller's clock)."""

    digit: str
    method: DtmfMethod
    at: float
    duration_ms: int


def _check_digit(digit: str) -> str:
    """Normalise a key to its canonical form, rejecting anything a keypad cannot send."""
    if len(digit) != 1 or digit.upper() not in DIGITS:
        raise ValueError(f"not a DTMF digit: {digit!r}")
    return digit.upper()


# --------------------------------------------------------------------------------------------
# RFC 4733 telephone-event
# --------------------------------------------------------------------------------------------


@dataclass
class _PendingEvent:
    digit: str
    duration: int
    last_seen: float


def _newer(a: int, b: int) -> bool:
    """True when RTP timestamp ``a`` is after ``b`` in 32-bit serial arithmetic (wraps)."""
    diff = (a - b) & 0xFFFFFFFF
    return 0 < diff < 0x80000000


class Rfc4733Receiver:
    """Turns telephone-event RTP payloads into digits, each reported exactly once.

    An event is identified by (SSRC, RTP timestamp): every packet of one key press carries the
    timestamp of its start. The digit is reported on the first end (E bit) packet; the redundant
    end retransmissions are ignored. If all end packets are lost the event is still reported,
    when a newer event from the same SSRC starts or when :meth:`flush` finds it idle for
    ``timeout`` seconds. When one packet completes two events at once the second is queued and
    returned by the next :meth:`receive` or :meth:`flush`, so call ``flush`` periodically.
    """

    _DONE_MEMORY = 256

    def __init__(self, clock_rate: int = _EVENT_CLOCK_RATE, *, timeout: float = 0.2) -> None:
        if clock_rate <= 0:
            raise ValueError("clock_rate must be positive")
        self.clock_rate = clock_rate
        self.timeout = timeout
        self._pending: dict[tuple[int, int], _PendingEvent] = {}
        # Events already reported; remembered so late retransmissions are not reported again.
        self._done: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._ready: list[DtmfDigit] = []

    def receive(
        self, payload: bytes, timestamp: int, ssrc: int, marker: bool, now: float
    ) -> DtmfDigit | None:
        """Feed one telephone-event payload; returns a digit when one is complete.

        ``marker`` is accepted for symmetry with the RTP header but not trusted: the marker
        packet is as likely to be lost as any other, the timestamp is what identifies an event.
        """
        del marker
        if len(payload) >= 4:
            event, flags, duration = struct.unpack_from("!BBH", payload)
            if event < len(DIGITS):
                self._accept(DIGITS[event], bool(flags & 0x80), duration, timestamp, ssrc, now)
        return self._ready.pop(0) if self._ready else None

    def flush(self, now: float) -> list[DtmfDigit]:
        """Report queued digits and events whose end packets never came within ``timeout``."""
        for key, event in list(self._pending.items()):
            if now - event.last_seen >= self.timeout:
                self._finish(key, event, now)
        ready, self._ready = self._ready, []
        return ready

    def _accept(
        self, digit: str, end: bool, duration: int, timestamp: int, ssrc: int, now: float
    ) -> None:
        timestamp &= 0xFFFFFFFF
        key = (ssrc, timestamp)
        # A newer event from this SSRC means older unfinished ones lost all their end packets.
        for other_key, other in list(self._pending.items()):
            if other_key[0] == ssrc and _newer(timestamp, other_key[1]):
                self._finish(other_key, other, now)
        if key in self._done:
            return
        event = self._pending.get(key)
        if event is None:
            event = _PendingEvent(digit, duration, now)
            self._pending[key] = event
        else:
            event.duration = max(event.duration, duration)
            event.last_seen = now
        if end:
            # The end packet carries the event's total duration, which is authoritative.
            event.duration = duration
            self._finish(key, event, now)

    def _finish(self, key: tuple[int, int], event: _PendingEvent, now: float) -> None:
        del self._pending[key]
        self._done[key] = None
        while len(self._done) > self._DONE_MEMORY:
            self._done.popitem(last=False)
        duration_ms = round(event.duration * 1000 / self.clock_rate)
        self._ready.append(DtmfDigit(event.digit, DtmfMethod.RFC4733, now, duration_ms))


def rfc4733_packets(
    digit: str, *, duration_ms: int = 100, volume: int = 10, samples_per_packet: int = 160
) -> list[tuple[bytes, bool, int]]:
    """Build the telephone-event payloads for one key press, as (payload, marker, ts_offset).

    One packet per ``samples_per_packet`` of an 8 kHz clock, the duration field growing each
    time; the final packet is sent three times with the E bit (RFC 4733 §2.5.1.4) so a single
    loss does not hide the end. All packets share the event's start timestamp (offset 0).
    """
    event = DIGITS.index(_check_digit(digit))
    if not 0 <= volume <= 63:
        raise ValueError("volume must be 0..63 (-dBm0)")
    if samples_per_packet <= 0:
        raise ValueError("samples_per_packet must be positive")
    total = duration_ms * _EVENT_CLOCK_RATE // 1000
    if not 0 < total <= _MAX_EVENT_DURATION:
        raise ValueError("duration_ms out of range for a single event")
    durations = list(range(samples_per_packet, total, samples_per_packet))
    packets = [(struct.pack("!BBH", event, volume, d), False, 0) for d in durations]
    end = struct.pack("!BBH", event, 0x80 | volume, total)
    packets.extend((end, False, 0) for _ in range(3))
    first_payload, _, offset = packets[0]
    packets[0] = (first_payload, True, offset)
    return packets


# --------------------------------------------------------------------------------------------
# In-band detection
# --------------------------------------------------------------------------------------------


# OpenBLAS multithreads a GEMM from m * n * k = 4 * 65536 on; stay below that.
_SINGLE_THREAD_GEMM = 200_000


@functools.cache
def _dft_basis(sample_rate: int, freqs: tuple[float, ...], length: int) -> npt.NDArray[np.float64]:
    """Cosine then sine columns of the DFT at ``freqs``: real, so a block's power at all of
    them is one real matrix product (BLAS), and shared by every detector with that layout."""
    phase = 2.0 * np.pi * np.outer(np.arange(length), freqs) / sample_rate
    basis = np.concatenate((np.cos(phase), np.sin(phase)), axis=1)
    basis.flags.writeable = False
    return basis


def _power(
    blocks: npt.NDArray[np.float64], basis: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """|X(f)|^2 per block (row) and frequency of ``basis``, as Goertzel would give.

    The product runs in slices small enough that OpenBLAS keeps them on this thread: a
    threaded GEMM of a few hundred blocks costs several times more on a busy machine (its
    threads spin for cores the event loop and the far end need) than it saves.
    """
    rows = max(1, _SINGLE_THREAD_GEMM // basis.size)
    if len(blocks) <= rows:
        parts = blocks @ basis
    else:
        parts = np.concatenate([blocks[i : i + rows] @ basis for i in range(0, len(blocks), rows)])
    half = basis.shape[1] // 2
    power: npt.NDArray[np.float64] = parts[:, :half] ** 2 + parts[:, half:] ** 2
    return power


class GoertzelDetector:
    """In-band DTMF detector over Goertzel filters, for calls that carry keys only as audio.

    Audio is cut into 106-sample blocks at 8 kHz (13.25 ms): short enough that a 40 ms tone
    always covers two whole blocks, which the two-block debounce needs (205-sample blocks
    cannot do that). Per block the power at the 8 DTMF frequencies is computed as one matrix
    product, which equals Goertzel's output. A block holds a key only when:

    * each tone is above an absolute level (rejects line noise),
    * the strongest row and column beat every other tone of their group by ``peak_ratio_db``,
    * twist is within limits (column weaker by <= 8 dB, row weaker by <= 4 dB),
    * the two tones carry ``min_tone_fraction`` of the block's energy (rejects noise, and
      blips too short to fill two blocks).

    A key is reported when two consecutive blocks hold it and, over those two blocks together
    (twice the frequency resolution), the two tones within ±1.5 % of nominal carry
    ``min_purity`` of the energy. That last check is what rejects voiced speech: a vowel whose
    harmonics happen to sit on a row and a column frequency still has energy in its other
    harmonics, while a real tone is only diluted by noise. The key is then not reported again
    until it has been absent for two blocks, so a long press or a glitch yields one digit.

    ``feed`` takes int16-scale PCM (any integer dtype) or float PCM in [-1, 1]; ``now`` is the
    time of the chunk's first sample and each digit's ``at`` is when its confirming block ended.
    Reported ``duration_ms`` is the tone length seen at recognition time (onset reporting).
    """

    def __init__(
        self,
        sample_rate: int = 8000,
        *,
        min_level_dbfs: float = -38.0,
        normal_twist_db: float = 8.0,
        reverse_twist_db: float = 4.0,
        peak_ratio_db: float = 6.0,
        min_tone_fraction: float = 0.6,
        min_purity: float = 0.9,
    ) -> None:
        if sample_rate < 4000:
            raise ValueError("sample_rate must be at least 4000 Hz to carry DTMF")
        self.sample_rate = sample_rate
        self.block_size = round(106 * sample_rate / 8000)
        freqs = np.array(_ROW_HZ + _COL_HZ)
        self._basis = self._dft_basis(freqs, self.block_size)
        # Confirmation looks at two blocks; 7 filters per tone span the ±1.5 % tolerance.
        pair_freqs = np.outer(freqs, 1.0 + np.array(_PAIR_OFFSETS)).reshape(-1)
        self._pair_basis = self._dft_basis(pair_freqs, 2 * self.block_size)
        # Power of a full-block sine of the minimum amplitude: |X|^2 = (A * N / 2)^2.
        min_amplitude = 32768.0 * 10.0 ** (min_level_dbfs / 20.0)
        self._min_power = (min_amplitude * self.block_size / 2.0) ** 2
        self._normal_twist = 10.0 ** (normal_twist_db / 10.0)
        self._reverse_twist = 10.0 ** (reverse_twist_db / 10.0)
        self._peak_ratio = 10.0 ** (peak_ratio_db / 10.0)
        self._min_fraction = min_tone_fraction
        self._min_purity = min_purity
        self.reset()

    def _dft_basis(self, freqs: npt.NDArray[np.float64], length: int) -> npt.NDArray[np.float64]:
        return _dft_basis(self.sample_rate, tuple(freqs.tolist()), length)

    def reset(self) -> None:
        """Forget buffered audio and debounce state, e.g. after a media change."""
        self._buffer = np.zeros(0, dtype=np.float64)
        self._last_block: npt.NDArray[np.float64] | None = None
        self._previous: str | None = None  # key held by the last block
        self._active: str | None = None  # key already reported, awaiting release
        self._run = 0  # consecutive blocks of the current key
        self._absent = 0  # consecutive blocks without the active key

    def feed(self, pcm: npt.NDArray[Any], now: float) -> list[DtmfDigit]:
        """Analyse a chunk of audio of any length; returns the keys recognised in it."""
        return feed_all([(self, pcm, now)])[0]

    @property
    def _settings(self) -> tuple[float, ...]:
        """What ``_classify`` depends on: detectors sharing it can classify in one pass."""
        return (
            self.sample_rate,
            self._min_power,
            self._normal_twist,
            self._reverse_twist,
            self._peak_ratio,
            self._min_fraction,
        )

    def _take_blocks(self, pcm: npt.NDArray[Any]) -> tuple[npt.NDArray[np.float64], int]:
        """Whole blocks of the buffered audio plus ``pcm`` (the rest stays buffered), and
        how many of their samples were buffered from before."""
        samples = np.asarray(pcm).reshape(-1)
        if np.issubdtype(samples.dtype, np.floating):
            chunk = samples.astype(np.float64) * 32768.0
        else:
            chunk = samples.astype(np.float64)
        carried = len(self._buffer)
        data = np.concatenate((self._buffer, chunk))
        count = len(data) // self.block_size
        # A copy: a slice would be a view keeping the whole chunk alive between feeds.
        self._buffer = data[count * self.block_size :].copy()
        return data[: count * self.block_size].reshape(count, self.block_size), carried

    def _finish(
        self, blocks: npt.NDArray[np.float64], keys: list[str | None], carried: int, now: float
    ) -> list[DtmfDigit]:
        """Confirm and debounce classified (DC-free) blocks; the digits they complete."""
        if len(blocks) == 0:
            return []
        # A copy: ``blocks`` is a view of every session's batch stacked by ``feed_all``.
        last_block = blocks[-1].copy()
        if self._active is None and keys.count(None) == len(keys):
            # Nothing held and nothing heard: what stepping through the blocks would do.
            self._last_block = last_block
            self._run = 1
            self._previous = None
            return []
        confirmed = self._confirm(blocks, keys)
        self._last_block = last_block
        found: list[DtmfDigit] = []
        block_ms = 1000.0 * self.block_size / self.sample_rate
        for index, key in enumerate(keys):
            if self._step(key, index in confirmed) and key is not None:
                end_sample = (index + 1) * self.block_size - carried
                at = now + end_sample / self.sample_rate
                found.append(DtmfDigit(key, DtmfMethod.INBAND, at, round(self._run * block_ms)))
        return found

    def _step(self, key: str | None, confirmed: bool) -> bool:
        """Advance the debounce state by one block; True when ``key`` should be reported now."""
        self._run = self._run + 1 if key is not None and key == self._previous else 1
        self._previous = key
        if self._active is not None:
            if key == self._active:
                self._absent = 0
                return False
            # Release only after two blocks without it, so a one-block glitch cannot split
            # one press into two reports.
            self._absent += 1
            if self._absent < 2:
                return False
            self._active = None
        if key is not None and confirmed:
            self._active = key
            self._absent = 0
            return True
        return False

    def _classify(self, blocks: npt.NDArray[np.float64]) -> list[str | None]:
        """Decide per block which key (if any) it holds, all blocks at once."""
        power = _power(blocks, self._basis)
        energy = np.einsum("ij,ij->i", blocks, blocks)
        rows, cols = power[:, :4], power[:, 4:]
        r = np.argmax(rows, axis=1)
        c = np.argmax(cols, axis=1)
        idx = np.arange(len(blocks))
        row_p = rows[idx, r]
        col_p = cols[idx, c]
        rows_other = rows.copy()
        rows_other[idx, r] = 0.0
        cols_other = cols.copy()
        cols_other[idx, c] = 0.0
        ok = (row_p >= self._min_power) & (col_p >= self._min_power)
        ok &= row_p >= self._peak_ratio * rows_other.max(axis=1)
        ok &= col_p >= self._peak_ratio * cols_other.max(axis=1)
        ok &= row_p <= self._normal_twist * col_p
        ok &= col_p <= self._reverse_twist * row_p
        # For a pure tone filling the block, 2|X|^2 / (N * energy) == 1.
        fraction = 2.0 * (row_p + col_p) / (self.block_size * np.maximum(energy, 1e-9))
        ok &= fraction >= self._min_fraction
        keys: list[str | None] = [None] * len(blocks)
        for i in np.flatnonzero(ok).tolist():
            keys[i] = _KEYPAD[int(r[i])][int(c[i])]
        return keys

    def _confirm(self, blocks: npt.NDArray[np.float64], keys: list[str | None]) -> set[int]:
        """Indices of blocks that, with the block before, form a pure enough tone pair."""
        # The key of the block before block 0 is only known when that block was kept.
        before = [self._previous if self._last_block is not None else None, *keys[:-1]]
        candidates = [
            (i, key) for i, key in enumerate(keys) if key is not None and key == before[i]
        ]
        if not candidates:
            return set()
        if self._last_block is not None:
            blocks = np.concatenate((self._last_block[np.newaxis], blocks))
            shift = 1
        else:
            shift = 0
        seconds = [i + shift for i, _ in candidates]
        pairs = np.concatenate((blocks[[s - 1 for s in seconds]], blocks[seconds]), axis=1)
        power = _power(pairs, self._pair_basis)
        tones = power.reshape(len(pairs), 8, len(_PAIR_OFFSETS)).max(axis=2)
        energy = np.einsum("ij,ij->i", pairs, pairs)
        confirmed: set[int] = set()
        for j, (index, key) in enumerate(candidates):
            row, col = _KEY_POSITION[key]
            tone_power = tones[j, row] + tones[j, 4 + col]
            if 2.0 * tone_power >= self._min_purity * pairs.shape[1] * max(energy[j], 1e-9):
                confirmed.add(index)
        return confirmed


def feed_all(
    jobs: Sequence[tuple[GoertzelDetector, npt.NDArray[Any], float]],
) -> list[list[DtmfDigit]]:
    """``detector.feed(pcm, now)`` for each job, as one vectorised pass over all their blocks.

    Per call the detector's cost is almost all numpy call overhead, so hundreds of calls are
    far cheaper classified together. Results are those of feeding each job in turn; a
    detector may appear more than once (its chunks are then taken in order).
    """
    results: list[list[DtmfDigit]] = [[] for _ in jobs]
    taken = [detector._take_blocks(pcm) for detector, pcm, _ in jobs]
    groups: dict[tuple[float, ...], list[int]] = {}
    for index, (detector, _, _) in enumerate(jobs):
        if len(taken[index][0]):
            groups.setdefault(detector._settings, []).append(index)
    for indices in groups.values():
        parts = [taken[i][0] for i in indices]
        stacked = np.concatenate(parts) if len(parts) > 1 else parts[0]
        stacked = stacked - stacked.mean(axis=1, keepdims=True)  # DC would dilute the tones
        keys = jobs[indices[0]][0]._classify(stacked)
        start = 0
        for i, part in zip(indices, parts, strict=True):
            detector, _, now = jobs[i]
            end = start + len(part)
            results[i] = detector._finish(stacked[start:end], keys[start:end], taken[i][1], now)
            start = end
    return results


def dtmf_tone(
    digit: str, duration_ms: int, sample_rate: int = 8000, amplitude: float = 0.3
) -> npt.NDArray[np.int16]:
    """Synthesize a key's dual tone; ``amplitude`` is per component, as a fraction of full scale.

    Used for in-band sending to gateways that ignore RFC 4733, and for tests.
    """
    key = _check_digit(digit)
    if duration_ms < 0:
        raise ValueError("duration_ms must not be negative")
    row = next(i for i, keys in enumerate(_KEYPAD) if key in keys)
    col = _KEYPAD[row].index(key)
    t = np.arange(duration_ms * sample_rate // 1000) / sample_rate
    wave = np.sin(2 * np.pi * _ROW_HZ[row] * t) + np.sin(2 * np.pi * _COL_HZ[col] * t)
    scaled = np.clip(np.round(wave * amplitude * 32767.0), -32768, 32767)
    return scaled.astype(np.int16)


# --------------------------------------------------------------------------------------------
# SIP INFO
# --------------------------------------------------------------------------------------------

_DEFAULT_INFO_DURATION_MS: Final = 100
_KEY_VALUE = re.compile(r"^\s*([A-Za-z_-]+)\s*=\s*(.*?)\s*$")


def _signal_to_digit(value: str) -> str | None:
    """Accept a keypad character or an RFC 4733 event number, as different vendors send."""
    value = value.strip()
    if len(value) == 1 and value.upper() in DIGITS:
        return value.upper()
    if value.isascii() and value.isdigit() and int(value) < len(DIGITS):
        return DIGITS[int(value)]
    return None


def parse_info_dtmf(content_type: str, body: bytes) -> tuple[str, int] | None:
    """Extract (digit, duration_ms) from a SIP INFO body, or None when it is not DTMF.

    Handles ``application/dtmf-relay`` (``Signal=5`` / ``Duration=160`` lines, any case,
    CRLF or LF) and ``application/dtmf`` (the bare key or its event number 0-15).
    """
    media_type = content_type.split(";", 1)[0].strip().lower()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if media_type == "application/dtmf":
        digit = _signal_to_digit(text)
        return None if digit is None else (digit, _DEFAULT_INFO_DURATION_MS)
    if media_type != "application/dtmf-relay":
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _KEY_VALUE.match(line)
        if match is None:
            return None
        fields.setdefault(match.group(1).lower(), match.group(2))
    signal = fields.get("signal")
    if signal is None:
        return None
    digit = _signal_to_digit(signal)
    if digit is None:
        return None
    raw_duration = fields.get("duration")
    if raw_duration is None:
        return digit, _DEFAULT_INFO_DURATION_MS
    if not (raw_duration.isascii() and raw_duration.isdigit()) or len(raw_duration) > 9:
        return None
    return digit, int(raw_duration)


def info_dtmf_body(digit: str, duration_ms: int = 160) -> tuple[str, bytes]:
    """Build an ``application/dtmf-relay`` INFO body, the form most SIP peers accept."""
    key = _check_digit(digit)
    if duration_ms <= 0:
        raise ValueError("duration_ms must be positive")
    return "application/dtmf-relay", f"Signal={key}\r\nDuration={duration_ms}\r\n".encode()
