"""Independent SIP peers (SIPp, baresip) started on loopback for interop tests."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# free_port and listening are re-exported: the tests take them from here with sipp().
from bench.ports import free_media_port
from bench.ports import free_port as free_port
from bench.ports import listening as listening

SCENARIOS = Path(__file__).parent / "scenarios"
PCAPS = Path("/usr/share/sip-tester")
PCAP_NAMES = {"*": "star", "#": "pound"}
REPO = Path(__file__).resolve().parents[2]


def dtmf_pcap(digit: str) -> Path:
    return PCAPS / f"dtmf_2833_{PCAP_NAMES.get(digit, digit)}.pcap"


def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return
        time.sleep(0.02)
    raise TimeoutError(f"timed out waiting for {what}")


def popen_logged(
    cmd: list[str], log_path: Path, *, env: Mapping[str, str], cwd: Path
) -> subprocess.Popen[bytes]:
    """Start `cmd` with its stdout and stderr in `log_path` (the child keeps the file
    open; ours is closed at once). A plain function, so async tests do not fork in
    their own body."""
    with log_path.open("wb") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)


@dataclass
class SippRun:
    process: subprocess.Popen[bytes]
    port: int
    workdir: Path
    scenario: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def logs(self) -> str:
        """Everything SIPp wrote: scenario log, error trace and screen."""
        parts = []
        for path in sorted(self.workdir.glob("*")):
            if path.suffix in (".log", ".out"):
                parts.append(f"== {path.name}\n{path.read_text(errors='replace')}")
        return "\n".join(parts)

    def log_lines(self) -> list[str]:
        lines: list[str] = []
        for path in self.workdir.glob("*_logs.log"):
            lines += path.read_text(errors="replace").splitlines()
        return lines


def render_scenario(name: str, workdir: Path, **values: str) -> Path:
    text = (SCENARIOS / name).read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    missing = re.findall(r"@[A-Z_]+@", text)
    if missing:
        raise ValueError(f"unfilled placeholders {missing} in {name}")
    path = workdir / name
    path.write_text(text)
    return path


@contextlib.contextmanager
def sipp(
    scenario: str,
    workdir: Path,
    *,
    transport: str = "udp",
    remote: str | None = None,
    calls: int = 1,
    timeout_s: int = 30,
    extra: list[str] | None = None,
    port: int | None = None,
    fields: Mapping[str, str] | None = None,
    **values: str,
) -> Iterator[SippRun]:
    """Run one SIPp instance with a scenario from tests/integration/scenarios. Its
    placeholders are filled from `fields` (a shared set, kept apart from the keyword
    options so the types stay checked) and then `values`."""
    if shutil.which("sipp") is None:
        raise RuntimeError("sipp is not installed: run `make test` (installs sip-tester)")
    path = render_scenario(scenario, workdir, **{**(fields or {}), **values})
    port = port or free_port()
    media_port = free_media_port(avoid=port)
    cmd = [
        "sipp",
        "-sf",
        str(path),
        "-i",
        "127.0.0.1",
        "-p",
        str(port),
        "-mi",
        "127.0.0.1",
        "-mp",
        str(media_port),
        "-t",
        "u1" if transport == "udp" else "t1",
        "-m",
        str(calls),
        "-nostdin",
        "-timeout",
        f"{timeout_s}s",
        "-timeout_error",
        "-trace_err",
        "-trace_logs",
        "-trace_msg",
        *(extra or []),
    ]
    if remote:
        cmd.append(remote)
    out = open(workdir / "sipp_screen.out", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(cmd, cwd=workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    run = SippRun(process, port, workdir, path)
    try:
        if remote is None:
            wait_until(lambda: listening(port, transport) or process.poll() is not None, 5, "sipp")
            if process.poll() is not None:
                raise RuntimeError(f"sipp exited early:\n{run.logs()}")
        yield run
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        out.close()


def ackline_cli() -> list[str]:
    """Run the installed console script's entry point with this interpreter."""
    exe = Path(sys.executable).parent / "ackline"
    return (
        [str(exe)] if exe.exists() else [sys.executable, "-c", "from api.cli import main; main()"]
    )


def cli_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["ACKLINE_PROMPT_CACHE"] = str(tmp / "prompts")
    return env


@contextlib.contextmanager
def serve_gateway(
    tmp: Path, *args: str, env: Mapping[str, str] | None = None
) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """`ackline serve --role gateway` answering inbound calls (gather one digit, 10 s)
    on a free SIP port; yields the port and the process (its stdout: one JSON result per
    call)."""
    port = free_port()
    proc = subprocess.Popen(
        [*ackline_cli(), "serve", "--role", "gateway", "--port", str(port),
         "--gather", "1", "--timeout", "10", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**cli_env(tmp), **(env or {})},
    )  # fmt: skip
    try:
        wait_until(
            lambda: (listening(port, "udp") and listening(port, "tcp")) or proc.poll() is not None,
            30,
            "ackline serve to listen",
        )
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        yield port, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def call_results(proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
    """The call results a finished `ackline serve` printed."""
    assert proc.stdout is not None
    return [json.loads(line) for line in proc.stdout.read().splitlines() if line.startswith("{")]
